"""The user-facing model: `scvnet_jax.load(...)` returns a `RetrievalModel`.

Every method is a jitted call of the Flax module's method of the same name, run on all of
this process's devices: the weights are replicated over a 1-D device mesh and a batch is
split over it (when its size divides evenly; otherwise every device runs it whole). The
jit cache is keyed by the module (architecture, dtype, precision), the method, its static
options and the input shapes and shardings, and is shared by all models of the same
architecture: a second batch of the same shape never recompiles, and two models loaded
from different files of the same architecture share compiled code.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from scvnet_jax import convert, mesh as mesh_lib
from scvnet_jax.errors import InputError
from scvnet_jax.models import cvnet
from scvnet_jax.models.arch import Arch
from scvnet_jax.models.resnet import stage_valid


@partial(jax.jit, static_argnames=("module", "method", "options"))
def _apply(module: cvnet.CVNet, method: str, options: tuple, variables, *args, **arrays):
    return module.apply(variables, *args, method=method, **dict(options), **arrays)


def _images(x, name: str = "images"):
    if not isinstance(x, jax.Array):
        x = np.asarray(x)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise InputError(f"{name} must be a batch of normalised BGR images, NHWC with 3 "
                         f"channels; got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise InputError(f"{name} must be float (normalised with scvnet_jax.data.normalize), "
                         f"got {x.dtype}")
    return x


class RetrievalModel:
    """A CVNet (and SuperGlobal) model with its weights, on this process's devices.

    Images are NHWC float arrays in BGR order, normalised the official way
    (`scvnet_jax.data.normalize`): (pixel/255 - mean) / std.

    Images of different sizes can share a batch: pad them at the bottom/right to one size
    (`scvnet_jax.data.batching`) and pass `valid`, the (B, 2) valid (h, w) of each; the
    results equal those of the unpadded images (to float rounding), and one compilation
    serves every image that fits the padded size.

    Attributes:
      module: the Flax `CVNet` module (usable with plain `init`/`apply`).
      variables: {'params': ..., 'batch_stats': ...}, replicated over `mesh`.
      arch: the `Arch` (depth, width, reduction_dim, corr_dim).
      mesh: the devices it runs on (default: every device of this process).
    """

    def __init__(self, module: cvnet.CVNet, variables, source: str | None = None,
                 mesh=None):
        self.module = module
        self.mesh = mesh if mesh is not None else mesh_lib.local_mesh()
        self.variables = jax.device_put(variables, mesh_lib.replicated(self.mesh))
        self.source = source

    @property
    def arch(self) -> Arch:
        return self.module.arch

    @property
    def depth(self) -> int:
        return self.arch.depth

    @property
    def num_devices(self) -> int:
        return self.mesh.devices.size

    def __repr__(self) -> str:
        return (f"RetrievalModel(R{self.depth}, dtype={jnp.dtype(self.module.dtype).name}, "
                f"source={self.source!r})")

    def with_mesh(self, mesh) -> "RetrievalModel":
        """The same model on other devices (e.g. `scvnet_jax.mesh.make_mesh(devices[:1])`)."""
        return RetrievalModel(self.module, self.variables, self.source, mesh)

    def _call(self, method: str, *args, arrays=None, **options):
        batch = max(np.shape(a)[0] for a in args)
        args, arrays = mesh_lib.put_batch((args, arrays or {}), self.mesh, batch)
        return _apply(self.module, method, tuple(sorted(options.items())), self.variables,
                      *args, **arrays)

    def global_descriptor(self, images, valid=None) -> jax.Array:
        """CVNet-Global descriptor, L2-normalised -> (B, reduction_dim)."""
        return self._call("global_descriptor", _images(images), arrays=_valid(valid, images))

    def local_features(self, images, valid=None) -> jax.Array:
        """Last stage-3 block before its ReLU -> (B, h, w, 1024) for the official models.
        For a padded batch the features are valid on `feature_valid(valid)`, zero elsewhere."""
        return self._call("local_features", _images(images), arrays=_valid(valid, images))

    @staticmethod
    def feature_valid(valid) -> np.ndarray:
        """Valid (h, w) of `local_features` for images of valid size `valid` (B, 2)."""
        return np.asarray(stage_valid(np.asarray(valid, np.int64), 3), np.int32)

    def correlation(self, query_features, key_features) -> jax.Array:
        """Cross-scale 4-D correlation -> (B, hq, wq, hk, wk, 9)."""
        return self._call("correlation", query_features, key_features)

    def verification_logits(self, query_features, key_features) -> jax.Array:
        """CVLearner logits (B, 2) for pairs of unpadded local feature maps."""
        return self._call("verification_logits", query_features, key_features)

    def verification_score(self, query_images, key_images) -> jax.Array:
        """CVNet-Rerank score in [0, 1] for pairs (query_images[b], key_images[b]) -> (B,)."""
        return self._call("verification_score", _images(query_images, "query_images"),
                          _images(key_images, "key_images"))

    def verification_score_from_features(self, query_features, key_features,
                                         valid_q=None, valid_k=None) -> jax.Array:
        """Scores from `local_features` outputs; a query batch of 1 is paired with every key.

        valid_q / valid_k: (Bq, 2) / (Bk, 2) valid feature sizes (`feature_valid`) of padded
        feature batches, or None for unpadded ones.
        """
        fq, fk = query_features, key_features
        if valid_q is None and valid_k is None:
            return self._call("verification_score_from_features", fq, fk)
        vq, vk = _pair_valid(valid_q, valid_k, fq, fk)
        plans = cvnet.correlation_plans(vq, vk, fq.shape[1:3], fk.shape[1:3])
        return self._call("verification_score_from_features", fq, fk, arrays={"plans": plans})

    def corr_features(self, features, valid=None) -> jax.Array:
        """Per-image half of the verifier (`CVNet.corr_features`): (B, h, w, C) local features
        -> (B, h, w, 3, corr_dim). valid: (B, 2) valid feature sizes of a padded batch
        (`feature_valid`), or None; the result is then zero outside them."""
        if valid is None:
            return self._call("corr_features", features)
        plans = cvnet.feature_plans(np.asarray(valid, np.int32), np.shape(features)[1:3])
        return self._call("corr_features", features, arrays={"plans": plans})

    def verification_score_from_corr_features(self, query_cf, key_cf, valid_q=None,
                                              valid_k=None) -> jax.Array:
        """Scores of pairs (query_cf[b], key_cf[b]) of `corr_features` outputs -> (B,); for
        zero-padded batches pass both sides' valid (B, 2) feature sizes."""
        if valid_q is None and valid_k is None:
            return self._call("verification_score_from_corr_features", query_cf, key_cf)
        vq, vk = _pair_valid(valid_q, valid_k, query_cf, key_cf)
        return self._call("verification_score_from_corr_features", query_cf, key_cf,
                          arrays={"valid4": np.concatenate([vq, vk], 1)})

    def superglobal_descriptor(self, images, scales: int | Sequence[float] = 3,
                               rgem: bool = True, sgem: bool = True, relup: bool = True,
                               gemp: bool = True, official_quirk: bool = True,
                               valid=None) -> jax.Array:
        """SuperGlobal descriptor -> (B, reduction_dim), not re-normalised (as official).

        scales: 1, 3 or 5 (official scale lists) or a tuple of factors.
        rgem / sgem / relup / gemp: Regional-GeM, Scale-GeM, ReLU+, GeM+ (p=4.6; off uses the
          checkpoint's learned GeM p).
        official_quirk: clamp stage-1 inner activations at 0.014 even with relup=False, as
          the official code does.
        """
        scales = scales if isinstance(scales, int) else tuple(float(s) for s in scales)
        images = _images(images)
        arrays = None
        if valid is not None:
            arrays = {"plans": cvnet.superglobal_plans(valid, images.shape[1:3], scales)}
        return self._call("superglobal_descriptor", images, arrays=arrays, scales=scales,
                          rgem=rgem, sgem=sgem, relup=relup, gemp=gemp,
                          official_quirk=official_quirk)

    def superglobal_single_scale(self, images, rgem: bool = True, gemp: bool = True,
                                 relup: bool = True, official_quirk: bool = True,
                                 valid=None) -> jax.Array:
        """One scale of `superglobal_descriptor`: the descriptor of images already resized
        to that scale (`ops.resize_bilinear_host` with `ops.scaled_size`) -> (B,
        reduction_dim), not normalised. Combining the scales (S-GeM: the maximum of the
        L2-normalised ones; else their mean) gives `superglobal_descriptor`; the engine
        runs the scales as separate items, so programs are shared between the scales of
        images of different sizes."""
        return self._call("superglobal_single_scale", _images(images),
                          arrays=_valid(valid, images), rgem=rgem, gemp=gemp, relup=relup,
                          official_quirk=official_quirk)


