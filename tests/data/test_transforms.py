from __future__ import annotations

import collections

import PIL.Image
import pytest
import torch
from torchvision.transforms.v2 import functional as F

from scanclust.config import STRONG_OPS, SimCLRAugConfig, StrongAugConfig
from scanclust.data import transforms
from scanclust.data.transforms import (
    OP_RANGES,
    Cutout,
    RandomStrongOps,
    Warp,
    apply_op,
    eval_transform,
    op_ranges,
    sample_magnitude,
    simclr_transform,
    strong_transform,
)

MEAN = [0.5, 0.5, 0.5]
STD = [0.25, 0.25, 0.25]


def random_uint8(height: int = 32, width: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=g)


def random_pil(height: int = 32, width: int = 32, seed: int = 0) -> PIL.Image.Image:
    return F.to_pil_image(random_uint8(height, width, seed))


def constant(value: int, size: int = 20) -> torch.Tensor:
    return torch.full((3, size, size), value, dtype=torch.uint8)


def magnitudes(op: str) -> list[float]:
    bounds = OP_RANGES[op]
    if bounds is None:
        return [0.0]
    lo, hi = bounds
    return [lo, hi, float(round((lo + hi) / 2)) if op == "posterize" else (lo + hi) / 2]


def test_op_table_matches_config() -> None:
    assert tuple(OP_RANGES) == STRONG_OPS


@pytest.mark.parametrize("op", STRONG_OPS)
def test_op_keeps_tensor_shape_dtype_and_range(op: str) -> None:
    img = random_uint8()
    for magnitude in magnitudes(op):
        out = apply_op(img, op, magnitude)
        assert out.shape == img.shape and out.dtype == torch.uint8
        assert 0 <= int(out.min()) and int(out.max()) <= 255


@pytest.mark.parametrize("op", STRONG_OPS)
def test_op_keeps_pil_size_and_mode(op: str) -> None:
    img = random_pil(24, 40)
    for magnitude in magnitudes(op):
        out = apply_op(img, op, magnitude)
        assert isinstance(out, PIL.Image.Image)
        assert out.size == img.size and out.mode == "RGB"


def test_unknown_op_is_an_error() -> None:
    with pytest.raises(ValueError, match="'blur'"):
        apply_op(random_uint8(), "blur", 1.0)


def test_identity_and_zero_rotation_are_identity() -> None:
    img = random_uint8()
    assert torch.equal(apply_op(img, "identity", 0.0), img)
    assert torch.equal(apply_op(img, "rotate", 0.0), img)


def test_brightness_halves_a_constant_image() -> None:
    assert torch.equal(apply_op(constant(100), "brightness", 0.5), constant(50))


def test_solarize_thresholds() -> None:
    img = random_uint8()
    assert torch.equal(apply_op(img, "solarize", 256.0), img)
    assert torch.equal(apply_op(img, "solarize", 0.0), 255 - img)
    pil = F.to_pil_image(img)
    assert torch.equal(F.pil_to_tensor(apply_op(pil, "solarize", 256.0)), img)
    assert torch.equal(F.pil_to_tensor(apply_op(pil, "solarize", 0.0)), 255 - img)


def test_posterize_4_bits_of_255_is_240() -> None:
    assert torch.equal(apply_op(constant(255), "posterize", 4), constant(240))


@pytest.mark.parametrize(("warp", "fill"), [(Warp(), 0), (Warp.centred(), 128)])
def test_translate_x_shifts_a_20px_image_by_2px(warp: Warp, fill: int) -> None:
    img = random_uint8(20, 20)
    for out in (apply_op(img, "translate_x", 0.1, warp),
                F.pil_to_tensor(apply_op(F.to_pil_image(img), "translate_x", 0.1, warp))):
        assert torch.equal(out[:, :, 2:], img[:, :, :-2])
        assert (out[:, :, :2] == fill).all()


def test_shear_pivots_about_the_top_left_corner_by_default() -> None:
    # shear_x maps (x, y) -> (x + 0.1 y, y) about the pivot: the top row (half a pixel below a
    # corner pivot) moves by 0.05 px, which nearest sampling rounds away; the bottom row moves
    # by about 2 px. About the centre, the top row moves by about 1 px instead.
    img = random_uint8(20, 20)
    corner = apply_op(img, "shear_x", 0.1)
    assert torch.equal(corner[:, 0], img[:, 0])
    assert not torch.equal(corner[:, -1], img[:, -1])
    assert not torch.equal(apply_op(img, "shear_x", 0.1, Warp.centred())[:, 0], img[:, 0])


def test_nearest_warps_copy_pixels_and_fill_black() -> None:
    img = random_uint8(20, 20)
    out = apply_op(img, "rotate", 17.0)
    seen = set(img.flatten().tolist()) | {0}
    assert set(out.flatten().tolist()) <= seen  # nothing blended: values of the input, or black
    assert (out[:, 0, 0] == 0).all()  # the corner the rotation uncovers is black


