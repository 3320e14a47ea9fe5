"""eval.py validates its config before any work: ranges, choices and output paths; each
failure is one `error:` line naming the flag or field, exit status 2, nothing written."""
from __future__ import annotations

import json

import pytest


@pytest.mark.parametrize("args, expect", [
    (["--topk", "-5"], "config.cvnet.topk = -5: expected an integer >= 1"),
    (["--topk", "0"], "config.cvnet.topk = 0"),
    (["--batch_size", "-1"], "config.batch_size = -1: expected an integer >= 0"),
    (["--workers", "0"], "config.workers = 0"),
    (["--bucket", "0"], "config.bucket = 0"),
    (["--feature_bucket", "-1"], "config.feature_bucket = -1"),
    (["--config.chunk_size=0"], "config.chunk_size = 0"),
    (["--config.max_image_pixels=0"], "config.max_image_pixels = 0"),
    (["--config.max_side=-2"], "config.max_side = -2"),
    (["--config.cvnet.max_side=-1"], "config.cvnet.max_side = -1: expected an integer >= 1"),
    (["--config.superglobal.rerank.M=0"], "config.superglobal.rerank.M = 0"),
    (["--pipelines", "cvnet_global,nope"], "config.pipelines = ['cvnet_global', 'nope']"),
    (["--config.superglobal.descriptor.scales=4"], "config.superglobal.descriptor.scales = 4"),
    (["--config.icfrr.KQ=0"], "config.icfrr.KQ = 0: expected an integer >= 1"),
    (["--config.alpha_qe.alpha=-1"], "config.alpha_qe.alpha = -1"),
    (["--config.dba.k=-2"], "config.dba.k = -2"),
    (["--config.csa.topk=-1"], "config.csa.topk = -1"),
    (["--first_stage", "cvnet_rerank"], "--first_stage"),
    (["--pipelines", "csa"], "the csa pipeline needs CSA weights"),
    (["--pipelines", "csa", "--csa_weights", "/nonexistent/csa"], "/nonexistent/csa"),
    (["--dataset", "roxford"], "--dataset 'roxford': expected one of roxford5k, rparis6k"),
    (["--dataset", "folder:"], "or folder:<data_dir>/<name>"),
    (["--num_processes", "2", "--process_id", "1"],
     "--num_processes, --process_id: only with --distributed (add it, or drop them"),
])
def test_bad_values_are_refused_first(tmp_path, capsys, one_error_line, eval_main, args,
                                      expect):
    out = tmp_path / "results.json"
    assert eval_main("--dataset", "demo", "--cache_dir", tmp_path / "cache", "--output", out,
                     *args) == 2
    one_error_line(capsys.readouterr().err, expect)
    assert list(tmp_path.iterdir()) == []      # not even the demo benchmark was built


def test_output_paths(tmp_path, capsys, one_error_line, eval_main):
    args = ["--dataset", "demo", "--cache_dir", tmp_path / "cache"]
    assert eval_main(*args, "--output", tmp_path) == 2
    one_error_line(capsys.readouterr().err, "--output", "this is a directory")
    notes = tmp_path / "notes.json"
    notes.write_text(json.dumps({"my": "notes"}))
    assert eval_main(*args, "--output", notes) == 2
    one_error_line(capsys.readouterr().err, "notes.json: exists and is not a results file")
    assert json.loads(notes.read_text()) == {"my": "notes"}
    (tmp_path / "cachefile").write_text("x")
    assert eval_main("--dataset", "demo", "--cache_dir", tmp_path / "cachefile", "--output",
                     tmp_path / "r.json") == 2
    one_error_line(capsys.readouterr().err, "--cache_dir", "not a directory")


def test_csa_weights_that_are_not_a_csa(tmp_path, capsys, one_error_line, eval_main,
                                        tiny_model_dir, demo_benchmark, monkeypatch):
    """A CVNet directory given as CSA weights is refused before any extraction."""
    import scvnet_jax.engine.extract as extract
    monkeypatch.setattr(extract, "extract", lambda *a, **k: pytest.fail("extracted"))
    assert eval_main("--dataset", "demo", "--data_dir", demo_benchmark, "--weights",
                     tiny_model_dir, "--pipelines", "csa", "--csa_weights", tiny_model_dir,
                     "--cache_dir", tmp_path / "cache", "--output", tmp_path / "r.json") == 2
    one_error_line(capsys.readouterr().err, "holds a cvnet model, not a csa model")


@pytest.mark.parametrize("dataset, distractors, expect", [
    ("demo", "", "results/demo/results.json"),
    ("roxford5k", "/data/revisitop1m.txt", "results/roxford5k+R1M/results.json"),
    ("folder:tfds/my_photos/", "", "results/my_photos/results.json"),
])
def test_results_go_under_results_by_dataset(dataset, distractors, expect):
    """By default results land in results/<dataset>/ (ignored by git), not loose in the
    current directory; another --output is taken as given."""
    from scvnet_jax.evaluation.config import default_config, output_path
    cfg = default_config()
    cfg.dataset, cfg.distractors = dataset, distractors
    assert str(output_path(cfg)) == expect
    cfg.output = "mine.json"
    assert str(output_path(cfg)) == "mine.json"



def test_eval_puts_the_working_size_back(eval_main, tmp_path, capsys):
    """eval.py reads roxford5k at full size (the official code's working size) and a folder
    set at 1024 px; run in-process (a training run's validation, a test), it leaves the
    process's working size and pixel limit as it found them, also when it stops with an
    error (here: no ground truth in --data_dir)."""
    from scvnet_jax import images
    before = images.max_side(), images.max_pixels()
    images.set_max_side(777)
    try:
        assert eval_main("--dataset", "roxford5k", "--data_dir", tmp_path, "--weights",
                         "random", "--config.max_image_pixels=1000") == 2
        assert "error:" in capsys.readouterr().err
        assert (images.max_side(), images.max_pixels()) == (777, before[1])
    finally:
        images.set_max_side(before[0])
