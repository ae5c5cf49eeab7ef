"""Per-sample image transforms: the SimCLR view, the strong view of Table S2 and the eval view.

These run inside DataLoader workers on PIL images (or uint8 CHW tensors). Every random draw
goes through torch's RNG, so ``torch.manual_seed`` reproduces a run and the DataLoader's
per-worker seeding gives each worker its own stream. ``OP_RANGES`` is the single table of
strong-op intervals, shared with the batched GPU version so that both sample the same
distribution.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import PIL.Image
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from scanclust.config import Config, SimCLRAugConfig, StrongAugConfig

ImageLike = PIL.Image.Image | torch.Tensor

# Paper Table S2. Factors are enhancement factors (1 = unchanged), shears are shear factors
# (tan of the angle), translations are fractions of the image side, solarize is a threshold on
# the 0-255 scale, posterize is the number of bits kept. None: the op takes no magnitude.
# Posterize's interval is a setting (``augment.strong.posterize_bits``): the table says 4-8, the
# authors' released code keeps 4-7 bits; ``op_ranges`` applies it.
OP_RANGES: dict[str, tuple[float, float] | None] = {
    "identity": None,
    "autocontrast": None,
    "equalize": None,
    "rotate": (-30.0, 30.0),
    "solarize": (0.0, 256.0),
    "color": (0.05, 0.95),
    "contrast": (0.05, 0.95),
    "brightness": (0.05, 0.95),
    "sharpness": (0.05, 0.95),
    "shear_x": (-0.1, 0.1),
    "shear_y": (-0.1, 0.1),
    "translate_x": (-0.1, 0.1),
    "translate_y": (-0.1, 0.1),
    "posterize": (4, 8),
}
# The enhancement ops: torchvision's kernel of each, called with the factor.
_ENHANCE = {"color": F.adjust_saturation, "contrast": F.adjust_contrast,
            "brightness": F.adjust_brightness, "sharpness": F.adjust_sharpness}


def op_ranges(posterize_bits: Sequence[int] | None = None) -> dict[str, tuple[float, float] | None]:
    """OP_RANGES with posterize's interval of kept bits replaced by ``posterize_bits``."""
    ranges = dict(OP_RANGES)
    if posterize_bits is not None:
        ranges["posterize"] = (int(posterize_bits[0]), int(posterize_bits[1]))
    return ranges


@dataclass(frozen=True)
class Warp:
    """How rotate, shear and translate resample the image.

    The released behaviour that produced the paper's numbers (the default): nearest-neighbour
    sampling, black for the uncovered corners, shear about the top-left corner, as PIL's affine
    transforms do. ``Warp.centred()`` is the other reading: bilinear, mid-gray fill (a black
    border is a strong, content-free edge), shear about the centre so the content stays centred.
    Rotation always turns about the centre, translation needs no pivot.
    """

    interpolation: str = "nearest"  # nearest | bilinear
    fill: int = 0  # grey level 0..255 of the pixels the warp uncovers
    shear_pivot: str = "corner"  # corner (top-left) | center

    @classmethod
    def centred(cls) -> Warp:
        return cls(interpolation="bilinear", fill=128, shear_pivot="center")

    @classmethod
    def of(cls, aug: StrongAugConfig) -> Warp:
        return cls(aug.interpolation, aug.fill, aug.shear_pivot)

    @property
    def mode(self) -> InterpolationMode:
        return InterpolationMode(self.interpolation)


def sample_magnitude(op: str, ranges: dict[str, tuple[float, float] | None] = OP_RANGES) -> float:
    """Draw a magnitude uniformly from the op's interval (0.0 for ops without one).

    Unlike RandAugment's single fixed magnitude, every application draws afresh, as in the
    paper's Table S2. Posterize draws an integer of its interval, each with equal probability.
    """
    bounds = ranges[op]
    if bounds is None:
        return 0.0
    lo, hi = bounds
    if op == "posterize":
        return float(torch.randint(int(lo), int(hi) + 1, ()).item())
    return lo + (hi - lo) * torch.rand(()).item()


