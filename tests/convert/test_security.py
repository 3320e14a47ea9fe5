"""A checkpoint whose pickle tries to run code is refused and nothing runs.

Each payload is first shown to be live (plain `pickle.loads` does create the canary
file), then our loader must refuse it with a clear error and leave no canary behind.
"""
from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile

import pytest

import scvnet_jax as sj
from scvnet_jax.convert import CheckpointError, load_torch_file


class _System:
    """Unpickles as os.system(cmd)."""

    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return os.system, (self.cmd,)


class _Eval:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return eval, (self.code,)


def _zip_checkpoint(path, payload: bytes):
    """Wraps a pickle into the zip layout torch.save writes."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")


def _legacy_checkpoint(path, payload: bytes):
    """Wraps a pickle into the pre-1.6 torch.save layout."""
    with open(path, "wb") as f:
        for header in (0x1950A86A20F9469CFC6C, 1001,
                       {"protocol_version": 1001, "little_endian": True}):
            pickle.dump(header, f, protocol=2)
        f.write(payload)
        pickle.dump([], f, protocol=2)


def _payloads(canary):
    touch = f"touch {canary}"
    return {
        "os.system": pickle.dumps({"model_state": {"w": _System(touch)}}, protocol=2),
        "builtins.eval": pickle.dumps(
            {"model_state": _Eval(f"open({str(canary)!r}, 'w').close()")}, protocol=2),
    }


@pytest.mark.parametrize("layout", ["zip", "legacy"])
@pytest.mark.parametrize("kind", ["os.system", "builtins.eval"])
def test_code_in_pickle_is_refused(tmp_path, layout, kind):
    canary = tmp_path / "canary"
    payload = _payloads(canary)[kind]

    pickle.loads(payload)  # the payload is live: unrestricted unpickling runs it
    assert canary.exists()
    canary.unlink()

    ckpt = tmp_path / f"evil_{layout}.pyth"
    (_zip_checkpoint if layout == "zip" else _legacy_checkpoint)(ckpt, payload)
    with pytest.raises(CheckpointError, match=r"refusing to load the global '(posix|os|builtins|__builtin__)\.(system|eval)'"):
        load_torch_file(ckpt)
    with pytest.raises(CheckpointError):
        sj.load(ckpt)
    assert not canary.exists()


def test_any_global_outside_the_allow_list_is_refused(tmp_path):
    # A harmless-looking global is refused as well: the list admits tensor data only.
    payload = pickle.dumps({"model_state": {"w": io.BytesIO}}, protocol=2)
    ckpt = tmp_path / "other.pyth"
    _zip_checkpoint(ckpt, payload)
    with pytest.raises(CheckpointError, match=r"'_io\.BytesIO'"):
        load_torch_file(ckpt)


# Hand-assembled pickles (protocol 2 opcodes) for records that normal pickling cannot
# produce without torch itself.
def _str(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _state_dict_pickle(value_ops: bytes) -> bytes:
    """{"model_state": {"w": <value>}}"""
    return (b"\x80\x02}" + _str("model_state") + b"}" + _str("w") + value_ops + b"ss.")


def test_pickle_cannot_tamper_with_allowed_objects(tmp_path):
    # BUILD on the shared FloatStorage stand-in (to swap its dtype for later loads).
    payload = (b"\x80\x02" + _global("torch", "FloatStorage") + b"}" + _str("dtype")
               + _str("object") + b"sb.")
    ckpt = tmp_path / "tamper.pyth"
    _zip_checkpoint(ckpt, payload)
    with pytest.raises(CheckpointError, match="modify a storage type"):
        load_torch_file(ckpt)


def _tensor_ops(numel_in_record: int, size: int) -> bytes:
    """_rebuild_tensor_v2(storage '0' (FloatStorage, numel), 0, (size,), (1,), False, {})"""
    storage = (b"(" + _str("storage") + _global("torch", "FloatStorage") + _str("0")
               + _str("cpu") + b"M" + struct.pack("<H", numel_in_record) + b"tQ")
    args = (storage + b"K\x00" + b"(M" + struct.pack("<H", size) + b"t" + b"(K\x01t"
            + b"\x89}")
    return _global("torch._utils", "_rebuild_tensor_v2") + b"(" + args + b"tR"


def test_hand_made_tensor_record_loads(tmp_path):
    """The opcode helper makes a valid checkpoint (so the next test fails for its reason)."""
    ckpt = tmp_path / "ok.pyth"
    with zipfile.ZipFile(ckpt, "w") as z:
        z.writestr("archive/data.pkl", _state_dict_pickle(_tensor_ops(4, 4)))
        z.writestr("archive/data/0", struct.pack("<4f", 1, 2, 3, 4))
    assert load_torch_file(ckpt)["model_state"]["w"].tolist() == [1, 2, 3, 4]


@pytest.mark.parametrize("numel_in_record", [4, 1000])
def test_forged_sizes_do_not_read_past_the_storage(tmp_path, numel_in_record):
    ckpt = tmp_path / "forged.pyth"
    with zipfile.ZipFile(ckpt, "w") as z:
        z.writestr("archive/data.pkl", _state_dict_pickle(_tensor_ops(numel_in_record, 1000)))
        z.writestr("archive/data/0", struct.pack("<4f", 1, 2, 3, 4))
    with pytest.raises(CheckpointError, match="past the end|has 16 bytes"):
        load_torch_file(ckpt)