def enable_compilation_cache(cache_dir: str | None = None) -> None:
    """Keeps every compiled program on disk, in `<cache_dir>/xla` (by default the package's
    cache folder, `~/.cache/scvnet_jax/xla`; JAX_COMPILATION_CACHE_DIR, if set, wins), so a
    second process on the same shapes compiles nothing, as the command lines do. The
    library does not do this by itself: it sets JAX options for the whole process. Call it
    before anything is compiled."""
    from scvnet_jax.compilation_cache import use_compilation_cache
    from scvnet_jax.evaluation.config import default_cache_dir

    use_compilation_cache(default_cache_dir() if cache_dir is None else str(cache_dir))


def _pair_valid(valid_q, valid_k, query, key):
    """Both sides' valid (B, 2) sizes of a batch of pairs (B = the key batch): a missing
    side is its full size; a single query row is broadcast to every key."""
    b = key.shape[0]
    vq = np.asarray(valid_q if valid_q is not None else [query.shape[1:3]], np.int32)
    vk = np.asarray(valid_k if valid_k is not None else [key.shape[1:3]] * b, np.int32)
    return (np.broadcast_to(vq, (b, 2)) if vq.shape[0] == 1 else vq), vk


def _valid(valid, images):
    if valid is None:
        return None
    valid = np.asarray(valid, np.int32)
    if valid.shape != (np.shape(images)[0], 2):
        raise InputError(f"valid must be (batch, 2) = ({np.shape(images)[0]}, 2), got "
                         f"{valid.shape}")
    return {"valid": valid}


