"""JanusFlow's generation encoder/decoder around the LLM: ShallowUViT with ConvNeXt blocks.

The LLM sees VAE latents through `ShallowUViTEncoder` (2x2 patchify + time-conditioned
ConvNeXt blocks) and its hidden states come back through `ShallowUViTDecoder` (skip concat,
ConvNeXt blocks, unpatchify) as a velocity in latent space. Everything is NHWC.

Shapes for JanusFlow-1.3B (the defaults): latents [B,48,48,4] -> x_emb [B,24,24,768] and
t_emb [B,2048]; the decoder maps [B,24,24,768] + skip [B,24,24,768] -> [B,48,48,4].

Module and parameter names follow DeepSeek's `janus/janusflow/models/uvit.py` (list indices
folded into names: `mid_block.res_blocks.0` -> `mid_block/res_blocks_0`) so that
`unimm_jax.convert.janusflow_gen_keys` is a rename plus layout changes.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from unimm_jax.layers.linear import linear_dot_general

Dtype = Any

_CONV_AXES = ("conv_height", "conv_width", "conv_in", "conv_out")


def _dense(features: int, axes: tuple[str, str], name: str, dtype: Dtype, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(
        features,
        dot_general=linear_dot_general,
        use_bias=use_bias,
        dtype=dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]),
        name=name,
    )


def _conv(features: int, kernel: int, name: str, dtype: Dtype, *, stride: int = 1, padding: int = 0,
          groups: int = 1, use_bias: bool = True) -> nn.Conv:
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        feature_group_count=groups,
        use_bias=use_bias,
        dtype=dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), _CONV_AXES),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
        name=name,
    )


# ----------------------------------------------------------------------------- time embedding


def timestep_embedding(
    timesteps: jax.Array,
    dim: int,
    flip_sin_to_cos: bool = True,
    downscale_freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> jax.Array:
    """diffusers `get_timestep_embedding`: timesteps [B] (any scale; JanusFlow uses t*1000) -> [B,dim] float32.

    freqs_i = exp(-ln(max_period) * i / (dim/2 - shift)); output [cos, sin] when flip_sin_to_cos
    (JanusFlow), [sin, cos] otherwise; an odd `dim` gets one zero column at the end.
    """
    timesteps = jnp.asarray(timesteps, jnp.float32).reshape(-1)
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
    args = timesteps[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """diffusers TimestepEmbedding: linear_1 -> SiLU -> linear_2. [B,in] -> [B,features]."""

    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _dense(self.features, ("mlp", "embed"), "linear_1", self.dtype, self.use_bias)(x)
        return _dense(self.features, ("embed", "mlp"), "linear_2", self.dtype, self.use_bias)(nn.silu(x))


# ------------------------------------------------------------------------------------ norms


class RMSNorm(nn.Module):
    """LlamaRMSNorm over the last (channel) axis: statistics in float32, output in the input dtype."""

    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (x.shape[-1],))
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        # Llama order: cast back first, then scale (matters in bf16).
        return scale.astype(x.dtype) * h.astype(x.dtype)


class GRN(nn.Module):
    """ConvNeXt-V2 Global Response Normalisation on NHWC [B,H,W,C].

    gx = ||x||_2 over (H,W); nx = gx / (mean_C gx + 1e-6); out = beta + (gamma * nx + 1) * x.
    gamma and beta start at zero, so the block starts as the identity.
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        gamma = self.param("gamma", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), (c,))
        beta = self.param("beta", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), (c,))
        h = x.astype(jnp.float32)
        gx = jnp.sqrt(jnp.sum(h * h, axis=(1, 2), keepdims=True))
        nx = gx / (jnp.mean(gx, axis=-1, keepdims=True) + 1e-6)
        return (beta + (gamma * nx + 1.0) * h).astype(x.dtype)


# -------------------------------------------------------------------------------- ConvNeXt


class ConvNextBlock(nn.Module):
    """Time-conditioned ConvNeXt block: [B,H,W,C], cond [B,hidden] -> [B,H,W,C].

    x + MLP(RMSNorm(dwconv7x7(x))) with MLP = Linear(C,4C) -> exact GELU -> GRN -> Linear(4C,C),
    then modulation x * (1 + scale) + shift with (scale, shift) = Linear(SiLU(cond)) split in two.
    """

    channels: int
    norm_eps: float = 1e-6
    use_bias: bool = True
    dropout: float = 0.0
    ffn_factor: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cond: jax.Array, deterministic: bool = True) -> jax.Array:
        c = self.channels
        if x.shape[-1] != c:
            raise ValueError(f"ConvNextBlock({c}): input has {x.shape[-1]} channels (shape {x.shape}).")
        h = _conv(c, 7, "depthwise", self.dtype, padding=3, groups=c, use_bias=self.use_bias)(x)
        h = RMSNorm(self.norm_eps, name="norm")(h)
        h = _dense(c * self.ffn_factor, ("embed", "mlp"), "channelwise_linear_1", self.dtype, self.use_bias)(h)
        h = nn.gelu(h, approximate=False)
        h = GRN(name="channelwise_norm")(h)
        h = _dense(c, ("mlp", "embed"), "channelwise_linear_2", self.dtype, self.use_bias)(h)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        x = x + h
        mod = _dense(2 * c, ("embed", "mlp"), "cond_embeds_mapper", self.dtype, self.use_bias)(nn.silu(cond))
        scale, shift = jnp.split(mod, 2, axis=-1)
        return x * (1.0 + scale[:, None, None, :]) + shift[:, None, None, :]


