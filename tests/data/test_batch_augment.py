"""The batched augmentations against the per-sample ones of transforms.py and torchvision.

Kernels are compared pixel by pixel on the same uint8 images. On the CPU (torch 2.14,
torchvision 0.29) every strong op and colour kernel agrees exactly, and so do whole sequences of
them; the tests allow one level in at most 0.5% of the pixels for the ops that go through float
arithmetic, whose rounding may differ between builds and devices. The crop-and-resize agrees
exactly at scale one and otherwise within one level in about 0.3% of the pixels (grid_sample's
coordinates carry float error where interpolate's do not). Sampling is checked with bounds
that a seeded run passes by a wide margin, and whole views by the statistics of many draws.
"""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from scanclust.config import STRONG_OPS, SimCLRAugConfig, StrongAugConfig
from scanclust.data import batch_augment as ba
from scanclust.data import batch_ops as bo
from scanclust.data.transforms import (
    OP_RANGES,
    Cutout,
    Warp,
    apply_op,
    eval_transform,
    simclr_transform,
    strong_transform,
)

MEAN = [0.5, 0.4, 0.3]
STD = [0.25, 0.2, 0.3]
# Ops on integers only: no float rounding can differ anywhere.
INTEGER_OPS = {"identity", "equalize", "solarize", "posterize"}


def apply_op_batch(x: torch.Tensor, op: str, magnitude: torch.Tensor,
                   warp: Warp = Warp()) -> torch.Tensor:
    """One strong op on a float 0..255 batch [B, 3, H, W], magnitude [B] per sample, with the
    semantics of transforms.apply_op: the batched kernels one at a time, to compare op by op
    (the package applies them all at once, ``apply_strong_ops``)."""
    if op == "identity":
        return x
    if op == "autocontrast":
        return ba.autocontrast(x)
    if op == "equalize":
        return ba.equalize(x)
    if op == "solarize":
        return ba.solarize(x, magnitude)
    if op == "color":
        return bo.adjust_saturation(x, magnitude)
    if op == "contrast":
        return bo.adjust_contrast(x, magnitude)
    if op == "brightness":
        return bo.adjust_brightness(x, magnitude)
    if op == "sharpness":
        return ba.adjust_sharpness(x, magnitude)
    if op == "posterize":
        return ba.posterize(x, magnitude)
    if op in bo.AFFINE_COLUMN:
        height, width = x.shape[-2:]
        theta = bo.inverse_affine(bo.affine_args(op, magnitude, height, width, warp))
        return bo.affine_warp(x, theta, warp)
    raise ValueError(f"unknown strong op {op!r}; known: {', '.join(OP_RANGES)}")



def random_uint8(batch: int, height: int = 20, width: int = 20, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, height, width), dtype=torch.uint8, generator=g)


