"""The "csa" stage: the CSA reranker (a transformer over affinity features, NeurIPS 2021)
trained on the global descriptors of a retrieval model, with the official loss.

Samples, as the official `RerankDataset_TopKSIM` makes them: every training image is a
query; its `topk` nearest training images by descriptor similarity (itself first) are the
tokens, each described by its similarities to the first `anchor_len` of them (the
anchors); rows 1.. are shuffled; a token's target is 1 when it shares the query's class.
The official loss: contrastive = mean(-log(sum(exp_sim * targets) / sum(exp_sim))) with
exp_sim = exp(cos(token 0, token i) / 2) over every token, plus alpha x the feature-
alignment term (`models.csa`). SGD with momentum, linear warmup then cosine decay (per
step), dropouts and DropPath as the official model in training mode.

The descriptors are those the reranker will see at test time: `csa.model`'s `csa.family`
descriptor (as eval.py's first stage computes it) of every whole training image, computed
once per run and kept in W/csa_bank.npz (with each image's neighbours), so a resumed run
reuses them.

Fixes and choices against the official scripts (which cannot run as published):
  * the dataset class cannot be built: it concatenates a list of names to a string
    (`names + '_{}sim{}topk.pkl'`); here the bank is built from any training set;
  * the learning-rate scheduler reads one past its table at the last step (IndexError);
    optax's schedule has no such edge;
  * gradient clipping is never applied (`clip_max_norm` defaults to 0 and the published
    command does not set it); here `optimizer.clip_norm` (default 10) is applied;
  * weight decay was meant to skip `feature_align` (`no_weight_decay`), but the skip list
    is compared with parameter names and matches nothing; here decay applies to the linear
    weights except feature_align's (biases and LayerNorm never), as intended;
  * the inputs are cast to float16 on a GPU-only autocast path (CPU training fails);
    here everything is float32.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import flax
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax

from scvnet_jax import files, mesh as mesh_lib
from scvnet_jax.data.sources import TrainingSet, process_batches
from scvnet_jax.errors import ConfigError
from scvnet_jax.training import optim
from scvnet_jax.training.loop import Task as _Task, all_finite, host, retrieval_model


@flax.struct.dataclass
class CSAState:
    step: jax.Array
    params: Any
    opt_state: Any


def csa_arch(cfg):
    """The CSAArch of cfg.csa."""
    from scvnet_jax.models.csa import CSAArch
    c = cfg.csa
    try:
        return CSAArch(anchor_len=int(c.anchor_len), embed_dim=int(c.embed_dim),
                       depth=int(c.depth), num_heads=int(c.num_heads),
                       mlp_ratio=c.mlp_ratio, qkv_bias=bool(c.qkv_bias))
    except ValueError as e:
        raise ConfigError(f"config.csa: {e}") from None


def module(cfg):
    from scvnet_jax.models.csa import RerankTransformer
    c = cfg.csa
    return RerankTransformer(csa_arch(cfg), drop_rate=float(c.drop_rate),
                             attn_drop_rate=float(c.attn_drop_rate),
                             drop_path_rate=float(c.drop_path_rate))


def init_state(cfg, rng, params=None) -> CSAState:
    if params is None:
        x = jnp.zeros((1, 2, int(cfg.csa.anchor_len)), jnp.float32)
        params = module(cfg).init(rng, x)["params"]
    return CSAState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optim.optimizer(cfg).init(params))


def make_train_step(cfg) -> Callable[[CSAState, dict], tuple[CSAState, dict]]:
    """The pure step; batch = {'sim': (B, topk, anchor_len) float32 affinity features (row
    0 the query), 'target': (B, topk) float32}."""
    from scvnet_jax.models.csa import losses

    net = module(cfg)
    tx = optim.optimizer(cfg)
    lr = optim.learning_rate(cfg)
    alpha = float(cfg.csa.alpha)
    base_key = jax.random.PRNGKey(int(cfg.seed) + 3)

    def step(state: CSAState, batch: dict):
        rng = jax.random.fold_in(base_key, state.step)

        def loss_fn(params):
            exp_sim, mse = net.apply({"params": params}, batch["sim"], train=True,
                                     rngs={"dropout": rng})
            total, con, mse = losses(exp_sim, mse, batch["target"], alpha)
            return total, (con, mse)

        (loss, (con, mse)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "loss_contrastive": con, "loss_mse": mse,
                   "positives": jnp.mean(batch["target"][:, 1:]), "lr": lr(state.step),
                   "grad_norm": optax.global_norm(grads),
                   "finite": jnp.isfinite(loss) & all_finite(params)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return step


# -- data ---------------------------------------------------------------------------------

class SampleTransform(grain.transforms.RandomMap):
    """Training image index -> {'sim', 'target'} from the bank (W/csa_bank.npz: descriptors,
    neighbours, labels; read lazily, so the transform pickles without it)."""

    def __init__(self, bank_path: str, topk: int, anchor_len: int, center: bool = False,
                 affinity_norm: str = "none"):
        self.bank_path, self.topk, self.anchor_len = str(bank_path), int(topk), int(anchor_len)
        self.center, self.affinity_norm = bool(center), str(affinity_norm)
        self._bank = None

    def __getstate__(self):
        return {**self.__dict__, "_bank": None}

    def random_map(self, index: Any, rng: np.random.Generator) -> dict:
        b = self._bank
        if b is None:    # built whole, then published: grain's threads share this object
            with np.load(self.bank_path) as z:
                b = {k: z[k] for k in ("descriptors", "neighbours", "labels")}
            if self.center:       # the affinities of centred descriptors; neighbours as ranked
                from scvnet_jax.rerank.csa import center_descriptors
                b["descriptors"] = center_descriptors(b["descriptors"],
                                                      bank_mean(b["descriptors"]))
            self._bank = b
        nb = b["neighbours"][int(index)]
        rows, cols = nb[:self.topk], nb[:self.anchor_len]
        sim = b["descriptors"][rows] @ b["descriptors"][cols].T
        target = (b["labels"][rows] == b["labels"][int(index)]).astype(np.float32)
        if self.affinity_norm != "none":
            from scvnet_jax.rerank.csa import normalize_affinity
            sim = normalize_affinity(sim, self.affinity_norm)
        perm = np.concatenate([[0], 1 + rng.permutation(len(rows) - 1)])
        return {"sim": np.ascontiguousarray(sim[perm], np.float32), "target": target[perm]}


def bank_mean(descriptors) -> np.ndarray:
    """The mean descriptor of the bank (`csa.center`), float32."""
    return np.asarray(descriptors, np.float64).mean(0).astype(np.float32)


def dataset(bank_path, n: int, topk: int, anchor_len: int, *, global_batch: int, seed: int,
            process_index: int = 0, process_count: int = 1, center: bool = False,
            affinity_norm: str = "none") -> grain.MapDataset:
    """This process's part of the shuffled (every epoch anew), repeated stream of samples;
    each element's randomness comes from its global position (resumable, process-count
    independent)."""
    ds = (grain.MapDataset.range(n).shuffle(seed=seed).repeat(None)
          .random_map(SampleTransform(bank_path, topk, anchor_len, center, affinity_norm),
                      seed=seed))
    return process_batches(ds, global_batch, process_index, process_count)


def check_config(cfg) -> None:
    """What the csa stage needs beyond `config.validate`."""
    from scvnet_jax.training import stage1
    csa_arch(cfg)
    c = cfg.csa
    if not c.model:
        raise ConfigError("the csa stage needs --config.csa.model: the retrieval model whose "
                          "descriptors it reranks (a model directory, an official CVNet "
                          "checkpoint, or 'demo' for the bundled demo model)")
    if c.model != "demo" and not Path(c.model).expanduser().exists():
        raise ConfigError(f"config.csa.model = {c.model!r}: no such file or directory")
    if int(c.topk) < 2:
        raise ConfigError(f"config.csa.topk = {c.topk}: expected an integer >= 2 (the query "
                          "and at least one candidate)")
    stage1.check_batch(cfg)


class Task(_Task):
    """The csa stage: the CSA reranker on a retrieval model's descriptors."""
    name = "csa (the CSA reranker)"
    rate = "samples_per_sec"
    bar_keys = (("loss", "loss"), ("loss_contrastive", "con"), ("loss_mse", "mse"),
                ("lr", "lr"))

    def __init__(self, cfg, ts: TrainingSet, mesh, workdir):
        super().__init__(cfg, ts, mesh, workdir)
        abstract = jax.eval_shape(lambda k: init_state(cfg, k), jax.random.PRNGKey(0))
        self.compile(make_train_step(cfg), lambda k, p: init_state(cfg, k, p), abstract)

    @staticmethod
    def check_config(cfg) -> None:
        check_config(cfg)

    def initial_state(self):
        params = None
        if self.cfg.init_from:
            from scvnet_jax.rerank import csa
            start = csa.load(self.cfg.init_from)
            if start.arch != csa_arch(self.cfg):
                raise ConfigError(f"config.init_from = {self.cfg.init_from}: holds "
                                  f"{start.arch}, the config asks for {csa_arch(self.cfg)}")
            params = jax.tree.map(jnp.asarray, start.variables["params"])
        return self.init(jax.random.PRNGKey(self.cfg.seed), params)

    def retrieval_model(self):
        return retrieval_model(self.cfg.csa.model)

    def bank(self) -> Path:
        """W/csa_bank.npz: descriptors (N, D), neighbours (N, max(topk, anchor_len)) by
        similarity (each image itself first), labels (N,); built once, reused on resume."""
        from scvnet_jax.engine import extract, search

        c = self.cfg.csa
        path = self.workdir / "csa_bank.npz"
        n, k = self.ts.num_examples, max(int(c.topk), int(c.anchor_len))
        k = min(k, n)
        if path.is_file():
            with np.load(path) as z:
                if z["neighbours"].shape == (n, k) and z["descriptors"].shape[0] == n:
                    return path
        t0 = time.perf_counter()
        model = self.retrieval_model()
        spec = extract.spec_of(c.family)
        desc = extract.extract_training_set(model, self.ts, spec,
                                            batch_size=int(c.bank_batch_size),
                                            bucket=int(c.bank_bucket),
                                            desc=f"csa bank ({c.family})")
        _, nb = search.topk(desc, desc, k)
        if jax.process_index() == 0:
            files.atomic_save_npz(path, descriptors=desc, neighbours=nb.astype(np.int32),
                                  labels=self.ts.labels())
        mesh_lib.barrier("csa_bank")
        if jax.process_index() == 0:
            print(f"csa bank: {n} {c.family} descriptors of {self.cfg.data.name} by "
                  f"{c.model}, top-{k} neighbours, {time.perf_counter() - t0:.1f} s")
        return path

    def iterator(self, step: int, state):
        cfg = self.cfg
        c = cfg.csa
        n = self.ts.num_examples
        topk, anchors = min(int(c.topk), n), min(int(c.anchor_len), n)
        if anchors < int(c.anchor_len):
            raise ConfigError(f"config.csa.anchor_len = {c.anchor_len}: the training set has "
                              f"only {n} images")
        ds = dataset(self.bank(), n, topk, anchors, global_batch=cfg.batch_size,
                     seed=cfg.seed, process_index=jax.process_index(),
                     process_count=jax.process_count(), center=bool(c.center),
                     affinity_norm=str(c.affinity_norm))
        return self.make_iterator(ds)

    def export(self, state, step: int) -> Path:
        from scvnet_jax.convert import model_dir

        c = self.cfg.csa
        meta = {"trained_by": "scvnet_jax train.py, stage csa", "step": int(step),
                "descriptors": {"model": str(c.model), "family": str(c.family)},
                "first_stage": {"cvnet": "cvnet_global",
                                "superglobal": "superglobal_global"}[c.family],
                "data": self.cfg.data.name, "topk": int(c.topk)}
        if c.center or c.affinity_norm != "none":
            center = None
            if c.center:
                with np.load(self.bank()) as z:
                    center = [float(v) for v in bank_mean(z["descriptors"])]
            meta["preprocess"] = {"center": center, "affinity_norm": str(c.affinity_norm)}
        return model_dir.save_model_dir(self.workdir / "model", csa_arch(self.cfg),
                                        {"params": host(state.params)}, meta=meta,
                                        overwrite=True)
