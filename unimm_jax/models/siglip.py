"""SigLIP ViT understanding encoder (Janus: SigLIP-L/16 at 384, no CLS token, no head).

  x = patch_embed(image) + pos_embed        [B, N, Dv], N = (image/patch)^2
  for each layer: x += Attn(LN(x)); x += MLP(LN(x))     exact-erf GELU, LayerNorm eps 1e-6
  return post_norm(x)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from unimm_jax.layers.attention import xla_attention
from unimm_jax.layers.mlp import HeadsDense, dense, gelu
from unimm_jax.layers.norms import LayerNorm

_init = nn.initializers.normal(0.02)


class VisionBlock(nn.Module):
    """Pre-norm ViT block with biased q/k/v/o. x: [B, N, Dv] -> [B, N, Dv]."""

    cfg: ml_collections.ConfigDict

    @nn.compact
    def __call__(self, x, _):
        c = self.cfg
        dt = jnp.dtype(c.dtype)
        hd = c.hidden_size // c.num_heads

        def proj(name):
            return HeadsDense((c.num_heads, hd), ("embed", "heads", "head_dim"), 1, c.attention_bias, dt, name=name)

        y = LayerNorm(c.layer_norm_eps, name="norm1")(x)
        y = xla_attention(proj("q")(y), proj("k")(y), proj("v")(y), mask=None)
        y = HeadsDense((c.hidden_size,), ("heads", "head_dim", "embed"), 2, True, dt, name="o")(y)
        x = x + y
        y = LayerNorm(c.layer_norm_eps, name="norm2")(x)
        y = dense(int(c.hidden_size * c.mlp_ratio), ("embed", "mlp"), "fc1", dtype=dt)(y)
        y = dense(c.hidden_size, ("mlp", "embed"), "fc2", dtype=dt)(gelu(y))
        return x + y, None


class SigLIPEncoder(nn.Module):
    """images: float [B, H, W, C] in [-1, 1] -> features [B, N, Dv] (after post-layernorm)."""

    cfg: ml_collections.ConfigDict

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        c = self.cfg
        dt = jnp.dtype(c.dtype)
        p = c.patch_size
        n = (c.image_size // p) ** 2
        x = nn.Conv(
            c.hidden_size,
            (p, p),
            strides=(p, p),
            padding="VALID",
            dtype=dt,
            kernel_init=nn.with_logical_partitioning(_init, ("conv_height", "conv_width", "conv_in", "embed")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
            name="patch_embed",
        )(images.astype(dt))
        x = x.reshape(x.shape[0], -1, c.hidden_size)
        pos = self.param("pos_embed", nn.with_logical_partitioning(_init, ("image_positions", "embed")), (n, c.hidden_size))
        x = x + pos.astype(dt)
        x, _ = nn.scan(
            VisionBlock,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=c.num_layers,
            unroll=1 if c.get("scan_layers", True) else c.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(c, name="layers")(x, None)
        return LayerNorm(c.layer_norm_eps, name="post_norm")(x)
