"""Jitted image-token decoding with classifier-free guidance.

The batch is [cond; uncond] (transformers' layout): both halves are prefilled together, and at
every step the guided logits u + w (c - u) pick one code per image, which is fed back to both
halves. All N steps run in one `lax.scan` inside jit.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from unimm_jax.models.janus import Janus
from unimm_jax.models.janus_config import num_image_tokens
from unimm_jax.sample import kv_cache as kvc
from unimm_jax.sample.sampling import row_keys, sample_tokens, step_keys


def guide(logits: jax.Array, cfg_weight: float) -> jax.Array:
    """[2B, K] laid out [cond; uncond] -> u + w (c - u): [B, K]."""
    cond, uncond = jnp.split(logits, 2, axis=0)
    return uncond + cfg_weight * (cond - uncond)


def build_image_decoder(cfg: ml_collections.ConfigDict, *, temperature: float, top_k: int | None,
                        top_p: float | None, cache_sharding=None):
    """Returns decode(params, ids, mask, cfg_weight, seed, row_ids) -> int32 [B, N].

    cfg: config.model. ids/mask: int32 [2B, L], rows [cond; uncond], left-padded, every prompt
    ending with <begin_of_image>; cfg_weight: float32 scalar (traced: changing it does not
    recompile); seed: int32 scalar; row_ids: int32 [B] global image indices. Wrap in jax.jit.
    """
    n = num_image_tokens(cfg)
    janus = Janus(cfg)

    def head(params, h):
        return janus.apply({"params": params}, h, method=lambda m, x: m.gen_head(x))

    def decode(params, ids, mask, cfg_weight, seed, row_ids):
        b2, length = ids.shape
        keys = row_keys(seed, row_ids)
        embeds = janus.apply({"params": params}, ids, method=lambda m, x: m.llm.embed_tokens(x))
        cache = kvc.constrain(kvc.init_cache(cfg.llm, b2, length + n), cache_sharding)
        hidden, cache = kvc.forward_cached(params["llm"], cfg.llm, embeds, mask.astype(bool), cache)
        first = sample_tokens(guide(head(params, hidden[:, -1]), cfg_weight), step_keys(keys, 0),
                              temperature, top_k, top_p)

        def body(carry, i):
            tok, cache = carry
            both = jnp.concatenate([tok, tok])[:, None]
            emb = janus.apply({"params": params}, both, method=Janus.image_token_embeds)
            hidden, cache = kvc.forward_cached(params["llm"], cfg.llm, emb, jnp.ones((b2, 1), bool), cache)
            cache = kvc.constrain(cache, cache_sharding)
            nxt = sample_tokens(guide(head(params, hidden[:, 0]), cfg_weight), step_keys(keys, i),
                                temperature, top_k, top_p)
            return (nxt, cache), nxt

        _, rest = jax.lax.scan(body, (first, cache), jnp.arange(1, n, dtype=jnp.int32))
        return jnp.concatenate([first[:, None], rest.T], axis=1)

    return decode
