"""Flash attention backward for Hopper GPUs in Pallas Mosaic GPU (warp-specialised).

Two kernels, each with two compute warpgroups and one TMA memory warpgroup per CTA, as in
the forward (flash_mgpu.py); inputs are the forward's o and base-2 lse [B, Hq, T] (either
forward kernel's: the convention is shared) and delta = rowsum(dO * O).
 * dq:    a compute warpgroup holds `block_q_dq` query rows with their Q, dO, lse and delta;
          the memory warpgroup streams K/V tiles of `block_kv_dq` keys. Per tile:
          S = Q K^T and dP = dO V^T (two wgmmas issued together), P = exp2(S - lse),
          dS = P (dP - delta), dQ += dS K.
 * dk/dv: a compute warpgroup holds `block_kv_dkv` keys with their K and V; the memory
          warpgroup streams Q, dO, lse and delta tiles of `block_q_dkv` rows, for each of
          the G query heads that read this kv head (grouped-query attention sums there, in
          registers). Per tile, on transposed tiles: S^T = K Q^T, P^T = exp2(S^T - lse),
          dV += P^T dO and dP^T = V dO^T (issued together), dS^T = P^T (dP^T - delta),
          dK += dS^T Q.
Packed sequences: with segment ids (S == T) every visited tile is masked by segment too.
Causal: the dq warpgroups stop at their last visible kv tile; the dk/dv ones start at their
first visible q tile. A warpgroup with less work than its CTA-mate still frees the ring
slots it skips, and waits for them first when it reads later slots (dk/dv: barrier phases are
counted per thread), so both stay in step with the memory warpgroup. Without segments only
the tiles that cross the diagonal build a mask.

Takes what `unsupported_reason` allows (the forward's conditions plus the tiles here).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from .flash_mgpu import (COMPUTE_REGISTERS, COMPUTE_WGS, LOG2E, MEMORY_REGISTERS, TILED,
                         QueryTiles, cdiv, launch, masked_logits, same_segment,
                         stream_kv_tiles, wgmma_iota)


@dataclasses.dataclass(frozen=True)
class MosaicBwdBlocks:
  """Tiles of the two backward kernels (multiples of 64) and their ring depth (>= 2)."""
  block_q_dq: int = 64
  block_kv_dq: int = 64
  block_q_dkv: int = 64
  block_kv_dkv: int = 64
  stages: int = 2


def unsupported_reason(q, k, *, blocks: MosaicBwdBlocks) -> str | None:
  """Tile conditions of the backward beyond the forward's (flash_mgpu.unsupported_reason)."""
  t, s = q.shape[1], k.shape[1]
  if t % (COMPUTE_WGS * blocks.block_q_dq) or t % blocks.block_q_dkv:
    return (f"q length {t} not a multiple of {COMPUTE_WGS * blocks.block_q_dq} and "
            f"{blocks.block_q_dkv}")
  if s % (COMPUTE_WGS * blocks.block_kv_dkv) or s % blocks.block_kv_dq:
    return (f"kv length {s} not a multiple of {COMPUTE_WGS * blocks.block_kv_dkv} and "
            f"{blocks.block_kv_dq}")
  return None


def flash_backward(q, k, v, o, lse, do, *, causal: bool, scale: float, segment_ids=None,
                   blocks: MosaicBwdBlocks = MosaicBwdBlocks()):
  """dq [B, T, Hq, D], dk and dv [B, S, Hkv, D] in the inputs' dtypes. lse: [B, Hq, T]
  float32, base 2, from either forward kernel; segment_ids: optional int32 [B, T] (S == T).
  Compiled only (see flash_mgpu)."""
  delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
  seg = None if segment_ids is None else segment_ids.astype(jnp.int32)
  dq = _dq(q, k, v, do, lse, delta, seg, causal=causal, scale=scale, blocks=blocks)
  dk, dv = _dkv(q, k, v, do, lse, delta, seg, causal=causal, scale=scale, blocks=blocks)
  return dq, dk, dv


def _zeros(shape):
  return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)


