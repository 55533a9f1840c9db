"""An explicit KV cache pytree for jitted decoding, and the cached LLM forward pass.

Layout: k, v: [L, B, S, Hkv, Dh] (one slice per layer, threaded through the LLM's layer scan);
`valid` bool [B, S] marks slots that hold a real token (left padding never does); `index` is
the next slot to write (the same for every row, so writes are one dynamic_update_slice);
`next_pos` int32 [B] is the RoPE position of each row's next token (real tokens only, so a
left-padded row gets the same positions as the prompt alone).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import struct

from unimm_jax.layers.attention import make_attention_mask
from unimm_jax.models.llm import LLM


@struct.dataclass
class KVCache:
    k: jax.Array  # [L, B, S, Hkv, Dh]
    v: jax.Array  # [L, B, S, Hkv, Dh]
    valid: jax.Array  # bool [B, S]
    index: jax.Array  # int32 scalar
    next_pos: jax.Array  # int32 [B]

    @property
    def max_length(self) -> int:
        return self.k.shape[2]


def init_cache(llm_cfg: ml_collections.ConfigDict, batch: int, max_length: int, dtype=None) -> KVCache:
    """Empty cache for `batch` rows of up to `max_length` tokens, in the LLM's compute dtype."""
    dt = jnp.dtype(dtype or llm_cfg.dtype)
    shape = (llm_cfg.num_layers, batch, max_length, llm_cfg.num_kv_heads, llm_cfg.head_dim)
    return KVCache(
        k=jnp.zeros(shape, dt),
        v=jnp.zeros(shape, dt),
        valid=jnp.zeros((batch, max_length), bool),
        index=jnp.zeros((), jnp.int32),
        next_pos=jnp.zeros((batch,), jnp.int32),
    )


def cache_bytes(llm_cfg: ml_collections.ConfigDict, batch: int, max_length: int, dtype=None) -> int:
    """Bytes held by `init_cache(llm_cfg, batch, max_length)` (k and v; the masks are negligible)."""
    itemsize = jnp.dtype(dtype or llm_cfg.dtype).itemsize
    return 2 * llm_cfg.num_layers * batch * max_length * llm_cfg.num_kv_heads * llm_cfg.head_dim * itemsize


def constrain(cache: KVCache, sharding) -> KVCache:
    """Pins k/v to `sharding` (a NamedSharding over [L, B, S, Hkv, Dh]) inside jit; None: no-op."""
    if sharding is None:
        return cache
    return cache.replace(
        k=jax.lax.with_sharding_constraint(cache.k, sharding), v=jax.lax.with_sharding_constraint(cache.v, sharding)
    )


def forward_cached(llm_params, llm_cfg: ml_collections.ConfigDict, embeds: jax.Array, new_valid: jax.Array,
                   cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Runs the LLM over T new tokens, appending their keys/values at `cache.index`.

    embeds: [B, T, D]; new_valid: bool [B, T] (False = left padding, attended by nothing).
    Returns (final hidden states [B, T, D], the updated cache). Prefill is T = prompt length,
    a decode step T = 1; both are the same function so they can never disagree.
    """
    b, t = new_valid.shape
    s = cache.max_length
    valid = jax.lax.dynamic_update_slice(cache.valid, new_valid, (0, cache.index))
    q_slots = jnp.broadcast_to(cache.index + jnp.arange(t, dtype=jnp.int32), (b, t))
    kv_slots = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    mask = make_attention_mask(new_valid.astype(jnp.int32), valid.astype(jnp.int32), q_slots, kv_slots, True)
    steps = jnp.cumsum(new_valid.astype(jnp.int32), axis=1)
    positions = cache.next_pos[:, None] + jnp.maximum(steps - 1, 0)
    hidden, kv = LLM(llm_cfg).apply(
        {"params": llm_params}, embeds, positions, None, {"k": cache.k, "v": cache.v}, cache.index, mask
    )
    new = KVCache(k=kv["k"], v=kv["v"], valid=valid, index=cache.index + t, next_pos=cache.next_pos + steps[:, -1])
    return hidden, new
