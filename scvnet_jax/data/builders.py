"""TFDS builders of the training sets, written as ArrayRecord for random access by grain.

Both store each image's original JPEG bytes (no re-encoding, and no TensorFlow needed to
build or read), its integer `label` (0..num_classes-1) and `image_id`. Examples are written
sorted by label (`disable_shuffling`, integer keys in label order), so every class is a
contiguous index range; `info.metadata['class_offsets']` (num_classes + 1 integers) gives
the ranges. Training uses them to draw a same-landmark positive for each image.

    python -m scvnet_jax.data.build demo --data_dir ~/tensorflow_datasets
    python -m scvnet_jax.data.build gldv2_clean --data_dir D --manual_dir GLDV2
"""
from __future__ import annotations

import csv
import hashlib
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import tensorflow_datasets as tfds

from scvnet_jax.data import demo
from scvnet_jax.errors import InputError, first_few
from scvnet_jax.images import is_truncated

JPEG_MAGIC = b"\xff\xd8"


def _features():
    return tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(), dtype=np.object_),     # JPEG bytes
        "label": tfds.features.Scalar(dtype=np.int64),
        "image_id": tfds.features.Tensor(shape=(), dtype=np.object_),  # utf-8 bytes
    })


def _class_sorted(builder, examples: Iterable[tuple[int, str, bytes]], num_classes: int,
                  split: str = "train") -> Iterator[tuple[int, dict]]:
    """Yields (running key, example) from label-sorted (label, image_id, jpeg) triples and
    records the class offsets in the builder's metadata: `class_offsets` and `num_classes`
    for the train split, `<split>_class_offsets` for another."""
    counts = np.zeros(num_classes, np.int64)
    key = 0
    last = -1
    for label, image_id, data in examples:
        if label < last:
            raise AssertionError("examples must come sorted by label")
        last = label
        counts[label] += 1
        yield key, {"image": data, "label": label, "image_id": image_id.encode()}
        key += 1
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        raise InputError(f"class(es) {empty[:5].tolist()} have no images")
    offsets = np.concatenate([[0], np.cumsum(counts)]).tolist()
    if split == "train":
        builder.info.metadata["num_classes"] = int(num_classes)
        builder.info.metadata["class_offsets"] = offsets
    else:
        builder.info.metadata[f"{split}_class_offsets"] = offsets


