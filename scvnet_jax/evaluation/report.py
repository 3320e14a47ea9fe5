"""Results as a printed table, `results.json` and `results_ranks.npz`, written atomically."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from scvnet_jax.evaluation.config import rerank_pipelines
from scvnet_jax.evaluation.pipelines import PipelineResult
from scvnet_jax.files import atomic_save_npz, atomic_write_bytes


def table(results: Sequence[PipelineResult], ks: Sequence[int], title: str = "",
          metric: str = "mAP") -> str:
    """One block per pipeline: a row per setting (E, M, H; or the benchmark's); `metric`
    (mAP, or mAP@100 for GLDv2) and mP@k in percent."""
    width = max([4] + [len(s) + 1 for r in results for s in r.mAP])
    head = f"{'':{width}}{metric:>8}" + "".join(f"{f'mP@{k}':>8}" for k in ks)
    lines = [title] if title else []
    for r in results:
        on = f", on {r.info['first_stage']}" if r.name in rerank_pipelines() else ""
        lines.append(f"{r.name} (protocol: {r.protocol}{on})")
        lines.append(head)
        for s in r.mAP:
            lines.append(f"{s:{width}}{100 * r.mAP[s]:8.2f}" + "".join(f"{100 * v:8.2f}"
                                                                   for v in r.mpk[s]))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def to_json(results: Sequence[PipelineResult], ks: Sequence[int], meta: dict,
            extra: dict | None = None) -> dict:
    """{"<pipeline>": {"mAP": {E, M, H}, "mP@k": {E: [..], ..}, "ks": [..], "protocol": ..,
    (rerankers: "first_stage", "rerank_ms_per_query"), **meta, **extra[pipeline],
    "per_query": [..], ("per_class": {..})}} with fractions in [0, 1] (`per_query_json`)."""
    extra = extra or {}
    return {r.name: {"mAP": r.mAP, "mP@k": r.mpk, "ks": list(ks), "protocol": r.protocol,
                     **r.info, **meta, **extra.get(r.name, {}), **per_query_json(r)}
            for r in results}


def per_query_json(r: PipelineResult) -> dict:
    """{"per_query": [{"query": name, ("class": its class,) "AP": {setting: AP or None}}],
    and for a benchmark whose queries have classes (folder sets) "per_class": {class:
    {"queries": n, "AP": {setting: mean AP of its queries or None}}}}. None: the query does
    not count in that setting (no positives; GLDv2: the other Usage subset), so each
    setting's mAP is the mean of its queries' non-None APs."""
    if not r.aps:
        return {}
    aps = {s: np.asarray(v, np.float64) for s, v in r.aps.items()}
    n = len(next(iter(aps.values())))
    names = r.queries or [str(i) for i in range(n)]

    def num(v):
        return None if np.isnan(v) else float(v)

    rows = []
    for i in range(n):
        row = {"query": names[i]}
        if r.classes is not None:
            row["class"] = r.classes[i]
        rows.append({**row, "AP": {s: num(a[i]) for s, a in aps.items()}})
    out = {"per_query": rows}
    if r.classes is not None:
        labels = np.asarray(r.classes, dtype=object)
        out["per_class"] = {}
        for c in sorted(set(r.classes)):
            sel = labels == c
            means = {}
            for s, a in aps.items():
                v = a[sel][~np.isnan(a[sel])]
                means[s] = float(v.mean()) if v.size else None
            out["per_class"][c] = {"queries": int(sel.sum()), "AP": means}
    return out


def ranks_arrays(results: Sequence[PipelineResult]) -> dict[str, np.ndarray]:
    """`<pipeline>` or `<pipeline>_E/_M/_H` -> (n_db, n_queries) int64."""
    out = {}
    for r in results:
        for setting, ranks in r.ranks.items():
            out[f"{r.name}_{setting}" if setting else r.name] = np.asarray(ranks, np.int64)
    return out


def ranks_path(output: Path) -> Path:
    output = Path(output)
    return output.with_name(f"{output.stem}_ranks.npz")


def write(results: Sequence[PipelineResult], ks, meta: dict, output,
          extra: dict | None = None) -> tuple[Path, Path]:
    """Writes results.json and, beside it, <stem>_ranks.npz; each atomically."""
    output = Path(output)
    rp = ranks_path(output)
    text = json.dumps(to_json(results, ks, meta, extra), indent=2) + "\n"
    atomic_save_npz(rp, **ranks_arrays(results))
    try:
        atomic_write_bytes(output, text.encode())
    except BaseException:
        rp.unlink(missing_ok=True)   # ours, just written: a failed run leaves neither file
        raise
    return output, rp
