"""KL autoencoder with the layout of diffusers' `AutoencoderKL` (the SDXL-VAE JanusFlow uses).

Read top to bottom: config -> blocks (resnet, attention, down/up sampling) -> encoder ->
decoder -> `AutoencoderKL` -> `VAE` (a loaded model with jitted `encode`/`decode`) ->
`load_vae` / `save_vae` (a diffusers directory: config.json + diffusion_pytorch_model.safetensors).

Everything is NHWC. Parameter names mirror diffusers' module tree with list indices folded
into the name (`down_blocks.0.resnets.1.conv1` -> `down_blocks_0/resnets_1/conv1`), so the
conversion in `unimm_jax.convert.diffusers_vae` is a mechanical rename plus layout transposes.

Latent conventions (the same as diffusers):
  * `encode` returns the *unscaled* posterior mean (what `vae.encode(x).latent_dist.mean` gives).
  * A diffusion/flow model works on `to_model_latents(mean) = (mean - shift) * scaling_factor`;
    `from_model_latents` undoes it before `decode` (JanusFlow: `decode(z / 0.13025)`).
  * `decode` returns the raw decoder output: roughly [-1, 1] but not clipped.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from unimm_jax.layers.linear import linear_dot_general

Dtype = Any

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


# ----------------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Architecture of a diffusers `AutoencoderKL`. Defaults are `stabilityai/sdxl-vae`."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.13025
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    sample_size: int = 1024
    force_upcast: bool = True

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        if not self.block_out_channels:
            raise ValueError("VAEConfig.block_out_channels must name at least one block.")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"VAEConfig: block_out_channels {self.block_out_channels} must all be divisible by "
                f"norm_num_groups={self.norm_num_groups} (GroupNorm); {bad} are not."
            )

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along each side (8 for SDXL-VAE)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, cfg: Mapping[str, Any], source: str = "config") -> "VAEConfig":
        """Builds a config from a diffusers `AutoencoderKL` config.json dict.

        Raises ValueError for another model class or a block/activation variant this port lacks.
        """
        name = cfg.get("_class_name", "AutoencoderKL")
        if name != "AutoencoderKL":
            raise ValueError(
                f"{source}: _class_name is {name!r}, not 'AutoencoderKL'; load_vae reads only "
                "diffusers KL autoencoders (e.g. stabilityai/sdxl-vae)."
            )
        n = len(cfg.get("block_out_channels", (64,)))
        for field, allowed in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = list(cfg.get(field, [allowed] * n))
            if any(t != allowed for t in types) or len(types) != n:
                raise ValueError(
                    f"{source}: {field}={types} is not supported; this port implements {n} x "
                    f"{allowed!r} (one per block_out_channels entry)."
                )
        if cfg.get("act_fn", "silu") not in ("silu", "swish"):
            raise ValueError(f"{source}: act_fn={cfg['act_fn']!r} is not supported (only 'silu').")
        sample_size = cfg.get("sample_size", 32)
        if isinstance(sample_size, (list, tuple)):
            sample_size = sample_size[0]
        # diffusers' own defaults apply to absent fields (old configs lack the newer switches).
        return cls(
            in_channels=cfg.get("in_channels", 3),
            out_channels=cfg.get("out_channels", 3),
            block_out_channels=tuple(cfg.get("block_out_channels", (64,))),
            layers_per_block=cfg.get("layers_per_block", 1),
            latent_channels=cfg.get("latent_channels", 4),
            norm_num_groups=cfg.get("norm_num_groups", 32),
            scaling_factor=float(cfg.get("scaling_factor", 0.18215)),
            shift_factor=cfg.get("shift_factor"),
            use_quant_conv=cfg.get("use_quant_conv", True),
            use_post_quant_conv=cfg.get("use_post_quant_conv", True),
            mid_block_add_attention=cfg.get("mid_block_add_attention", True),
            sample_size=int(sample_size),
            force_upcast=cfg.get("force_upcast", True),
        )

    def to_diffusers(self) -> dict[str, Any]:
        """The diffusers config.json dict (inverse of `from_diffusers`)."""
        n = len(self.block_out_channels)
        d = dataclasses.asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        return {
            "_class_name": "AutoencoderKL",
            **d,
            "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n,
            "act_fn": "silu",
        }


# ----------------------------------------------------------------------------------- blocks

_CONV_AXES = ("conv_height", "conv_width", "conv_in", "conv_out")


def _conv(features: int, kernel: int, name: str | None, dtype: Dtype, stride: int = 1, padding="SAME") -> nn.Conv:
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=padding,
        dtype=dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), _CONV_AXES),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
        name=name,
    )


def _dense(features: int, name: str, dtype: Dtype) -> nn.Dense:
    # Attention projections act per pixel, like 1x1 convs, so they share the conv axis names.
    return nn.Dense(
        features,
        dot_general=linear_dot_general,
        dtype=dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("conv_in", "conv_out")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
        name=name,
    )


def _group_norm(groups: int, eps: float, name: str) -> nn.GroupNorm:
    """torch.nn.GroupNorm on NHWC; statistics and output in float32 (the next conv casts back)."""
    return nn.GroupNorm(
        num_groups=groups,
        epsilon=eps,
        # Two-pass variance: E[x^2]-E[x]^2 loses digits against torch on large activations.
        use_fast_variance=False,
        dtype=jnp.float32,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
        name=name,
    )


class ResnetBlock2D(nn.Module):
    """diffusers ResnetBlock2D without time embedding: [B,H,W,Cin] -> [B,H,W,out_channels]."""

    out_channels: int
    groups: int
    eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.silu(_group_norm(self.groups, self.eps, "norm1")(x))
        h = _conv(self.out_channels, 3, "conv1", self.dtype)(h)
        h = nn.silu(_group_norm(self.groups, self.eps, "norm2")(h))
        h = _conv(self.out_channels, 3, "conv2", self.dtype)(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, "conv_shortcut", self.dtype)(x)
        return x + h


class Attention(nn.Module):
    """The VAE mid-block self-attention: one head over all H*W positions, residual.

    diffusers builds it with heads = C // attention_head_dim and attention_head_dim = C, so one
    head of width C; softmax is upcast to float32 (`upcast_softmax=True`).
    """

    groups: int
    eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hh, ww, c = x.shape
        h = _group_norm(self.groups, self.eps, "group_norm")(x).astype(self.dtype).reshape(b, hh * ww, c)
        q = _dense(c, "to_q", self.dtype)(h)
        k = _dense(c, "to_k", self.dtype)(h)
        v = _dense(c, "to_v", self.dtype)(h)
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) / np.sqrt(c)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bqk,bkc->bqc", probs, v)
        out = _dense(c, "to_out_0", self.dtype)(out)
        return x + out.reshape(b, hh, ww, c).astype(x.dtype)


class Downsample2D(nn.Module):
    """Pad (0,1,0,1) then 3x3 stride-2 conv: diffusers' `downsample_padding=0` path."""

    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # Asymmetric: one row/column of zeros at the bottom/right only (torch F.pad (0,1,0,1)).
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return _conv(self.channels, 3, "conv", self.dtype, stride=2, padding="VALID")(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 then 3x3 conv."""

    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv(self.channels, 3, "conv", self.dtype)(x)


class MidBlock(nn.Module):
    """resnet -> (attention) -> resnet at constant width."""

    channels: int
    groups: int
    add_attention: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = ResnetBlock2D(self.channels, self.groups, dtype=self.dtype, name="resnets_0")(x)
        if self.add_attention:
            x = Attention(self.groups, dtype=self.dtype, name="attentions_0")(x)
        return ResnetBlock2D(self.channels, self.groups, dtype=self.dtype, name="resnets_1")(x)


class DownEncoderBlock2D(nn.Module):
    """`num_layers` resnets to `channels`, then (unless last) a stride-2 downsample."""

    channels: int
    num_layers: int
    groups: int
    add_downsample: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.channels, self.groups, dtype=self.dtype, name=f"resnets_{j}")(x)
        if self.add_downsample:
            x = Downsample2D(self.channels, self.dtype, name="downsamplers_0")(x)
        return x


class UpDecoderBlock2D(nn.Module):
    """`num_layers` resnets to `channels`, then (unless last) a x2 upsample."""

    channels: int
    num_layers: int
    groups: int
    add_upsample: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.channels, self.groups, dtype=self.dtype, name=f"resnets_{j}")(x)
        if self.add_upsample:
            x = Upsample2D(self.channels, self.dtype, name="upsamplers_0")(x)
        return x


# ----------------------------------------------------------------------------- encoder/decoder


class Encoder(nn.Module):
    """Images [B,H,W,in_channels] -> moments [B,H/f,W/f,2*latent_channels] (before quant_conv)."""

    config: VAEConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        chans = cfg.block_out_channels
        x = _conv(chans[0], 3, "conv_in", self.dtype)(x.astype(self.dtype))
        for i, c in enumerate(chans):
            x = DownEncoderBlock2D(
                c, cfg.layers_per_block, cfg.norm_num_groups, i < len(chans) - 1, self.dtype, name=f"down_blocks_{i}"
            )(x)
        x = MidBlock(chans[-1], cfg.norm_num_groups, cfg.mid_block_add_attention, self.dtype, name="mid_block")(x)
        x = nn.silu(_group_norm(cfg.norm_num_groups, 1e-6, "conv_norm_out")(x))
        return _conv(2 * cfg.latent_channels, 3, "conv_out", self.dtype)(x)


class Decoder(nn.Module):
    """Latents [B,h,w,latent_channels] (after post_quant_conv) -> images [B,h*f,w*f,out_channels]."""

    config: VAEConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg = self.config
        chans = tuple(reversed(cfg.block_out_channels))
        x = _conv(chans[0], 3, "conv_in", self.dtype)(z.astype(self.dtype))
        x = MidBlock(chans[0], cfg.norm_num_groups, cfg.mid_block_add_attention, self.dtype, name="mid_block")(x)
        for i, c in enumerate(chans):
            # Decoder blocks hold one resnet more than encoder blocks (diffusers: layers + 1).
            x = UpDecoderBlock2D(
                c, cfg.layers_per_block + 1, cfg.norm_num_groups, i < len(chans) - 1, self.dtype, name=f"up_blocks_{i}"
            )(x)
        x = nn.silu(_group_norm(cfg.norm_num_groups, 1e-6, "conv_norm_out")(x))
        return _conv(cfg.out_channels, 3, "conv_out", self.dtype)(x)


class AutoencoderKL(nn.Module):
    """diffusers AutoencoderKL in NHWC.

    `encode(images [B,H,W,C] in [-1,1]) -> (mean, logvar)`, each [B,H/f,W/f,latent] float32
    (logvar clipped to [-30, 20] as diffusers' DiagonalGaussianDistribution does);
    `decode(latents [B,h,w,latent]) -> [B,h*f,w*f,out_channels]` raw output in `dtype`.
    `__call__` reconstructs from the mean (used for `init`).
    """

    config: VAEConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg, self.dtype)
        self.decoder = Decoder(cfg, self.dtype)
        if cfg.use_quant_conv:
            self.quant_conv = _conv(2 * cfg.latent_channels, 1, None, self.dtype)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = _conv(cfg.latent_channels, 1, None, self.dtype)

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = self.encoder(images)
        if self.config.use_quant_conv:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, latents: jax.Array) -> jax.Array:
        z = latents.astype(self.dtype)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.decode(self.encode(images)[0])


# ---------------------------------------------------------------------------- loaded model


class VAE:
    """A loaded KL autoencoder: `.config`, `.params` (plain float arrays), jitted encode/decode.

    `encode(images)` -> unscaled latent mean [B,H/f,W/f,latent] float32 (images NHWC in [-1,1]);
    `decode(latents)` -> raw decoder output [B,H,W,3] float32, roughly [-1,1], *not* clipped.
    Model-space latents (what JanusFlow's flow predicts) are `to_model_latents(mean)`.
    """

    def __init__(self, config: VAEConfig, params: Mapping, dtype: Dtype = jnp.float32):
        self.config = config
        self.params = params
        self.dtype = dtype
        self.module = AutoencoderKL(config, dtype)
        self._moments = jax.jit(functools.partial(self.module.apply, method=AutoencoderKL.encode))
        self._decode = jax.jit(functools.partial(self.module.apply, method=AutoencoderKL.decode))

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def shift_factor(self) -> float:
        return self.config.shift_factor or 0.0

    def _check(self, x, channels: int, what: str) -> jax.Array:
        x = jnp.asarray(x)
        if x.ndim != 4 or x.shape[-1] != channels:
            raise ValueError(
                f"VAE.{what}: expected NHWC [B,H,W,{channels}], got shape {tuple(x.shape)}. "
                + ("Images must be channels-last in [-1,1]." if what == "encode" else
                   "Latents must be channels-last and unscaled (use from_model_latents first).")
            )
        return x

    def encode_moments(self, images) -> tuple[jax.Array, jax.Array]:
        """images [B,H,W,in_channels] -> (mean, logvar), each [B,H/f,W/f,latent] float32."""
        images = self._check(images, self.config.in_channels, "encode")
        f = self.config.downsample_factor
        if images.shape[1] % f or images.shape[2] % f:
            raise ValueError(
                f"VAE.encode: height and width {images.shape[1:3]} must be multiples of {f} "
                "so that decode(encode(x)) has the input's size."
            )
        return self._moments({"params": self.params}, images)

    def encode(self, images) -> jax.Array:
        """images [B,H,W,in_channels] in [-1,1] -> unscaled posterior mean [B,H/f,W/f,latent] float32."""
        return self.encode_moments(images)[0]

    def decode(self, latents) -> jax.Array:
        """Unscaled latents [B,h,w,latent] -> raw output [B,h*f,w*f,out_channels] float32 (unclipped)."""
        latents = self._check(latents, self.config.latent_channels, "decode")
        return self._decode({"params": self.params}, latents).astype(jnp.float32)

    def to_model_latents(self, mean: jax.Array) -> jax.Array:
        """Unscaled VAE latents -> the unit-variance space flow/diffusion models use."""
        return (mean - self.shift_factor) * self.scaling_factor

    def from_model_latents(self, z: jax.Array) -> jax.Array:
        """Inverse of `to_model_latents`; feed the result to `decode`."""
        return z / self.scaling_factor + self.shift_factor


def init_vae(config: VAEConfig, rng: jax.Array, image_size: int | None = None, dtype: Dtype = jnp.float32):
    """Randomly initialised params (boxed with logical axis names) for `AutoencoderKL(config)`."""
    s = image_size or 2 * config.downsample_factor
    x = jnp.zeros((1, s, s, config.in_channels), jnp.float32)
    return jax.jit(AutoencoderKL(config, dtype).init)(rng, x)["params"]


def _resolve_dir(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"load_vae: {path!r} is not a directory (expected a diffusers VAE directory).")
    # A whole pipeline directory (e.g. stable-diffusion-xl-base) keeps its VAE under vae/.
    if not os.path.exists(os.path.join(path, CONFIG_NAME)) and os.path.exists(os.path.join(path, "vae", CONFIG_NAME)):
        path = os.path.join(path, "vae")
    return path


def load_vae(path: str | os.PathLike, dtype: Dtype = jnp.float32, variant: str | None = None) -> VAE:
    """Loads a diffusers `AutoencoderKL` directory (config.json + diffusion_pytorch_model.safetensors).

    Tensors are streamed one at a time with `safetensors.safe_open`, converted to NHWC/HWIO and
    cast to float32 params; `dtype` is the compute dtype (SDXL-VAE overflows in float16: use
    float32 or bfloat16). `variant="fp16"` reads `diffusion_pytorch_model.fp16.safetensors`.
    Raises FileNotFoundError / ValueError naming the file, key or shapes that are wrong.
    """
    from unimm_jax.convert import diffusers_vae  # late: the converter imports this module

    path = _resolve_dir(path)
    cfg_file = os.path.join(path, CONFIG_NAME)
    weights = WEIGHTS_NAME if variant is None else WEIGHTS_NAME.replace(".safetensors", f".{variant}.safetensors")
    w_file = os.path.join(path, weights)
    if not os.path.exists(cfg_file):
        raise FileNotFoundError(
            f"load_vae: {path!r} is not a diffusers VAE directory: it has no {CONFIG_NAME}. "
            f"Expected {CONFIG_NAME} and {weights} (as written by AutoencoderKL.save_pretrained)."
        )
    try:
        with open(cfg_file, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"load_vae: {cfg_file} is not valid JSON: {e}") from e
    config = VAEConfig.from_diffusers(raw, source=cfg_file)
    if not os.path.exists(w_file):
        present = sorted(n for n in os.listdir(path) if n.endswith((".bin", ".safetensors")))
        raise FileNotFoundError(
            f"load_vae: {path!r} has no {weights} (found: {present or 'no weight files'}). "
            "Only safetensors are read; re-save with AutoencoderKL.save_pretrained(dir, safe_serialization=True)."
        )
    params = diffusers_vae.load_safetensors(w_file, config, dtype=np.float32)
    return VAE(config, jax.tree.map(jnp.asarray, params), dtype=dtype)


def save_vae(vae: VAE, path: str | os.PathLike) -> None:
    """Writes `vae` as a diffusers directory that `AutoencoderKL.from_pretrained` and `load_vae` read."""
    from safetensors.numpy import save_file

    from unimm_jax.convert import diffusers_vae

    os.makedirs(path, exist_ok=True)
    state = diffusers_vae.vae_to_torch(jax.tree.map(np.asarray, vae.params))
    save_file(state, os.path.join(path, WEIGHTS_NAME))
    with open(os.path.join(path, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(vae.config.to_diffusers(), f, indent=2)
