"""Batched image ops for ``batch_augment``: crops, warps and colour, on a whole batch at once,
every sample with its own parameters, on float32 images of 0..255 rounded where torchvision's
uint8 kernels round (see ``batch_augment``)."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import functional as nnf

from scanclust.data.transforms import Warp

# The ops that move pixels: one affine warp per slot serves all of them (apply_strong_ops).
# Each maps to its column of (angle, shear_x, shear_y, translate_x, translate_y); columns 5 and
# 6 hold the pivot (centre_x, centre_y) relative to the image centre, as F.affine's ``center``.
AFFINE_COLUMN = {"rotate": 0, "shear_x": 1, "shear_y": 2, "translate_x": 3, "translate_y": 4}
AFFINE_ARGS = 7
# The ops that blend with black, the grayscale mean or the grayscale image: one pass serves all.
BLEND_OPS = ("brightness", "contrast", "color")


def per_sample(values: Tensor) -> Tensor:
    """[B] -> [B, 1, 1, 1], to broadcast one value per sample over an image batch."""
    return values.reshape(-1, 1, 1, 1)


def to_uint8_grid(x: Tensor) -> Tensor:
    """What torchvision's final ``clamp_(0, 255).to(torch.uint8)`` does: clamp, truncate.
    In place: callers pass a fresh intermediate."""
    return x.clamp_(0.0, 255.0).floor_()


@functools.lru_cache(maxsize=64)
def device_table(values: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small constant, copied to the device once and reused (callers never write to it).

    Reuse matters twice on a GPU: a host-to-device copy per batch costs a launch, and a copy is
    not allowed at all while a training step is being captured as a CUDA graph.
    """
    return torch.tensor(values, dtype=dtype).to(device)


def uniform_int(high: Tensor, generator: torch.Generator | None) -> Tensor:
    """Integers uniform in [0, high) with a per-sample ``high`` (torch.randint takes a scalar)."""
    u = torch.rand(high.shape, generator=generator, device=high.device, dtype=torch.float64)
    return (u * high).floor().clamp(max=high - 1).to(torch.long)


def coin(batch: int, p: float, generator: torch.Generator | None,
          device: torch.device) -> Tensor:
    """True with probability p, per sample, as torchvision's ``torch.rand(1) < p``."""
    return torch.rand(batch, generator=generator, device=device) < p


# ---------------------------------------------------------------------------------------------
# Geometry


