"""Flow samplers: Euler integration of dz/dt = v(z, t) and classifier-free guidance.

Convention (JanusFlow, `unimm_jax.losses.rectified_flow_loss`): t=0 is noise, t=1 is data, so
sampling integrates forward from z0 ~ N(0, I) at t0=0 to t1=1 with dt = (t1 - t0) / steps.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]


def cfg_velocity(v_cond: jax.Array, v_uncond: jax.Array, w: float | jax.Array) -> jax.Array:
    """Classifier-free guidance: w * v_cond - (w - 1) * v_uncond (w=1: conditional only)."""
    return w * v_cond - (w - 1.0) * v_uncond


def euler_sample(
    velocity_fn: VelocityFn, z0: jax.Array, *, steps: int, t0: float | jax.Array = 0.0, t1: float | jax.Array = 1.0
) -> jax.Array:
    """Integrates dz/dt = velocity_fn(z, t) from t0 to t1 with `steps` explicit Euler steps (jitted).

    z0: any float array (e.g. noise [B,h,w,4]). velocity_fn(z, t): z has z0's shape and dtype,
    t is a float32 scalar; step i uses t = t0 + i*dt with dt = (t1 - t0)/steps (JanusFlow's
    `t = step / N`). Returns z at t1 in z0's dtype. The state is carried in float32, so bf16
    latents do not lose the small per-step increments. First order: error ~ 1/steps.

    Compilation is cached per function object and `steps`. To change weights without
    recompiling, pass `jax.tree_util.Partial(fn, params)`: its arrays are traced arguments,
    whereas arrays a plain closure captures are baked in as constants.
    """
    if steps < 1:
        raise ValueError(f"euler_sample: steps must be >= 1, got {steps}.")
    if not isinstance(velocity_fn, jax.tree_util.Partial):
        velocity_fn = jax.tree_util.Partial(velocity_fn)
    return _euler(velocity_fn, z0, steps, t0, t1)


@partial(jax.jit, static_argnums=(2,))
def _euler(velocity_fn, z0, steps, t0, t1):
    t0 = jnp.asarray(t0, jnp.float32)
    dt = (jnp.asarray(t1, jnp.float32) - t0) / steps

    def body(i, z):
        t = t0 + i.astype(jnp.float32) * dt
        v = velocity_fn(z.astype(z0.dtype), t)
        if v.shape != z0.shape:
            raise ValueError(f"euler_sample: velocity_fn returned shape {v.shape}, expected {z0.shape}.")
        return z + dt * v.astype(jnp.float32)

    return jax.lax.fori_loop(0, steps, body, z0.astype(jnp.float32)).astype(z0.dtype)
