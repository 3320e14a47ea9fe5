"""AMES re-ranking (Asymmetric and Memory-Efficient Similarity, ECCV 2024; github
pavelsuma/ames): a transformer scores each (query, shortlisted database image) pair from
their local descriptors.

    ames = sj.rerank.ames.load("ames_cvnet_fp.pt")      # official file, or our model dir
    logits = ames.similarity(q_local, q_mask, db_local, db_mask)        # (B,) pairs
    tokens = ames.db_tokens(db_local, db_mask)     # what a store keeps per database image
    logits = ames.similarity_from_tokens(q_local, q_mask, tokens, db_mask)
    ranks, scores = sj.rerank.ames.rerank(ames, q_local, q_mask, db_local, db_mask,
                                          ranks, sims, k=100, lamb=0.85, temp=0.8)

Local descriptors: (n, L, local_dim) per image with a mask (n, L), True = padding, as the
official loader cuts them from its hdf5 `features` arrays (`split_features`).

Re-ranking is the official `src/utils/metrics.py: rerank`: the shortlist is the first
stage's top K (`ranks`, `sims`, (K, nq), best first); with protocol "official" each query's
junk (setting "medium"), resp. junk + easy ("hard") images are moved to the end of its
shortlist, order kept (the authors' evaluation; it needs the ground truth), "blind" uses no
labels. The first k of the shortlist are scored and sorted by
    s = lamb * first-stage similarity + (1 - lamb) * sigmoid(temp * logit)
(float32, as the official code), the rest of the shortlist unchanged. The official mAP is
computed on the shortlist alone, AP normalised by min(#positives, K) (`shortlist_map`).

Database tokens (`db_tokens`): fp models keep float16 tokens (the official eval-time
rounding makes them exact, not an approximation); dist models the codes in {-1, 0, 1},
stored in one bit each by `pack_codes` (see there for the zero code).

The package, by concern: `model` (AMESReranker, the model with its weights; `load`; its
defaults, `settings_of`), `scoring` (the official re-ranking of a shortlist), `store` (the
database-token store) and `pipeline` (`rerank_images`, over image files). Every name is
here too, as it always was (`sj.rerank.ames.load`, ...).
"""
from __future__ import annotations

from scvnet_jax.rerank.ames.model import (DB_FORMATS, DESCRIPTOR_COLUMN, DTYPES, MASK_COLUMN,
                                          OFFICIAL_DB_LEN, OFFICIAL_DEFAULTS, OFFICIAL_K,
                                          OFFICIAL_QUERY_LEN, AMESReranker, from_state_dict,
                                          infer_arch, load, pack_codes, settings_of,
                                          split_features, unpack_codes)
from scvnet_jax.rerank.ames.pipeline import rerank_images
from scvnet_jax.rerank.ames.scoring import (PROTOCOLS, SETTINGS, combine, rerank, shortlist,
                                            shortlist_map, with_chamfer)
from scvnet_jax.rerank.ames.store import (TokenStore, bytes_per_image, database_tokens,
                                          stored_local_rows)

AMES = AMESReranker     # its former name (the Flax module is scvnet_jax.models.ames.AMES)


def __getattr__(name: str):
    # the extraction side lives with the engine (engine/local.py); here for the contract
    # `sj.rerank.ames.local_descriptors(...)` etc.
    if name in ("local_descriptors", "detector_from_state_dict", "load_detector",
                "extract_local", "describe_local", "LocalFeatures", "Detector"):
        from scvnet_jax.engine import local
        return getattr(local, name)
    raise AttributeError(f"module 'scvnet_jax.rerank.ames' has no attribute {name!r}")


__all__ = ["AMES", "AMESReranker", "DB_FORMATS", "DESCRIPTOR_COLUMN", "DTYPES", "MASK_COLUMN",
           "OFFICIAL_DB_LEN", "OFFICIAL_DEFAULTS", "OFFICIAL_K", "OFFICIAL_QUERY_LEN",
           "PROTOCOLS", "SETTINGS", "TokenStore", "database_tokens", "rerank_images", "settings_of",
           "stored_local_rows",
           "bytes_per_image", "combine", "from_state_dict", "infer_arch", "load", "pack_codes",
           "rerank", "shortlist", "shortlist_map", "split_features", "unpack_codes",
           "with_chamfer"]
