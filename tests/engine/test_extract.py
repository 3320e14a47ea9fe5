"""The retrieval engine on many devices and processes: extraction, local features, CVNet
verification and ranking give the same results on 8 (fake CPU) devices as on 1, and with
2 processes x 4 devices (jax.distributed on localhost) as with one process. The tiny
model on small photographs: splitting work over devices depends on neither."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = r"""
import json, sys
from pathlib import Path
import jax, numpy as np
args = json.loads(sys.argv[1])
if args["processes"] > 1:
    jax.distributed.initialize(args["coordinator"], args["processes"], args["process_id"])
import scvnet_jax as sj
from scvnet_jax import mesh as mesh_lib
from scvnet_jax.engine import extract, search, verify
from scvnet_jax.images import ImageRef

refs = [ImageRef(p) for p in args["images"]]
model = sj.load(args["weights"])
if args["devices"] == 1:
    model = model.with_mesh(mesh_lib.make_mesh(jax.local_devices()[:1]))
assert model.num_devices == args["devices"], model.num_devices
out = {}
for family in ("cvnet", "superglobal"):
    out[family] = extract.extract(model, refs, extract.spec_of(family), batch_size=2,
                                  bucket=256, chunk_size=3)
sim, ranks = search.rank(out["cvnet"], out["cvnet"][:4])
cand = [ranks[:5, i] for i in range(4)]
out["scores"] = verify.verification_scores(model, refs[:4], refs, cand, batch_size=2,
                                           bucket=256, feature_bucket=4, key_chunk=2)
out["ranks"] = ranks
# the photo indexer on the same 14 images: same chunks, batches and buckets, no new programs
index, stats = sj.search.update_index(model, args["folder"], args["index"], family="cvnet",
                                      dtype="float32", backend="exact", chunk_size=3,
                                      batch_size=2, bucket=256)
root = Path(args["folder"]).resolve()
out["index_descriptors"] = index.descriptors
out["index_paths"] = np.array([str(Path(p).relative_to(root)) for p in index.paths])
out["index_digests"] = np.array(index.digests)
out["index_extracted"] = np.array(stats["extracted"])
print("stats", json.dumps({k: v for k, v in stats.items() if k != "seconds"}, sort_keys=True))
if jax.process_index() == 0:
    np.savez(args["out"], **out)
print("ok", jax.process_index(), jax.device_count())
"""


@pytest.fixture(scope="module")
def images(demo_benchmark):
    """14 demo photographs of 160 px and their 3 scales: one size bucket, so each program
    compiles once per device layout."""
    return sorted(str(p) for p in (demo_benchmark / "demo" / "jpg").glob("*.jpg"))[:14]


def _photos(folder, images):
    """A folder of links to exactly `images` (the demo folder holds others too)."""
    folder.mkdir()
    for p in images:
        (folder / Path(p).name).symlink_to(p)
    return str(folder)


def _run(args, env, repo):
    return subprocess.Popen([sys.executable, "-c", SCRIPT, json.dumps(args)], env=env,
                            cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _load(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _same(a, b):
    for family in ("cvnet", "superglobal"):
        np.testing.assert_allclose(a[family], b[family], atol=2e-6, err_msg=family)
    np.testing.assert_array_equal(a["ranks"], b["ranks"])
    assert np.array_equal(np.isnan(a["scores"]), np.isnan(b["scores"]))
    np.testing.assert_allclose(a["scores"], b["scores"], atol=2e-6, equal_nan=True)
    assert a["index_paths"].tolist() == b["index_paths"].tolist()
    assert a["index_digests"].tolist() == b["index_digests"].tolist()
    np.testing.assert_allclose(a["index_descriptors"], b["index_descriptors"], atol=2e-6)
    assert int(a["index_extracted"]) == int(b["index_extracted"]) == 14


@pytest.fixture(scope="module")
def one_device(tmp_path_factory, images, tiny_model_dir, fake_devices_env, repo):
    tmp = tmp_path_factory.mktemp("one")
    out = tmp / "one.npz"
    p = _run(dict(processes=1, devices=1, images=images, weights=str(tiny_model_dir),
                  out=str(out), folder=_photos(tmp / "photos", images),
                  index=str(tmp / "photos.index")), fake_devices_env(8), repo)
    assert p.wait(timeout=900) == 0, p.stdout.read()[-3000:]
    return _load(out)


@pytest.mark.slow   # the everyday loop (-m 'not slow') stays within 4 minutes
def test_eight_devices_equal_one(one_device, tmp_path, images, tiny_model_dir,
                                 fake_devices_env, repo):
    out = tmp_path / "eight.npz"
    p = _run(dict(processes=1, devices=8, images=images, weights=str(tiny_model_dir),
                  out=str(out), folder=_photos(tmp_path / "photos", images),
                  index=str(tmp_path / "photos.index")), fake_devices_env(8), repo)
    assert p.wait(timeout=900) == 0, p.stdout.read()[-3000:]
    _same(_load(out), one_device)
    assert np.isfinite(one_device["scores"]).sum() == 4 * 5


@pytest.mark.slow
def test_two_processes_equal_one(one_device, tmp_path, images, tiny_model_dir,
                                 fake_devices_env, repo, free_port):
    """Each process extracts its chunks (chunk i on process i % 2) and scores its share of
    the candidates on its 4 devices; all gather everything."""
    out = tmp_path / "two.npz"
    coordinator = f"localhost:{free_port()}"
    folder, index = _photos(tmp_path / "photos", images), tmp_path / "photos.index"
    procs = [_run(dict(processes=2, process_id=i, coordinator=coordinator, devices=4,
                       images=images, weights=str(tiny_model_dir), out=str(out),
                       folder=folder, index=str(index)),
                  fake_devices_env(4), repo) for i in (0, 1)]
    codes = [p.wait(timeout=900) for p in procs]
    logs = [p.stdout.read() for p in procs]
    assert codes == [0, 0], "\n".join(x[-3000:] for x in logs)
    assert all("ok" in x and x.strip().endswith(" 8") for x in logs), logs
    _same(_load(out), one_device)
    # the index: written once (by process 0), its parts removed, the same stats everywhere
    stats = [[ln for ln in x.splitlines() if ln.startswith("stats ")] for x in logs]
    assert len(stats[0]) == 1 and stats[0] == stats[1], stats
    assert json.loads(stats[0][0][len("stats "):])["extracted"] == 14
    assert index.is_file() and not (tmp_path / "photos.index.parts").exists()


@pytest.mark.slow   # ~40 s cold: SuperGlobal's three-backbone programs per image for the reference
def test_superglobal_scales_as_items_equal_the_model(tiny_model):
    """The engine's SuperGlobal (each scale resized on the host and padded as its own item,
    auto shapes) gives each image's `superglobal_descriptor` computed alone, normalised,
    with S-GeM and without it."""
    from tqdm import tqdm

    from scvnet_jax.data import batching
    from scvnet_jax.engine import extract
    from scvnet_jax.images import normalize

    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
              for h, w in [(61, 90), (96, 64), (75, 75), (40, 110)]]
    for sgem in (True, False):
        spec = extract.SuperGlobal(sgem=sgem)
        with tqdm(disable=True) as bar:
            got = extract.describe_images(tiny_model, images, spec, 0, batching.AUTO, bar)
        for im, g in zip(images, got):
            d = np.asarray(tiny_model.superglobal_descriptor(normalize(im)[None], sgem=sgem))[0]
            np.testing.assert_allclose(g, d / np.linalg.norm(d), rtol=0, atol=2e-6)