def sample_resized_crop(batch: int, height: int, width: int, scale: Sequence[float],
                        ratio: Sequence[float] = (3 / 4, 4 / 3),
                        generator: torch.Generator | None = None,
                        device: torch.device | str | None = None) -> Tensor:
    """Crop boxes ``[B, 4]`` (top, left, h, w), long, drawn as RandomResizedCrop.get_params.

    torchvision tries up to 10 (area, log-ratio) draws and keeps the first whose rounded box fits;
    here all 10 are drawn for every sample at once and the first fitting one is picked, which
    gives the same distribution without a data-dependent loop. Samples with no fitting attempt
    get torchvision's fallback: the central crop clipped to the ratio range.
    """
    attempts = 10
    u = torch.rand(batch, attempts, 2, generator=generator, device=device, dtype=torch.float64)
    target_area = height * width * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    # torch.round and Python's round both round half to even.
    w = torch.sqrt(target_area * aspect).round()
    h = torch.sqrt(target_area / aspect).round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # first True; 0 when none fits
    found = fits.any(dim=1)

    in_ratio = width / height
    if in_ratio < min(ratio):
        fallback_h, fallback_w = int(round(width / min(ratio))), width
    elif in_ratio > max(ratio):
        fallback_h, fallback_w = height, int(round(height * max(ratio)))
    else:
        fallback_h, fallback_w = height, width
    h = torch.where(found, h.gather(1, first).squeeze(1), float(fallback_h))
    w = torch.where(found, w.gather(1, first).squeeze(1), float(fallback_w))
    top = torch.where(found, uniform_int(height - h + 1, generator).double(),
                      float((height - fallback_h) // 2))
    left = torch.where(found, uniform_int(width - w + 1, generator).double(),
                       float((width - fallback_w) // 2))
    return torch.stack([top, left, h, w], dim=1).to(torch.long)


def fixed_boxes(batch: int, top: int, left: int, size: int, device: torch.device) -> Tensor:
    return torch.stack([torch.full((batch,), v, dtype=torch.long, device=device)
                        for v in (top, left, size, size)], dim=1)


def random_boxes(batch: int, height: int, width: int, size: int,
                  generator: torch.Generator | None, device: torch.device) -> Tensor:
    """RandomCrop(size): offsets uniform over all positions that fit."""
    top = torch.randint(height - size + 1, (batch,), generator=generator, device=device)
    left = torch.randint(width - size + 1, (batch,), generator=generator, device=device)
    sides = torch.full((batch,), size, dtype=torch.long, device=device)
    return torch.stack([top, left, sides, sides], dim=1)


def center_offsets(height: int, width: int, size: int) -> tuple[int, int]:
    # torchvision's CenterCrop anchor, Python's round (half to even) included.
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def _source_coords(start: Tensor, length: Tensor, out_size: int, flip: Tensor | None) -> Tensor:
    """Source pixel coordinates of each output pixel along one axis, as F.interpolate computes
    them (align_corners=False), clamped to the crop so that its edges are repeated like
    interpolate does rather than blended with the pixels outside the crop."""
    j = torch.arange(out_size, device=start.device, dtype=torch.float32).expand(len(start), -1)
    if flip is not None:
        j = torch.where(flip[:, None], out_size - 1 - j, j)
    length = length[:, None].to(torch.float32)
    src = ((j + 0.5) * (length / out_size) - 0.5).clamp(min=0.0)
    return torch.minimum(src, length - 1) + start[:, None].to(torch.float32)


def crop_resize(x: Tensor, boxes: Tensor, out_size: int, flip: Tensor) -> Tensor:
    """Crop each sample's box (top, left, h, w), resize it bilinearly to ``out_size`` squared and
    mirror the samples where ``flip`` is True: one grid_sample for all three steps.

    Matches F.resized_crop without antialiasing (so exactly when the box is not larger than the
    output, as for CIFAR and STL; shrinking a larger box aliases where torchvision would blur).
    A box of side ``out_size`` at integer offsets is an exact copy.
    """
    height, width = x.shape[-2:]
    top, left, h, w = boxes.unbind(dim=1)
    src_x = _source_coords(left, w, out_size, flip)
    src_y = _source_coords(top, h, out_size, None)
    # grid_sample's normalised coordinates (align_corners=False): pixel i sits at (2i + 1)/n - 1.
    gx = (2.0 * src_x + 1.0) / width - 1.0
    gy = (2.0 * src_y + 1.0) / height - 1.0
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
    return nnf.grid_sample(x, grid, mode="bilinear", padding_mode="border",
                           align_corners=False).round_()


def inverse_affine(args: Tensor) -> Tensor:
    """Per-sample version of torchvision's _get_inverse_affine_matrix.

    ``args`` [B, 7] holds (angle, shear_x, shear_y, translate_x, translate_y, centre_x,
    centre_y) in degrees and pixels, in F.affine's convention, the pivot relative to the image
    centre; returns the output-to-input maps [B, 2, 3] in pixels relative to the centre, in
    float64 like torchvision's Python arithmetic.
    """
    args = args.double()
    rot, sx, sy = torch.deg2rad(args[:, :3]).unbind(dim=1)
    tx, ty, cx, cy = args[:, 3:].unbind(dim=1)
    a = torch.cos(rot - sy) / torch.cos(sy)
    b = -(a * torch.tan(sx) + torch.sin(rot))
    c = torch.sin(rot - sy) / torch.cos(sy)
    d = torch.cos(rot) - c * torch.tan(sx)
    # The forward map [[a, b], [c, d]] has determinant 1, so its inverse is [[d, -b], [-c, a]].
    m0, m1, m3, m4 = d, -b, -c, a
    ox, oy = -cx - tx, -cy - ty
    return torch.stack([m0, m1, m0 * ox + m1 * oy + cx, m3, m4, m3 * ox + m4 * oy + cy],
                       dim=1).reshape(-1, 2, 3)


def affine_args(op: str, magnitude: Tensor, height: int, width: int, warp: Warp) -> Tensor:
    """The F.affine arguments [B, 7] with which transforms.apply_op carries out a geometric op."""
    m = magnitude.double()
    columns = [torch.zeros_like(m) for _ in range(AFFINE_ARGS)]
    if op == "rotate":
        value = -m  # F.rotate turns counter-clockwise, F.affine's angle clockwise.
    elif op in ("shear_x", "shear_y"):
        value = torch.rad2deg(torch.atan(m))
        if warp.shear_pivot == "corner":  # F.affine's center=[0, 0], relative to the centre
            columns[5] = torch.full_like(m, -0.5 * width)
            columns[6] = torch.full_like(m, -0.5 * height)
    elif op == "translate_x":
        value = m * width
    else:
        value = m * height
    columns[AFFINE_COLUMN[op]] = value
    return torch.stack(columns, dim=1)


@functools.lru_cache(maxsize=16)
def _base_grid(height: int, width: int, device: torch.device) -> Tensor:
    """[1, H*W, 3]: each output pixel's (x, y, 1), centred, as torchvision's _affine_grid."""
    xs = torch.linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, width)
    ys = torch.linspace((1.0 - height) * 0.5, (height - 1.0) * 0.5, height)
    grid = torch.stack([xs.expand(height, width), ys[:, None].expand(height, width),
                        torch.ones(height, width)], dim=-1)
    return grid.reshape(1, height * width, 3).to(device)


def affine_warp(x: Tensor, theta: Tensor, warp: Warp) -> Tensor:
    """Warp by per-sample inverse maps ``theta`` [B, 2, 3], uncovered area set to ``warp.fill``.

    Follows torchvision's _affine_grid and _apply_grid_transform step by step, including the
    extra all-ones channel whose warped value blends the fill in at the border (bilinear) or
    decides between fill and image (nearest).
    """
    batch, _, height, width = x.shape
    # Output pixel centres relative to the image centre, mapped to input pixels, then to
    # grid_sample's -1..1 (align_corners=False: the image spans exactly -1..1): one batched
    # matrix product, as torchvision's _affine_grid computes it.
    scale = device_table((0.5 * width, 0.5 * height), torch.float32, x.device)
    rescaled = theta.to(torch.float32).transpose(1, 2) / scale
    grid = _base_grid(height, width, x.device).expand(batch, -1, -1).bmm(rescaled)
    grid = grid.view(batch, height, width, 2)
    with_mask = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
    warped = nnf.grid_sample(with_mask, grid, mode=warp.interpolation, padding_mode="zeros",
                             align_corners=False)
    image, mask = warped[:, :-1], warped[:, -1:]
    fill = float(warp.fill)
    if warp.interpolation == "nearest":
        return torch.where(mask < 0.5, fill, image)
    return ((image - fill) * mask + fill).round_()


# ---------------------------------------------------------------------------------------------
# Colour


def grayscale_of(x: Tensor) -> Tensor:
    """Luma [B, 1, H, W] truncated to integers, in torchvision's operation order."""
    r, g, b = x.unbind(dim=1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).floor_().unsqueeze(1)


def blend(x: Tensor, other: Tensor, ratio: Tensor) -> Tensor:
    # addcmul: the multiply-add of torchvision's add_(other, alpha=1 - ratio), same rounding.
    ratio = per_sample(ratio)
    return to_uint8_grid(torch.addcmul(x * ratio, other, 1.0 - ratio))


def blend_towards(x: Tensor, factor: Tensor, to_mean: Tensor, to_gray: Tensor) -> Tensor:
    """Brightness, contrast and saturation in one pass: each sample blends with black, with the
    mean of its grayscale image (``to_mean``) or with its grayscale image (``to_gray``).

    Brightness as a blend with 0 is bit-identical to torchvision's plain multiplication, so
    mixed batches need one blend instead of three.
    """
    gray = grayscale_of(x)
    other = torch.where(per_sample(to_mean), gray.mean(dim=(1, 2, 3), keepdim=True),
                        gray * per_sample(to_gray))
    return blend(x, other, factor)


def to_grayscale(x: Tensor) -> Tensor:
    """RGB -> 3 equal channels of 0.2989 R + 0.587 G + 0.114 B, truncated as torchvision's
    rgb_to_grayscale on uint8 (white becomes 254)."""
    return grayscale_of(x).expand_as(x)


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    """Scale by a per-sample factor [B]."""
    return to_uint8_grid(x * per_sample(factor))


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    """Blend with the mean of each image's grayscale version."""
    return blend(x, grayscale_of(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    """Blend with each image's grayscale version."""
    return blend(x, grayscale_of(x), factor)


def _rgb_to_hsv(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """torchvision's _rgb_to_hsv on 0..1 values, with torch.where for its masked sums."""
    r, g, b = x.unbind(dim=1)
    minc = torch.minimum(torch.minimum(r, g), b)
    maxc = torch.maximum(torch.maximum(r, g), b)
    equal = maxc == minc  # gray pixels: hue and saturation 0, and no division by zero
    ones = torch.ones_like(maxc)
    spread = maxc - minc
    s = spread / torch.where(equal, ones, maxc)
    rc, gc, bc = ((maxc.unsqueeze(1) - x) / torch.where(equal, ones, spread).unsqueeze(1)).unbind(1)
    max_is_r = maxc == r
    max_is_g = (maxc == g) & ~max_is_r
    h = torch.where(max_is_r, bc - gc, torch.where(max_is_g, rc + 2.0 - bc, gc + 4.0 - rc))
    h = (h * (1.0 / 6.0) + 1.0).fmod_(1.0)
    return h, s, maxc


# torchvision's table of which of (v, p, q, t) becomes R, G and B in each of the six hue
# sectors, one row per channel packed as 2-bit digits: the lookup is then a shift and a mask,
# twice as fast on the CPU as indexing a table tensor and with no table to copy to the device.
_HSV_SECTORS = ((0, 2, 1, 1, 3, 0), (3, 0, 0, 2, 1, 1), (1, 1, 3, 0, 0, 2))
_HSV_SECTORS_PACKED = tuple(sum(d << 2 * k for k, d in enumerate(row)) for row in _HSV_SECTORS)


def _hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """torchvision's _hsv_to_rgb on [B, H, W] planes -> [B, 3, H, W]."""
    h6 = h * 6.0
    sector = torch.floor(h6)
    f = h6 - sector
    sxf = s * f
    q = ((1.0 - sxf) * v).clamp_(0.0, 1.0)
    t = ((sxf + (1.0 - s)) * v).clamp_(0.0, 1.0)
    p = ((1.0 - s) * v).clamp_(0.0, 1.0)
    vpqt = torch.stack((v, p, q, t), dim=1)
    shift = 2 * sector.to(torch.long).remainder_(6).unsqueeze(1)  # h * 6 may round up to 6
    packed = device_table(_HSV_SECTORS_PACKED, torch.long, h.device).reshape(1, 3, 1, 1)
    return vpqt.gather(1, (packed >> shift) & 3)


def adjust_hue(x: Tensor, factor: Tensor) -> Tensor:
    """Shift the hue by a per-sample factor [B] in [-0.5, 0.5] (a full turn is 1), through HSV
    as torchvision does, including its float -> uint8 conversion (x * 255.999, truncated)."""
    h, s, v = _rgb_to_hsv(x * (1.0 / 255.0))
    h = (h + factor.reshape(-1, 1, 1)).remainder_(1.0)
    return _hsv_to_rgb(h, s, v).mul_(255.0 + 1.0 - 1e-3).floor_()


def _jitter_ranges(brightness: float, contrast: float, saturation: float,
                   hue: float) -> list[tuple[float, float] | None]:
    """ColorJitter's factor intervals; None where the op is off (torchvision then skips it)."""
    ranges: list[tuple[float, float] | None] = [
        (max(0.0, 1.0 - v), 1.0 + v) if v > 0 else None for v in (brightness, contrast, saturation)]
    return ranges + [(-hue, hue) if hue > 0 else None]


def sample_jitter(batch: int, brightness: float, contrast: float, saturation: float, hue: float,
                  generator: torch.Generator | None = None,
                  device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Per-sample ColorJitter parameters: factors [B, 4] (brightness, contrast, saturation, hue;
    uniform in [max(0, 1 - b), 1 + b] and [-h, h], neutral 1, 1, 1, 0 where off) and the order
    [B, 4], a uniformly random permutation of the four ops per sample as ColorJitter draws it."""
    u = torch.rand(batch, 4, generator=generator, device=device)
    neutral = (1.0, 1.0, 1.0, 0.0)
    ranges = _jitter_ranges(brightness, contrast, saturation, hue)
    factors = torch.stack([torch.full_like(u[:, k], neutral[k]) if bounds is None
                           else bounds[0] + (bounds[1] - bounds[0]) * u[:, k]
                           for k, bounds in enumerate(ranges)], dim=1)
    order = torch.rand(batch, 4, generator=generator, device=device).argsort(dim=1)
    return factors, order


def apply_jitter(x: Tensor, factors: Tensor, order: Tensor, hue: bool = True) -> Tensor:
    """Apply brightness, contrast, saturation and hue (factors [B, 4]) in each sample's own order
    (``order`` [B, 4], a permutation of 0..3 per sample).

    Round r applies every sample's r-th op: the three blends in one pass and the hue shift for
    the whole batch, torch.where keeping each sample's own. A neutral factor (1) leaves the
    image exactly unchanged; ``hue=False`` skips the HSV round trip where hue jitter is off.
    """
    for op in order.unbind(dim=1):
        is_hue = op == 3
        # Factor 1 makes the blend an exact no-op for the samples whose op this round is hue.
        factor = torch.where(is_hue, 1.0, factors.gather(1, op[:, None]).squeeze(1))
        x_next = blend_towards(x, factor, to_mean=op == 1, to_gray=op == 2)
        if hue:
            x_next = torch.where(per_sample(is_hue), adjust_hue(x, factors[:, 3]), x_next)
        x = x_next
    return x


def color_jitter(x: Tensor, brightness: float, contrast: float, saturation: float, hue: float,
                 generator: torch.Generator | None = None) -> Tensor:
    """ColorJitter(brightness, contrast, saturation, hue) with its own draw for every sample."""
    factors, order = sample_jitter(x.shape[0], brightness, contrast, saturation, hue,
                                   generator, x.device)
    return apply_jitter(x, factors, order, hue=hue > 0)