def test_translate_y_shifts_rows() -> None:
    img = random_uint8(20, 20)
    out = apply_op(img, "translate_y", -0.1)
    assert torch.equal(out[:, :-2], img[:, 2:])


@pytest.mark.parametrize("op", [op for op in STRONG_OPS if OP_RANGES[op] is not None])
def test_sample_magnitude_covers_the_interval(op: str) -> None:
    torch.manual_seed(0)
    lo, hi = OP_RANGES[op]
    draws = torch.tensor([sample_magnitude(op) for _ in range(2000)])
    assert lo <= draws.min() and draws.max() <= hi
    width = hi - lo
    assert draws.min() < lo + 0.01 * width and draws.max() > hi - 0.01 * width


def test_sample_magnitude_without_interval_is_zero() -> None:
    assert sample_magnitude("identity") == 0.0


def test_posterize_draws_each_integer_4_to_8() -> None:
    torch.manual_seed(0)
    draws = [sample_magnitude("posterize") for _ in range(500)]
    assert all(d == int(d) for d in draws)
    assert set(draws) == {4.0, 5.0, 6.0, 7.0, 8.0}


def test_released_posterize_bits_are_4_to_7() -> None:
    torch.manual_seed(0)
    ranges = op_ranges(StrongAugConfig().posterize_bits)
    assert {sample_magnitude("posterize", ranges) for _ in range(500)} == {4.0, 5.0, 6.0, 7.0}


def record_ops(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, float]]:
    calls: list[tuple[str, float]] = []

    def spy(img, op, magnitude, warp):
        calls.append((op, magnitude))
        return img

    monkeypatch.setattr(transforms, "apply_op", spy)
    return calls


def test_random_strong_ops_draws_num_ops_distinct_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = record_ops(monkeypatch)
    torch.manual_seed(0)
    augment = RandomStrongOps(STRONG_OPS, num_ops=4, replacement=False)
    for _ in range(50):
        calls.clear()
        augment(random_uint8())
        ops = [op for op, _ in calls]
        assert len(ops) == 4 and len(set(ops)) == 4
        for op, magnitude in calls:
            bounds = OP_RANGES[op] or (0.0, 0.0)
            assert bounds[0] <= magnitude <= bounds[1]


@pytest.mark.parametrize("replacement", [True, False])
def test_random_strong_ops_chooses_ops_uniformly(monkeypatch: pytest.MonkeyPatch,
                                                 replacement: bool) -> None:
    calls = record_ops(monkeypatch)
    torch.manual_seed(0)
    augment = RandomStrongOps(STRONG_OPS, num_ops=4, replacement=replacement)
    rounds = 2100
    for _ in range(rounds):
        augment(None)
    counts = collections.Counter(op for op, _ in calls)
    expected = rounds * 4 / len(STRONG_OPS)  # 600
    assert set(counts) == set(STRONG_OPS)
    assert all(0.85 * expected < n < 1.15 * expected for n in counts.values()), counts


def test_random_strong_ops_with_replacement_repeat_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    # Four independent draws of 14 ops are all distinct with probability 14*13*12*11 / 14^4.
    calls = record_ops(monkeypatch)
    torch.manual_seed(0)
    augment = RandomStrongOps(STRONG_OPS, num_ops=4)
    rounds, distinct = 2000, 0
    for _ in range(rounds):
        calls.clear()
        augment(None)
        distinct += len({op for op, _ in calls}) == 4
    assert abs(distinct / rounds - 14 * 13 * 12 * 11 / 14 ** 4) < 0.04  # 0.625, sd 0.011


def test_random_strong_ops_validates() -> None:
    with pytest.raises(ValueError, match="'blur'"):
        RandomStrongOps(["rotate", "blur"], num_ops=1)
    with pytest.raises(ValueError, match="num_ops"):
        RandomStrongOps(["rotate"], num_ops=2, replacement=False)
    assert RandomStrongOps(["rotate"], num_ops=2).num_ops == 2  # repeats allowed


def hole_box(out: torch.Tensor) -> tuple[int, int, int, int]:
    """Rows and columns spanned by the zeros of a cutout applied to an all-ones image."""
    zero = out == 0
    assert (zero == zero[0]).all()  # same hole in every channel
    rows = zero[0].any(dim=1).nonzero().flatten()
    cols = zero[0].any(dim=0).nonzero().flatten()
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
    assert zero[0, r0:r1 + 1, c0:c1 + 1].all() and int(zero[0].sum()) == (r1 - r0 + 1) * (c1 - c0 + 1)
    return r0, r1, c0, c1


