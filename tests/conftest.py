"""Shared test fixtures.

The ground truth lives in `../shared` next to the repository (override with
SCVNET_SHARED). It is required: parity tests fail, never skip, when it is missing.
Official-format checkpoints are written once per session by the fixture's own
`make_checkpoint.py` (which needs torch, a test-only dependency).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SCVNET_SHARED", REPO.parent / "shared")).resolve()
PARITY = SHARED / "parity"
MINIREVISIT = SHARED / "minirevisit"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"ground truth not found: {path}. The tests need ../shared beside the "
                    "repository (or SCVNET_SHARED pointing to it).", pytrace=False)
    return path


def parity_fixture(depth: int) -> dict:
    with np.load(_require(PARITY / f"cvnet_r{depth}_seed0.npz")) as z:
        return {k: z[k] for k in z.files}


def parity_state_dict(depth: int, seed: int = 0) -> dict:
    """The exact NumPy state dict behind a fixture (../shared/parity/weights.py)."""
    sys.path.insert(0, str(_require(PARITY)))
    try:
        import weights  # noqa: the fixture's own module
    finally:
        sys.path.pop(0)
    return weights.make_state_dict(weights.load_spec(PARITY / f"cvnet_r{depth}_keys.json"), seed)


def gnd_from_fixture(fx: dict) -> list[dict]:
    return json.loads(str(fx["map_gnd"]))


@pytest.fixture(scope="session")
def official_checkpoint(tmp_path_factory):
    """official_checkpoint(depth, legacy=False) -> path of a `.pyth` written by
    ../shared/parity/make_checkpoint.py (seed 0), made once per session."""
    out_dir = tmp_path_factory.mktemp("official")
    made: dict = {}

    def get(depth: int, legacy: bool = False) -> Path:
        key = (depth, legacy)
        if key not in made:
            out = out_dir / f"r{depth}_seed0{'_legacy' if legacy else ''}.pyth"
            cmd = [sys.executable, str(_require(PARITY / "make_checkpoint.py")),
                   str(PARITY / f"cvnet_r{depth}_keys.json"), "0", str(out)]
            subprocess.run(cmd + (["--legacy"] if legacy else []), check=True)
            made[key] = out
        return made[key]

    return get


@pytest.fixture(scope="session")
def converted_dir(official_checkpoint, tmp_path_factory):
    """converted_dir(depth) -> model directory written by `python -m scvnet_jax.convert`."""
    made: dict = {}

    def get(depth: int) -> Path:
        if depth not in made:
            out = tmp_path_factory.mktemp("converted") / f"cvnet_r{depth}"
            subprocess.run([sys.executable, "-m", "scvnet_jax.convert",
                            str(official_checkpoint(depth)), str(out)], check=True)
            made[depth] = out
        return made[depth]

    return get
