"""The KV cache pytree: sizes, and cached prefill + steps == one full masked pass."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from unimm_jax.models.janus import positions_from_mask
from unimm_jax.models.janus_config import tiny_janus_config
from unimm_jax.models.llm import LLM
from unimm_jax.sample.kv_cache import KVCache, cache_bytes, forward_cached, init_cache


@pytest.fixture(scope="module")
def llm():
    cfg = tiny_janus_config().llm
    ids = jnp.zeros((1, 4), jnp.int32)
    params = nn.unbox(LLM(cfg).init(jax.random.key(0), ids, method=LLM.init_all))["params"]
    return cfg, params


def test_init_cache_shapes_and_bytes(llm):
    cfg, _ = llm
    c = init_cache(cfg, 3, 20)
    assert isinstance(c, KVCache) and c.max_length == 20
    assert len(c.k) == len(c.v) == cfg.num_layers
    assert all(x.shape == (3, 20, cfg.num_kv_heads, cfg.head_dim) for x in c.k + c.v)
    assert c.valid.shape == (3, 20) and not c.valid.any() and int(c.index) == 0
    assert cache_bytes(cfg, 3, 20) == sum(x.nbytes for x in c.k + c.v)
    assert cache_bytes(cfg, 3, 20, "bfloat16") * 2 == cache_bytes(cfg, 3, 20, "float32")
    # a pytree: it passes through jit and tree maps
    assert jax.tree.structure(jax.jit(lambda x: x)(c)) == jax.tree.structure(c)


def test_left_padded_prefill_then_steps_match_full_pass(llm):
    """Rows of 4 and 7 real tokens, left padded to 7, prefilled, then 3 tokens one at a time:
    hidden states at real positions equal an uncached pass over each full sequence."""
    cfg, params = llm
    m = LLM(cfg)
    rng = np.random.default_rng(0)
    lens, t, steps = [4, 7], 7, 3
    seqs = [rng.integers(0, 512, n + steps) for n in lens]
    c = init_cache(cfg, 2, t + steps)
    ids = np.zeros((2, t), np.int32)
    mask = np.zeros((2, t), bool)
    for i, (s, n) in enumerate(zip(seqs, lens)):
        ids[i, t - n:], mask[i, t - n:] = s[:n], True
    emb = lambda x: m.apply({"params": params}, jnp.asarray(x), method=LLM.embed_tokens)
    step = jax.jit(lambda e, v, c: forward_cached(params, cfg, e, v, c))
    h, c = step(emb(ids), jnp.asarray(mask), c)
    outs = [h[:, -1]]
    for j in range(steps):
        tok = np.array([[s[n + j]] for s, n in zip(seqs, lens)])
        h, c = step(emb(tok), jnp.ones((2, 1), bool), c)
        outs.append(h[:, 0])
    assert int(c.index) == t + steps
    np.testing.assert_array_equal(np.asarray(c.next_pos), np.array(lens) + steps)
    for i, (s, n) in enumerate(zip(seqs, lens)):
        full_ids = s[None, :n + steps]
        pos = positions_from_mask(jnp.ones(full_ids.shape, bool))
        full, _ = m.apply({"params": params}, emb(full_ids), pos)
        got = np.stack([np.asarray(o[i]) for o in outs])
        np.testing.assert_allclose(got, np.asarray(full[0, n - 1:]), atol=2e-5)
