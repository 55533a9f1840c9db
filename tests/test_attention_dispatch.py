"""config.model.attention_impl picks the attention kernel; every choice computes the same model.

On CPU the Pallas kernels (ours and JAX's splash) run in Pallas' interpreter.
"""
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from unimm_jax import sharding as shd
from unimm_jax.api import logical_axes
from unimm_jax.kernels import flash_mgpu
from unimm_jax.models.janus_config import tiny_janus_config, validate_janus_config
from unimm_jax.models.llm import LLM


def packed_batch(t=24, seed=0):
    """Two rows of t tokens: row 0 packs two segments, row 1 has left padding (segment 0)."""
    rng = np.random.default_rng(seed)
    b = 2
    ids = jnp.asarray(rng.integers(0, 512, (b, t)), jnp.int32)
    seg = np.ones((b, t), np.int32)
    seg[0, 10:] = 2
    seg[1, :5] = 0
    pos = np.concatenate([np.r_[np.arange(10), np.arange(t - 10)][None], np.maximum(np.arange(t) - 5, 0)[None]])
    return ids, jnp.asarray(seg), jnp.asarray(pos, jnp.int32)


def llm_cfg(impl):
    model = tiny_janus_config()
    model.attention_impl = impl  # the top-level knob drives the LLM's field
    return model.llm


def forward(cfg, params, ids, seg, pos):
    m = LLM(cfg)
    emb = m.apply({"params": params}, ids, method=LLM.embed_tokens)
    hidden, _ = m.apply({"params": params}, emb, pos, seg)
    return m.apply({"params": params}, hidden, method=LLM.logits)


@pytest.fixture(scope="module")
def setup():
    ids, seg, pos = packed_batch()
    cfg = llm_cfg("xla")
    params = nn.unbox(LLM(cfg).init(jax.random.key(0), ids, method=LLM.init_all))["params"]
    return params, ids, seg, pos


def test_top_level_attention_impl_drives_the_llm():
    model = tiny_janus_config()
    model.attention_impl = "splash"
    assert model.llm.attention_impl == "splash"
    model.attention_impl = "flash"
    with pytest.raises(ValueError, match="model.attention_impl"):
        validate_janus_config(model)


@pytest.mark.parametrize("impl", ["pallas", "splash"])
def test_kernel_impls_equal_xla_forward_and_gradients(setup, impl):
    if impl == "splash" and jax.default_backend() != "cpu":
        pytest.skip("splash is a TPU kernel; this file runs it interpreted on CPU")
    params, ids, seg, pos = setup
    real = np.asarray(seg) > 0  # padded rows' values are never used
    ref = forward(llm_cfg("xla"), params, ids, seg, pos)
    out = forward(llm_cfg(impl), params, ids, seg, pos)
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=2e-5)

    def loss(cfg):
        return lambda p: jnp.sum(jnp.where(seg[..., None] > 0, forward(cfg, p, ids, seg, pos), 0.0) ** 2) * 1e-3

    g_ref = jax.grad(loss(llm_cfg("xla")))(params)
    g_out = jax.grad(loss(llm_cfg(impl)))(params)
    for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_out)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-4, rtol=2e-3)


def test_auto_is_xla_on_cpu(setup):
    params, ids, seg, pos = setup
    np.testing.assert_array_equal(
        np.asarray(forward(llm_cfg("auto"), params, ids, seg, pos)),
        np.asarray(forward(llm_cfg("xla"), params, ids, seg, pos)),
    )


def test_pallas_under_a_sharded_mesh_equals_single_device(setup):
    """Params sharded by the logical rules on 8 fake devices; the kernel runs under shard_map."""
    if jax.device_count() < 8:
        pytest.skip("needs the 8 fake CPU devices of tests/conftest.py")
    params, ids, seg, pos = setup
    ref = forward(llm_cfg("xla"), params, ids, seg, pos)
    mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
    axes = logical_axes(tiny_janus_config())["llm"]
    placed = jax.tree.map(jax.device_put, params, shd.params_shardings(axes, params, mesh))
    cfg = llm_cfg("pallas")
    with jax.set_mesh(mesh), nn.logical_axis_rules(shd.DEFAULT_RULES):
        out = jax.jit(lambda p: forward(cfg, p, ids, seg, pos))(placed)
    real = np.asarray(seg) > 0
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=2e-5)


# Only with UNIMM_KERNEL_TESTS_ON_GPU=1 (and JAX_PLATFORMS=cuda,cpu) on a Hopper GPU.
ON_HOPPER_GPU = os.environ.get("UNIMM_KERNEL_TESTS_ON_GPU") == "1" and flash_mgpu.is_hopper()

@pytest.mark.skipif(not ON_HOPPER_GPU, reason="needs UNIMM_KERNEL_TESTS_ON_GPU=1 on a Hopper GPU")
def test_llm_with_mosaic_gpu_kernels_equals_xla_on_hopper():
    """bf16 LLM, head dim 64, 256 packed tokens: `pallas` runs the Mosaic GPU kernels there."""
    ids, seg, pos = packed_batch(t=256, seed=1)

    def cfg(impl):
        c = llm_cfg(impl)
        c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim = 256, 4, 2, 64
        c.dtype = "bfloat16"
        return c

    params = nn.unbox(LLM(cfg("xla")).init(jax.random.key(0), ids, method=LLM.init_all))["params"]
    lowered = jax.jit(lambda p: forward(cfg("pallas"), p, ids, seg, pos)).lower(params).as_text()
    assert "mosaic_gpu" in lowered  # the Hopper kernels, not the Triton fallback
    real = np.asarray(seg) > 0
    ref = np.asarray(forward(cfg("xla"), params, ids, seg, pos), np.float32)
    out = np.asarray(forward(cfg("pallas"), params, ids, seg, pos), np.float32)
    scale = np.abs(ref[real]).max()
    assert np.abs(out[real] - ref[real]).max() < 2e-2 * max(scale, 1.0)

    def loss(c):
        return lambda p: jnp.sum(jnp.where(seg[..., None] > 0, forward(c, p, ids, seg, pos), 0.0) ** 2) * 1e-3

    g_ref = jax.grad(loss(cfg("xla")))(params)
    g_out = jax.grad(loss(cfg("pallas")))(params)
    for a, g in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_out)):
        a, g = np.asarray(a, np.float32), np.asarray(g, np.float32)
        assert np.abs(g - a).max() <= 3e-2 * max(np.abs(a).max(), 1e-3)



@pytest.mark.parametrize("policy, reruns_forward", [("dots_no_batch", False), ("dots", False), ("full", True)])
def test_dots_remat_keeps_the_flash_forward_residuals(setup, policy, reruns_forward):
    """The "dots" remat policies save the kernel's (out, lse), so the compiled backward pass never
    re-runs the forward kernel (4% of a 1B step on an H100); "full" recomputes it, as it should."""
    params, ids, seg, pos = setup
    cfg = llm_cfg("pallas")
    cfg.remat_policy = policy
    loss = lambda p: jnp.sum(forward(cfg, p, ids, seg, pos) ** 2)
    hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    ops = re.findall(r'op_name="([^"]*)"', hlo)
    assert any("flash_fwd" in op for op in ops) and any("flash_dq" in op for op in ops)
    assert any("rematted_computation" in op and "flash_fwd" in op for op in ops) == reruns_forward