def apply_op(img: ImageLike, op: str, magnitude: float, warp: Warp = Warp()) -> ImageLike:
    """Apply one strong op with a given magnitude; the output has the input's type and size."""
    if op == "identity":
        return img
    if op == "autocontrast":
        return F.autocontrast(img)
    if op == "equalize":
        return F.equalize(img)
    fill = [warp.fill] * 3
    if op == "rotate":
        return F.rotate(img, magnitude, interpolation=warp.mode, fill=fill)
    if op == "solarize":
        # torchvision rejects thresholds above the dtype's maximum; 256 inverts no pixel.
        return img if magnitude > 255 else F.solarize(img, magnitude)
    if op in _ENHANCE:
        return _ENHANCE[op](img, magnitude)
    if op in ("shear_x", "shear_y"):
        degrees = math.degrees(math.atan(magnitude))
        shear = [degrees, 0.0] if op == "shear_x" else [0.0, degrees]
        center = [0.0, 0.0] if warp.shear_pivot == "corner" else None
        return F.affine(img, angle=0.0, translate=[0.0, 0.0], scale=1.0, shear=shear,
                        interpolation=warp.mode, fill=fill, center=center)
    if op in ("translate_x", "translate_y"):
        height, width = F.get_size(img)
        translate = [magnitude * width, 0.0] if op == "translate_x" else [0.0, magnitude * height]
        return F.affine(img, angle=0.0, translate=translate, scale=1.0, shear=[0.0, 0.0],
                        interpolation=warp.mode, fill=fill)
    if op == "posterize":
        return F.posterize(img, int(magnitude))
    raise ValueError(f"unknown strong op {op!r}; known: {', '.join(OP_RANGES)}")


def check_strong_ops(ops: Sequence[str], num_ops: int, replacement: bool) -> None:
    for op in ops:
        if op not in OP_RANGES:
            raise ValueError(f"unknown strong op {op!r}; known: {', '.join(OP_RANGES)}")
    if num_ops < 0 or (not replacement and num_ops > len(ops)):
        raise ValueError(f"num_ops={num_ops} must be between 0 and the {len(ops)} ops given")


class RandomStrongOps(torch.nn.Module):
    """Apply ``num_ops`` ops of ``ops``, each drawn uniformly, each at a uniform magnitude, in the
    drawn order.

    ``replacement=True`` draws every op independently (an op may repeat), as the authors'
    released code does; ``False`` draws ``num_ops`` distinct ops.
    """

    def __init__(self, ops: Sequence[str], num_ops: int, replacement: bool = True,
                 posterize_bits: Sequence[int] | None = None, warp: Warp = Warp()) -> None:
        super().__init__()
        check_strong_ops(ops, num_ops, replacement)
        self.ops = tuple(ops)
        self.num_ops = num_ops
        self.replacement = replacement
        self.ranges = op_ranges(posterize_bits)
        self.warp = warp

    def forward(self, img: ImageLike) -> ImageLike:
        if self.replacement:
            picks = torch.randint(len(self.ops), (self.num_ops,)).tolist()
        else:
            picks = torch.randperm(len(self.ops))[: self.num_ops].tolist()
        for op in [self.ops[i] for i in picks]:
            img = apply_op(img, op, sample_magnitude(op, self.ranges), self.warp)
        return img

    def extra_repr(self) -> str:
        return f"ops={self.ops}, num_ops={self.num_ops}, replacement={self.replacement}"


def cutout_extent(center: int, size: int, side: str) -> tuple[int, int]:
    """First and one-past-last row (or column) of a Cutout hole before clipping.

    ``fixed``: a ``size``-pixel hole starting at ``center - size // 2``. ``uniform``: the authors'
    released rule, ``center - s // 2`` to ``center + s // 2`` for the drawn side ``s``, so an odd
    side loses a pixel (s = 1 erases nothing); with s uniform in 1..16 and clipping, about 6.9 %
    of a 32x32 image is erased on average, against 19.1 % for a fixed 16-pixel hole.
    """
    if side == "fixed":
        return center - size // 2, center - size // 2 + size
    return center - size // 2, center + size // 2


