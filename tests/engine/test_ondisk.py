"""engine.ondisk: shards read by row without reading the rest, an IVF-PQ index whose lists
live on disk, the shortlist re-scored exactly, and damaged files refused by name."""
import numpy as np
import pytest

from scvnet_jax.engine import ondisk
from scvnet_jax.errors import InputError


def _clustered(n, d, clusters=40, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, d))
    X = centers[rng.integers(0, clusters, n)] + 0.6 * rng.normal(size=(n, d))
    return (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float16)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ondisk")
    X = _clustered(6000, 384)
    writer = ondisk.ShardWriter(folder, 384, shard_rows=1000)
    for a in range(0, len(X), 777):           # chunks that straddle the shards
        writer.add(X[a:a + 777])
    rows = writer.finish()
    backend = ondisk.build_ivfpq(rows, folder)
    return folder, X, rows, backend


def test_rows_read_any_rows_of_any_shard(built, monkeypatch):
    _, X, rows, _ = built
    assert rows.shape == X.shape and len(rows.files) == 6 and rows.dtype == np.float16
    picks = np.array([5999, 0, 1000, 999, 2500, 999])       # unsorted, repeated, edges
    np.testing.assert_array_equal(rows[picks], X[picks])    # parallel preads
    monkeypatch.setattr(ondisk, "PARALLEL_ROWS", 2)
    np.testing.assert_array_equal(rows[picks], X[picks])    # through the memory maps
    np.testing.assert_array_equal(rows[990:2010], X[990:2010])
    np.testing.assert_array_equal(rows[-1], X[-1])
    np.testing.assert_array_equal(np.asarray(rows), X)
    with pytest.raises(IndexError):
        rows[np.array([6000])]


def test_the_lists_are_on_disk_and_the_layout_follows_the_size(built):
    folder, X, rows, backend = built
    assert backend.layout == {"pca": 256, "nlist": 153, "m": 32, "nbits": 8, "nprobe": 64}
    assert (folder / ondisk.IVFDATA_FILE).stat().st_size >= len(X) * (32 + 8)
    import faiss
    ivf = faiss.extract_index_ivf(backend.index)
    assert isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.OnDiskInvertedLists)


def test_exact_streaming_and_the_rescored_shortlist(built):
    folder, X, rows, backend = built
    Q = X[::300].astype(np.float32)
    S = Q @ X.astype(np.float32).T
    want = np.argsort(-S, axis=1, kind="stable")[:, :10]
    scores, ids = ondisk.exact_topk(rows, Q, 10, block=512)
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_allclose(scores, np.take_along_axis(S, want, 1), rtol=1e-6, atol=1e-6)
    opened = ondisk.DiskIVFPQ.open(folder, backend.layout, *X.shape)
    # the whole database as the shortlist: exact search itself
    s_all, i_all = ondisk.rescored(opened, rows, Q, 10, len(X))
    np.testing.assert_array_equal(i_all[:, :10], want)
    # re-scoring the approximate top 100 finds most of the exact top 10; the PQ order alone
    # does not (what re-scoring is for)
    assert ondisk.recall_at(opened, rows, Q, 10, 100, exact=ids) >= 0.9
    _, pq_ids = opened.search(Q, 10)
    pq_recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, pq_ids)])
    assert pq_recall < ondisk.recall_at(opened, rows, Q, 10, 100, exact=ids)


def test_a_rerun_reuses_finished_shards(tmp_path):
    X = _clustered(2500, 64, seed=1)
    w = ondisk.ShardWriter(tmp_path, 64, shard_rows=1000)
    w.add(X[:1000])                           # one shard written, then "killed"
    (tmp_path / "descriptors" / "shard-00001.npy").write_bytes(b"half a shard")
    again = ondisk.ShardWriter(tmp_path, 64, shard_rows=1000, skip_done=True)
    done = []
    for s in range(3):
        if again.next_is_done():
            again.skip()
            done.append(s)
        else:
            again.add(X[s * 1000:(s + 1) * 1000])
    rows = again.finish()
    assert done == [0]                        # the damaged leftover is written again
    np.testing.assert_array_equal(np.asarray(rows), X)


def test_damaged_files_are_one_error_naming_them(built, tmp_path):
    folder, X, rows, backend = built
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    files = [copy / "descriptors" / f.name for f in rows.files]
    with open(files[2], "r+b") as f:                      # truncated
        f.truncate(4000)
    with pytest.raises(InputError, match="shard-00002.npy: damaged descriptor shard"):
        ondisk.Rows(files, [1000] * 6, 384)
    files[2].write_bytes(b"not a numpy file at all")
    with pytest.raises(InputError, match="shard-00002.npy: damaged descriptor shard"):
        ondisk.Rows(files, [1000] * 6, 384)
    files[2].unlink()
    with pytest.raises(InputError, match="shard-00002.npy: a descriptor shard of the index "
                                         "is missing"):
        ondisk.Rows(files, [1000] * 6, 384)
    with pytest.raises(InputError, match="shard-00001.npy: damaged descriptor shard: "
                                         "float16 of shape \\(999, 384\\)"):
        ondisk.Rows(files[:2], [1000, 999], 384)
    (copy / ondisk.FAISS_FILE).write_bytes(b"junk")
    with pytest.raises(InputError, match="ivfpq.faiss: damaged faiss index"):
        ondisk.DiskIVFPQ.open(copy, backend.layout, *X.shape)
    shutil.copy(folder / ondisk.FAISS_FILE, copy / ondisk.FAISS_FILE)
    with open(copy / ondisk.IVFDATA_FILE, "r+b") as f:
        f.truncate(100)
    with pytest.raises(InputError, match="ivfpq.faiss: its faiss index holds"):
        ondisk.DiskIVFPQ.open(copy, backend.layout, *X.shape)


def test_faiss_prints_do_not_reach_standard_output(built, capfd):
    folder, X, _, backend = built
    ondisk.DiskIVFPQ.open(folder, backend.layout, *X.shape)
    out, err = capfd.readouterr()
    assert out == "" and "IO_FLAG_ONDISK_SAME_DIR" in err


@pytest.mark.parametrize("given, message", [
    ({"pca": 512}, "pca 512: at most the descriptors' dimension 384"),
    ({"pca": 0, "m": 5}, "m 5: must divide the dimension it splits \\(384\\)"),
    ({"nlist": 7000}, "nlist 7000: at most the number of vectors"),
    ({"nbits": 9}, "nbits 9: at most 8"),
    ({"nprobe": 0}, "nprobe: expected a positive integer, got 0"),
    ({"m": 2.5}, "m: expected a positive integer, got 2.5"),
    ({"depth": 3}, "unknown setting"),
])
def test_a_bad_layout_is_refused_before_any_work(given, message):
    with pytest.raises(InputError, match=message):
        ondisk.check_layout((6000, 384), **given)
    assert ondisk.check_layout((30, 2048))["nlist"] == 1     # a tiny index: one list
