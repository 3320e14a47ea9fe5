"""The README and the docs (docs/*.md) stay true: CI runs the README's set-up commands and
builds the docs, their links lead somewhere, and the example output the pages show is real."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def readme(repo):
    return (repo / "README.md").read_text()


def page(repo, name: str) -> str:
    """docs/<name>: a page of the docs site."""
    return (repo / "docs" / name).read_text()


def test_readme_opens_with_the_two_setup_commands_and_ci_runs_the_second(readme, repo):
    setup = re.search(r"## Set up.*?```bash\n(.*?)```", readme, re.S)
    assert re.search(r"^## (.*)$", readme, re.M).group(1) == "Set up"   # the first section
    demo, tests = setup.group(1).strip().splitlines()
    assert "pip install -e ." in demo and demo.endswith("python eval.py --dataset demo")
    assert 'pip install -e ".[test]"' in tests and tests.endswith("python -m pytest -q")
    ci = (repo / ".ci" / "run").read_text().splitlines()
    assert tests in ci, f".ci/run does not run the README's {tests!r} verbatim"


def test_readme_is_short_and_its_links_and_the_docs_links_lead_somewhere(readme, repo):
    """README.md: at most 200 lines; every relative link of it and of the docs pages names a
    file of the checkout (a page's #anchor is checked by the Sphinx build, see .ci/run)."""
    assert len(readme.splitlines()) <= 200
    pages = [repo / "README.md", *sorted((repo / "docs").rglob("*.md"))]
    pages = [p for p in pages if "_build" not in p.parts]
    assert len(pages) > 10
    for p in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", p.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            assert (p.parent / target.split("#")[0]).exists(), (p.name, target)


def test_ci_builds_the_docs_with_warnings_as_errors(repo):
    ci = (repo / ".ci" / "run").read_text()
    build = next(ln for ln in ci.splitlines() if ln.startswith("sphinx-build"))
    assert " -W " in build and " docs docs/_build/html" in build
    conf = (repo / "docs" / "conf.py").read_text()
    assert 'nb_execution_mode = "off"' in conf        # the notebooks are never run there


def test_developing_page_names_the_test_tiers(repo):
    dev = page(repo, "developing.md")
    assert 'python -m pytest -q -m "not slow"' in dev and "python -m pytest -q " in dev


@pytest.mark.slow   # the everyday loop (-m 'not slow') stays within 4 minutes
def test_api_tour_output_matches_the_docs(official_checkpoint, repo):
    """examples/api_tour.py prints what docs/python.md shows."""
    block = re.search(r"```text\n\$ python examples/api_tour.py (\S+)\n(.*?)```",
                      page(repo, "python.md"), re.S)
    name, expected = block.group(1), block.group(2)
    ckpt = official_checkpoint(50)
    out = subprocess.run([sys.executable, str(repo / "examples" / "api_tour.py"), str(ckpt)],
                         capture_output=True, text=True, check=True).stdout
    assert ckpt.name == name
    assert out == expected.replace(name, str(ckpt), 1)


@pytest.mark.slow   # the everyday loop (-m 'not slow') stays within 4 minutes
def test_own_first_stage_output_matches_the_docs(repo, demo_home):
    """examples/own_first_stage.py (the demo model on the demo benchmark, the demo runs'
    shared cache) prints what docs/rerankers.md shows."""
    import os
    block = re.search(r"```text\n\$ python examples/own_first_stage.py\n(.*?)```",
                      page(repo, "rerankers.md"), re.S)
    out = subprocess.run([sys.executable, str(repo / "examples" / "own_first_stage.py")],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "XDG_CACHE_HOME": str(demo_home / "cache")}).stdout
    assert out == block.group(1)


def test_gitignore_covers_what_the_documented_commands_write(repo):
    """results/, runs/, tfds/, vis/, index files and the built docs from the documented
    commands."""
    import subprocess
    written = ["results/demo/results.json", "runs/demo/model/config.json",
               "tfds/my_photos/1.0.0/x", "vis/q0.png", "photos/cls/00.jpg", "demo.index",
               "mine.index", "CVPR2022_CVNet_R50.pyth",
               "demo.index.parts/chunk_0.npz", "photos.index.npz",
               "docs/_build/html/index.html"]
    r = subprocess.run(["git", "check-ignore", "--no-index", *written], cwd=repo,
                       capture_output=True, text=True)
    assert sorted(r.stdout.split()) == sorted(written), r.stdout
