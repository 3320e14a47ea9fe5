"""Issue 35 DM4: bucket "auto" (the default of eval.py and scvnet-search) pads photos of
mixed sizes into padded shapes chosen from their sizes, so their evaluation compiles about
as few programs as one of a single size, with the results of exact sizes (bucket 1)."""
from __future__ import annotations

import numpy as np
import pytest

from scvnet_jax.data import batching

# (h, w) of the test photos: 8 sizes in 5 multiples of 64 (bucket 64: 5 shapes per scale)
SIZES = [(96, 128), (128, 96), (112, 150), (150, 112), (80, 200), (200, 80), (130, 130),
         (64, 190)]


@pytest.fixture(scope="module")
def photos():
    import cv2
    import skimage.data
    srcs = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()]
    return [np.ascontiguousarray(cv2.resize(srcs[i % 3][..., ::-1], (w, h),
                                            interpolation=cv2.INTER_AREA))
            for i, (h, w) in enumerate(SIZES)]


def _lowerings(run):
    """run()'s result and the number of XLA programs it built (lowered to MLIR; a program
    already built by this process is not built again)."""
    import jax.monitoring
    from jax._src import dispatch
    events = []

    def listen(event, duration, **kw):
        if event == dispatch.JAXPR_TO_MLIR_MODULE_EVENT:
            events.append(event)
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        out = run()
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    return out, len(events)


def _evaluate(model, photos, bucket, feature_bucket, queries):
    """CVNet-Global descriptors and the CVNet rerank scores of `queries` against every
    photo, as eval.py computes them."""
    from tqdm import tqdm

    from scvnet_jax.engine import extract, verify
    out = {}
    with tqdm(disable=True) as bar:
        out["cvnet"] = extract.describe_images(model, photos, extract.spec_of("cvnet"), 0,
                                               bucket, bar)
    local = extract.local_features(model, photos, 0, bucket)
    corr = verify.corr_features(model, local, 0, feature_bucket)
    pairs = [((q, k), corr[q], corr[k]) for q in range(queries) for k in range(len(photos))]
    out["scores"] = verify.score_pairs(model, pairs, 0, feature_bucket)
    return out


@pytest.mark.slow     # ~30 programs of the tiny model: minutes on a 2-core CPU, cold
def test_auto_buckets_compile_few_programs_and_equal_exact_sizes(tiny_model, photos,
                                                                monkeypatch):
    monkeypatch.setattr(batching, "_auto_seen", {})
    auto, programs = _lowerings(lambda: _evaluate(tiny_model, photos, "auto", "auto", 2))
    # CVNet-Global's 3 scales, local features, their corr features, the pairs and small
    # helpers (6 here); bucket 64 builds 5 image shapes per scale, 1 (exact sizes) 8
    assert programs <= 8, programs
    few = [0, 1, 4]               # exact sizes (a program per size) on 3 of the photos
    exact = _evaluate(tiny_model, [photos[i] for i in few], 1, 1, 2)
    np.testing.assert_allclose(auto["cvnet"][few], exact["cvnet"], atol=2e-6)
    got = {(q, k): auto["scores"][(q, few[k])] for q, k in exact["scores"]}
    np.testing.assert_allclose([got[k] for k in exact["scores"]],
                               list(exact["scores"].values()), atol=2e-6)
