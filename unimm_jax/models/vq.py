"""LlamaGen VQ-16 image tokenizer, as used by Janus for generation.

  encode:  image -> Encoder (conv_in, levels of ResBlocks [+Attn at the last level],
           asymmetric-pad stride-2 downsamples, mid [Res, Attn, Res], GN, swish, conv_out)
           -> quant_conv (1x1) -> L2-normalised nearest codebook entry -> int32 codes
  decode:  codes -> L2-normalised codebook rows -> post_quant_conv -> Decoder (mirror image,
           num_res_blocks + 1 per level, nearest x2 upsampling) -> image in [-1, 1]

All activations are NHWC. Module names follow transformers' JanusVQVAE (encoder.down_i.block_j,
mid.block_1/attn_1/block_2, decoder.up_i ...) so checkpoint conversion is a rename.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from unimm_jax.layers.norms import GroupNorm

_CONV_NAMES = ("conv_height", "conv_width", "conv_in", "conv_out")


def conv(features: int, kernel: int, name: str, stride: int = 1, padding="SAME") -> nn.Conv:
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=padding,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), _CONV_NAMES),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
        name=name,
    )


def swish(x):
    return x * jax.nn.sigmoid(x)


class ResnetBlock(nn.Module):
    """GN, swish, conv3, GN, swish, conv3 + (1x1 nin_shortcut when channels change).

    per_position: GroupNorm statistics per pixel (`GroupNorm.per_position`), for a local encoder.
    """

    out_channels: int
    groups: int = 32
    per_position: bool = False

    @nn.compact
    def __call__(self, x):
        norm = lambda name: GroupNorm(self.groups, per_position=self.per_position, name=name)
        h = conv(self.out_channels, 3, "conv1")(swish(norm("norm1")(x)))
        h = conv(self.out_channels, 3, "conv2")(swish(norm("norm2")(h)))
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, "nin_shortcut")(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over H*W positions with 1x1-conv projections, residual."""

    groups: int = 32

    @nn.compact
    def __call__(self, x):
        b, hgt, wid, c = x.shape
        h = GroupNorm(self.groups, name="norm")(x)
        q, k, v = (conv(c, 1, n)(h).reshape(b, hgt * wid, c) for n in ("q", "k", "v"))
        w = jnp.einsum("bic,bjc->bij", q, k, preferred_element_type=jnp.float32) * (c**-0.5)
        w = jax.nn.softmax(w, axis=-1).astype(v.dtype)
        out = jnp.einsum("bij,bjc->bic", w, v).reshape(b, hgt, wid, c)
        return x + conv(c, 1, "proj_out")(out)


class MidBlock(nn.Module):
    """Res, Attn, Res; a local encoder's (attention=False) has no attention block."""

    groups: int = 32
    attention: bool = True
    per_position: bool = False

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        x = ResnetBlock(c, self.groups, self.per_position, name="block_1")(x)
        if self.attention:
            x = AttnBlock(self.groups, name="attn_1")(x)
        return ResnetBlock(c, self.groups, self.per_position, name="block_2")(x)


