"""The demo end to end through the command line: `python -m scvnet_jax.eval --dataset demo`
(bundled model, demo benchmark, no other flag) prints all four pipelines; the bundled model
beats an untrained one of its shape (`--weights random`), and its trained rerank head beats
the global ranking it reranks. (The demo's training runs: test_demo_train*.py.)"""
from __future__ import annotations

import json

import pytest

import scvnet_jax as sj
from scvnet_jax.evaluation.config import PIPELINES

# Medium mAP margins. Measured on the CI machine type (2-core AMD EPYC): bundled global
# 53.84 vs untrained 43.62; bundled rerank (top 100) 57.72 vs its global 53.84.
MARGIN_GLOBAL = 0.05
MARGIN_RERANK = 0.01



def test_bundled_demo_model_is_small_and_loads():
    path = sj.demo_model_path()
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    assert size < 12e6, size
    model = sj.load(path)
    assert model.arch.asdict() == dict(depth=50, width=16, reduction_dim=256, corr_dim=64)
    meta = json.loads((path / "config.json").read_text())["meta"]
    assert "stage 2" in meta["trained_by"]


@pytest.mark.slow
def test_eval_demo_with_no_flags_and_its_margins(demo_eval, medium_map):
    r, trained = demo_eval()
    for p in PIPELINES:
        assert f"\n{p} (protocol: " in r.stdout, p
    assert set(json.loads(trained.read_text())) == set(PIPELINES)

    r, random = demo_eval("--weights", "random", "--pipelines", "cvnet_global",
                          output="random.json")
    assert "weights random" in r.stdout
    g, rr, g0 = (medium_map(trained, "cvnet_global"), medium_map(trained, "cvnet_rerank"),
                 medium_map(random, "cvnet_global"))
    print(f"demo Medium mAP: trained global {g:.4f}, rerank {rr:.4f}; random global {g0:.4f}")
    assert g > g0 + MARGIN_GLOBAL, (g, g0)
    assert rr > g + MARGIN_RERANK, (rr, g)
