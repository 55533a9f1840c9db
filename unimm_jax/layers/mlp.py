"""Small dense blocks shared by the vision tower and the adaptors."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

_init = nn.initializers.normal(0.02)


def dense(features: int, names: tuple[str, str], name: str, use_bias: bool = True, dtype=jnp.float32) -> nn.Dense:
    """nn.Dense with a logically partitioned kernel [in, out] and bias [out]."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        kernel_init=nn.with_logical_partitioning(_init, names),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[-1:]),
        name=name,
    )


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, as torch's nn.GELU() and transformers' "gelu"."""
    return jax.nn.gelu(x, approximate=False)


class MlpProjector(nn.Module):
    """Janus "mlp_gelu" projector: dense_0, then (gelu, dense_i) for i in 1..depth-1.

    x: [..., in] -> [..., features].
    """

    features: int
    depth: int = 2
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.depth < 1:
            raise ValueError(f"MlpProjector depth must be >= 1, got {self.depth}.")
        dt = jnp.dtype(self.dtype)
        x = dense(self.features, ("embed", "mlp"), "dense_0", dtype=dt)(x)
        for i in range(1, self.depth):
            x = dense(self.features, ("mlp", "embed"), f"dense_{i}", dtype=dt)(gelu(x))
        return x
