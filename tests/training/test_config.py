"""Training configs are validated before anything is built: ranges, choices, paths and the
workdir (a directory we may write, empty or a run of ours with the same shapes); each
failure is one `error:` line naming the field or path, exit status 2, nothing created."""
from __future__ import annotations

import json

import pytest

from scvnet_jax.configs import demo
from scvnet_jax.errors import ConfigError
from scvnet_jax.training import config


def tiny(**over):
    return demo.set_fields(demo.get_config("tiny"), over)


@pytest.mark.parametrize("field, value, expect", [
    ("batch_size", 0, "config.batch_size = 0: expected an integer >= 1"),
    ("batch_size", -4, "config.batch_size = -4"),
    ("total_steps", -1, "config.total_steps = -1: expected an integer >= 0"),
    ("checkpoint_every_steps", 0, "config.checkpoint_every_steps = 0"),
    ("optimizer.lr", 0.0, "config.optimizer.lr = 0.0: expected a number > 0"),
    ("loss.momentum", 1.0, "config.loss.momentum = 1.0: expected a number in [0, 1)"),
    ("data.image_size", 8, "config.data.image_size = 8"),
    ("optimizer.name", "adam", "config.optimizer.name = 'adam': expected one of 'sgd', 'adamw'"),
    ("model.dtype", "float16", "config.model.dtype = 'float16'"),
    ("stage", 5, "config.stage = 5: expected one of 'cvnet_global', 'cvnet_rerank', 'csa', "
                 "'ames'"),
    ("stage", 2, "config.stage = 2: stages are named now; use config.stage = 'cvnet_rerank'"),
    ("stage", "4", "config.stage = '4': stages are named now; use config.stage = 'ames'"),
    ("loss.queue_size", 20, "config.loss.queue_size (20) must be a multiple of"),
    ("model.width", 0, "config.model"),
    ("init_from", "/no/such/model", "config.init_from = '/no/such/model': no such file"),
])
def test_validate_names_the_field(field, value, expect):
    with pytest.raises(ConfigError) as e:
        config.validate(tiny(**{field: value}))
    assert expect in str(e.value)


def test_shipped_configs_validate():
    import scvnet_jax as sj
    from scvnet_jax.configs import demo_rerank
    stage2 = demo_rerank.get_config("tiny")
    stage2.init_from = str(sj.demo_model_path())
    for cfg in (demo.get_config(), demo.get_config("tiny"), stage2):
        config.validate(cfg)


def test_workdir_checks(tmp_path):
    cfg = tiny()
    config.check_workdir(tmp_path / "new" / "run", cfg)      # to be created: fine
    (tmp_path / "empty").mkdir()
    config.check_workdir(tmp_path / "empty", cfg)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="file: exists and is not a directory"):
        config.check_workdir(tmp_path / "file", cfg)
    with pytest.raises(ConfigError, match="file is a file, not a directory"):
        config.check_workdir(tmp_path / "file" / "run", cfg)
    users = tmp_path / "users"
    users.mkdir()
    (users / "thesis.tex").write_text("mine")
    with pytest.raises(ConfigError, match="users: not empty and not a training run"):
        config.check_workdir(users, cfg)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(cfg.to_json_best_effort())
    config.check_workdir(run, tiny(total_steps=99))          # resumable: other steps are fine
    with pytest.raises(ConfigError) as e:
        config.check_workdir(run, tiny(**{"model.width": 16}))
    assert f"--workdir {run}: its run has model.width = 8, this config 16" in str(e.value)
    saved = json.loads((run / "config.json").read_text())
    assert saved["model"]["width"] == 8


@pytest.mark.parametrize("args, expect", [
    (["--config.batch_size=0"], "config.batch_size = 0"),
    (["--config.total_steps=-1"], "config.total_steps = -1"),
    (["--config.batch_sise=4"], "did you mean --config.batch_size"),
    (["--config.init_from=/no/such"], "config.init_from = '/no/such'"),
    (["--config.init_from={tmp}/notes.txt"], "notes.txt': not a model"),
    (["--config.init_from={tmp}/empty"], "empty': a directory without a readable config.json"),
])
def test_train_refuses_before_creating_anything(tmp_path, capsys, one_error_line, args,
                                                expect):
    from scvnet_jax import train as tr

    (tmp_path / "notes.txt").write_text("not a model")
    (tmp_path / "empty").mkdir()
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    work = tmp_path / "work"
    assert tr.main(["--config", "demo.py:tiny", "--workdir", str(work), *args]) == 2
    one_error_line(capsys.readouterr().err, expect)
    assert not work.exists()


