"""Default training settings (ml_collections); configs/*.py start from these, and any field
can be overridden on the command line (`--config.optimizer.lr=0.01`).

Field names other tools rely on: `total_steps`, `checkpoint_every_steps`, `batch_size`
(global, over all devices and processes), `seed`, and the workdir's `metrics.jsonl`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import ml_collections

from scvnet_jax.config_files import check_fields, field as get_field
from scvnet_jax.errors import ConfigError
from scvnet_jax.models.arch import Arch

DTYPES = ("float32", "bfloat16")
# The training stages, by name: CVNet-Global (the backbone and global descriptor), CVNet-Rerank
# (the rerank head on a frozen CVNet-Global backbone), the CSA reranker, the AMES reranker.
STAGES = ("cvnet_global", "cvnet_rerank", "csa", "ames")
# Earlier versions numbered them 1-4; a run's saved config.json may still hold the number.
NUMBERED_STAGES = dict(enumerate(STAGES, start=1))


def stage_of(cfg) -> str:
    """cfg.stage, checked: one of STAGES. A number (the old 1-4) is a ConfigError naming
    the stage's name."""
    s = cfg.stage
    number = s if isinstance(s, int) and not isinstance(s, bool) else (
        int(s) if isinstance(s, str) and s.strip().isdigit() else None)
    if number in NUMBERED_STAGES:
        raise ConfigError(f"config.stage = {s!r}: stages are named now; use config.stage = "
                          f"{NUMBERED_STAGES[number]!r}")
    if s not in STAGES:
        raise ConfigError(f"config.stage = {s!r}: expected one of "
                          f"{', '.join(repr(n) for n in STAGES)}")
    return s


def saved_stage(value) -> str:
    """The stage of a run's saved config.json (the number earlier versions wrote, or a
    name), as a name; an unknown value is returned as it is."""
    return NUMBERED_STAGES.get(value, value) if isinstance(value, int) else value


def default_config() -> ml_collections.ConfigDict:
    """Settings shared by every stage, then each stage's own section."""
    c = ml_collections.ConfigDict()
    # any type, so that a number (the old 1-4) reaches stage_of's message rather than
    # ml_collections' type error
    c.stage = ml_collections.FieldReference("cvnet_global", field_type=object)  # STAGES
    c.seed = 0
    c.total_steps = 1000
    c.batch_size = 128               # global
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    c.log_every_steps = 50
    c.init_from = ""                 # official .pyth/.pth or model dir: cvnet_global's encoder
                                     # init;
                                     # cvnet_rerank: the (cvnet_global) model whose backbone is
                                     # frozen; csa / ames: the reranker's weights to start
                                     # from (optional)
    c.export = "encoder"             # which encoder W/model holds: "encoder" or "momentum"

    c.data = ml_collections.ConfigDict()
    c.data.name = "gldv2_clean"      # a builder of scvnet_jax.data.builders, or the name of a
                                     # folder set (python -m scvnet_jax.data.build folder)
    c.data.data_dir = "~/tensorflow_datasets"
    c.data.split = "train"
    c.data.image_size = 512
    c.data.positive = "same_class"   # momentum-encoder input: "same_class" or "same_image"
    c.data.threads = 16              # decode/augment threads per process
    c.data.prefetch = 32             # batches buffered ahead... per thread pool
    c.data.workers = 0               # extra grain worker processes (0 = threads only)
    c.data.augment = ml_collections.ConfigDict(dict(
        area=(0.25, 1.0), aspect=(3 / 4, 4 / 3), hflip=0.5, brightness=0.3, contrast=0.3,
        saturation=0.3, color_p=0.8, grayscale=0.0))

    c.model = ml_collections.ConfigDict()
    c.model.depth = 50
    c.model.width = 64
    c.model.reduction_dim = 2048
    c.model.corr_dim = 256           # only shapes the (untrained) rerank head of W/model
    c.model.dtype = "float32"        # "bfloat16": bf16 activations, float32 parameters
    c.model.precision = ""           # "" = backend default; "highest" = exact float32
    _cvnet_global(c)
    _cvnet_rerank(c)
    _csa(c)
    _ames(c)
    _validation(c)
    _optimizer(c)
    return c


