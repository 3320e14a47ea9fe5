"""Your own photos as a training set and a benchmark: a folder of class subfolders (or a CSV
of `path,label`) -> the TFDS ArrayRecord format the trainer reads, with a held-out split for
evaluation.

    python -m scvnet_jax.data.build folder --manual_dir PHOTOS/ --name my_set --data_dir TFDS/
    python -m scvnet_jax.train --config demo.py --workdir runs/my_set --config.data.name=my_set --config.data.data_dir=TFDS/
    python -m scvnet_jax.eval --dataset folder:TFDS/my_set --weights runs/my_set/model

Layout read: `PHOTOS/<class>/<any/depth>/<image>` (one class per top-level subfolder; image
files by extension, hidden files skipped), or a CSV with the columns `path,label` (a header
row optional; paths relative to the CSV's folder). What is checked, before anything is
written, with one error naming the files: every listed file exists and decodes (the decoder
training and evaluation use), no two files have the same content (a duplicate across the
split would leak held-out images into training), and every class has at least 2 images (a
positive pair; `--skip_small_classes` drops such classes instead and says which).

Split (`--eval_fraction`, `--holdout`, `--seed`; numpy's default_rng, so the same inputs
and seed give the same split everywhere):
  classes  a fraction of the classes, all their images, is held out (unseen classes: what
           revisited Oxford/Paris and GLDv2 measure). Database = the held-out images.
  images   a fraction of each class's images is held out (each class keeps >= 2 for
           training). Database = every image of the set, the training images included.
Every held-out image is a query; its positives are the other database images of its
class; the query's own image is ignored (revisitop's junk). There are no hard labels, so
revisitop's Easy/Medium/Hard collapse to one setting ("all", protocol "single").

The set is written as `<data_dir>/<name>/1.0.0/` with splits "train" and "eval" (labels
per split, sorted by class as `builders.py` writes them) and a content fingerprint of the
photos and options in its metadata: building the same name from other photos is refused
(nothing is overwritten), the same photos again is a no-op. `open_benchmark` turns the
held-out split into files under the cache folder once (keyed by that fingerprint).
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from scvnet_jax import files
from scvnet_jax.errors import InputError, first_few
from scvnet_jax.images import IMAGE_EXTENSIONS

_DESCRIPTION = __doc__
HOLDOUTS = ("classes", "images")
VERSION = "1.0.0"
FORMAT = "scvnet_jax.folder/1"
NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclasses.dataclass(frozen=True)
class Photo:
    path: Path          # the file
    image_id: str       # its path relative to the folder (or as the CSV gives it)
    label: str          # its class


def check_name(name: str) -> None:
    """A TFDS name of our own: snake_case, not a dataset TFDS or this package defines."""
    import tensorflow_datasets as tfds

    from scvnet_jax.data import builders

    if not NAME_RE.match(name or ""):
        raise InputError(f"--name {name!r}: expected a snake_case name (lower-case letters, "
                         "digits and _, starting with a letter), e.g. my_set")
    registered = name in builders.BUILDERS
    if not registered:
        try:
            tfds.builder_cls(name)
            registered = True
        except Exception:
            pass
    if registered:
        raise InputError(f"--name {name!r}: a dataset of that name is already defined (by "
                         "TFDS or this package); choose another name")


def scan_folder(root: Path, notes: list[str] | None = None) -> list[Photo]:
    """Image files under `root/<class>/`, sorted. What is left out that a user may have
    meant to include (a class folder without images, a link to nothing) is appended to
    `notes`, a line each."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"--manual_dir {root}: not a folder (expected one subfolder of "
                         "images per class)")
    loose = sorted(p.name for p in root.iterdir() if p.is_file() and not
                   p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)
    if loose:
        raise InputError(f"{root}: {len(loose)} image(s) directly in the folder "
                         f"({first_few(loose)}); expected every image in a class subfolder "
                         f"({root}/<class>/<image>)")
    photos = []
    notes = [] if notes is None else notes
    dangling = sorted(p for p in root.iterdir() if p.is_symlink() and not p.exists()
                      and not p.name.startswith("."))
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        n = len(photos)
        for p in sorted(d.rglob("*")):
            rel = p.relative_to(root)
            if any(part.startswith(".") for part in rel.parts):
                continue
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
                photos.append(Photo(p, rel.as_posix(), d.name))
            elif p.is_symlink() and not p.exists():
                dangling.append(p)
        if len(photos) == n:
            notes.append(f"left out the class folder {d}: no image files in it")
    notes.extend(f"left out {p}: a symbolic link to nothing ({os.readlink(p)})"
                 for p in sorted(dangling))
    if not photos:
        raise InputError(f"{root}: no image files in class subfolders (expected "
                         f"{root}/<class>/<image> with extensions "
                         f"{', '.join(IMAGE_EXTENSIONS)})")
    return photos


