"""scvnet_jax.images: bad image files get one InputError naming the file, decided from the
header or the file's end before any pixels are decoded; query boxes are checked; content
digests follow the bytes."""
from __future__ import annotations

import resource
import time

import cv2
import numpy as np
import pytest

from scvnet_jax import images
from scvnet_jax.errors import InputError
from scvnet_jax.images import ImageRef, read_image


def _photo(h=48, w=64, seed=0):
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.integers(0, 255, (h, w, 3), np.uint8), (5, 5), 2)


@pytest.fixture
def jpeg(tmp_path):
    path = tmp_path / "ok.jpg"
    cv2.imwrite(str(path), _photo())
    return path


def _with_jpeg_size(data: bytes, h: int, w: int) -> bytes:
    """The same JPEG with its frame header (SOF0) claiming h x w."""
    i = data.index(b"\xff\xc0")
    return data[:i + 5] + h.to_bytes(2, "big") + w.to_bytes(2, "big") + data[i + 9:]


def test_good_jpeg_and_png_read_like_opencv(jpeg, tmp_path):
    np.testing.assert_array_equal(read_image(ImageRef(str(jpeg))), cv2.imread(str(jpeg)))
    png = tmp_path / "grey.png"
    cv2.imwrite(str(png), _photo()[..., 0])
    im = read_image(str(png))
    assert im.shape == (48, 64, 3)
    np.testing.assert_array_equal(im, cv2.imread(str(png)))


@pytest.mark.parametrize("side, text", [(20000, "400 megapixels"),
                                        (12000, "12000x12000 (144 megapixels)")])
def test_huge_header_is_refused_without_allocating(jpeg, tmp_path, side, text):
    bomb = tmp_path / "bomb.jpg"
    bomb.write_bytes(_with_jpeg_size(jpeg.read_bytes(), side, side))
    assert bomb.stat().st_size < 4000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.time()
    with pytest.raises(InputError) as e:
        read_image(str(bomb))
    assert f"bomb.jpg: the image is {text}, above the limit of 100 megapixels" in str(e.value)
    assert time.time() - t0 < 1.0
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 100, grown_mb


def test_pixel_limit_is_configurable(jpeg):
    try:
        images.set_max_pixels(100)
        with pytest.raises(InputError, match="64x48"):
            read_image(str(jpeg))
        with pytest.raises(InputError, match="max_image_pixels must be >= 1"):
            images.set_max_pixels(0)
    finally:
        images.set_max_pixels(images.DEFAULT_MAX_PIXELS)
    assert read_image(str(jpeg)).shape == (48, 64, 3)


@pytest.mark.parametrize("kind", ["jpg", "png"])
def test_truncated_file_is_refused(tmp_path, kind):
    path = tmp_path / f"cut.{kind}"
    cv2.imwrite(str(path), _photo(96, 128))
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(InputError, match=f"cut.{kind}: cannot read the image: the file is "
                                         "truncated"):
        read_image(str(path))


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\xff\xd8\xff" + bytes(300)])
def test_not_an_image(tmp_path, content):
    path = tmp_path / "x.jpg"
    path.write_bytes(content)
    with pytest.raises(InputError, match="x.jpg: cannot read the image"):
        read_image(str(path))


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(InputError, match="nope.jpg: image file not found"):
        read_image(str(tmp_path / "nope.jpg"))
    with pytest.raises(InputError, match="is a directory"):
        read_image(str(tmp_path))


@pytest.mark.parametrize("bbx, ok", [((0, 0, 10, 10), True), ((10, 5, 200, 300), True),
                                     ((-5, 0, 10, 10), False), ((0, 0, 0, 10), False),
                                     ((64, 0, 70, 10), False), ((0, float("nan"), 5, 5), False),
                                     ((5, 5, 3, 9), False)])
def test_query_boxes(jpeg, bbx, ok):
    ref = ImageRef(str(jpeg), bbx)
    if ok:   # a box ending past the image is clipped, as the official slicing does
        x1, y1, x2, y2 = (int(v) for v in bbx)
        np.testing.assert_array_equal(read_image(ref), cv2.imread(str(jpeg))[y1:y2, x1:x2])
    else:
        with pytest.raises(InputError, match="ok.jpg: query box"):
            read_image(ref)


def test_content_digest_follows_the_bytes(jpeg, tmp_path):
    a = images.content_digest(str(jpeg))
    copy = tmp_path / "copy.jpg"
    copy.write_bytes(jpeg.read_bytes())
    assert images.content_digest(str(copy)) == a
    cv2.imwrite(str(copy), _photo(seed=1))     # same name and size class, other content
    assert images.content_digest(str(copy)) != a


def test_normalize_is_the_official_arithmetic_bit_for_bit():
    """uint8 images go through a lookup table (OpenCV): the same float32 values as
    float32(im) / 255, minus mean, over std, for every value and channel, on crops
    (non-contiguous views) and batches alike."""
    from scvnet_jax.images import MEAN_BGR, STD_BGR, normalize

    rng = np.random.default_rng(0)
    im = np.concatenate([np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, 2),
                         rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)], 1)
    official = lambda x: (x.astype(np.float32) / np.float32(255.0) - MEAN_BGR) / STD_BGR  # noqa: E731
    for x in (im, im[3:11, 5:29], im[None].repeat(2, 0), im.astype(np.float32)):
        out = normalize(x)
        assert out.dtype == np.float32 and out.shape == x.shape
        np.testing.assert_array_equal(out, official(x))
