"""Search backends: where an index's vectors live and how their top k are found.

    backend = backends.create("faiss", X, kind="hnsw")      # or "exact", "qdrant"
    scores, ids = backend.search(Q, k)                        # (nq, k) each, best first

* `exact`: every similarity, on the accelerator (`engine.search.topk`, the database sharded
  over the local devices). The default, and what eval.py uses.
* `faiss` (the `faiss` extra): inner-product indexes on the CPU. `kind`: "flat" (exact),
  "ivf" (IVF-Flat, nlist ~ 4 sqrt(N), nprobe 16), "hnsw" (HNSW-Flat, M 32, efSearch 128),
  "ivfpq" (IVF + product quantisation: 8-bit codes, up to 64 sub-vectors dividing D).
  Approximate: `recall_at` measures it against exact search.
* `qdrant` (the `qdrant` extra): a Qdrant collection through its own client, in its local
  mode here (`location=":memory:"` or a `path`); pass `url=` to use a Qdrant server or
  cluster instead, which is how a collection that outgrows one machine moves on.

Vectors are L2-normalised descriptors, so inner product = cosine. Ids are row numbers of
the index; -1 (score -inf) where fewer than k rows exist.
"""
from __future__ import annotations

import math

import numpy as np

from scvnet_jax.errors import InputError

KINDS = {"exact": ("exact",), "faiss": ("flat", "ivf", "hnsw", "ivfpq"), "qdrant": ("local",)}


class Exact:
    name = "exact"

    def __init__(self, X: np.ndarray):
        from scvnet_jax.engine import search
        self.db = search.put_database(X)          # on the devices once

    def __len__(self) -> int:
        return self.db.n

    def search(self, Q, k: int):
        from scvnet_jax.engine import search
        return search.topk(self.db, np.asarray(Q, np.float32), k)


class Faiss:
    name = "faiss"

    def __init__(self, X: np.ndarray, kind: str = "hnsw", *, nprobe: int = 16,
                 ef_search: int = 128, nlist: int | None = None, seed: int = 0, index=None):
        faiss = _import("faiss", "faiss")
        X = np.ascontiguousarray(X, np.float32)
        n, d = X.shape
        self.kind = kind
        if index is not None:
            self.index = index
        elif kind == "flat":
            self.index = faiss.IndexFlatIP(d)
        elif kind == "hnsw":
            self.index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efConstruction = 80
        elif kind in ("ivf", "ivfpq"):
            nlist = max(1, min(n // 39, nlist or int(4 * math.sqrt(n))))  # >= 39 per list
            quantizer = faiss.IndexFlatIP(d)
            if kind == "ivf":
                self.index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
            else:
                m = next(m for m in (64, 32, 16, 8, 4, 2, 1) if d % m == 0 and m <= d)
                self.index = faiss.IndexIVFPQ(quantizer, d, nlist, m, 8,
                                              faiss.METRIC_INNER_PRODUCT)
            self.index.cp.seed = seed
            self.index.train(X)
            self.index.nprobe = min(nprobe, nlist)
        else:
            raise InputError(f"faiss kind must be one of {KINDS['faiss']}, got {kind!r}")
        if kind == "hnsw":
            self.index.hnsw.efSearch = ef_search
        if index is None:
            self.index.add(X)

    def __len__(self) -> int:
        return self.index.ntotal

    def search(self, Q, k: int):
        scores, ids = self.index.search(np.ascontiguousarray(Q, np.float32), k)
        scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
        return scores, ids.astype(np.int64)

    def serialize(self) -> np.ndarray:
        """The faiss index in faiss's own format, as uint8 (stored inside the index file)."""
        return _import("faiss", "faiss").serialize_index(self.index)

    @classmethod
    def deserialize(cls, data: np.ndarray, X_shape, what: str = "faiss index") -> "Faiss":
        faiss = _import("faiss", "faiss")
        try:
            index = faiss.deserialize_index(np.asarray(data, np.uint8))
        except Exception as e:      # noqa: BLE001  (faiss raises RuntimeError on junk)
            raise InputError(f"{what}: its faiss index is damaged ({e})") from None
        if (index.ntotal, index.d) != tuple(X_shape):
            raise InputError(f"{what}: its faiss index holds {index.ntotal} x {index.d} "
                             f"vectors, its descriptors {X_shape[0]} x {X_shape[1]}; rebuild")
        return cls(np.zeros((0, index.d), np.float32), _kind_of(faiss, index), index=index)


def _kind_of(faiss, index) -> str:
    for cls, kind in ((faiss.IndexHNSWFlat, "hnsw"), (faiss.IndexIVFPQ, "ivfpq"),
                      (faiss.IndexIVFFlat, "ivf"), (faiss.IndexFlatIP, "flat")):
        if isinstance(index, cls):
            return kind
    return type(index).__name__


class Qdrant:
    name = "qdrant"

    def __init__(self, X: np.ndarray, *, location: str = ":memory:", path: str | None = None,
                 url: str | None = None, collection: str = "scvnet", batch: int = 1024):
        qc = _import("qdrant_client", "qdrant")
        from qdrant_client import models
        self.models = models
        self.client = (qc.QdrantClient(url=url) if url else
                       qc.QdrantClient(path=path) if path else qc.QdrantClient(location=location))
        self.collection = collection
        X = np.asarray(X, np.float32)
        if self.client.collection_exists(collection):
            self.client.delete_collection(collection)
        self.client.create_collection(collection, vectors_config=models.VectorParams(
            size=X.shape[1], distance=models.Distance.DOT))
        for start in range(0, len(X), batch):
            self.client.upload_collection(collection, X[start:start + batch],
                                          ids=list(range(start, min(len(X), start + batch))))
        self.n = len(X)

    def __len__(self) -> int:
        return self.n

    def search(self, Q, k: int):
        Q = np.asarray(Q, np.float32)
        scores = np.full((len(Q), k), -np.inf, np.float32)
        ids = np.full((len(Q), k), -1, np.int64)
        for i, q in enumerate(Q):
            points = self.client.query_points(self.collection, query=q.tolist(), limit=k).points
            for j, p in enumerate(points):
                scores[i, j], ids[i, j] = p.score, p.id
        return scores, ids


def create(name: str, X: np.ndarray, **options):
    """A backend by name ("exact", "faiss", "qdrant") over the vectors X (N, D)."""
    if name == "exact":
        return Exact(X)
    if name == "faiss":
        return Faiss(X, **options)
    if name == "qdrant":
        return Qdrant(X, **options)
    raise InputError(f"search backend must be one of {tuple(KINDS)}, got {name!r}")


def recall_at(backend, X: np.ndarray, k: int = 10, sample: int = 200, seed: int = 0) -> float:
    """Recall@k of `backend` against exact search, on `sample` of the database's own vectors
    as queries: the mean fraction of each query's exact top k that the backend returns."""
    X = np.asarray(X, np.float32)
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(X), size=min(sample, len(X)), replace=False)
    k = min(k, len(X))
    _, want = Exact(X).search(X[rows], k)
    _, got = backend.search(X[rows], k)
    return overlap_at(want, got, k)


def overlap_at(want, got, k: int) -> float:
    """The mean fraction of each row of `want` (the exact top k ids) found in the same row
    of `got`: recall@k."""
    return float(np.mean([len(set(w[:k]) & set(g[:k])) / k for w, g in zip(want, got)]))


def _import(module: str, extra: str):
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise InputError(f"this search backend needs the {extra} extra: pip install "
                         f"'scvnet_jax[{extra}]'") from None
