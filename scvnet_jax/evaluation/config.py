"""Default evaluation settings (an ml_collections ConfigDict); configs/eval_*.py start from
these, and eval.py's flags and --config.* overrides change them."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import ml_collections
from ml_collections import config_dict
from ml_collections.config_dict import FieldReference

from scvnet_jax.config_files import check_fields
from scvnet_jax.data import batching
from scvnet_jax.errors import ConfigError


# The official test scripts' four pipelines (the default), and the rerankers of the
# registry that run on either global first stage (`rerank.first_stage`): every pipeline
# but the two global ones is a reranker of `scvnet_jax.rerank.registry`.
GLOBAL_PIPELINES = ("cvnet_global", "superglobal_global")
FIRST_STAGES = GLOBAL_PIPELINES


def official_pipelines() -> tuple:
    """The official test scripts' pipelines (the default): each global one, then the
    rerankers of the registry that run on it alone (cvnet_rerank, superglobal_rerank)."""
    from scvnet_jax.rerank import registry
    return tuple(p for g in GLOBAL_PIPELINES for p in (g, *(
        r.pipeline for r in registry.RERANKERS.values() if r.first_stage == g)))


def rerank_pipelines() -> tuple:
    """The pipelines of the registry's rerankers that rerank `rerank.first_stage`."""
    from scvnet_jax.rerank import registry
    return tuple(r.pipeline for r in registry.RERANKERS.values() if not r.first_stage)


def all_pipelines() -> tuple:
    return official_pipelines() + rerank_pipelines()


def reranker_of(pipeline: str):
    """The registry's reranker that pipeline `pipeline` runs (None: a global one)."""
    from scvnet_jax.rerank import registry
    return next((r for r in registry.RERANKERS.values() if r.pipeline == pipeline), None)


def reranker_options(cfg, reranker) -> dict:
    """The options of `reranker` in its config section (which may hold other fields too:
    the cvnet section's descriptor scales)."""
    from scvnet_jax.config_files import field
    section = field(cfg, reranker.section)
    return {o.name: section[o.name] for o in reranker.options}


def __getattr__(name: str):
    # computed from the registry when asked: a reranker registered at run time is in them
    if name == "PIPELINES":
        return official_pipelines()
    if name == "RERANK_PIPELINES":
        return rerank_pipelines()
    if name == "ALL_PIPELINES":
        return all_pipelines()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "scvnet_jax")


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.dataset = "roxford5k"
    c.data_dir = ""
    c.weights = ""
    c.pipelines = list(official_pipelines())
    c.ks = [1, 5, 10]

    c.cvnet = ml_collections.ConfigDict()
    c.cvnet.scales = [0.7071, 1.0, 1.4142]  # OpenCV-resized inputs of CVNet-Global

    c.superglobal = ml_collections.ConfigDict()
    c.superglobal.descriptor = ml_collections.ConfigDict(
        dict(scales=3, rgem=True, sgem=True, relup=True, gemp=True))

    # the first stage that the rerankers without one of their own rerank
    c.rerank = ml_collections.ConfigDict()
    c.rerank.first_stage = "superglobal_global"   # or "cvnet_global"
    # every reranker's options, in its section (cvnet: cvnet.topk, ...; superglobal:
    # superglobal.rerank.M, ...): the registry's defaults, and what each means
    # (`python -m scvnet_jax.eval --help`, scvnet_jax/rerank/registry.py)
    from scvnet_jax.rerank import registry
    for r in registry.RERANKERS.values():
        node, *path = c, *r.section.split(".")
        for part in path:
            if part not in node:
                node[part] = ml_collections.ConfigDict()
            node = node[part]
        for o in r.options:
            v = o.eval_default
            node[o.name] = config_dict.placeholder(o.kind) if v is None else v

    c.distractors = ""       # revisitop1m.txt (one image path per line) for +R1M
    c.distractors_dir = ""   # folder those paths are relative to (default: the list's folder)

    # results JSON ({dataset}: the dataset's name, e.g. demo, roxford5k+R1M, my_photos for
    # folder:tfds/my_photos); the rankings go beside it, <stem>_ranks.npz
    c.output = "results/{dataset}/results.json"
    c.cache_dir = default_cache_dir()  # "" disables caching
    c.save_visuals = ""
    c.visuals_topn = 10

    c.dtype = "float32"      # "bfloat16" for speed on GPU/TPU (not bit-parity)
    c.batch_size = 0         # images (or rerank pairs) per device per batch; 0 = auto (CPU 1, GPU/TPU 8)
    # pad image sizes up to multiples of this (1: exact sizes), or "auto": a few padded
    # shapes chosen from the images' sizes (data.batching.auto_shapes); results are the same
    c.bucket = FieldReference("auto", field_type=object)
    # pad local-feature sizes for CVNet rerank scoring likewise (cells, or "auto")
    c.feature_bucket = FieldReference("auto", field_type=object)
    c.chunk_size = 64        # images per cached chunk (an interrupted run keeps whole ones)
    c.workers = 4            # image-decoding threads
    c.max_image_pixels = 100_000_000  # larger images are refused from their header
    # working size: images with a longer side are read reduced to it (0 = full size);
    # -1 = full size for roxford5k/rparis6k/gldv2_retrieval (as the official test code reads
    # them; ROxford/RParis/R1M images are at most 1024 px anyway), 1024 for demo and folder:
    c.max_side = -1
    return c


