"""Validation during training (the CVNet stages cvnet_global and cvnet_rerank): every
`config.eval.every_steps` steps and at the last step, the model of the current parameters is
scored on a held-out benchmark by eval.py's own code (`scvnet_jax.evaluation.pipelines` on
the retrieval engine), on this process's devices (on several processes each extracts its
share, as eval.py does).

The scores join that step's record in W/metrics.jsonl and TensorBoard as
`val/<pipeline>/mAP/<setting>` and `val/<pipeline>/mP@<k>/<setting>` (fractions in [0, 1]),
and W/model_best is rewritten (atomically, a model directory like W/model) whenever the
`config.eval.best_by` score beats every earlier one of the run. Validation reads no random
numbers and leaves the data iterator alone, so a resumed run stays bit-identical; on resume
the best score so far is read back from metrics.jsonl.

Descriptors are not cached (the weights change between evaluations); compiled programs are.
"""
from __future__ import annotations

import time
from pathlib import Path

from scvnet_jax.errors import ConfigError

STAGES = ("cvnet_global", "cvnet_rerank")
# the pipelines that need nothing but the CVNet being trained
PIPELINES = ("cvnet_global", "cvnet_rerank", "superglobal_global", "superglobal_rerank",
             "alpha_qe", "dba", "icfrr")
DEFAULT_PIPELINES = {"cvnet_global": ("cvnet_global",),
                     "cvnet_rerank": ("cvnet_global", "cvnet_rerank")}
DATASETS = ("auto", "demo", "roxford5k", "rparis6k", "gldv2_retrieval")
DEFAULT_SETTING = {"revisitop": "M", "single": "all", "gldv2": "private"}
BEST_DIR = "model_best"


def enabled(cfg) -> bool:
    return "eval" in cfg and int(cfg.eval.every_steps) > 0


def pipelines_of(cfg) -> list[str]:
    return list(cfg.eval.pipelines) or list(DEFAULT_PIPELINES.get(cfg.stage, ()))


def check_config(cfg) -> None:
    """The eval fields of a training config (before any work): one ConfigError."""
    if not enabled(cfg):
        return
    e = cfg.eval
    if cfg.stage not in STAGES:
        raise ConfigError(f"config.eval.every_steps = {e.every_steps}: validation during "
                          f"training is for the CVNet stages {' and '.join(STAGES)}, not "
                          f"{cfg.stage!r}; set config.eval.every_steps=0 and score the model "
                          "with eval.py")
    pipes = pipelines_of(cfg)
    if not pipes or any(p not in PIPELINES for p in pipes):
        raise ConfigError(f"config.eval.pipelines = {list(e.pipelines)}: expected a list of "
                          f"{', '.join(PIPELINES)}")
    ds = e.dataset
    if not isinstance(ds, str) or not (ds in DATASETS or (ds.startswith("folder:")
                                                          and len(ds) > len("folder:"))):
        raise ConfigError(f"config.eval.dataset = {ds!r}: expected one of "
                          f"{', '.join(DATASETS)} or folder:<data_dir>/<name>")
    if ds in ("roxford5k", "rparis6k", "gldv2_retrieval") and not e.data_dir:
        raise ConfigError(f"config.eval.dataset = {ds!r} needs config.eval.data_dir (the "
                          f"folder holding {ds}/)")
    if e.best_by:
        pipe = str(e.best_by).split("/")[0]
        if "/" not in str(e.best_by) or pipe not in pipes:
            raise ConfigError(f"config.eval.best_by = {e.best_by!r}: expected "
                              f"<pipeline>/<setting> with a pipeline of {', '.join(pipes)}, "
                              "e.g. cvnet_global/M (folder sets: cvnet_global/all)")


def resolve_dataset(cfg) -> str | None:
    """config.eval.dataset, "auto" resolved: demo for the demo set, the held-out split of a
    folder set; None when "auto" finds none."""
    ds = cfg.eval.dataset
    if ds != "auto":
        return ds
    if cfg.data.name == "demo_landmarks":
        return "demo"
    from scvnet_jax.data import folder
    try:
        meta = folder.prepared_metadata(cfg.data.name, Path(cfg.data.data_dir).expanduser())
    except Exception:
        meta = None
    if meta and meta.get("format") == folder.FORMAT and meta.get("eval_class_names"):
        return f"folder:{Path(cfg.data.data_dir).expanduser() / cfg.data.name}"
    return None