def _cvnet_global(c) -> None:
    """cvnet_global only: CurricularFace and the momentum contrastive loss."""
    c.loss = ml_collections.ConfigDict()
    c.loss.lambda_cls = 1.0
    c.loss.lambda_con = 1.0
    c.loss.cls_scale = 30.0          # CurricularFace s
    c.loss.cls_margin = 0.15         # CurricularFace m
    c.loss.temperature = 0.1         # contrastive
    c.loss.queue_size = 8192         # momentum descriptors kept (a multiple of batch_size)
    c.loss.momentum = 0.999          # EMA coefficient of the momentum encoder


def _cvnet_rerank(c) -> None:
    """cvnet_rerank only: pairs, curricula, hard-negative bank."""
    c.rerank = ml_collections.ConfigDict()
    c.rerank.head_init = "random"    # conv2ds + CVLearner: "random" or "checkpoint" (init_from's)
    c.rerank.positive_fraction = 0.5 # P(candidate is another image of the query's landmark)
    c.rerank.hard_ratio = (0.0, 0.5) # P(a negative is hard), ramped start -> end
    c.rerank.hide_prob = (0.0, 0.3)  # Hide-and-Seek P(feature cell hidden), ramped start -> end
    c.rerank.hide_cell = 1           # side of a hidden block, in feature cells
    c.rerank.curriculum_steps = 0    # length of both ramps (0 = total_steps)
    c.rerank.bank_k = 20             # hard negatives kept per image (top-ranked other landmarks)
    c.rerank.bank_refresh_steps = 0  # rebuild the bank (augmented views) every N steps; 0 = once
    c.rerank.bank_batch_size = 64    # images per batch while building the bank (global)


def _csa(c) -> None:
    """csa only: the reranker, its descriptors and the official loss's weight."""
    c.csa = ml_collections.ConfigDict()
    c.csa.model = ""                 # the retrieval model whose descriptors CSA reranks (a
                                     # model dir, an official checkpoint, or "demo")
    c.csa.family = "superglobal"     # its descriptor (eval.py's first stage): "cvnet" or
                                     # "superglobal"
    c.csa.topk = 512                 # tokens per sample: the query and its neighbours
    c.csa.anchor_len = 512           # affinity features per token (official sim_len)
    c.csa.embed_dim = 768
    c.csa.depth = 2
    c.csa.num_heads = 12
    c.csa.mlp_ratio = 4
    c.csa.qkv_bias = True
    c.csa.drop_rate = 0.1
    c.csa.attn_drop_rate = 0.1
    c.csa.drop_path_rate = 0.1
    c.csa.alpha = 0.2                # weight of the feature-alignment term
    # Affinity preprocessing (not in the official CSA; "none"/False = the official features).
    # center: descriptors minus the training bank's mean, L2-normalised, before the
    # affinities (the first-stage ranking is unchanged); affinity_norm "row": each token's
    # affinity row standardised (zero mean, unit variance). Both are recorded in the model
    # directory, and the csa reranker applies them at inference.
    c.csa.center = False
    c.csa.affinity_norm = "none"     # "none" or "row"
    c.csa.bank_batch_size = 8        # images per device while describing the training set
    c.csa.bank_bucket = 64


