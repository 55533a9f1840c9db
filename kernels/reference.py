"""Pure-jnp attention: the numerical oracle for the Pallas kernels and the `xla` fallback.

Everything is computed in float32 (HIGHEST matmul precision, so TPUs do not round the
operands to bfloat16) and cast back to q's dtype at the end. Memory is O(T * S) per head.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from .masking import MASK_VALUE


def attention_mask(q_len: int, kv_len: int, *, causal: bool, segment_ids=None):
  """Boolean [B or 1, T, S] mask of allowed pairs (see masking.py for the rule)."""
  rows = jnp.arange(q_len)[:, None]
  cols = jnp.arange(kv_len)[None, :]
  mask = jnp.ones((1, q_len, kv_len), bool)
  if causal:
    mask = mask & (cols <= rows + (kv_len - q_len))[None]
  if segment_ids is not None:
    mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
  return mask


def attention_reference(q, k, v, *, causal: bool, segment_ids=None, scale=None):
  """Reference multi-head / grouped-query attention.

  Args:
    q: [B, T, Hq, D]; k, v: [B, S, Hkv, D] with Hq % Hkv == 0 (query head h reads kv head
      h // (Hq // Hkv)); float32, bfloat16 or float16.
    causal: bottom-right aligned causal mask (query i sees keys j <= i + S - T).
    segment_ids: optional int32 [B, T] (needs S == T); attention stays within a segment.
    scale: softmax scale, default 1/sqrt(D).
  Returns:
    [B, T, Hq, D] in q's dtype; rows that may attend nothing are 0.
  """
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  scale = 1.0 / math.sqrt(d) if scale is None else scale
  hi = jax.lax.Precision.HIGHEST
  # Group query heads by their kv head instead of repeating K/V.
  qf = q.astype(jnp.float32).reshape(b, t, hkv, hq // hkv, d)
  kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)
  logits = jnp.einsum("btkgd,bskd->bkgts", qf, kf, precision=hi) * scale
  mask = attention_mask(t, s, causal=causal, segment_ids=segment_ids)[:, None, None]
  logits = jnp.where(mask, logits, MASK_VALUE)
  # Where-masking (not -inf) keeps rows with nothing to attend finite, and their gradient 0.
  p = jnp.where(mask, jnp.exp(logits - logits.max(-1, keepdims=True)), 0.0)
  denom = p.sum(-1, keepdims=True)
  p = p / jnp.where(denom == 0, 1.0, denom)
  out = jnp.einsum("bkgts,bskd->btkgd", p, vf, precision=hi)
  return out.reshape(b, t, hq, d).astype(q.dtype)
