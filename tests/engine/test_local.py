"""AMES local descriptors (engine/local.py) against the official extraction's outputs in
../shared/ames_extract, with the tolerances of its README.

Every run of every file is checked, whatever the set holds (k, images, splits and scales
are read from each run's `config` and `meta`): per image and scale the OpenCV input bytes
first, then the stage-3 norms, detector weights and the probes' features and descriptors;
then the rows: the same selected locations, each row matched by (scale index, y, x) within
tolerance, the order wherever the official weights differ by more than 2x the tolerance,
padding rows exactly. The batched extraction (padded size buckets, several images of
different sizes per batch, chunks, cache) is checked against the per-image rows.

The cost is the R101 forward on CPU: one model per weight seed (module scope), each map
computed once.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from scvnet_jax.convert import mapping
from scvnet_jax.engine import local
from scvnet_jax.engine.cache import ChunkCache
from scvnet_jax.engine.extract import cvnet_scales
from scvnet_jax.errors import InputError
from scvnet_jax.errors import CheckpointError
from scvnet_jax.images import ImageRef, crop, normalize

SHARED = Path(os.environ.get("SCVNET_SHARED", Path(__file__).resolve().parents[2].parent
                             / "shared")).resolve()
AMES = SHARED / "ames_extract"
SEEDS = sorted({int(m[1]) for p in AMES.glob("ames_extract_seed*.npz")
                if (m := re.match(r"ames_extract_seed(\d+)", p.name))})

# Max absolute errors (../shared/ames_extract/README.md, "Tolerances")
TOL_DET_WEIGHT = 2e-5
TOL_DET_DESC = 2e-6
TOL_NORM_WEIGHT = 2e-4
TOL_RAW_DESC = 1e-4
INTERP = {cv2.INTER_AREA: "INTER_AREA", cv2.INTER_LINEAR: "INTER_LINEAR"}


def _tol(detector: bool) -> tuple[float, float]:
    return (TOL_DET_WEIGHT, TOL_DET_DESC) if detector else (TOL_NORM_WEIGHT, TOL_RAW_DESC)


@pytest.fixture(scope="module")
def sets():
    """{seed: {key: array}} of every file of ../shared/ames_extract, a seed's files merged."""
    if not SEEDS:
        pytest.fail(f"ground truth not found: {AMES}/ames_extract_seed*.npz", pytrace=False)
    out = {}
    for seed in SEEDS:
        merged: dict = {}
        for path in sorted(AMES.glob(f"ames_extract_seed{seed}*.npz")):
            if re.match(rf"ames_extract_seed{seed}(_|\.npz)", path.name):
                with np.load(path) as z:
                    merged.update({k: z[k] for k in z.files})
        out[seed] = merged
    return out


def _meta(fx) -> dict:
    return json.loads(str(fx["meta"]))


def _runs(fx) -> dict:
    return {k.split("/")[0]: json.loads(str(fx[k])) for k in fx
            if k.count("/") == 1 and k.endswith("/config")}


def _image(fx, name: str, split: str) -> np.ndarray:
    """The image as the official loader gives it to the network: a query (split _query, with
    a box) cropped by the official rule."""
    im = fx[f"images/{name}"]
    if split == "_query":
        im = crop(im, fx[f"query/{name}/bbx"], name)
    return im


def _scales(fx) -> tuple:
    return tuple(_meta(fx)["scales"])


@pytest.fixture(scope="module")
def ames_weights():
    sys.path.insert(0, str(SHARED / "parity"))
    try:
        import weights  # noqa: the fixture's own module
    finally:
        sys.path.pop(0)
    return weights


@pytest.fixture(scope="module")
def models(sets, parity_state_dict):
    """models(seed) -> the R101 RetrievalModel of the CVNet checkpoint of that seed, built
    from the NumPy state dict (no torch)."""
    from scvnet_jax.api import RetrievalModel
    from scvnet_jax.models import Arch
    from scvnet_jax.models.cvnet import CVNet

    made: dict = {}

    def get(seed):
        if seed not in made:
            meta = _meta(sets[seed])   # "make_checkpoint.py cvnet_r101_keys.json SEED OUT"
            m = re.search(r"cvnet_r101_keys\.json (\d+) ", meta.get("cvnet_checkpoint", ""))
            sd = parity_state_dict(101, int(m[1]) if m else meta["seed"])
            made[seed] = RetrievalModel(CVNet(Arch(depth=101), precision="highest"),
                                        mapping.state_dict_to_variables(sd))
        return made[seed]
    return get


