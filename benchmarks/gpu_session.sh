#!/usr/bin/env bash
# The GPU measurements as prepared commands, for a machine lent for a few minutes.
# Usage (repository root, CIFAR-10 archive copied to data/cifar10-jpeg.tar.gz beforehand):
#   bash benchmarks/gpu_session.sh budget                 # ~8.3 min: the 8-minute CIFAR-10 run
#   bash benchmarks/gpu_session.sh paper[:SECONDS]        # the paper's schedule (config cifar10),
#                                                         # resumed by the next call if cut off
#   bash benchmarks/gpu_session.sh throughput[:SECONDS]   # ~1.5 min: images/s, ours vs baseline
#   bash benchmarks/gpu_session.sh kernels[:SECONDS]      # the kernel variants of every step side
#                                                         # by side (NHWC/NCHW, torch.compile of
#                                                         # the model or the whole step), top-10
#                                                         # kernel profiles before/after
#   bash benchmarks/gpu_session.sh ablate:SECONDS         # later stages again on budget's pretext
#   bash benchmarks/gpu_session.sh pretext:SECONDS        # pretext settings (PRETEXT_EPOCHS each),
#                                                         # by purity and k-means, after budget
#   bash benchmarks/gpu_session.sh ddp[:SECONDS]          # ~4 min: benchmarks/gpu_ddp.sh
#   bash benchmarks/gpu_session.sh budget throughput:90   # several modes, in order
# A mode given :SECONDS is stopped after that many seconds (what it printed is kept).
# Each benchmark writes its JSON to benchmarks/results/<benchmark>-<device>-<date>.json (kept in
# git) and, with its log, to $OUT (or ./gpu-results) as soon as it finishes, so a command cut
# off by its time limit still returns what was done. PYTHON, CIFAR10_ARCHIVE, BUDGET, EXTRA
# (arguments for every script, e.g. --quick for a CPU dry run) and SET (config overrides for
# budget and paper, e.g. SET="perf.compile=model" for a kernel variant) may be set.
# Mining features come back as $OUT/cifar10-simclr-<epochs>ep.npz (budget and paper), to be
# committed under benchmarks/data/ for cached-feature work on a CPU (benchmarks/choose_k.py).
#
# One 15-minute window (start-up included), in order:
#   1. kernels:150 (one call, at most 2 x 150 s): pick the fastest variant;
#   2. the paper's schedule needs 500 x 50,000 / pretext + 50 x 50,000 / SCAN-128
#      + 200 x 50,000 / self-label seconds of steps (about 455 + 70 + 145 s at the issue's
#      targets of 55,000 / 35,000 / 70,000 img/s). If the winner's rates make that fit in
#      what is left: SET="perf.compile=..." paper:540 in one call, then `paper` again in the
#      next (it resumes while the machine is warm); else SET=... budget (~8.3 min).
set -uo pipefail
[ $# -ge 1 ] || { echo "usage: $0 budget|throughput|kernels|ablate|pretext|ddp[:SECONDS] ..." >&2; exit 2; }
out="${OUT:-gpu-results}"
mkdir -p "$out" benchmarks/results
archive="${CIFAR10_ARCHIVE:-data/cifar10-jpeg.tar.gz}"
py="${PYTHON:-python3}"
read -r -a extra <<< "${EXTRA:-}"
read -r -a sets <<< "${SET:-}"
[ ${#sets[@]} -gt 0 ] && sets=(--set "${sets[@]}")
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1 || true
device=$("$py" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU")' \
  | tr -c 'A-Za-z0-9.\n' '-' | sed 's/--*/-/g; s/-$//')
stamp="${device}-$(date +%Y-%m-%d)"
results=benchmarks/results
data=/tmp/cifar10-jpeg
if [ ! -d "$data/test" ]; then
  mkdir -p "$data" && tar xzf "$archive" -C "$data"
fi
data=$(dirname "$(find "$data" -maxdepth 3 -type d -name test | head -n 1)")
budget_run=/tmp/budget-run  # checkpoints stay on the machine (for ablate); small files come back
paper_run=/tmp/paper-run    # kept between calls while the machine stays warm: paper resumes

# run NAME SECONDS SCRIPT ARGS...: the script with a time limit, its log and JSON in both places
run() {
  local name="$1" limit="$2"; shift 2
  local json="$results/$name-$stamp.json"
  local cmd=("$py" "$@" --json "$json" "${extra[@]}")
  [ -n "$limit" ] && cmd=(timeout --signal=INT "$limit" "${cmd[@]}")
  echo "== $name: ${cmd[*]}" | tee -a "$out/$name.log"
  "${cmd[@]}" 2>&1 | tee -a "$out/$name.log" | grep -v '^{'
  [ -f "$json" ] && cp "$json" "$out/$name.json"
  return 0
}

for spec in "$@"; do
  mode="${spec%%:*}"; limit=""
  [ "$spec" != "$mode" ] && limit="${spec#*:}"
  case "$mode" in
    budget)
      rm -rf "$budget_run"
      run cifar10_budget "$limit" benchmarks/cifar10_budget.py --data "$data" \
        --budget "${BUDGET:-480}" --out "$budget_run" --features "$out/cifar10-simclr-budget.npz" \
        "${sets[@]}"
      cp "$budget_run/log.jsonl" "$out/cifar10_budget-epochs.jsonl" 2>/dev/null ;;
    paper)
      # the paper's schedule; a second call of this mode resumes it ($paper_run stays on a warm
      # machine). Its JSON is written after every stage, the features right after mining.
      run paper-cifar10 "$limit" benchmarks/cifar10_paper.py --data "$data" --out "$paper_run" \
        --features "$out/cifar10-simclr-paper.npz" "${sets[@]}"
      cp "$paper_run/log.jsonl" "$out/paper-cifar10-epochs.jsonl" 2>/dev/null ;;
    throughput)
      run throughput "$limit" benchmarks/throughput.py --data "$data" --repeats 2 --steps 15 \
        --warmup 6 --variants baseline eager graphs ;;
    kernels)
      # every kernel variant side by side on the pretext (the step the schedule spends most
      # on), with the top-10 kernels of the default and of the compiled step; then the other
      # steps with the variants that can win there. Cut off by the mode's limit, each part's
      # figures are in its JSON already.
      # (each compiled variant costs about a minute of compilation per step, so the variants
      # are the ones that can change the verdict; graphs-compile-nchw can be added by hand)
      run throughput-kernels "$limit" benchmarks/throughput.py --data "$data" --repeats 1 \
        --steps 15 --warmup 6 --only pretext --variants graphs graphs-nchw graphs-compile \
        graphs-compile-step --profile --profile-steps 5 --profile-variants graphs graphs-compile
      run throughput-kernels-rest "$limit" benchmarks/throughput.py --data "$data" \
        --repeats 1 --steps 15 --warmup 6 --only scan selflabel --variants graphs graphs-nchw \
        graphs-compile ;;
    ablate)
      "$py" benchmarks/ablate.py --base "$budget_run" --out "/tmp/ablate-$$" \
        --deadline "${limit:-600}" --json "$results/ablation-$stamp.jsonl" 2>&1 \
        | tee -a "$out/ablation.log" | cut -c1-300
      cp "$results/ablation-$stamp.jsonl" "$out/ablation.jsonl" 2>/dev/null ;;
    pretext)
      # pretext settings compared by neighbour purity and k-means alone, shorter pretext each
      "$py" benchmarks/ablate.py --base "$budget_run" --out "/tmp/pretext-$$" --until mine \
        --only pretext-recipe pretext-t0.2 pretext-t0.5 pretext-wd-5e-4 pretext-batch-1024 \
        --set "pretext.epochs=${PRETEXT_EPOCHS:-60}" --deadline "${limit:-600}" \
        --json "$results/pretext-ablation-$stamp.jsonl" 2>&1 \
        | tee -a "$out/pretext-ablation.log" | cut -c1-300
      cp "$results/pretext-ablation-$stamp.jsonl" "$out/pretext-ablation.jsonl" 2>/dev/null ;;
    ddp)
      # the multi-GPU section's single-GPU figures: JPEG input, mining memory, ImageNet rates
      if [ -n "$limit" ]; then timeout --signal=INT "$limit" bash benchmarks/gpu_ddp.sh
      else bash benchmarks/gpu_ddp.sh; fi ;;
    *) echo "unknown mode $mode" >&2; exit 2 ;;
  esac
done
