"""Input checks for the attention entry points: each error names the problem and the fix.

All checks are on static shapes/dtypes, so they run once at trace time under jit.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

IMPLS = ("pallas_tpu", "pallas_gpu", "xla")

# Mosaic TPU has no float16 matmul path worth using; Triton and XLA take all three.
_DTYPES = {
    "pallas_tpu": (jnp.float32, jnp.bfloat16),
    "pallas_gpu": (jnp.float32, jnp.bfloat16, jnp.float16),
    "xla": (jnp.float32, jnp.bfloat16, jnp.float16),
}


def _names(dtypes) -> str:
  return ", ".join(np.dtype(d).name for d in dtypes)


def check_attention_inputs(q, k, v, *, causal, segment_ids, impl: str) -> None:
  """Raises ValueError/TypeError unless q [B,T,Hq,D], k/v [B,S,Hkv,D] fit `impl`."""
  if impl not in IMPLS:
    raise ValueError(f"unknown attention impl {impl!r}; choose one of {', '.join(IMPLS)}.")
  if not isinstance(causal, (bool, np.bool_)):
    raise TypeError(f"causal must be a Python bool, got {type(causal).__name__}; pass "
                    f"causal=True or causal=False (it selects a kernel, so it is static).")
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      raise TypeError(f"{name} must be an array, got {type(x).__name__}.")
    if x.ndim != 4:
      raise ValueError(f"{name} must have rank 4 [batch, seq_len, num_heads, head_dim], got "
                       f"shape {tuple(x.shape)}. Add the missing axes (e.g. x[:, :, None, :] "
                       f"for a single head) or reshape to that layout.")
    if any(d == 0 for d in x.shape):
      raise ValueError(f"{name} has an empty dimension: shape {tuple(x.shape)}.")
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape [batch, kv_len, num_kv_heads, "
                     f"head_dim], got k {tuple(k.shape)} and v {tuple(v.shape)}.")
  b, t, hq, d = q.shape
  bk, s, hkv, dk = k.shape
  if bk != b:
    raise ValueError(f"q and k/v batch sizes differ: q {tuple(q.shape)}, k {tuple(k.shape)}. "
                     f"Pass the same batch to all three.")
  if dk != d:
    raise ValueError(f"q and k/v head dims differ: q has {d}, k/v have {dk}. This kernel "
                     f"needs one head_dim; project q, k and v to the same size.")
  if hq % hkv:
    raise ValueError(f"num query heads ({hq}) must be a multiple of num kv heads ({hkv}) "
                     f"for grouped-query attention; choose kv heads that divide {hq}.")
  if not (q.dtype == k.dtype == v.dtype):
    raise TypeError(f"q, k, v must share one dtype, got q {q.dtype}, k {k.dtype}, "
                    f"v {v.dtype}. Cast them, e.g. k.astype(q.dtype).")
  if q.dtype not in [np.dtype(x) for x in _DTYPES[impl]]:
    raise TypeError(f"impl={impl!r} supports dtypes {_names(_DTYPES[impl])}, got {q.dtype}. "
                    f"Cast the inputs (e.g. .astype(jnp.bfloat16)) or pick another impl.")
  if segment_ids is not None:
    if not hasattr(segment_ids, "shape") or tuple(segment_ids.shape) != (b, t):
      shape = getattr(segment_ids, "shape", type(segment_ids).__name__)
      raise ValueError(f"segment_ids must have shape [batch, q_len] = {(b, t)}, got {shape}.")
    if segment_ids.dtype != np.int32:
      raise TypeError(f"segment_ids must be int32, got {segment_ids.dtype}; use "
                      f"segment_ids.astype(jnp.int32).")
    if s != t:
      raise ValueError(f"segment_ids are for self-attention, where q_len == kv_len, but "
                       f"q_len={t} and kv_len={s}. Drop segment_ids or pass matching lengths.")
