"""LLM options that must not change the numbers: unrolled layers, remat policies, KV cache."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from unimm_jax.layers.attention import make_attention_mask
from unimm_jax.models.janus_config import tiny_janus_config
from unimm_jax.models.llm import LLM


def run(cfg, params, ids):
    return LLM(cfg).apply({"params": params}, ids, method=LLM.init_all)


@pytest.fixture(scope="module")
def base():
    cfg = tiny_janus_config().llm
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 512, (2, 9)), jnp.int32)
    params = nn.unbox(LLM(cfg).init(jax.random.key(0), ids, method=LLM.init_all))["params"]
    return cfg, params, ids, run(cfg, params, ids)


@pytest.mark.parametrize("change", [dict(scan_layers=False), dict(remat_policy="full"), dict(remat_policy="dots")])
def test_layer_options_keep_logits(base, change):
    cfg, params, ids, ref = base
    other = cfg.copy_and_resolve_references()
    other.update(change)
    np.testing.assert_allclose(np.asarray(run(other, params, ids)), np.asarray(ref), atol=1e-5)
    # and gradients agree under remat
    loss = lambda c: (lambda p: jnp.mean(run(c, p, ids) ** 2))
    g1, g2 = jax.grad(loss(cfg))(params), jax.grad(loss(other))(params)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_unknown_remat_policy_is_named(base):
    cfg, params, ids, _ = base
    bad = cfg.copy_and_resolve_references()
    bad.remat_policy = "sometimes"
    with pytest.raises(ValueError, match="remat_policy='sometimes'"):
        run(bad, params, ids)


def test_kv_cache_prefill_then_step_matches_full_pass(base):
    """Prefill 8 tokens into a cache, decode the 9th: same hidden state as one full pass."""
    cfg, params, ids, _ = base
    m = LLM(cfg)
    b, t = ids.shape
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    emb = m.apply({"params": params}, ids, method=LLM.embed_tokens)
    full, _ = m.apply({"params": params}, emb, pos)
    s = 16
    cache = {n: jnp.zeros((cfg.num_layers, b, s, cfg.num_kv_heads, cfg.head_dim)) for n in ("k", "v")}
    valid = jnp.zeros((b, s), jnp.int32)

    def step(cache, valid, start, n):
        valid = valid.at[:, start:start + n].set(1)
        slots = jnp.broadcast_to(jnp.arange(start, start + n), (b, n))
        mask = make_attention_mask(jnp.ones((b, n), jnp.int32), valid, slots, jnp.broadcast_to(jnp.arange(s), (b, s)), True)
        h, cache = m.apply({"params": params}, emb[:, start:start + n], pos[:, start:start + n], None, cache, jnp.int32(start), mask)
        return h, cache, valid

    h1, cache, valid = step(cache, valid, 0, t - 1)
    h2, cache, valid = step(cache, valid, t - 1, 1)
    np.testing.assert_allclose(np.asarray(jnp.concatenate([h1, h2], 1)), np.asarray(full), atol=1e-5)


def test_qk_init_scale_scales_only_query_and_key_init(base):
    """qk_init_scale multiplies the q / k kernels' init std (0.02); v, o and the MLP keep 0.02."""
    cfg, params, ids, _ = base
    big = cfg.copy_and_resolve_references()
    big.qk_init_scale = 4.0
    p4 = nn.unbox(LLM(big).init(jax.random.key(0), ids, method=LLM.init_all))["params"]
    attn, attn4 = params["layers"]["attn"], p4["layers"]["attn"]
    for name in ("q", "k"):
        np.testing.assert_allclose(np.std(attn4[name]["kernel"]), 0.08, rtol=0.1)
        np.testing.assert_allclose(np.asarray(attn4[name]["kernel"]), 4.0 * np.asarray(attn[name]["kernel"]), rtol=1e-6)
    for name in ("v", "o"):
        np.testing.assert_array_equal(np.asarray(attn4[name]["kernel"]), np.asarray(attn[name]["kernel"]))
        np.testing.assert_allclose(np.std(attn[name]["kernel"]), 0.02, rtol=0.1)
    np.testing.assert_array_equal(np.asarray(p4["layers"]["mlp"]["up"]["kernel"]),
                                  np.asarray(params["layers"]["mlp"]["up"]["kernel"]))