def make(cfg, task, workdir, lead: bool) -> "Validator | None":
    """The run's Validator, or None when validation is off (or "auto" finds no held-out
    split: said once)."""
    if not enabled(cfg):
        return None
    name = resolve_dataset(cfg)
    if name is None:
        if lead:
            print(f"validation off: {cfg.data.name} has no held-out split (set "
                  "config.eval.dataset to demo, folder:<data_dir>/<name> or a benchmark)")
        return None
    return Validator(cfg, task, Path(workdir), name, lead)


class Validator:
    def __init__(self, cfg, task, workdir: Path, dataset: str, lead: bool):
        import os

        from scvnet_jax.evaluation import config as eval_config, pipelines

        self.task, self.workdir, self.lead = task, workdir, lead
        self.every = int(cfg.eval.every_steps)
        e = eval_config.default_config()
        e.dataset, e.data_dir, e.pipelines = dataset, str(cfg.eval.data_dir), pipelines_of(cfg)
        e.cvnet.topk, e.cvnet.protocol = int(cfg.eval.topk), str(cfg.eval.protocol)
        e.batch_size, e.bucket = int(cfg.eval.batch_size), int(cfg.eval.bucket)
        cache = e.cache_dir
        e.cache_dir = ""                   # new weights at every evaluation
        if dataset == "demo":
            from scvnet_jax.data import demo
            e.data_dir = e.data_dir or os.path.join(cache, "demo_benchmark")
            demo.build_benchmark(e.data_dir)
        self.cfg = e
        self.dataset = pipelines.open_dataset(dataset, e.data_dir, cache)
        pipe, _, setting = str(cfg.eval.best_by).partition("/")
        self.pipeline = pipe or e.pipelines[-1]
        self.setting = setting or DEFAULT_SETTING[self.dataset.protocol]
        if self.setting not in self.dataset.settings:
            raise ConfigError(f"config.eval.best_by = {cfg.eval.best_by!r}: {dataset} reports "
                              f"the settings {', '.join(self.dataset.settings)}")
        self.key = f"val/{self.pipeline}/mAP/{self.setting}"
        self.best = None
        if lead:
            print(f"validation every {self.every} steps on {self.dataset.name} "
                  f"({self.dataset.n_queries} queries, {self.dataset.n_db} images): "
                  f"{', '.join(e.pipelines)}; W/{BEST_DIR} by {self.key}", flush=True)

    def resume(self, records) -> None:
        """The best score of the steps already done (metrics.jsonl up to the checkpoint)."""
        seen = [r[self.key] for r in records if isinstance(r.get(self.key), float)]
        self.best = max(seen) if seen else None

    def due(self, step: int, total: int) -> bool:
        return step % self.every == 0 or step == total

    def run(self, state, step: int) -> dict:
        """{"val/<pipeline>/mAP/<setting>": .., "val/<pipeline>/mP@<k>/<setting>": ..} of
        the model of `state`; writes W/model_best (lead process) when it is the best."""
        import jax.numpy as jnp

        from scvnet_jax.api import RetrievalModel
        from scvnet_jax.evaluation import pipelines
        from scvnet_jax.models.cvnet import CVNet, resolve_precision
        from scvnet_jax.training.config import arch_of

        t0 = time.perf_counter()
        variables, _ = self.task.cvnet_variables(state)
        dtype = jnp.dtype(self.cfg.dtype)     # as eval.py loads W/model
        module = CVNet(arch_of(self.task.cfg), dtype=dtype,
                       precision=resolve_precision(dtype, "auto"))
        model = RetrievalModel(module, variables, source=f"{self.workdir} step {step}")
        results = pipelines.evaluate(self.cfg, model, self.dataset)
        out = {}
        for r in results:
            out.update({f"val/{r.name}/mAP/{s}": float(v) for s, v in r.mAP.items()})
            for s, row in r.mpk.items():
                out.update({f"val/{r.name}/mP@{k}/{s}": float(v)
                            for k, v in zip(self.cfg.ks, row)})
        value = out[self.key]
        best = self.best is None or value > self.best
        if best:
            self.best = value
            if self.lead:
                meta = {"validation": {"step": int(step), "dataset": self.dataset.name,
                                       "best_by": self.key, **out}}
                self.task.export(state, step, out=BEST_DIR, meta=meta)
        if self.lead:
            line = ", ".join(f"{r.name} " + " ".join(f"{s} {100 * v:.2f}"
                                                     for s, v in r.mAP.items())
                             for r in results)
            print(f"validation at step {step} ({self.dataset.name}, mAP %): {line}"
                  + (f"; best so far, written to {self.workdir / BEST_DIR}" if best else "")
                  + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
        return out
