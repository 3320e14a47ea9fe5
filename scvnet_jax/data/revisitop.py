"""Revisited Oxford/Paris datasets (revisitop layout).

Layout: `<data_dir>/<dataset>/gnd_<dataset>.pkl` (a dict with `imlist`, `qimlist` and per
query `bbx`, `easy`, `hard`, `junk`) and `<data_dir>/<dataset>/jpg/<name>.jpg`. Images are
read by `scvnet_jax.images.read_image` (queries cropped to their `bbx`).

The ground-truth pickle is read by a restricted unpickler (plain containers and NumPy
arrays only) and validated, so a malformed file stops with one message naming the file,
the query and the key.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np

from scvnet_jax import safe_pickle
from scvnet_jax.errors import InputError, first_few
from scvnet_jax.images import ImageRef

DATASETS = ("roxford5k", "rparis6k")


@dataclasses.dataclass
class RevisitopDataset:
    name: str
    root: Path
    gnd_path: Path
    imlist: list[str]
    qimlist: list[str]
    gnd: list[dict]  # per query: easy, hard, junk (int64 arrays), bbx (4 floats or None)
    # Benchmarks in other layouts (a folder set's held-out split, GLDv2's retrieval
    # benchmark) name their files and their metric:
    db_paths: list[str] | None = None     # default: root/jpg/<imlist name>.jpg
    query_paths: list[str] | None = None  # likewise; a query whose bbx is None is not cropped
    protocol: str = "revisitop"           # the metric (scvnet_jax.metrics.PROTOCOLS)
    notes: tuple[str, ...] = ()           # printed with the results, stored in results.json
    query_classes: list[str] | None = None  # each query's class (folder sets), for per-class AP

    @property
    def n_db(self) -> int:
        return len(self.imlist)

    @property
    def n_queries(self) -> int:
        return len(self.qimlist)

    def db_images(self) -> list[ImageRef]:
        paths = self.db_paths or [str(self.root / "jpg" / f"{n}.jpg") for n in self.imlist]
        return [ImageRef(p) for p in paths]

    def query_images(self) -> list[ImageRef]:
        paths = self.query_paths or [str(self.root / "jpg" / f"{n}.jpg") for n in self.qimlist]
        return [ImageRef(p, None if g.get("bbx") is None else tuple(g["bbx"]))
                for p, g in zip(paths, self.gnd)]

    @property
    def settings(self) -> tuple[str, ...]:
        """The settings its metric reports (revisitop: E, M, H)."""
        from scvnet_jax.metrics import PROTOCOLS
        return PROTOCOLS[self.protocol]

    def fingerprint(self) -> str:
        """sha256 of the ground-truth file: changes whenever the lists or labels change."""
        return hashlib.sha256(self.gnd_path.read_bytes()).hexdigest()


def _int_list(value, where: str, n_db: int) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        raise InputError(f"{where}: expected a list of database indices, got "
                         f"{type(value).__name__}") from None
    if arr.size and (np.any(arr != np.round(arr)) or arr.min() < 0 or arr.max() >= n_db):
        raise InputError(f"{where}: expected integer database indices in [0, {n_db}), got "
                         f"values from {arr.min():g} to {arr.max():g}")
    return arr.astype(np.int64)


def parse_gnd(obj, source: str) -> tuple[list[str], list[str], list[dict]]:
    """Validates a revisitop ground-truth dict -> (imlist, qimlist, gnd)."""
    if not isinstance(obj, dict) or not {"imlist", "qimlist", "gnd"} <= set(obj):
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise InputError(f"{source}: expected a dict with 'imlist', 'qimlist' and 'gnd', got "
                         f"{keys}")
    imlist, qimlist, gnd = obj["imlist"], obj["qimlist"], obj["gnd"]
    for key, names in (("imlist", imlist), ("qimlist", qimlist)):
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise InputError(f"{source}: '{key}' must be a list of image names (strings)")
    if not isinstance(gnd, (list, tuple)) or len(gnd) != len(qimlist):
        raise InputError(f"{source}: 'gnd' must be a list with one entry per query "
                         f"({len(qimlist)}), got {len(gnd) if isinstance(gnd, (list, tuple)) else type(gnd).__name__}")
    out = []
    for i, g in enumerate(gnd):
        where = f"{source}: gnd[{i}] (query {qimlist[i]!r})"
        if not isinstance(g, dict):
            raise InputError(f"{where}: expected a dict, got {type(g).__name__}")
        missing = [k for k in ("bbx", "easy", "hard", "junk") if k not in g]
        if missing:
            raise InputError(f"{where}: missing {', '.join(missing)}")
        try:
            bbx = tuple(float(v) for v in np.asarray(g["bbx"], dtype=np.float64).ravel())
        except (TypeError, ValueError):
            bbx = ()
        if len(bbx) != 4 or not (bbx[2] > bbx[0] and bbx[3] > bbx[1]) or not all(
                np.isfinite(bbx)):
            raise InputError(f"{where}: 'bbx' must be (x1, y1, x2, y2) with x2 > x1 and "
                             f"y2 > y1, got {g['bbx']!r}")
        out.append({"bbx": bbx, **{k: _int_list(g[k], f"{where} '{k}'", len(imlist))
                                   for k in ("easy", "hard", "junk")}})
    return list(imlist), list(qimlist), out


def load_gnd_file(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return safe_pickle.load(f, {**safe_pickle.numpy_globals()}, str(path), InputError,
                                    "plain data (dicts, lists, strings, numbers, NumPy arrays)")
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"{path}: not a readable ground-truth pickle ({type(e).__name__}: "
                         f"{e})") from None


def load_dataset(data_dir, name: str) -> RevisitopDataset:
    """Reads and validates `<data_dir>/<name>/gnd_<name>.pkl`."""
    root = Path(data_dir) / name
    gnd_path = root / f"gnd_{name}.pkl"
    if not gnd_path.is_file():
        raise InputError(f"no {name} dataset in {data_dir}: expected the ground-truth file "
                         f"{gnd_path} (revisitop layout: <data_dir>/{name}/gnd_{name}.pkl and "
                         f"<data_dir>/{name}/jpg/)")
    imlist, qimlist, gnd = parse_gnd(load_gnd_file(gnd_path), str(gnd_path))
    return RevisitopDataset(name, root, gnd_path, imlist, qimlist, gnd)


def read_distractor_list(list_file, image_dir=None) -> list[ImageRef]:
    """The revisitop 1M distractor list (one relative image path per line) -> image refs;
    paths are relative to `image_dir` (default: the list file's folder)."""
    list_file = Path(list_file)
    if not list_file.is_file():
        raise InputError(f"distractor list not found: {list_file}")
    base = Path(image_dir) if image_dir else list_file.parent
    names = [ln.strip() for ln in list_file.read_text().splitlines() if ln.strip()]
    if not names:
        raise InputError(f"{list_file}: the distractor list is empty")
    return [ImageRef(str(base / n)) for n in names]


def check_files_exist(refs: Sequence[ImageRef], what: str) -> None:
    """Fails early, naming the first missing files, before any work is done."""
    missing = [r.path for r in refs if not Path(r.path).is_file()]
    if missing:
        raise InputError(f"{len(missing)} {what} image(s) missing: {first_few(missing)}")
