"""Search backends: faiss (flat equals exact search; HNSW's recall on clustered vectors;
stored and restored whole, damage refused) and Qdrant in its local mode, against the
exact engine."""
import numpy as np
import pytest

from scvnet_jax.engine import backends
from scvnet_jax.errors import InputError


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def clustered():
    """2000 vectors in 64-D around 40 centres: descriptors of 40 landmarks, roughly."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((40, 64))
    return _unit(centres[rng.integers(0, 40, 2000)] + 0.4 * rng.standard_normal((2000, 64)))


def test_exact_and_faiss_flat_and_qdrant_agree(clustered):
    X, Q = clustered, clustered[::97] + 0.01
    scores, ids = backends.create("exact", X).search(Q, 10)
    for name, options in (("faiss", {"kind": "flat"}), ("qdrant", {})):
        b = backends.create(name, X, **options)
        assert len(b) == len(X)
        s, i = b.search(Q, 10)
        np.testing.assert_array_equal(i, ids, err_msg=name)
        np.testing.assert_allclose(s, scores, atol=1e-5, err_msg=name)
        assert backends.recall_at(b, X) == 1.0
    s, i = backends.create("faiss", X[:5], kind="flat").search(Q[:2], 8)   # fewer than k
    assert (i[:, 5:] == -1).all() and np.isneginf(s[:, 5:]).all()


@pytest.mark.parametrize("kind, floor", [("hnsw", 0.95), ("ivf", 0.9)])
def test_approximate_faiss_recall_and_round_trip(clustered, kind, floor):
    b = backends.create("faiss", clustered, kind=kind)
    recall = backends.recall_at(b, clustered, k=10, sample=200)
    assert floor <= recall <= 1.0, recall
    again = backends.Faiss.deserialize(b.serialize(), clustered.shape)
    assert again.kind == kind
    Q = clustered[:50]
    for x, y in zip(b.search(Q, 10), again.search(Q, 10)):
        np.testing.assert_array_equal(x, y)


def test_damaged_or_mismatched_faiss_index_is_refused(clustered):
    data = backends.create("faiss", clustered, kind="flat").serialize()
    with pytest.raises(InputError, match="i.index: its faiss index is damaged"):
        backends.Faiss.deserialize(data[:len(data) // 3], clustered.shape, what="i.index")
    with pytest.raises(InputError, match="holds 2000 x 64 vectors, its descriptors 10 x 64"):
        backends.Faiss.deserialize(data, (10, 64), what="i.index")
    with pytest.raises(InputError, match="search backend must be one of"):
        backends.create("annoy", clustered)
    with pytest.raises(InputError, match="faiss kind must be one of"):
        backends.create("faiss", clustered, kind="lsh")