def _dq(q, k, v, do, lse, delta, seg, *, causal, scale, blocks: MosaicBwdBlocks):
  b, t, hq, d = q.shape
  group = hq // k.shape[2]
  bq, bk = blocks.block_q_dq, blocks.block_kv_dq
  segmented = seg is not None
  tiles = QueryTiles.of(q, k, causal=causal, segmented=segmented, block_q=bq, block_kv=bk)
  stages = min(blocks.stages, tiles.num_kv)
  offset = tiles.offset
  qk_scale = scale * LOG2E
  dtype = q.dtype

  def kernel(*refs, q_smem2, do_smem2, lse_smem2, delta_smem2, k_smem, v_smem, q_ready,
             do_ready, lse_ready, delta_ready, k_ready, v_ready, kv_free, seg_smem2=None,
             kvseg_smem=None, seg_ready=None, kvseg_ready=None):
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *seg_ref, dq_ref = refs
    seg_ref = seg_ref[0] if segmented else None
    batch, head = lax.axis_index("batch"), lax.axis_index("heads")
    tile, wg = tiles.tile(), lax.axis_index("wg")
    cta_steps = tiles.cta_steps(tile)

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
      plgpu.set_max_registers(COMPUTE_REGISTERS, action="increase")
      q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
      lse_smem, delta_smem = lse_smem2.at[wg], delta_smem2.at[wg]
      first_row = tiles.first_row(tile, wg)
      rows = pl.ds(first_row, bq)
      plgpu.copy_gmem_to_smem(q_ref.at[batch, rows, head], q_smem, q_ready.at[wg])
      plgpu.copy_gmem_to_smem(do_ref.at[batch, rows, head], do_smem, do_ready.at[wg])
      plgpu.copy_gmem_to_smem(lse_ref.at[batch, head, rows], lse_smem, lse_ready.at[wg])
      plgpu.copy_gmem_to_smem(delta_ref.at[batch, head, rows], delta_smem, delta_ready.at[wg])
      for ready in (q_ready, do_ready, lse_ready, delta_ready):
        plgpu.barrier_wait(ready.at[wg])
      row_lse = plgpu.load(lse_smem, (), layout=plgpu.Layout.WGMMA.reduce(1))
      row_delta = plgpu.load(delta_smem, (), layout=plgpu.Layout.WGMMA.reduce(1))
      if segmented:
        plgpu.copy_gmem_to_smem(seg_ref.at[batch, rows], seg_smem2.at[wg], seg_ready.at[wg])
        plgpu.barrier_wait(seg_ready.at[wg])
        row_seg = plgpu.load(seg_smem2.at[wg], (), layout=plgpu.Layout.WGMMA.reduce(1))
      steps = tiles.steps(first_row)
      unmasked = tiles.unmasked(first_row, steps)

      def step(j, dq, masked: bool):
        slot = lax.rem(j, jnp.int32(stages))
        plgpu.barrier_wait(k_ready.at[slot])
        plgpu.barrier_wait(v_ready.at[slot])
        if segmented:
          plgpu.barrier_wait(kvseg_ready.at[slot])
          col_seg = plgpu.load(kvseg_smem.at[slot], (), layout=plgpu.Layout.WGMMA.reduce(0))

        def scores(s_ref, dp_ref):  # both matmuls in flight before either is read
          plgpu.wgmma(s_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
          plgpu.wgmma(dp_ref, do_smem, plgpu.transpose_ref(v_smem.at[slot], (1, 0)))
          return s_ref[...], dp_ref[...]

        logits, dp = pl.run_scoped(scores, plgpu.ACC((bq, bk), jnp.float32),
                                   plgpu.ACC((bq, bk), jnp.float32))
        logits = logits * qk_scale
        if masked:
          shape = (bq, bk)
          logits = masked_logits(
              logits,
              wgmma_iota(shape, 1) + j * bk <= wgmma_iota(shape, 0) + first_row + offset
              if causal else None,
              same_segment(row_seg, col_seg, shape) if segmented else None)
        p = jnp.exp2(logits - lax.broadcast_in_dim(row_lse, logits.shape, [0]))
        ds = p * (dp - lax.broadcast_in_dim(row_delta, dp.shape, [0]))

        def accumulate(dq_ref):
          plgpu.wgmma(dq_ref, ds.astype(dtype), k_smem.at[slot])

        dq = pl.run_state(accumulate)(plgpu.ACC.init(dq))
        plgpu.barrier_arrive(kv_free.at[slot])
        return dq

      dq = lax.fori_loop(0, unmasked, functools.partial(step, masked=False), _zeros((bq, d)))
      dq = lax.fori_loop(unmasked, steps, functools.partial(step, masked=True), dq)
      if causal:  # free the CTA's tiles this warpgroup does not need
        @pl.loop(steps, cta_steps)
        def _(j):
          plgpu.barrier_arrive(kv_free.at[lax.rem(j, jnp.int32(stages))])

      q_smem[...] = (dq * scale).astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[batch, rows, head])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _memory():
      stream_kv_tiles(k_ref, v_ref, seg_ref, batch=batch, kv_head=lax.div(head, jnp.int32(group)),
                      block_kv=bk, stages=stages, num_steps=cta_steps, k_smem=k_smem,
                      v_smem=v_smem, kvseg_smem=kvseg_smem, k_ready=k_ready, v_ready=v_ready,
                      kvseg_ready=kvseg_ready, free=(kv_free,))

  scratch = dict(
      q_smem2=plgpu.SMEM((COMPUTE_WGS, bq, d), dtype, transforms=TILED),  # q in, dq out
      do_smem2=plgpu.SMEM((COMPUTE_WGS, bq, d), dtype, transforms=TILED),
      lse_smem2=plgpu.SMEM((COMPUTE_WGS, bq), jnp.float32),
      delta_smem2=plgpu.SMEM((COMPUTE_WGS, bq), jnp.float32),
      k_smem=plgpu.SMEM((stages, bk, d), dtype, transforms=TILED),
      v_smem=plgpu.SMEM((stages, bk, d), dtype, transforms=TILED),
      **{name: plgpu.Barrier(num_barriers=COMPUTE_WGS)
         for name in ("q_ready", "do_ready", "lse_ready", "delta_ready")},
      k_ready=plgpu.Barrier(num_barriers=stages),
      v_ready=plgpu.Barrier(num_barriers=stages),
      kv_free=plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),
  )
  inputs = (q, k, v, do, lse, delta)
  if segmented:
    scratch.update(tiles.segment_scratch(stages))
    inputs += (seg,)
  return launch(kernel, *inputs, out_type=jax.ShapeDtypeStruct(q.shape, dtype), scratch=scratch,
                grid=(hq, tiles.num_q_tiles, b), grid_names=("heads", "q_tile", "batch"))