def test_cutout_hole_is_a_clipped_square_of_zeros() -> None:
    torch.manual_seed(0)
    size, side = 16, 32
    img = torch.ones(3, side, side)
    boxes, full, clipped = set(), 0, 0
    for _ in range(300):
        out = Cutout(size, "fixed")(img)
        assert set(out.unique().tolist()) == {0.0, 1.0}
        r0, r1, c0, c1 = hole_box(out)
        height, width = r1 - r0 + 1, c1 - c0 + 1
        assert height <= size and width <= size
        if r0 > 0 and c0 > 0 and r1 < side - 1 and c1 < side - 1:
            assert height * width == size * size
            full += 1
        else:
            clipped += 1
        boxes.add((r0, r1, c0, c1))
    assert full > 0 and clipped > 0 and len(boxes) > 50
    assert torch.equal(img, torch.ones(3, side, side))  # the input is not modified


def test_cutout_size_one_erases_one_pixel_and_zero_is_identity() -> None:
    img = torch.ones(3, 10, 10)
    assert int((Cutout(1, "fixed")(img) == 0).sum()) == 3
    assert torch.equal(Cutout(0)(img), img)


def expected_uniform_cutout_share(side: int, size: int) -> float:
    """The authors' rule by hand: side s uniform in 1..size, rows cy - s//2 .. cy + s//2 (end
    excluded) clipped to the image, cy uniform; rows and columns independent."""
    shares = []
    for s in range(1, size + 1):
        rows = sum(min(c + s // 2, side) - max(c - s // 2, 0) for c in range(side)) / side
        shares.append((rows / side) ** 2)
    return sum(shares) / len(shares)


def test_uniform_cutout_erases_about_7_percent_of_cifar() -> None:
    assert expected_uniform_cutout_share(32, 16) == pytest.approx(0.0689, abs=1e-4)
    torch.manual_seed(0)
    img = torch.ones(3, 32, 32)
    erased = torch.stack([(Cutout(16)(img)[0] == 0).float().mean() for _ in range(4000)])
    assert erased.mean().item() == pytest.approx(0.0689, abs=0.004)  # sd of the mean 0.001
    assert erased.max() <= 256 / 1024 and (erased == 0).any()  # s = 1 erases nothing


def test_simclr_strong_and_eval_give_normalised_float_tensors() -> None:
    img = random_pil()
    for transform in (simclr_transform(SimCLRAugConfig(), 32, MEAN, STD),
                      strong_transform(StrongAugConfig(), 32, MEAN, STD),
                      eval_transform(32, MEAN, STD)):
        out = transform(img)
        assert type(out) is torch.Tensor
        assert out.dtype == torch.float32 and out.shape == (3, 32, 32)


def test_eval_normalises_and_is_deterministic() -> None:
    transform = eval_transform(32, MEAN, STD)
    out = transform(F.to_pil_image(constant(255, 32)))
    assert torch.allclose(out, torch.full((3, 32, 32), 2.0))  # (1.0 - 0.5) / 0.25
    img = random_pil()
    assert torch.equal(transform(img), transform(img))


def test_strong_geometry_is_a_no_op_at_equal_size() -> None:
    img = random_pil()
    bare = StrongAugConfig(hflip=False, num_ops=0, cutout=0)
    strong = strong_transform(bare, 32, MEAN, STD)(img)
    assert torch.equal(strong, eval_transform(32, MEAN, STD)(img))
    # One grey level moves a value by 1 / 255 / 0.25 = 0.0157; float rounding is far below.
    expected = (F.pil_to_tensor(img).float() / 255 - 0.5) / 0.25
    assert torch.allclose(strong, expected, rtol=0, atol=1e-5)


def test_strong_sizes() -> None:
    assert strong_transform(StrongAugConfig(cutout=32), 96, MEAN, STD)(
        random_pil(96, 96)).shape == (3, 96, 96)
    assert strong_transform(StrongAugConfig(), 32, MEAN, STD, resize=36)(
        random_pil(40, 50)).shape == (3, 32, 32)


def test_eval_resize_then_center_crop() -> None:
    out = eval_transform(224, MEAN, STD, resize=256)(random_pil(300, 400))
    assert out.shape == (3, 224, 224)


def test_strong_transform_is_reproducible_from_the_torch_seed() -> None:
    transform = strong_transform(StrongAugConfig(), 32, MEAN, STD)
    img = random_pil()
    torch.manual_seed(7)
    first = [transform(img) for _ in range(5)]
    torch.manual_seed(7)
    second = [transform(img) for _ in range(5)]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first[0], first[1])


def test_uint8_tensor_input_is_accepted() -> None:
    out = strong_transform(StrongAugConfig(), 32, MEAN, STD)(random_uint8())
    assert out.dtype == torch.float32 and out.shape == (3, 32, 32)

