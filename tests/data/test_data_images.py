"""PNG/JPEG images as sub-pixel sequences (Pillow, the [image] extra): raster order checked pixel by
pixel, whole images with a start token, unreadable files rejected, grids, the scikit-image default."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from reformer.data import load_data, load_images, save_grid
from reformer.data.images import START, ids_to_image, image_to_ids, read_image

Image = pytest.importorskip("PIL.Image")


pytestmark = pytest.mark.usefixtures("own_cache")


def write_png(path, pixels):
    Image.fromarray(pixels).save(path)
    return path


def random_pixels(seed, h=8, w=8):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_raster_order_is_rows_then_pixels_then_rgb():
    pixels = random_pixels(0, 4, 4)
    ids = image_to_ids(pixels).tolist()
    size = 4
    for r in range(size):
        for c in range(size):
            for ch in range(3):
                assert ids[(r * size + c) * 3 + ch] == pixels[r, c, ch]
    assert np.array_equal(ids_to_image(torch.tensor(ids), 4), pixels)


def test_folder_images_are_whole_sequences_after_a_start_token(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    originals = {f"i{k}.png": random_pixels(k) for k in range(6)}
    for name, pixels in originals.items():
        write_png(folder / name, pixels)
    images = load_data([folder], size=8)
    assert images.vocab_size == 257 and images.metric == "bits_per_dim" and images.length == 192
    assert len(images.train) + len(images.test) == 6  # every image on one side
    inputs, targets = images.sample("train", 3, 192, torch.Generator().manual_seed(0))
    assert (inputs[:, 0] == START).all() and torch.equal(inputs[:, 1:], targets[:, :-1])
    known = [image_to_ids(p).tolist() for p in originals.values()]
    assert all(row in known for row in targets.tolist())  # 8x8 images are kept exactly
    held = torch.cat([t for _, t in images.sequential("test", 192, 4)])
    assert held.shape == (len(images.test), 192) and images.units(held) == held.numel()


def test_non_square_images_are_resized_and_centre_cropped(tmp_path):
    pixels = np.zeros((10, 30, 3), dtype=np.uint8)
    pixels[:, 10:20] = 255  # the centre square is white, the sides black
    write_png(tmp_path / "wide.png", pixels)
    write_png(tmp_path / "other.png", random_pixels(1))
    images = load_images([tmp_path / "wide.png"], size=5, valid=tmp_path / "other.png")
    assert images.train[0].shape == (5, 5, 3) and images.train[0].min() >= 250


def test_grey_jpeg_and_rgba_become_rgb(tmp_path):
    grey = np.tile(np.arange(0, 256, 32, dtype=np.uint8), (8, 1))
    Image.fromarray(grey).save(tmp_path / "g.jpg", quality=100)
    rgb = read_image(tmp_path / "g.jpg")
    assert (
        rgb.shape == (8, 8, 3) and (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    )
    rgba = np.dstack([random_pixels(2), np.full((8, 8), 7, dtype=np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    assert np.array_equal(read_image(tmp_path / "a.png"), rgba[..., :3])


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("broken.png", b"\x89PNG\r\n\x1a\n" + b"garbage" * 10, "not a readable PNG/JPEG image"),
        ("empty.jpg", b"", "not a readable PNG/JPEG image"),
        ("text.png", b"hello, not an image", "not a readable PNG/JPEG image"),
    ],
    ids=["broken-png", "empty-jpg", "text-as-png"],
)
def test_unreadable_images_are_rejected_naming_the_file(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    write_png(tmp_path / "ok.png", random_pixels(0))
    with pytest.raises(ValueError, match=message) as err:
        load_images([tmp_path], size=8)
    assert name in str(err.value)


def test_truncated_png_is_rejected(tmp_path):
    write_png(tmp_path / "full.png", random_pixels(0, 64, 64))
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.png is not a readable"):
        read_image(tmp_path / "cut.png")


def test_sixteen_bit_images_and_other_files_are_refused(tmp_path):
    Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(tmp_path / "deep.png")
    with pytest.raises(ValueError, match="16-bit or float"):
        read_image(tmp_path / "deep.png")
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_png(folder / "a.png", random_pixels(0))
    write_png(folder / "b.png", random_pixels(1))
    (folder / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="notes.txt is not a PNG/JPEG image"):
        load_images([folder])
    with pytest.raises(ValueError, match="one image"):
        load_images([folder / "a.png"])


def test_sequence_length_must_be_a_whole_image(tmp_path):
    for k in range(3):
        write_png(tmp_path / f"{k}.png", random_pixels(k))
    images = load_images([tmp_path], size=8)
    with pytest.raises(ValueError, match="--seq-len must be 3 x 8 x 8 = 192"):
        images.sample("train", 2, 100, torch.Generator())
    with pytest.raises(ValueError, match="no text prompt"):
        images.encode("a cat")


def test_grid_png_holds_the_images(tmp_path):
    tiles = np.stack([random_pixels(k, 6, 6) for k in range(5)])
    save_grid(tiles, tmp_path / "grid.png", columns=3, gap=2)
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (2 * 8 + 2, 3 * 8 + 2, 3)
    for k in range(5):
        top, left = 2 + (k // 3) * 8, 2 + (k % 3) * 8
        assert np.array_equal(grid[top : top + 6, left : left + 6], tiles[k])
    assert (grid[:2] == 255).all()


def test_default_images_are_random_crops_of_the_scikit_image_photographs():
    pytest.importorskip("skimage")
    images = load_data(format="images", size=16)
    assert len(images.train) == 8 and len(images.test) == 1 and images.crops
    a, _ = images.sample("train", 4, 768, torch.Generator().manual_seed(0))
    b, _ = images.sample("train", 4, 768, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (4, 768)
    first = [t for _, t in images.sequential("test", 768, 8)]
    again = [t for _, t in images.sequential("test", 768, 8)]
    assert len(first) == 4 and all(torch.equal(x, y) for x, y in zip(first, again, strict=True))


def test_missing_pillow_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match=r"pip install 'reformer\[image\]'"):
        read_image(tmp_path / "x.png")
