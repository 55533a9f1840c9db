"""The float32 reference (the kernels' oracle) against an independent NumPy loop and
jax.nn.dot_product_attention, plus the `xla` impl of the public entry."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm_jax import kernels

reference = jax.jit(kernels.attention_reference, static_argnames=("causal", "scale"))


def naive_attention(q, k, v, *, causal, segment_ids=None, scale=None):
  """Row-by-row NumPy float64 attention straight from the definition."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  scale = 1 / np.sqrt(d) if scale is None else scale
  out = np.zeros_like(q)
  for bi in range(b):
    for h in range(hq):
      kh = h // (hq // hkv)
      for i in range(t):
        keys = [j for j in range(s)
                if (not causal or j <= i + s - t)
                and (segment_ids is None or segment_ids[bi, i] == segment_ids[bi, j])]
        if not keys:
          continue
        logits = np.array([q[bi, i, h] @ k[bi, j, kh] for j in keys]) * scale
        w = np.exp(logits - logits.max())
        w /= w.sum()
        out[bi, i, h] = sum(wj * v[bi, j, kh] for wj, j in zip(w, keys))
  return out


def _qkv(seed, b, t, s, hq, hkv, d):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal(shape, np.float32))
               for shape in ((b, t, hq, d), (b, s, hkv, d), (b, s, hkv, d)))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("t,s", [(7, 7), (5, 9), (9, 5)])
def test_reference_matches_naive_loop(causal, t, s):
  q, k, v = _qkv(0, 2, t, s, 4, 2, 8)
  got = reference(q, k, v, causal=causal)
  np.testing.assert_allclose(got, naive_attention(q, k, v, causal=causal), atol=1e-5)


def test_reference_segments_and_dead_rows():
  q, k, v = _qkv(1, 2, 10, 10, 2, 1, 8)
  seg = jnp.array([[1, 1, 1, 2, 2, 2, 2, 0, 0, 0], [5, 5, 5, 5, 5, 5, 5, 5, 5, 5]], jnp.int32)
  got = reference(q, k, v, causal=True, segment_ids=seg)
  np.testing.assert_allclose(got, naive_attention(q, k, v, causal=True, segment_ids=seg),
                             atol=1e-5)
  # Causal with T > S: the first T - S rows see nothing and must be exactly 0, gradient 0.
  q, k, v = _qkv(2, 1, 6, 4, 2, 2, 8)
  out, (dq,) = jax.jit(lambda q: (lambda o, f: (o, f(jnp.ones_like(o))))(
      *jax.vjp(lambda q: kernels.attention_reference(q, k, v, causal=True), q)))(q)
  assert (np.asarray(out[:, :2]) == 0).all() and np.abs(np.asarray(out[:, 2:])).max() > 0
  assert np.isfinite(np.asarray(dq)).all() and (np.asarray(dq[:, :2]) == 0).all()


def test_reference_matches_jax_nn_dot_product_attention():
  q, k, v = _qkv(3, 2, 16, 16, 4, 2, 32)
  want = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
  np.testing.assert_allclose(reference(q, k, v, causal=True), want,
                             atol=1e-5)


def test_xla_impl_is_reference_and_keeps_dtype():
  q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(4, 1, 12, 12, 2, 2, 16))
  seg = jnp.array([[0] * 5 + [1] * 7], jnp.int32)
  got = kernels.attention(q, k, v, causal=True, segment_ids=seg, impl="xla")
  assert got.dtype == jnp.bfloat16 and got.shape == q.shape
  want = kernels.attention_reference(q, k, v, causal=True, segment_ids=seg)
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
