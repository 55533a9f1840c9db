"""Padding helpers: kernels run on block multiples, callers pass any length."""
from __future__ import annotations

import jax.numpy as jnp


def round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def next_pow2(x: int) -> int:
  return 1 << max(x - 1, 0).bit_length()


def pad_axis(x, axis: int, size: int, value=0):
  """Pads `x` at the end of `axis` up to `size` (no-op when already that long)."""
  extra = size - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)
