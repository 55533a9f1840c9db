"""Mesh construction and logical-axis sharding rules.

Every parameter and key activation carries *logical* axis names; one table of rules maps them
to *mesh* axes. Changing parallelism is a config change: the same code runs on 1 CPU device,
8 fake CPU devices, a GPU or a TPU pod.

Logical axis vocabulary (use these names, nothing else):
  params:      vocab, embed, mlp, heads, kv_heads, head_dim, layers, norm,
               conv_height, conv_width, conv_in, conv_out, codebook, codebook_dim,
               patch, image_positions
  activations: batch, length, act_embed, act_heads, act_kv_heads
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Ordered (logical, mesh axes) rules. A logical axis maps to the first listed mesh axes that
# are still free in the array's spec, so e.g. `embed` falls back to replication when `fsdp` is
# already used by another dimension of the same array.
DEFAULT_RULES: tuple[tuple[str, tuple[str, ...] | str | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("conv_height", None),
    ("conv_width", None),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("codebook", "tensor"),
    ("codebook_dim", None),
    ("patch", None),
    ("image_positions", None),
)


def make_mesh(
    data: int = -1,
    fsdp: int = 1,
    tensor: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """Builds a ("data", "fsdp", "tensor") mesh. One entry may be -1: it takes the rest.

    Raises ValueError with the device count when the sizes do not divide the devices.
    """
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    sizes = [data, fsdp, tensor]
    if sum(s == -1 for s in sizes) > 1:
        raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))}: at most one may be -1.")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))} must be positive or -1.")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n % known:
            raise ValueError(
                f"mesh {dict(zip(MESH_AXES, sizes))} does not divide {n} devices: the fixed axes "
                f"multiply to {known}. Choose sizes whose product divides {n}."
            )
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but {n} are "
            f"available. Set one axis to -1 to take the rest, or change the sizes."
        )
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_to_spec(
    logical_axes: Iterable[str | None] | None,
    rules: Sequence[tuple[str, object]] = DEFAULT_RULES,
    mesh: Mesh | None = None,
) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec, never using a mesh axis twice.

    Mesh axes of size 1 are dropped (they shard nothing and only constrain layouts).
    """
    if logical_axes is None:
        return PartitionSpec()
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name in logical_axes:
        target = table.get(name) if name is not None else None
        if target is None:
            spec.append(None)
            continue
        axes = (target,) if isinstance(target, str) else tuple(target)
        if mesh is not None:
            axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1)
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def _divisible(shape: Sequence[int], spec: PartitionSpec, mesh: Mesh) -> PartitionSpec:
    """Drops mesh axes from dimensions they do not divide (tiny test models, odd vocabularies)."""
    out = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if entry is None:
            out.append(None)
            continue
        axes = (entry,) if isinstance(entry, str) else tuple(entry)
        kept = []
        size = 1
        for a in axes:
            if dim % (size * mesh.shape[a]) == 0:
                kept.append(a)
                size *= mesh.shape[a]
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*out)


def params_shardings(
    params_axes: Mapping,
    params_shapes: Mapping,
    mesh: Mesh,
    rules: Sequence[tuple[str, object]] = DEFAULT_RULES,
):
    """NamedShardings for a params tree from its tree of logical axis names.

    `params_axes` mirrors `params_shapes` with tuples of logical names (or None) at the leaves,
    e.g. from `flax.linen.get_partition_spec` of a boxed init.
    """

    def one(axes, shaped):
        names = tuple(axes) if axes is not None else None
        spec = logical_to_spec(names, rules, mesh)
        return NamedSharding(mesh, _divisible(shaped.shape, spec, mesh))

    return jax.tree.map(
        one, params_axes, params_shapes, is_leaf=lambda x: isinstance(x, (tuple, PartitionSpec)) or x is None
    )


def with_constraint(x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
    """Activation sharding constraint by logical names; a no-op outside a mesh context."""
    return nn.with_logical_constraint(x, logical_axes)


def fraction_sharded(params, shardings) -> float:
    """Fraction of parameter elements whose sharding splits them over more than one device."""
    total = sharded = 0
    for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(shardings)):
        n = int(np.prod(p.shape))
        total += n
        if any(e is not None for e in s.spec):
            sharded += n
    return sharded / max(total, 1)
