"""The Hopper (Mosaic GPU) flash-attention kernels from a CPU host: which inputs they take,
how flash_gpu chooses them, and that forward and backward lower to Mosaic GPU custom calls.

Their numerics are checked compiled on an H100 (`benchmarks/attention.py --check`, and this
repo's kernel tests with UNIMM_KERNEL_TESTS_ON_GPU=1, where `impl="pallas_gpu"` picks them):
jax 0.10's Mosaic GPU interpreter cannot run them (no run_state, layout casts or transposed
wgmma operands), so on CPU the Triton kernels stand in and these tests guard the rest.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_cases import ON_GPU, TOLERANCE, Case, make_inputs, max_err, outputs_and_grads

from unimm_jax.kernels import flash_gpu, flash_mgpu, flash_mgpu_bwd

ON_HOPPER = ON_GPU and flash_mgpu.is_hopper()
# Compiled on a Hopper GPU (UNIMM_KERNEL_TESTS_ON_GPU=1): segments (packed, with padding),
# GQA 2:1 and 4:1, causal and full, S > T, head dims 64 and 128, both 16-bit dtypes' paths.
MOSAIC_CASES = [Case(2, 256, 256, 4, 2, 128, True, True, "bfloat16", 1),
                Case(1, 384, 384, 4, 4, 64, False, True, "bfloat16", 2),
                Case(2, 256, 512, 8, 2, 128, True, False, "bfloat16", 3),
                Case(1, 512, 512, 4, 1, 64, False, False, "bfloat16", 4),
                Case(1, 128, 384, 2, 2, 128, True, False, "bfloat16", 5),
                Case(2, 1024, 1024, 8, 2, 128, True, True, "bfloat16", 6)]


def _shapes(t=256, s=256, hq=4, hkv=2, d=128, dtype=jnp.bfloat16):
  return (jax.ShapeDtypeStruct((2, t, hq, d), dtype), jax.ShapeDtypeStruct((2, s, hkv, d), dtype))


@pytest.mark.parametrize("kwargs,causal,segmented,reason", [
    (dict(), True, False, None),
    (dict(), True, True, None),
    (dict(d=64, dtype=jnp.float16), False, False, None),
    (dict(t=128, s=384), True, False, None),  # S > T, bottom-right causal
    (dict(dtype=jnp.float32), True, False, "dtype"),
    (dict(d=96), True, False, "head dim"),
    (dict(t=192, s=192), True, False, "q length"),
    (dict(t=256, s=320), False, False, "kv length"),
    (dict(t=384, s=256), True, False, "causal with kv length < q length"),
])
def test_unsupported_reason(kwargs, causal, segmented, reason):
  q, k = _shapes(**kwargs)
  seg = jax.ShapeDtypeStruct(q.shape[:2], jnp.int32) if segmented else None
  got = flash_mgpu.unsupported_reason(q, k, causal=causal, segment_ids=seg,
                                      blocks=flash_mgpu.MosaicBlocks())
  if reason is None:
    assert got is None
  else:
    assert got is not None and reason in got


def test_backward_tiles_checked():
  blocks = flash_mgpu_bwd.MosaicBwdBlocks()
  assert flash_mgpu_bwd.unsupported_reason(*_shapes(), blocks=blocks) is None
  q, k = _shapes(t=128, s=128)
  wide = flash_mgpu_bwd.MosaicBwdBlocks(block_kv_dkv=128)  # a CTA would need 256 keys
  assert "kv length" in flash_mgpu_bwd.unsupported_reason(q, k, blocks=wide)


def test_auto_falls_back_off_hopper_and_mosaic_says_why():
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((1, 128, 2, 64)), jnp.bfloat16) for _ in range(3))
  auto = flash_gpu.flash_attention(q, k, v, causal=True, interpret=True)
  triton = flash_gpu.flash_attention(
      q, k, v, causal=True, interpret=True,
      block_sizes=flash_gpu.BlockSizes(forward="triton", backward="triton"))
  np.testing.assert_array_equal(np.asarray(auto), np.asarray(triton))
  for which in ("forward", "backward"):
    sizes = flash_gpu.BlockSizes(**{which: "mosaic"})
    with pytest.raises(ValueError, match=f"{which}='mosaic' cannot run these inputs: interpret"):
      flash_gpu.flash_attention(q, k, v, causal=True, interpret=True, block_sizes=sizes)
  if not flash_mgpu.is_hopper():
    with pytest.raises(ValueError, match="not a compute capability 9"):
      flash_gpu.flash_attention(q, k, v, causal=True,
                                block_sizes=flash_gpu.BlockSizes(forward="mosaic"))
  with pytest.raises(ValueError, match="one of"):
    flash_gpu.flash_attention(q, k, v, causal=True, interpret=True,
                              block_sizes=flash_gpu.BlockSizes(backward="cudnn"))


@pytest.mark.parametrize("causal,segmented,t,s,hq,hkv,d", [
    (True, False, 256, 256, 4, 2, 128),
    (False, False, 128, 256, 4, 1, 64),
    (True, False, 128, 384, 2, 2, 128),
    (True, True, 256, 256, 4, 2, 64),
])
def test_forward_and_backward_lower_to_mosaic_gpu(causal, segmented, t, s, hq, hkv, d):
  q, k = _shapes(t, s, hq, hkv, d)
  lse = jax.ShapeDtypeStruct((2, hq, t), jnp.float32)
  seg = jax.ShapeDtypeStruct((2, t), jnp.int32) if segmented else None

  def fwd_bwd(q, k, v, seg, lse):
    o, lse_out = flash_mgpu.flash_forward(q, k, v, causal=causal, scale=0.1, segment_ids=seg)
    grads = flash_mgpu_bwd.flash_backward(q, k, v, o, lse, o, causal=causal, scale=0.1,
                                          segment_ids=seg)
    return o, lse_out, grads

  lowered = jax.jit(fwd_bwd).trace(q, k, k, seg, lse).lower(lowering_platforms=("cuda",))
  assert lowered.as_text().count("custom_call @mosaic_gpu") == 3  # forward, dq, dk/dv


@pytest.mark.skipif(not ON_HOPPER, reason="needs UNIMM_KERNEL_TESTS_ON_GPU=1 on a Hopper GPU")
@pytest.mark.parametrize("case", MOSAIC_CASES, ids=str)
def test_mosaic_kernels_match_reference_on_hopper(case):
  q, k, v, seg, ct = make_inputs(case)
  sizes = flash_gpu.BlockSizes(forward="mosaic", backward="mosaic")
  f = lambda q, k, v: flash_gpu.flash_attention(q, k, v, causal=case.causal, segment_ids=seg,
                                                block_sizes=sizes)

  @jax.jit
  def run(q, k, v, ct):
    out, vjp = jax.vjp(f, q, k, v)
    return out, vjp(ct)

  out, grads = jax.tree.map(lambda x: np.asarray(x.astype(jnp.float32)), run(q, k, v, ct))
  _, ref_out, ref_grads = outputs_and_grads("reference", case)
  tol = TOLERANCE[case.dtype]
  assert max_err(out, ref_out) < tol["out"]
  for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
    assert np.isfinite(g).all(), name
    assert max_err(g, r) < tol["grad"], (name, max_err(g, r))
