"""Batched augmentations: the three views of ``transforms.py`` applied to a whole batch at once.

A data set that fits in device memory is best kept there as one uint8 tensor; augmenting a batch
is then a few dozen kernels instead of a DataLoader worker pool transforming one PIL image at a
time. Every sample still draws its own parameters, from the same distributions as the per-sample
transforms: crop boxes as torchvision's RandomResizedCrop, jitter factors and order as
ColorJitter, strong ops and magnitudes from ``OP_RANGES``.

Images travel as float32 on the 0..255 scale. torchvision's tensor kernels work on uint8, so their
intermediate results are integers: resampling ops round, blends truncate (the cast to uint8).
Each op here rounds or truncates in the same place, so the two paths agree pixel for pixel up to
float noise (see the tests for the tolerance per op), and only the final normalisation leaves the
integer grid.

Nothing loops over samples or reads a value back to the host: a batch is queued on the GPU without
a synchronisation. Where samples need different ops, each op runs on the whole batch, either at a
neutral magnitude for the samples that did not draw it or followed by ``torch.where``: a few
elementwise passes instead of a sync and a gather per op. Random draws take an optional
``torch.Generator`` that must live on the data's device.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.transforms.v2 import functional as F

from scanclust.config import SimCLRAugConfig, StrongAugConfig
from scanclust.data.batch_ops import (AFFINE_ARGS, AFFINE_COLUMN, BLEND_OPS, affine_warp,
                                      blend_towards, center_offsets, coin, color_jitter,
                                      crop_resize, device_table, fixed_boxes, inverse_affine,
                                      per_sample, random_boxes, sample_resized_crop,
                                      to_grayscale, to_uint8_grid)
from scanclust.data.transforms import (OP_RANGES, Warp, check_strong_ops, cutout_extent,
                                       op_ranges)

STRONG_OP_IDS = {op: k for k, op in enumerate(OP_RANGES)}


# ---------------------------------------------------------------------------------------------
# Strong ops (paper Table S2)


def autocontrast(x: Tensor) -> Tensor:
    """Stretch each channel of each image to 0..255 (constant channels stay as they are)."""
    low, high = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
    flat = high == low
    inv_scale = torch.where(flat, 1.0, (high - low) * (1.0 / 255.0))
    low = torch.where(flat, 0.0, low)
    return to_uint8_grid((x - low) / inv_scale)


def equalize(x: Tensor) -> Tensor:
    """Histogram equalisation per image and channel, exactly torchvision's tensor equalize.

    Its kernel is already batched over leading dimensions (a scatter_add histogram and a LUT per
    [image, channel]) and has no parameters, so it is called on the integer values as they are.
    """
    return F.equalize(x.to(torch.uint8)).to(x.dtype)


def adjust_sharpness(x: Tensor, factor: Tensor) -> Tensor:
    """Blend with a 3x3 smoothing ([[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13) by a per-sample
    factor; the one-pixel border is left untouched, as torchvision and PIL do."""
    height, width = x.shape[-2:]
    if height <= 2 or width <= 2:
        return x
    # The kernel is a 3x3 box plus 4 x the centre, over 13. On integer values the sum S is exact
    # and S / 13 is never halfway between integers (13 is odd), so rounding gives the integers
    # of torchvision's conv2d, at a fraction of a depthwise convolution's cost on the CPU.
    inner = x[..., 1:-1, 1:-1]
    rows = x[..., :-2, :] + x[..., 1:-1, :] + x[..., 2:, :]
    box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]
    blurred = box.add_(inner, alpha=4.0).div_(13.0).round_()
    out = x.clone()
    out[..., 1:-1, 1:-1] = torch.addcmul(inner, blurred - inner, per_sample(1.0 - factor))
    return to_uint8_grid(out)


def solarize(x: Tensor, threshold: Tensor) -> Tensor:
    """Invert the pixels at or above a per-sample threshold; above 255 nothing is inverted."""
    return torch.where(x >= per_sample(threshold), 255.0 - x, x)


def posterize(x: Tensor, bits: Tensor) -> Tensor:
    """Keep the ``bits`` (per sample, 0..8) high bits of each integer value."""
    step = torch.pow(2.0, 8.0 - per_sample(bits).to(x.dtype))
    return torch.floor(x / step) * step


def sample_strong_ops(batch: int, num_ops_available: int, num_ops: int,
                      generator: torch.Generator | None = None,
                      device: torch.device | str | None = None,
                      replacement: bool = True) -> Tensor:
    """Op indices per sample [B, num_ops], in the order they are applied: each drawn uniformly
    and independently (``replacement``), or ``num_ops`` distinct ones, the first entries of a
    uniformly random permutation as RandomStrongOps takes them from randperm."""
    if replacement:
        return torch.randint(num_ops_available, (batch, num_ops), generator=generator,
                             device=device)
    noise = torch.rand(batch, num_ops_available, generator=generator, device=device)
    return noise.argsort(dim=1)[:, :num_ops]


def sample_magnitudes(ops: Sequence[str], chosen: Tensor,
                      generator: torch.Generator | None = None,
                      ranges: dict[str, tuple[float, float] | None] = OP_RANGES) -> Tensor:
    """A magnitude per chosen op [B, k], uniform in its interval of ``ranges`` as
    sample_magnitude: posterize draws an integer, ops without an interval get 0. One gather of
    each op's bounds instead of a pass per op."""
    u = torch.rand(chosen.shape, generator=generator, device=chosen.device)
    bounds = [ranges[op] or (0.0, 0.0) for op in ops]
    lo = device_table(tuple(b[0] for b in bounds), torch.float32, chosen.device)[chosen]
    hi = device_table(tuple(b[1] for b in bounds), torch.float32, chosen.device)[chosen]
    integer = device_table(tuple(op == "posterize" for op in ops), torch.bool,
                            chosen.device)[chosen]
    stepped = torch.minimum((lo + (hi - lo + 1) * u).floor_(), hi)
    return torch.where(integer, stepped, lo + (hi - lo) * u)


def _slot_parameters(ops: Sequence[str], chosen: Tensor, magnitudes: Tensor, height: int,
                     width: int, warp: Warp) -> dict[str, Tensor]:
    """Every slot's per-sample parameters of every op kind at once, [B, slots] each (the warps'
    maps [B, slots, 2, 3]): the sample's own magnitude where the slot's op is that kind, a
    value that changes nothing elsewhere (factor 1, solarize threshold 256, 8 posterize bits).

    Computed for all slots together, this is a few dozen small kernels where one pass per op
    and slot took hundreds.
    """
    kind = device_table(tuple(STRONG_OP_IDS[op] for op in ops), torch.long, chosen.device)[chosen]

    def drawn(*names: str) -> Tensor:
        return functools.reduce(torch.logical_or, [kind == STRONG_OP_IDS[n] for n in names])

    m = magnitudes
    out: dict[str, Tensor] = {"factor": torch.where(drawn(*BLEND_OPS), m, 1.0),
                              "to_mean": drawn("contrast"), "to_gray": drawn("color"),
                              "sharpness": torch.where(drawn("sharpness"), m, 1.0),
                              "solarize": torch.where(drawn("solarize"), m, 256.0),
                              "posterize": torch.where(drawn("posterize"), m, 8.0),
                              "autocontrast": drawn("autocontrast"), "equalize": drawn("equalize"),
                              "geometric": drawn(*AFFINE_COLUMN)}
    m64, zero = m.double(), torch.zeros_like(m, dtype=torch.float64)
    degrees = torch.rad2deg(torch.atan(m64))
    sheared = drawn("shear_x", "shear_y") & (warp.shear_pivot == "corner")
    args = torch.stack([
        torch.where(drawn("rotate"), -m64, zero),  # F.rotate turns the other way than F.affine
        torch.where(drawn("shear_x"), degrees, zero),
        torch.where(drawn("shear_y"), degrees, zero),
        torch.where(drawn("translate_x"), m64 * width, zero),
        torch.where(drawn("translate_y"), m64 * height, zero),
        torch.where(sheared, -0.5 * width, zero),  # F.affine's center=[0, 0], relative to
        torch.where(sheared, -0.5 * height, zero),  # the image centre
    ], dim=-1)
    out["theta"] = inverse_affine(args.reshape(-1, AFFINE_ARGS)).reshape(*m.shape, 2, 3)
    return out


def apply_strong_ops(x: Tensor, ops: Sequence[str], chosen: Tensor, magnitudes: Tensor,
                     warp: Warp = Warp()) -> Tensor:
    """Apply, for slot r = 0, 1, ..., each sample's op ``ops[chosen[i, r]]`` at
    ``magnitudes[i, r]``; ``chosen`` and ``magnitudes`` are [B, num_ops].

    A sample has one op per slot, so a slot runs every op kind of ``ops`` over the whole batch
    at the neutral values of ``_slot_parameters`` for the samples that did not draw it, so that
    no selection is needed. The geometric ops share one warp, by each sample's own map;
    autocontrast and equalize, which take no magnitude, and the warp are kept with torch.where
    where drawn.
    """
    height, width = x.shape[-2:]
    present = set(ops)
    p = _slot_parameters(ops, chosen, magnitudes, height, width, warp)
    for r in range(chosen.shape[1]):
        if present & set(AFFINE_COLUMN):
            x = torch.where(per_sample(p["geometric"][:, r]), affine_warp(x, p["theta"][:, r], warp), x)
        if present & set(BLEND_OPS):
            x = blend_towards(x, p["factor"][:, r], p["to_mean"][:, r], p["to_gray"][:, r])
        if "sharpness" in present:
            x = adjust_sharpness(x, p["sharpness"][:, r])
        if "solarize" in present:
            x = solarize(x, p["solarize"][:, r])
        if "posterize" in present:
            x = posterize(x, p["posterize"][:, r])
        if "autocontrast" in present:
            x = torch.where(per_sample(p["autocontrast"][:, r]), autocontrast(x), x)
        if "equalize" in present:
            x = torch.where(per_sample(p["equalize"][:, r]), equalize(x), x)
    return x


def random_strong_ops(x: Tensor, ops: Sequence[str], num_ops: int,
                      generator: torch.Generator | None = None, replacement: bool = True,
                      posterize_bits: Sequence[int] | None = None,
                      warp: Warp = Warp()) -> Tensor:
    """RandomStrongOps for a batch: each sample applies its own ``num_ops`` ops of ``ops``
    (independent draws, or distinct ones without ``replacement``), in its own order, each at
    its own uniform magnitude."""
    check_strong_ops(ops, num_ops, replacement)
    chosen = sample_strong_ops(x.shape[0], len(ops), num_ops, generator, x.device, replacement)
    magnitudes = sample_magnitudes(ops, chosen, generator, op_ranges(posterize_bits))
    return apply_strong_ops(x, ops, chosen, magnitudes, warp)


def cutout(x: Tensor, size: int, generator: torch.Generator | None = None,
           side: str = "uniform") -> Tensor:
    """transforms.Cutout per sample: zero a square hole (clipped at the border) centred at a
    uniformly drawn pixel, its side ``size`` (``fixed``) or drawn from 1..size per sample
    (``uniform``), rows and columns as transforms.cutout_extent."""
    if size == 0:
        return x
    batch, _, height, width = x.shape
    if side == "fixed":
        sides = torch.full((batch, 1), size, dtype=torch.long, device=x.device)
    else:
        sides = torch.randint(1, size + 1, (batch, 1), generator=generator, device=x.device)
    cy = torch.randint(height, (batch, 1), generator=generator, device=x.device)
    cx = torch.randint(width, (batch, 1), generator=generator, device=x.device)
    (top, bottom), (left, right) = cutout_extent(cy, sides, side), cutout_extent(cx, sides, side)
    rows, cols = torch.arange(height, device=x.device), torch.arange(width, device=x.device)
    in_rows, in_cols = (rows >= top) & (rows < bottom), (cols >= left) & (cols < right)
    hole = in_rows[:, None, :, None] & in_cols[:, None, None, :]
    return x.masked_fill(hole, 0.0)


# ---------------------------------------------------------------------------------------------
# The three views


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """0..255 -> (x / 255 - mean) / std, with mean and std on the 0..1 scale; the same float
    steps as ToDtype(scale=True) + Normalize."""
    mean_t = device_table(tuple(mean), torch.float32, x.device).reshape(1, -1, 1, 1)
    std_t = device_table(tuple(std), torch.float32, x.device).reshape(1, -1, 1, 1)
    return (x.to(torch.float32) * (1.0 / 255.0) - mean_t) / std_t


def _check_batch(x: Tensor, out_size: int | None = None) -> None:
    """A uint8 RGB batch, at least ``out_size`` on each side where the view only crops."""
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected a uint8 batch [B, 3, H, W], got {x.dtype} {list(x.shape)}")
    if out_size is not None and min(x.shape[-2:]) < out_size:
        raise ValueError(f"images of {list(x.shape[-2:])} are smaller than out_size={out_size}; "
                         "store the data set at least at the training size")


def random_affine(x: Tensor, rotate: float, shear: float, fill: int,
                  generator: torch.Generator | None = None) -> Tensor:
    """torchvision's RandomAffine(degrees=rotate, shear=(-shear, shear), bilinear) per sample:
    an angle and a horizontal shear drawn uniformly from +-rotate and +-shear degrees, about
    the centre, the uncovered corners at grey level ``fill``."""
    batch = x.shape[0]
    draws = torch.rand(batch, 2, generator=generator, device=x.device, dtype=torch.float64)
    args = torch.zeros(batch, AFFINE_ARGS, dtype=torch.float64, device=x.device)
    args[:, AFFINE_COLUMN["rotate"]] = (2 * draws[:, 0] - 1) * rotate
    args[:, AFFINE_COLUMN["shear_x"]] = (2 * draws[:, 1] - 1) * shear
    return affine_warp(x, inverse_affine(args), Warp("bilinear", fill, "center"))


def simclr_batch(x: Tensor, aug: SimCLRAugConfig, out_size: int, mean: Sequence[float],
                 std: Sequence[float], generator: torch.Generator | None = None) -> Tensor:
    """The SimCLR view of a uint8 batch [B, 3, H, W] -> float32 [B, 3, out_size, out_size]:
    random resized crop, flip, the optional rotation and shear, colour jitter with probability
    jitter_p, grayscale with probability gray_p, normalise (transforms.simclr_transform)."""
    _check_batch(x)
    batch, _, height, width = x.shape
    boxes = sample_resized_crop(batch, height, width, tuple(aug.crop_scale), generator=generator,
                                device=x.device)
    flip = coin(batch, 0.5 if aug.hflip else 0.0, generator, x.device)
    img = crop_resize(x.float(), boxes, out_size, flip)
    if aug.rotate or aug.shear:
        img = random_affine(img, aug.rotate, aug.shear, aug.fill, generator)
    jittered = color_jitter(img, *aug.jitter, generator=generator)
    img = torch.where(per_sample(coin(batch, aug.jitter_p, generator, x.device)), jittered, img)
    img = torch.where(per_sample(coin(batch, aug.gray_p, generator, x.device)),
                      to_grayscale(img), img)
    return normalize(img, mean, std)


def strong_batch(x: Tensor, aug: StrongAugConfig, out_size: int, mean: Sequence[float],
                 std: Sequence[float], random_crop: bool = False,
                 generator: torch.Generator | None = None) -> Tensor:
    """The strong view of a uint8 batch -> float32 [B, 3, out_size, out_size]: an ``out_size``
    crop (random with ``random_crop`` when the stored images are larger, else central), flip,
    ``aug.num_ops`` random ops, normalise, Cutout (transforms.strong_transform on images stored
    at their resize size)."""
    _check_batch(x, out_size)
    batch, _, height, width = x.shape
    if random_crop and (height > out_size or width > out_size):
        boxes = random_boxes(batch, height, width, out_size, generator, x.device)
    else:
        boxes = fixed_boxes(batch, *center_offsets(height, width, out_size), out_size, x.device)
    flip = coin(batch, 0.5 if aug.hflip else 0.0, generator, x.device)
    img = crop_resize(x.float(), boxes, out_size, flip)
    img = random_strong_ops(img, aug.ops, aug.num_ops, generator, aug.op_draw == "replacement",
                            aug.posterize_bits, Warp.of(aug))
    return cutout(normalize(img, mean, std), aug.cutout, generator, aug.cutout_side)


def eval_batch(x: Tensor, out_size: int, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """The deterministic view: central ``out_size`` crop, normalise (transforms.eval_transform
    on images stored at their resize size)."""
    _check_batch(x, out_size)
    top, left = center_offsets(*x.shape[-2:], out_size)
    return normalize(x[..., top:top + out_size, left:left + out_size], mean, std)
