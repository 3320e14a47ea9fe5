"""Parameter-free building blocks (`scvnet_jax.models.ops`) and the architecture type."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scvnet_jax.models import Arch, ops


@pytest.mark.parametrize("size", [1, 2, 3, 4, 7])
def test_reflect_padding_rule(size):
    """Maps of >= 3 pixels are padded exactly like torch.nn.ReflectionPad2d(2) (mirror
    without repeating the edge); smaller ones repeat the reflection (2 px: b a b a b a)
    or replicate (1 px)."""
    x = np.arange(size * (size + 1), dtype=np.float32).reshape(1, size, size + 1, 1)
    got = np.asarray(ops.reflect_pad_hw(x, 2))
    assert got.shape == (1, size + 4, size + 5, 1)
    rows = np.array([abs(i) if i < size else 2 * (size - 1) - i for i in range(-2, size + 2)])
    if size >= 3:  # the official (PyTorch) definition
        cols = np.array([abs(j) if j <= size else 2 * size - j for j in range(-2, size + 3)])
        np.testing.assert_array_equal(got[0, :, :, 0], x[0, rows][:, cols, 0])
    assert np.isfinite(got).all()
    assert set(np.unique(got)) <= set(np.unique(x))


def test_norm_has_a_zero_gradient_at_zero():
    """All-zero feature vectors (hidden cells in training, padding) must not turn the
    gradient into NaN."""
    x = jnp.array([[0.0, 0.0], [3.0, 4.0]])
    np.testing.assert_array_equal(ops.norm(x), [0.0, 5.0])
    g = jax.grad(lambda v: ops.norm(v).sum())(x)
    np.testing.assert_allclose(g, [[0.0, 0.0], [0.6, 0.8]])


@pytest.mark.parametrize("size", [(37, 300), (300, 37), (23, 23), (460, 12)])
def test_host_resize_is_the_device_resize(size):
    """`resize_bilinear_host` (the engine's per-scale SuperGlobal inputs) gives what the
    model's own resize gives: short axes by matrix product, long ones (> MATMUL_MAX) by
    gathers, up and down, one axis unchanged."""
    x = np.random.default_rng(0).normal(size=(300, 23, 3)).astype(np.float32)
    want = np.asarray(ops.resize_bilinear(jnp.asarray(x[None]), size, False))[0]
    got = ops.resize_bilinear_host(x, size)
    assert got.shape == want.shape == (*size, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_arch_is_checked_and_hashable():
    a = Arch(depth=101, width=16)
    assert a.asdict() == dict(depth=101, width=16, reduction_dim=2048, corr_dim=256)
    assert Arch.from_mapping({**a.asdict(), "dtype": "float32"}) == a
    assert hash(a) == hash(Arch(101, 16, 2048, 256)) and a.local_dim == 256
    assert str(a) == "CVNet-R101 (depth=101, width=16, reduction_dim=2048, corr_dim=256)"
    with pytest.raises(ValueError, match="depth 34 is not a supported ResNet depth"):
        Arch(depth=34)
    with pytest.raises(ValueError, match="width must be a positive integer"):
        Arch(width=0)
    with pytest.raises(ValueError, match="missing: corr_dim"):
        Arch.from_mapping(dict(depth=50, width=8, reduction_dim=32))


def test_models_import_nothing_else_of_the_package():
    """The layering rule: scvnet_jax.models stands alone."""
    import ast
    from pathlib import Path

    import scvnet_jax.models as m
    for path in Path(m.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert not name.startswith("scvnet_jax") or name.startswith(
                    "scvnet_jax.models"), f"{path.name} imports {name}"
