"""Pallas TPU and GPU flash attention (interpret mode on CPU) against the float32 reference:
forward output (plain call and under vjp) and dq, dk, dv of a random-cotangent-weighted sum."""
from __future__ import annotations

import functools

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from attention_cases import (INTERPRET, PALLAS_IMPLS, TOLERANCE, Case, dead_rows, make_inputs,
                             max_err, outputs_and_grads, sweep)

from unimm_jax import kernels
from unimm_jax.kernels import flash_gpu

DEFAULT_CASES = sweep(seed=0, n=8, max_len=260)
# Block multiples, causal: exercises block skipping and the unmasked (full tile) path with
# no padding involved, for square and T > S shapes.
BLOCK_MULTIPLE_CASES = [Case(1, 256, 256, 4, 2, 64, True, False, "float32", 5, (64, 64)),
                        Case(1, 256, 128, 2, 1, 128, True, False, "bfloat16", 6, (64, 64))]
SLOW_CASES = sweep(seed=1, n=24, max_len=700, head_dims=(32, 64, 96, 128), batches=(1, 2, 3))


@functools.lru_cache(maxsize=None)
def _reference(case: Case):
  return outputs_and_grads("reference", case)


def check_against_reference(impl: str, case: Case):
  plain, out, grads = outputs_and_grads(impl, case)
  _, ref_out, ref_grads = _reference(case)
  tol = TOLERANCE[case.dtype]
  errors = {"out": max_err(plain, ref_out), "out_under_vjp": max_err(out, ref_out)}
  errors.update({n: max_err(g, r) for n, g, r in zip(("dq", "dk", "dv"), grads, ref_grads)})
  bad = {n: e for n, e in errors.items() if e > tol["out" if n.startswith("out") else "grad"]}
  assert not bad, f"{impl} {case}: errors {errors} exceed {tol}"
  for name, x in zip(("out", "dq", "dk", "dv"), (plain, *grads)):
    assert np.isfinite(x).all(), f"{impl} {case}: non-finite values in {name}"
  dead = dead_rows(case, make_inputs(case)[3])
  if dead.any():  # rows with nothing to attend: exactly 0 out and 0 dq
    assert (plain[dead] == 0).all() and (out[dead] == 0).all() and (grads[0][dead] == 0).all()
  return errors


def test_default_sweep_covers_features():
  cs = DEFAULT_CASES
  assert {c.causal for c in cs} == {True, False}
  assert any(c.segmented and c.causal for c in cs) and any(c.segmented and not c.causal
                                                           for c in cs)
  assert {c.q_heads // c.kv_heads for c in cs} >= {1, 2, 4}
  assert {c.dtype for c in cs} == {"float32", "bfloat16"}
  assert {c.head_dim for c in cs} == {64, 128}
  assert all(c.q_len % 64 for c in cs)
  assert any(c.kv_len > c.q_len for c in cs) and any(c.kv_len < c.q_len for c in cs)
  assert any(c.blocks is None for c in cs) and any(c.blocks for c in cs)


@pytest.mark.parametrize("case", DEFAULT_CASES + BLOCK_MULTIPLE_CASES, ids=str)
@pytest.mark.parametrize("impl", PALLAS_IMPLS)
def test_matches_reference(impl, case):
  check_against_reference(impl, case)


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CASES, ids=str)
@pytest.mark.parametrize("impl", PALLAS_IMPLS)
def test_matches_reference_large_sweep(impl, case):
  check_against_reference(impl, case)


