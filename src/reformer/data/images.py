"""The ``images`` format: PNG/JPEG images (Pillow, the ``[image]`` extra) as S x S x 3 sub-pixels in
raster order (row by row, each pixel's R G B), one token per sub-pixel with 256 values: 64 x 64 x 3 =
12,288 tokens, the paper's imagenet64 layout. The metric is bits per dimension (per sub-pixel).

A sequence is one whole image after a start token (id 256), so every sub-pixel is predicted. Images
from a folder are resized (shorter side to S) and centre-cropped once; the default corpus draws random
crops (of S to the full shorter side, resized to S) of the colour photographs that ship with
scikit-image (also the ``[image]`` extra), holding ``coffee.png`` out. Grey images become three equal
channels; an alpha channel is dropped.
"""

from __future__ import annotations

import importlib.util
import io
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from ..files import atomic_write
from .paths import cache_dir, check_disjoint, expand, files_key, require, split_by_file

SUFFIXES = (".png", ".jpg", ".jpeg")
PIXEL_VALUES = 256
START = 256  # the token before an image's first sub-pixel
IMAGE_VOCAB = PIXEL_VALUES + 1
DEFAULT_SIZE = 32
SAMPLE_PHOTOS = (
    "astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png",
    "motorcycle_left.png", "motorcycle_right.png", "retina.jpg", "rocket.jpg",
)  # fmt: skip
HELD_OUT_PHOTOS = ("coffee.png",)
EVAL_IMAGES = 32  # seeded crops in a held-out evaluation of the default corpus
_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr")


def _pil():
    return require("PIL.Image", "pillow", "image", "the images format")


def is_image_path(path: Path) -> bool:
    return path.suffix.lower() in SUFFIXES


def read_image(path: str | os.PathLike) -> np.ndarray:
    """The RGB pixels of a PNG/JPEG file, ``(height, width, 3)`` uint8."""
    image_module = _pil()
    path = Path(path)
    try:
        with image_module.open(path) as image:
            image.load()
            if image.mode not in _MODES:
                raise ValueError(
                    f"{path} is a {image.mode} image (16-bit or float); save it as 8-bit RGB or grey"
                )
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, SyntaxError, image_module.DecompressionBombError) as err:
        raise ValueError(f"{path} is not a readable PNG/JPEG image ({err})") from err


def resize(pixels: np.ndarray, size: int) -> np.ndarray:
    """``pixels`` ``(h, w, 3)`` uint8 resized to ``(size, size, 3)`` (Lanczos; a square input)."""
    image_module = _pil()
    image = image_module.fromarray(pixels).resize((size, size), image_module.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.uint8)


def centre_square(pixels: np.ndarray, size: int) -> np.ndarray:
    """The centred square of ``pixels`` ``(h, w, 3)`` uint8 resized to ``(size, size, 3)``."""
    h, w = pixels.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return resize(pixels[top : top + side, left : left + side], size)


