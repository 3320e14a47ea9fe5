"""The retrieval engine: image files -> descriptors -> exact search, on every device.

One place for what eval.py, `scvnet_jax.search` and stage-2 training's hard-negative bank
all do:

  extract.extract(model, refs, spec)      descriptors of image files (CVNet-Global over the
                                          official 3 OpenCV scales, or SuperGlobal), cached
  extract.local_features(model, images)   CVNet's local features
  local.extract_local(model, refs, det)   AMES's local descriptors (CVNet + detector head),
                                          top-k per image over 3 scales, cached
  verify.verification_scores(...)         CVNet-Rerank scores of (query, candidate) pairs
  search.rank(X, Q) / search.topk(...)    exact similarity search

Batches are split over this process's devices (`RetrievalModel` runs on a 1-D mesh, as
training does); with several processes (`jax.distributed`) each handles its share of the
images and the results are gathered on every process.
"""
from scvnet_jax.engine import cache, extract, local, search, verify

__all__ = ["cache", "extract", "local", "search", "verify"]
