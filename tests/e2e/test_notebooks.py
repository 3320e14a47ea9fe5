"""Every notebook in colab/ runs top to bottom in smoke mode (CPU, bundled demo data), and
holds no logic of its own: its code cells only call the package (never a path inside the
checkout) and plot."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "colab").glob("*.ipynb"))


def test_the_two_notebooks_exist():
    assert {p.name for p in NOTEBOOKS} == {"quickstart.ipynb", "train_tpu.ipynb"}


def _smoke(nb):
    flags = [c for c in nb.cells if c.cell_type == "code" and c.source.startswith("SMOKE = ")]
    assert len(flags) == 1, "one flag cell starting with 'SMOKE = '"
    flags[0].source = "SMOKE = True"
    return nb


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_smoke_mode(path, tmp_path, monkeypatch, official_checkpoint,
                                     demo_home):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("SCVNET_WORK", str(tmp_path / "work"))
    # the demo runs' shared cache: the quickstart's demo evaluation reuses the bundled
    # model's descriptors when tests/e2e/test_demo_eval.py computed them first
    monkeypatch.setenv("XDG_CACHE_HOME", str(demo_home / "cache"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("SCVNET_SMOKE_CHECKPOINT", str(official_checkpoint(50)))
    nb = _smoke(nbformat.read(path, as_version=4))
    NotebookClient(nb, timeout=1200, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                     for o in c.get("outputs", []))
    if path.stem == "quickstart":
        assert "cvnet_global (protocol" in text and "superglobal_global (protocol" in text
        assert (tmp_path / "work" / "photos.index.npz").is_file()
        assert (tmp_path / "work" / "cvnet_model" / "config.json").is_file()   # converted
        assert "RetrievalModel(R50" in text
        # your own labelled photos: a folder set, both stages, the held-out evaluation
        assert (tmp_path / "work" / "runs" / "mine_rerank" / "model" / "config.json").is_file()
        assert "folder:my_photos results (percent):" in text and "one setting" in text
        assert (tmp_path / "work" / "my_photos.index.npz").is_file()
    else:
        assert (tmp_path / "work" / "cvnet_r50_rerank" / "model" / "config.json").is_file()
        assert "demo (percent):" in text and "cvnet_rerank (protocol" in text


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_hold_no_logic_of_their_own(path):
    """No function or class definitions, no files of the checkout (configs come from
    scvnet_jax.configs, the CLI from `python -m scvnet_jax.*`): the work is in the package."""
    nb = json.loads(path.read_text())
    code = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    defs = [ln for src in code for ln in src.splitlines() if ln.lstrip().startswith(("def ",
                                                                                     "class "))]
    assert defs == [], defs
    assert all(len(src.splitlines()) <= 25 for src in code)
    text = "\n".join(code)
    for path_in_checkout in ("eval.py", "train.py", "configs/", "parents[1]", "__file__"):
        assert path_in_checkout not in text, path_in_checkout