def _dkv(q, k, v, do, lse, delta, seg, *, causal, scale, blocks: MosaicBwdBlocks):
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  group = hq // hkv
  bq, bk = blocks.block_q_dkv, blocks.block_kv_dkv
  num_q = t // bq
  num_kv_tiles = s // (COMPUTE_WGS * bk)
  offset = s - t
  qk_scale = scale * LOG2E
  dtype = q.dtype
  stages = min(blocks.stages, num_q)

  def first_q_block(key_start):
    """First q block with a row that sees key `key_start` (causal), else 0."""
    if not causal:
      return 0
    return jnp.minimum(lax.div(jnp.maximum(key_start - offset, 0), jnp.int32(bq)), num_q)

  segmented = seg is not None

  def kernel(*refs, k_smem2, v_smem2, q_smem, do_smem, lse_smem, delta_smem, k_ready, v_ready,
             q_ready, do_ready, lse_ready, delta_ready, q_free, kvseg_smem2=None,
             qseg_smem=None, kvseg_ready=None, qseg_ready=None):
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *seg_ref, dk_ref, dv_ref = refs
    seg_ref = seg_ref[0] if segmented else None
    batch, kv_head = lax.axis_index("batch"), lax.axis_index("heads")
    tile = lax.axis_index("kv_tile")
    wg = lax.axis_index("wg")
    cta_first = first_q_block(tile * (COMPUTE_WGS * bk))
    per_head = num_q - cta_first
    total = group * per_head

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
      plgpu.set_max_registers(COMPUTE_REGISTERS, action="increase")
      k_own, v_own = k_smem2.at[wg], v_smem2.at[wg]
      key_start = tile * (COMPUTE_WGS * bk) + wg * bk
      keys = pl.ds(key_start, bk)
      plgpu.copy_gmem_to_smem(k_ref.at[batch, keys, kv_head], k_own, k_ready.at[wg])
      plgpu.copy_gmem_to_smem(v_ref.at[batch, keys, kv_head], v_own, v_ready.at[wg])
      plgpu.barrier_wait(k_ready.at[wg])
      plgpu.barrier_wait(v_ready.at[wg])
      if segmented:
        plgpu.copy_gmem_to_smem(seg_ref.at[batch, keys], kvseg_smem2.at[wg], kvseg_ready.at[wg])
        plgpu.barrier_wait(kvseg_ready.at[wg])
        key_seg = plgpu.load(kvseg_smem2.at[wg], (), layout=plgpu.Layout.WGMMA.reduce(1))
      first = first_q_block(key_start)
      # q blocks [first, unmasked) cross the diagonal: block i is clear of it iff its first
      # row sees this warpgroup's last key, i * bq + offset >= key_start + bk - 1.
      if segmented:
        unmasked = num_q
      elif causal:
        unmasked = jnp.clip(cdiv(key_start + bk - 1 - offset, bq), first, num_q)
      else:
        unmasked = 0
      ready_barriers = (q_ready, do_ready, lse_ready, delta_ready) + (
          (qseg_ready,) if segmented else ())

      def wait_slot(slot):
        for ready in ready_barriers:
          plgpu.barrier_wait(ready.at[slot])

      def skip(n, carry):
        wait_slot(lax.rem(n, jnp.int32(stages)))  # keep this thread's barrier phases in step
        plgpu.barrier_arrive(q_free.at[lax.rem(n, jnp.int32(stages))])
        return carry

      def step(i, carry, n0, masked: bool):
        dk, dv = carry
        n = n0 + i - cta_first
        slot = lax.rem(n, jnp.int32(stages))
        wait_slot(slot)
        col_lse = plgpu.load(lse_smem.at[slot], (), layout=plgpu.Layout.WGMMA.reduce(0))
        col_delta = plgpu.load(delta_smem.at[slot], (), layout=plgpu.Layout.WGMMA.reduce(0))
        if segmented:
          col_seg = plgpu.load(qseg_smem.at[slot], (), layout=plgpu.Layout.WGMMA.reduce(0))

        def scores_t(st_ref):
          plgpu.wgmma(st_ref, k_own, plgpu.transpose_ref(q_smem.at[slot], (1, 0)))
          return st_ref[...]

        st = pl.run_scoped(scores_t, plgpu.ACC((bk, bq), jnp.float32)) * qk_scale
        if masked:
          shape = (bk, bq)
          st = masked_logits(
              st,
              wgmma_iota(shape, 0) + key_start <= wgmma_iota(shape, 1) + i * bq + offset
              if causal else None,
              same_segment(key_seg, col_seg, shape) if segmented else None)
        pt = jnp.exp2(st - lax.broadcast_in_dim(col_lse, st.shape, [1]))

        def dv_and_dpt(refs):  # both in flight before either is read
          dv_ref, dpt_ref = refs
          plgpu.wgmma(dv_ref, pt.astype(dtype), do_smem.at[slot])
          plgpu.wgmma(dpt_ref, v_own, plgpu.transpose_ref(do_smem.at[slot], (1, 0)))

        dv, dpt = pl.run_state(dv_and_dpt)((plgpu.ACC.init(dv), plgpu.ACC.init(_zeros((bk, bq)))))
        dst = pt * (dpt - lax.broadcast_in_dim(col_delta, dpt.shape, [1]))

        def accumulate(dk_ref):
          plgpu.wgmma(dk_ref, dst.astype(dtype), q_smem.at[slot])

        dk = pl.run_state(accumulate)(plgpu.ACC.init(dk))
        plgpu.barrier_arrive(q_free.at[slot])
        return dk, dv

      def head(g, carry):
        n0 = g * per_head
        lax.fori_loop(n0, n0 + first - cta_first, skip, None)
        carry = lax.fori_loop(first, unmasked, functools.partial(step, n0=n0, masked=True),
                              carry)
        return lax.fori_loop(unmasked, num_q, functools.partial(step, n0=n0, masked=False),
                             carry)

      dk, dv = lax.fori_loop(0, group, head, (_zeros((bk, d)), _zeros((bk, d))))
      k_own[...] = (dk * scale).astype(dtype)
      v_own[...] = dv.astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(k_own, dk_ref.at[batch, keys, kv_head])
      plgpu.copy_smem_to_gmem(v_own, dv_ref.at[batch, keys, kv_head])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _memory():
      plgpu.set_max_registers(MEMORY_REGISTERS, action="decrease")

      def load(n, slot):
        g = lax.div(n, per_head)
        rows = pl.ds((cta_first + n - g * per_head) * bq, bq)
        q_head = kv_head * group + g
        plgpu.copy_gmem_to_smem(q_ref.at[batch, rows, q_head], q_smem.at[slot], q_ready.at[slot])
        plgpu.copy_gmem_to_smem(do_ref.at[batch, rows, q_head], do_smem.at[slot],
                                do_ready.at[slot])
        plgpu.copy_gmem_to_smem(lse_ref.at[batch, q_head, rows], lse_smem.at[slot],
                                lse_ready.at[slot])
        plgpu.copy_gmem_to_smem(delta_ref.at[batch, q_head, rows], delta_smem.at[slot],
                                delta_ready.at[slot])
        if segmented:
          plgpu.copy_gmem_to_smem(seg_ref.at[batch, rows], qseg_smem.at[slot], qseg_ready.at[slot])

      for n in range(stages):
        pl.when(n < total)(functools.partial(load, n, n))

      @pl.loop(stages, total)
      def _(n):
        slot = lax.rem(n, jnp.int32(stages))
        plgpu.barrier_wait(q_free.at[slot])
        load(n, slot)

  scratch = dict(
      k_smem2=plgpu.SMEM((COMPUTE_WGS, bk, d), dtype, transforms=TILED),  # k in, dk out
      v_smem2=plgpu.SMEM((COMPUTE_WGS, bk, d), dtype, transforms=TILED),  # v in, dv out
      q_smem=plgpu.SMEM((stages, bq, d), dtype, transforms=TILED),
      do_smem=plgpu.SMEM((stages, bq, d), dtype, transforms=TILED),
      lse_smem=plgpu.SMEM((stages, bq), jnp.float32),
      delta_smem=plgpu.SMEM((stages, bq), jnp.float32),
      k_ready=plgpu.Barrier(num_barriers=COMPUTE_WGS),
      v_ready=plgpu.Barrier(num_barriers=COMPUTE_WGS),
      **{name: plgpu.Barrier(num_barriers=stages)
         for name in ("q_ready", "do_ready", "lse_ready", "delta_ready")},
      q_free=plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),
  )
  inputs = (q, k, v, do, lse, delta)
  if segmented:
    scratch.update(kvseg_smem2=plgpu.SMEM((COMPUTE_WGS, bk), jnp.int32),
                   qseg_smem=plgpu.SMEM((stages, bq), jnp.int32),
                   kvseg_ready=plgpu.Barrier(num_barriers=COMPUTE_WGS),
                   qseg_ready=plgpu.Barrier(num_barriers=stages))
    inputs += (seg,)
  out_type = (jax.ShapeDtypeStruct(k.shape, dtype), jax.ShapeDtypeStruct(v.shape, dtype))
  return launch(kernel, *inputs, out_type=out_type, scratch=scratch,
                grid=(hkv, num_kv_tiles, b), grid_names=("heads", "kv_tile", "batch"))
