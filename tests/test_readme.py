"""The README stays true: CI runs its set-up commands, and its example output is real."""
from __future__ import annotations

import re
import subprocess
import sys

from conftest import REPO


def _readme():
    return (REPO / "README.md").read_text()


def test_ci_runs_the_readme_setup_commands():
    setup = re.search(r"## Set up.*?```bash\n(.*?)```", _readme(), re.S).group(1)
    ci = (REPO / ".ci" / "run").read_text()
    for line in setup.strip().splitlines():
        assert line in ci.splitlines(), f".ci/run does not run the README's {line!r}"


def test_api_tour_output_matches_readme(official_checkpoint):
    block = re.search(r"```text\n\$ python examples/api_tour.py (\S+)\n(.*?)```", _readme(), re.S)
    name, expected = block.group(1), block.group(2)
    ckpt = official_checkpoint(50)
    out = subprocess.run([sys.executable, str(REPO / "examples" / "api_tour.py"), str(ckpt)],
                         capture_output=True, text=True, check=True).stdout
    assert ckpt.name == name
    assert out == expected.replace(name, str(ckpt), 1)
