"""The README stays true: CI runs its set-up commands, and its example output is real."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def readme(repo):
    return (repo / "README.md").read_text()


def test_readme_opens_with_the_two_setup_commands_and_ci_runs_the_second(readme, repo):
    setup = re.search(r"## Set up.*?```bash\n(.*?)```", readme, re.S)
    assert re.search(r"^## (.*)$", readme, re.M).group(1) == "Set up"   # the first section
    demo, tests = setup.group(1).strip().splitlines()
    assert "pip install -e ." in demo and demo.endswith("python eval.py --dataset demo")
    assert 'pip install -e ".[test]"' in tests and tests.endswith("python -m pytest -q")
    ci = (repo / ".ci" / "run").read_text().splitlines()
    assert tests in ci, f".ci/run does not run the README's {tests!r} verbatim"


def test_readme_names_the_everyday_loop(readme):
    assert 'python -m pytest -q -m "not slow"' in readme


def test_api_tour_output_matches_readme(official_checkpoint, readme, repo):
    block = re.search(r"```text\n\$ python examples/api_tour.py (\S+)\n(.*?)```", readme, re.S)
    name, expected = block.group(1), block.group(2)
    ckpt = official_checkpoint(50)
    out = subprocess.run([sys.executable, str(repo / "examples" / "api_tour.py"), str(ckpt)],
                         capture_output=True, text=True, check=True).stdout
    assert ckpt.name == name
    assert out == expected.replace(name, str(ckpt), 1)


def test_own_first_stage_output_matches_readme(readme, repo, demo_home):
    """examples/own_first_stage.py (the demo model on the demo benchmark, the demo runs'
    shared cache) prints what the README shows."""
    import os
    block = re.search(r"```text\n\$ python examples/own_first_stage.py\n(.*?)```", readme, re.S)
    out = subprocess.run([sys.executable, str(repo / "examples" / "own_first_stage.py")],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "XDG_CACHE_HOME": str(demo_home / "cache")}).stdout
    assert out == block.group(1)


def test_gitignore_covers_what_the_documented_commands_write(repo):
    """results/, runs/, tfds/, vis/ and index files from the README's commands."""
    import subprocess
    written = ["results/demo/results.json", "runs/demo/model/config.json",
               "tfds/my_photos/1.0.0/x", "vis/q0.png", "photos/cls/00.jpg", "demo.index",
               "mine.index", "CVPR2022_CVNet_R50.pyth",
               "demo.index.parts/chunk_0.npz", "photos.index.npz"]
    r = subprocess.run(["git", "check-ignore", "--no-index", *written], cwd=repo,
                       capture_output=True, text=True)
    assert sorted(r.stdout.split()) == sorted(written), r.stdout
