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

# Mid-gray rather than black for the corners that rotate/shear/translate uncover: a black
# border is a strong, content-free edge the network could learn to key on.
FILL = (128, 128, 128)

# Bilinear keeps rotated edges smooth and matches what grid_sample does in the batched version;
# integer translations stay pixel exact.
INTERPOLATION = InterpolationMode.BILINEAR


def sample_magnitude(op: str) -> float:
    """Draw a magnitude uniformly from the op's interval (0.0 for ops without one).

    Unlike RandAugment's single fixed magnitude, every application draws afresh, as in the
    paper's Table S2. Posterize draws an integer from {4, ..., 8}, each with equal probability.
    """
    bounds = OP_RANGES[op]
    if bounds is None:
        return 0.0
    lo, hi = bounds
    if op == "posterize":
        return float(torch.randint(int(lo), int(hi) + 1, ()).item())
    return lo + (hi - lo) * torch.rand(()).item()


def apply_op(img: ImageLike, op: str, magnitude: float) -> ImageLike:
    """Apply one strong op with a given magnitude; the output has the input's type and size.

    Shear and translation are applied about the image centre, so the picture's content stays
    centred; the shear factor is turned into torchvision's degrees with atan.
    """
    if op == "identity":
        return img
    if op == "autocontrast":
        return F.autocontrast(img)
    if op == "equalize":
        return F.equalize(img)
    if op == "rotate":
        return F.rotate(img, magnitude, interpolation=INTERPOLATION, fill=list(FILL))
    if op == "solarize":
        # torchvision rejects thresholds above the dtype's maximum; 256 inverts no pixel.
        return img if magnitude > 255 else F.solarize(img, magnitude)
    if op == "color":
        return F.adjust_saturation(img, magnitude)
    if op == "contrast":
        return F.adjust_contrast(img, magnitude)
    if op == "brightness":
        return F.adjust_brightness(img, magnitude)
    if op == "sharpness":
        return F.adjust_sharpness(img, magnitude)
    if op in ("shear_x", "shear_y"):
        degrees = math.degrees(math.atan(magnitude))
        shear = [degrees, 0.0] if op == "shear_x" else [0.0, degrees]
        return F.affine(img, angle=0.0, translate=[0.0, 0.0], scale=1.0, shear=shear,
                        interpolation=INTERPOLATION, fill=list(FILL))
    if op in ("translate_x", "translate_y"):
        height, width = F.get_size(img)
        translate = [magnitude * width, 0.0] if op == "translate_x" else [0.0, magnitude * height]
        return F.affine(img, angle=0.0, translate=translate, scale=1.0, shear=[0.0, 0.0],
                        interpolation=INTERPOLATION, fill=list(FILL))
    if op == "posterize":
        return F.posterize(img, int(magnitude))
    raise ValueError(f"unknown strong op {op!r}; known: {', '.join(OP_RANGES)}")


class RandomStrongOps(torch.nn.Module):
    """Apply ``num_ops`` distinct ops, drawn uniformly without replacement, each at a uniform
    magnitude, in the drawn order."""

    def __init__(self, ops: Sequence[str], num_ops: int) -> None:
        super().__init__()
        for op in ops:
            if op not in OP_RANGES:
                raise ValueError(f"unknown strong op {op!r}; known: {', '.join(OP_RANGES)}")
        if not 0 <= num_ops <= len(ops):
            raise ValueError(f"num_ops={num_ops} must be between 0 and the {len(ops)} ops given")
        self.ops = tuple(ops)
        self.num_ops = num_ops

    def forward(self, img: ImageLike) -> ImageLike:
        for i in torch.randperm(len(self.ops))[: self.num_ops].tolist():
            op = self.ops[i]
            img = apply_op(img, op, sample_magnitude(op))
        return img

    def extra_repr(self) -> str:
        return f"ops={self.ops}, num_ops={self.num_ops}"


class Cutout(torch.nn.Module):
    """Zero one ``size`` x ``size`` square centred at a uniformly drawn pixel of a float
    ``[..., H, W]`` tensor.

    The hole is clipped at the border, so near an edge less than size x size is erased. It runs
    after normalisation, where 0.0 is the data-set mean.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        if size < 0:
            raise ValueError(f"cutout size must be >= 0, got {size}")
        self.size = size

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if self.size == 0:
            return img
        height, width = img.shape[-2:]
        cy = int(torch.randint(height, ()).item())
        cx = int(torch.randint(width, ()).item())
        top, left = cy - self.size // 2, cx - self.size // 2
        out = img.clone()
        out[..., max(top, 0):top + self.size, max(left, 0):left + self.size] = 0.0
        return out

    def extra_repr(self) -> str:
        return f"size={self.size}"


def _to_normalized(mean: Sequence[float], std: Sequence[float]) -> list[Callable]:
    # ToPureTensor: callers get plain tensors, not tv_tensors.Image subclasses.
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)), v2.ToPureTensor()]


def simclr_transform(aug: SimCLRAugConfig, image_size: int, mean: Sequence[float],
                     std: Sequence[float]) -> Callable:
    """The SimCLR view: random resized crop, flip, colour jitter, grayscale, normalise."""
    steps: list[Callable] = [v2.RandomResizedCrop(image_size, scale=tuple(aug.crop_scale),
                                                  antialias=True)]
    if aug.hflip:
        steps.append(v2.RandomHorizontalFlip())
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
    steps.append(RandomStrongOps(aug.ops, aug.num_ops))
    return v2.Compose(steps + _to_normalized(mean, std) + [Cutout(aug.cutout)])


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
