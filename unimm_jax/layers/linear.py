"""The projection `x [..., K] @ kernel [K, N]` with a backward pass XLA:CPU runs well.

`linear_dot_general` is a drop-in `dot_general` for flax's Dense/DenseGeneral (and `linear` for
our own projections). On CPU it routes the usual projection pattern through `_linear`, whose
custom VJP computes the weight gradient as `dot(g, x)` over the token rows, [N, K], and then
transposes the small result. JAX's own transpose rule asks for `dot(x, g)` [K, N], for which
XLA:CPU's layout assignment materialises g transposed to [N, rows] in a loop fusion, reading
the large g (and, in a SwiGLU, the whole silu backward fused into it) column by column: in the
default job's LLM step those fusions took ~30 ms each, more than all its matmuls together. The
math is the same product; only the summation order of the float adds may differ.

Other backends (GPU, TPU) and every other dimension pattern use `jax.lax.dot_general` unchanged:
their layout assignment handles the transposed operand for free.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


@jax.custom_vjp
def _linear(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x [..., K] @ kernel [K, N] -> [..., N] (same dtype rules as jnp.matmul)."""
    return jnp.matmul(x, kernel)


def _linear_fwd(x, kernel):
    return jnp.matmul(x, kernel), (x, kernel)


def _linear_bwd(res, g):
    x, kernel = res
    rows_x = x.reshape(-1, x.shape[-1])
    rows_g = g.reshape(-1, g.shape[-1])
    d_kernel_t = jax.lax.dot_general(rows_g, rows_x, (((0,), (0,)), ((), ())))  # [N, K]
    d_x = jnp.matmul(g, kernel.T)
    return d_x.astype(x.dtype), d_kernel_t.T.astype(kernel.dtype)


_linear.defvjp(_linear_fwd, _linear_bwd)


def _uses_linear(lhs, rhs, dimension_numbers, precision, preferred_element_type) -> bool:
    """True for lhs [..., *C] . rhs [*C, *F] with no batch dims, on CPU, at default precision."""
    (lhs_c, rhs_c), (lhs_b, rhs_b) = dimension_numbers
    n = len(lhs_c)
    return (
        jax.default_backend() == "cpu"
        and not lhs_b and not rhs_b and n > 0
        and tuple(lhs_c) == tuple(range(lhs.ndim - n, lhs.ndim))
        and tuple(rhs_c) == tuple(range(n))
        and precision is None
        and (preferred_element_type is None or preferred_element_type == jnp.result_type(lhs, rhs))
        and lhs.dtype == rhs.dtype
    )


def linear_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
    """`jax.lax.dot_general` with the projection case (lhs's trailing dims contracted with rhs's
    leading dims, no batch dims) through `_linear` on CPU; the output shape [..., *F] is the same."""
    if kwargs or not _uses_linear(lhs, rhs, dimension_numbers, precision, preferred_element_type):
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type, **kwargs)
    n = len(dimension_numbers[0][0])
    k = math.prod(rhs.shape[:n])
    out = _linear(lhs.reshape(lhs.shape[: lhs.ndim - n] + (k,)), rhs.reshape(k, -1))
    return out.reshape(lhs.shape[: lhs.ndim - n] + rhs.shape[n:])


def linear(x: jax.Array, kernel: jax.Array, n_in: int = 1) -> jax.Array:
    """x [..., *I] (the last n_in dims) @ kernel [*I, *F] -> [..., *F]."""
    dims = ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ()))
    return linear_dot_general(x, kernel, dims)
