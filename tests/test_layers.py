"""The package's layers (pyproject.toml, [tool.importlinter]) hold: models import nothing
else of the package, the library core imports neither the command lines nor the app, and no
module imports the `scvnet_jax` facade. import-linter checks them on the source files,
without importing them (a few seconds)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


def test_import_contracts_hold(repo):
    exe = Path(sys.executable).with_name("lint-imports")
    exe = str(exe) if exe.exists() else shutil.which("lint-imports")
    assert exe, "import-linter is not installed (pip install -e '.[test]')"
    env = {**os.environ, "PYTHONPATH": str(repo)}
    r = subprocess.run([exe, "--no-cache", "--no-logo"], cwd=repo, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout
