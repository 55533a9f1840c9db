"""Jitted text decoding: prefill the prompt (with image features), then a `lax.while_loop`
that samples one token per iteration and stops early once every row has produced EOS.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from unimm_jax.models.janus import Janus
from unimm_jax.models.llm import LLM
from unimm_jax.sample import kv_cache as kvc
from unimm_jax.sample.sampling import row_keys, sample_tokens, step_keys


def build_text_decoder(cfg: ml_collections.ConfigDict, *, max_new_tokens: int, temperature: float,
                       top_k: int | None, top_p: float | None, cache_sharding=None):
    """Returns decode(params, ids, mask, pixel_values, seed, row_ids) -> int32 [B, max_new_tokens].

    cfg: config.model. ids/mask: int32 [B, L] left-padded; pixel_values [M, H, W, 3] or None;
    seed: int32 scalar; row_ids: int32 [B] global row indices (each row samples from its own
    key). After a row's EOS its remaining tokens are the pad id. Wrap the result in jax.jit.
    """
    eos, pad = cfg.tokens.eos_token_id, cfg.tokens.pad_token_id
    llm = LLM(cfg.llm)

    def logits_of(params, h):
        return llm.apply({"params": params["llm"]}, h, method=LLM.logits)

    def decode(params, ids, mask, pixel_values, seed, row_ids):
        b, length = ids.shape
        keys = row_keys(seed, row_ids)
        embeds = Janus(cfg).apply({"params": params}, ids, pixel_values, method=Janus.text_embeds)
        cache = kvc.constrain(kvc.init_cache(cfg.llm, b, length + max_new_tokens), cache_sharding)
        hidden, cache = kvc.forward_cached(params["llm"], cfg.llm, embeds, mask.astype(bool), cache)
        tok = sample_tokens(logits_of(params, hidden[:, -1]), step_keys(keys, 0), temperature, top_k, top_p)
        out = jnp.full((b, max_new_tokens), pad, jnp.int32).at[:, 0].set(tok)

        def cond(state):
            i, _, _, _, done = state
            return (i < max_new_tokens) & ~jnp.all(done)

        def body(state):
            i, tok, cache, out, done = state
            emb = llm.apply({"params": params["llm"]}, tok[:, None], method=LLM.embed_tokens)
            hidden, cache = kvc.forward_cached(params["llm"], cfg.llm, emb, jnp.ones((b, 1), bool), cache)
            cache = kvc.constrain(cache, cache_sharding)
            nxt = sample_tokens(logits_of(params, hidden[:, 0]), step_keys(keys, i), temperature, top_k, top_p)
            nxt = jnp.where(done, pad, nxt)
            out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i))
            return i + 1, nxt, cache, out, done | (nxt == eos)

        state = (jnp.int32(1), tok, cache, out, tok == eos)
        return jax.lax.while_loop(cond, body, state)[3]

    return decode
