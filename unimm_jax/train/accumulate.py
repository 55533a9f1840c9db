"""Gradient accumulation inside the train step: one optimizer update from k micro-batches.

    (loss, aux), grads = accumulated_value_and_grad(micro_loss, params, batch, k, trainable=mask)

The step receives the whole batch of an update (`data.batch_size` rows) and runs forward +
backward on k micro-batches of batch_size / k rows in a `lax.scan`, so only one micro-batch's
activations are alive at a time. It returns the *sums* over micro-batches of the loss, the aux
values and the gradients. The accumulation is exact, not a mean of micro-batch means, when the
caller's `micro_loss` is additive over rows: each micro-batch's loss must be its share of the
whole batch's loss, normalised by whole-batch counts (the Janus step divides each task's CE sum
by the task's token count over the whole batch, which it counts before the scan). The summed
gradient is then the whole batch's gradient, whatever the token counts of the micro-batches.

Micro-batch j takes rows j, j + k, j + 2k, ... of the batch: the batch axis is sharded over the
mesh in contiguous blocks, and a strided split gives every device the same number of each
micro-batch's rows (an equal share of the work at each scan step) as long as each device's
block divides by k, which the trainer checks.

Frozen parameters (a stage's encoders, `trainable` False) enter the loss through
`lax.stop_gradient`, so their gradients are structural zeros: the backward pass neither forms
their weight gradients nor back-propagates into a subtree that only they feed (a frozen vision
tower's whole backward pass is skipped), and the gradient norm covers the trainable ones only.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

MicroLoss = Callable[[Any, Any, jax.Array], tuple[jax.Array, dict]]


def split_micro_batches(batch, k: int):
    """Every leaf [B, ...] -> [k, B // k, ...]: micro-batch j holds rows j, j + k, j + 2k, ...

    Raises ValueError when B is not a multiple of k.
    """
    def split(x):
        b = x.shape[0]
        if b % k:
            raise ValueError(f"a batch of {b} rows does not split into {k} micro-batches; set "
                             f"data.batch_size to a multiple of optim.grad_accum_steps={k}.")
        return jnp.swapaxes(x.reshape((b // k, k) + x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def stop_frozen_gradients(params, trainable):
    """params with `lax.stop_gradient` on every leaf whose `trainable` entry is False.

    trainable: a tree of Python bools shaped like params (`optimizer.trainable_mask`), or None
    (everything trains: params are returned as they are).
    """
    if trainable is None:
        return params
    return jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable)


def accumulated_value_and_grad(micro_loss: MicroLoss, params, batch, k: int, *, trainable=None):
    """((loss sum, aux sums), gradient sum) of `micro_loss` over k micro-batches of `batch`.

    micro_loss(params, micro_batch, j) -> (float32 scalar, dict of float32 scalars); j is the
    micro-batch index (int32 scalar; e.g. to fold into an rng key). Gradients are summed in
    float32 (the params' dtype for float32 master weights). k == 1 is a plain value_and_grad
    on the whole batch (no scan, the same program as without accumulation). trainable: a bool
    tree like params (None = all); frozen leaves get zero gradients without computing them.
    """
    grad_fn = jax.value_and_grad(
        lambda p, mb, j: micro_loss(stop_frozen_gradients(p, trainable), mb, j), has_aux=True)
    if k == 1:
        return grad_fn(params, batch, jnp.int32(0))
    micro = split_micro_batches(batch, k)

    def body(carry, xs):
        j, mb = xs
        (loss, aux), grads = grad_fn(params, mb, j)
        return jax.tree.map(jnp.add, carry, ((loss, aux), grads)), None

    (loss0, aux0), grads0 = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro), jnp.int32(0))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), ((loss0, aux0), grads0))
    total, _ = jax.lax.scan(body, zeros, (jnp.arange(k, dtype=jnp.int32), micro))
    return total
