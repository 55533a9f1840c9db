"""xla_attention against a plain numpy softmax attention: packed segments, grouped heads,
fully masked (padding) rows."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm_jax.layers.attention import make_attention_mask, xla_attention


def numpy_attention(q, k, v, mask):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, t, hq, d = q.shape
    group = hq // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(d)
    m = np.asarray(mask)  # [B, 1, T, S]
    logits = np.where(m, logits, -np.inf)
    mx = np.max(logits, -1, keepdims=True)
    w = np.exp(logits - np.where(np.isfinite(mx), mx, 0))
    w = np.where(m, w, 0)
    w = w / np.maximum(w.sum(-1, keepdims=True), 1e-300)
    return np.einsum("bhts,bshd->bthd", w, v)


@pytest.fixture
def packed():
    # row 0: two packed examples and 2 padding slots; row 1: one example of 8
    seg = jnp.asarray([[1, 1, 1, 2, 2, 2, 0, 0], [1] * 8], jnp.int32)
    pos = jnp.asarray([[0, 1, 2, 0, 1, 2, 0, 0], list(range(8))], jnp.int32)
    return make_attention_mask(seg, seg, pos, pos, True)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (4, 1)])
def test_matches_numpy_with_packing_and_padding(packed, hq, hkv):
    kq, kk, kv = jax.random.split(jax.random.key(hq * 10 + hkv), 3)
    q = jax.random.normal(kq, (2, 8, hq, 16))
    k, v = jax.random.normal(kk, (2, 8, hkv, 16)), jax.random.normal(kv, (2, 8, hkv, 16))
    out = np.asarray(xla_attention(q, k, v, packed))
    np.testing.assert_allclose(out, numpy_attention(q, k, v, packed), rtol=1e-5, atol=1e-5)
    assert np.all(out[0, 6:] == 0)  # padding queries see nothing: zeros, not NaN or an average


def test_gradients_finite_and_zero_through_padding(packed):
    kq, kk, kv = jax.random.split(jax.random.key(3), 3)
    q, k, v = (jax.random.normal(key, (2, 8, 2, 8)) for key in (kq, kk, kv))
    grads = jax.grad(lambda q, k, v: jnp.sum(xla_attention(q, k, v, packed) ** 2), argnums=(0, 1, 2))(q, k, v)
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))
    assert np.all(np.asarray(grads[0])[0, 6:] == 0)  # padding queries get no gradient
    assert np.all(np.asarray(grads[1])[0, 6:] == 0)  # padding keys are never attended


def test_no_mask_is_full_attention():
    kq, kk, kv = jax.random.split(jax.random.key(4), 3)
    q, k, v = (jax.random.normal(key, (1, 5, 2, 8)) for key in (kq, kk, kv))
    full = jnp.ones((1, 1, 5, 5), bool)
    np.testing.assert_allclose(np.asarray(xla_attention(q, k, v, None)), numpy_attention(q, k, v, full),
                               rtol=1e-5, atol=1e-5)
