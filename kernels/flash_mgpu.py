"""Flash attention forward for Hopper GPUs in Pallas Mosaic GPU (warp-specialised).

The Triton lowering (flash_gpu.py) issues each tile's QK^T, softmax and PV in order, so the
tensor cores idle while a program computes its softmax. On Hopper this kernel overlaps them
the way FlashAttention-3 does: each CTA runs three warpgroups,
  * two compute warpgroups, each holding `block_q` query rows (a CTA covers 2 * block_q),
  * one memory warpgroup that streams K/V tiles into a ring of `stages` shared-memory slots
    with the TMA engine (one barrier per slot says "filled", one with two arrivals "freed"),
and a schedule barrier the two compute warpgroups pass back and forth, so one issues its
wgmma (QK^T or PV, asynchronous) while the other runs its softmax: ping-pong.

Same contract as the Triton forward, so flash_gpu's backward kernels take its output:
q [B, T, Hq, D], k/v [B, S, Hkv, D] -> o [B, T, Hq, D] and the base-2 log-sum-exp of the
scaled logits, lse [B, Hq, T] float32. Grouped-query attention reads kv head h // G through
the TMA source slice (no repeated K/V). Causal masks are bottom-right aligned (key j visible
to query i iff j <= i + S - T); a causal warpgroup stops at its last visible kv tile and
masks only the tiles that cross the diagonal.

Packed sequences: with segment ids (S == T) every visited tile is masked by segment as well;
the causal bounds still skip the tiles above the diagonal.

What it takes (`unsupported_reason` says which condition failed; flash_gpu then keeps the
Triton forward): bfloat16 or float16, head dim 64 or 128, T a multiple of 2 * block_q,
S a multiple of block_kv, S >= T when causal, a compute capability 9.x GPU.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

LOG2E = math.log2(math.e)
COMPUTE_WGS = 2  # compute warpgroups per CTA; a third one feeds them
# Registers per thread: the compute warpgroups take what the memory one gives up
# (2 x 128 x 232 + 128 x 40 fits the 64K-register file of one Hopper SM).
COMPUTE_REGISTERS, MEMORY_REGISTERS = 232, 40
# Shared-memory tiles of [rows, head_dim] in the layout wgmma reads: 8 x 64 tiles, 128-byte
# swizzle (head_dim * 2 bytes >= 128, hence head dim >= 64).
TILED = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


@dataclasses.dataclass(frozen=True)
class MosaicBlocks:
  """block_q: query rows per compute warpgroup (multiple of 64; a CTA holds two);
  block_kv: keys per K/V tile (multiple of 64); stages: K/V tiles in flight (>= 2)."""
  block_q: int = 64
  block_kv: int = 128
  stages: int = 2


def is_hopper() -> bool:
  """True when the default device is a compute capability 9.x GPU (wgmma, TMA)."""
  dev = jax.devices()[0]
  return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9")


def unsupported_reason(q, k, *, causal: bool, segment_ids, blocks: MosaicBlocks) -> str | None:
  """Why this kernel cannot run these inputs, or None when it can (device not checked)."""
  _, t, _, d = q.shape
  s = k.shape[1]
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return f"dtype {q.dtype} (needs bfloat16 or float16)"
  if d not in (64, 128):
    return f"head dim {d} (needs 64 or 128)"
  if t % (COMPUTE_WGS * blocks.block_q):
    return f"q length {t} not a multiple of {COMPUTE_WGS * blocks.block_q}"
  if s % blocks.block_kv:
    return f"kv length {s} not a multiple of {blocks.block_kv}"
  if causal and s < t:
    return "causal with kv length < q length"
  return None


def wgmma_iota(shape, dim):
  """int32 iota along `dim` of a [rows, cols] tile, in the wgmma accumulator layout."""
  return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def same_segment(row_seg, col_seg, shape):
  """[rows, cols] bool: row and column in one segment (ids in the row / column layouts)."""
  return (lax.broadcast_in_dim(row_seg, shape, [0]) == lax.broadcast_in_dim(col_seg, shape, [1]))


def masked_logits(logits, *visible):
  """-inf where any given condition is False; conditions that are None do not apply."""
  conds = [c for c in visible if c is not None]
  if not conds:
    return logits
  allowed = conds[0]
  for c in conds[1:]:
    allowed = allowed & c
  return jnp.where(allowed, logits, -jnp.inf)


def launch(kernel, *inputs, out_type, scratch: dict, grid, grid_names):
  """Runs `kernel` with COMPUTE_WGS + 1 warpgroups per CTA (axis "wg"), scratch as kwargs."""
  return plgpu.kernel(
      kernel,
      out_type=out_type,
      scratch_types=scratch,
      grid=grid,
      grid_names=grid_names,
      num_threads=COMPUTE_WGS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),  # fast exp2 / division
  )(*inputs)


def stream_kv_tiles(k_ref, v_ref, seg_ref, *, batch, kv_head, block_kv: int, stages: int,
                    num_steps, k_smem, v_smem, kvseg_smem, k_ready, v_ready, kvseg_ready, free):
  """The memory warpgroup of the kernels that hold queries (forward, dq): TMA-copies K, V (and
  the keys' segment ids when seg_ref is given) tiles 0 .. num_steps - 1 into a ring of
  `stages` slots; a slot is refilled once every barrier in `free` says its last tile is used."""
  plgpu.set_max_registers(MEMORY_REGISTERS, action="decrease")

  def load(j, slot):
    keys = pl.ds(j * block_kv, block_kv)
    if seg_ref is not None:
      plgpu.copy_gmem_to_smem(seg_ref.at[batch, keys], kvseg_smem.at[slot], kvseg_ready.at[slot])
    plgpu.copy_gmem_to_smem(k_ref.at[batch, keys, kv_head], k_smem.at[slot], k_ready.at[slot])
    plgpu.copy_gmem_to_smem(v_ref.at[batch, keys, kv_head], v_smem.at[slot], v_ready.at[slot])

  for j in range(stages):  # in bounds (stages <= kv tiles); unused ones are harmless
    load(j, j)

  @pl.loop(stages, num_steps)
  def _(j):
    slot = lax.rem(j, jnp.int32(stages))
    for barrier in free:
      plgpu.barrier_wait(barrier.at[slot])
    load(j, slot)


def cdiv(x, n: int):
  return lax.div(x + (n - 1), jnp.int32(n))


@dataclasses.dataclass(frozen=True)
class QueryTiles:
  """The tiling of the kernels whose CTAs hold query rows (forward, dq): CTA i of axis
  "q_tile" holds COMPUTE_WGS * block_q rows, warpgroup w the block_q of them from `first_row`,
  and each visits kv tiles [0, steps) of block_kv keys, masking [unmasked, steps)."""
  causal: bool
  segmented: bool
  block_q: int
  block_kv: int
  num_q_tiles: int
  num_kv: int
  offset: int  # S - T

  @classmethod
  def of(cls, q, k, *, causal: bool, segmented: bool, block_q: int, block_kv: int):
    t, s = q.shape[1], k.shape[1]
    return cls(causal, segmented, block_q, block_kv, t // (COMPUTE_WGS * block_q),
               s // block_kv, s - t)

  def tile(self):
    """This CTA's q tile; causal ones run the last (heaviest) first, so short ones fill the tail."""
    tile = lax.axis_index("q_tile")
    return self.num_q_tiles - 1 - tile if self.causal else tile

  def first_row(self, tile, wg):
    return tile * (COMPUTE_WGS * self.block_q) + wg * self.block_q

  def steps(self, first_row):
    """kv tiles the warpgroup from `first_row` visits: up to its last visible one (causal)."""
    if not self.causal:
      return self.num_kv
    return jnp.minimum(cdiv(first_row + self.block_q + self.offset, self.block_kv), self.num_kv)

  def cta_steps(self, tile):
    """kv tiles the CTA streams: those of its last warpgroup."""
    return self.steps(self.first_row(tile, COMPUTE_WGS - 1))

  def segment_scratch(self, stages: int) -> dict:
    """Shared memory and barriers for segment ids: each warpgroup's rows' (seg_smem2,
    seg_ready) and the streamed kv tiles' (kvseg_smem, kvseg_ready, `stages` slots)."""
    return dict(seg_smem2=plgpu.SMEM((COMPUTE_WGS, self.block_q), jnp.int32),
                kvseg_smem=plgpu.SMEM((stages, self.block_kv), jnp.int32),
                seg_ready=plgpu.Barrier(num_barriers=COMPUTE_WGS),
                kvseg_ready=plgpu.Barrier(num_barriers=stages))

  def unmasked(self, first_row, steps):
    """kv tiles [0, result) need no mask: fully left of the causal diagonal (with segments,
    any tile can hide keys, so none)."""
    if self.segmented:
      return 0
    if not self.causal:
      return self.num_kv
    return jnp.clip(lax.div(first_row + self.offset + 1, jnp.int32(self.block_kv)), 0, steps)


def flash_forward(q, k, v, *, causal: bool, scale: float, segment_ids=None,
                  blocks: MosaicBlocks = MosaicBlocks()):
  """o [B, T, Hq, D] (q's dtype) and lse [B, Hq, T] (float32, base 2); segment_ids: optional
  int32 [B, T] (S == T), keys of other segments masked. Inputs must pass
  `unsupported_reason`. Compiled only: jax 0.10's Mosaic GPU interpreter has no run_state,
  layout casts or transposed wgmma operands, so this kernel is checked on a Hopper GPU."""
  b, t, hq, d = q.shape
  group = hq // k.shape[2]
  bq, bk = blocks.block_q, blocks.block_kv
  segmented = segment_ids is not None
  tiles = QueryTiles.of(q, k, causal=causal, segmented=segmented, block_q=bq, block_kv=bk)
  stages = min(blocks.stages, tiles.num_kv)
  offset = tiles.offset
  qk_scale = scale * LOG2E
  dtype = q.dtype

  def kernel(*refs, q_smem2, k_smem, v_smem, lse_smem2, k_ready, v_ready, q_ready, k_free,
             v_free, turn, seg_smem2=None, kvseg_smem=None, seg_ready=None, kvseg_ready=None):
    q_ref, k_ref, v_ref, *seg_ref, o_ref, lse_ref = refs
    seg_ref = seg_ref[0] if segmented else None
    batch, head = lax.axis_index("batch"), lax.axis_index("heads")
    tile, wg = tiles.tile(), lax.axis_index("wg")
    cta_steps = tiles.cta_steps(tile)

    def pass_turn():
      plgpu.barrier_arrive(turn)
      plgpu.barrier_wait(turn)

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
      plgpu.set_max_registers(COMPUTE_REGISTERS, action="increase")
      q_smem = q_smem2.at[wg]
      first_row = tiles.first_row(tile, wg)
      rows = pl.ds(first_row, bq)
      plgpu.copy_gmem_to_smem(q_ref.at[batch, rows, head], q_smem, q_ready.at[wg])
      if segmented:
        plgpu.copy_gmem_to_smem(seg_ref.at[batch, rows], seg_smem2.at[wg], seg_ready.at[wg])
        plgpu.barrier_wait(seg_ready.at[wg])
        row_seg = plgpu.load(seg_smem2.at[wg], (), layout=plgpu.Layout.WGMMA.reduce(1))
      plgpu.barrier_wait(q_ready.at[wg])
      steps = tiles.steps(first_row)
      unmasked = tiles.unmasked(first_row, steps)

      m = plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
      l = plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
      acc = plgpu.layout_cast(jnp.zeros((bq, d), jnp.float32), plgpu.Layout.WGMMA)

      @pl.when(steps > 0)
      def _():
        plgpu.barrier_wait(k_ready.at[0])

      # Warpgroup 1 starts one turn behind, so the two alternate on the tensor cores.
      pl.when(wg == 1)(pass_turn)

      def step(j, carry, masked: bool):
        acc, m, l = carry
        slot = lax.rem(j, jnp.int32(stages))
        if segmented:  # into registers before the slot can be freed
          plgpu.barrier_wait(kvseg_ready.at[slot])
          col_seg = plgpu.load(kvseg_smem.at[slot], (), layout=plgpu.Layout.WGMMA.reduce(0))

        def qk(acc_ref):
          plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
          pass_turn()  # the other warpgroup issues its matmul while ours runs
          return acc_ref[...]

        logits = pl.run_scoped(qk, plgpu.ACC((bq, bk), jnp.float32))
        plgpu.barrier_arrive(k_free.at[slot])
        logits = logits * qk_scale  # base-2 units
        if masked:
          shape = (bq, bk)
          logits = masked_logits(
              logits,
              wgmma_iota(shape, 1) + j * bk <= wgmma_iota(shape, 0) + first_row + offset
              if causal else None,
              same_segment(row_seg, col_seg, shape) if segmented else None)
        m_new = jnp.maximum(m, logits.max(axis=1))
        # Without segments every row sees key 0 in tile 0 (S >= T), so m is finite from the
        # first step; with them a row can see nothing in its first tiles: exponentiate
        # against 0 then, so p and alpha are 0 rather than exp2(-inf + inf) = NaN.
        m_ref = jnp.where(m_new == -jnp.inf, 0.0, m_new) if segmented else m_new
        alpha = jnp.exp2(m - m_ref)
        p = jnp.exp2(logits - lax.broadcast_in_dim(m_ref, logits.shape, [0]))
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        l = l * alpha + p.sum(axis=1)
        p = p.astype(dtype)
        acc, l, m_new, p = lax.optimization_barrier((acc, l, m_new, p))
        plgpu.barrier_arrive(turn)  # softmax done: the other warpgroup may issue
        plgpu.barrier_wait(v_ready.at[slot])
        plgpu.barrier_wait(turn)  # and the tensor cores are ours again

        def pv(acc_ref):
          plgpu.wgmma(acc_ref, p, v_smem.at[slot])
          nxt = j + 1

          @pl.when(nxt < steps)
          def _():
            plgpu.barrier_wait(k_ready.at[lax.rem(nxt, jnp.int32(stages))])

        acc = pl.run_state(pv)(plgpu.ACC.init(acc))
        plgpu.barrier_arrive(v_free.at[slot])
        return acc, m_new, l

      carry = (acc, m, l)
      carry = lax.fori_loop(0, unmasked, functools.partial(step, masked=False), carry)
      acc, m, l = lax.fori_loop(unmasked, steps, functools.partial(step, masked=True), carry)
      if causal:
        # Warpgroup 0 stops before the CTA's last tiles: free their slots and keep the turn
        # count in step with warpgroup 1 (two turns per tile).
        @pl.loop(steps, cta_steps)
        def _(j):
          slot = lax.rem(j, jnp.int32(stages))
          plgpu.barrier_arrive(k_free.at[slot])
          plgpu.barrier_arrive(v_free.at[slot])
          pass_turn()
          pass_turn()
      pl.when(wg == 0)(pass_turn)

      o = acc / lax.broadcast_in_dim(l, acc.shape, [0])
      q_smem[...] = o.astype(dtype)
      lse_smem = lse_smem2.at[wg]
      lse_smem[...] = m + jnp.log2(l)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem, o_ref.at[batch, rows, head])
      plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[batch, head, rows])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _memory():
      stream_kv_tiles(k_ref, v_ref, seg_ref, batch=batch, kv_head=lax.div(head, jnp.int32(group)),
                      block_kv=bk, stages=stages, num_steps=cta_steps, k_smem=k_smem,
                      v_smem=v_smem, kvseg_smem=kvseg_smem, k_ready=k_ready, v_ready=v_ready,
                      kvseg_ready=kvseg_ready, free=(k_free, v_free))

  scratch = dict(
      q_smem2=plgpu.SMEM((COMPUTE_WGS, bq, d), dtype, transforms=TILED),  # q in, o out
      k_smem=plgpu.SMEM((stages, bk, d), dtype, transforms=TILED),
      v_smem=plgpu.SMEM((stages, bk, d), dtype, transforms=TILED),
      lse_smem2=plgpu.SMEM((COMPUTE_WGS, bq), jnp.float32),
      k_ready=plgpu.Barrier(num_barriers=stages),
      v_ready=plgpu.Barrier(num_barriers=stages),
      q_ready=plgpu.Barrier(num_barriers=COMPUTE_WGS),
      k_free=plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),
      v_free=plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),
      turn=plgpu.Barrier(num_arrivals=COMPUTE_WGS),
  )
  inputs = (q, k, v)
  if segmented:
    scratch.update(tiles.segment_scratch(stages))
    inputs += (segment_ids.astype(jnp.int32),)
  out_type = (jax.ShapeDtypeStruct(q.shape, dtype), jax.ShapeDtypeStruct((b, hq, t), jnp.float32))
  return launch(kernel, *inputs, out_type=out_type, scratch=scratch,
                grid=(hq, tiles.num_q_tiles, b), grid_names=("heads", "q_tile", "batch"))
