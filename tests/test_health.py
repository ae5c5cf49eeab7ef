"""Numerical health checks: non-finite losses, weights and outputs stop; collapse is reported."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from scanclust.config import load_config
from scanclust.health import NumericalError, check_finite, check_finite_array, collapse_warning

CFG = load_config("demo", ["pretext.optim.lr=1e6", "data.image_size=2"])


def test_finite_epoch_passes() -> None:
    check_finite({"loss": 1.5, "seconds": 2.0}, "pretext", 3, CFG, torch.nn.Linear(2, 2))


def test_nan_loss_names_stage_epoch_cause_and_kept_checkpoint() -> None:
    with pytest.raises(NumericalError) as err:
        check_finite({"loss": float("nan")}, "pretext", 2, CFG)
    message = str(err.value)
    assert message.startswith("pretext: loss became NaN or infinite in epoch 2;")
    assert "pretext.optim.lr=1e+06" in message and "data.image_size=2" in message
    assert "the checkpoint of epoch 1 is kept" in message and "\n" not in message


def test_first_epoch_says_no_checkpoint_was_written() -> None:
    with pytest.raises(NumericalError, match="no checkpoint was written"):
        check_finite({"loss": float("inf")}, "scan", 1, CFG)


def test_nan_weight_behind_a_finite_loss_is_caught() -> None:
    """The last step of an epoch can break the weights after its loss was computed."""
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 1] = float("nan")
    with pytest.raises(NumericalError, match="selflabel: model weights became NaN"):
        check_finite({"loss": 0.3}, "selflabel", 4, CFG, model)


def test_non_finite_rows_are_counted() -> None:
    values = np.ones((5, 3), dtype=np.float16)
    values[1, 0] = np.nan
    values[3, 2] = np.inf
    with pytest.raises(NumericalError, match="mine: features of 2 of 5 images"):
        check_finite_array(values, "features", "mine", CFG)
    check_finite_array(np.ones((5, 3)), "features", "mine", CFG)


@pytest.mark.parametrize("sizes, expected", [
    ([50, 50], None),
    ([9, 30, 31, 30], None),  # 9 is above 10 % of an even share of 25
    ([95, 5], "one cluster holds 95% of the 100 images"),
    ([0, 40, 30, 30], "1 of 4 clusters are empty or nearly empty"),
    ([2, 38, 30, 30], "1 of 4 clusters are empty or nearly empty"),  # 2 < 2.5
])
def test_collapse_warning(sizes: list[int], expected: str | None,
                          caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="scanclust"):
        message = collapse_warning(sizes, "scan")
    if expected is None:
        assert message is None and not caplog.records
    else:
        assert expected in message and message.startswith("scan: ")
        assert expected in caplog.text
