"""Decoding images and the ImageNet evaluation transform, fast and bit-identical to torchvision's.

:class:`EvalTransform` computes torchvision's ``Resize`` (shorter side, or an exact size) +
``CenterCrop`` + ``ToTensor`` + ``Normalize`` on PIL images with the same arithmetic in fewer passes,
so its output equals torchvision's to the last bit (``tests/test_imaging.py`` compares them over
hundreds of random sizes):

* PIL resamples in two passes, one per axis, rounding to uint8 in between, with coefficients that
  depend only on each pass's input and output lengths. Calling PIL once per pass, in the order the
  installed Pillow itself takes (horizontal first, or since Pillow 13 vertical first when it removes
  more than twice as many rows as the other removes columns: :func:`pass_order` checks which rule
  the installed Pillow follows), gives the same uint8 intermediate and result; the second pass then
  runs only on the columns (or rows) the crop keeps, a third fewer on a 500 × 375 image;
* ``ToTensor`` + ``Normalize`` are one conversion of the uint8 crop to float and three in-place
  operations (``/ 255``, ``- mean``, ``/ std``: torchvision's own operations in its order), instead of
  five new tensors;
* an image that already is RGB is not copied by ``convert``.

:func:`load_rgb` decodes a file; with ``min_side`` it asks JPEG for a reduced-DCT decode (libjpeg's
1/2, 1/4 or 1/8 scale, the smallest whose shorter side is still at least ``min_side``): an
approximation, used only with ``extraction.decode: reduced``.

Light to import: PIL, numpy and torch are imported when first used.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from PIL import Image

#: torchvision's interpolation names that PIL computes with its separable resampling (``ImagingResample``).
SEPARABLE = ("bilinear", "bicubic", "lanczos", "box", "hamming")


# --------------------------------------------------------------------------------------------------
# Decoding


def rgb(image: Image.Image) -> Image.Image:
    """``image.convert("RGB")`` without the copy ``convert`` makes of an image that already is RGB
    (every transform here returns new images: the input is never written to)."""
    return image if image.mode == "RGB" else image.convert("RGB")


def load_rgb(path: str | os.PathLike[str], min_side: int | None = None) -> Image.Image:
    """The image file at ``path``, decoded and in RGB.

    ``min_side``: a JPEG is decoded at the smallest of libjpeg's DCT scales (1, 1/2, 1/4, 1/8) whose
    both sides are at least ``min_side`` (so the shorter side too), which skips most of the decoding
    of a large photo; the pixels differ slightly from a full decode followed by a resize (it is an
    approximation). Other formats ignore it. ``None``: the full decode.
    """
    from PIL import Image

    # The file object is ours: PIL reads it through load() and we close it, whatever the Pillow version
    # does on leaving an image's context (older ones destroy the image, which a copy then had to save).
    with open(path, "rb") as handle:
        image = Image.open(handle)
        if min_side is not None:
            image.draft("RGB", (min_side, min_side))
        image.load()
    return rgb(image)


# --------------------------------------------------------------------------------------------------
# The evaluation transform


def _normalize_args(mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    dtype = torch.get_default_dtype()
    return (
        torch.as_tensor(tuple(mean), dtype=dtype).view(-1, 1, 1),
        torch.as_tensor(tuple(std), dtype=dtype).view(-1, 1, 1),
    )


def to_normalized(image: Image.Image, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``Normalize(mean, std)(ToTensor()(image))`` for an RGB image, bit for bit: the uint8 pixels become
    one float tensor (CHW, contiguous) that is divided by 255, less ``mean`` and divided by ``std`` in
    place (``mean``, ``std``: ``(3, 1, 1)`` tensors of the default float dtype, as Normalize makes them)."""
    import numpy as np
    import torch

    # Transposed to CHW while still uint8 (a new, writable array: torch warns on PIL's read-only one),
    # then converted in one contiguous pass: faster than torch's strided conversion of a permuted view.
    pixels = np.ascontiguousarray(
        np.asarray(image, dtype=np.uint8).reshape(image.size[1], image.size[0], -1).transpose(2, 0, 1)
    )
    tensor = torch.from_numpy(pixels).to(torch.get_default_dtype())
    return tensor.div_(255).sub_(mean).div_(std)


