"""Which query may attend which key: the one mask rule every kernel shares.

Query i may attend key j iff
  * not causal, or j <= i + offset, where offset = S - T (bottom-right aligned, so the last
    query sees the last key when the key sequence is longer or shorter than the query one);
  * and j < kv_len (keys past kv_len are padding the kernel added to reach a block multiple);
  * and segment_ids is None or seg[i] == seg[j].
Rows that can attend nothing produce 0.

The helpers below work on traced int32 scalars inside kernels and index maps, and on Python
ints outside, so TPU (Mosaic) and GPU (Triton) kernels use the same arithmetic.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

# A large finite negative instead of -inf: exp(MASK_VALUE - m) underflows to exactly 0 and
# MASK_VALUE - MASK_VALUE stays finite, so no NaN can appear in the online softmax.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def div_nonneg(x, n: int):
  """x // n for x >= 0. Truncating division: jnp's floor division lowers through lax.sign,
  which the Mosaic lowering can only emit knowing the TPU generation."""
  return lax.div(x, jnp.asarray(n, x.dtype))


def attend_mask(rows, cols, *, causal, offset, kv_len, kv_padded, q_seg=None, kv_seg=None):
  """Boolean mask of allowed (row, col) pairs, or None when every pair is allowed.

  rows/cols: int32 absolute positions that broadcast to [block_q, block_kv].
  q_seg/kv_seg: segment ids that broadcast the same way, or None.
  """
  mask = None

  def both(a, b):
    return b if a is None else jnp.logical_and(a, b)

  if causal:
    mask = both(mask, cols <= rows + offset)
  if kv_padded:
    mask = both(mask, cols < kv_len)
  if q_seg is not None:
    mask = both(mask, q_seg == kv_seg)
  return mask


def kv_block_visible(q_block, kv_block, *, block_q, block_kv, offset):
  """Causal: True iff some query row of q_block may see some key of kv_block."""
  return kv_block * block_kv <= q_block * block_q + (block_q - 1) + offset


def kv_block_full(q_block, kv_block, *, block_q, block_kv, offset):
  """Causal: True iff every query row of q_block may see every key of kv_block, so the
  tile needs no causal mask (most tiles of a long sequence: the cheap path)."""
  return (kv_block + 1) * block_kv - 1 <= q_block * block_q + offset


def last_kv_block(q_block, *, block_q, block_kv, offset, num_kv_blocks):
  """Causal: index of the last kv block that q_block can see, clamped to [0, num_kv_blocks).

  Index maps use it to keep the kv block index fixed over skipped grid steps, so the
  pipeline issues no copy for blocks the kernel will not read.
  """
  last_row = q_block * block_q + (block_q - 1) + offset
  blk = div_nonneg(jnp.maximum(last_row, 0), block_kv)
  return jnp.minimum(blk, num_kv_blocks - 1)


def first_q_block(kv_block, *, block_q, block_kv, offset, num_q_blocks):
  """Causal: index of the first q block that can see kv_block, clamped to [0, num_q_blocks)."""
  first_row = kv_block * block_kv - offset
  blk = div_nonneg(jnp.maximum(first_row, 0), block_q)
  return jnp.minimum(blk, num_q_blocks - 1)
