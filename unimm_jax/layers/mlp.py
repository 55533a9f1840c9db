"""Small dense blocks shared by the vision tower and the adaptors."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from unimm_jax.layers.linear import linear, linear_dot_general

INIT_STD = 0.02  # the normal init std of every projection kernel here (Llama's initializer_range)
_init = nn.initializers.normal(INIT_STD)


def dense(features: int, names: tuple[str, str], name: str, use_bias: bool = True, dtype=jnp.float32) -> nn.Dense:
    """nn.Dense with a logically partitioned kernel [in, out] and bias [out]."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        dot_general=linear_dot_general,
        kernel_init=nn.with_logical_partitioning(_init, names),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[-1:]),
        name=name,
    )


class HeadsDense(nn.Module):
    """A projection into or out of attention heads with a full-rank logical kernel.

    in  (n_in=1):  x [..., D] @ kernel [D, H, Dh] -> [..., H, Dh]   (q, k, v)
    out (n_in=2):  x [..., H, Dh] @ kernel [H, Dh, D] -> [..., D]   (o)
    Same param names and layout as nn.DenseGeneral (kernel, bias), but the kernel is created
    in its real shape: DenseGeneral flattens multi-axis kernels at init, and under a global
    mesh its shape check then applies 3 logical names to a 2-D array and fails.
    """

    features: tuple[int, ...]
    names: tuple[str, ...]
    n_in: int = 1
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    init_std: float = INIT_STD  # std of the kernel's normal init

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_shape = x.shape[-self.n_in:]
        init = nn.initializers.normal(self.init_std)
        kernel = self.param("kernel", nn.with_logical_partitioning(init, self.names), (*in_shape, *self.features))
        y = linear(x.astype(self.dtype), jnp.asarray(kernel, self.dtype), self.n_in)
        if self.use_bias:
            bias_names = self.names[self.n_in:]
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, bias_names), self.features)
            y = y + jnp.asarray(bias, self.dtype)
        return y


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
