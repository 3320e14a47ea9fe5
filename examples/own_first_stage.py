"""Rerank a first stage that came from elsewhere: your vector database's top-k ids and the
descriptors it stores.

    python examples/own_first_stage.py

A stand-in "vector database" holds the bundled demo model's SuperGlobal descriptors of the
demo benchmark under string ids and answers each query with its top 20 ids (any ANN index
would do: only the ids, and the vectors it stores for them, are used). The rerankers of the
registry then reorder each query's candidates; the ids come back in the new order.
"""
import numpy as np

import scvnet_jax as sj
from scvnet_jax.data import demo
from scvnet_jax.data.revisitop import load_dataset
from scvnet_jax.evaluation.config import default_cache_dir
from scvnet_jax.rerank import registry

model = sj.load(sj.demo_model_path())
data = load_dataset(demo.build_benchmark(f"{default_cache_dir()}/demo_benchmark").parent,
                    "demo")
X = sj.search.describe(model, [r.path for r in data.db_images()], "superglobal")
Q = sj.search.describe(model, [r.path for r in data.query_images()], "superglobal")


class VectorDB:
    """What a vector database offers: top-k ids of a query, and the stored vectors of ids."""
    def __init__(self, ids, vectors):
        self.ids, self.vectors_ = np.asarray(ids), vectors
        self.row = {i: r for r, i in enumerate(ids)}

    def search(self, q, k):
        return self.ids[np.argsort(-(self.vectors_ @ q), kind="stable")[:k]]

    def vectors(self, ids):
        return self.vectors_[[self.row[i] for i in ids]]


db = VectorDB([f"img-{i:04d}" for i in range(len(X))], X)
hits = np.stack([db.search(q, 20) for q in Q])                # (nq, 20) your ids, best first
inputs, ids = registry.from_candidates(Q, hits, db.vectors)   # the union of the candidates
print(f"{len(Q)} queries, top-20 each from the vector database: {len(ids)} distinct "
      f"candidates")
for name, options in (("alpha_qe", {"k": 2, "alpha": 1.0}), ("dba", {"k": 2, "alpha": 1.0}),
                      ("superglobal", {"M": 20, "K": 3})):
    out = registry.rerank(name, inputs, **options)
    print(f"{name:12s} query 0, top 5: {' '.join(ids[out.ranks[:5, 0]])}")
print(f"{'first stage':12s} query 0, top 5: {' '.join(hits[0, :5])}")