class Downsample(nn.Module):
    """Pad (0,1) on bottom/right, then a stride-2 3x3 conv: the reference's asymmetric padding."""

    @nn.compact
    def __call__(self, x):
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv(x.shape[-1], 3, "conv", stride=2, padding="VALID")(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv(x.shape[-1], 3, "conv")(x)


ENCODER_CONTEXTS = ("global", "local")


def encoder_is_local(cfg) -> bool:
    """cfg.encoder_context: "global" (LlamaGen / Janus: attention and GroupNorm statistics over
    the whole image) or "local" (no attention, per-pixel norms: a patch's code depends only on
    the pixels within the convolutions' reach, never on objects elsewhere in the image)."""
    ctx = cfg.get("encoder_context", "global")
    if ctx not in ENCODER_CONTEXTS:
        raise ValueError(f"model.vq.encoder_context={ctx!r} must be one of {ENCODER_CONTEXTS}.")
    return ctx == "local"


class Encoder(nn.Module):
    cfg: ml_collections.ConfigDict

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        mult = tuple(c.channel_multiplier)
        local = encoder_is_local(c)
        # A local encoder normalises each pixel over all its channels (one group).
        g = 1 if local else c.norm_groups
        x = conv(c.base_channels, 3, "conv_in")(x)
        for i, m in enumerate(mult):
            last = i == len(mult) - 1
            for j in range(c.num_res_blocks):
                x = ResnetBlock(c.base_channels * m, g, local, name=f"down_{i}_block_{j}")(x)
                if last and not local:
                    x = AttnBlock(g, name=f"down_{i}_attn_{j}")(x)
            if not last:
                x = Downsample(name=f"down_{i}_downsample")(x)
        x = MidBlock(g, attention=not local, per_position=local, name="mid")(x)
        x = swish(GroupNorm(g, per_position=local, name="norm_out")(x))
        return conv(c.latent_channels, 3, "conv_out")(x)


class Decoder(nn.Module):
    cfg: ml_collections.ConfigDict

    @nn.compact
    def __call__(self, z):
        c = self.cfg
        mult = tuple(c.channel_multiplier)
        g = c.norm_groups
        x = conv(c.base_channels * mult[-1], 3, "conv_in")(z)
        x = MidBlock(g, name="mid")(x)
        # up_0 is the deepest level (transformers' order), so levels run from coarse to fine.
        for i, m in enumerate(reversed(mult)):
            for j in range(c.num_res_blocks + 1):
                x = ResnetBlock(c.base_channels * m, g, name=f"up_{i}_block_{j}")(x)
                if i == 0:
                    x = AttnBlock(g, name=f"up_{i}_attn_{j}")(x)
            if i != len(mult) - 1:
                x = Upsample(name=f"up_{i}_upsample")(x)
        x = swish(GroupNorm(g, name="norm_out")(x))
        return conv(c.out_channels, 3, "conv_out")(x)


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """torch.nn.functional.normalize: x / max(||x||, eps)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axis, keepdims=True))
    return (x / jnp.maximum(norm, eps)).astype(x.dtype)


class QuantizerOutput(NamedTuple):
    quantized: jax.Array  # [B, h, w, d] straight-through codes
    codes: jax.Array  # int32 [B, h*w]
    codebook_loss: jax.Array  # scalar, mean((z_q - sg(z))^2)
    commit_loss: jax.Array  # scalar, beta * mean((sg(z_q) - z)^2)


class VQModel(nn.Module):
    """The VQ tokenizer. Images NHWC float32 in [-1, 1]; codes int32 [B, (H/f)*(W/f)]."""

    cfg: ml_collections.ConfigDict

    def setup(self):
        c = self.cfg
        self.encoder = Encoder(c, name="encoder")
        self.decoder = Decoder(c, name="decoder")
        self.quant_conv = conv(c.codebook_dim, 1, "quant_conv")
        self.post_quant_conv = conv(c.latent_channels, 1, "post_quant_conv")
        self.codebook = nn.Embed(
            c.codebook_size,
            c.codebook_dim,
            embedding_init=nn.with_logical_partitioning(nn.initializers.uniform(2.0 / c.codebook_size), ("codebook", "codebook_dim")),
            name="codebook",
        )

    def quantize(self, z: jax.Array) -> QuantizerOutput:
        """Nearest codebook entry for z [B, h, w, d].

        With `encode_l2_norm` (DeepSeek/LlamaGen semantics) both z and the codebook are
        L2-normalised first; without it the raw distance is used (transformers' encode).
        """
        c = self.cfg
        book = self.codebook.embedding
        if c.get("encode_l2_norm", True):
            z = l2_normalize(z)
            book = l2_normalize(book)
        flat = z.reshape(-1, z.shape[-1]).astype(jnp.float32)
        book32 = book.astype(jnp.float32)
        dist = (
            jnp.sum(flat**2, axis=1, keepdims=True)
            + jnp.sum(book32**2, axis=1)[None, :]
            - 2.0 * flat @ book32.T
        )
        idx = jnp.argmin(dist, axis=1).astype(jnp.int32)
        zq = book[idx].reshape(z.shape)
        codebook_loss = jnp.mean(jnp.square(zq - jax.lax.stop_gradient(z)))
        commit_loss = c.get("commit_beta", 0.25) * jnp.mean(jnp.square(jax.lax.stop_gradient(zq) - z))
        zq = z + jax.lax.stop_gradient(zq - z)
        return QuantizerOutput(zq, idx.reshape(z.shape[0], -1), codebook_loss, commit_loss)

    def encode(self, images: jax.Array) -> QuantizerOutput:
        return self.quantize(self.quant_conv(self.encoder(images)))

    def embed_codes(self, codes: jax.Array) -> jax.Array:
        """int32 [B, N] -> L2-normalised code vectors [B, g, g, d] with g = sqrt(N)."""
        b, n = codes.shape
        g = int(round(n**0.5))
        if g * g != n:
            raise ValueError(f"VQ decode needs a square number of codes per image, got {n}.")
        return l2_normalize(self.codebook(codes)).reshape(b, g, g, -1)

    def decode_latents(self, zq: jax.Array) -> jax.Array:
        """Quantised latents [B, g, g, d] -> images [B, H, W, C]."""
        return self.decoder(self.post_quant_conv(zq))

    def decode(self, codes: jax.Array) -> jax.Array:
        return self.decode_latents(self.embed_codes(codes))

    def __call__(self, images: jax.Array):
        """Reconstruction for training: returns (images_hat, QuantizerOutput)."""
        q = self.encode(images)
        return self.decode_latents(q.quantized), q
