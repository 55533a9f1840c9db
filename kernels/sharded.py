"""`sharded_attention`: the attention kernel per device under `jax.shard_map`.

Attention is independent per (example, head), so batch splits over the data-parallel mesh
axes and heads over the tensor axis with no communication. Query heads and kv heads are
split into the same number of contiguous chunks, which keeps every query head next to its
kv head: local query head h still reads local kv head h // (Hq // Hkv).
"""
from __future__ import annotations

import functools
import math

import jax
from jax.sharding import Mesh, PartitionSpec as P

from .dispatch import attention
from .validation import check_attention_inputs


def _axes_size(mesh: Mesh, axes) -> int:
  return math.prod(mesh.shape[a] for a in axes)


def sharded_attention(q, k, v, *, causal, segment_ids=None, impl, mesh: Mesh,
                      batch_axes=("data", "fsdp"), head_axis="tensor", interpret=False,
                      scale=None):
  """`attention` with batch sharded over `batch_axes` and heads over `head_axis`.

  Args:
    q: [B, T, Hq, D]; k, v: [B, S, Hkv, D]; segment_ids: optional int32 [B, T]. Global
      arrays (any input sharding; shard_map reshards to the specs below).
    mesh: the device mesh; `batch_axes` / `head_axis` name its axes (absent or size-1
      axes are ignored). B must divide by the batch axes' total size and Hkv (hence Hq)
      by the head axis size. Sequence and head_dim are not split.
    Other arguments as for `unimm_jax.kernels.attention`.
  Returns:
    [B, T, Hq, D] in q's dtype, sharded like q's spec (batch_axes, None, head_axis, None).
  """
  check_attention_inputs(q, k, v, causal=causal, segment_ids=segment_ids, impl=impl)
  if isinstance(batch_axes, str):
    batch_axes = (batch_axes,)
  for a in (*batch_axes, *([head_axis] if head_axis else [])):
    if a not in mesh.shape:
      raise ValueError(f"mesh axis {a!r} is not in the mesh (axes {tuple(mesh.shape)}); "
                       f"pass batch_axes/head_axis that name mesh axes.")
  batch_axes = tuple(a for a in batch_axes if mesh.shape[a] > 1)
  head_axis = head_axis if head_axis and mesh.shape[head_axis] > 1 else None
  b, hkv = q.shape[0], k.shape[2]
  n_batch = _axes_size(mesh, batch_axes)
  if b % n_batch:
    raise ValueError(f"batch size {b} does not divide over mesh axes {batch_axes} "
                     f"({n_batch} shards); use a batch that is a multiple of {n_batch} or "
                     f"shard the batch over fewer axes.")
  n_heads = mesh.shape[head_axis] if head_axis else 1
  if hkv % n_heads:
    raise ValueError(f"num kv heads ({hkv}) does not divide over mesh axis {head_axis!r} "
                     f"({n_heads} shards); each shard needs whole kv heads with their query "
                     f"heads. Use a tensor axis size that divides {hkv}, or head_axis=None.")

  bspec = batch_axes if batch_axes else None
  heads = P(bspec, None, head_axis, None)
  run = functools.partial(attention, causal=bool(causal), impl=impl, interpret=interpret,
                          scale=scale)
  # check_vma=False: pallas_call outputs carry no varying-mesh-axis annotations.
  shard = functools.partial(jax.shard_map, mesh=mesh, out_specs=heads, check_vma=False)
  if segment_ids is None:
    return shard(run, in_specs=(heads, heads, heads))(q, k, v)
  local = lambda q, k, v, seg: run(q, k, v, segment_ids=seg)
  return shard(local, in_specs=(heads, heads, heads, P(bspec, None)))(q, k, v, segment_ids)