def smooth_image(size: int = 32) -> torch.Tensor:
    """A colourful image with structure at several scales, for the distribution tests."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    r = 128 + 100 * torch.sin(xx / 5.0)
    g = 128 + 100 * torch.cos(yy / 7.0)
    b = (xx + yy) * 255.0 / (2 * size - 2)
    return torch.stack([r, g, b]).round().to(torch.uint8)


def assert_close_levels(out: torch.Tensor, ref: torch.Tensor, exact: bool = False,
                        share: float = 0.005) -> None:
    """At most one level off, in at most ``share`` of the pixels (none if ``exact``)."""
    diff = (out.float() - ref.float()).abs()
    if exact:
        assert torch.equal(out.float(), ref.float())
    assert diff.max() <= 1, f"max diff {diff.max()}"
    assert (diff > 0).float().mean() <= share, f"{(diff > 0).float().mean():.4f} of pixels differ"


def low_mid_high(op: str) -> list[float]:
    bounds = OP_RANGES[op]
    if bounds is None:
        return [0.0, 0.0, 0.0]
    lo, hi = bounds
    return [lo, float(round((lo + hi) / 2)) if op == "posterize" else (lo + hi) / 2, hi]


# --- single ops --------------------------------------------------------------------------------


@pytest.mark.parametrize("warp", [Warp(), Warp.centred()], ids=["released", "centred"])
@pytest.mark.parametrize("op", STRONG_OPS)
def test_op_matches_apply_op_per_sample(op: str, warp: Warp) -> None:
    x = random_uint8(6)
    magnitudes = low_mid_high(op) + low_mid_high(op)[::-1]  # each sample its own magnitude
    out = apply_op_batch(x.float(), op, torch.tensor(magnitudes), warp)
    ref = torch.stack([apply_op(img, op, m, warp) for img, m in zip(x, magnitudes)])
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert_close_levels(out, ref, exact=op in INTEGER_OPS)


@pytest.mark.parametrize("op", STRONG_OPS)
def test_op_matches_apply_op_at_random_magnitudes(op: str) -> None:
    x = random_uint8(64, seed=1)
    g = torch.Generator().manual_seed(1)
    magnitudes = ba.sample_magnitudes([op], torch.zeros(64, 1, dtype=torch.long), g)[:, 0]
    out = apply_op_batch(x.float(), op, magnitudes)
    ref = torch.stack([apply_op(img, op, float(m)) for img, m in zip(x, magnitudes)])
    assert_close_levels(out, ref, exact=op in INTEGER_OPS)


@pytest.mark.parametrize(("warp", "fill"), [(Warp(), 0), (Warp.centred(), 128)])
def test_integer_translation_shifts_exactly(warp: Warp, fill: int) -> None:
    x = random_uint8(2)
    out = apply_op_batch(x.float(), "translate_x", torch.tensor([0.1, -0.1]), warp)  # 2 px
    assert torch.equal(out[0, :, :, 2:], x[0, :, :, :-2].float())
    assert torch.equal(out[1, :, :, :-2], x[1, :, :, 2:].float())
    assert (out[0, :, :, :2] == fill).all() and (out[1, :, :, -2:] == fill).all()
    out = apply_op_batch(x.float(), "translate_y", torch.tensor([0.1, 0.0]), warp)
    assert torch.equal(out[0, :, 2:], x[0, :, :-2].float())
    assert torch.equal(out[1], x[1].float())


def test_point_ops_by_hand() -> None:
    white = torch.full((1, 3, 4, 4), 255.0)
    assert (apply_op_batch(white, "posterize", torch.tensor([4.0])) == 240).all()
    assert (apply_op_batch(white, "solarize", torch.tensor([255.0])) == 0).all()
    assert (apply_op_batch(white, "solarize", torch.tensor([256.0])) == 255).all()
    assert (apply_op_batch(white, "brightness", torch.tensor([0.5])) == 127).all()
    assert (bo.to_grayscale(white) == 254).all()  # 0.2989 + 0.587 + 0.114 = 0.9999


def test_unknown_op_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown strong op"):
        apply_op_batch(torch.zeros(1, 3, 4, 4), "blur", torch.zeros(1))
    with pytest.raises(ValueError, match="unknown strong op"):
        ba.random_strong_ops(torch.zeros(1, 3, 4, 4), ["blur"], 1)
    with pytest.raises(ValueError, match="num_ops"):
        ba.random_strong_ops(torch.zeros(1, 3, 4, 4), ["identity"], 2, replacement=False)


@pytest.mark.parametrize(("kernel", "reference", "low", "high"), [
    (bo.adjust_brightness, F.adjust_brightness, 0.0, 2.0),
    (bo.adjust_contrast, F.adjust_contrast, 0.0, 2.0),
    (bo.adjust_saturation, F.adjust_saturation, 0.0, 2.0),
    (bo.adjust_hue, F.adjust_hue, -0.5, 0.5),
])
def test_colour_kernels_match_torchvision(kernel, reference, low: float, high: float) -> None:
    x = random_uint8(64, seed=2)
    factors = torch.linspace(low, high, 64)
    out = kernel(x.float(), factors)
    ref = torch.stack([reference(img, float(f)) for img, f in zip(x, factors)])
    assert_close_levels(out, ref)


def test_grayscale_matches_torchvision() -> None:
    x = random_uint8(8, seed=3)
    assert torch.equal(bo.to_grayscale(x.float()), F.rgb_to_grayscale(x, 3).float())


# --- colour jitter ----------------------------------------------------------------------------


def test_jitter_in_each_samples_order_matches_torchvision() -> None:
    x = random_uint8(128, seed=4)
    factors, order = bo.sample_jitter(128, 0.4, 0.4, 0.4, 0.1,
                                      torch.Generator().manual_seed(4))
    out = bo.apply_jitter(x.float(), factors, order)
    kernels = [F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue]
    ref = []
    for img, f, o in zip(x, factors.tolist(), order.tolist()):
        for k in o:
            img = kernels[k](img, f[k])
        ref.append(img)
    assert_close_levels(out, torch.stack(ref))


def test_jitter_factors_and_order() -> None:
    n = 20000
    factors, order = bo.sample_jitter(n, 0.4, 0.3, 0.0, 0.1, torch.Generator().manual_seed(5))
    for k, (lo, hi) in enumerate([(0.6, 1.4), (0.7, 1.3), (1.0, 1.0), (-0.1, 0.1)]):
        assert lo <= factors[:, k].min() < lo + 0.01 and hi - 0.01 < factors[:, k].max() <= hi + 1e-6
    assert torch.equal(order.sort(dim=1).values, torch.arange(4).expand(n, 4))
    share = torch.stack([(order == k).float().mean(dim=0) for k in range(4)])  # op x position
    assert (share - 0.25).abs().max() < 0.02
    assert torch.equal(bo.sample_jitter(4, 0, 0, 0, 0)[0], torch.tensor([[1.0, 1, 1, 0]] * 4))


def test_disabled_jitter_is_the_identity() -> None:
    x = random_uint8(8, seed=6).float()
    assert torch.equal(bo.color_jitter(x, 0.0, 0.0, 0.0, 0.0), x)


def test_random_affine_is_torchvisions_affine_at_the_drawn_angle_and_shear() -> None:
    x = random_uint8(8, seed=30)
    out = ba.random_affine(x.float(), 15.0, 10.0, 0, torch.Generator().manual_seed(30))
    # The same draws: an angle and a horizontal shear uniform in +-15 and +-10 degrees.
    draws = 2 * torch.rand(8, 2, generator=torch.Generator().manual_seed(30),
                           dtype=torch.float64) - 1
    ref = torch.stack([F.affine(img, angle=15.0 * float(a), translate=[0, 0], scale=1.0,
                                shear=[10.0 * float(s), 0.0],
                                interpolation=v2.InterpolationMode.BILINEAR, fill=0)
                       for img, (a, s) in zip(x, draws)])
    assert_close_levels(out, ref, share=0.01)
    assert (out != x.float()).float().mean() > 0.5  # it did warp


def test_simclr_shear_uncovers_a_quarter_of_its_mean_tangent() -> None:
    # Shearing a unit square by t about its centre moves the row at height y by t * y, which
    # uncovers |t| / 4 of the square; with the angle uniform in +-20 degrees the mean of
    # |tan| is -ln(cos 20 deg) / (20 deg) = 0.1783, so 4.46 % of a constant image turns to fill.
    # Bilinear sampling darkens the pixels along the two slanted edges as well: torchvision
    # interpolates both the image (zero outside) and its border mask, so a pixel at cover m of
    # the one-pixel ramp keeps m * m, and a row loses the integral of m - m^2 = 1/6 px per
    # edge, 1 / (3 * width) of the image (0.26 % at 128 px).
    n, size = 1000, 128
    x = torch.full((n, 3, size, size), 200, dtype=torch.uint8)
    aug = SimCLRAugConfig(crop_scale=[1.0, 1.0], hflip=False, jitter_p=0.0, gray_p=0.0,
                          shear=20.0)
    out = ba.simclr_batch(x, aug, size, [0.0] * 3, [1.0 / 255] * 3,
                          generator=torch.Generator().manual_seed(31))
    uncovered = 1 - out.mean(dim=(1, 2, 3)) / 200
    area = -math.log(math.cos(math.radians(20))) / math.radians(20) / 4
    assert area == pytest.approx(0.0446, abs=1e-4)
    expected = area + 1 / (3 * size)
    assert uncovered.mean().item() == pytest.approx(expected, abs=0.0015)
    assert uncovered.max().item() == pytest.approx(math.tan(math.radians(20)) / 4, abs=0.005)
    torch.manual_seed(31)
    reference = simclr_transform(aug, size, [0.0] * 3, [1.0 / 255] * 3)
    ref = torch.stack([reference(x[0]) for _ in range(300)])
    assert (1 - ref.mean(dim=(1, 2, 3)) / 200).mean().item() == pytest.approx(expected,
                                                                             abs=0.004)
    plain = ba.simclr_batch(x[:8], SimCLRAugConfig(crop_scale=[1.0, 1.0], hflip=False,
                                                    jitter_p=0.0, gray_p=0.0), size,
                            [0.0] * 3, [1.0 / 255] * 3)
    assert (plain == 200).all()  # rotate = shear = 0: no warp at all


def test_simclr_jitter_and_grayscale_rates() -> None:
    n = 4000
    colour = torch.tensor([150, 60, 100], dtype=torch.uint8).reshape(1, 3, 1, 1)
    x = colour.expand(n, 3, 8, 8).contiguous()
    aug = SimCLRAugConfig(crop_scale=[1.0, 1.0], hflip=False, jitter=[0.4, 0.0, 0.0, 0.0],
                          jitter_p=0.8, gray_p=0.2)
    out = ba.simclr_batch(x, aug, 8, [0.0] * 3, [1.0 / 255] * 3,
                          generator=torch.Generator().manual_seed(7))
    pixel = out[:, :, 0, 0]
    gray = (pixel[:, 0] == pixel[:, 1]) & (pixel[:, 1] == pixel[:, 2])
    assert abs(gray.float().mean() - 0.2) < 0.03
    # Brightness alone keeps 150 only for factors in [1, 1.0067): 0.8% of those jittered.
    jittered = pixel[~gray, 0] != 150
    assert abs(jittered.float().mean() - 0.8 * (1 - 0.0067 / 0.8)) < 0.03
    factor = pixel[~gray, 0][jittered] / 150
    assert 0.6 <= factor.min() < 0.62 and 1.38 < factor.max() <= 1.4


# --- geometry ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("height", "width", "out_size"), [(32, 32, 32), (20, 30, 24)])
def test_crop_resize_matches_resized_crop_and_flip(height: int, width: int,
                                                  out_size: int) -> None:
    x = random_uint8(64, height, width, seed=8)
    g = torch.Generator().manual_seed(8)
    boxes = bo.sample_resized_crop(64, height, width, (0.2, 1.0), generator=g)
    flip = torch.rand(64, generator=g) < 0.5
    out = bo.crop_resize(x.float(), boxes, out_size, flip)
    ref = []
    for img, (top, left, h, w), f in zip(x, boxes.tolist(), flip):
        # torchvision's float path; its uint8 CPU kernel rounds its fixed-point weights and
        # differs from either by one level in about 16% of the pixels.
        crop = F.resized_crop(img.float(), top, left, h, w, [out_size, out_size],
                              antialias=False).round()
        ref.append(F.horizontal_flip(crop) if f else crop)
    assert_close_levels(out, torch.stack(ref), share=0.01)


def test_crop_resize_at_scale_one_copies_exactly() -> None:
    x = random_uint8(2, 36, 36, seed=9)
    boxes = torch.tensor([[0, 0, 36, 36], [3, 1, 32, 32]])
    out = bo.crop_resize(x[:1].float(), boxes[:1], 36, torch.tensor([False]))
    assert torch.equal(out, x[:1].float())
    out = bo.crop_resize(x[1:].float(), boxes[1:], 32, torch.tensor([True]))
    assert torch.equal(out[0], x[1, :, 3:35, 1:33].flip(-1).float())


def test_resized_crop_boxes_lie_inside_and_follow_scale_and_ratio() -> None:
    n, size = 20000, 32
    boxes = bo.sample_resized_crop(n, size, size, (0.2, 1.0),
                                   generator=torch.Generator().manual_seed(10))
    top, left, h, w = boxes.T.double()
    assert boxes.dtype == torch.long
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= size).all() and (left + w <= size).all()
    # h and w are sqrt(area / ratio) and sqrt(area * ratio) rounded: the smallest box, 0.2 of
    # 32 x 32 = 14.3 px squared, may round half a pixel on each side.
    area = h * w / size**2
    assert area.min() >= (math.sqrt(0.2) - 0.5 / size) ** 2 - 1e-9 and area.max() <= 1.0
    slack = (14.3 + 0.5) / (14.3 - 0.5)
    assert (w / h >= 3 / 4 / slack).all() and (w / h <= 4 / 3 * slack).all()
    # Same distribution as torchvision's sampler (its standard errors: area 0.004, side 0.1 px).
    crop = v2.RandomResizedCrop(size, scale=(0.2, 1.0))
    torch.manual_seed(10)
    ref = torch.tensor([[p["top"], p["left"], p["height"], p["width"]]
                        for p in (crop.make_params([torch.zeros(3, size, size)])
                                  for _ in range(4000))]).double()
    assert abs(area.mean() - (ref[:, 2] * ref[:, 3] / size**2).mean()) < 0.02
    assert (boxes.double().mean(dim=0) - ref.mean(dim=0)).abs().max() < 0.5
    # Every sample draws from the same distribution, whatever its place in the batch.
    by_place = area.reshape(-1, 8).mean(dim=0)
    assert (by_place - area.mean()).abs().max() < 0.02  # standard error 0.0045


def test_resized_crop_falls_back_to_the_central_crop_as_torchvision() -> None:
    boxes = bo.sample_resized_crop(5, 10, 40, (2.0, 3.0))  # no box of twice the area fits
    params = v2.RandomResizedCrop(8, scale=(2.0, 3.0)).make_params([torch.zeros(3, 10, 40)])
    expected = [params["top"], params["left"], params["height"], params["width"]]
    assert expected == [0, 13, 10, 13]
    assert boxes.tolist() == [expected] * 5


# --- strong ops -------------------------------------------------------------------------------


def test_strong_op_choice_with_replacement_is_independent_and_uniform() -> None:
    n = 20000
    chosen = ba.sample_strong_ops(n, 14, 4, torch.Generator().manual_seed(10))
    assert chosen.shape == (n, 4) and chosen.dtype == torch.long
    for slot in chosen.unbind(dim=1):
        assert (torch.bincount(slot, minlength=14) / n - 1 / 14).abs().max() < 0.01
    distinct = (chosen.sort(dim=1).values.diff(dim=1) > 0).all(dim=1).float().mean()
    assert abs(distinct - 14 * 13 * 12 * 11 / 14 ** 4) < 0.02  # 0.625, sd 0.003


def test_strong_op_choice_is_distinct_and_uniform() -> None:
    n = 20000
    chosen = ba.sample_strong_ops(n, 14, 4, torch.Generator().manual_seed(11),
                                  replacement=False)
    assert chosen.shape == (n, 4) and chosen.dtype == torch.long
    ordered = chosen.sort(dim=1).values
    assert (ordered[:, 1:] > ordered[:, :-1]).all()
    frequency = torch.bincount(chosen.flatten(), minlength=14) / n
    assert (frequency - 4 / 14).abs().max() < 0.02  # standard error 0.003
    first = torch.bincount(chosen[:, 0], minlength=14) / n
    assert (first - 1 / 14).abs().max() < 0.01


def test_magnitudes_cover_each_interval() -> None:
    n, ops = 50000, list(OP_RANGES)
    g = torch.Generator().manual_seed(12)
    chosen = ba.sample_strong_ops(n, len(ops), 4, g, replacement=False)
    magnitudes = ba.sample_magnitudes(ops, chosen, g)
    for k, op in enumerate(ops):
        m = magnitudes[chosen == k]
        if OP_RANGES[op] is None:
            assert (m == 0).all()
            continue
        lo, hi = OP_RANGES[op]
        assert lo <= m.min() and m.max() <= hi
        if op == "posterize":
            values, counts = m.unique(return_counts=True)
            assert values.tolist() == [4, 5, 6, 7, 8]
            assert ((counts / counts.sum()) - 0.2).abs().max() < 0.02
        else:
            assert m.min() < lo + 0.01 * (hi - lo) and m.max() > hi - 0.01 * (hi - lo)


def test_strong_ops_in_each_samples_order_match_apply_op() -> None:
    ops = list(OP_RANGES)
    x = random_uint8(128, seed=13)
    g = torch.Generator().manual_seed(13)
    chosen = ba.sample_strong_ops(128, len(ops), 4, g)
    magnitudes = ba.sample_magnitudes(ops, chosen, g)
    out = ba.apply_strong_ops(x.float(), ops, chosen, magnitudes)
    ref = []
    for img, c, m in zip(x, chosen.tolist(), magnitudes.tolist()):
        for k, magnitude in zip(c, m):
            img = apply_op(img, ops[k], magnitude)
        ref.append(img)
    assert_close_levels(out, torch.stack(ref))


def test_strong_ops_accept_a_subset_and_repeats() -> None:
    x = random_uint8(16, seed=14).float()
    ops = ["posterize", "posterize", "identity"]
    chosen = torch.tensor([[0, 1, 2], [2, 1, 0]]).repeat(8, 1)
    magnitudes = torch.tensor([[4.0, 6.0, 0.0], [0.0, 8.0, 5.0]]).repeat(8, 1)
    out = ba.apply_strong_ops(x, ops, chosen, magnitudes)
    assert torch.equal(out[0::2], ba.posterize(x[0::2], torch.full((8,), 4.0)))
    assert torch.equal(out[1::2], ba.posterize(x[1::2], torch.full((8,), 5.0)))


# --- cutout -----------------------------------------------------------------------------------


def test_cutout_holes_are_clipped_squares_of_zeros() -> None:
    n, size = 4000, 16
    x = torch.ones(n, 3, 32, 32)
    out = ba.cutout(x, size, torch.Generator().manual_seed(15), side="fixed")
    hole = out == 0
    assert torch.equal(hole[:, 0], hole[:, 1]) and torch.equal(hole[:, 0], hole[:, 2])
    assert ((out == 0) | (out == 1)).all()
    rows, cols = hole[:, 0].any(dim=2).sum(dim=1), hole[:, 0].any(dim=1).sum(dim=1)
    area = hole[:, 0].sum(dim=(1, 2))
    assert torch.equal(area, rows * cols)  # a rectangle
    assert rows.max() == size and cols.max() == size and rows.min() >= size // 2
    # Centre uniform over 0..31, top = cy - 8: the rows covered are min(cy + 8, 32) - max(cy - 8, 0).
    expected_side = sum(min(c + 8, 32) - max(c - 8, 0) for c in range(32)) / 32  # 13.75
    assert abs(rows.float().mean() - expected_side) < 0.15  # standard error 0.04
    assert abs(cols.float().mean() - expected_side) < 0.15
    full = (area == size * size).float().mean()
    assert abs(full - (17 / 32) ** 2) < 0.03  # hole wholly inside: cy and cx in 8..24


def test_cutout_centres_are_uniform_and_zero_is_off() -> None:
    n = 32000
    out = ba.cutout(torch.ones(n, 3, 8, 8), 1, torch.Generator().manual_seed(16), side="fixed")
    counts = (out[:, 0] == 0).sum(dim=0)
    assert counts.sum() == n
    assert counts.min() > 500 * 0.8 and counts.max() < 500 * 1.2  # 500 expected, sd 22
    x = torch.randn(4, 3, 8, 8)
    assert ba.cutout(x, 0) is x


def test_uniform_cutout_matches_the_per_sample_cutout() -> None:
    # The authors' rule: side uniform in 1..16, about 6.9 % of a 32x32 image erased (the
    # by-hand computation is in test_transforms); both paths draw the same holes in law.
    n = 8000
    out = ba.cutout(torch.ones(n, 3, 32, 32), 16, torch.Generator().manual_seed(24))
    erased = (out[:, 0] == 0).float().mean(dim=(1, 2))
    torch.manual_seed(24)
    ref = torch.stack([(Cutout(16)(torch.ones(3, 32, 32))[0] == 0).float().mean()
                       for _ in range(n)])
    assert erased.mean().item() == pytest.approx(0.0689, abs=0.003)
    assert erased.mean().item() == pytest.approx(ref.mean().item(), abs=0.004)
    sides = (out[:, 0] == 0).any(dim=2).sum(dim=1)  # rows covered, clipped
    assert sides.max() == 16 and (sides == 0).float().mean() > 0.05  # s = 1 erases nothing


# --- whole views ------------------------------------------------------------------------------


def view_statistics(views: torch.Tensor) -> torch.Tensor:
    """Mean over views of each view's mean and std, and the spread of the view means."""
    means, stds = views.mean(dim=(1, 2, 3)), views.std(dim=(1, 2, 3))
    return torch.stack([means.mean(), means.std(), stds.mean()])


