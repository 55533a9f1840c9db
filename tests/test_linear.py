"""layers/linear.py: the CPU projection path computes exactly what lax.dot_general computes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm_jax.layers.linear import linear, linear_dot_general


def _ref(x, k, n_in):
    dims = ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ()))
    return jax.lax.dot_general(x, k, dims)


@pytest.mark.parametrize("x_shape,k_shape,n_in", [
    ((4, 7, 12), (12, 10), 1),        # Dense
    ((2, 5, 12), (12, 3, 4), 1),      # into heads (q/k/v)
    ((2, 5, 3, 4), (3, 4, 12), 2),    # out of heads (o)
    ((6, 12), (12, 9), 1),            # no batch axes
])
def test_values_and_gradients_equal_dot_general(x_shape, k_shape, n_in):
    kx, kk, kg = jax.random.split(jax.random.key(0), 3)
    x, k = jax.random.normal(kx, x_shape), jax.random.normal(kk, k_shape)
    y_ref = _ref(x, k, n_in)
    g = jax.random.normal(kg, y_ref.shape)
    y, vjp = jax.vjp(lambda x, k: linear(x, k, n_in), x, k)
    _, vjp_ref = jax.vjp(lambda x, k: _ref(x, k, n_in), x, k)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=1e-5)
    for a, b in zip(vjp(g), vjp_ref(g)):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_bfloat16_gradients_keep_dtypes():
    x = jax.random.normal(jax.random.key(1), (3, 8, 16), jnp.bfloat16)
    k = jax.random.normal(jax.random.key(2), (16, 4), jnp.bfloat16)
    dx, dk = jax.grad(lambda x, k: jnp.sum(linear(x, k).astype(jnp.float32) ** 2), argnums=(0, 1))(x, k)
    rx, rk = jax.grad(lambda x, k: jnp.sum(_ref(x, k, 1).astype(jnp.float32) ** 2), argnums=(0, 1))(x, k)
    assert dx.dtype == jnp.bfloat16 and dk.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(dk, np.float32), np.asarray(rk, np.float32), rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(np.asarray(dx, np.float32), np.asarray(rx, np.float32), rtol=2e-2, atol=2e-2)


def test_projection_takes_the_custom_backward_on_cpu_and_other_patterns_do_not():
    x, k = jnp.ones((2, 3, 4)), jnp.ones((4, 5))
    proj = str(jax.make_jaxpr(lambda x, k: linear_dot_general(x, k, (((2,), (0,)), ((), ()))))(x, k))
    assert "custom_vjp_call" in proj
    # a batched contraction (attention-like) is left to lax.dot_general
    a, b = jnp.ones((2, 3, 4)), jnp.ones((2, 4, 5))
    batched = str(jax.make_jaxpr(lambda a, b: linear_dot_general(a, b, (((2,), (1,)), ((0,), (0,)))))(a, b))
    assert "custom_vjp_call" not in batched and "dot_general" in batched
    np.testing.assert_allclose(
        np.asarray(linear_dot_general(a, b, (((2,), (1,)), ((0,), (0,))))), np.asarray(jnp.einsum("bij,bjk->bik", a, b)))


def _swiglu_grad_hlo(matmul):
    x = jnp.ones((8, 128, 64))
    params = (jnp.ones((64, 256)), jnp.ones((64, 256)), jnp.ones((256, 64)))
    f = lambda p, x: jnp.sum(jnp.sin(matmul(jax.nn.silu(matmul(x, p[0])) * matmul(x, p[1]), p[2])))
    return jax.jit(jax.grad(f)).lower(params, x).compile().as_text()


def test_weight_gradient_has_no_transposed_copy_of_the_output_gradient():
    """The reason for the module: XLA:CPU copied a SwiGLU's gate gradient [rows, N] into
    [N, rows] to form dW (with plain matmuls it still does: the check can fail)."""
    if "f32[256,1024]" not in _swiglu_grad_hlo(jnp.matmul):
        pytest.skip("this XLA no longer makes the copy for plain matmuls: layers/linear.py may be unneeded")
    assert "f32[256,1024]" not in _swiglu_grad_hlo(linear)
