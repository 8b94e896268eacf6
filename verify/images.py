"""The images a parity check runs on.

By default a built-in, deterministic set (no download): smooth colour patterns with a little seeded
noise, the same formula the golden fixtures use, at 256x256 (the smallest size every upstream model
accepts).  ``--images`` takes the user's own: a folder or list of image files (padded the way the
upstream evaluation scripts pad: centred, zeros, to the multiple and minimum side the family's mapping
declares in ``input:``, 128 and 256 by default; metrics are computed on the image cropped back), or a
``.safetensors`` file holding ``x`` [B, 3, H, W] in [0, 1], used exactly as stored.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lic_checkpoints.convert.errors import LicError

MULTIPLE = 128
MINIMUM = 256
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class TestImage:
    name: str
    x: torch.Tensor  # [1, 3, H, W], padded for the models
    crop: tuple[int, int, int, int]  # top, left, height, width of the real image inside x

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.x.contiguous().numpy().tobytes()).hexdigest()

    def unpad(self, t: torch.Tensor) -> torch.Tensor:
        top, left, h, w = self.crop
        return t[..., top: top + h, left: left + w]

    @property
    def num_pixels(self) -> int:
        return self.crop[2] * self.crop[3]


#: MS-SSIM's five scales with an 11-pixel window need more than this many pixels on each side
MS_SSIM_MIN_SIDE = 160


def require_ms_ssim_size(images: Sequence[TestImage]) -> None:
    """T3 scores MS-SSIM on each image as given (without its padding): refuse, in one line, an image
    with a side of at most :data:`MS_SSIM_MIN_SIDE` pixels before any work is done."""
    for img in images:
        h, w = img.crop[2], img.crop[3]
        if min(h, w) <= MS_SSIM_MIN_SIDE:
            raise LicError(f"image {img.name!r} is {w}x{h}: T3's MS-SSIM needs more than {MS_SSIM_MIN_SIDE} pixels on "
                           "each side; give larger --images or leave T3 out (e.g. --tiers T0,T1,T2)")


def synthetic(batch_index: int, height: int = 256, width: int = 256, seed: int = 0) -> torch.Tensor:
    """One deterministic test image [1, 3, H, W] in [0, 1] (fixture formula, float64 then float32)."""
    h = np.arange(height, dtype=np.float64)[:, None] / height
    w = np.arange(width, dtype=np.float64)[None, :] / width
    noise = np.random.RandomState(seed + batch_index).standard_normal((3, height, width))
    b = batch_index
    channels = []
    for c in range(3):
        v = (0.5 + 0.25 * np.sin(2 * np.pi * ((c + 1) * h + (b + 2) * w) + 0.7 * c)
             + 0.15 * np.cos(2 * np.pi * (3 * h * w + 2 * w) + b) + 0.05 * noise[c])
        channels.append(np.clip(v, 0, 1))
    return torch.from_numpy(np.stack(channels)[None].astype(np.float32))


def builtin(count: int = 2, size: int = 256) -> list[TestImage]:
    return [TestImage(f"synthetic-{i}", synthetic(i, size, size), (0, 0, size, size)) for i in range(count)]


def pad_for_models(x: torch.Tensor, multiple: int = MULTIPLE,
                   minimum: int = MINIMUM) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Centred zero padding to a multiple of ``multiple`` and at least ``minimum`` per side (as upstream eval)."""
    _, _, h, w = x.shape
    H = max(minimum, -(-h // multiple) * multiple)
    W = max(minimum, -(-w // multiple) * multiple)
    top, left = (H - h) // 2, (W - w) // 2
    padded = F.pad(x, (left, W - w - left, top, H - h - top), mode="constant", value=0.0)
    return padded, (top, left, h, w)


def _read_image(path: Path) -> torch.Tensor:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - PIL comes with compressai's dependencies
        raise LicError("reading image files needs Pillow: pip install pillow") from None
    try:
        with Image.open(path) as img:
            rgb = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    except OSError as exc:
        raise LicError(f"{path}: cannot read as an image ({exc})") from None
    return torch.from_numpy(rgb).permute(2, 0, 1)[None].contiguous()


def load(spec: str | Path | Sequence[str | Path] | None, *, multiple: int = MULTIPLE,
         minimum: int = MINIMUM) -> list[TestImage]:
    """The test images named by ``--images`` (None: the built-in set), for a model whose input sides
    must be multiples of ``multiple`` and at least ``minimum``."""
    if spec is None:
        return builtin()
    paths = [Path(p) for p in ([spec] if isinstance(spec, (str, Path)) else spec)]
    if len(paths) == 1 and paths[0].name.endswith(".safetensors"):
        return _from_safetensors(paths[0], multiple, minimum)
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files.extend(sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES))
        elif p.is_file():
            files.append(p)
        else:
            raise LicError(f"{p}: no such image file or folder")
    if not files:
        raise LicError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(map(str, paths))}")
    out = []
    for f in files:
        x, crop = pad_for_models(_read_image(f), multiple, minimum)
        out.append(TestImage(f.stem, x, crop))
    return out


def _from_safetensors(path: Path, multiple: int, minimum: int) -> list[TestImage]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        data = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise LicError(f"{path}: not a readable safetensors file ({exc})") from None
    x = data.get("x")
    if x is None or x.dim() != 4 or x.shape[1] != 3 or not x.is_floating_point():
        raise LicError(f"{path}: expected a float tensor 'x' of shape [B, 3, H, W]")
    h, w = x.shape[-2:]
    if h % multiple or w % multiple or h < minimum or w < minimum:
        raise LicError(f"{path}: 'x' is {h}x{w}; this model needs sides that are multiples of {multiple}, "
                       f"at least {minimum}; give image files instead to have them padded")
    x = x.float()
    return [TestImage(f"{path.stem}[{i}]", x[i: i + 1].contiguous(), (0, 0, h, w)) for i in range(x.shape[0])]