def compare_views(transform, view, aug, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """3000 views from the per-sample transform and 6000 from the batched one, of one image."""
    image = smooth_image()
    torch.manual_seed(seed)
    reference = transform(aug, 32, MEAN, STD)
    ref = torch.stack([reference(image) for _ in range(3000)])
    out = view(image.expand(6000, 3, 32, 32), aug, 32, MEAN, STD,
               generator=torch.Generator().manual_seed(seed))
    assert out.shape[1:] == ref.shape[1:] and out.dtype == torch.float32
    return out, ref


def test_simclr_batch_matches_simclr_transform_in_distribution() -> None:
    out, ref = compare_views(simclr_transform, ba.simclr_batch, SimCLRAugConfig(), 17)
    # Over seeds 0-4 the differences stayed below 0.016 (statistics) and 0.027 (channel means);
    # no colour jitter, no grayscale or a crop scale of 0.5-1 give 0.23, 0.08 and 0.05.
    assert (view_statistics(out) - view_statistics(ref)).abs().max() < 0.035
    assert (out.mean(dim=(0, 2, 3)) - ref.mean(dim=(0, 2, 3))).abs().max() < 0.045


def test_simclr_batch_with_rotation_and_shear_matches_simclr_transform() -> None:
    aug = SimCLRAugConfig(rotate=30.0, shear=20.0, fill=40)
    out, ref = compare_views(simclr_transform, ba.simclr_batch, aug, 25)
    assert (view_statistics(out) - view_statistics(ref)).abs().max() < 0.035
    assert (out.mean(dim=(0, 2, 3)) - ref.mean(dim=(0, 2, 3))).abs().max() < 0.045


def test_strong_batch_matches_strong_transform_in_distribution() -> None:
    out, ref = compare_views(strong_transform, ba.strong_batch, StrongAugConfig(), 18)
    # Over seeds 0-4 the differences stayed below 0.017 (statistics) and 0.024 (channel means);
    # 2 ops instead of 4, or no solarize, give 0.083 and 0.096.
    assert (view_statistics(out) - view_statistics(ref)).abs().max() < 0.05
    assert (out.mean(dim=(0, 2, 3)) - ref.mean(dim=(0, 2, 3))).abs().max() < 0.05
    assert abs((out == 0).float().mean() - (ref == 0).float().mean()) < 0.01  # Cutout's share


def test_eval_batch_equals_eval_transform() -> None:
    x = random_uint8(4, 32, 32, seed=19)
    transform = eval_transform(32, MEAN, STD)
    ref = torch.stack([transform(img) for img in x])
    assert torch.allclose(ba.eval_batch(x, 32, MEAN, STD), ref, rtol=0, atol=1e-6)
    x = random_uint8(4, 37, 40, seed=19)
    cropped = F.center_crop(x, [32, 32]).float() / 255
    mean, std = torch.tensor(MEAN).reshape(3, 1, 1), torch.tensor(STD).reshape(3, 1, 1)
    assert torch.allclose(ba.eval_batch(x, 32, MEAN, STD), (cropped - mean) / std, atol=1e-6)
    with pytest.raises(ValueError, match="smaller than out_size"):
        ba.eval_batch(x, 48, MEAN, STD)
    with pytest.raises(ValueError, match="uint8"):
        ba.eval_batch(x.float(), 32, MEAN, STD)


def test_views_shapes_and_sizes() -> None:
    x = random_uint8(5, 40, 36, seed=20)
    g = torch.Generator().manual_seed(20)
    for out in (ba.simclr_batch(x, SimCLRAugConfig(), 32, MEAN, STD, generator=g),
                ba.strong_batch(x, StrongAugConfig(), 32, MEAN, STD, generator=g),
                ba.strong_batch(x, StrongAugConfig(), 32, MEAN, STD, random_crop=True,
                                generator=g),
                ba.simclr_batch(x, SimCLRAugConfig(), 16, MEAN, STD, generator=g),
                ba.eval_batch(x, 32, MEAN, STD)):
        assert out.dtype == torch.float32 and out.shape[0] == 5 and out.shape[1] == 3
        assert out.shape[2] == out.shape[3] in (16, 32)


def test_strong_random_crop_offsets_cover_every_position() -> None:
    n = 5000
    yy, xx = torch.meshgrid(torch.arange(36), torch.arange(36), indexing="ij")
    image = torch.stack([yy * 7, xx * 7, torch.zeros_like(xx)]).to(torch.uint8)
    aug = StrongAugConfig(hflip=False, num_ops=1, ops=["identity"], cutout=0)
    out = ba.strong_batch(image.expand(n, 3, 36, 36), aug, 32, [0.0] * 3, [1 / 255] * 3,
                          random_crop=True, generator=torch.Generator().manual_seed(21))
    top, left = (out[:, 0, 0, 0] / 7).round().long(), (out[:, 1, 0, 0] / 7).round().long()
    assert torch.equal(out[:, 0, :, 0] / 7, top[:, None] + torch.arange(32))  # an exact copy
    for offsets in (top, left):
        share = torch.bincount(offsets, minlength=5) / n
        assert share.numel() == 5 and (share - 0.2).abs().max() < 0.03
    centre = ba.strong_batch(image.expand(2, 3, 36, 36), aug, 32, [0.0] * 3, [1 / 255] * 3)
    assert (centre[:, 0, 0, 0] == 14).all() and (centre[:, 1, 0, 0] == 14).all()  # offset 2


def test_a_generator_reproduces_and_samples_differ() -> None:
    x = smooth_image().expand(16, 3, 32, 32)
    for view, aug in ((ba.simclr_batch, SimCLRAugConfig()), (ba.strong_batch, StrongAugConfig())):
        first = view(x, aug, 32, MEAN, STD, generator=torch.Generator().manual_seed(22))
        again = view(x, aug, 32, MEAN, STD, generator=torch.Generator().manual_seed(22))
        other = view(x, aug, 32, MEAN, STD, generator=torch.Generator().manual_seed(23))
        assert torch.equal(first, again) and not torch.equal(first, other)
        # Identical inputs, 16 different outputs: every sample draws its own parameters.
        assert torch.unique(first.flatten(1), dim=0).shape[0] == 16