class Cutout(torch.nn.Module):
    """Zero one square hole centred at a uniformly drawn pixel of a float ``[..., H, W]`` tensor.

    ``side="uniform"`` draws the hole's side from 1..size per image (the authors' released
    behaviour); ``"fixed"`` always uses ``size``. The hole is clipped at the border, so near an
    edge less is erased. It runs after normalisation, where 0.0 is the data-set mean.
    """

    def __init__(self, size: int, side: str = "uniform") -> None:
        super().__init__()
        if size < 0:
            raise ValueError(f"cutout size must be >= 0, got {size}")
        if side not in ("uniform", "fixed"):
            raise ValueError(f"cutout side must be uniform or fixed, got {side!r}")
        self.size = size
        self.side = side

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if self.size == 0:
            return img
        height, width = img.shape[-2:]
        size = self.size if self.side == "fixed" else int(torch.randint(1, self.size + 1, ()))
        cy = int(torch.randint(height, ()).item())
        cx = int(torch.randint(width, ()).item())
        top, bottom = cutout_extent(cy, size, self.side)
        left, right = cutout_extent(cx, size, self.side)
        out = img.clone()
        out[..., max(top, 0):max(bottom, 0), max(left, 0):max(right, 0)] = 0.0
        return out

    def extra_repr(self) -> str:
        return f"size={self.size}, side={self.side}"


def _to_normalized(mean: Sequence[float], std: Sequence[float]) -> list[Callable]:
    # ToPureTensor: callers get plain tensors, not tv_tensors.Image subclasses.
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)), v2.ToPureTensor()]


def simclr_transform(aug: SimCLRAugConfig, image_size: int, mean: Sequence[float],
                     std: Sequence[float]) -> Callable:
    """The SimCLR view: random resized crop, flip, an optional random rotation and shear,
    colour jitter, grayscale, normalise."""
    steps: list[Callable] = [v2.RandomResizedCrop(image_size, scale=tuple(aug.crop_scale),
                                                  antialias=True)]
    if aug.hflip:
        steps.append(v2.RandomHorizontalFlip())
    if aug.rotate or aug.shear:
        steps.append(v2.RandomAffine(degrees=aug.rotate, shear=(-aug.shear, aug.shear),
                                     interpolation=InterpolationMode.BILINEAR, fill=aug.fill))
    steps += [v2.RandomApply([v2.ColorJitter(*aug.jitter)], p=aug.jitter_p),
              v2.RandomGrayscale(p=aug.gray_p)]
    return v2.Compose(steps + _to_normalized(mean, std))


def strong_transform(aug: StrongAugConfig, image_size: int, mean: Sequence[float],
                     std: Sequence[float], resize: int | None = None) -> Callable:
    """The strong view of Table S2: geometry, flip, random ops, normalise, Cutout.

    With ``resize`` the shorter side goes to ``resize`` and a random ``image_size`` crop is
    taken; without it the image is resized and centre-cropped to ``image_size``, which is an
    exact no-op for images already at that size (CIFAR, STL).
    """
    if resize is None:
        steps: list[Callable] = [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]
    else:
        steps = [v2.Resize(resize, antialias=True), v2.RandomCrop(image_size)]
    if aug.hflip:
        steps.append(v2.RandomHorizontalFlip())
    steps.append(RandomStrongOps(aug.ops, aug.num_ops, aug.op_draw == "replacement",
                                 aug.posterize_bits, Warp.of(aug)))
    return v2.Compose(steps + _to_normalized(mean, std) + [Cutout(aug.cutout, aug.cutout_side)])


def eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float],
                   resize: int | None = None) -> Callable:
    """The deterministic view for evaluation and the self-label weak view."""
    return v2.Compose([v2.Resize(resize or image_size, antialias=True),
                       v2.CenterCrop(image_size)] + _to_normalized(mean, std))


def view_transform(cfg: Config, kind: str) -> Callable:
    """The per-sample transform for a view kind: ``simclr``, ``strong`` or ``eval``."""
    d = cfg.data
    if kind == "simclr":
        return simclr_transform(cfg.augment.simclr, d.image_size, d.mean, d.std)
    if kind == "strong":
        return strong_transform(cfg.augment.strong, d.image_size, d.mean, d.std, d.resize)
    if kind == "eval":
        return eval_transform(d.image_size, d.mean, d.std, d.resize)
    raise ValueError(f"unknown view kind {kind!r}")