@pytest.fixture(scope="module")
def detector_sd(sets, ames_weights):
    """detector_sd(seed) -> the detector's NumPy state dict (README, "Weights")."""
    spec = ames_weights.load_spec(AMES / "ames_detector_keys.json")
    return lambda seed: ames_weights.make_state_dict(spec, _meta(sets[seed])["seed"])


@pytest.fixture(scope="module")
def detectors(detector_sd):
    made: dict = {}

    def get(seed):
        if seed not in made:
            made[seed] = local.detector_from_state_dict(detector_sd(seed))
        return made[seed]
    return get


@pytest.fixture(scope="module")
def features(sets, models):
    """features(seed, name, split) -> per scale (scaled uint8 input, (h, w, C) features),
    each map computed once, unpadded."""
    made: dict = {}

    def get(seed, name, split):
        if (seed, name) not in made:
            model = models(seed)
            out = []
            for x in cvnet_scales(_image(sets[seed], name, split), _scales(sets[seed])):
                out.append((x, np.asarray(model.local_features(normalize(x)[None]))[0]))
            made[(seed, name)] = out
        return made[(seed, name)]
    return get


@pytest.fixture(scope="module")
def rows(sets, models, detectors):
    """rows(seed, run, name) -> local_descriptors of that run's settings, computed once."""
    made: dict = {}

    def get(seed, run, name):
        if (seed, run, name) not in made:
            fx = sets[seed]
            cfg = _runs(fx)[run]
            det = detectors(seed) if cfg["detector"] else None
            made[(seed, run, name)] = local.local_descriptors(
                models(seed), _image(fx, name, cfg["split"][name]), detector=det,
                topk=cfg["topk"], scales=cfg["scales"])
        return made[(seed, run, name)]
    return get


def _err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def compare_rows(got: np.ndarray, ref: np.ndarray, seq_len: int, detector: bool,
                 what: str) -> tuple[float, float]:
    """Asserts `got` holds the official rows `ref` (see the module doc); returns the max
    weight and descriptor errors."""
    tol_w, tol_d = _tol(detector)
    assert got.shape == ref.shape and got.dtype == np.float32, (what, got.shape, got.dtype)
    n = seq_len
    np.testing.assert_array_equal(got[n:], ref[n:], err_msg=f"{what}: padding rows")
    assert (got[:n, 3] == 0).all(), f"{what}: a real row is marked as padding"

    def keys(r):
        return [(int(j), float(y), float(x)) for y, x, j in r[:n, :3]]

    ref_at = {k: i for i, k in enumerate(keys(ref))}
    assert len(ref_at) == n, f"{what}: official keys not unique"
    mine = keys(got)
    missing = set(ref_at) - set(mine)
    assert not missing and len(set(mine)) == n, \
        f"{what}: selected locations differ ({len(missing)} official ones missing)"
    pos = np.array([ref_at[k] for k in mine])
    err_w = _err(got[:n, 4], ref[pos, 4])
    err_d = _err(got[:n, 5:], ref[pos, 5:])
    assert err_w <= tol_w, f"{what}: weight error {err_w:.2e} > {tol_w:.0e}"
    assert err_d <= tol_d, f"{what}: descriptor error {err_d:.2e} > {tol_d:.0e}"
    assert (np.diff(got[:n, 4]) <= 0).all(), f"{what}: weights not non-increasing"
    # order: no later row may have an official weight above an earlier one's by > 2 tol
    w = ref[pos, 4].astype(np.float64)
    later_max = np.maximum.accumulate(w[::-1])[::-1]
    bad = np.nonzero(later_max[1:] > w[:-1] + 2 * tol_w)[0]
    assert not bad.size, f"{what}: row {bad[0]} is out of the official order"
    return err_w, err_d