# (field, int or number, test, what is expected)
_RANGES = (
    ("batch_size", "int", lambda v: v >= 0, "an integer >= 0 (images per device; 0 = auto)"),
    ("chunk_size", "int", lambda v: v >= 1, "an integer >= 1 (images per chunk)"),
    ("workers", "int", lambda v: v >= 1, "an integer >= 1 (threads)"),
    ("visuals_topn", "int", lambda v: v >= 1, "an integer >= 1"),
    ("max_image_pixels", "int", lambda v: v >= 1, "an integer >= 1 (pixels)"),
    ("max_side", "int", lambda v: v >= -1, "an integer >= -1 (pixels; 0 = full size, -1 = "
                                           "the dataset's default)"),
)
DATASETS = ("roxford5k", "rparis6k", "demo", "gldv2_retrieval")   # or folder:<dir>/<name>
_CHOICES = (("dtype", ("float32", "bfloat16")), ("rerank.first_stage", FIRST_STAGES),
            ("superglobal.descriptor.scales", (1, 3, 5)))


def validate(cfg) -> None:
    """Ranges, choices and output paths of an evaluation config, before any work: one
    ConfigError naming the field (or flag), its value and what was expected."""
    check_fields(cfg, _RANGES, _CHOICES)
    for name, unit in (("bucket", "pixels; 1 = exact sizes"), ("feature_bucket", "feature cells")):
        try:
            value = batching.parse_bucket(cfg[name])
        except ValueError:
            raise ConfigError(f"config.{name} = {cfg[name]!r}: expected an integer >= 1 "
                              f"({unit}) or 'auto'") from None
        with cfg.unlocked():
            cfg[name] = value
    if cfg.dataset not in DATASETS and not (isinstance(cfg.dataset, str) and
                                            cfg.dataset.startswith("folder:") and
                                            len(cfg.dataset) > len("folder:")):
        raise ConfigError(f"--dataset {cfg.dataset!r}: expected one of {', '.join(DATASETS)} "
                          "or folder:<data_dir>/<name> (a set built by python -m "
                          "scvnet_jax.data.build folder)")
    from scvnet_jax.config_files import field
    from scvnet_jax.rerank import registry
    for r in registry.RERANKERS.values():
        registry.check(r.name, field(cfg, r.section), f"config.{r.section}")
    pipelines = all_pipelines()
    bad = [p for p in cfg.pipelines if p not in pipelines]
    if bad or not cfg.pipelines:
        raise ConfigError(f"config.pipelines = {list(cfg.pipelines)}: expected a non-empty list "
                          f"of {', '.join(pipelines)}")
    for p in cfg.pipelines:     # the weights and files a chosen reranker reads: given, there
        r = reranker_of(p)
        if r is None:
            continue
        section = field(cfg, r.section)
        for o in r.options:
            v = section[o.name]
            if not o.path or not isinstance(v, str):
                continue
            said = f"--{o.flag}" if o.flag else f"config.{r.section}.{o.name}"
            if o.name == "weights" and "weights" in r.needs and not v:
                raise ConfigError(f"{said} '': the {p} pipeline needs {o.help}")
            if v and o.path and not Path(v).expanduser().exists():
                raise ConfigError(f"{said} {v!r}: not found")
    if not cfg.ks or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1
                             for k in cfg.ks):
        raise ConfigError(f"config.ks = {list(cfg.ks)}: expected integers >= 1 (mP@k)")
    if not cfg.cvnet.scales or not all(isinstance(s, (int, float)) and s > 0
                                       for s in cfg.cvnet.scales):
        raise ConfigError(f"config.cvnet.scales = {list(cfg.cvnet.scales)}: expected "
                          "positive numbers")
    if not isinstance(cfg.output, str) or not cfg.output:
        raise ConfigError(f"--output {cfg.output!r}: expected a file path for the results JSON")
    out = output_path(cfg)
    if out.is_dir():
        raise ConfigError(f"--output {cfg.output!r}: expected a file path for the results JSON"
                          + (" (this is a directory)" if cfg.output else ""))
    if out.exists() and not _is_our_results(out):
        raise ConfigError(f"--output {out}: exists and is not a results file of this tool; "
                          "refusing to overwrite it (choose another path)")
    if cfg.save_visuals and Path(cfg.save_visuals).expanduser().exists() and not Path(
            cfg.save_visuals).expanduser().is_dir():
        raise ConfigError(f"--save_visuals {cfg.save_visuals}: exists and is not a directory")
    if cfg.cache_dir and Path(cfg.cache_dir).expanduser().exists() and not Path(
            cfg.cache_dir).expanduser().is_dir():
        raise ConfigError(f"--cache_dir {cfg.cache_dir}: exists and is not a directory")


def output_path(cfg) -> Path:
    """Where the results JSON goes: `cfg.output` with {dataset} replaced by the dataset's
    name (the folder name of folder:<dir>/<name>; +R1M with distractors)."""
    name = str(cfg.dataset)
    if name.startswith("folder:"):
        name = Path(name[len("folder:"):].rstrip("/")).name or "folder"
    name = re.sub(r"[^A-Za-z0-9_.+-]", "_", name) + ("+R1M" if cfg.distractors else "")
    if "{" in cfg.output.replace("{dataset}", ""):
        raise ConfigError(f"--output {cfg.output!r}: the only placeholder it may hold is "
                          "{dataset}")
    return Path(cfg.output.replace("{dataset}", name)).expanduser()


def _is_our_results(path) -> bool:
    """A results JSON eval.py wrote (every value a pipeline's result with its "mAP")."""
    try:
        res = json.loads(open(path).read())
        return isinstance(res, dict) and all(isinstance(v, dict) and "mAP" in v
                                             for k, v in res.items() if k != "meta")
    except (OSError, ValueError, UnicodeDecodeError):
        return False