def load(path, *, depth: int | None = None, dtype=jnp.float32, precision="auto",
         mesh=None) -> RetrievalModel:
    """Loads an official CVNet checkpoint (`.pyth`/`.pth`) or a model directory.

    Args:
      path: the file or directory.
      depth: expected ResNet depth; by default it is read from the checkpoint.
      dtype: computation dtype of the backbone (float32 for parity; bfloat16 is faster on
        GPUs/TPUs).
      precision: "auto" (float32-exact convs/matmuls for float32 models), or any
        jax.lax.Precision value.
      mesh: the devices to run on (default: every device of this process).
    """
    module, variables = convert.load(path, depth=depth, dtype=dtype, precision=precision)
    return RetrievalModel(module, variables, source=str(path), mesh=mesh)


DEMO_MODEL = Path(__file__).resolve().parent / "assets" / "demo_model"


def demo_model_path() -> Path:
    """The bundled demo model (a width-16 ResNet-50 CVNet trained by configs/demo.py and
    configs/demo_rerank.py on the demo set): `sj.load(sj.demo_model_path())`."""
    return DEMO_MODEL


def create(depth: int = 50, *, width: int = 64, reduction_dim: int = 2048,
           corr_dim: int = 256, seed: int = 0, dtype=jnp.float32,
           precision="auto", mesh=None) -> RetrievalModel:
    """A randomly initialised model (e.g. a baseline, or the start of training)."""
    arch = Arch(depth=depth, width=width, reduction_dim=reduction_dim, corr_dim=corr_dim)
    module = cvnet.CVNet(arch, dtype=dtype, precision=cvnet.resolve_precision(dtype, precision))
    variables = jax.tree.map(np.asarray, cvnet.init(arch, seed))
    return RetrievalModel(module, variables, source=f"random(seed={seed})", mesh=mesh)
