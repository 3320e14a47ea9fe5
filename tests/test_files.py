"""Writes never leave a partial file: a full disk (ENOSPC) or a read-only folder is one
OutputError naming the file, the old file (if any) is untouched and no temporary remains;
a results file and its ranks are written both or neither."""
from __future__ import annotations

import errno
import io
import os

import numpy as np
import pytest

from scvnet_jax import files
from scvnet_jax.errors import OutputError, ScvnetError


class _FullDisk(io.BytesIO):
    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture
def full_disk(monkeypatch):
    real = os.fdopen

    def fdopen(fd, *a, **k):
        os.close(fd)
        return _FullDisk()
    monkeypatch.setattr(files.os, "fdopen", fdopen)
    yield
    monkeypatch.setattr(files.os, "fdopen", real)


def test_full_disk_leaves_the_old_file_and_no_temporary(tmp_path, full_disk):
    path = tmp_path / "results.json"
    path.write_text("old")
    with pytest.raises(OutputError, match="results.json: cannot write it \\(No space left on "
                                          "device\\); nothing was written"):
        files.atomic_write_bytes(path, b"new")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    with pytest.raises(ScvnetError):       # what every CLI catches
        files.atomic_save_npz(tmp_path / "c.npz", a=np.zeros(3))
    assert not (tmp_path / "c.npz").exists()


def test_results_and_ranks_are_written_both_or_neither(tmp_path, monkeypatch):
    from scvnet_jax.evaluation import report
    from scvnet_jax.evaluation.pipelines import PipelineResult

    r = PipelineResult("cvnet_global", "label-free", {"": np.zeros((3, 2), np.int64)},
                       {"E": 0.5, "M": 0.5, "H": 0.5}, {s: [0.5] for s in "EMH"})
    real = files.atomic_write_bytes

    def fail_on_json(path, data):
        if str(path).endswith(".json"):
            raise OutputError(f"{path}: cannot write it (No space left on device)")
        return real(path, data)
    monkeypatch.setattr(report, "atomic_write_bytes", fail_on_json)
    with pytest.raises(OutputError):
        report.write([r], [1], {}, tmp_path / "results.json")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(report, "atomic_write_bytes", real)
    out, ranks = report.write([r], [1], {}, tmp_path / "results.json")
    assert out.exists() and ranks.exists()
