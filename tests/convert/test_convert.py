"""The converter: formats, wrappers, depth detection and one clear error per bad input."""
from __future__ import annotations

import functools
import json
import shutil

import jax
import numpy as np
import pytest

import scvnet_jax as sj
from scvnet_jax.convert import CheckpointError, convert, load_torch_file, mapping
from scvnet_jax.models import Arch, cvnet

SMALL = Arch(depth=50, width=8, reduction_dim=32, corr_dim=16)


def _flat(variables):
    return {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_flatten_with_path(variables)[0]}


def _assert_same_variables(a, b):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


@functools.lru_cache(maxsize=1)
def _small_model():
    variables = jax.tree.map(np.asarray, cvnet.init(SMALL, 0))
    return variables, mapping.variables_to_state_dict(variables)


def _small_state_dict():
    """(variables, state dict) of a width-8 R50, fresh copies (initialised once)."""
    variables, sd = _small_model()
    return variables, dict(sd)


def test_zip_and_legacy_formats_give_identical_weights(official_checkpoint):
    a = sj.load(official_checkpoint(50))
    b = sj.load(official_checkpoint(50, legacy=True))
    _assert_same_variables(a.variables, b.variables)


def test_weights_are_the_fixture_weights(official_checkpoint, parity_state_dict):
    """Round trip: converted variables map back to exactly the fixture's state dict."""
    model = sj.load(official_checkpoint(50))
    back = mapping.variables_to_state_dict(model.variables)
    ref = {k: v for k, v in parity_state_dict(50).items() if not k.endswith("num_batches_tracked")}
    back = {k: v for k, v in back.items() if not k.endswith("num_batches_tracked")}
    assert back.keys() == ref.keys()
    for k in ref:
        np.testing.assert_array_equal(back[k], ref[k], err_msg=k)
    assert float(np.asarray(model.variables["params"]["encoder_q"]["head"]["pool"]["p"])[0]) == pytest.approx(2.7)


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("wrap", ["bare", "model_state", "module_prefix"])
def test_wrappers_and_detected_architecture(tmp_path, wrap, legacy, torch_save):
    variables, sd = _small_state_dict()
    if wrap == "module_prefix":
        sd = {f"module.{k}": v for k, v in sd.items()}
    obj = {"epoch": 3, "model_state": sd} if wrap == "model_state" else sd
    model = sj.load(torch_save(obj, tmp_path / "small.pth", legacy))
    assert model.arch == SMALL
    _assert_same_variables(model.variables, variables)


def test_r50_asked_as_r101_lists_missing_blocks(official_checkpoint):
    with pytest.raises(CheckpointError) as e:
        sj.load(official_checkpoint(50), depth=101)
    msg = str(e.value)
    assert "does not fit CVNet-R101" in msg and "missing keys (255)" in msg
    assert "encoder_q.s3.b7.*" in msg and "unexpected" not in msg


def test_misshaped_and_unexpected_keys_are_listed(tmp_path, torch_save):
    _, sd = _small_state_dict()
    sd["conv2ds.1.weight"] = sd["conv2ds.1.weight"][:, :-1]
    sd["encoder_q.extra.weight"] = np.zeros(3, np.float32)
    del sd["cv_learner.mlp.2.bias"]
    with pytest.raises(CheckpointError) as e:
        sj.load(torch_save(sd, tmp_path / "bad.pth"))
    msg = str(e.value)
    assert "missing keys (1): cv_learner.mlp.2.bias" in msg
    assert "unexpected keys (1): encoder_q.extra.weight" in msg
    assert "mis-shaped keys (1): conv2ds.1.weight (16, 127, 3, 3) (expected (16, 128, 3, 3))" in msg


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_file(tmp_path, legacy, torch_save):
    _, sd = _small_state_dict()
    full = torch_save(sd, tmp_path / "full.pth", legacy).read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(full[: len(full) * 2 // 3])
    with pytest.raises(CheckpointError, match="truncated|corrupt|malformed"):
        sj.load(cut)


@pytest.mark.parametrize("content", [b"", b"hello world\n", b"\x89PNG\r\n\x1a\n" + bytes(64),
                                     b"\xff\xd8\xff\xe0" + bytes(64)])
def test_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "not_a_checkpoint.pyth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_torch_file(path)


def test_a_zip_that_is_not_torch(tmp_path):
    path = tmp_path / "archive.pyth"
    shutil.make_archive(str(tmp_path / "archive"), "zip", root_dir=tmp_path, base_dir=".")
    (tmp_path / "archive.zip").rename(path)
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_torch_file(path)


def test_a_torch_file_that_is_not_cvnet(tmp_path, torch_save):
    path = torch_save({"model_state": {"fc.weight": np.zeros((2, 2), np.float32)}},
                       tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a CVNet checkpoint"):
        sj.load(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint file not found: .*nope.pyth"):
        sj.load(tmp_path / "nope.pyth")


def test_converted_directory_round_trip_and_errors(tmp_path, torch_save):
    variables, sd = _small_state_dict()
    src = torch_save(sd, tmp_path / "small.pth")
    out = convert(src, tmp_path / "model")
    _assert_same_variables(sj.load(out).variables, variables)
    assert sj.load(out).arch == SMALL

    with pytest.raises(CheckpointError, match="already exists and is not empty"):
        convert(src, out)
    convert(src, out, overwrite=True)
    assert not list(tmp_path.glob(".model.*"))  # no temporary left behind
    users = tmp_path / "users_folder"          # --overwrite replaces model dirs, nothing else
    users.mkdir()
    (users / "thesis.tex").write_text("mine")
    with pytest.raises(CheckpointError, match="not a scvnet_jax model directory; refusing"):
        convert(src, users, overwrite=True)
    assert (users / "thesis.tex").read_text() == "mine"
    (out / "notes.txt").write_text("mine too")  # our model directory holding a user's file
    with pytest.raises(CheckpointError, match=r"holds files that are not part of a model "
                                              r"directory \(notes.txt\); refusing"):
        convert(src, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine too"
    (out / "notes.txt").unlink()

    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["arch"]["reduction_dim"] = 64  # the state no longer fits the declared architecture
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="mis-shaped keys"):
        sj.load(out)

    cfg_path.write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: cannot read"):
        sj.load(out)

    cfg_path.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(CheckpointError, match="not a scvnet_jax model directory"):
        sj.load(out)

    with pytest.raises(CheckpointError, match="without config.json"):
        sj.load(tmp_path)


def test_cli(tmp_path, capsys, run_module, torch_save):
    from scvnet_jax.convert import main

    _, sd = _small_state_dict()
    src = torch_save(sd, tmp_path / "small.pth")
    assert main([str(src), str(tmp_path / "out")]) == 0
    assert "CVNet-R50" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "--overwrite" in capsys.readouterr().out
    bad = run_module("convert", src, tmp_path / "out2", "--depth", "101")   # the real process
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr
    assert "missing keys" in bad.stderr