@dataclass(frozen=True)
class EvalTransform:
    """torchvision's ``Compose([Resize(size, interpolation), CenterCrop(crop), ToTensor(),
    Normalize(mean, std)])`` on PIL images, bit-identical and faster (see the module's docstring).

    ``size``: an int resizes the shorter side to it (torchvision's rounding of the longer side), a
    ``(height, width)`` pair resizes to exactly that. ``crop``: ``(height, width)``. A crop larger than
    the resized image (torchvision pads it with zeros) is computed by torchvision's own transform.
    """

    size: int | tuple[int, int]
    crop: tuple[int, int]
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.interpolation not in SEPARABLE:
            raise ValueError(f"interpolation '{self.interpolation}' is not one of {', '.join(SEPARABLE)}")

    @classmethod
    def make(
        cls,
        size: int | Sequence[int],
        crop: int | Sequence[int],
        interpolation: str,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> EvalTransform:
        """From torchvision-style arguments (a one-element size is the shorter side, an int crop a square)."""
        sizes = [size] if isinstance(size, int) else [int(s) for s in size]
        crops = [crop] if isinstance(crop, int) else [int(c) for c in crop]
        return cls(
            sizes[0] if len(sizes) == 1 else (sizes[0], sizes[1]),
            (crops[0], crops[0]) if len(crops) == 1 else (crops[0], crops[1]),
            interpolation,
            tuple(float(m) for m in mean),
            tuple(float(s) for s in std),
        )

    @classmethod
    def from_torchvision(cls, transform: Any) -> EvalTransform | None:
        """The transform that computes ``transform`` exactly, when it is a ``Compose`` of ``Resize``
        (no ``max_size``, a separable interpolation), ``CenterCrop``, ``ToTensor`` (or timm's
        ``MaybeToTensor``) and ``Normalize``, as timm's evaluation transforms are; else ``None``."""
        from torchvision import transforms

        steps = getattr(transform, "transforms", None)
        if not isinstance(transform, transforms.Compose) or not isinstance(steps, list) or len(steps) != 4:
            return None
        resize, crop, to_tensor, normalize = steps
        if not (
            type(resize) is transforms.Resize
            and type(crop) is transforms.CenterCrop
            and _is_to_tensor(to_tensor)
            and type(normalize) is transforms.Normalize
            and resize.max_size is None
            and resize.interpolation.value in SEPARABLE
        ):
            return None
        mean = [float(m) for m in _floats(normalize.mean)]
        std = [float(s) for s in _floats(normalize.std)]
        if len(mean) != 3 or len(std) != 3:
            return None
        return cls.make(resize.size, list(crop.size), resize.interpolation.value, mean, std)

    def torchvision(self) -> Any:
        """torchvision's own transform that this one computes (the reference, and the fallback)."""
        from torchvision import transforms

        size = self.size if isinstance(self.size, int) else list(self.size)
        return transforms.Compose(
            [
                transforms.Resize(size, interpolation=transforms.InterpolationMode(self.interpolation)),
                transforms.CenterCrop(list(self.crop)),
                transforms.ToTensor(),
                transforms.Normalize(self.mean, self.std),
            ]
        )

    @property
    def min_side(self) -> int:
        """The shorter side an image needs so that this transform only shrinks it: what a reduced decode
        may go down to."""
        return self.size if isinstance(self.size, int) else max(self.size)

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """``(width, height)`` after the resize, with torchvision's rounding."""
        if not isinstance(self.size, int):
            return self.size[1], self.size[0]
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.size, int(self.size * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)

    def resized_crop(self, image: Image.Image) -> Image.Image | None:
        """The resized and centre-cropped RGB image (uint8), or ``None`` when torchvision would pad."""
        from PIL import Image

        image = rgb(image)
        width, height = image.size
        out_w, out_h = self.output_size(width, height)
        crop_h, crop_w = self.crop
        if crop_w > out_w or crop_h > out_h:
            return None
        top, left = round((out_h - crop_h) / 2.0), round((out_w - crop_w) / 2.0)  # torchvision's centre
        if (out_w, out_h) == (width, height):  # torchvision leaves the image as it is
            return image.crop((left, top, left + crop_w, top + crop_h))
        resample = getattr(Image.Resampling, self.interpolation.upper())
        order = pass_order()
        if order is None:  # a Pillow whose order of passes is not known: resize whole, as torchvision
            return image.resize((out_w, out_h), resample).crop((left, top, left + crop_w, top + crop_h))
        # PIL's resize is separable: one pass along each axis, rounding to uint8 in between, with
        # coefficients that depend only on the input and output lengths of that pass. One call per
        # pass, in PIL's own order, computes the same; the second pass then needs only the columns
        # (or rows) that the crop keeps.
        if order(width, height, out_w, out_h):  # vertical first
            tall = image.resize((width, out_h), resample) if out_h != height else image
            rows = tall.crop((0, top, width, top + crop_h))
            wide = rows.resize((out_w, crop_h), resample) if out_w != width else rows
            return wide.crop((left, 0, left + crop_w, crop_h))
        wide = image.resize((out_w, height), resample) if out_w != width else image
        columns = wide.crop((left, 0, left + crop_w, height))
        tall = columns.resize((crop_w, out_h), resample) if out_h != height else columns
        return tall.crop((0, top, crop_w, top + crop_h))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        cropped = self.resized_crop(image)
        if cropped is None:
            return self.torchvision()(rgb(image))
        mean, std = _normalize_args(self.mean, self.std)
        return to_normalized(cropped, mean, std)


# --------------------------------------------------------------------------------------------------
# The order of PIL's resampling passes

#: Whether PIL resamples vertically first, given (input width, input height, output width, output height).
PassOrder = Callable[[int, int, int, int], bool]


def _horizontal_first(width: int, height: int, out_w: int, out_h: int) -> bool:
    return False


def _vertical_first_when_taller(width: int, height: int, out_w: int, out_h: int) -> bool:
    # Pillow 13 (python-pillow/Pillow#9549): the vertical pass goes first when it removes more than
    # twice as many rows as the horizontal one removes columns.
    rows = height - out_h
    return rows > 0 and rows > 2 * (width - out_w)


#: The rules Pillow has used, each checked against the installed Pillow before it is relied upon.
_KNOWN_ORDERS: tuple[PassOrder, ...] = (_vertical_first_when_taller, _horizontal_first)
#: (width, height, output width, output height): cases on which the known rules disagree.
_PROBES = ((40, 200, 36, 20), (200, 60, 100, 50), (100, 100, 90, 70), (100, 100, 80, 70), (30, 100, 60, 50))


@functools.lru_cache(maxsize=1)
def pass_order() -> PassOrder | None:
    """The rule by which the installed Pillow orders its two resampling passes: the known rule that
    reproduces its resize on every probe (random pixels, where the two orders always differ), or
    ``None`` when none does (then :class:`EvalTransform` resizes whole images, as torchvision)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for rule in _KNOWN_ORDERS:
        for width, height, out_w, out_h in _PROBES:
            image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
            whole = image.resize((out_w, out_h), Image.Resampling.BILINEAR)
            if rule(width, height, out_w, out_h):
                split = image.resize((width, out_h), Image.Resampling.BILINEAR)
            else:
                split = image.resize((out_w, height), Image.Resampling.BILINEAR)
            if whole.tobytes() != split.resize((out_w, out_h), Image.Resampling.BILINEAR).tobytes():
                break
        else:
            return rule
    return None


def _floats(values: Any) -> list[float]:
    tolist = getattr(values, "tolist", None)
    return list(tolist()) if callable(tolist) else [float(v) for v in values]


def _is_to_tensor(step: Any) -> bool:
    """torchvision's ``ToTensor``, or timm's ``MaybeToTensor`` (the same on a PIL image)."""
    from torchvision import transforms

    kind = type(step)
    return kind is transforms.ToTensor or (kind.__name__, kind.__module__) == ("MaybeToTensor", "timm.data.transforms")
