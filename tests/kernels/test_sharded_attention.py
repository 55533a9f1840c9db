"""sharded_attention on 8 fake CPU devices, mesh data=2 x fsdp=2 x tensor=2."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_cases import Case, make_inputs

from unimm_jax import kernels
from unimm_jax.sharding import make_mesh


@pytest.fixture(scope="module")
def mesh():
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (tests/conftest.py sets 8 fake CPU devices)")
  return make_mesh(2, 2, 2)


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu", "xla"])
def test_sharded_matches_reference(mesh, impl):
  # B=4 over data*fsdp, Hkv=2 (Hq=4, GQA) over tensor; packed segments, causal.
  case = Case(4, 72, 72, 4, 2, 64, True, True, "float32", seed=11)
  q, k, v, seg, ct = make_inputs(case)

  def loss(q, k, v):
    out = kernels.sharded_attention(q, k, v, causal=True, segment_ids=seg, impl=impl,
                                    mesh=mesh, interpret=True)
    return jnp.sum(out * ct), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  spec = out.sharding.spec
  assert tuple(spec[0]) == ("data", "fsdp") and spec[2] == "tensor", spec

  def ref_loss(q, k, v):
    out = kernels.attention_reference(q, k, v, causal=True, segment_ids=seg)
    return jnp.sum(out * ct), out

  (_, ref_out), ref_grads = jax.jit(jax.value_and_grad(ref_loss, argnums=(0, 1, 2),
                                                       has_aux=True))(q, k, v)
  np.testing.assert_allclose(out, ref_out, atol=1e-5)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, atol=5e-5)
