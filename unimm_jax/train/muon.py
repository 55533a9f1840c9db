"""Muon for the hidden weight matrices (`optim.optimizer = "muon"`), AdamW for the rest.

Muon (Jordan et al. 2024; Liu et al. 2025, "Muon is Scalable for LLM Training") replaces Adam's
per-element step on a weight matrix W [fan_in, fan_out] by the orthogonalised Nesterov momentum:

    m     <- beta * m + g                                  (momentum, bias-corrected by optax)
    O     =  NewtonSchulz5(beta * m + (1 - beta) * g)      ~ U V^T of its SVD (polar factor)
    W     <- W - lr * (rms * sqrt(max(fan_in, fan_out)) * O + weight_decay * W)

`rms` (`optim.muon_rms`, 0.2) scales O, whose entries have RMS 1 / sqrt(max(fan_in, fan_out)),
to the update RMS AdamW typically has, so the AdamW learning rate and weight decay carry over
(the Moonlight recipe). The Newton-Schulz iteration is optax's (`optax.contrib.scale_by_muon`).

Which leaves are Muon matrices is decided from the model's logical axis names (the same tree
that shards the params, `unimm_jax.api.logical_axes`), by `muon_dimension_numbers`:
- only leaves named `kernel`; embeddings (`embedding`, `pos_embed`), biases and norm scales
  stay on AdamW, as do output heads onto a vocabulary (an axis named `vocab` or `codebook`:
  lm_head, the generation head's last layer) and convolutions (axes named `conv_*`);
- axes named `layers` (a scanned stack) are batch axes: each layer is orthogonalised alone;
- a kernel whose last axis is `embed` writes into the residual stream (attention `o`, MLP
  `down`, an aligner's output layer): that axis is the output and the others are reduced over;
  otherwise the first remaining axis is the input (`q` [embed, heads, head_dim]: heads x head_dim
  is the output).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers, scale_by_muon

Path = tuple[str, ...]

BATCH_AXES = ("layers",)
HEAD_AXES = ("vocab", "codebook")
RESIDUAL_AXIS = "embed"


def _axis_names(spec) -> tuple[str | None, ...]:
    """A PartitionSpec / tuple of logical names -> a tuple of str-or-None, one per dimension."""
    return tuple(None if a is None else (a if isinstance(a, str) else "+".join(a)) for a in tuple(spec))


def muon_dimension_numbers(path: Path, axes, ndim: int) -> MuonDimensionNumbers | None:
    """The Muon (reduction, output) axes of the leaf at `path`, or None for an AdamW leaf.

    path: the leaf's path components, e.g. ("llm", "layers", "attn", "q", "kernel").
    axes: its logical axis names (a PartitionSpec or tuple), one per dimension.
    ndim: its rank (checked against `axes`).
    The rule is in the module docstring.
    """
    names = _axis_names(axes)
    if len(names) != ndim:
        raise ValueError(f"logical axes {names} of {'/'.join(path)} do not match its rank {ndim}.")
    if not path or path[-1] != "kernel":
        return None
    if any(n in HEAD_AXES or (n or "").startswith("conv") for n in names):
        return None
    rest = [i for i, n in enumerate(names) if n not in BATCH_AXES]
    if len(rest) < 2:
        return None
    if names[rest[-1]] == RESIDUAL_AXIS:
        return MuonDimensionNumbers(reduction_axis=tuple(rest[:-1]), output_axis=(rest[-1],))
    return MuonDimensionNumbers(reduction_axis=(rest[0],), output_axis=tuple(rest[1:]))


def muon_leaves(params, logical_axes) -> dict[Path, MuonDimensionNumbers | None]:
    """{path: dimension numbers or None} for every leaf of `params` (paths as in optimizer.py).

    `logical_axes` is a tree like `params` of PartitionSpecs (or tuples of names); a leaf it
    lacks is an error naming the leaf.
    """
    from unimm_jax.train.optimizer import flatten_with_paths, path_str, path_tuple

    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec) or (
        isinstance(x, tuple) and all(a is None or isinstance(a, (str, tuple)) for a in x))
    by_leaf = {path_tuple(kp): spec for kp, spec in
               jax.tree_util.tree_flatten_with_path(logical_axes, is_leaf=is_spec)[0]}
    out = {}
    for p, x in flatten_with_paths(params):
        if p not in by_leaf:
            raise ValueError(f"optim.optimizer='muon': no logical axes for parameter {path_str(p)!r}; "
                             f"the model's logical-axes tree must cover every parameter.")
        out[p] = muon_dimension_numbers(p, by_leaf[p], getattr(x, "ndim", 0))
    return out


def scale_to_rms(dims_fn: Callable[[Any], Any], rms: float) -> optax.GradientTransformation:
    """Multiplies each orthogonalised update by rms * sqrt(max(fan_in, fan_out))."""

    def scale(u, dims):  # dims from muon_dimension_numbers: tuples of axes
        fan_in = math.prod(u.shape[a] for a in dims.reduction_axis)
        fan_out = math.prod(u.shape[a] for a in dims.output_axis)
        return u * jnp.asarray(rms * math.sqrt(max(fan_in, fan_out)), u.dtype)

    def update(updates, state, params=None):
        del params
        is_dims = lambda x: isinstance(x, MuonDimensionNumbers)
        return jax.tree.map(scale, updates, dims_fn(updates), is_leaf=is_dims), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def muon_matrices(schedule: optax.Schedule, dims_fn: Callable[[Any], Any], *, beta: float,
                  ns_steps: int, rms: float, weight_decay: float,
                  decay_mask: Callable[[Any], Any]) -> optax.GradientTransformation:
    """The Muon chain for the matrices `dims_fn` describes (module docstring's update)."""
    return optax.chain(
        scale_by_muon(ns_steps=ns_steps, beta=beta, nesterov=True, weight_dimension_numbers=dims_fn),
        scale_to_rms(dims_fn, rms),
        optax.add_decayed_weights(weight_decay, decay_mask),
        optax.scale_by_learning_rate(schedule),
    )


def describe(dims: Mapping[Path, MuonDimensionNumbers | None]) -> str:
    """One log line: how many of the (trainable) leaves `dims` holds take Muon and AdamW."""
    n_muon = sum(d is not None for d in dims.values())
    return f"optimizer: Muon on {n_muon} weight matrices, AdamW on the other {len(dims) - n_muon} leaves"
