"""Euler sampler converges at first order on flows with exact solutions; CFG combination."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm_jax.sample.flow import cfg_velocity, euler_sample

STEPS = (8, 16, 32)


def _ratios(errors):
    return [errors[i + 1] / errors[i] for i in range(len(errors) - 1)]


def test_linear_ode_first_order():
    a = 0.7
    z0 = jnp.array([1.0, -2.0, 0.5])
    exact = np.asarray(z0) * np.exp(a)
    errs = [float(jnp.abs(euler_sample(lambda z, t: a * z, z0, steps=n) - exact).max()) for n in STEPS]
    assert errs[0] > 1e-3  # the scheme is not accidentally exact
    for r in _ratios(errs):
        assert 0.45 < r < 0.56, (errs, r)


def test_gaussian_rectified_flow_first_order():
    """z_t = t*x + (1-t)*z0, x ~ N(mu, s^2), z0 ~ N(0, 1): the marginal velocity is affine in z
    and the ODE carries z0 to mu + s*z0 exactly (t=0 noise, t=1 data)."""
    mu, s = 1.5, 0.5

    def velocity(z, t):
        var = t * t * s * s + (1 - t) ** 2
        return mu + (t * s * s - (1 - t)) / var * (z - t * mu)

    z0 = jax.random.normal(jax.random.PRNGKey(0), (64,))
    exact = mu + s * np.asarray(z0)
    errs = [float(jnp.abs(euler_sample(velocity, z0, steps=n) - exact).max()) for n in STEPS]
    assert errs[-1] < errs[0]
    for r in _ratios(errs):
        assert 0.4 < r < 0.6, (errs, r)
    # many steps reach the target distribution's sample closely
    assert float(jnp.abs(euler_sample(velocity, z0, steps=512) - exact).max()) < 5e-3


def test_time_grid_and_interval():
    seen = []

    def velocity(z, t):
        jax.debug.callback(lambda t: seen.append(float(t)), t)
        return jnp.ones_like(z)

    out = euler_sample(velocity, jnp.zeros((2,)), steps=4, t0=0.2, t1=0.6)
    np.testing.assert_allclose(np.asarray(out), [0.4, 0.4], rtol=1e-6)  # integral of 1 over [0.2, 0.6]
    np.testing.assert_allclose(sorted(seen), [0.2, 0.3, 0.4, 0.5], rtol=1e-6)  # left endpoints
    with pytest.raises(ValueError, match="steps must be >= 1"):
        euler_sample(velocity, jnp.zeros((2,)), steps=0)


def test_bf16_state_and_partial_params():
    # dz/dt = c with a traced parameter passed through jax.tree_util.Partial
    fn = jax.tree_util.Partial(lambda c, z, t: jnp.broadcast_to(c, z.shape).astype(z.dtype), jnp.float32(3.0))
    z0 = jnp.full((4,), 100.0, jnp.bfloat16)
    out = euler_sample(fn, z0, steps=64)
    assert out.dtype == jnp.bfloat16
    # Accumulated in float32: 100 + 3 = 103 is representable in bf16; naive bf16 accumulation of
    # 3/64 increments onto 100 (bf16 spacing 0.5) would round each one away and stay at 100.
    np.testing.assert_array_equal(np.asarray(out, np.float32), 103.0)


def test_cfg_velocity():
    vc, vu = jnp.array([1.0, 2.0]), jnp.array([0.5, -1.0])
    np.testing.assert_allclose(np.asarray(cfg_velocity(vc, vu, 2.0)), 2 * np.array([1.0, 2.0]) - np.array([0.5, -1.0]))
    np.testing.assert_array_equal(np.asarray(cfg_velocity(vc, vu, 1.0)), np.asarray(vc))
    np.testing.assert_array_equal(np.asarray(cfg_velocity(vc, vu, 0.0)), np.asarray(vu))