# -- the weights ----------------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
def test_detector_weights_are_the_fixtures(sets, detector_sd, seed):
    fx, sd = sets[seed], detector_sd(seed)
    spec = json.loads(str(fx["detector/spec"]))
    assert [k for k, _, _ in spec] == list(sd)
    h = hashlib.sha256()
    for key, shape, dtype in spec:
        assert sd[key].shape == tuple(shape) and sd[key].dtype == np.dtype(dtype), key
        h.update(key.encode())
        h.update(np.ascontiguousarray(sd[key]).tobytes())
    assert h.hexdigest() == str(fx["detector/sha256"])
    for key in sd:
        check = fx[f"detector/check/{key}"]
        flat = sd[key].reshape(-1).astype(np.float64)
        assert flat.sum() == check[0], key
        np.testing.assert_array_equal(flat[:4], check[1:1 + len(flat[:4])], err_msg=key)


# -- per image and scale --------------------------------------------------------------------

@pytest.mark.slow   # the everyday loop (-m 'not slow') stays within 4 minutes
@pytest.mark.parametrize("seed", SEEDS)
def test_inputs_and_maps(sets, features, detectors, seed):
    """The query crop, the OpenCV inputs (bytes), the network input, and per map the
    stage-3 norms, the detector's weights, the probes' features and descriptors."""
    fx = sets[seed]
    det = detectors(seed)
    splits = {}
    for cfg in _runs(fx).values():
        splits.update(cfg["split"])
    for q in (n for n, s in splits.items() if s == "_query"):
        x1, y1 = (int(v) for v in fx[f"query/{q}/bbx"][:2])
        assert [y1, x1] == list(fx[f"query/{q}/crop_origin_yx"]), q
    scales = _scales(fx)
    errors: dict = {}

    def record(key, err, tol, what):
        errors[key] = max(errors.get(key, 0.0), err)
        assert err <= tol, f"{what} {key}: max abs error {err:.2e} > {tol:.0e}"

    for name, split in splits.items():
        maps = features(seed, name, split)
        assert len(maps) == len(scales)
        for j, (s, (x, f)) in enumerate(zip(scales, maps)):
            p = f"inter/{name}/s{j}"
            assert float(fx[f"{p}/scale"]) == s, p
            want = "none" if s == 1.0 else INTERP[cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR]
            assert str(fx[f"{p}/interp"]) == want, p
            assert list(x.shape[:2]) == list(fx[f"{p}/input_hw"]), p
            # first: other input bytes would make everything below differ
            assert hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest() == \
                str(fx[f"{p}/input_sha256"]), f"{p}: the OpenCV-scaled input differs"
            np.testing.assert_array_equal(x.reshape(-1, 3).sum(0, dtype=np.int64),
                                          fx[f"{p}/input_sum_bgr"])
            net_sum = float(normalize(x).sum(dtype=np.float64))
            assert abs(net_sum - float(fx[f"{p}/net_in_sum"])) <= 1e-9 * abs(net_sum), p
            assert list(f.shape[:2]) == list(fx[f"{p}/s3_hw"]), p
            record("s3_norm", _err(np.linalg.norm(f, axis=-1), fx[f"{p}/s3_norm"]),
                   TOL_NORM_WEIGHT, p)
            d, w = (np.asarray(a) for a in det(f))
            record("det_weight", _err(w, fx[f"{p}/det_weight"]), TOL_DET_WEIGHT, p)
            r, c = fx[f"{p}/probe_rc"].T
            record("s3_probe", _err(f[r, c], fx[f"{p}/s3_probe"]), TOL_RAW_DESC, p)
            record("det_desc_probe", _err(d[r, c], fx[f"{p}/det_desc_probe"]), TOL_DET_DESC, p)
    print(f"seed {seed} max errors:", {k: f"{v:.2e}" for k, v in errors.items()})