@pytest.mark.parametrize("impl", PALLAS_IMPLS)
def test_gqa_does_not_repeat_kv(impl):
  """No array in the traced forward+backward is K/V-sized ([.., S, .., D]) with all Hq heads."""
  b, t, s, hq, hkv, d = 1, 48, 96, 4, 1, 64
  q = jnp.zeros((b, t, hq, d))
  k = v = jnp.zeros((b, s, hkv, d))

  def loss(q, k, v):
    return kernels.attention(q, k, v, causal=True, impl=impl, interpret=True).sum()

  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  kv_lengths = {96, 128}  # S, and S padded to the GPU kv block

  def shapes(jx):
    for eqn in jx.eqns:
      for var in eqn.outvars:
        yield tuple(getattr(var.aval, "shape", ()))
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        yield from shapes(sub)

  kv_sized = [sh for sh in shapes(jaxpr.jaxpr)
              if len(sh) == 4 and d in sh and kv_lengths & set(sh)]
  assert any(hkv in sh and hq not in sh for sh in kv_sized)  # the check sees K/V at all
  repeated = [sh for sh in kv_sized if hq in sh]
  assert not repeated, f"{impl}: K/V-sized arrays with all {hq} query heads: {repeated}"


@pytest.mark.parametrize("impl", PALLAS_IMPLS)
def test_custom_scale_and_jit_of_public_entry(impl):
  case = Case(1, 48, 48, 2, 2, 64, True, False, "float32", seed=3)
  q, k, v, _, _ = make_inputs(case)
  f = jax.jit(lambda q, k, v: kernels.attention(q, k, v, causal=True, impl=impl,
                                                interpret=True, scale=0.3))
  ref = kernels.attention_reference(q, k, v, causal=True, scale=0.3)
  np.testing.assert_allclose(f(q, k, v), ref, atol=1e-5)
  # A different scale must change the answer (guards against the scale being ignored).
  assert np.abs(np.asarray(ref) - np.asarray(kernels.attention_reference(
      q, k, v, causal=True))).max() > 1e-2


@pytest.mark.slow
def test_tpu_kernels_under_strict_tpu_interpreter():
  """pltpu.InterpretParams: uninitialised VMEM reads NaN and out-of-bounds reads raise."""
  from jax.experimental.pallas import tpu as pltpu

  from unimm_jax.kernels import flash_tpu

  case = Case(1, 200, 200, 4, 2, 64, True, True, "float32", seed=9)
  q, k, v, seg, ct = make_inputs(case)
  f = lambda q, k, v: flash_tpu.flash_attention(q, k, v, causal=True, segment_ids=seg,
                                                block_q=64, block_kv=64,
                                                interpret=pltpu.InterpretParams())
  out, vjp = jax.vjp(f, q, k, v)
  grads = vjp(ct)
  _, ref_out, ref_grads = _reference(case)
  assert max_err(np.asarray(out), ref_out) < TOLERANCE["float32"]["out"]
  for g, r in zip(grads, ref_grads):
    assert max_err(np.asarray(g), r) < TOLERANCE["float32"]["grad"]


@pytest.mark.parametrize("causal,segmented", [(False, False), (True, False), (False, True)])
def test_gpu_kernel_tiles_differ_per_kernel(causal, segmented):
  """Forward, dq and dk/dv tiles all differ; S = 40 pads to 64 keys (the dk/dv tile), so the
  padding fills part of one and the whole of another 16-key forward block: both must be
  masked or skipped, never taken as full blocks."""
  case = Case(2, 40, 40, 4, 2, 64, causal, segmented, "float32", seed=11)
  q, k, v, seg, ct = make_inputs(case)
  sizes = flash_gpu.BlockSizes(block_q=32, block_kv=16, block_q_dq=16, block_kv_dq=32,
                               block_q_dkv=64, block_kv_dkv=64)
  f = lambda q, k, v: flash_gpu.flash_attention(q, k, v, causal=causal, segment_ids=seg,
                                                block_sizes=sizes, interpret=INTERPRET)
  out, vjp = jax.jit(lambda q, k, v, ct: (lambda o, fn: (o, fn(ct)))(*jax.vjp(f, q, k, v)))(
      q, k, v, ct)
  _, ref_out, ref_grads = _reference(case)
  tol = TOLERANCE["float32"]
  assert max_err(np.asarray(out), ref_out) < tol["out"]
  for g, r in zip(vjp, ref_grads):
    assert max_err(np.asarray(g), r) < tol["grad"]
