"""The kernels lower for real hardware (Mosaic for TPU, Triton for GPU) from a CPU host.

Lowering runs Pallas' own TPU/GPU lowering rules (block-shape tiling, supported ops,
power-of-two Triton tiles), which interpret mode skips; it does not run the hardware
compilers, so it is a necessary check, not a sufficient one.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from unimm_jax import kernels

PLATFORM = {"pallas_tpu": ("tpu", "tpu_custom_call"),
            "pallas_gpu": ("cuda", "__gpu$xla.gpu.triton")}


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
@pytest.mark.parametrize("dtype,d,causal,segmented,t,hq,hkv", [
    ("bfloat16", 128, True, True, 512, 8, 2),
    ("float32", 64, False, False, 300, 4, 4),
    ("bfloat16", 64, True, False, 1000, 4, 1),
    ("float16", 96, True, True, 384, 6, 2),  # GQA group of 3, head dim padded on GPU
])
def test_forward_and_backward_lower(impl, dtype, d, causal, segmented, t, hq, hkv):
  if impl == "pallas_tpu" and dtype == "float16":
    pytest.skip("float16 is not a pallas_tpu dtype")
  platform, target = PLATFORM[impl]
  q = jax.ShapeDtypeStruct((2, t, hq, d), jnp.dtype(dtype))
  kv = jax.ShapeDtypeStruct((2, t, hkv, d), jnp.dtype(dtype))
  seg = jax.ShapeDtypeStruct((2, t), jnp.int32) if segmented else None

  def fwd_bwd(q, k, v, seg):
    f = lambda q, k, v: kernels.attention(q, k, v, causal=causal, segment_ids=seg, impl=impl)
    out, vjp = jax.vjp(f, q, k, v)
    return out, vjp(out)

  text = jax.jit(fwd_bwd).trace(q, kv, kv, seg).lower(lowering_platforms=(platform,)).as_text()
  assert text.count(target) >= 3  # forward, dq, dk/dv kernels
