"""AMES re-ranking over image files: the queries' and the shortlisted database images'
local descriptors extracted (the database's through the token store), then the official
scoring."""
from __future__ import annotations

import os
from typing import Mapping

import numpy as np

from scvnet_jax.errors import ConfigError, InputError
from scvnet_jax.rerank.ames.model import AMESReranker, settings_of
from scvnet_jax.rerank.ames.scoring import (PROTOCOLS, SETTINGS, _check_shortlist, combine,
                                            shortlist)
from scvnet_jax.rerank.ames.store import database_tokens


def _image_refs(items, what: str) -> list:
    """ImageRefs of `items`: ImageRefs as they are, paths (str or Path) as whole images."""
    from scvnet_jax.images import ImageRef
    out = []
    for i, r in enumerate(items):
        if isinstance(r, ImageRef):
            out.append(r)
        elif isinstance(r, (str, os.PathLike)):
            out.append(ImageRef(os.fspath(r)))
        else:
            raise InputError(f"ames.rerank_images: {what}[{i}] is a {type(r).__name__}; "
                             "expected an image file path (str or Path) or an ImageRef")
    return out


def rerank_images(model: AMESReranker, retrieval_model, query_refs, db_refs, ranks, sims, *,
                  detector=None, k: int | None = None, lamb: float | None = None,
                  temp: float | None = None, mix: float | None = None,
                  query_len: int | None = None, db_len: int | None = None, scales=None,
                  protocol: str = "blind", gnd=None, cache_dir: str | None = None,
                  batch_size: int = 64, extract_batch_size: int = 0, bucket: int = 64,
                  workers: int = 4):
    """AMES re-ranking of a first stage over image files: (ranks, sims) (N or K, nq), best
    first. query_refs, db_refs: image file paths (str or Path) or ImageRefs (a query's
    may carry its box). The local descriptors of the queries (cropped to their boxes) and
    of the shortlisted database images only (never the whole database: +1M costs the top k
    of each query) are extracted with `retrieval_model` (+ `detector`): the strongest `query_len`
    of a query, `db_len` of a database image (asymmetric, as the authors evaluate: the first
    k rows of a top-K extraction are the top-k extraction's), the database's kept in the
    token store (`cache_dir`). None settings come from `settings_of(model)`.

    mix > 0 (not the official scoring; what a model trained here may record, chosen on its
    held-out classes) shares the local part of the score with the training-free chamfer
    score of the same descriptors, and a model trained on top of chamfer
    (`ames.chamfer_logit`, recorded in its directory) adds it to its logit (`combine`):
    the database images' local descriptors are then kept (float16, chamfer's store) and
    their tokens projected from them.

    Returns {setting: (ranks (same shape as given), scores (k', nq))}: setting "" for
    protocol "blind"; "medium" and "hard" for "official" (see `shortlist`)."""
    from scvnet_jax.engine import local
    query_refs, db_refs = _image_refs(query_refs, "query_refs"), _image_refs(db_refs, "db_refs")
    d = settings_of(model)
    k = int(k or d["k"])
    lamb = d["lamb"] if lamb is None else float(lamb)
    temp = d["temp"] if temp is None else float(temp)
    mix = d["mix"] if mix is None else float(mix)
    cl = float(d["chamfer_logit"])          # the model's own (how it was trained)
    if not 0 <= mix <= 1:
        raise ConfigError(f"ames: mix must be in [0, 1], got {mix!r}")
    query_len = int(query_len or d["query_len"])
    db_len = int(db_len or d["db_len"])
    scales = tuple(scales or d["scales"])
    ranks, sims = _check_shortlist(ranks, sims)
    if protocol not in PROTOCOLS:
        raise ConfigError(f"ames: protocol must be one of {PROTOCOLS}, got {protocol!r}")
    dim = local.descriptor_dim(retrieval_model, detector)
    if dim != model.arch.local_dim:
        raise ConfigError(f"ames: the model reads {model.arch.local_dim}-d local descriptors; "
                          f"this backbone{' + detector' if detector is not None else ''} gives "
                          f"{dim}-d" + ("" if detector is not None else
                                        " (official AMES weights need the official detector)"))
    settings = ("",) if protocol == "blind" else SETTINGS
    if protocol == "official" and gnd is None:
        raise ConfigError("ames: protocol 'official' needs the ground truth; use 'blind' on "
                          "data without labels")
    g = gnd["gnd"] if isinstance(gnd, Mapping) else gnd
    # the shortlist depth: enough rows that moving junk (+ easy) out still leaves k
    depth = k
    if protocol == "official":
        depth += max((len(x.get("junk", ())) + len(x.get("easy", ())) for x in g), default=0)
    depth = min(depth, ranks.shape[0])
    lists = {s: shortlist(ranks[:depth], sims[:depth], protocol=protocol, gnd=gnd,
                          setting=s or "medium") for s in settings}
    kk = min(k, depth)
    union = np.unique(np.concatenate([r[:kk].reshape(-1) for r, _ in lists.values()]))
    q_feats = local.extract_local(retrieval_model, list(query_refs), detector, query_len, scales,
                                  extract_batch_size, bucket=bucket, dtype=np.float32,
                                  workers=workers, desc="ames queries")
    if mix > 0 or cl:           # the raw descriptors for chamfer, the tokens from them
        from scvnet_jax.rerank import chamfer
        from scvnet_jax.rerank.ames.model import pack_codes
        db_local, mask = chamfer.database_locals(
            retrieval_model, [db_refs[i] for i in union], detector=detector, topk=db_len,
            scales=scales, cache_dir=cache_dir, batch_size=extract_batch_size, bucket=bucket,
            workers=workers, desc="ames db")
        tokens = model.db_tokens(np.asarray(db_local, np.float32), mask)
        tokens = pack_codes(tokens) if model.arch.binarized else tokens
    else:
        tokens, mask = database_tokens(model, retrieval_model, [db_refs[i] for i in union],
                                       detector=detector, topk=db_len, scales=scales,
                                       cache_dir=cache_dir, batch_size=extract_batch_size,
                                       bucket=bucket, workers=workers)
    where = np.full(int(ranks.max()) + 1, -1, np.int64)
    where[union] = np.arange(len(union))
    fmt = "packed" if model.arch.binarized else "tokens"
    out = {}
    for s, (r, v) in lists.items():
        logits = model.shortlist_logits(np.asarray(q_feats.desc, np.float32), q_feats.mask,
                                        tokens, mask, where[r[:kk]], db_format=fmt,
                                        batch_size=batch_size)
        cham = None
        if mix > 0 or cl:
            idx = where[r[:kk]].T
            cham = chamfer.scores(q_feats.desc, q_feats.mask, db_local[idx], mask[idx]).T
        rr, scores = combine(r, v, logits, k=kk, lamb=lamb, temp=temp, chamfer=cham, mix=mix,
                             chamfer_logit=cl, chamfer_center=float(d["chamfer_center"]))
        full = ranks.copy()
        full[:depth] = rr
        out[s] = (full, scores)
    return out
