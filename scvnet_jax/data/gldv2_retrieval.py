"""The Google Landmarks Dataset v2 retrieval benchmark (the Google Landmark Retrieval
challenge protocol), from a manual download.

Manual folder (github.com/cvdfoundation/google-landmark, version 2.1):

    <manual_dir>/index.csv                     one column `id`: the 761,757 index images
    <manual_dir>/test.csv                      one column `id`: the 117,577 test images
    <manual_dir>/retrieval_solution_v2.1.csv   `id,images,Usage`: per test image the
                                               space-separated index images showing its
                                               landmark; Usage Public or Private (scored) or
                                               Ignored (no ground truth; images "None")
    <manual_dir>/index/<a>/<b>/<c>/<id>.jpg    a, b, c: the id's first three characters
    <manual_dir>/test/<a>/<b>/<c>/<id>.jpg

`prepare` validates that download (headers, ids, Usage tags, the solution's ids against
index.csv and test.csv, every index image and scored query on disk) and writes the compact
ground truth `<data_dir>/gldv2_retrieval/gnd_gldv2_retrieval.json` (the images stay in the
manual folder, which the JSON names). `load` reads it into a `RevisitopDataset` whose
queries are the test images with ground truth, scored by `scvnet_jax.metrics.score("gldv2",
...)`: mAP@100 and mP@k for the Public and Private subsets separately.
"""
from __future__ import annotations

import csv
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from scvnet_jax.data.revisitop import RevisitopDataset
from scvnet_jax.errors import InputError, first_few
from scvnet_jax.files import atomic_write_text

NAME = "gldv2_retrieval"
FORMAT = "scvnet_jax.gldv2_retrieval/1"
INDEX_CSV, TEST_CSV, SOLUTION_CSV = "index.csv", "test.csv", "retrieval_solution_v2.1.csv"
SOLUTION_COLUMNS = ("id", "images", "Usage")
USAGES = {"Public": "public", "Private": "private", "Ignored": None}
_ID = re.compile(r"[0-9A-Za-z]{3,}")

MANUAL_DOWNLOAD_INSTRUCTIONS = """
Download the GLDv2 index and test sets from https://github.com/cvdfoundation/google-landmark
(version 2.1): the index image tarballs (index/images_000.tar .. images_099.tar, extracted
into one `index/` folder), the test image tarballs (test/images_000.tar .. images_019.tar,
extracted into one `test/` folder; the repository's download-dataset.sh does both), and
    https://s3.amazonaws.com/google-landmark/metadata/index.csv
    https://s3.amazonaws.com/google-landmark/metadata/test.csv
    https://s3.amazonaws.com/google-landmark/ground_truth/retrieval_solution_v2.1.csv
Put them in one manual folder:
    <manual_dir>/index.csv
    <manual_dir>/test.csv
    <manual_dir>/retrieval_solution_v2.1.csv
    <manual_dir>/index/<a>/<b>/<c>/<id>.jpg   (a, b, c: the id's first three characters)
    <manual_dir>/test/<a>/<b>/<c>/<id>.jpg
then run
    python -m scvnet_jax.data.build gldv2_retrieval --manual_dir <manual_dir> --data_dir D
    python -m scvnet_jax.eval --dataset gldv2_retrieval --data_dir D --weights ...
"""


def _gnd_path(data_dir) -> Path:
    return Path(data_dir) / NAME / f"gnd_{NAME}.json"


def _open_csv(path: Path):
    if not path.is_file():
        raise InputError(f"{path}: missing; expected GLDv2's {path.name} in the manual folder "
                         "(see scvnet_jax.data.gldv2_retrieval.MANUAL_DOWNLOAD_INSTRUCTIONS)")
    return open(path, newline="", encoding="utf-8-sig")


def _check_header(path: Path, header, expected: tuple[str, ...]) -> None:
    if header is None or tuple(h.strip() for h in header) != expected:
        raise InputError(f"{path}: columns {header}, expected exactly {list(expected)} "
                         f"(GLDv2's {path.name})")


def _check_id(path: Path, line: int, image_id: str, what: str) -> None:
    if not _ID.fullmatch(image_id):
        raise InputError(f"{path}:{line}: {what} {image_id!r} is not an image id (expected "
                         "letters and digits, at least 3; GLDv2 ids are 16 hex characters)")