class DemoLandmarks(tfds.core.GeneratorBasedBuilder):
    """Instance-retrieval classes cut from scikit-image's photographs (scvnet_jax.data.demo);
    none of the benchmark's photographs is used."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "72 classes x 12 views from 11 scikit-image photographs."}

    def _info(self):
        return self.dataset_info_from_configs(
            features=_features(), disable_shuffling=True, metadata=tfds.core.MetadataDict(),
            description=__doc__)

    def _split_generators(self, dl_manager):
        demo.check_disjoint()
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        n = len(demo.train_instance_names())
        triples = ((label, image_id, data) for label, image_id, _, data in
                   demo.training_examples())
        yield from _class_sorted(self, triples, n)


GLDV2_COLUMNS = ("landmark_id", "images")


def read_gldv2_csv(csv_path: Path) -> list[tuple[int, list[str]]]:
    """`train_clean.csv` -> [(landmark_id, [image ids])] sorted by landmark_id, validated."""
    if not csv_path.is_file():
        raise InputError(f"{csv_path}: missing; expected GLDv2-clean's train_clean.csv (see "
                         "Gldv2Clean.MANUAL_DOWNLOAD_INSTRUCTIONS)")
    with open(csv_path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header) != GLDV2_COLUMNS:
            raise InputError(f"{csv_path}: columns {header}, expected exactly "
                             f"{list(GLDV2_COLUMNS)} (GLDv2-clean's train_clean.csv)")
        rows = []
        seen = set()
        for line, row in enumerate(reader, start=2):
            if len(row) != 2:
                raise InputError(f"{csv_path}:{line}: {len(row)} fields, expected 2 "
                                 "(landmark_id, images)")
            try:
                lid = int(row[0])
            except ValueError:
                raise InputError(f"{csv_path}:{line}: landmark_id {row[0]!r} is not an "
                                 "integer") from None
            ids = row[1].split()
            if not ids:
                raise InputError(f"{csv_path}:{line}: landmark {lid} has no images (an empty "
                                 "class); expected space-separated image ids")
            if lid in seen:
                raise InputError(f"{csv_path}:{line}: landmark {lid} appears twice")
            seen.add(lid)
            rows.append((lid, ids))
    if not rows:
        raise InputError(f"{csv_path}: no landmarks")
    return sorted(rows)


def gldv2_image_path(train_dir: Path, image_id: str) -> Path:
    return train_dir / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"


class Gldv2Clean(tfds.core.GeneratorBasedBuilder):
    """Google Landmarks Dataset v2, the 'clean' training subset (Yokoo et al. 2020):
    1,580,470 images of 81,313 landmarks, from a manual download."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "train_clean.csv + train/ image tree, JPEG bytes as stored."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Download GLDv2 from https://github.com/cvdfoundation/google-landmark: the train image
    tarballs (images_000.tar .. images_499.tar, extracted into one `train/` folder, which
    gives train/<a>/<b>/<c>/<image_id>.jpg) and
    https://s3.amazonaws.com/google-landmark/metadata/train_clean.csv.
    Put both in the manual folder:
        <manual_dir>/train_clean.csv
        <manual_dir>/train/0/0/0/000015f76534add3.jpg ...
    then run
        python -m scvnet_jax.data.build gldv2_clean --data_dir D --manual_dir <manual_dir>
    """

    def _info(self):
        return self.dataset_info_from_configs(
            features=_features(), disable_shuffling=True, metadata=tfds.core.MetadataDict(),
            description=__doc__, homepage="https://github.com/cvdfoundation/google-landmark")

    def _split_generators(self, dl_manager):
        manual = Path(dl_manager.manual_dir)
        rows = read_gldv2_csv(manual / "train_clean.csv")
        train_dir = manual / "train"
        paths = (gldv2_image_path(train_dir, i) for _, ids in rows for i in ids)
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise InputError(f"{len(missing)} image file(s) listed in train_clean.csv are "
                             f"missing: {first_few(missing)}")
        self.info.metadata["landmark_ids"] = [lid for lid, _ in rows]
        # Reported, not changed (this is the published training set): one-image classes
        # (training uses the image itself as its positive) and files of equal content.
        small = [lid for lid, ids in rows if len(ids) < 2]
        self.info.metadata["small_classes"] = {"count": len(small), "first": small[:100]}
        return {"train": self._generate_examples(rows, train_dir)}

    def _generate_examples(self, rows, train_dir):
        seen: dict[bytes, str] = {}
        duplicates: list[list[str]] = []

        def triples():
            for label, (_, ids) in enumerate(rows):
                for image_id in ids:
                    path = gldv2_image_path(train_dir, image_id)
                    data = path.read_bytes()
                    if not data.startswith(JPEG_MAGIC):
                        raise InputError(f"{path}: not a JPEG file (expected the bytes FF D8 "
                                         "at the start)")
                    if is_truncated(data):
                        raise InputError(f"{path}: truncated (the JPEG ends before its image "
                                         "data does); re-extract its tarball")
                    digest = hashlib.blake2b(data, digest_size=16).digest()
                    if digest in seen:
                        duplicates.append([image_id, seen[digest]])
                    else:
                        seen[digest] = image_id
                    yield label, image_id, data
            self.info.metadata["duplicates"] = {"count": len(duplicates),
                                                "first": duplicates[:100]}
        yield from _class_sorted(self, triples(), len(rows))


BUILDERS = {"demo": DemoLandmarks, "demo_landmarks": DemoLandmarks, "gldv2_clean": Gldv2Clean}


def check_data_dir(data_dir, name: str) -> None:
    """Refuses (one InputError, before anything is written) a --data_dir, or a
    `<data_dir>/<name>`, that is a file or lies under one: TFDS would create folders there
    and fail half-way with a traceback."""
    d = Path(data_dir).expanduser()
    if d.exists() and not d.is_dir():
        raise InputError(f"--data_dir {d}: is a file, not a folder (expected a folder to "
                         f"write the set {name!r} into)")
    up = next((a for a in d.absolute().parents if a.exists()), None)
    if not d.exists() and up is not None and not up.is_dir():
        raise InputError(f"--data_dir {d}: {up} is a file, not a folder")
    if (d / name).exists() and not (d / name).is_dir():
        raise InputError(f"--data_dir {d}: {d / name} is a file, where the set {name!r} is "
                         "written (a folder); move it away or choose another --data_dir")


def prepare(name: str, data_dir, manual_dir=None) -> tfds.core.DatasetBuilder:
    """Builds `name` ('demo' or 'gldv2_clean') into `data_dir` as ArrayRecord (no-op if done)."""
    if name not in BUILDERS:
        raise InputError(f"unknown training set {name!r}; choose from {sorted(BUILDERS)}")
    check_data_dir(data_dir, BUILDERS[name].name)
    builder = BUILDERS[name](data_dir=str(data_dir), file_format="array_record")
    config = tfds.download.DownloadConfig(manual_dir=str(manual_dir) if manual_dir else None)
    builder.download_and_prepare(download_config=config)
    return builder