def read_csv(csv_path: Path) -> list[Photo]:
    """`path,label` rows (header optional; paths relative to the CSV's folder)."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise InputError(f"--csv {csv_path}: not found (expected a CSV of path,label rows)")
    photos, seen = [], {}
    with open(csv_path, newline="", encoding="utf-8-sig") as f:    # (Excel writes a BOM)
        for line, row in enumerate(csv.reader(f), start=1):
            if not row or not "".join(row).strip():
                continue
            if line == 1 and [c.strip().lower() for c in row] == ["path", "label"]:
                continue
            if len(row) != 2 or not row[0].strip() or not row[1].strip():
                raise InputError(f"{csv_path}:{line}: {row!r}; expected two non-empty fields "
                                 "path,label")
            rel, label = row[0].strip(), row[1].strip()
            if rel in seen:
                raise InputError(f"{csv_path}:{line}: {rel} is listed again (first at line "
                                 f"{seen[rel]})")
            seen[rel] = line
            photos.append(Photo(csv_path.parent / rel, rel, label))
    if not photos:
        raise InputError(f"{csv_path}: no rows (expected path,label rows)")
    return photos


def _check_one(photo: Photo) -> tuple[str, str]:
    """(sha256, "") or ("", what is wrong) for one file."""
    from scvnet_jax.images import decode_image, read_bytes

    try:
        data = read_bytes(str(photo.path))
        decode_image(data, str(photo.path))
    except InputError as e:
        return "", str(e)
    return hashlib.sha256(data).hexdigest(), ""


def check_photos(photos: list[Photo], skip_small_classes: bool = False, workers: int = 8,
                 progress: bool = True) -> tuple[list[Photo], list[str], list[str]]:
    """Reads and decodes every file (threads) -> (photos kept, their sha256, notes).
    One InputError for missing or corrupt files, duplicates, or too-small classes."""
    from tqdm import tqdm

    with ThreadPoolExecutor(workers) as pool:
        results = list(tqdm(pool.map(_check_one, photos), total=len(photos), unit="img",
                            desc="checking photos", disable=not progress, leave=False))
    bad = [msg for _, msg in results if msg]
    if bad:
        raise InputError(f"{len(bad)} of {len(photos)} image file(s) cannot be used: "
                         f"{first_few(bad, 3)}")
    digests = [d for d, _ in results]
    by_digest: dict[str, list[str]] = {}
    for p, d in zip(photos, digests):
        by_digest.setdefault(d, []).append(p.image_id)
    dups = [g for g in by_digest.values() if len(g) > 1]
    if dups:
        raise InputError(f"{len(dups)} group(s) of files with the same content: "
                         f"{first_few(' = '.join(g) for g in dups)}; keep one copy of each "
                         "(a duplicate in both splits would leak held-out images into "
                         "training)")
    counts: dict[str, int] = {}
    for p in photos:
        counts[p.label] = counts.get(p.label, 0) + 1
    small = sorted(c for c, n in counts.items() if n < 2)
    notes = []
    if small:
        if not skip_small_classes:
            raise InputError(f"{len(small)} class(es) with fewer than 2 images: "
                             f"{first_few(small)}; every class needs a positive pair (add "
                             "images, or pass --skip_small_classes to leave them out)")
        notes.append(f"left out {len(small)} class(es) with 1 image: {first_few(small, 10)}")
        keep = [i for i, p in enumerate(photos) if counts[p.label] >= 2]
        photos, digests = [photos[i] for i in keep], [digests[i] for i in keep]
    if len({p.label for p in photos}) < 2:
        raise InputError(f"{len({p.label for p in photos})} class(es) with 2 or more images; "
                         "expected at least 2 classes")
    return photos, digests, notes


def _round(x: float) -> int:
    """Halves up (Python's round() takes 2.5 to 2)."""
    return int(np.floor(x + 0.5))


def check_split_options(eval_fraction: float, holdout: str) -> None:
    if not 0 <= eval_fraction < 1:
        raise InputError(f"--eval_fraction {eval_fraction}: expected a number in [0, 1)")
    if holdout not in HOLDOUTS:
        raise InputError(f"--holdout {holdout!r}: expected one of {', '.join(HOLDOUTS)}")


def split(photos: list[Photo], eval_fraction: float, holdout: str, seed: int
          ) -> tuple[list[int], list[int]]:
    """(train indices, eval indices) of `photos`, seeded."""
    check_split_options(eval_fraction, holdout)
    rng = np.random.default_rng(seed)
    classes = sorted({p.label for p in photos})
    members = {c: [i for i, p in enumerate(photos) if p.label == c] for c in classes}
    held: set[int] = set()
    if eval_fraction > 0 and holdout == "classes":
        n = min(max(1, _round(eval_fraction * len(classes))), len(classes) - 2)
        if n < 1:
            raise InputError(f"--holdout classes needs at least 3 classes (2 to train on, 1 to "
                             f"hold out), got {len(classes)}")
        for c in (classes[k] for k in rng.permutation(len(classes))[:n]):
            held.update(members[c])
    elif eval_fraction > 0:
        for c in classes:
            m = members[c]
            n = min(_round(eval_fraction * len(m)), len(m) - 2)
            if n > 0:
                held.update(m[k] for k in rng.permutation(len(m))[:n])
        if not held:
            raise InputError(f"--eval_fraction {eval_fraction} with --holdout images holds no "
                             "image out (every class keeps 2 for training); raise it")
    train = [i for i in range(len(photos)) if i not in held]
    return train, sorted(held)


def fingerprint(photos: list[Photo], digests: list[str], options: dict) -> str:
    lines = [json.dumps(options, sort_keys=True)] + [
        f"{p.image_id}\t{p.label}\t{d}" for p, d in zip(photos, digests)]
    return files.list_fingerprint(lines)


def _builder_class(name: str):
    """A TFDS builder named `name` (not registered: the set is read back from its files)."""
    import tensorflow_datasets as tfds

    from scvnet_jax.data import builders

    class FolderSet(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version(VERSION)
        RELEASE_NOTES = {str(VERSION): "A folder of class subfolders (or a path,label CSV), "
                                  "original bytes, sorted by class per split."}

        def __init__(self, *, plan: dict, **kwargs):
            self._plan = plan
            super().__init__(**kwargs)

        def _info(self):
            return self.dataset_info_from_configs(
                features=builders._features(), disable_shuffling=True,
                metadata=tfds.core.MetadataDict(), description=_DESCRIPTION)

        def _split_generators(self, dl_manager):
            self.info.metadata.update(self._plan["metadata"])
            # (TFDS cannot write an empty split: with --eval_fraction 0 there is no "eval")
            return {s: self._generate_examples(s) for s in ("train", "eval") if self._plan[s]}

        def _generate_examples(self, split_name):
            photos, names = self._plan[split_name], self._plan[f"{split_name}_classes"]
            label = {c: i for i, c in enumerate(names)}
            digests = self._plan["digests"]

            def triples():
                for p in sorted(photos, key=lambda p: (label[p.label], p.image_id)):
                    data = p.path.read_bytes()
                    if hashlib.sha256(data).hexdigest() != digests[p.image_id]:
                        raise InputError(f"{p.path}: changed while the set was being built "
                                         "(its content differs from when it was checked); "
                                         "run the command again")
                    yield label[p.label], p.image_id, data
            yield from builders._class_sorted(self, triples(), len(names), split_name)

    return type(f"FolderSet_{name}", (FolderSet,), {"name": name, "__module__": __name__},
                skip_registration=True)


def prepared_metadata(name: str, data_dir) -> dict | None:
    """The metadata of `<data_dir>/<name>/1.0.0` if a finished set is there."""
    d = Path(data_dir).expanduser() / name / VERSION
    if not (d / "dataset_info.json").is_file():
        return None
    try:
        return json.loads((d / "metadata.json").read_text())
    except (OSError, ValueError):
        return {}


def build(name: str, data_dir, manual_dir=None, csv_path=None, eval_fraction: float = 0.2,
          holdout: str = "classes", seed: int = 0, skip_small_classes: bool = False,
          workers: int = 8, progress: bool = True) -> dict:
    """Checks the photos and writes the set (a no-op if the same photos and options are
    already built); returns its metadata. Prints nothing; `notes` in the result say what
    was left out."""
    check_name(name)
    if (manual_dir is None) == (csv_path is None):
        raise InputError("give exactly one of --manual_dir (a folder of class subfolders) and "
                         "--csv (a path,label file)")
    check_split_options(eval_fraction, holdout)               # before reading any photo
    from scvnet_jax.data.builders import check_data_dir
    check_data_dir(data_dir, name)
    left_out: list[str] = []
    photos = read_csv(Path(csv_path)) if csv_path else scan_folder(Path(manual_dir), left_out)
    photos, digests, notes = check_photos(photos, skip_small_classes, workers, progress)
    notes = left_out + notes
    train, held = split(photos, eval_fraction, holdout, seed)
    options = {"eval_fraction": eval_fraction, "holdout": holdout, "seed": seed}
    fp = fingerprint(photos, digests, options)
    data_dir = Path(data_dir).expanduser()
    old = prepared_metadata(name, data_dir)
    if old is not None:
        if old.get("fingerprint") == fp:
            return {**old, "notes": notes, "reused": True}
        raise InputError(f"{data_dir / name / VERSION}: a set named {name!r} is already built "
                         "there from other photos or options; choose another --name (or "
                         "remove that folder yourself)")
    tr = [photos[i] for i in train]
    ev = [photos[i] for i in held]
    train_classes = sorted({p.label for p in tr})
    eval_classes = sorted({p.label for p in ev})
    metadata = {"format": FORMAT, "fingerprint": fp, **options,
                "source": str(Path(csv_path or manual_dir).expanduser().resolve()),
                "class_names": train_classes, "eval_class_names": eval_classes,
                "skipped": notes, **({} if ev else {"eval_class_offsets": [0]})}
    plan = {"train": tr, "eval": ev, "train_classes": train_classes,
            "eval_classes": eval_classes, "metadata": metadata,
            "digests": {p.image_id: d for p, d in zip(photos, digests)}}
    import tensorflow_datasets as tfds

    builder = _builder_class(name)(plan=plan, data_dir=str(data_dir), file_format="array_record")
    if not progress:
        tfds.disable_progress_bar()
    builder.download_and_prepare()
    return {**dict(builder.info.metadata), "notes": notes, "reused": False}


# -- evaluation on the held-out split ----------------------------------------------------------

def parse_spec(spec: str) -> tuple[Path, str]:
    """'folder:TFDS/my_set' -> (TFDS, 'my_set')."""
    path = spec[len("folder:"):] if spec.startswith("folder:") else spec
    p = Path(path).expanduser()
    if not path or not p.name:
        raise InputError(f"--dataset {spec!r}: expected folder:<data_dir>/<name>, e.g. "
                         "folder:~/tensorflow_datasets/my_set")
    return p.parent, p.name


def _cached_name(k: int, image_id: str) -> str:
    """Where database image k is written in the benchmark's cache folder: images/<image_id>,
    or other/<k>.<ext> for an id that would land outside it (a CSV may name files by
    absolute path or ../)."""
    p = Path(image_id)
    if p.anchor or ".." in p.parts:
        return f"other/{k:06d}{p.suffix.lower()}"
    return f"images/{image_id}"


def open_benchmark(spec: str, cache_dir):
    """The held-out split of a folder set as a benchmark (`RevisitopDataset`, protocol
    "single"): its images written once under `<cache_dir>/folder_sets/`."""
    import tensorflow_datasets as tfds

    from scvnet_jax.data.revisitop import RevisitopDataset

    data_dir, name = parse_spec(spec)
    meta = prepared_metadata(name, data_dir)
    if meta is None:
        raise InputError(f"--dataset {spec}: no set {name!r} built in {data_dir} (expected "
                         f"{data_dir / name / VERSION}/); build it with: python -m "
                         f"scvnet_jax.data.build folder --manual_dir PHOTOS --name {name} "
                         f"--data_dir {data_dir}")
    if meta.get("format") != FORMAT:
        raise InputError(f"--dataset {spec}: {data_dir / name} was not written by the folder "
                         "builder (python -m scvnet_jax.data.build folder)")
    if not meta.get("eval_class_names"):
        raise InputError(f"--dataset {spec}: the set has no held-out images (built with "
                         "--eval_fraction 0); rebuild it under another --name with "
                         "--eval_fraction > 0")
    root = Path(cache_dir or ".").expanduser() / "folder_sets" / f"{name}-{meta['fingerprint'][:16]}"
    gnd_path = root / "gnd.json"
    if not gnd_path.is_file():
        b = tfds.builder(name, data_dir=str(data_dir))
        splits = ["eval"] + (["train"] if meta["holdout"] == "images" else [])
        tmp = files.staging_dir(root)
        try:
            db, queries = [], []
            for s in splits:
                source = b.as_data_source(split=s)
                names = meta["eval_class_names" if s == "eval" else "class_names"]
                for i in range(len(source)):
                    r = source[i]
                    image_id = r["image_id"].decode()
                    out = tmp / _cached_name(len(db), image_id)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(r["image"])
                    db.append((image_id, names[int(r["label"])]))
                    if s == "eval":
                        queries.append(len(db) - 1)
            labels = np.array([c for _, c in db])
            gnd = []
            for q in queries:
                same = np.flatnonzero(labels == labels[q])
                gnd.append({"easy": [int(j) for j in same if j != q], "junk": [q]})
            doc = {"format": FORMAT, "set": str(data_dir / name), "fingerprint":
                   meta["fingerprint"], "holdout": meta["holdout"],
                   "imlist": [i for i, _ in db], "labels": [c for _, c in db],
                   "queries": queries, "gnd": gnd}
            files.atomic_write_text(tmp / "gnd.json", json.dumps(doc) + "\n")
            if not gnd_path.is_file():
                files.replace_dir(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    doc = json.loads(gnd_path.read_text())
    imlist = doc["imlist"]
    empty = np.zeros(0, np.int64)
    gnd = [{"easy": np.asarray(g["easy"], np.int64), "hard": empty,
            "junk": np.asarray(g["junk"], np.int64), "bbx": None} for g in doc["gnd"]]
    db_paths = [str(root / _cached_name(k, i)) for k, i in enumerate(imlist)]
    held = ("held-out classes" if meta["holdout"] == "classes" else
            "held-out images of every class")
    notes = (f"{name}: {len(gnd)} queries ({held}, {meta['eval_fraction']:g} of the set, seed "
             f"{meta['seed']}), {len(imlist)} database images"
             + (" (the training images included)" if meta["holdout"] == "images" else "")
             + "; positives: the other images of the query's class; the query's own image "
               "is ignored. No hard or junk labels: Easy, Medium and Hard are one setting "
               "('all').",)
    return RevisitopDataset(f"folder:{name}", root, gnd_path, imlist,
                            [imlist[q] for q in doc["queries"]], gnd, db_paths=db_paths,
                            query_paths=[db_paths[q] for q in doc["queries"]],
                            protocol="single", notes=notes,
                            query_classes=[doc["labels"][q] for q in doc["queries"]])
