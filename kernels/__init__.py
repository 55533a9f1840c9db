"""Pallas attention kernels (TPU and GPU) and their pure-JAX references.

    from unimm_jax import kernels
    out = kernels.attention(q, k, v, causal=True, segment_ids=None, impl="pallas_tpu")
    out = kernels.sharded_attention(q, k, v, causal=True, impl="pallas_gpu", mesh=mesh)

q [B, T, Hq, D], k/v [B, S, Hkv, D] (grouped-query when Hkv < Hq), segment_ids int32
[B, T]; the result is [B, T, Hq, D] in q's dtype. Files:
  dispatch.py    `attention`: validation + choice of implementation
  validation.py  input checks with actionable errors
  reference.py   pure-jnp float32 attention: test oracle and the "xla" impl
  masking.py     the mask rule (causal, padding, segments) and causal block arithmetic
  tiling.py      padding to block multiples
  flash_tpu.py   Pallas TPU (Mosaic) flash attention, forward + backward
  flash_gpu.py   Pallas GPU (Triton) flash attention, forward + backward; picks the two below
                 on Hopper when they take the inputs
  flash_mgpu.py      Pallas Mosaic GPU forward for Hopper (warp-specialised, wgmma + TMA)
  flash_mgpu_bwd.py  Pallas Mosaic GPU backward for Hopper (dq and dk/dv kernels)
  sharded.py     `sharded_attention`: the kernel under shard_map (batch x heads)
  residuals.py   names of the forward's saved (out, lse), kept by the LLM's "dots" remat policies
"""
from .dispatch import attention
from .reference import attention_reference
from .sharded import sharded_attention
from .validation import IMPLS

__all__ = ["IMPLS", "attention", "attention_reference", "sharded_attention"]
