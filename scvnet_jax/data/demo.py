"""The demo data: instance-retrieval classes made from the real photographs that ship inside
scikit-image (no download), split so that training and the benchmark share no photograph.

An *instance* is one tile of a photograph (grids of 1x2 to 3x4 tiles); its images are views
of the tile: random crops (changing scale, aspect, position and, for hard views, rotation) with
photometric changes (brightness, contrast, saturation, gamma, blur, noise, JPEG quality).
The two motorcycle photographs are a stereo pair, so their tiles are the same instances
seen from two viewpoints. Pure stochastic textures (grass, gravel) are left out: their
tiles cannot be told apart, so as classes they would only be label noise. Everything is
generated from fixed seeds: the same scikit-image version gives byte-identical data (the
photographs are checked against their SHA-256).

- `build_benchmark(data_dir)`: the held-out benchmark in the revisitop layout
  (`<data_dir>/demo/gnd_demo.pkl`, `<data_dir>/demo/jpg/`), read by eval.py like ROxford5k:
  per instance one query, 3 easy and 3 hard database views and 1 junk view (a tiny crop).
- `DemoLandmarks`: the TFDS builder of the training set (other photographs), ArrayRecord.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import pickle
import shutil
from importlib import resources
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import cv2
import numpy as np

from scvnet_jax import files
from scvnet_jax.errors import InputError


class Photo(NamedTuple):
    sha: str                   # first 16 hex digits of the file's SHA-256
    shape: tuple[int, int]     # (height, width)
    grid: tuple[int, int]      # tiles: rows x cols


TRAIN_PHOTOS = {
    "hubble_deep_field.jpg": Photo("3a19c5dd8a927a93", (872, 1000), (3, 3)),
    "ihc.png": Photo("f8dd1aa387ddd1f4", (512, 512), (3, 3)),
    "motorcycle_left.png": Photo("db18e9c415761740", (500, 741), (3, 4)),
    "motorcycle_right.png": Photo("5fc913ae870e42a4", (500, 741), (3, 4)),
    "retina.jpg": Photo("38a07f36f27f095e", (1411, 1411), (3, 3)),
    "moon.png": Photo("78739619d11f7eb9", (512, 512), (3, 3)),
    "page.png": Photo("341a6f0a61557662", (191, 384), (1, 2)),
    "text.png": Photo("bd84aa3a6e3c9887", (172, 448), (1, 3)),
    "brick.png": Photo("7966caf324f6ba84", (512, 512), (2, 2)),
    "cell.png": Photo("8d23a7fb81f7cc87", (660, 550), (3, 3)),
    "clock_motion.png": Photo("f029226b28b642e8", (300, 400), (2, 3)),
}
BENCHMARK_PHOTOS = {
    "astronaut.png": Photo("88431cd9653ccd53", (512, 512), (2, 2)),
    "chelsea.png": Photo("596aa1e7cb875eb7", (300, 451), (2, 3)),
    "coffee.png": Photo("cc02f8ca188b167c", (400, 600), (2, 3)),
    "rocket.jpg": Photo("c2dd0de7c538df8d", (427, 640), (2, 3)),
    "camera.png": Photo("b0793d2adda0fa6a", (512, 512), (2, 2)),
    "coins.png": Photo("f8d773fc9cfa6f4d", (303, 384), (2, 2)),
}
# Photographs of one scene from several viewpoints: their tiles are the same instances.
SAME_SCENE = {"motorcycle_right.png": "motorcycle_left.png"}

VIEW_SIZE = 160          # long side of every generated image, pixels
TRAIN_VIEWS = 12         # stored views per training instance
BENCHMARK_SEED = 20261122
TRAIN_SEED = 1234


@dataclasses.dataclass(frozen=True)
class Strength:
    """Ranges of one kind of view (crop area as a fraction of the tile)."""
    area: tuple[float, float]
    rotate: float = 0.0          # max degrees
    brightness: float = 0.0      # max absolute shift, in 0..255 units
    contrast: float = 0.0        # max relative change
    saturation: float = 0.0      # max relative change
    gamma: float = 0.0           # max |log gamma|
    blur: float = 0.0            # max Gaussian sigma, pixels
    noise: float = 0.0           # max noise std, 0..255 units
    jpeg: tuple[int, int] = (90, 95)


VIEWS = {
    "query": Strength((0.55, 0.8), brightness=10, contrast=0.1, saturation=0.1, jpeg=(90, 95)),
    "easy": Strength((0.45, 0.9), rotate=5, brightness=25, contrast=0.2, saturation=0.25,
                     gamma=0.15, blur=0.8, jpeg=(80, 95)),
    "hard": Strength((0.15, 0.4), rotate=25, brightness=50, contrast=0.45, saturation=0.7,
                     gamma=0.4, blur=1.6, noise=8, jpeg=(50, 80)),
    "junk": Strength((0.02, 0.05), brightness=25, contrast=0.2, jpeg=(80, 95)),
    "train": Strength((0.25, 0.9), rotate=15, brightness=40, contrast=0.35, saturation=0.5,
                      gamma=0.3, blur=1.2, noise=5, jpeg=(60, 95)),
}


def photo_path(name: str) -> Path:
    return Path(str(resources.files("skimage") / "data" / name))


def read_photo(name: str, photo: Photo) -> np.ndarray:
    """One scikit-image photograph as BGR uint8, checked against its recorded hash."""
    path = photo_path(name)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"{path}: the demo photograph {name} is missing from scikit-image "
                         f"({e}); install the version pinned in pyproject.toml") from None
    sha = hashlib.sha256(data).hexdigest()[:16]
    if sha != photo.sha:
        raise InputError(f"{path}: SHA-256 {sha}..., expected {photo.sha}...: this "
                         "scikit-image ships a different photograph, so the demo data would "
                         "differ from the documented one; install the pinned version")
    im = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if im is None:
        raise InputError(f"{path}: OpenCV cannot decode this photograph")
    return im


@dataclasses.dataclass(frozen=True)
class Instance:
    name: str                   # e.g. "astronaut_r0c1"
    photos: tuple[str, ...]     # the photographs showing it (two for a stereo pair)
    box: tuple[int, int, int, int]  # tile (y0, x0, y1, x1), the same in each photo


def instances(photos: dict) -> list[Instance]:
    """The tiles of `photos` (TRAIN_PHOTOS or BENCHMARK_PHOTOS), in a fixed order."""
    out = []
    for name, photo in photos.items():
        if name in SAME_SCENE:
            continue
        views = (name,) + tuple(k for k, v in SAME_SCENE.items() if v == name and k in photos)
        (h, w), (rows, cols) = photo.shape, photo.grid
        th, tw = h // rows, w // cols
        for r in range(rows):
            for c in range(cols):
                out.append(Instance(f"{name.split('.')[0]}_r{r}c{c}", views,
                                    (r * th, c * tw, (r + 1) * th, (c + 1) * tw)))
    return out


def make_view(photo: np.ndarray, box, strength: Strength, rng: np.random.Generator,
              size: int = VIEW_SIZE) -> np.ndarray:
    """A random view of the tile `box` of `photo` (BGR uint8), long side `size`."""
    y0, x0, y1, x1 = box
    th, tw = y1 - y0, x1 - x0
    area = rng.uniform(*strength.area) * th * tw
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    ch = min(math.sqrt(area / aspect), photo.shape[0])
    cw = min(math.sqrt(area * aspect), photo.shape[1])
    # the crop's centre lies inside the tile, far enough from its sides that the crop
    # stays mostly on the tile
    cy = rng.uniform(y0 + min(ch, th) / 2, y1 - min(ch, th) / 2)
    cx = rng.uniform(x0 + min(cw, tw) / 2, x1 - min(cw, tw) / 2)
    angle = rng.uniform(-strength.rotate, strength.rotate)
    scale = size / max(ch, cw)
    out_h, out_w = max(1, round(ch * scale)), max(1, round(cw * scale))
    m = cv2.getRotationMatrix2D((cx, cy), angle, scale)
    m[:, 2] += (out_w / 2 - cx, out_h / 2 - cy)
    im = cv2.warpAffine(photo, m, (out_w, out_h), flags=cv2.INTER_AREA if scale < 1 else
                        cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    im = photometric(im, strength, rng)
    quality = int(rng.integers(strength.jpeg[0], strength.jpeg[1] + 1))
    ok, enc = cv2.imencode(".jpg", im, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return cv2.imdecode(enc, cv2.IMREAD_COLOR)


def photometric(im: np.ndarray, s: Strength, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast, saturation, gamma, blur and noise, each drawn from `s`."""
    x = im.astype(np.float32)
    gray = x @ np.array([0.114, 0.587, 0.299], np.float32)  # BGR luma
    sat = 1 + rng.uniform(-s.saturation, s.saturation)
    x = gray[..., None] + sat * (x - gray[..., None])
    con = 1 + rng.uniform(-s.contrast, s.contrast)
    x = (x - gray.mean()) * con + gray.mean() + rng.uniform(-s.brightness, s.brightness)
    x = np.clip(x, 0, 255)
    gamma = math.exp(rng.uniform(-s.gamma, s.gamma))
    x = 255 * (x / 255) ** gamma
    sigma = rng.uniform(0, s.blur)
    if sigma > 0.3:
        x = cv2.GaussianBlur(x, (0, 0), sigma)
    if s.noise:
        x = x + rng.normal(0, rng.uniform(0, s.noise), x.shape).astype(np.float32)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def read_photos(table: dict) -> dict[str, np.ndarray]:
    """name -> BGR image of every photograph of `table` (TRAIN_PHOTOS, BENCHMARK_PHOTOS)."""
    return {name: read_photo(name, photo) for name, photo in table.items()}


