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


# -- EXIF orientation and the working size ---------------------------------------------------

def _asymmetric(h=60, w=100):
    """A non-square picture no flip or rotation maps onto itself."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:h // 2, :w // 2] = (255, 0, 0)
    a[h // 2:, 7 * w // 10:] = (0, 255, 0)
    a[h // 12:h // 6, 4 * w // 5:19 * w // 20] = (0, 0, 255)
    return a


def _with_orientation(path, orientation: int, fmt="JPEG", im=None):
    from PIL import Image
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray((_asymmetric() if im is None else im)[..., ::-1]).save(
        path, fmt, exif=exif, **({"quality": 95} if fmt == "JPEG" else {}))
    return path


def _as_a_browser_shows(path):
    """The file as PIL.ImageOps.exif_transpose turns it (BGR)."""
    from PIL import Image, ImageOps
    with Image.open(path) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))[..., ::-1]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(tmp_path, orientation, fmt):
    """Every orientation (5-8: portrait phone photos, refused as corrupt before) reads as a
    browser shows it, in every format that carries EXIF."""
    path = _with_orientation(tmp_path / f"o{orientation}.{fmt.lower()}", orientation, fmt)
    im = read_image(str(path))
    expected = _as_a_browser_shows(path)
    assert im.shape == ((100, 60, 3) if orientation >= 5 else (60, 100, 3))
    # (Pillow's and OpenCV's JPEG decoders may round differently: a wrong turn differs by 255)
    assert np.abs(im.astype(int) - expected).max() <= (2 if fmt == "JPEG" else 0)
    assert images.image_size(str(path)) == im.shape[1::-1]


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_exif_orientation_with_reduced_decoding_and_boxes(tmp_path, orientation):
    """A rotated JPEG decoded reduced is the upright image at the working size; a query box
    is in the full upright image's pixels."""
    big = cv2.resize(_asymmetric(), (1000, 600), interpolation=cv2.INTER_NEAREST)
    path = _with_orientation(tmp_path / "big.jpg", orientation, im=big)
    full = read_image(str(path), max_side=0)
    assert np.abs(full.astype(int) - _as_a_browser_shows(path)).max() <= 2
    small = read_image(str(path), max_side=250)       # libjpeg 1/2, then INTER_AREA
    assert small.shape[:2] == ((250, 150) if orientation >= 5 else (150, 250))
    assert np.abs(small.astype(int) - cv2.resize(full, small.shape[1::-1],
                                                 interpolation=cv2.INTER_AREA)).mean() < 3
    h, w = full.shape[:2]
    box = (w // 2, h // 4, w, 3 * h // 4)             # the right half, middle rows
    crop = read_image(ImageRef(str(path), box), max_side=250)
    assert crop.shape[:2] == (small.shape[0] // 2, small.shape[1] // 2)
    np.testing.assert_array_equal(crop, small[small.shape[0] // 4:3 * small.shape[0] // 4,
                                              small.shape[1] // 2:])
    with pytest.raises(InputError, match=f"crops nothing from this {w}x{h} image"):
        read_image(ImageRef(str(path), (w + 1, 0, w + 5, 5)), max_side=250)


@pytest.mark.parametrize("h, w, side, reduction", [(3001, 4999, 1024, 4), (2049, 1023, 1024, 2),
                                                   (1025, 777, 1024, 1), (3001, 4999, 512, 8),
                                                   (600, 800, 1024, 1), (3001, 4999, 0, 1)])
def test_jpeg_decoded_reduced_to_the_working_size(h, w, side, reduction):
    """The long side is `side` (or the image unchanged when smaller, or side 0); a JPEG is
    decoded by libjpeg at the largest reduction (1/2, 1/4, 1/8) still >= the working size,
    then resized with INTER_AREA."""
    rng = np.random.default_rng(0)
    photo = cv2.resize(rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3), np.uint8), (w, h))
    data = cv2.imencode(".jpg", photo)[1].tobytes()
    im = images.decode_image(data, "x.jpg", max_side=side)
    assert max(im.shape[:2]) == (side if side and max(h, w) > side else max(h, w))
    assert images.jpeg_reduction(w, h, side) == reduction
    flag = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
            8: cv2.IMREAD_REDUCED_COLOR_8}[reduction]
    reduced = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    if reduced.shape != im.shape:
        reduced = cv2.resize(reduced, im.shape[1::-1], interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(im, reduced)


def test_png_reduced_to_the_working_size_and_default(tmp_path):
    path = tmp_path / "wide.png"
    cv2.imwrite(str(path), _photo(300, 2000))
    assert images.max_side() == images.DEFAULT_MAX_SIDE == 1024
    im = read_image(str(path))
    assert im.shape == (154, 1024, 3)
    np.testing.assert_array_equal(im, cv2.resize(cv2.imread(str(path)), (1024, 154),
                                                 interpolation=cv2.INTER_AREA))
    try:
        images.set_max_side(0)
        np.testing.assert_array_equal(read_image(str(path)), cv2.imread(str(path)))
        with pytest.raises(InputError, match="max_side must be an integer >= 0"):
            images.set_max_side(-1)
    finally:
        images.set_max_side(images.DEFAULT_MAX_SIDE)