# -- rows -----------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
def test_rows(sets, rows, seed):
    """Every run's rows: selection, values, order, positions, padding."""
    fx = sets[seed]
    runs = _runs(fx)
    assert runs, "no run in the fixture"
    checked, errors = 0, {}
    for run, cfg in runs.items():
        assert tuple(cfg["scales"]) == _scales(fx)
        for name in cfg["images"]:
            what = f"seed {seed} {run}/{name}"
            ref = fx[f"{run}/{name}/rows"]
            n = int(fx[f"{run}/{name}/seq_len"])
            sizes = fx[f"{run}/{name}/scale_sizes"]
            assert ref.shape == (cfg["topk"], 1029) and n == min(int(sizes.sum()), cfg["topk"])
            # the official ids say which location each row is: positions exactly as stated
            ids = fx[f"{run}/{name}/ids"]
            j = np.searchsorted(np.cumsum(sizes), ids, side="right")
            local_id = ids - np.concatenate([[0], np.cumsum(sizes)])[j]
            hw = np.array([fx[f"inter/{name}/s{s}/s3_hw"] for s in range(len(sizes))])
            r, c = local_id // hw[j, 1], local_id % hw[j, 1]
            s = np.asarray(cfg["scales"], np.float64)[j]
            np.testing.assert_array_equal(ref[:n, 0], (16.0 * r / s).astype(np.float32))
            np.testing.assert_array_equal(ref[:n, 1], (16.0 * c / s).astype(np.float32))
            np.testing.assert_array_equal(ref[:n, 2], j)

            got = rows(seed, run, name)
            ew, ed = compare_rows(got, ref, n, cfg["detector"], what)
            kind = "det" if cfg["detector"] else "nodet"
            errors[f"{kind} weight"] = max(errors.get(f"{kind} weight", 0), ew)
            errors[f"{kind} desc"] = max(errors.get(f"{kind} desc", 0), ed)
            back = local.LocalFeatures.from_rows(ref, cfg["scales"])
            assert int(back.length[0]) == n
            np.testing.assert_array_equal(back.rows(0), ref)
            checked += 1
    print(f"seed {seed}: {checked} images' rows; max errors",
          {k: f"{v:.2e}" for k, v in errors.items()})


def test_exact_ties_lower_index_first():
    """Equal weights (torch.topk leaves their order unspecified) are ordered by location
    index, scale-major then row-major, the lower first: also across the per-map top-k on
    the device and the merge of the maps on the host."""
    values = np.array([1, 2, 2, 1, 2, 3, 2], np.float32)       # the README's example
    feats = np.zeros((2, 1, 7, 4), np.float32)
    feats[0, 0, :, 0] = values                                  # scale 0: a 1 x 7 map
    feats[1, 0, :, 1] = values[::-1]                            # scale 1, its 3 cells valid
    valid = np.array([[1, 7], [1, 3]], np.int32)
    w, idx, d = (np.asarray(a) for a in local._top_of_maps(None, None, feats, valid, k=4,
                                                           dtype=np.float32))
    np.testing.assert_array_equal(idx[0], [5, 1, 2, 4])       # torch: [5, 4, 1, 6]
    out = local.LocalFeatures.zeros(1, 5, 4, np.float32, (1.0, 2.0))
    merger = local._Merger(out, 2)
    assert not merger.add(0, 0, w[0], idx[0], d[0], valid[0], 7)
    assert merger.add(0, 1, w[1], idx[1], d[1], valid[1], 7)
    # scale 1 holds 2, 3, 2 (ids 7, 8, 9): 3s at ids 5, 8, then 2s at ids 1, 2, 4
    np.testing.assert_array_equal(out.weight[0], [3, 3, 2, 2, 2])
    np.testing.assert_array_equal(out.scale[0], [0, 1, 0, 0, 0])
    np.testing.assert_array_equal(out.yx[0, :, 1], [80, 8, 16, 32, 64])   # 16 c / s
    assert int(out.length[0]) == 5


# -- the detector checkpoint ----------------------------------------------------------------