def _ames(c) -> None:
    """ames only: the local descriptors, the transformer, the pairs, distillation."""
    c.ames = ml_collections.ConfigDict()
    c.ames.model = ""                # the retrieval model whose local descriptors AMES reads
                                     # (a model dir, an official checkpoint, or "demo")
    c.ames.detector = ""             # the official detector checkpoint; "" = none (raw
                                     # stage-3 features, selected by their L2 norm)
    c.ames.topk = 700                # local descriptors kept per image in the bank
    c.ames.scales = (0.7071, 1.0, 1.4142)
    c.ames.family = "superglobal"    # global descriptor of the hard negatives (and the
                                     # first stage the model is meant to rerank)
    c.ames.query_len = (700, 700)    # descriptors per query image: drawn uniformly in [lo, hi]
    c.ames.db_len = (700, 700)       # descriptors per database image: likewise
    c.ames.bank_views = 1            # descriptor sets per training image in the bank: the
                                     # whole image, then random augmentations of it
                                     # (data.augment's, resized to view_size square)
    c.ames.view_size = 256
    c.ames.subset = "top"            # which rows: "top" (the strongest, as at test time) or
                                     # "random" (a random subset of the image's rows)
    c.ames.model_dim = 128
    c.ames.init = "random"           # "random" (the official initialisation) or "matching"
                                     # (training.ames.matching_init: PCA projection, identity
                                     # query/key projections)
    c.ames.nhead = 2
    c.ames.num_encoder_layers = 5
    c.ames.dim_feedforward = 1024
    c.ames.binarized = False
    c.ames.teacher = ""              # binarized student: a full-precision AMES model dir to
                                     # distil from ("" = no distillation)
    c.ames.distill_weight = 1.0      # loss = BCE(label) + w x BCE(sigmoid(teacher logit))
    c.ames.positive_fraction = 0.5   # P(candidate is another image of the query's landmark)
    c.ames.same_image = 0.0          # P(a positive is another bank view of the query image)
    c.ames.hard_ratio = (0.5, 0.5)   # P(a negative is hard), ramped start -> end
    c.ames.bank_k = 20               # hard negatives per image (top-ranked other landmarks)
    c.ames.bank_batch_size = 8       # images per device while describing the training set
    c.ames.bank_bucket = 64
    c.ames.holdout_classes = 0       # the last N classes are left out of training; lamb and
                                     # temp are then chosen on them (`training.ames.tune`)
    c.ames.lamb = 0.85               # the reranker's defaults recorded in the model dir
                                     # (when holdout_classes is 0):
    c.ames.temp = 0.8                # s = lamb x global + (1 - lamb) x sigmoid(temp x logit)
    c.ames.mix = 0.0                 # chamfer's share of the local score: s = lamb x global
                                     # + (1 - lamb) x (mix x chamfer + (1 - mix) x sigmoid(..))
    c.ames.tune_mix = False          # with holdout_classes: choose mix too (training.ames.MIXES)
    c.ames.chamfer_logit = 0.0       # a > 0: the model is trained (and used) on top of the
    c.ames.chamfer_center = 0.0      # chamfer score: logit = AMES logit + a x (chamfer - c)
    c.ames.num_rerank = 100


def _validation(c) -> None:
    """Validation during training (cvnet_global and cvnet_rerank): a held-out benchmark
    scored by eval.py's pipelines with the current parameters every `every_steps` steps and
    at the last step (0 = off); the mAPs go to metrics.jsonl and TensorBoard
    ("val/<pipeline>/mAP/<setting>"), and W/model_best is the model directory of the best
    step so far by `best_by`."""
    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 0
    c.eval.dataset = "auto"          # "demo", "folder:<data_dir>/<name>" (a folder set's
                                     # held-out split), roxford5k / rparis6k /
                                     # gldv2_retrieval (with eval.data_dir), or "auto": demo
                                     # for demo_landmarks, the held-out split of a folder set
    c.eval.data_dir = ""
    c.eval.pipelines = ()            # () = the stage's own: cvnet_global; cvnet_rerank: the
                                     # pipelines cvnet_global and cvnet_rerank
    c.eval.best_by = ""              # "<pipeline>/<setting>"; "" = the last pipeline's M
                                     # (revisitop), all (folder sets) or private (GLDv2)
    c.eval.topk = 100                # CVNet rerank depth
    c.eval.protocol = "official"     # CVNet rerank protocol (folder sets: always blind)
    c.eval.batch_size = 0            # images per device (0 = auto: 1 on CPU, 8 on GPU/TPU)
    c.eval.bucket = 64


def _optimizer(c) -> None:
    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "sgd"         # "sgd" (momentum) or "adamw"
    c.optimizer.lr = 0.01
    c.optimizer.momentum = 0.9
    c.optimizer.nesterov = False
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.weight_decay = 1e-4  # conv/dense kernels only
    c.optimizer.schedule = "cosine"  # after linear warmup: "cosine" or "constant"
    c.optimizer.warmup_steps = 100
    c.optimizer.final_lr_fraction = 0.0
    c.optimizer.clip_norm = 10.0     # global gradient norm; 0 = off
    c.optimizer.decay_exclude = ()   # submodule names whose kernels get no weight decay


def arch_of(cfg) -> Arch:
    """The model architecture a training config asks for (`cfg.model`)."""
    try:
        return Arch.from_mapping(cfg.model)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config.model: {e}") from None


