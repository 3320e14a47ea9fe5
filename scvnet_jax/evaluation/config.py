"""Default evaluation settings (an ml_collections ConfigDict); configs/eval_*.py start from
these, and eval.py's flags and --config.* overrides change them."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import ml_collections
from ml_collections.config_dict import FieldReference

from scvnet_jax.config_files import check_fields
from scvnet_jax.data import batching
from scvnet_jax.errors import ConfigError


# The official test scripts' four pipelines (the default), and the rerankers of the
# registry that run on either global first stage (`rerank.first_stage`).
PIPELINES = ("cvnet_global", "cvnet_rerank", "superglobal_global", "superglobal_rerank")
RERANK_PIPELINES = ("icfrr", "csa", "alpha_qe", "dba", "ames", "chamfer")
ALL_PIPELINES = PIPELINES + RERANK_PIPELINES
FIRST_STAGES = ("cvnet_global", "superglobal_global")


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "scvnet_jax")


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.dataset = "roxford5k"
    c.data_dir = ""
    c.weights = ""
    c.pipelines = list(PIPELINES)
    c.ks = [1, 5, 10]

    c.cvnet = ml_collections.ConfigDict()
    c.cvnet.scales = [0.7071, 1.0, 1.4142]  # OpenCV-resized inputs of CVNet-Global
    c.cvnet.topk = 100                      # rerank depth
    c.cvnet.protocol = "official"           # "official" (label-aware, per E/M/H) or "blind"
    c.cvnet.mix = 0.5                       # score = similarity + mix * verification score

    c.superglobal = ml_collections.ConfigDict()
    c.superglobal.descriptor = ml_collections.ConfigDict(
        dict(scales=3, rgem=True, sgem=True, relup=True, gemp=True))
    c.superglobal.rerank = ml_collections.ConfigDict(dict(M=400, K=9, beta=0.15))

    # icfrr, csa, alpha_qe, dba: rerankers of `first_stage`'s ranking (none looks at labels)
    c.rerank = ml_collections.ConfigDict()
    c.rerank.first_stage = "superglobal_global"   # or "cvnet_global"
    # the official ICFRR defaults; shortlist 0 = the whole gallery (the official method),
    # max_bytes 0 = 4 GiB (SCVNET_ICFRR_MAX_BYTES)
    c.icfrr = ml_collections.ConfigDict(dict(KG=256, KQ=250, beta=0.5, n_times=5,
                                             limited_memory=False, shortlist=0, max_bytes=0))
    # weights: a CSA model directory (train.py writes one) or an official checkpoint;
    # topk 0: the topk a model of ours was trained with (its model directory records it),
    # 128 for official checkpoints
    c.csa = ml_collections.ConfigDict(dict(weights="", topk=0, dtype="float32"))
    # AMES: weights = an AMES model directory (train.py, configs/ames_demo.py) or the
    # official checkpoint; detector = the official detector checkpoint ("" = our model
    # directory's choice; the official CVNet AMES weights need the official detector);
    # k (shortlist reranked), lamb, temp: -1/0 = the model's defaults (official weights: the
    # authors' best for CVNet, fp lamb 0.85 temp 0.8, dist 0.65 / 0.2; k 100); query_len,
    # db_len: local descriptors per query / database image (0 = the model's; official
    # weights: 600 / 50, the authors' README command); protocol "official"
    # (the authors' evaluate(): junk, resp. junk + easy, moved to the end of each query's
    # shortlist, Medium and Hard separately) or "blind" (the plain top k)
    c.ames = ml_collections.ConfigDict(dict(weights="", detector="", protocol="official", k=0,
                                            lamb=-1.0, temp=-1.0, query_len=0, db_len=0,
                                            batch_size=0))
    # chamfer: the training-free local score on the same descriptors (no weights; detector
    # "" = the model's own stage-3 features); lamb: weight of the first stage's similarity
    # (0.4: benchmarks/tune_rerankers.py on the demo training photos; 0 = the local score alone)
    c.chamfer = ml_collections.ConfigDict(dict(detector="", protocol="official", k=100,
                                               lamb=0.4, query_len=64, db_len=64,
                                               bits=False, batch_size=8))
    # Radenovic et al.'s alpha-QE (n_QE = 2, alpha = 3) and alpha-DBA settings
    c.alpha_qe = ml_collections.ConfigDict(dict(k=2, alpha=3.0))
    c.dba = ml_collections.ConfigDict(dict(k=2, alpha=3.0))

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
    ("cvnet.topk", "int", lambda v: v >= 1, "an integer >= 1 (images reranked)"),
    ("cvnet.mix", "num", lambda v: v >= 0, "a number >= 0"),
    ("superglobal.rerank.M", "int", lambda v: v >= 1, "an integer >= 1"),
    ("superglobal.rerank.K", "int", lambda v: v >= 1, "an integer >= 1"),
    ("superglobal.rerank.beta", "num", lambda v: v >= 0, "a number >= 0"),
    ("icfrr.KG", "int", lambda v: v >= 1, "an integer >= 1"),
    ("icfrr.KQ", "int", lambda v: v >= 1, "an integer >= 1"),
    ("icfrr.beta", "num", lambda v: True, "a number"),
    ("icfrr.n_times", "int", lambda v: v >= 0, "an integer >= 0"),
    ("icfrr.shortlist", "int", lambda v: v >= 0, "an integer >= 0 (0: the whole gallery)"),
    ("icfrr.max_bytes", "int", lambda v: v >= 0, "an integer >= 0 (0: the default limit)"),
    ("csa.topk", "int", lambda v: v >= 0, "an integer >= 0 (0 = the model's training topk, "
                                          "128 for official checkpoints)"),
    ("ames.k", "int", lambda v: v >= 0, "an integer >= 0 (0 = the model's default)"),
    ("ames.lamb", "num", lambda v: v == -1 or 0 <= v <= 1, "a number in [0, 1] (-1 = the "
                                                          "model's default)"),
    ("ames.temp", "num", lambda v: v == -1 or v > 0, "a number > 0 (-1 = the model's default)"),
    ("ames.query_len", "int", lambda v: v >= 0, "an integer >= 0 (0 = the model's default)"),
    ("ames.db_len", "int", lambda v: v >= 0, "an integer >= 0 (0 = the model's default)"),
    ("ames.batch_size", "int", lambda v: v >= 0, "an integer >= 0 (pairs per call; 0 = auto)"),
    ("chamfer.k", "int", lambda v: v >= 1, "an integer >= 1 (images reranked)"),
    ("chamfer.lamb", "num", lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    ("chamfer.query_len", "int", lambda v: v >= 1, "an integer >= 1"),
    ("chamfer.db_len", "int", lambda v: v >= 1, "an integer >= 1"),
    ("chamfer.batch_size", "int", lambda v: v >= 1, "an integer >= 1 (queries per call)"),
    ("alpha_qe.k", "int", lambda v: v >= 0, "an integer >= 0"),
    ("alpha_qe.alpha", "num", lambda v: v >= 0, "a number >= 0"),
    ("dba.k", "int", lambda v: v >= 0, "an integer >= 0"),
    ("dba.alpha", "num", lambda v: v >= 0, "a number >= 0"),
)
DATASETS = ("roxford5k", "rparis6k", "demo", "gldv2_retrieval")   # or folder:<dir>/<name>
_CHOICES = (("dtype", ("float32", "bfloat16")),
            ("cvnet.protocol", ("official", "blind")), ("rerank.first_stage", FIRST_STAGES),
            ("csa.dtype", ("float32", "float64")), ("ames.protocol", ("official", "blind")),
            ("chamfer.protocol", ("official", "blind")),
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
    bad = [p for p in cfg.pipelines if p not in ALL_PIPELINES]
    if bad or not cfg.pipelines:
        raise ConfigError(f"config.pipelines = {list(cfg.pipelines)}: expected a non-empty list "
                          f"of {', '.join(ALL_PIPELINES)}")
    if "csa" in cfg.pipelines:
        w = Path(str(cfg.csa.weights)).expanduser()
        if not cfg.csa.weights or not w.exists():
            raise ConfigError(f"--csa_weights {cfg.csa.weights!r}: "
                              + ("the csa pipeline needs CSA weights (a model directory "
                                 "written by train.py, or an official checkpoint)"
                                 if not cfg.csa.weights else "not found"))
    if "ames" in cfg.pipelines:
        for flag, field in (("--ames_weights", "weights"), ("--ames_detector", "detector")):
            v = str(cfg.ames[field])
            if field == "weights" and not v:
                raise ConfigError("--ames_weights '': the ames pipeline needs AMES weights (a "
                                  "model directory written by train.py, or an official AMES "
                                  "checkpoint)")
            if v and not Path(v).expanduser().exists():
                raise ConfigError(f"{flag} {v!r}: not found")
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