def image_to_ids(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``(..., S, S, 3)`` uint8 -> ``(..., 3 S^2)`` int64 in raster order (rows, then pixels, then RGB)."""
    pixels = torch.as_tensor(np.asarray(pixels))
    return pixels.reshape(*pixels.shape[:-3], -1).long()


def ids_to_image(ids: torch.Tensor, size: int) -> np.ndarray:
    """``(..., 3 S^2)`` ids 0-255 -> ``(..., S, S, 3)`` uint8."""
    if ids.shape[-1] != 3 * size * size or int(ids.min()) < 0 or int(ids.max()) >= PIXEL_VALUES:
        raise ValueError(f"ids of shape {tuple(ids.shape)} are not images of {size}x{size}x3 values 0-255")
    return ids.reshape(*ids.shape[:-1], size, size, 3).to(torch.uint8).numpy()


def save_grid(images: np.ndarray, path: str | os.PathLike, columns: int | None = None, gap: int = 2) -> None:
    """Write ``images`` ``(n, S, S, 3)`` uint8 as one PNG grid (white gaps), atomically."""
    image_module = _pil()
    n, size = images.shape[0], images.shape[1]
    columns = columns or int(np.ceil(np.sqrt(n)))
    rows = -(-n // columns)
    grid = np.full((rows * (size + gap) + gap, columns * (size + gap) + gap, 3), 255, dtype=np.uint8)
    for k in range(n):
        top, left = gap + (k // columns) * (size + gap), gap + (k % columns) * (size + gap)
        grid[top : top + size, left : left + size] = images[k]

    def write(tmp: Path) -> None:
        buffer = io.BytesIO()
        image_module.fromarray(grid).save(buffer, format="PNG")
        tmp.write_bytes(buffer.getvalue())

    atomic_write(path, write)


class ImageSet:
    """Images as sequences: the start token then ``3 S^2`` sub-pixels. ``train`` / ``test``: either fixed
    squares ``(n, S, S, 3)`` uint8 or, with ``crops=True``, source photos to draw random crops from."""

    unit = "dim"
    codec = "images"
    metric = "bits_per_dim"
    vocab_size = IMAGE_VOCAB

    def __init__(self, name: str, size: int, train: list[np.ndarray], test: list[np.ndarray], crops: bool):
        if size < 1:
            raise ValueError(f"image size {size} must be positive")
        self.name, self.size, self.crops = name, size, crops
        self.train, self.test = train, test
        self.valid = test

    @property
    def length(self) -> int:
        """Tokens per image sequence: ``3 S^2``."""
        return 3 * self.size * self.size

    def describe(self) -> str:
        kind = "random crops of " if self.crops else ""
        return (
            f"{self.name}: {kind}{len(self.train)} train / {len(self.test)} held-out images, "
            f"{self.size}x{self.size}x3 = {self.length:,} tokens each"
        )

    def split(self, split: str) -> list[np.ndarray]:
        if split not in ("train", "valid", "test"):
            raise ValueError(f"split={split!r} must be train, valid or test")
        return self.train if split == "train" else self.test

    def draw(self, split: str, n: int, generator: torch.Generator) -> np.ndarray:
        """``n`` images ``(n, S, S, 3)`` uint8 of ``split``: random squares, or random crops."""
        images = self.split(split)
        picks = torch.randint(0, len(images), (n,), generator=generator).tolist()
        if not self.crops:
            return np.stack([images[k] for k in picks])
        out = []
        for k in picks:
            h, w = images[k].shape[:2]
            side = int(torch.randint(self.size, min(h, w) + 1, (1,), generator=generator))
            top = int(torch.randint(0, h - side + 1, (1,), generator=generator))
            left = int(torch.randint(0, w - side + 1, (1,), generator=generator))
            out.append(resize(images[k][top : top + side, left : left + side], self.size))
        return np.stack(out)

    def sequences(self, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs (the start token, then all but the last sub-pixel) and targets (every sub-pixel) of
        ``images`` ``(n, S, S, 3)``: both ``(n, 3 S^2)`` int64."""
        targets = image_to_ids(images)
        start = torch.full((targets.shape[0], 1), START, dtype=torch.long)
        return torch.cat([start, targets[:, :-1]], dim=1), targets

    def _check_length(self, length: int) -> None:
        if length != self.length:
            raise ValueError(
                f"image sequences are whole images: --seq-len must be 3 x {self.size} x {self.size} = "
                f"{self.length}, not {length} (or change --image-size)"
            )

    def sample(self, split: str, batch_size: int, length: int, generator: torch.Generator):
        self._check_length(length)
        return self.sequences(self.draw(split, batch_size, generator))

    def sequential(
        self, split: str, length: int, batch_size: int, max_tokens: int | None = None, seed: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every image of ``split`` once (folders) or ``EVAL_IMAGES`` seeded crops (the default corpus);
        ``max_tokens`` caps the count at ``max_tokens // 3 S^2`` images (at least one)."""
        self._check_length(length)
        count = EVAL_IMAGES if self.crops else len(self.split(split))
        if max_tokens is not None:
            count = min(count, max(1, max_tokens // self.length))
        generator = torch.Generator().manual_seed(seed)
        for first in range(0, count, batch_size):
            n = min(batch_size, count - first)
            if self.crops:
                images = self.draw(split, n, generator)
            else:
                images = np.stack(self.split(split)[first : first + n])
            yield self.sequences(images)

    def units(self, targets: torch.Tensor) -> int:
        return int((targets >= 0).sum())

    def encode(self, text: str) -> torch.Tensor:
        raise ValueError("an image model has no text prompt; give an image to complete (see docs/data.md)")

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        values = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return " ".join(str(int(v)) for v in values)


def sample_photo_files() -> list[Path]:
    """scikit-image's bundled colour photographs (no download)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        require("skimage", "scikit-image", "image", "the default image corpus")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    missing = [name for name in SAMPLE_PHOTOS if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"scikit-image's sample folder {folder} lacks {', '.join(missing)}")
    return [folder / name for name in SAMPLE_PHOTOS]


def _squares(files: list[Path], size: int, split: str) -> list[np.ndarray]:
    path = cache_dir() / f"images-{files_key(files, size)}-{split}.npy"
    if not path.is_file():
        squares = np.stack([centre_square(read_image(f), size) for f in files])

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as out:
                np.save(out, squares)

        atomic_write(path, write)
    return list(np.load(path))


def image_files(paths: Sequence[str | os.PathLike], flag: str = "--data") -> list[Path]:
    files = expand(paths, flag)
    others = [f for f in files if not is_image_path(f)]
    if others:
        raise ValueError(
            f"{others[0]} is not a PNG/JPEG image ({len(others)} such file(s) under {flag}); the images "
            f"format reads {' '.join(SUFFIXES)} files: move the others out"
        )
    return files


def load_images(
    paths: Sequence[str | os.PathLike] | None = None,
    size: int = DEFAULT_SIZE,
    valid: str | os.PathLike | None = None,
) -> ImageSet:
    """Images as an :class:`ImageSet` of ``size`` x ``size``. No paths: random crops of scikit-image's
    photographs (``coffee.png`` held out). Files or folders: each image resized and centre-cropped once
    (cached), ~5% of the files held out (at least one), or ``valid`` held out instead."""
    if size < 1:
        raise ValueError(f"--image-size {size} must be positive")
    if not paths:
        if valid is not None:
            raise ValueError("--valid needs --data: the default images hold out coffee.png already")
        photos = sample_photo_files()
        train = [read_image(f) for f in photos if f.name not in HELD_OUT_PHOTOS]
        test = [read_image(f) for f in photos if f.name in HELD_OUT_PHOTOS]
        return ImageSet("scikit-image sample photographs", size, train, test, crops=True)
    files = image_files(paths)
    if valid is not None:
        held_out = image_files([valid], "--valid")
        check_disjoint(files, held_out)
        train_files = files
    elif len(files) < 2:
        raise ValueError(f"{files[0]} is one image: give two or more (one is held out) or --valid IMAGE")
    else:
        train_files, held_out = split_by_file(files)
    train, test = _squares(train_files, size, "train"), _squares(held_out, size, "test")
    return ImageSet(f"{len(files)} images", size, train, test, crops=False)