def dtype_of(cfg):
    """The compute dtype of `cfg.model.dtype` ('float32' or 'bfloat16')."""
    import jax.numpy as jnp

    if cfg.model.dtype not in DTYPES:
        raise ConfigError(f"model.dtype must be float32 or bfloat16, got {cfg.model.dtype!r}")
    return jnp.dtype(cfg.model.dtype)


# -- validation: everything checked in the first second, before any data, model or workdir --

# (field, int or number, test, what is expected)
_RANGES = (
    ("seed", "int", lambda v: v >= 0, "an integer >= 0"),
    ("total_steps", "int", lambda v: v >= 0, "an integer >= 0 (0 exports the initialisation)"),
    ("batch_size", "int", lambda v: v >= 1, "an integer >= 1 (the global batch)"),
    ("checkpoint_every_steps", "int", lambda v: v >= 1, "an integer >= 1"),
    ("keep_checkpoints", "int", lambda v: v >= 1, "an integer >= 1"),
    ("log_every_steps", "int", lambda v: v >= 1, "an integer >= 1"),
    ("data.image_size", "int", lambda v: v >= 32, "an integer >= 32 (pixels)"),
    ("data.threads", "int", lambda v: v >= 1, "an integer >= 1"),
    ("data.prefetch", "int", lambda v: v >= 1, "an integer >= 1"),
    ("data.workers", "int", lambda v: v >= 0, "an integer >= 0"),
    ("loss.queue_size", "int", lambda v: v >= 1, "an integer >= 1"),
    ("loss.momentum", "num", lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    ("loss.temperature", "num", lambda v: v > 0.0, "a number > 0"),
    ("loss.cls_scale", "num", lambda v: v > 0.0, "a number > 0"),
    ("loss.lambda_cls", "num", lambda v: v >= 0.0, "a number >= 0"),
    ("loss.lambda_con", "num", lambda v: v >= 0.0, "a number >= 0"),
    ("optimizer.lr", "num", lambda v: v > 0.0, "a number > 0"),
    ("optimizer.warmup_steps", "int", lambda v: v >= 0, "an integer >= 0"),
    ("optimizer.weight_decay", "num", lambda v: v >= 0.0, "a number >= 0"),
    ("optimizer.clip_norm", "num", lambda v: v >= 0.0, "a number >= 0 (0 = off)"),
    ("rerank.bank_k", "int", lambda v: v >= 1, "an integer >= 1"),
    ("rerank.bank_refresh_steps", "int", lambda v: v >= 0, "an integer >= 0 (0 = once)"),
    ("rerank.bank_batch_size", "int", lambda v: v >= 1, "an integer >= 1"),
    ("rerank.curriculum_steps", "int", lambda v: v >= 0, "an integer >= 0"),
    ("rerank.hide_cell", "int", lambda v: v >= 1, "an integer >= 1"),
    ("csa.topk", "int", lambda v: v >= 2, "an integer >= 2"),
    ("csa.anchor_len", "int", lambda v: v >= 1, "an integer >= 1"),
    ("csa.embed_dim", "int", lambda v: v >= 1, "an integer >= 1"),
    ("csa.depth", "int", lambda v: v >= 1, "an integer >= 1"),
    ("csa.num_heads", "int", lambda v: v >= 1, "an integer >= 1"),
    ("csa.mlp_ratio", "num", lambda v: v > 0, "a number > 0"),
    ("csa.drop_rate", "num", lambda v: 0 <= v < 1, "a number in [0, 1)"),
    ("csa.attn_drop_rate", "num", lambda v: 0 <= v < 1, "a number in [0, 1)"),
    ("csa.drop_path_rate", "num", lambda v: 0 <= v < 1, "a number in [0, 1)"),
    ("csa.alpha", "num", lambda v: v >= 0, "a number >= 0"),
    ("csa.bank_batch_size", "int", lambda v: v >= 1, "an integer >= 1"),
    ("csa.bank_bucket", "int", lambda v: v >= 1, "an integer >= 1"),
    ("ames.topk", "int", lambda v: v >= 1, "an integer >= 1"),
    ("ames.model_dim", "int", lambda v: v >= 1, "an integer >= 1"),
    ("ames.nhead", "int", lambda v: v >= 1, "an integer >= 1"),
    ("ames.num_encoder_layers", "int", lambda v: v >= 1, "an integer >= 1"),
    ("ames.dim_feedforward", "int", lambda v: v >= 1, "an integer >= 1"),
    ("ames.distill_weight", "num", lambda v: v >= 0, "a number >= 0"),
    ("ames.positive_fraction", "num", lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
    ("ames.bank_k", "int", lambda v: v >= 1, "an integer >= 1"),
    ("ames.bank_batch_size", "int", lambda v: v >= 1, "an integer >= 1"),
    ("ames.bank_bucket", "int", lambda v: v >= 1, "an integer >= 1"),
    ("ames.lamb", "num", lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    ("ames.temp", "num", lambda v: v > 0, "a number > 0"),
    ("ames.mix", "num", lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    ("ames.chamfer_logit", "num", lambda v: v >= 0, "a number >= 0"),
    ("ames.chamfer_center", "num", lambda v: -1 <= v <= 1, "a number in [-1, 1]"),
    ("ames.bank_views", "int", lambda v: v >= 1, "an integer >= 1"),
    ("ames.view_size", "int", lambda v: v >= 16, "an integer >= 16 (pixels)"),
    ("ames.holdout_classes", "int", lambda v: v >= 0, "an integer >= 0"),
    ("ames.num_rerank", "int", lambda v: v >= 1, "an integer >= 1"),
    ("eval.every_steps", "int", lambda v: v >= 0, "an integer >= 0 (0 = no validation)"),
    ("eval.topk", "int", lambda v: v >= 1, "an integer >= 1"),
    ("eval.batch_size", "int", lambda v: v >= 0, "an integer >= 0 (0 = auto)"),
    ("eval.bucket", "int", lambda v: v >= 1, "an integer >= 1 (pixels)"),
)
_CHOICES = (
    ("ames.family", ("cvnet", "superglobal")),
    ("ames.subset", ("top", "random")), ("export", ("encoder", "momentum")), ("model.dtype", DTYPES),
    ("csa.family", ("cvnet", "superglobal")), ("csa.affinity_norm", ("none", "row")),
    ("model.precision", ("", "default", "high", "highest", "bfloat16", "tensorfloat32",
                         "float32")),
    ("data.positive", ("same_class", "same_image")), ("optimizer.name", ("sgd", "adamw")),
    ("optimizer.schedule", ("cosine", "constant")),
    ("rerank.head_init", ("random", "checkpoint")), ("eval.protocol", ("official", "blind")),
)
# Fields that change the shape of the saved state: a workdir's checkpoints only resume
# under the same values.
SHAPE_FIELDS = ("stage", "model.depth", "model.width", "model.reduction_dim",
                "model.corr_dim", "loss.queue_size", "data.name", "data.split",
                "csa.anchor_len", "csa.embed_dim", "csa.depth", "csa.num_heads",
                "csa.mlp_ratio", "csa.qkv_bias", "csa.topk", "csa.model", "csa.family",
                "csa.center", "csa.affinity_norm", "ames.model", "ames.detector", "ames.topk",
                "ames.scales", "ames.family", "ames.query_len", "ames.db_len",
                "ames.model_dim", "ames.nhead", "ames.num_encoder_layers", "ames.dim_feedforward",
                "ames.binarized", "ames.teacher", "ames.holdout_classes", "ames.bank_views",
                "ames.view_size", "ames.chamfer_logit",
                "ames.chamfer_center")


def validate(cfg) -> None:
    """Ranges, choices and paths of a training config: one ConfigError naming the field,
    its value and what was expected."""
    stage_of(cfg)
    check_fields(cfg, _RANGES, _CHOICES)
    arch_of(cfg)
    if cfg.loss.queue_size % cfg.batch_size:
        raise ConfigError(f"config.loss.queue_size ({cfg.loss.queue_size}) must be a multiple "
                          f"of config.batch_size ({cfg.batch_size}): the queue takes whole "
                          "batches")
    from scvnet_jax.training import validation
    validation.check_config(cfg)
    if cfg.init_from:
        check_init_from(cfg.init_from)


# The first bytes of what torch.save writes: a zip archive, or (the legacy format) a pickle.
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")


def check_init_from(path) -> None:
    """A cheap look (before the workdir is made) that `path` can be a model: a model
    directory (config.json, as train.py and the converter write) or an official PyTorch
    checkpoint file. Reading it (loop.read_init_from, csa/ames.load) checks the rest."""
    p = Path(path).expanduser()
    expected = ("expected an official .pyth/.pth checkpoint or a model directory (written "
                "by train.py or python -m scvnet_jax.convert)")
    if not p.exists():
        raise ConfigError(f"config.init_from = {path!r}: no such file or directory "
                          f"({expected})")
    if p.is_dir():
        try:
            ok = isinstance(json.loads((p / "config.json").read_text()), dict)
        except (OSError, ValueError):
            ok = False
        if not ok:
            raise ConfigError(f"config.init_from = {path!r}: a directory without a readable "
                              f"config.json, so not a model directory ({expected})")
        return
    try:
        with open(p, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise ConfigError(f"config.init_from = {path!r}: cannot be read ({e.strerror}); "
                          f"{expected}") from None
    if not head.startswith(_TORCH_MAGIC):
        raise ConfigError(f"config.init_from = {path!r}: not a model (neither a PyTorch "
                          f"checkpoint file nor a model directory); {expected}")


# What a run writes into its workdir (and nothing else).
RUN_ENTRIES = ("checkpoints", "tensorboard", "metrics.jsonl", "model", "model_best",
               "config.json",
               "hard_negatives", "csa_bank.npz", "ames_bank")


def check_workdir(workdir, cfg) -> None:
    """A workdir the run may use: a writable directory (or creatable), holding nothing or
    a run of ours whose shape-changing fields match `cfg` (it will be resumed)."""
    w = Path(workdir).expanduser()
    if w.exists() and not w.is_dir():
        raise ConfigError(f"--workdir {w}: exists and is not a directory")
    parent = w if w.exists() else next(p for p in w.absolute().parents if p.exists())
    if not parent.is_dir():
        raise ConfigError(f"--workdir {w}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--workdir {w}: {parent} is not writable")
    if not w.exists():
        return
    saved_path = w / "config.json"
    foreign = set(p.name for p in w.iterdir()) - set(RUN_ENTRIES)
    if not foreign and not saved_path.exists():
        return   # empty, or what a run killed before it wrote config.json leaves
    try:
        saved = json.loads(saved_path.read_text())
    except (OSError, ValueError):
        raise ConfigError(f"--workdir {w}: not empty and not a training run of this tool (no "
                          "readable config.json); choose a new or empty folder") from None
    for name in SHAPE_FIELDS:
        try:
            old = get_field(saved, name)
        except (KeyError, TypeError):
            continue
        new = json.loads(json.dumps(get_field(cfg, name)))   # as saved: tuples are lists
        if name == "stage":
            old = saved_stage(old)
        if old != new:
            raise ConfigError(f"--workdir {w}: its run has {name} = {old!r}, this config "
                              f"{new!r}; a run resumes only with the same {name} (use another "
                              "--workdir, or the same value)")
    _check_total_steps(w, saved, cfg)


def checkpoint_steps(workdir) -> list[int]:
    """The steps of the (complete) checkpoints in a run's workdir, ascending."""
    d = Path(workdir).expanduser() / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def _check_total_steps(w: Path, saved: dict, cfg) -> None:
    """Refuses to resume a checkpointed run with another total_steps: the learning-rate
    schedule (and cvnet_rerank's curriculum) is built from it, so another value would change
    the rate mid-run, and on a finished run silently restart it."""
    old, new = saved.get("total_steps"), cfg.get("total_steps")
    steps = checkpoint_steps(w)
    if old is None or new is None or int(old) == int(new) or not steps:
        return
    done = (f"finished at step {steps[-1]}" if steps[-1] >= int(old)
            else f"checkpointed at step {steps[-1]}")
    model = w / "model"
    raise ConfigError(
        f"--workdir {w}: its run has total_steps = {old} ({done}), this config {new}; the "
        "learning-rate schedule is built from total_steps, so resuming with another value "
        f"would change it mid-run. Resume with --config.total_steps={old}, or train on "
        f"from its model with a new schedule: --workdir NEW_DIR --config.init_from={model}"
        + ("" if model.is_dir() else " (written when the run finishes)"))
