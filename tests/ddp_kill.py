"""``scanclust`` for torchrun in tests, with one process killed by SIGKILL mid-epoch.

    KILL_STAGE=pretext KILL_EPOCH=2 KILL_RANK=1 torchrun --nproc_per_node 2 tests/ddp_kill.py \\
        pretext --config demo --out runs/x ...

Process ``KILL_RANK`` kills itself at the second step of epoch ``KILL_EPOCH`` of ``KILL_STAGE``,
on the first attempt only (not after ``torchrun --max-restarts`` restarted the job). At that
step every process has finished the previous epoch, checkpoint included: the first step's
collectives wait for all of them.
"""

from __future__ import annotations

import os
import signal
import sys

from scanclust import cli, distributed, engine

real_train_one_epoch = engine.train_one_epoch
epochs_started = 0


def dies_at_second_step(batches):
    for step, batch in enumerate(batches):
        if step == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        yield batch


def train_one_epoch(loop, batches, desc):
    global epochs_started
    if loop.stage != os.environ["KILL_STAGE"]:
        return real_train_one_epoch(loop, batches, desc)
    epochs_started += 1
    if (epochs_started == int(os.environ["KILL_EPOCH"]) and distributed.restart_count() == 0
            and distributed.rank() == int(os.environ["KILL_RANK"])):
        batches = dies_at_second_step(batches)
    return real_train_one_epoch(loop, batches, desc)


engine.train_one_epoch = train_one_epoch

if __name__ == "__main__":
    sys.exit(cli.main())
