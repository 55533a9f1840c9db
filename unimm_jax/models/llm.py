"""The Llama / DeepSeek-LLM decoder shared by every unified model.

  h = embed(tokens)                              (or inputs_embeds from the caller)
  for each layer:  h += Attn(RMSNorm(h))          RoPE, multi-head or grouped-query
                   h += SwiGLU(RMSNorm(h))
  logits = lm_head(RMSNorm(h))                    tied to the embedding or untied

Layers are stacked along a leading `layers` axis and run with `nn.scan` (compile once);
`scan_layers=False` unrolls the same scan (XLA sees every layer; same checkpoint layout).
A KV cache is an explicit pytree threaded through the scan, one slice per layer.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from unimm_jax.kernels.residuals import RESIDUAL_NAMES
from unimm_jax.layers import attention as attn_lib
from unimm_jax.layers.linear import linear_dot_general
from unimm_jax.layers.mlp import INIT_STD, HeadsDense
from unimm_jax.layers.norms import RMSNorm
from unimm_jax.layers.rope import apply_rope, rope_frequencies

# The "dots" policies also keep the flash kernels' (out, lse): attention is matmul work too, and
# without them the backward pass re-runs the forward kernel (kernels/residuals.py).
_SAVE_ATTENTION = jax.checkpoint_policies.save_only_these_names(*RESIDUAL_NAMES)
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.checkpoint_dots, _SAVE_ATTENTION),
    "dots_no_batch": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims, _SAVE_ATTENTION),
}

_init = nn.initializers.normal(INIT_STD)


def _dense(features, names, use_bias, name, dtype):
    """Dense layer whose kernel [in, *features] carries logical names; the bias takes the output names."""
    n_out = len(features) if isinstance(features, tuple) else 1
    return nn.DenseGeneral(
        features=features,
        use_bias=use_bias,
        dtype=dtype,
        dot_general=linear_dot_general,
        kernel_init=nn.with_logical_partitioning(_init, names),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[-n_out:]),
        name=name,
    )


class Attention(nn.Module):
    """Llama self-attention with RoPE and grouped-query heads.

    x: [B, T, D] -> [B, T, D]. With `cache` (dict k, v: [B, S, Hkv, Dh]) the new keys/values are
    written at `cache_index` and attention runs over the whole cache under `cache_mask`.
    """

    cfg: ml_collections.ConfigDict

    @nn.compact
    def __call__(self, x, cos, sin, segment_ids, slots, cache=None, cache_index=None, cache_mask=None):
        c = self.cfg
        h, kvh, hd = c.num_heads, c.num_kv_heads, c.head_dim
        dt = jnp.dtype(c.dtype)
        # qk_init_scale > 1 starts the attention scores away from uniform (see janus_config).
        qk_std = INIT_STD * float(c.get("qk_init_scale", 1.0))
        q = HeadsDense((h, hd), ("embed", "heads", "head_dim"), 1, c.attention_bias, dt, qk_std, name="q")(x)
        k = HeadsDense((kvh, hd), ("embed", "kv_heads", "head_dim"), 1, c.attention_bias, dt, qk_std, name="k")(x)
        v = HeadsDense((kvh, hd), ("embed", "kv_heads", "head_dim"), 1, c.attention_bias, dt, name="v")(x)
        q = nn.with_logical_constraint(apply_rope(q, cos, sin), ("batch", "length", "act_heads", None))
        k = apply_rope(k, cos, sin)
        if cache is None:
            out = attn_lib.attend(q, k, v, segment_ids=segment_ids, positions=slots, impl=c.attention_impl)
            new_cache = None
        else:
            ck = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), cache_index, axis=1)
            cv = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), cache_index, axis=1)
            out = attn_lib.xla_attention(q, ck.astype(q.dtype), cv.astype(q.dtype), cache_mask)
            new_cache = {"k": ck, "v": cv}
        out = HeadsDense((c.hidden_size,), ("heads", "head_dim", "embed"), 2, c.attention_bias, dt, name="o")(out)
        return out, new_cache


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); x: [B, T, D] -> [B, T, D]."""

    cfg: ml_collections.ConfigDict

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        dt = jnp.dtype(c.dtype)
        gate = _dense(c.intermediate_size, ("embed", "mlp"), c.mlp_bias, "gate", dt)(x)
        up = _dense(c.intermediate_size, ("embed", "mlp"), c.mlp_bias, "up", dt)(x)
        hidden = nn.with_logical_constraint(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
        return _dense(c.hidden_size, ("mlp", "embed"), c.mlp_bias, "down", dt)(hidden)


class DecoderLayer(nn.Module):
    """One pre-norm transformer block; the scan carry is the hidden state [B, T, D]."""

    cfg: ml_collections.ConfigDict

    @nn.compact
    def __call__(self, h, cos, sin, segment_ids, slots, cache_index, cache_mask, cache):
        c = self.cfg
        attn_out, new_cache = Attention(c, name="attn")(
            RMSNorm(c.rms_norm_eps, name="attn_norm")(h), cos, sin, segment_ids, slots, cache, cache_index, cache_mask
        )
        h = h + attn_out
        h = h + SwiGLU(c, name="mlp")(RMSNorm(c.rms_norm_eps, name="mlp_norm")(h))
        h = nn.with_logical_constraint(h, ("batch", "length", "act_embed"))
        return h, new_cache


class LLM(nn.Module):
    """Decoder-only language model.

    cfg fields: vocab_size, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads,
    head_dim, rms_norm_eps, rope_theta, tie_word_embeddings, attention_bias, mlp_bias,
    scan_layers, remat_policy, attention_impl, dtype.
    """

    cfg: ml_collections.ConfigDict

    def setup(self):
        c = self.cfg
        self.embed = nn.Embed(
            c.vocab_size,
            c.hidden_size,
            embedding_init=nn.with_logical_partitioning(_init, ("vocab", "embed")),
            name="embed",
        )
        policy = c.get("remat_policy", "none")
        if policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy={policy!r} is not one of {sorted(REMAT_POLICIES)}.")
        block = DecoderLayer
        if REMAT_POLICIES[policy] is not None:
            block = nn.remat(DecoderLayer, policy=REMAT_POLICIES[policy], prevent_cse=False)
        self.layers = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast,) * 6 + (0,),
            length=c.num_layers,
            unroll=1 if c.get("scan_layers", True) else c.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(c, name="layers")
        self.final_norm = RMSNorm(c.rms_norm_eps, name="final_norm")
        if not c.tie_word_embeddings:
            self.lm_head = _dense(c.vocab_size, ("embed", "vocab"), False, "lm_head", jnp.dtype(c.dtype))

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """int32 [B, T] -> [B, T, D] in the embedding's dtype."""
        return self.embed(tokens)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Text logits from final hidden states: [B, T, D] -> float32 [B, T, V]."""
        if self.cfg.tie_word_embeddings:
            return self.embed.attend(hidden).astype(jnp.float32)
        return self.lm_head(hidden).astype(jnp.float32)

    def init_all(self, tokens: jax.Array) -> jax.Array:
        """Touches every parameter (embedding, layers, head): use as the `method` of `init`."""
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        return self.logits(self(self.embed_tokens(tokens), positions)[0])

    def __call__(
        self,
        inputs_embeds: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array | None = None,
        cache: dict[str, jax.Array] | None = None,
        cache_index: jax.Array | None = None,
        cache_mask: jax.Array | None = None,
    ) -> tuple[jax.Array, Any]:
        """Runs the layer stack and the final norm.

        inputs_embeds: [B, T, D]; positions: int32 [B, T] RoPE positions;
        segment_ids: int32 [B, T], 0 = padding (None = one segment, no padding).
        cache: {"k","v": [L, B, S, Hkv, Dh]} with `cache_index` (int32 scalar write slot) and
        `cache_mask` (bool [B, 1, T, S]). Returns (hidden [B, T, D], new cache or None).
        """
        c = self.cfg
        b, t, _ = inputs_embeds.shape
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        cos, sin = rope_frequencies(positions, c.head_dim, c.rope_theta)
        h = nn.with_logical_constraint(inputs_embeds.astype(jnp.dtype(c.dtype)), ("batch", "length", "act_embed"))
        h, new_cache = self.layers(h, cos, sin, segment_ids, slots, cache_index, cache_mask, cache)
        return self.final_norm(h), new_cache
