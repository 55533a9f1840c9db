"""An explicit KV cache pytree for jitted decoding, and the cached LLM forward pass.

Layout: k, v: tuples of num_layers arrays [B, S, Hkv, Dh] (one buffer per layer, so that a
decode step's write of one new token is an in-place dynamic_update_slice of the loop carry;
one stacked [L, ...] array threaded through a layer scan would be re-written whole, and held
two or three times, every step). `valid` bool [B, S] marks slots holding a real token (left
padding never does); `index` is the next slot to write (the same for every row, so writes are
one dynamic_update_slice); `next_pos` int32 [B] is the RoPE position of each row's next token
(real tokens only, so a left-padded row gets the same positions as the prompt alone).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import struct

from unimm_jax.layers.attention import make_attention_mask
from unimm_jax.layers.rope import rope_frequencies
from unimm_jax.models.llm import LLM, DecoderLayer


@struct.dataclass
class KVCache:
    k: tuple  # num_layers x [B, S, Hkv, Dh]
    v: tuple  # num_layers x [B, S, Hkv, Dh]
    valid: jax.Array  # bool [B, S]
    index: jax.Array  # int32 scalar
    next_pos: jax.Array  # int32 [B]

    @property
    def max_length(self) -> int:
        return self.k[0].shape[1]


def init_cache(llm_cfg: ml_collections.ConfigDict, batch: int, max_length: int, dtype=None) -> KVCache:
    """Empty cache for `batch` rows of up to `max_length` tokens, in the LLM's compute dtype."""
    dt = jnp.dtype(dtype or llm_cfg.dtype)
    shape = (batch, max_length, llm_cfg.num_kv_heads, llm_cfg.head_dim)
    zeros = lambda: tuple(jnp.zeros(shape, dt) for _ in range(llm_cfg.num_layers))  # noqa: E731
    return KVCache(k=zeros(), v=zeros(), valid=jnp.zeros((batch, max_length), bool),
                   index=jnp.zeros((), jnp.int32), next_pos=jnp.zeros((batch,), jnp.int32))


def cache_bytes(llm_cfg: ml_collections.ConfigDict, batch: int, max_length: int, dtype=None) -> int:
    """Bytes held by `init_cache(llm_cfg, batch, max_length)` (k and v; the masks are negligible)."""
    itemsize = jnp.dtype(dtype or llm_cfg.dtype).itemsize
    return 2 * llm_cfg.num_layers * batch * max_length * llm_cfg.num_kv_heads * llm_cfg.head_dim * itemsize


def constrain(cache: KVCache, sharding) -> KVCache:
    """Pins every k/v buffer to `sharding` (a NamedSharding over [B, S, Hkv, Dh]) inside jit; None: no-op."""
    if sharding is None:
        return cache
    pin = lambda xs: tuple(jax.lax.with_sharding_constraint(x, sharding) for x in xs)  # noqa: E731
    return cache.replace(k=pin(cache.k), v=pin(cache.v))


def forward_cached(llm_params, llm_cfg: ml_collections.ConfigDict, embeds: jax.Array, new_valid: jax.Array,
                   cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Runs the LLM's layers over T new tokens, appending their keys/values at `cache.index`.

    embeds: [B, T, D]; new_valid: bool [B, T] (False = left padding, attended by nothing).
    Returns (final hidden states [B, T, D], the updated cache). Prefill is T = prompt length,
    a decode step T = 1; both are this function. The layers are the LLM's own DecoderLayer with
    its stacked params sliced statically (XLA hoists the slices out of the decode loop).
    """
    c = llm_cfg
    b, t = new_valid.shape
    s = cache.max_length
    valid = jax.lax.dynamic_update_slice(cache.valid, new_valid, (0, cache.index))
    q_slots = jnp.broadcast_to(cache.index + jnp.arange(t, dtype=jnp.int32), (b, t))
    kv_slots = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    mask = make_attention_mask(new_valid.astype(jnp.int32), valid.astype(jnp.int32), q_slots, kv_slots, True)
    steps = jnp.cumsum(new_valid.astype(jnp.int32), axis=1)
    positions = cache.next_pos[:, None] + jnp.maximum(steps - 1, 0)
    cos, sin = rope_frequencies(positions, c.head_dim, c.rope_theta)
    layer = DecoderLayer(c)
    h = embeds.astype(jnp.dtype(c.dtype))
    ks, vs = [], []
    for i in range(c.num_layers):
        p = jax.tree.map(lambda x: x[i], llm_params["layers"])
        h, kv = layer.apply({"params": p}, h, cos, sin, None, q_slots, cache.index, mask,
                            {"k": cache.k[i], "v": cache.v[i]})
        ks.append(kv["k"])
        vs.append(kv["v"])
    h = LLM(c).apply({"params": llm_params}, h, method=lambda m, x: m.final_norm(x))
    new = KVCache(k=tuple(ks), v=tuple(vs), valid=valid, index=cache.index + t, next_pos=cache.next_pos + steps[:, -1])
    return h, new
