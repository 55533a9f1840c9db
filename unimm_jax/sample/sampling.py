"""Turning next-token logits into tokens: temperature, top-k, top-p (nucleus), greedy.

Semantics follow transformers' warpers, applied in its order (temperature, then top-k, then
top-p) so that a seed-free comparison with `generate(do_sample=True, ...)` means the same thing:
  top-k: keep logits >= the k-th largest (ties at the boundary are kept);
  top-p: keep the most likely tokens whose cumulative probability *before* them is < top_p
         (so the token that crosses top_p is kept, and at least one token always is).
temperature == 0 means greedy (argmax of the raw logits; the warpers cannot change it).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def check_sampling_args(temperature, top_k, top_p) -> tuple[float, int | None, float | None]:
    """Validates (outside jit) and normalises: top_k 0 -> None, top_p 1.0 -> None."""
    try:
        temperature = float(temperature)
    except (TypeError, ValueError):
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}.") from None
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}.")
    if top_k is not None:
        if int(top_k) != top_k or top_k < 0:
            raise ValueError(f"top_k must be a positive integer (or None/0 to disable), got {top_k!r}.")
        top_k = int(top_k) or None
    if top_p is not None:
        top_p = float(top_p)
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (or None to disable), got {top_p}.")
        if top_p == 1.0:
            top_p = None
    return temperature, top_k, top_p


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """[..., V] -> same shape, logits below the k-th largest set to -inf."""
    k = min(k, logits.shape[-1])
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, NEG_INF, logits)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
    """[..., V] -> same shape, outside the nucleus set to -inf (see the module docstring)."""
    desc = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability mass strictly above each token
    keep = before < p
    keep = keep.at[..., 0].set(True)
    threshold = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < threshold, NEG_INF, logits)


def process_logits(logits: jax.Array, temperature: float, top_k: int | None, top_p: float | None) -> jax.Array:
    """float32 [B, V] -> warped logits [B, V] (-inf outside the kept set). temperature > 0."""
    x = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        x = top_k_filter(x, top_k)
    if top_p is not None:
        x = top_p_filter(x, top_p)
    return x


def sample_tokens(logits: jax.Array, keys: jax.Array, temperature: float, top_k: int | None = None,
                  top_p: float | None = None) -> jax.Array:
    """logits float [B, V], keys [B] (one PRNG key per row) -> int32 [B].

    Settings are static Python values (a new setting compiles a new loop); each row draws from
    its own key, so a row's tokens do not depend on which other rows share its batch.
    """
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    x = process_logits(logits, temperature, top_k, top_p)
    return jax.vmap(lambda k, row: jax.random.categorical(k, row))(keys, x).astype(jnp.int32)


def row_keys(seed: jax.Array, row_ids: jax.Array) -> jax.Array:
    """One key per output row: fold_in(key(seed), global row index) -> keys [B]."""
    base = jax.random.key(seed)
    return jax.vmap(lambda r: jax.random.fold_in(base, r))(row_ids)


def step_keys(keys: jax.Array, step: jax.Array) -> jax.Array:
    """The keys rows use at decode step `step`: [B] -> [B]."""
    return jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)
