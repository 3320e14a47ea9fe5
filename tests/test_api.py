"""The public model API (`scvnet_jax.api`): small images, batching, padded batches, jit
caching, input validation. None of these depends on the network's width, so they run on
the width-8 ResNet-50 (`tiny_model`); parity of the full-size models is tests/models/."""
from __future__ import annotations

import numpy as np
import pytest

import scvnet_jax as sj
from scvnet_jax import api


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


def _images(b, h, w, seed=0):
    rng = np.random.default_rng(seed)
    return sj.data.normalize(rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("hw", [(32, 32), (48, 80), (96, 96)])
def test_small_images_give_finite_outputs(model, hw):
    """Down to 32x32 every descriptor is finite. At these sizes the official SuperGlobal
    crashes: its Regional-GeM reflection padding needs a stage-4 map of >= 3 x 3."""
    x = _images(2, *hw)
    g = np.asarray(model.global_descriptor(x))
    sg = np.asarray(model.superglobal_descriptor(x, scales=3, rgem=True, sgem=True, relup=True))
    s = np.asarray(model.verification_score(x, x[::-1]))
    assert g.shape == sg.shape == (2, model.arch.reduction_dim) and s.shape == (2,)
    assert np.isfinite(g).all() and np.isfinite(sg).all() and np.isfinite(s).all()
    np.testing.assert_allclose(np.linalg.norm(g, axis=1), 1.0, rtol=1e-5)
    assert ((0 <= s) & (s <= 1)).all()


def test_batching_matches_single_images(model):
    x = _images(3, 64, 96, seed=1)
    batch = np.asarray(model.global_descriptor(x))
    single = np.concatenate([np.asarray(model.global_descriptor(x[i:i + 1])) for i in range(3)])
    np.testing.assert_allclose(batch, single, atol=1e-6)
    fq = model.local_features(x[:1])
    fk = model.local_features(x)
    broadcast = np.asarray(model.verification_score_from_features(fq, fk))
    paired = np.asarray(model.verification_score(np.repeat(x[:1], 3, 0), x))
    np.testing.assert_allclose(broadcast, paired, atol=1e-6)


def test_same_shapes_do_not_recompile(model, tiny_model_dir):
    x = _images(2, 64, 64, seed=2)
    model.global_descriptor(x)
    n = api._apply._cache_size()
    model.global_descriptor(_images(2, 64, 64, seed=3))          # new values, same shape
    sj.load(tiny_model_dir).global_descriptor(x)                 # another model, same arch
    assert api._apply._cache_size() == n
    model.global_descriptor(_images(2, 64, 72))                   # a new shape compiles once
    assert api._apply._cache_size() == n + 1


def test_input_validation(model):
    with pytest.raises(sj.InputError, match="NHWC with 3 channels"):
        model.global_descriptor(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(sj.InputError, match="must be float"):
        model.global_descriptor(np.zeros((1, 64, 64, 3), np.uint8))


def test_normalize_matches_official_prepare_im():
    im = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    ref = im.astype(np.float32).transpose(2, 0, 1) / 255.0       # official _prepare_im
    for c, (m, s) in enumerate(zip([0.406, 0.456, 0.485], [0.225, 0.224, 0.229])):
        ref[c] = (ref[c] - m) / s
    np.testing.assert_allclose(sj.data.normalize(im), ref.transpose(1, 2, 0), atol=1e-6)


@pytest.mark.slow   # the everyday loop (-m 'not slow') stays within 4 minutes
def test_padded_batches_equal_unpadded_images(model):
    """Images of different sizes padded into one bucket (with junk in the padding) give the
    results of each image alone: global, SuperGlobal, local features and rerank scores."""
    from scvnet_jax.data import batching

    rng = np.random.default_rng(5)
    sizes = [(97, 130), (128, 96), (70, 64)]
    images = [rng.normal(size=(h, w, 3)).astype(np.float32) for h, w in sizes]
    batch = batching.pad_stack(images, 3, (128, 192))
    batch.images[0, 97:] = 7.0   # the padding's content must not matter
    batch.images[2, :, 64:] = -3.0
    single = lambda f: np.concatenate([np.asarray(f(im[None])) for im in images])

    np.testing.assert_allclose(model.global_descriptor(batch.images, batch.valid),
                               single(model.global_descriptor), atol=1e-6)
    np.testing.assert_allclose(model.superglobal_descriptor(batch.images, valid=batch.valid),
                               single(model.superglobal_descriptor), atol=1e-6)
    feats = np.asarray(model.local_features(batch.images, batch.valid))
    fvalid = model.feature_valid(batch.valid)
    alone = [np.asarray(model.local_features(im[None]))[0] for im in images]
    for f, (h, w), a in zip(feats, fvalid, alone):
        assert a.shape[:2] == (h, w)
        np.testing.assert_allclose(f[:h, :w], a, atol=1e-4)
        assert not f[h:].any() and not f[:, w:].any()
    pairs = [(0, 1), (2, 0), (1, 2)]
    fq = np.stack([feats[i] for i, _ in pairs])
    fk = np.stack([feats[j] for _, j in pairs])
    got = model.verification_score_from_features(fq, fk, fvalid[[i for i, _ in pairs]],
                                                 fvalid[[j for _, j in pairs]])
    want = [float(model.verification_score_from_features(alone[i][None], alone[j][None])[0])
            for i, j in pairs]
    np.testing.assert_allclose(got, want, atol=1e-6)


_WARM_CHILD = r"""
import json
import numpy as np
from jax._src import dispatch, monitoring
seen, hits = [], []
monitoring.register_event_duration_secs_listener(
    lambda e, s, **k: seen.append(s) if e == dispatch.BACKEND_COMPILE_EVENT else None)
monitoring.register_event_listener(
    lambda e, **k: hits.append(e) if e == "/jax/compilation_cache/cache_hits" else None)
import scvnet_jax as sj
sj.enable_compilation_cache()
model = sj.load(sj.demo_model_path())
x = np.zeros((1, 64, 96, 3), np.float32)
model.global_descriptor(x, [[60, 90]]).block_until_ready()
print(json.dumps({"programs": len(seen), "compiled": len(seen) - len(hits)}))
"""


@pytest.mark.slow   # the everyday loop (-m 'not slow') stays within 4 minutes
def test_a_second_process_compiles_nothing(tmp_path):
    """sj.enable_compilation_cache() keeps programs in the package's cache folder (here a
    fresh XDG_CACHE_HOME): the first process compiles, a second one on the same shapes
    loads every program from the cache."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env.update(XDG_CACHE_HOME=str(tmp_path), JAX_PLATFORMS="cpu")
    runs = [json.loads(subprocess.run([sys.executable, "-c", _WARM_CHILD], env=env, check=True,
                                      capture_output=True, text=True).stdout.splitlines()[-1])
            for _ in range(2)]
    assert runs[0]["compiled"] == runs[0]["programs"] > 0
    assert runs[1] == {"programs": runs[0]["programs"], "compiled": 0}
    assert any((tmp_path / "scvnet_jax" / "xla").iterdir())


_CONFIG_CHILD = r"""
import json
import jax
before = {k: repr(getattr(jax.config, k, jax.config.values[k])) for k in jax.config.values}
import scvnet_jax as sj
sj.load(sj.demo_model_path())
after = {k: repr(getattr(jax.config, k, jax.config.values[k])) for k in jax.config.values}
print(json.dumps({k: [before[k], after[k]] for k in before if before[k] != after[k]}))
"""


def test_the_library_leaves_jax_configuration_alone(tmp_path):
    """Importing scvnet_jax and loading a model change no JAX option (the
    compilation cache is the command lines' and sj.enable_compilation_cache's)."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(XDG_CACHE_HOME=str(tmp_path), JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", _CONFIG_CHILD], env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.splitlines()[-1]) == {}
    assert not (tmp_path / "scvnet_jax").exists()