class UVitBlock(nn.Module):
    """`num_res_blocks` ConvNextBlocks at constant width (uvit.py's UVitBlock without resampling)."""

    channels: int
    num_res_blocks: int
    norm_eps: float = 1e-6
    use_bias: bool = True
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cond: jax.Array, deterministic: bool = True) -> jax.Array:
        for i in range(self.num_res_blocks):
            x = ConvNextBlock(self.channels, self.norm_eps, self.use_bias, self.dropout, dtype=self.dtype,
                              name=f"res_blocks_{i}")(x, cond, deterministic)
        return x


# ----------------------------------------------------------------------------- (un)patchify


def pixel_shuffle(x: jax.Array, r: int) -> jax.Array:
    """torch.nn.PixelShuffle on NHWC: [B,H,W,C*r*r] -> [B,H*r,W*r,C].

    Input channel c*r^2 + i*r + j goes to output pixel (h*r + i, w*r + j), channel c.
    """
    b, h, w, crr = x.shape
    if crr % (r * r):
        raise ValueError(f"pixel_shuffle: {crr} channels are not divisible by r^2={r * r}.")
    c = crr // (r * r)
    x = x.reshape(b, h, w, c, r, r).transpose(0, 1, 4, 2, 5, 3)  # b, h, i, w, j, c
    return x.reshape(b, h * r, w * r, c)


class Unpatchify(nn.Module):
    """RMSNorm -> 1x1 conv to out*r*r -> pixel_shuffle(r): [B,H,W,Cin] -> [B,H*r,W*r,out_channels]."""

    out_channels: int
    patch_size: int = 2
    norm_eps: float = 1e-6
    use_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        r = self.patch_size
        x = RMSNorm(self.norm_eps, name="norm")(x)
        x = _conv(self.out_channels * r * r, 1, "unpatch_conv", self.dtype, use_bias=self.use_bias)(x)
        return pixel_shuffle(x, r)


# ------------------------------------------------------------------------- encoder / decoder


class ShallowUViTEncoder(nn.Module):
    """JanusFlow generation encoder.

    __call__(x [B,H,W,input_channels] latents, timesteps [B] float (JanusFlow passes t*1000))
    -> (x_emb [B,H',W',C] with H' = (H + 2p - k)//s + 1, t_emb [B,hidden_size], hs = [x_emb]).
    `hs` is the skip list the decoder consumes. `padding=None` means ceil(kernel - stride).
    """

    input_channels: int = 4
    kernel_size: int = 2
    stride: int = 2
    padding: int | None = 0
    block_out_channels: Sequence[int] = (768,)
    layers_in_middle: int = 2
    hidden_size: int = 2048
    use_bias: bool = True
    norm_eps: float = 1e-6
    dropout: float = 0.0
    use_mid_block: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, timesteps: jax.Array, deterministic: bool = True):
        b = x.shape[0]
        if x.ndim != 4 or x.shape[-1] != self.input_channels:
            raise ValueError(
                f"ShallowUViTEncoder: expected NHWC latents [B,H,W,{self.input_channels}], got {x.shape}."
            )
        c = self.block_out_channels[0]
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (b,))
        t_emb = timestep_embedding(timesteps, c).astype(x.dtype)
        t_emb = TimestepEmbedding(self.hidden_size, self.use_bias, self.dtype, name="time_embed")(t_emb)
        pad = self.padding if self.padding is not None else math.ceil(self.kernel_size - self.stride)
        # torch's in_conv always has a bias, whatever use_bias says.
        x_emb = _conv(c, self.kernel_size, "in_conv", self.dtype, stride=self.stride, padding=pad)(x)
        if self.use_mid_block:
            x_emb = UVitBlock(self.block_out_channels[-1], self.layers_in_middle, self.norm_eps, self.use_bias,
                              self.dropout, self.dtype, name="mid_block")(x_emb, t_emb, deterministic)
        return x_emb, t_emb, [x_emb]


class ShallowUViTDecoder(nn.Module):
    """JanusFlow generation decoder.

    __call__(x [B,H',W',in_channels] (LLM output after the aligner), hs = [skip [B,H',W',C]],
    t_emb [B,hidden_size]) -> [B, H'*2^upsamples, W'*2^upsamples, out_channels] (the velocity).
    The input is RMS-normalised and concatenated *before* the skip: [x, skip] on channels.
    """

    in_channels: int = 768
    out_channels: int = 4
    block_out_channels: Sequence[int] = (768,)
    upsamples: int = 1
    layers_in_middle: int = 2
    hidden_size: int = 2048
    use_bias: bool = True
    norm_eps: float = 1e-6
    dropout: float = 0.0
    use_mid_block: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, hs: Sequence[jax.Array], t_emb: jax.Array, deterministic: bool = True):
        if len(hs) != 1:
            raise ValueError(f"ShallowUViTDecoder: expected exactly one skip tensor in hs, got {len(hs)}.")
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"ShallowUViTDecoder: expected NHWC [B,H,W,{self.in_channels}], got {x.shape}.")
        x = RMSNorm(self.norm_eps, name="input_norm")(x)
        x = jnp.concatenate([x, hs[-1].astype(x.dtype)], axis=-1)
        width = self.in_channels + self.block_out_channels[-1]
        if self.use_mid_block:
            x = UVitBlock(width, self.layers_in_middle, self.norm_eps, self.use_bias, self.dropout, self.dtype,
                          name="mid_block")(x, t_emb, deterministic)
        for k in range(self.upsamples):
            out = self.out_channels if k == self.upsamples - 1 else self.block_out_channels[-1]
            x = Unpatchify(out, 2, self.norm_eps, self.use_bias, self.dtype, name=f"out_convs_{k}")(x)
        return x
