"""Normalisation layers with the exact numerics of the reference implementations."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn


class RMSNorm(nn.Module):
    """Llama RMSNorm: normalise in float32, cast back to the input dtype, then scale.

    x: [..., D] any float dtype -> [..., D] same dtype (the scale multiply may promote, as in torch).
    """

    eps: float = 1e-6
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)), (x.shape[-1],)
        )
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return scale.astype(x.dtype) * normed.astype(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis with affine scale and bias, statistics in float32."""

    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (d,))
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), (d,))
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale + bias).astype(x.dtype)


class GroupNorm(nn.Module):
    """GroupNorm over NHWC activations (torch semantics: groups split the channel axis).

    per_position=True takes each group's statistics at each pixel alone (over the group's
    channels only, not over H and W), so an output never depends on other pixels: with one
    group it is a LayerNorm over channels. Parameters are the same either way.
    """

    num_groups: int = 32
    eps: float = 1e-6
    per_position: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        if c % self.num_groups:
            raise ValueError(
                f"GroupNorm({self.num_groups}) needs channels divisible by {self.num_groups}, got {c}: "
                "use channel counts that are multiples of the group count."
            )
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (c,))
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), (c,))
        g = x.astype(jnp.float32).reshape(b, h, w, self.num_groups, c // self.num_groups)
        axes = (4,) if self.per_position else (1, 2, 4)
        mean = jnp.mean(g, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(g - mean), axis=axes, keepdims=True)
        y = ((g - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, h, w, c)
        return (y * scale + bias).astype(x.dtype)
