"""Training metrics: `W/metrics.jsonl` (one JSON object per logged step, always with `step`
and `loss`; at validation steps also `val/<pipeline>/mAP/<setting>` and
`val/<pipeline>/mP@<k>/<setting>`), TensorBoard summaries in `W/tensorboard/` (tags
`train/<metric>` and `val/...`), and the console progress bar."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path


def _clean(v):
    v = float(v)
    return v if math.isfinite(v) else str(v)  # JSON has no NaN/Inf


class MetricsWriter:
    def __init__(self, workdir: Path, enabled: bool = True, tensorboard: bool = True):
        self.path = Path(workdir) / "metrics.jsonl"
        self.enabled = enabled
        self._tb = None
        if enabled and tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """On resume: drop records of steps after the restored checkpoint (they are redone),
        rewriting the file atomically."""
        if not (self.enabled and self.path.is_file()):
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a torn last line from a killed run
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep))
        os.replace(tmp, self.path)

    def write(self, step: int, metrics: dict, validation: dict | None = None) -> None:
        """`metrics` of training (TensorBoard: train/<name>) and `validation` scores (their
        names, val/..., as they are)."""
        if not self.enabled:
            return
        validation = validation or {}
        rec = {"step": int(step), **{k: _clean(v) for k, v in metrics.items()},
               **{k: _clean(v) for k, v in validation.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(f"train/{k}", float(v), int(step))
            for k, v in validation.items():
                self._tb.add_scalar(k, float(v), int(step))
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir) -> list[dict]:
    path = Path(workdir) / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