def read_id_csv(path: Path) -> list[str]:
    """index.csv / test.csv (one column `id`) -> the ids in file order, validated."""
    with _open_csv(path) as f:
        reader = csv.reader(f)
        _check_header(path, next(reader, None), ("id",))
        ids, seen = [], {}
        for row in reader:
            line = reader.line_num
            if not row:
                continue
            if len(row) != 1:
                raise InputError(f"{path}:{line}: {len(row)} fields, expected 1 (id)")
            image_id = row[0].strip()
            _check_id(path, line, image_id, "id")
            if image_id in seen:
                raise InputError(f"{path}:{line}: id {image_id!r} appears twice (first on "
                                 f"line {seen[image_id]})")
            seen[image_id] = line
            ids.append(image_id)
    if not ids:
        raise InputError(f"{path}: no image ids")
    return ids


def read_solution(path: Path, index_pos: dict[str, int], test_ids: set[str]
                  ) -> tuple[list[str], list[dict], int]:
    """retrieval_solution_v2.1.csv -> (scored query ids, [{"ok": index positions, "usage"}],
    number of Ignored rows), validated against index.csv and test.csv."""
    qimlist, gnd, ignored, seen = [], [], 0, {}
    with _open_csv(path) as f:
        reader = csv.reader(f)
        _check_header(path, next(reader, None), SOLUTION_COLUMNS)
        for row in reader:
            line = reader.line_num
            if not row:
                continue
            if len(row) != 3:
                raise InputError(f"{path}:{line}: {len(row)} fields, expected 3 "
                                 "(id, images, Usage)")
            test_id, images, usage = row[0].strip(), row[1], row[2].strip()
            if usage not in USAGES:
                raise InputError(f"{path}:{line}: Usage {usage!r}, expected one of "
                                 f"{list(USAGES)}")
            _check_id(path, line, test_id, "test id")
            if test_id not in test_ids:
                raise InputError(f"{path}:{line}: test id {test_id!r} is not in "
                                 f"{TEST_CSV}")
            if test_id in seen:
                raise InputError(f"{path}:{line}: test id {test_id!r} appears twice (first "
                                 f"on line {seen[test_id]})")
            seen[test_id] = line
            if USAGES[usage] is None:
                ignored += 1
                continue
            ids = images.split()
            if not ids:
                raise InputError(f"{path}:{line}: {usage} test image {test_id!r} has no "
                                 "images; expected space-separated index image ids (test "
                                 "images without ground truth are 'Ignored')")
            unknown = [i for i in ids if i not in index_pos]
            if unknown:
                raise InputError(f"{path}:{line}: index image id(s) of test image "
                                 f"{test_id!r} not in {INDEX_CSV}: {first_few(unknown)}")
            qimlist.append(test_id)
            # As listed (a repeated id would count twice in AP's normaliser, as officially).
            gnd.append({"ok": [index_pos[i] for i in ids], "usage": USAGES[usage]})
    if not qimlist:
        raise InputError(f"{path}: no Public or Private rows ({ignored} Ignored): no test "
                         "image has ground truth, nothing to score")
    return qimlist, gnd, ignored