def test_a_numbered_stage_is_one_error_naming_its_name(tmp_path, capsys, one_error_line):
    """Stages are named; the numbers of earlier versions, in a config file or on the command
    line, are one error line that names the stage's name, before anything is created."""
    from scvnet_jax import train as tr

    (tmp_path / "old.py").write_text("from scvnet_jax.configs import demo\n\n\ndef get_config():\n"
                                     "    c = demo.get_config('tiny')\n    c.stage = 2\n"
                                     "    return c\n")
    work = tmp_path / "work"
    assert tr.main(["--config", str(tmp_path / "old.py"), "--workdir", str(work)]) == 2
    one_error_line(capsys.readouterr().err, "config.stage = 2: stages are named now; use "
                   "config.stage = 'cvnet_rerank'")
    assert tr.main(["--config", "demo.py:tiny", "--workdir", str(work),
                    "--config.stage=3"]) == 2
    one_error_line(capsys.readouterr().err, "use config.stage = 'csa'")
    assert tr.main(["--config", "demo.py:tiny", "--workdir", str(work),
                    "--config.stage=cvnet_globl"]) == 2
    one_error_line(capsys.readouterr().err, "config.stage = 'cvnet_globl': expected one of "
                   "'cvnet_global', 'cvnet_rerank', 'csa', 'ames'")
    assert not work.exists()


def test_a_run_saved_with_a_numbered_stage_resumes(tmp_path):
    """A workdir whose config.json an earlier version wrote (stage 1) resumes under the
    config of the same stage by name, and refuses another stage."""
    run = tmp_path / "run"
    run.mkdir()
    saved = json.loads(tiny().to_json_best_effort())
    saved["stage"] = 1
    (run / "config.json").write_text(json.dumps(saved))
    config.check_workdir(run, tiny())
    with pytest.raises(ConfigError, match="its run has stage = 'cvnet_global', this config "
                                          "'cvnet_rerank'"):
        config.check_workdir(run, tiny(stage="cvnet_rerank"))


def test_train_refuses_a_missing_config_and_a_file_workdir(tmp_path, capsys, one_error_line):
    from scvnet_jax import train as tr

    assert tr.main(["--config", str(tmp_path / "nope.py"), "--workdir", str(tmp_path)]) == 2
    one_error_line(capsys.readouterr().err, "nope.py")
    (tmp_path / "f").write_text("x")
    assert tr.main(["--config", "demo.py:tiny", "--workdir", str(tmp_path / "f")]) == 2
    one_error_line(capsys.readouterr().err, "exists and is not a directory")


def test_resuming_a_checkpointed_run_with_other_total_steps_is_refused(tmp_path, capsys,
                                                                       one_error_line):
    """The learning-rate schedule is built from total_steps: resuming a finished run with a
    larger value would restart the rate mid-run (cosine: from ~0 back to half the peak), so
    it is refused before anything is touched, naming both values and how to go on."""
    from scvnet_jax import train as tr
    from scvnet_jax.training import optim

    cfg = tiny(total_steps=12)
    assert float(optim.learning_rate(cfg)(12)) < 0.01 * cfg.optimizer.lr
    assert float(optim.learning_rate(tiny(total_steps=24))(12)) > 0.4 * cfg.optimizer.lr

    run = tmp_path / "run"
    (run / "checkpoints" / "12").mkdir(parents=True)
    (run / "model").mkdir()
    (run / "config.json").write_text(cfg.to_json_best_effort())
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    assert tr.main(["--config", "demo.py:tiny", "--workdir", str(run),
                    "--config.total_steps=24"]) == 2
    one_error_line(capsys.readouterr().err, f"--workdir {run}: its run has total_steps = 12 "
                   "(finished at step 12), this config 24", "--config.total_steps=12",
                   f"--config.init_from={run / 'model'}")
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    config.check_workdir(run, tiny(total_steps=12))             # the same: resumes
    (run / "checkpoints" / "12").rmdir()
    config.check_workdir(run, tiny(total_steps=24))             # nothing trained yet: fine


def test_ctrl_c_before_the_loop_is_one_line_and_status_130(tmp_path, capsys, monkeypatch):
    """Ctrl-C before the loop's handler is in place (loading, building, restoring): no
    traceback, one line saying how to resume, exit status 130. (In the loop it saves a
    checkpoint first: tests/training/test_stage1.py, test_signal_saves_...)."""
    from scvnet_jax import train as tr
    from scvnet_jax import training

    def interrupted(cfg, workdir, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "train", interrupted)
    assert tr.main(["--config", "demo.py:tiny", "--workdir", str(tmp_path / "w")]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines() == [
        f"interrupted before this progress could be saved (the checkpoints in {tmp_path / 'w'},"
        " if any, are kept); run the same command to resume"]