def test_load_detector(tmp_path, torch_save, detector_sd):
    """An official-format checkpoint ({'state': sd}, written by torch) loads to the same
    detector; a wrong state dict is refused with one error naming every bad key."""
    seed = SEEDS[0]
    sd = detector_sd(seed)
    ref = local.detector_from_state_dict(sd)
    path = torch_save({"state": sd}, tmp_path / "detector.pth")
    det = local.load_detector(path)
    assert det.channels == 1024 and det.fingerprint == ref.fingerprint
    x = np.random.default_rng(0).normal(size=(2, 3, 1024)).astype(np.float32)
    for a, b in zip(det(x), ref(x)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # PyTorch's strict loading allows a plain dict without num_batches_tracked
    no_count = {k: v for k, v in sd.items() if k != "bn.num_batches_tracked"}
    assert local.detector_from_state_dict(no_count).fingerprint == ref.fingerprint

    bad = dict(sd)
    del bad["bn.running_var"]
    bad["conv2.weight"] = bad["conv2.weight"][:, :512]
    bad["extra.bias"] = np.zeros(3, np.float32)
    bad_path = torch_save({"state": bad}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as e:
        local.load_detector(bad_path)
    msg = str(e.value)
    for text in (str(bad_path), "missing keys (1): bn.running_var",
                 "unexpected keys (1): extra.bias", "mis-shaped keys (1): conv2.weight"):
        assert text in msg, msg
    with pytest.raises(CheckpointError, match="not tensors"):
        local.load_detector(torch_save({"state": {"conv1.weight": 3}}, tmp_path / "x.pth"))


# -- batched extraction ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def image_files(sets, tmp_path_factory):
    """The first set's images as PNG files (lossless), queries as ImageRefs with their box."""
    fx = sets[SEEDS[0]]
    out = tmp_path_factory.mktemp("ames_images")
    refs, splits = [], {}
    for cfg in _runs(fx).values():
        splits.update(cfg["split"])
    for name, split in splits.items():
        path = out / f"{name}.png"
        cv2.imwrite(str(path), fx[f"images/{name}"])
        bbx = tuple(float(v) for v in fx[f"query/{name}/bbx"]) if split == "_query" else None
        refs.append((name, split, ImageRef(str(path), bbx)))
    return refs


def test_padded_features_equal_unpadded(sets, models, features, image_files):
    """RetrievalModel.local_features of a padded batch (two images of different, odd sizes
    in one size bucket) equals each image's unpadded features on its valid map, border
    included, and is zero outside it."""
    from scvnet_jax.data import batching

    seed = SEEDS[0]
    model = models(seed)
    split_of = {name: split for name, split, _ in image_files}
    items = [((name, 1), features(seed, name, split_of[name])[1][0])
             for name, _, _ in image_files[:2]]
    side = -(-max(max(x.shape[:2]) for _, x in items) // 32) * 32
    (batch,) = batching.padded_batches(items, 2, side)      # one (side, side) bucket
    got = np.asarray(model.local_features(normalize(batch.images), batch.valid))
    for row, (name, j) in enumerate(batch.ids):
        want = features(seed, name, split_of[name])[j][1]
        h, w = want.shape[:2]
        assert tuple(model.feature_valid(batch.valid)[row]) == (h, w)
        err = _err(got[row, :h, :w], want)
        border = max(_err(got[row, h - 1, :w], want[-1]),
                     _err(got[row, :h, w - 1], want[:, -1]))
        print(f"{name} {tuple(int(v) for v in batch.valid[row])} padded to "
              f"{batch.images.shape[1:3]}: max |padded - unpadded| {err:.2e} "
              f"(last row and column {border:.2e})")
        assert err <= 1e-5, name
        assert not got[row, h:].any() and not got[row, :, w:].any()


@pytest.mark.slow   # the everyday loop (-m 'not slow') stays within 4 minutes
def test_extract_local_matches_per_image(sets, models, detectors, rows, image_files,
                                         tmp_path):
    """extract_local (padded size buckets holding maps of different sizes, 2 maps per batch,
    uneven chunks) gives each image the rows of local_descriptors, hence the official ones;
    a second call is served by the cache without the model."""
    from scvnet_jax.data import batching

    seed = SEEDS[0]
    fx, model, det = sets[seed], models(seed), detectors(seed)
    run, cfg = next((r, c) for r, c in _runs(fx).items() if c["detector"])
    chosen = [x for x in image_files if x[0] in cfg["images"]]
    refs = [ref for _, _, ref in chosen]
    topk, scales, bucket = cfg["topk"], cfg["scales"], 192
    buckets: dict = {}
    for name, split, _ in chosen:
        for x in cvnet_scales(_image(fx, name, split), scales):
            buckets.setdefault(batching.bucket_hw(*x.shape[:2], bucket), set()).add(x.shape)
    assert any(len(v) > 1 for v in buckets.values()), "no bucket mixes sizes: change `bucket`"

    kw = dict(detector=det, topk=topk, scales=scales, batch_size=2, bucket=bucket,
              dtype=np.float32, chunk_size=3)
    cache_dir = tmp_path / "cache"
    got = local.extract_local(model, refs, cache=cache_dir, **kw)
    assert len(got) == len(refs) and got.desc.dtype == np.float32
    for i, (name, _, _) in enumerate(chosen):
        n = int(fx[f"{run}/{name}/seq_len"])
        assert int(got.length[i]) == n
        compare_rows(got.rows(i), rows(seed, run, name), n, True, f"batched vs one {name}")
        compare_rows(got.rows(i), fx[f"{run}/{name}/rows"], n, True, f"batched {name}")
        np.testing.assert_array_equal(got.mask[i], np.arange(topk) >= n)
    np.testing.assert_array_equal(got.rows(), np.stack([got.rows(i) for i in range(len(got))]))

    class NoModel:   # what the cache key needs, nothing to compute with
        def __getattr__(self, name):
            if name in ("variables", "module", "arch"):
                return getattr(model, name)
            raise AssertionError(f"the model was used ({name}) although every chunk is cached")

    again = local.extract_local(NoModel(), refs, cache=cache_dir, **kw)
    for f in ("desc", "weight", "yx", "scale", "length"):
        np.testing.assert_array_equal(getattr(again, f), getattr(got, f), err_msg=f)
    (cached,) = cache_dir.iterdir()
    assert len(list(cached.glob("chunk_*.npz"))) == -(-len(refs) // 3)
    with pytest.raises(InputError, match="cache's key"):
        local.extract_local(model, refs, cache=ChunkCache(tmp_path, "x", {}, 3), **kw)


MULTI_DEVICE = r"""
import json, sys
import jax, numpy as np
import scvnet_jax as sj
from scvnet_jax import mesh as mesh_lib
from scvnet_jax.engine import local
from scvnet_jax.images import ImageRef
args = json.loads(sys.argv[1])
refs = [ImageRef(p, tuple(b) if b else None) for p, b in args["refs"]]
model = sj.load(args["model"])
assert model.num_devices == 8
one = model.with_mesh(mesh_lib.make_mesh(jax.local_devices()[:1]))
rng = np.random.default_rng(0)
c = model.arch.local_dim
sd = {"conv1.weight": rng.normal(0, c ** -0.5, (c, c, 1, 1)),
      "conv1.bias": rng.normal(0, 0.05, c),
      "bn.weight": rng.uniform(0.5, 1, c), "bn.bias": rng.normal(0, 0.05, c),
      "bn.running_mean": rng.normal(0, 0.1, c), "bn.running_var": rng.uniform(0.5, 1.5, c),
      "conv2.weight": rng.normal(0, c ** -0.5, (1, c, 1, 1)), "conv2.bias": np.zeros(1)}
det = local.detector_from_state_dict({k: v.astype(np.float32) for k, v in sd.items()}, c)
kw = dict(detector=det, topk=args["topk"], bucket=args["bucket"])
a = local.extract_local(model, refs, batch_size=1, **kw)                     # float16
b = local.extract_local(one, refs, batch_size=8, dtype=np.float32, **kw)
for f in ("weight", "yx", "scale", "length"):
    np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)
assert a.desc.dtype == np.float16
np.testing.assert_allclose(a.desc.astype(np.float32), b.desc, rtol=1e-3, atol=1e-6)
print("ok", a.length.tolist())
"""


@pytest.mark.slow   # the everyday loop (-m 'not slow') stays within 4 minutes
def test_extract_local_on_8_devices(tiny_model_dir, image_files, fake_devices_env, repo):
    """8 (fake CPU) devices, each batch split over them, give the rows of one device (the
    tiny model and a random detector of its 128 channels); float16 descriptors by default."""
    side = max(max(cv2.imread(ref.path).shape[:2]) for _, _, ref in image_files)
    args = {"model": str(tiny_model_dir), "topk": 60,
            "bucket": -(-int(side * 1.4143) // 32) * 32,          # one bucket
            "refs": [(ref.path, ref.bbx) for _, _, ref in image_files]}
    r = subprocess.run([sys.executable, "-c", MULTI_DEVICE, json.dumps(args)],
                       env=fake_devices_env(8), cwd=repo, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
