"""scvnet_jax.search on a few demo-benchmark images with the bundled demo model."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

import scvnet_jax as sj
from scvnet_jax.errors import InputError


@pytest.fixture(scope="module")
def folder(tmp_path_factory, demo_benchmark):
    bench = demo_benchmark / "demo"
    out = tmp_path_factory.mktemp("photos")
    names = sorted(p.name for p in (bench / "jpg").glob("astronaut_r0c*"))[:10]
    names += sorted(p.name for p in (bench / "jpg").glob("coins_r1c1*"))[:4]
    for i, n in enumerate(names):
        sub = out / ("a" if i % 2 else "b")      # nested folders are indexed too
        sub.mkdir(exist_ok=True)
        shutil.copy(bench / "jpg" / n, sub / n)
    (out / "notes.txt").write_text("not an image")
    return out


@pytest.fixture(scope="module")
def model():
    return sj.load(sj.demo_model_path())


def test_list_images_and_its_errors(folder, tmp_path):
    paths = sj.search.list_images(folder)
    assert len(paths) == 14 and all(p.suffix == ".jpg" for p in paths)
    assert paths == sorted(paths)
    with pytest.raises(InputError, match="not a folder"):
        sj.search.list_images(tmp_path / "missing")
    with pytest.raises(InputError, match="no images"):
        sj.search.list_images(tmp_path)


@pytest.mark.parametrize("family", ["cvnet", "superglobal"])
def test_index_search_save_load(folder, model, tmp_path, family):
    index = sj.search.index_folder(model, folder, family)
    assert index.descriptors.shape == (14, 256)
    np.testing.assert_allclose(np.linalg.norm(index.descriptors, axis=1), 1, atol=1e-5)
    query = index.paths[3]
    for rerank in (None, "superglobal", "cvnet"):
        hits = index.search(model, [query], k=5, rerank=rerank, rerank_k=6)[0]
        assert len(hits) == 5 and hits[0].path == query    # an image finds itself first
        assert hits[0].score == pytest.approx(1.0, abs=1e-4)
    saved = sj.search.Index.load(index.save(tmp_path / "x.npz"))
    assert saved.paths == index.paths and saved.family == family
    np.testing.assert_array_equal(saved.descriptors, index.descriptors)
    grid = sj.search.result_grid(query, hits)
    assert grid.dtype == np.uint8 and grid.ndim == 3 and grid.shape[1] > grid.shape[0]


def test_load_rejects_other_files(tmp_path):
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(InputError, match="cannot read the search index"):
        sj.search.Index.load(tmp_path / "other.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(InputError, match="junk.npz"):
        sj.search.Index.load(tmp_path / "junk.npz")
