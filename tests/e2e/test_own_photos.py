"""The "Your own photos" tutorial (docs/own_photos.md), run end to end on a small tree: the demo photos
sorted into class folders, a folder set built from them, both training stages, an
evaluation on the held-out classes, CSA and AMES trained on the set and every reranker
evaluated, and a search index. The commands are the page's own,
scaled down by the substitutions below (fewer classes, the tiny configs, a few steps)."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time

import pytest

# the page's text -> what the test runs instead (every one must apply)
SCALE_DOWN = (("--out photos/", "--out photos/ --classes 6"),
              ("--name my_photos --data_dir tfds/", "--name my_photos --data_dir tfds/ "
                                                    "--eval_fraction 0.5"),
              ("configs/demo.py ", "configs/demo.py:tiny "),
              ("configs/demo_rerank.py ", "configs/demo_rerank.py:tiny "),
              ("configs/csa_demo.py ", "configs/csa_demo.py:tiny "),
              ("configs/ames_demo.py ", "configs/ames_demo.py:tiny "),
              ("--config.total_steps=300", "--config.total_steps=4"),
              ("--config.total_steps=200", "--config.total_steps=4"),
              ("--topk 20", "--topk 3"),
              ("photos/motorcycle_left_r1c1/", "photos/hubble_deep_field_r1c1/"))


def tutorial_commands(page: str) -> list[str]:
    block = re.search(r"<!-- tutorial: own photos -->\n```bash\n(.*?)```", page, re.S)
    assert block, "docs/own_photos.md: the tutorial's bash block after <!-- tutorial: own photos -->"
    return [ln.split("  #")[0].strip() for ln in block.group(1).splitlines()
            if ln.strip() and not ln.startswith("#")]


def argv(cmd: str, repo) -> list[str]:
    words = shlex.split(cmd)
    if words[0] == "scvnet-search":
        return [sys.executable, "-m", "scvnet_jax.app", *words[1:]]
    assert words[0] == "python", cmd
    if words[1].endswith(".py"):                 # python train.py / eval.py of the checkout
        words = [str(repo / w) if w.startswith("configs/") else w for w in words]
        return [sys.executable, str(repo / words[1]), *words[2:]]
    return [sys.executable, *words[1:]]


def test_the_tutorial_is_the_pages_and_scales_down(repo):
    """Quick: the page's block is found and every substitution applies (the run below is slow)."""
    script = "\n".join(tutorial_commands((repo / "docs" / "own_photos.md").read_text()))
    assert len(script.splitlines()) == 10
    for old, _ in SCALE_DOWN:
        assert old in script, f"docs/own_photos.md tutorial no longer has {old!r}"


@pytest.mark.slow
def test_the_docs_tutorial_runs_on_a_small_tree(tmp_path, repo):
    commands = tutorial_commands((repo / "docs" / "own_photos.md").read_text())
    script = "\n".join(commands)
    for old, new in SCALE_DOWN:
        assert old in script, f"docs/own_photos.md tutorial no longer has {old!r}"
        script = script.replace(old, new)
    env = {**os.environ, "PYTHONPATH": str(repo), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    out = {}
    for cmd in script.splitlines():
        t0 = time.perf_counter()
        r = subprocess.run(argv(cmd, repo), cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=900)
        print(f"{time.perf_counter() - t0:6.1f} s  {cmd}")
        assert r.returncode == 0, (cmd, r.stdout[-3000:], r.stderr[-3000:])
        out[cmd] = r.stdout

    # the folder set: 6 classes of 12 photos, half of the classes held out
    build = next(v for k, v in out.items() if " folder " in k)
    assert "train 36 images of 3 classes" in build and "36 images of 3 classes" in build
    # both stages wrote a model; the evaluation ran every default pipeline on one setting
    assert (tmp_path / "runs" / "mine" / "model" / "config.json").is_file()
    assert (tmp_path / "runs" / "mine_rerank" / "model" / "config.json").is_file()
    res = json.loads((tmp_path / "results" / "my_photos" / "results.json").read_text())
    assert set(res) >= {"cvnet_global", "cvnet_rerank", "superglobal_global",
                        "superglobal_rerank"}
    for name, r in res.items():
        assert set(r["mAP"]) == {"all"} and 0 < r["mAP"]["all"] <= 1 + 1e-9, (name, r)
        assert r["n_queries"] == 36 and r["n_db"] == 36
        assert "Easy, Medium and Hard are one setting" in r["notes"][0]
    assert res["cvnet_rerank"]["protocol"] == "blind"
    ev = next(v for k, v in out.items() if "eval.py" in k)
    assert "all " in ev and "one setting" in ev
    # the rerankers, CSA and AMES trained on the same set (stages 3 and 4)
    rr = json.loads((tmp_path / "results" / "my_photos" / "rerankers.json").read_text())
    assert set(rr) == {"superglobal_global", "icfrr", "alpha_qe", "dba", "csa", "ames"}
    assert all(set(r["mAP"]) == {"all"} for r in rr.values())
    assert rr["ames"]["protocol"] == "blind"
    # the index holds every photo, and a query finds its own file first
    query = next(k for k in out if " query " in k)
    lines = out[query].splitlines()
    qpath = shlex.split(query)[-3]
    hit = next(ln for ln in lines if ln.lstrip().startswith("1 "))
    assert qpath.split("/", 1)[1] in hit, out[query]


def _table(text: str) -> dict:
    """{pipeline: mAP %} of eval.py's printed tables (the 'all' row)."""
    out, name = {}, None
    for ln in text.splitlines():
        m = re.match(r"^(\w+) \(protocol: ", ln)
        if m:
            name = m.group(1)
        elif name and ln.startswith("all "):
            out[name] = float(ln.split()[1])
            name = None
    return out


@pytest.mark.slow
@pytest.mark.reproduce
def test_the_docs_tutorial_at_full_size_gives_the_pages_numbers(tmp_path, repo):
    """The tutorial as the page gives it (72 classes, the demo configs, 300 + 200 steps):
    the held-out mAPs eval.py prints equal the page's output block within half a point
    (about 12 minutes on 2 CPU cores)."""
    page = (repo / "docs" / "own_photos.md").read_text()
    env = {**os.environ, "PYTHONPATH": str(repo), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    printed = ""
    for cmd in tutorial_commands(page):
        t0 = time.perf_counter()
        r = subprocess.run(argv(cmd, repo), cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=3600)
        print(f"{time.perf_counter() - t0:6.1f} s  {cmd}")
        assert r.returncode == 0, (cmd, r.stdout[-3000:], r.stderr[-3000:])
        if "eval.py" in cmd and "--pipelines" not in cmd:
            printed = r.stdout
    shown = re.search(r"\$ python eval.py --dataset folder:tfds/my_photos[^\n]*\n(.*?)```",
                      page, re.S)
    assert shown, "docs/own_photos.md: the evaluation's output block"
    want, got = _table(shown.group(1)), _table(printed)
    assert want and set(got) == set(want), (want, got)
    for name, value in want.items():
        assert abs(got[name] - value) <= 0.5, (name, got[name], value)
