"""scvnet_jax.search on a few demo-benchmark images with the bundled demo model."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest

import scvnet_jax as sj
from scvnet_jax import images
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


@pytest.fixture(scope="module")
def csa_weights(tmp_path_factory):
    """A randomly initialised CSA (8 anchors) saved as a model directory."""
    from scvnet_jax.models import csa
    arch = csa.CSAArch(anchor_len=8, embed_dim=16, depth=1, num_heads=2)
    out = tmp_path_factory.mktemp("csa") / "model"
    return sj.rerank.csa.CSA(arch, csa.init(arch, 0)).save(out)


@pytest.fixture(scope="module")
def ames_weights(tmp_path_factory):
    """A randomly initialised AMES on the demo model's 256-d local features (16 query and
    8 database descriptors) saved as a model directory."""
    from scvnet_jax.models.ames import AMESArch, init
    arch = AMESArch(local_dim=256, model_dim=16, nhead=2, num_encoder_layers=1,
                    dim_feedforward=32)
    out = tmp_path_factory.mktemp("ames") / "model"
    return sj.rerank.ames.AMES(arch, init(arch, 0)).save(
        out, meta={"descriptors": {"query_len": 16, "db_len": 8}})


@pytest.mark.slow   # the everyday loop (-m 'not slow') stays within 4 minutes
@pytest.mark.parametrize("family", ["cvnet", "superglobal"])
def test_index_search_save_load(folder, model, tmp_path, family, csa_weights, ames_weights,
                                monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))    # AMES's token store
    index = sj.search.index_folder(model, folder, family)
    assert index.descriptors.shape == (14, 256)
    np.testing.assert_allclose(np.linalg.norm(index.descriptors, axis=1), 1, atol=1e-5)
    query = index.paths[3]
    options = {"csa": {"weights": str(csa_weights)}, "icfrr": {"KG": 5, "KQ": 3},
               "ames": {"weights": str(ames_weights)}}
    for rerank in (None, *sj.rerank.registry.names()):
        hits = index.search(model, query, k=5, rerank=rerank, rerank_k=3,
                            options=options.get(rerank))[0]
        assert len(hits) == 5
        if rerank is None:                                 # cosine 1: itself first
            assert hits[0].path == query
        elif rerank != "csa":                              # (random CSA weights)
            assert query in [h.path for h in hits], rerank
        assert len({h.path for h in hits}) == 5
        scores = [h.score for h in hits]                   # the scores ranked by
        assert scores == sorted(scores, reverse=True), (rerank, scores)
        if rerank is None:
            assert hits[0].score == pytest.approx(1.0, abs=1e-4)
        if rerank == "ames":    # the top 5 (k >= hits) re-sorted by 0.85 x sim + 0.15 x
            plain = {h.path: h.score for h in index.search(model, query, k=5)[0]}  # sigmoid
            assert {h.path for h in hits} == set(plain)
            assert all(0.85 * plain[h.path] - 1e-5 <= h.score <= 0.85 * plain[h.path] + 0.15
                       for h in hits)
            assert list((tmp_path / "xdg" / "scvnet_jax").glob("ames-tokens-*/*.npz"))
        if rerank == "cvnet":   # sim + 0.5 x verification in the top 3, sim below
            plain = {h.path: h.score for h in index.search(model, query, k=5)[0]}
            assert all(h.score >= plain[h.path] for h in hits[:3])
            assert all(h.score == plain[h.path] for h in hits[3:])
    assert all(Path(p).is_absolute() for p in index.paths)
    assert index.root == str(Path(folder).resolve())
    saved = sj.search.Index.load(index.save(tmp_path / "x.npz"))
    assert saved.paths == index.paths and saved.family == family
    np.testing.assert_array_equal(saved.descriptors, index.descriptors)
    grid = sj.search.result_grid(query, hits)
    assert grid.dtype == np.uint8 and grid.ndim == 3 and grid.shape[1] > grid.shape[0]


def test_load_rejects_other_files(tmp_path):
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(InputError, match="other.npz: not a scvnet_jax search index"):
        sj.search.Index.load(tmp_path / "other.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(InputError, match="junk.npz"):
        sj.search.Index.load(tmp_path / "junk.npz")


def test_index_skips_bad_files_when_asked(folder, model, tmp_path, capsys):
    photos = tmp_path / "photos"
    shutil.copytree(folder, photos)
    good = sj.search.list_images(photos)
    bad = photos / "a" / "broken.jpg"
    bad.write_bytes(good[0].read_bytes()[:300])                     # truncated
    (photos / "b" / "empty.png").write_bytes(b"")
    with pytest.raises(InputError, match="cannot read the image"):
        sj.search.index_folder(model, photos)                       # on_error="raise"
    index = sj.search.index_folder(model, photos, on_error="skip")
    assert len(index) == len(good)
    assert sorted(Path(p).name for p, _ in index.skipped) == ["broken.jpg", "empty.png"]
    err = capsys.readouterr().err
    assert "skipped: " in err and "broken.jpg: cannot read the image" in err
    assert "empty.png: cannot read the image" in err
    with pytest.raises(InputError, match="on_error must be one of"):
        sj.search.index_folder(model, photos, on_error="ignore")


def test_search_checks_its_arguments(folder, model, tmp_path):
    index = sj.search.Index([str(p) for p in sj.search.list_images(folder)],
                            np.eye(14, 256, dtype=np.float32), "cvnet", str(folder))
    q = index.paths[0]
    for k in (0, -1, 2.5, "3", True):
        with pytest.raises(InputError, match="k must be an integer >= 1"):
            index.search(model, q, k=k)
    with pytest.raises(InputError, match="rerank must be None or one of superglobal, cvnet"):
        index.search(model, q, rerank="nope")
    with pytest.raises(InputError, match="reranker alpha_qe: unknown option 'K'"):
        index.search(model, q, rerank="alpha_qe", options={"K": 3})
    with pytest.raises(InputError, match="nope.jpg: query image not found"):
        index.search(model, [q, str(tmp_path / "nope.jpg")])
    with pytest.raises(InputError, match="queries must be an image path or a non-empty list"):
        index.search(model, [])
    broken = tmp_path / "q.jpg"
    broken.write_bytes(Path(q).read_bytes()[:200])
    with pytest.raises(InputError, match="q.jpg: cannot read the image"):
        index.search(model, broken)


def test_a_moved_collection_is_rerooted(folder, tmp_path):
    paths = [str(p) for p in sj.search.list_images(folder)]
    index = sj.search.Index(paths, np.zeros((len(paths), 4), np.float32), "cvnet",
                            str(Path(folder).resolve()))
    saved = index.save(tmp_path / "i.npz")
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)
    again = sj.search.Index.load(saved, root=moved)
    assert again.root == str(moved.resolve())
    assert all(Path(p).is_file() and str(moved.resolve()) in p for p in again.paths)
    assert [Path(p).relative_to(moved.resolve()) for p in again.paths] == \
        [Path(p).relative_to(Path(folder).resolve()) for p in paths]


@pytest.mark.parametrize("damage", ["truncated", "shape"])
def test_damaged_index_is_one_input_error(folder, tmp_path, damage):
    paths = [str(p) for p in sj.search.list_images(folder)]
    saved = sj.search.Index(paths, np.zeros((len(paths), 4), np.float32)).save(
        tmp_path / "i.npz")
    if damage == "truncated":
        data = saved.read_bytes()
        saved.write_bytes(data[:len(data) // 2])
    else:
        with np.load(saved) as z:
            arrays = dict(z)
        arrays["descriptors"] = arrays["descriptors"][:3]
        np.savez(saved, **arrays)
    with pytest.raises(InputError, match="i.npz: .*damaged"):
        sj.search.Index.load(saved)


def _count_extracted(monkeypatch) -> list:
    """Records the number of images each describe_images call gets."""
    from scvnet_jax.engine import extract
    calls, real = [], extract.describe_images

    def counting(model, images, *a, **k):
        calls.append(len(images))
        return real(model, images, *a, **k)
    monkeypatch.setattr(extract, "describe_images", counting)
    return calls


def test_update_index_is_incremental_and_content_keyed(folder, model, tmp_path, monkeypatch):
    """A rerun extracts nothing; a changed photo (same name, other content) and a new one
    are extracted, a deleted one is dropped, a renamed one is not extracted again; the
    result equals a fresh index of the folder (float16 of index_folder's descriptors)."""
    photos = tmp_path / "photos"
    shutil.copytree(folder, photos)
    path = tmp_path / "photos.index"
    calls = _count_extracted(monkeypatch)
    index, stats = sj.search.update_index(model, photos, path, weights="demo")
    assert (stats["extracted"], stats["reused"], stats["indexed"]) == (14, 0, 14)
    assert index.descriptors.dtype == np.float16 and sum(calls) == 14
    fresh = sj.search.index_folder(model, photos)
    assert index.paths == fresh.paths and index.digests == fresh.digests
    np.testing.assert_allclose(index.descriptors.astype(np.float32), fresh.descriptors,
                               atol=1e-3)
    calls.clear()
    again, stats = sj.search.update_index(model, photos, path)
    assert calls == [] and (stats["extracted"], stats["reused"]) == (0, 14)
    np.testing.assert_array_equal(again.descriptors, index.descriptors)

    import cv2
    paths = sj.search.list_images(photos)
    cv2.imwrite(str(paths[0]), cv2.imread(str(paths[0]))[:, ::-1])   # same name, new content
    paths[1].unlink()                                                # deleted
    paths[2].rename(paths[2].with_name("renamed.jpg"))               # moved, same content
    shutil.copy(paths[3], photos / "copy.jpg")                       # a copy, same content
    (photos / "new").mkdir()
    cv2.imwrite(str(photos / "new" / "flipped.png"), cv2.imread(str(paths[4]))[::-1])
    calls.clear()
    updated, stats = sj.search.update_index(model, photos, path)
    assert sum(calls) == 2 and stats["extracted"] == 2       # the changed and the new one
    assert stats["removed"] == 2 and stats["indexed"] == 15  # the deleted and renamed names
    fresh = sj.search.index_folder(model, photos)
    assert updated.paths == fresh.paths and updated.digests == fresh.digests
    np.testing.assert_allclose(updated.descriptors.astype(np.float32), fresh.descriptors,
                               atol=1e-3)
    saved = sj.search.Index.load(path)
    assert saved.paths == updated.paths and saved.weights == "demo"
    np.testing.assert_array_equal(saved.descriptors, updated.descriptors)


def test_update_index_resumes_from_its_finished_chunks(folder, model, tmp_path, monkeypatch):
    """Interrupted after two chunks of 4: the rerun extracts only the other 6 images, ends
    with the uninterrupted index and removes its parts."""
    path = tmp_path / "i.index"
    ref, _ = sj.search.update_index(model, folder, tmp_path / "ref.index", chunk_size=4)
    from scvnet_jax.engine import extract
    real, calls = extract.describe_images, []

    def dies(model, images, *a, **k):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(len(images))
        return real(model, images, *a, **k)
    monkeypatch.setattr(extract, "describe_images", dies)
    with pytest.raises(KeyboardInterrupt):
        sj.search.update_index(model, folder, path, chunk_size=4)
    assert not path.exists()
    assert len(list((tmp_path / "i.index.parts").glob("chunk_*.npz"))) == 2
    monkeypatch.undo()
    calls = _count_extracted(monkeypatch)
    index, stats = sj.search.update_index(model, folder, path, chunk_size=4)
    assert sum(calls) == 6 and (stats["reused"], stats["extracted"]) == (8, 6)
    assert index.paths == ref.paths
    np.testing.assert_array_equal(index.descriptors, ref.descriptors)
    assert not (tmp_path / "i.index.parts").exists()


def test_update_index_refusals(folder, model, tmp_path, capsys):
    """Never overwrites what is not an index; another model, family or dtype needs
    rebuild; bad photos are skipped and listed (or stop the run with on_error='raise')."""
    other = tmp_path / "notes.index"
    other.write_text("my notes")
    with pytest.raises(InputError, match="notes.index: cannot read the search index"):
        sj.search.update_index(model, folder, other)
    assert other.read_text() == "my notes"
    with pytest.raises(InputError, match="is a folder"):
        sj.search.update_index(model, folder, tmp_path)
    with pytest.raises(InputError, match="dtype must be one of"):
        sj.search.update_index(model, folder, tmp_path / "x.index", dtype="int8")
    path = tmp_path / "i.index"
    sj.search.update_index(model, folder, path)
    with pytest.raises(InputError, match="i.index: built with another model, descriptor "
                                         "family, dtype or working size .*family cvnet, "
                                         "float16, max_side 1024"):
        sj.search.update_index(model, folder, path, dtype="float32")
    try:        # read at another working size: other descriptors
        images.set_max_side(100)
        with pytest.raises(InputError, match="working size .*max_side 1024"):
            sj.search.update_index(model, folder, path)
    finally:
        images.set_max_side(images.DEFAULT_MAX_SIDE)
    index, stats = sj.search.update_index(model, folder, path, dtype="float32", rebuild=True)
    assert index.descriptors.dtype == np.float32 and stats["extracted"] == 14

    photos = tmp_path / "photos"
    shutil.copytree(folder, photos)
    good = sj.search.list_images(photos)
    (photos / "a" / "broken.jpg").write_bytes(good[0].read_bytes()[:300])
    with pytest.raises(InputError, match="broken.jpg: cannot read the image"):
        sj.search.update_index(model, photos, tmp_path / "p.index", on_error="raise")
    index, stats = sj.search.update_index(model, photos, tmp_path / "p.index")
    assert stats["skipped"] == 1 and len(index) == len(good)
    assert [Path(p).name for p, _ in index.skipped] == ["broken.jpg"]
    assert "skipped: " in capsys.readouterr().err
    assert sj.search.Index.load(tmp_path / "p.index").skipped == index.skipped


def test_search_regions_merges_by_the_best_score(folder, model):
    """The whole image (three scales, as indexed) and each proposed region (one scale,
    `REGION_SCALES`) are searched; each image's merged score is its best over those lists;
    a box searches that crop; region_scales describes the regions otherwise."""
    index = sj.search.index_folder(model, folder)
    query = index.paths[5]
    hits, found = index.search_regions(model, query, k=6, regions=2)
    assert 1 <= len(found) <= 2 and len(hits) == 6
    im = sj.search.read_image(query)
    assert all(0 <= x1 < x2 <= im.shape[1] and 0 <= y1 < y2 <= im.shape[0]
               for x1, y1, x2, y2 in found)
    assert sj.search.REGION_SCALES["cvnet"] == (1.0,)

    def merged(region_scales):
        lists = index.search(model, query, k=6) + index.search(
            model, [query] * len(found), k=6, boxes=found, scales=region_scales)
        best = {}
        for hs in lists:
            for h in hs:
                best[h.path] = max(best.get(h.path, -1.0), h.score)
        return best

    best = merged((1.0,))
    assert [h.path for h in hits] == sorted(best, key=lambda p: -best[p])[:6]
    assert all(h.score == best[h.path] for h in hits)
    three = (0.7071, 1.0, 1.4142)
    hits3, found3 = index.search_regions(model, query, k=6, regions=2, region_scales=three)
    best3 = merged(three)
    assert found3 == found and best3 != best
    assert [(h.path, h.score) for h in hits3] == sorted(best3.items(), key=lambda x: -x[1])[:6]
    box = found[0]
    (crop,) = index.search(model, query, k=3, boxes=[box])
    assert crop != index.search(model, query, k=3)[0]
    with pytest.raises(InputError, match="expected four numbers"):
        index.search(model, query, boxes=[(1, 2, 3)])


def test_exif_rotated_photos_are_indexed_and_searched_upright(folder, model, tmp_path):
    """A phone photo stored sideways with EXIF orientation 6 or 8 (refused as corrupt
    before) is indexed as shown: it finds, and is found by, the same view stored upright."""
    from PIL import Image
    photos = tmp_path / "photos"
    shutil.copytree(folder, photos)
    upright = sorted(photos.rglob("*.jpg"))[3]
    im = Image.open(upright)
    for orientation, turn in ((6, Image.Transpose.ROTATE_90), (8, Image.Transpose.ROTATE_270)):
        exif = Image.Exif()
        exif[0x0112] = orientation           # stored turned back: shown as `upright`
        im.transpose(turn).save(photos / f"phone_{orientation}.jpg", exif=exif, quality=95)
    index, stats = sj.search.update_index(model, photos, tmp_path / "p.index")
    assert stats["skipped"] == 0 and len(index) == 16
    hits = index.search(model, upright, k=3)[0]
    assert {Path(h.path).name for h in hits} == {upright.name, "phone_6.jpg", "phone_8.jpg"}
    assert min(h.score for h in hits) > 0.97
    (top,) = index.search(model, photos / "phone_6.jpg", k=3)
    assert upright.name in {Path(h.path).name for h in top}


def test_regions_of_an_image_read_reduced_are_in_its_full_pixels(folder, model):
    """At a working size below the image's, proposed regions come back in the full image's
    pixels (the ones boxes are given in)."""
    index = sj.search.index_folder(model, folder)
    query = index.paths[5]
    h, w = sj.search.read_image(query).shape[:2]
    try:
        images.set_max_side(max(h, w) // 2)
        assert max(sj.search.read_image(query).shape[:2]) == max(h, w) // 2
        _, found = index.search_regions(model, query, k=3, regions=3)
        box = (w // 4, h // 4, w, h)
        _, in_box = index.search_regions(model, query, k=3, regions=2, box=box)
    finally:
        images.set_max_side(images.DEFAULT_MAX_SIDE)
    assert found and all(0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h for x1, y1, x2, y2 in found)
    assert max(max(x2, y2) for _, _, x2, y2 in found) > max(h, w) // 2
    assert in_box and all(w // 4 <= x1 < x2 <= w and h // 4 <= y1 < y2 <= h
                          for x1, y1, x2, y2 in in_box)


@pytest.mark.parametrize("scales", ["1.0", (), (1.0, -2.0), (float("nan"),), 3, [[1.0]]])
def test_bad_descriptor_scales_are_one_error(folder, model, scales):
    """Query and region scales are checked before any image is read or described."""
    query = sorted(folder.rglob("*.jpg"))[0]
    index = sj.search.Index([str(query)], np.ones((1, 256), np.float32), "cvnet")
    for call in (lambda: index.search(model, query, scales=scales),
                 lambda: index.search_regions(model, query, region_scales=scales),
                 lambda: sj.search.describe(model, [query], "cvnet", scales=scales)):
        with pytest.raises(InputError, match="expected positive scale factors"):
            call()
    sg = dataclasses.replace(index, family="superglobal")
    with pytest.raises(InputError, match="or 1, 3, 5"):
        sg.search(model, query, scales=(0.0,))


def test_a_repeated_region_query_compiles_nothing(folder, model):
    """After the first query of its sizes, a region query with SuperGlobal reranking (as
    the app serves it) runs on compiled programs only."""
    from jax._src import dispatch, monitoring

    index = sj.search.index_folder(model, folder)
    query, compiled, counting = index.paths[3], [], []
    monitoring.register_event_duration_secs_listener(
        lambda e, s, **k: compiled.append(e) if counting and
        e == dispatch.BACKEND_COMPILE_EVENT else None)
    first = index.search_regions(model, query, k=4, regions=2, rerank="superglobal")
    counting.append(True)
    again = index.search_regions(model, query, k=4, regions=2, rerank="superglobal")
    counting.clear()
    assert again == first and compiled == []


def test_faiss_inside_the_index_and_shortlist_search(folder, model, tmp_path):
    """A faiss index is stored inside the index file with its recall@10; with the exact
    faiss kind and a shortlist of everything, search and reranking through the shortlist
    (registry.from_candidates) equal the exact engine's; an unchanged rerun keeps it."""
    path = tmp_path / "f.index"
    index, stats = sj.search.update_index(model, folder, path, backend="faiss",
                                          faiss_kind="flat")
    assert stats["backend"] == "faiss flat" and stats["recall_at_10"] == 1.0
    loaded = sj.search.Index.load(path)
    assert loaded.backend.name == "faiss" and loaded.backend.kind == "flat"
    assert loaded.recall_at_10 == 1.0
    exact = loaded.with_backend("exact")
    assert exact.backend is None
    query = loaded.paths[4]
    for rerank, options in ((None, None), ("alpha_qe", {"k": 2}), ("superglobal", None)):
        a = loaded.search(model, query, k=6, rerank=rerank, options=options)[0]
        b = exact.search(model, query, k=6, rerank=rerank, options=options)[0]
        assert [h.path for h in a] == [h.path for h in b], rerank
        np.testing.assert_allclose([h.score for h in a], [h.score for h in b], atol=1e-5)
    short = loaded.search(model, query, k=3, shortlist=5, rerank="alpha_qe",
                          options={"k": 2})[0]
    assert len(short) == 3
    _, stats = sj.search.update_index(model, folder, path, backend="faiss", faiss_kind="flat")
    assert stats["extracted"] == 0 and stats["recall_at_10"] == 1.0
    with pytest.raises(InputError, match="backend must be auto, exact or faiss"):
        sj.search.update_index(model, folder, path, backend="annoy")


def test_rebuild_re_extracts_everything(folder, model, tmp_path, monkeypatch):
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in sj.search.list_images(folder)[:3]:
        shutil.copy(p, photos / p.name)
    path = tmp_path / "i.index"
    sj.search.update_index(model, photos, path)
    calls = _count_extracted(monkeypatch)
    index, stats = sj.search.update_index(model, photos, path, rebuild=True)
    assert sum(calls) == 3 and (stats["extracted"], stats["reused"]) == (3, 0)
    assert len(index) == 3 and not (tmp_path / "i.index.parts").exists()


def test_an_unwritable_destination_is_refused_before_extraction(folder, model, tmp_path,
                                                               monkeypatch):
    """Tests run as root, where permission bits do not stop writes: the folder of the index
    is a regular file (fails for root too), then a full disk (the probe's fsync fails with
    ENOSPC), then the disk fills after the probe (a chunk cannot be written): refused with
    one error, no extraction for the first two and no empty .parts folder left."""
    import errno
    import os

    from scvnet_jax import files
    from scvnet_jax.engine import extract
    from scvnet_jax.errors import OutputError
    calls = _count_extracted(monkeypatch)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match="afile/i.index: cannot write the index in"):
        sj.search.update_index(model, folder, tmp_path / "afile" / "i.index")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputError, match="i.index: cannot write the index in .*No space"):
        sj.search.update_index(model, folder, tmp_path / "i.index")
    assert calls == [] and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
    monkeypatch.undo()
    monkeypatch.setattr(files.tempfile, "mkstemp", full)
    monkeypatch.setattr(extract, "describe_images",
                        lambda model, images, *a, **k: np.zeros((len(images), 256)))
    with pytest.raises(OutputError, match="chunk_.*No space"):
        sj.search.update_index(model, folder, tmp_path / "i.index")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_a_text_file_is_not_an_index(tmp_path):
    (tmp_path / "notes.txt").write_text("my notes\n")
    with pytest.raises(InputError) as e:
        sj.search.Index.load(tmp_path / "notes.txt")
    assert "pickle" not in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith(f"{tmp_path / 'notes.txt'}: cannot read the search index")


def test_rerankers_without_their_weights_are_refused_before_extraction(folder, model,
                                                                      monkeypatch):
    from scvnet_jax.engine import extract

    def no(*a, **k):
        raise AssertionError("an image was described")
    monkeypatch.setattr(extract, "extract", no)
    query = sj.search.list_images(folder)[0]
    index = sj.search.Index([str(query)], np.ones((1, 256), np.float32), "cvnet")
    for name in ("ames", "csa"):
        with pytest.raises(InputError, match=f"rerank {name} needs weights: options"):
            index.search(model, query, rerank=name)


def _unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_duplicates_are_the_connected_groups_above_the_threshold():
    """Planted near-copies group with their original; a chain a-b-c is one group whose
    weakest link is the lower of its two links; files of one content digest group whatever
    their descriptors; more copies than k still make one group; faiss finds the same."""
    rng = np.random.default_rng(0)
    base = _unit(rng.standard_normal((40, 64)))         # 40 unrelated photos (cosine ~0)
    noise = lambda v, s: _unit(v + s * rng.standard_normal(v.shape))  # noqa: E731
    a = base[0]
    b = noise(a, 0.05)
    c = noise(b, 0.05)                                 # a-b and b-c close, a-c less so
    copies = [base[1]] * 14                            # 15 copies of photo 1 (k = 10)
    X = np.concatenate([base, [b, c], copies])
    paths = [f"/p/{i}.jpg" for i in range(len(X))]
    digests = [f"d{i}" for i in range(len(X))]
    digests[2] = digests[3] = "same-bytes"             # one content, other descriptors
    index = sj.search.Index(paths, X.astype(np.float16), "cvnet", digests=digests)
    sim = lambda i, j: float(np.dot(X[i].astype(np.float16).astype(np.float32),  # noqa: E731
                                    X[j].astype(np.float16).astype(np.float32)))
    t = min(sim(0, 40), sim(40, 41)) - 1e-3
    assert sim(0, 41) < t      # the chain's ends alone would not be linked
    groups = index.duplicates(t, k=10)
    got = sorted(sorted(g.ids) for g in groups)
    assert got == sorted([[0, 40, 41], [1] + list(range(42, 56)), [2, 3]]), got
    chain = next(g for g in groups if 40 in g.ids)
    assert chain.weakest_link == pytest.approx(min(sim(0, 40), sim(40, 41)), abs=1e-3)
    assert not chain.identical
    bytes_group = next(g for g in groups if 2 in g.ids)
    assert bytes_group.identical and bytes_group.best == [1.0, 1.0]
    assert [len(g.ids) for g in groups] == [15, 3, 2]          # largest first
    d = groups[0].as_dict()
    assert set(d) == {"images", "weakest_link", "identical"}
    assert d["images"][0]["path"].startswith("/p/")
    # a higher threshold splits the chain; nothing is linked at 1.0 except the digests
    assert sorted(sorted(g.ids) for g in index.duplicates(0.9999, k=10)
                  if 40 in g.ids or 0 in g.ids) == []
    if sj.search._has_faiss():
        flat = index.with_backend("faiss", kind="flat")
        assert sorted(sorted(g.ids) for g in flat.duplicates(t, k=10)) == got


def test_duplicates_refuse_bad_arguments():
    index = sj.search.Index(["/a.jpg", "/b.jpg"], np.eye(2, dtype=np.float32))
    for bad in (1.5, -2, "0.9", True, float("nan")):
        with pytest.raises(InputError, match="threshold: expected a cosine similarity"):
            index.duplicates(bad)
    with pytest.raises(InputError, match="k"):
        index.duplicates(0.9, k=0)
    assert index.duplicates(0.5) == []
    assert sj.search.Index(["/a.jpg"], np.ones((1, 2), np.float32)).duplicates(0.5) == []