def _encode(im: np.ndarray) -> bytes:
    ok, enc = cv2.imencode(".jpg", im, [cv2.IMWRITE_JPEG_QUALITY, 95])
    return enc.tobytes()


BENCHMARK_KINDS = (("easy", 3), ("hard", 3), ("junk", 1))


def instance_views(photos: dict[str, np.ndarray], inst: Instance, rng: np.random.Generator
                   ) -> tuple[dict[str, list[np.ndarray]], np.ndarray]:
    """One instance's benchmark views, drawn in the benchmark's order: ({kind: views} for
    BENCHMARK_KINDS, the query view). `photos`: name -> BGR image (`read_photos`)."""
    views = {}
    for kind, n in BENCHMARK_KINDS:
        views[kind] = [make_view(photos[inst.photos[j % len(inst.photos)]], inst.box,
                                 VIEWS[kind], rng) for j in range(n)]
    return views, make_view(photos[inst.photos[0]], inst.box, VIEWS["query"], rng)


def build_benchmark(data_dir, name: str = "demo") -> Path:
    """Writes the held-out benchmark to `<data_dir>/<name>/` (revisitop layout) unless it is
    already there and complete; returns that folder. Deterministic."""
    root = Path(data_dir) / name
    gnd_path = root / f"gnd_{name}.pkl"
    if gnd_path.is_file():
        return root
    photos = read_photos(BENCHMARK_PHOTOS)
    rng = np.random.default_rng(BENCHMARK_SEED)
    insts = instances(BENCHMARK_PHOTOS)
    images, queries, kinds = {}, {}, []   # kinds: (instance index, kind) per db image
    for i, inst in enumerate(insts):
        views, queries[f"{inst.name}_query"] = instance_views(photos, inst, rng)
        for kind, _ in BENCHMARK_KINDS:
            for j, im in enumerate(views[kind]):
                images[f"{inst.name}_{kind}{j}"] = im
                kinds.append((i, kind))
    # database order is shuffled so that a ranking by file order means nothing
    order = rng.permutation(len(images))
    names = list(images)
    imlist = [names[k] for k in order]
    kinds = [kinds[k] for k in order]
    gnd = []
    for i, qname in enumerate(queries):
        h, w = queries[qname].shape[:2]
        sel = {k: np.array([d for d, (inst, kk) in enumerate(kinds) if inst == i and kk == k],
                           np.int64) for k, _ in BENCHMARK_KINDS}
        gnd.append({"bbx": [0.0, 0.0, float(w), float(h)], **sel})
    tmp = files.staging_dir(root)      # unique: concurrent builders do not collide
    try:
        (tmp / "jpg").mkdir()
        for n, im in {**images, **queries}.items():
            (tmp / "jpg" / f"{n}.jpg").write_bytes(_encode(im))
        with open(tmp / f"gnd_{name}.pkl", "wb") as f:
            pickle.dump({"imlist": imlist, "qimlist": list(queries), "gnd": gnd}, f, protocol=4)
        if not gnd_path.is_file():     # else another process finished it meanwhile
            files.replace_dir(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def training_examples() -> Iterator[tuple[int, str, int, bytes]]:
    """(label, image id, instance index, JPEG bytes) of every training image, label-sorted."""
    photos = read_photos(TRAIN_PHOTOS)
    for label, inst in enumerate(train_instances()):
        # one generator per instance: adding instances later leaves the others unchanged
        rng = np.random.default_rng([TRAIN_SEED, label])
        for j in range(TRAIN_VIEWS):
            photo = photos[inst.photos[j % len(inst.photos)]]
            im = make_view(photo, inst.box, VIEWS["train"], rng)
            yield label, f"{inst.name}_{j:02d}", label, _encode(im)


def train_instances() -> list[Instance]:
    return instances(TRAIN_PHOTOS)


def train_instance_names() -> list[str]:
    return [i.name for i in train_instances()]


def check_disjoint(a: Sequence[str] = tuple(TRAIN_PHOTOS),
                   b: Sequence[str] = tuple(BENCHMARK_PHOTOS)) -> None:
    """Training and benchmark share no photograph (and no scene)."""
    scenes = lambda names: {SAME_SCENE.get(n, n) for n in names}  # noqa: E731
    common = scenes(a) & scenes(b)
    if common:
        raise AssertionError(f"photographs in both the demo training set and benchmark: "
                             f"{sorted(common)}")


def write_class_folders(out, classes: int | None = None) -> int:
    """Writes the demo training set's images as `out/<class>/<view>.jpg` (the first `classes`
    classes, or all): a folder of labelled photos for trying the folder builder. Files
    already there are left alone. Returns the number of images."""
    out = Path(out)
    n = 0
    for label, image_id, _, data in training_examples():
        if classes is not None and label >= classes:
            break
        cls, view = image_id.rsplit("_", 1)
        path = out / cls / f"{view}.jpg"
        if not path.exists():
            files.atomic_write_bytes(path, data)
        n += 1
    return n
