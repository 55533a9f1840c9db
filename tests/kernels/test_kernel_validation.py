"""Bad inputs to `attention` / `sharded_attention` raise errors that name the problem."""
from __future__ import annotations

import jax.numpy as jnp
import pytest

from unimm_jax import kernels
from unimm_jax.kernels import flash_gpu, flash_tpu
from unimm_jax.sharding import make_mesh

Q = jnp.zeros((2, 16, 4, 8))
KV = jnp.zeros((2, 16, 2, 8))


def call(q=Q, k=KV, v=KV, **kw):
  kw = {"causal": True, "impl": "pallas_tpu", "interpret": True, **kw}
  return kernels.attention(q, k, v, **kw)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(q=jnp.zeros((2, 16, 8))), ValueError, r"q must have rank 4 \[batch, seq_len"),
    (dict(k=jnp.zeros((2, 16, 2, 8, 1))), ValueError, "k must have rank 4"),
    (dict(v=jnp.zeros((2, 16, 1, 8))), ValueError, "k and v must have the same shape"),
    (dict(k=jnp.zeros((3, 16, 2, 8)), v=jnp.zeros((3, 16, 2, 8))), ValueError,
     "batch sizes differ"),
    (dict(k=jnp.zeros((2, 16, 2, 16)), v=jnp.zeros((2, 16, 2, 16))), ValueError,
     "head dims differ"),
    (dict(k=jnp.zeros((2, 16, 3, 8)), v=jnp.zeros((2, 16, 3, 8))), ValueError,
     r"query heads \(4\) must be a multiple of num kv heads \(3\)"),
    (dict(k=KV.astype(jnp.bfloat16)), TypeError, "must share one dtype"),
    (dict(q=Q.astype(jnp.float16), k=KV.astype(jnp.float16), v=KV.astype(jnp.float16)),
     TypeError, "impl='pallas_tpu' supports dtypes float32, bfloat16"),
    (dict(q=Q.astype(jnp.int32), k=KV.astype(jnp.int32), v=KV.astype(jnp.int32),
          impl="xla"), TypeError, "supports dtypes"),
    (dict(segment_ids=jnp.zeros((2, 15), jnp.int32)), ValueError,
     r"segment_ids must have shape \[batch, q_len\] = \(2, 16\)"),
    (dict(segment_ids=jnp.zeros((2, 16), jnp.float32)), TypeError, "segment_ids must be int32"),
    (dict(k=jnp.zeros((2, 12, 2, 8)), v=jnp.zeros((2, 12, 2, 8)),
          segment_ids=jnp.zeros((2, 16), jnp.int32)), ValueError, "q_len == kv_len"),
    (dict(impl="splash"), ValueError, "unknown attention impl 'splash'; choose one of"),
    (dict(causal=None), TypeError, "causal must be a Python bool"),
    (dict(q=jnp.zeros((2, 0, 4, 8))), ValueError, "empty dimension"),
])
def test_bad_inputs(kwargs, error, match):
  with pytest.raises(error, match=match):
    call(**kwargs)


def test_float16_is_accepted_where_supported():
  q, kv = Q.astype(jnp.float16), KV.astype(jnp.float16)
  assert call(q, kv, kv, impl="xla").dtype == jnp.float16


def test_bad_block_sizes():
  with pytest.raises(ValueError, match="powers of two"):
    flash_gpu.flash_attention(Q, KV, KV, causal=True, interpret=True,
                              block_sizes=flash_gpu.BlockSizes(block_q=48))
  with pytest.raises(ValueError, match="multiples of 8"):
    flash_tpu.flash_attention(Q, KV, KV, causal=True, interpret=True, block_q=12)


def test_sharded_errors():
  mesh = make_mesh(2, 2, 2)
  q, kv = jnp.zeros((4, 16, 4, 8)), jnp.zeros((4, 16, 1, 8))
  with pytest.raises(ValueError, match=r"num kv heads \(1\) does not divide over mesh axis "
                                       r"'tensor' \(2 shards\)"):
    kernels.sharded_attention(q, kv, kv, causal=True, impl="xla", mesh=mesh)
  q, kv = jnp.zeros((2, 16, 4, 8)), jnp.zeros((2, 16, 2, 8))
  with pytest.raises(ValueError, match=r"batch size 2 does not divide over mesh axes "
                                       r"\('data', 'fsdp'\) \(4 shards\)"):
    kernels.sharded_attention(q, kv, kv, causal=True, impl="xla", mesh=mesh)
  with pytest.raises(ValueError, match="mesh axis 'model' is not in the mesh"):
    kernels.sharded_attention(q, kv, kv, causal=True, impl="xla", mesh=mesh,
                              head_axis="model")
  with pytest.raises(ValueError, match="q must have rank 4"):
    kernels.sharded_attention(q[0], kv, kv, causal=True, impl="xla", mesh=mesh)