def _missing_files(paths: list[str], workers: int = 32, chunk: int = 4096) -> list[str]:
    """The paths that are not files (existence only), checked by a thread pool."""
    def check(lo):
        return [p for p in paths[lo:lo + chunk] if not os.path.isfile(p)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return [p for part in pool.map(check, range(0, len(paths), chunk)) for p in part]


def image_paths(folder: Path, ids: list[str]) -> list[str]:
    """`builders.gldv2_image_path(folder, id)` for every id, as strings: pathlib takes ~6 s
    for the 761,757 index images, string formatting 0.1 s."""
    base = os.path.join(str(folder), "")
    return [f"{base}{i[0]}{os.sep}{i[1]}{os.sep}{i[2]}{os.sep}{i}.jpg" for i in ids]


def prepare(manual_dir, data_dir) -> Path:
    """Validates the manual download and writes the ground-truth JSON; returns its path."""
    manual = Path(manual_dir).expanduser().resolve()
    if not manual.is_dir():
        raise InputError(f"{manual}: no such folder; expected the GLDv2 manual download (see "
                         "scvnet_jax.data.gldv2_retrieval.MANUAL_DOWNLOAD_INSTRUCTIONS)")
    missing = [n for n in (INDEX_CSV, TEST_CSV, SOLUTION_CSV) if not (manual / n).is_file()]
    if missing:   # all missing ones in one message
        raise InputError(f"{manual}: missing {', '.join(missing)}; expected GLDv2's "
                         f"{INDEX_CSV}, {TEST_CSV} and {SOLUTION_CSV} there (see "
                         "scvnet_jax.data.gldv2_retrieval.MANUAL_DOWNLOAD_INSTRUCTIONS)")
    imlist = read_id_csv(manual / INDEX_CSV)
    test_ids = read_id_csv(manual / TEST_CSV)
    index_pos = {i: n for n, i in enumerate(imlist)}
    qimlist, gnd, ignored = read_solution(manual / SOLUTION_CSV, index_pos, set(test_ids))

    missing = _missing_files(image_paths(manual / "index", imlist))
    missing_q = _missing_files(image_paths(manual / "test", qimlist))
    if missing or missing_q:
        parts = [f"{len(m)} of the {n} {what} image file(s) are missing under "
                 f"{manual / sub}: {first_few(m)}"
                 for m, n, what, sub in (
                     (missing, len(imlist), f"index ({INDEX_CSV})", "index"),
                     (missing_q, len(qimlist), f"scored test ({SOLUTION_CSV})", "test"))
                 if m]
        raise InputError("; ".join(parts) + " (expected <a>/<b>/<c>/<id>.jpg, a, b, c the "
                         "id's first three characters)")

    obj = {"format": FORMAT, "image_root": str(manual), "imlist": imlist, "qimlist": qimlist,
           "gnd": gnd, "ignored": ignored}
    return atomic_write_text(_gnd_path(data_dir), json.dumps(obj, separators=(",", ":")))


def _str_list(obj: dict, key: str, where: str) -> list[str]:
    value = obj[key]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputError(f"{where}: '{key}' must be a list of image ids (strings)")
    return value


def _parse(obj, where: str):
    keys = ("format", "image_root", "imlist", "qimlist", "gnd", "ignored")
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise InputError(f"{where}: missing key(s) {', '.join(missing)}")
    if obj["format"] != FORMAT:
        raise InputError(f"{where}: 'format' is {obj['format']!r}, expected {FORMAT!r} "
                         f"(rebuild it with python -m scvnet_jax.data.build {NAME})")
    if not isinstance(obj["image_root"], str) or not obj["image_root"]:
        raise InputError(f"{where}: 'image_root' must be a folder path (string)")
    if type(obj["ignored"]) is not int or obj["ignored"] < 0:
        raise InputError(f"{where}: 'ignored' must be a non-negative integer, got "
                         f"{obj['ignored']!r}")
    imlist, qimlist = _str_list(obj, "imlist", where), _str_list(obj, "qimlist", where)
    gnd = obj["gnd"]
    if not isinstance(gnd, list) or len(gnd) != len(qimlist) or not qimlist:
        raise InputError(f"{where}: 'gnd' must be a list with one entry per query "
                         f"({len(qimlist)}, at least 1)")
    out = []
    for i, g in enumerate(gnd):
        at = f"{where}: 'gnd'[{i}] (query {qimlist[i]!r})"
        if not isinstance(g, dict) or g.get("usage") not in ("public", "private"):
            raise InputError(f"{at}: expected {{'ok': [...], 'usage': 'public' or "
                             f"'private'}}, got {g!r:.80}")
        ok = g.get("ok")
        if (not isinstance(ok, list) or not ok
                or not all(type(v) is int and 0 <= v < len(imlist) for v in ok)):
            raise InputError(f"{at}: 'ok' must be a non-empty list of database indices in "
                             f"[0, {len(imlist)})")
        out.append({"easy": np.asarray(ok, dtype=np.int64), "hard": np.zeros(0, np.int64),
                    "junk": np.zeros(0, np.int64), "bbx": None, "usage": g["usage"]})
    return Path(obj["image_root"]), imlist, qimlist, out, obj["ignored"]


def load(data_dir) -> RevisitopDataset:
    """Reads `<data_dir>/gldv2_retrieval/gnd_gldv2_retrieval.json` (written by `prepare`)."""
    path = _gnd_path(data_dir)
    if not path.is_file():
        raise InputError(f"no {NAME} dataset in {data_dir}: expected {path}; build it from "
                         f"the manual download with python -m scvnet_jax.data.build {NAME} "
                         f"--manual_dir GLDV2 --data_dir {data_dir} (see "
                         "scvnet_jax.data.gldv2_retrieval.MANUAL_DOWNLOAD_INSTRUCTIONS)")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not a readable JSON ground-truth file ({e})") from None
    image_root, imlist, qimlist, gnd, ignored = _parse(obj, str(path))
    n_pub = sum(g["usage"] == "public" for g in gnd)
    note = (f"GLDv2 retrieval: mAP@100 over the {len(qimlist)} test images with ground truth "
            f"({n_pub} Public, {len(qimlist) - n_pub} Private); {ignored} Ignored test "
            "images are not queries")
    return RevisitopDataset(
        name=NAME, root=path.parent, gnd_path=path, imlist=imlist, qimlist=qimlist, gnd=gnd,
        db_paths=image_paths(image_root / "index", imlist),
        query_paths=image_paths(image_root / "test", qimlist),
        protocol="gldv2", notes=(note,))
