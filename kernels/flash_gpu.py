"""Flash attention for GPU in Pallas (Triton lowering): forward, dq and dk/dv kernels.

Public entry: `flash_attention(q, k, v, *, causal, segment_ids=None, scale=None, ...)` with
q [B, T, Hq, D], k/v [B, S, Hkv, D]; returns [B, T, Hq, D] in q's dtype, differentiable
through a `jax.custom_vjp` whose backward runs two Pallas kernels.

Arrays keep the [B, T, H, D] layout (a block is a strided [rows, D] tile of one head).
Triton needs power-of-two tiles, so T and S are padded to block multiples (padded keys are
masked, padded query rows sliced away) and D to a power of two >= 16 (zero columns change
no dot product).

 * forward: grid (T/bq, Hq, B); each program loops over kv blocks with an online softmax.
   K/V blocks come from kv head h // G through the index map (grouped-query attention
   without repeated K/V); causal programs stop at their last visible kv block (loop bound,
   not a mask), and only the diagonal blocks (and padded / segmented ones) build a mask.
 * dq:      grid (T/bq, Hq, B); holds a q tile, loops over (visible) kv blocks.
 * dk/dv:   grid (S/bk, Hkv, B); holds a kv tile, loops over the G query heads of its kv head
   and their q blocks (from the first visible one when causal), summing in registers. It
   works on transposed tiles (S^T = K Q^T, dV += P^T dO as P^T @ dO, dK += dS^T Q), so
   every matmul is a plain or B-transposed product and no register tile is transposed.
 * delta = rowsum(dO * O) is one fused XLA pass before the two kernels.

Speed choices: the q/kv block index is the fastest-varying grid axis, so the programs that
run together share one head's K/V (or Q/dO) in L2; causal q blocks run last-first (the
heaviest first, less tail). Softmax runs in base 2 (logits scaled by scale * log2(e), exp2,
log-sum-exp stored in base 2 for the backward), which saves the range reduction of exp.
Matmul operands stay in the input dtype (bf16 MMAs) with float32 accumulation; float32
inputs use the GPU's default dot precision (TF32 on Ampere/Hopper, ~1e-3 relative).

On CPU pass `interpret=True` (Pallas' generic interpreter runs the same kernels).

On Hopper GPUs `flash_attention` hands 16-bit inputs with head dim 64/128 and 128-multiple
lengths to the warp-specialised Mosaic GPU kernels (flash_mgpu.py, flash_mgpu_bwd.py), which
overlap softmax with the tensor cores where Triton's schedule cannot; `BlockSizes.forward` /
`.backward` override the choice per pass.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from . import flash_mgpu, flash_mgpu_bwd, masking, residuals
from .masking import MASK_VALUE
from .tiling import next_pow2, pad_axis, round_up

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_MIN_BLOCK = 16  # smallest tile Triton's dot accepts
_LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles (powers of two >= 16) and Triton launch settings per kernel.

  Forward: a program holds `block_q` query rows and steps over `block_kv` keys.
  dq: holds `block_q_dq` rows, steps over `block_kv_dq` keys.
  dk/dv: holds `block_kv_dkv` keys, steps over `block_q_dkv` query rows.
  `*_warps` / `*_stages` (Triton num_warps / software-pipelining depth): None picks by
  head dim (forward: 8 warps, 3 stages for head dim 128; backward: 4 warps, 2 stages).
  Defaults were tuned on an H100 for bf16 causal attention with head dim 128
  (`python benchmarks/attention.py --sweep`; results in benchmarks/RESULTS.md).

  `forward` / `backward`: which kernels run each pass. "auto": the warp-specialised Mosaic
  GPU kernels (flash_mgpu.py, flash_mgpu_bwd.py) on Hopper when they take the inputs (see
  their `unsupported_reason`), else the Triton ones here; "triton"; "mosaic" (an error when
  they cannot run). `mosaic` / `mosaic_bwd` hold those kernels' tiles. The two passes
  share the lse convention, so any pairing works.
  """
  block_q: int = 128
  block_kv: int = 64
  block_q_dq: int = 64
  block_kv_dq: int = 64
  block_q_dkv: int = 64
  block_kv_dkv: int = 64
  fwd_warps: int | None = None
  fwd_stages: int | None = None
  dq_warps: int | None = None
  dq_stages: int | None = None
  dkv_warps: int | None = None
  dkv_stages: int | None = None
  forward: str = "auto"
  backward: str = "auto"
  mosaic: flash_mgpu.MosaicBlocks = flash_mgpu.MosaicBlocks()
  mosaic_bwd: flash_mgpu_bwd.MosaicBwdBlocks = flash_mgpu_bwd.MosaicBwdBlocks()


@dataclasses.dataclass(frozen=True)
class _Cfg:
  causal: bool
  scale: float  # softmax scale (natural units)
  offset: int  # S - T (real lengths)
  kv_len: int  # real S
  kv_padded: bool
  group: int  # query heads per kv head
  segmented: bool
  blocks: BlockSizes  # already clipped to the (padded) sequence lengths
  interpret: bool
  mosaic_forward: bool  # forward by flash_mgpu (Hopper) instead of the kernel here
  mosaic_backward: bool  # backward by flash_mgpu_bwd (Hopper) instead of the kernels here

  @property
  def qk_scale(self) -> float:  # logits in base-2 units: exp(x * scale) = exp2(x * qk_scale)
    return self.scale * _LOG2E


def _logits2(cfg: _Cfg, a, b):
  """a @ b.T in float32, scaled to base-2 softmax units."""
  return lax.dot_general(a, b, _NT, preferred_element_type=jnp.float32) * cfg.qk_scale


def _mask(cfg: _Cfg, q_start, kv_start, bq, bk, q_seg, kv_seg, transposed=False):
  """Allowed pairs of a [bq, bk] tile ([bk, bq] when `transposed`), or None (all allowed)."""
  rows = q_start + jnp.arange(bq, dtype=jnp.int32)
  cols = kv_start + jnp.arange(bk, dtype=jnp.int32)
  if transposed:
    return masking.attend_mask(
        rows[None, :], cols[:, None], causal=cfg.causal, offset=cfg.offset,
        kv_len=cfg.kv_len, kv_padded=cfg.kv_padded,
        q_seg=None if q_seg is None else q_seg[None, :],
        kv_seg=None if kv_seg is None else kv_seg[:, None])
  return masking.attend_mask(
      rows[:, None], cols[None, :], causal=cfg.causal, offset=cfg.offset, kv_len=cfg.kv_len,
      kv_padded=cfg.kv_padded,
      q_seg=None if q_seg is None else q_seg[:, None],
      kv_seg=None if kv_seg is None else kv_seg[None, :])


def _kv_stop(cfg: _Cfg, q_block, bq, bk, num_kv_blocks):
  """One past the last kv block that q block `q_block` (of size bq) must visit. Blocks made
  only of padding (the kv padding can span several blocks of a small tile) are never visited."""
  real = min(num_kv_blocks, -(-cfg.kv_len // bk))
  if not cfg.causal:
    return real
  last_row = q_block * bq + (bq - 1) + cfg.offset
  # Rows that see nothing (last_row < 0) give stop == 0: the loop does not run.
  stop = jnp.where(last_row < 0, 0, masking.div_nonneg(jnp.maximum(last_row, 0), bk) + 1)
  return jnp.minimum(stop, real)


def _kv_full_stop(cfg: _Cfg, q_block, bq, bk, num_kv_blocks, stop):
  """kv blocks [0, result) need no mask for q block `q_block`: fully below the causal
  diagonal, no kv padding, no segments. The rest, up to `stop`, are masked."""
  if cfg.segmented:
    return 0
  full = stop
  if cfg.causal:  # kv block j is full iff (j + 1) * bk - 1 <= first row + offset
    first_row = q_block * bq + cfg.offset
    full = jnp.minimum(full, masking.div_nonneg(jnp.maximum(first_row + 1, 0), bk))
  if cfg.kv_padded:  # blocks [kv_len // bk, ...) hold padded keys
    full = jnp.minimum(full, cfg.kv_len // bk)
  return full


def _q_full_start(cfg: _Cfg, kv_block, bq, bk, num_q_blocks, num_kv_blocks, start):
  """For kv block `kv_block`, q blocks [start, result) need a mask and [result, end) not."""
  if cfg.segmented:
    return num_q_blocks
  full = start
  if cfg.causal:  # q block i is full iff i * bq + offset >= last key of the block
    last_key = (kv_block + 1) * bk - 1
    full = jnp.maximum(full, masking.div_nonneg(
        jnp.maximum(last_key - cfg.offset + bq - 1, 0), bq))
  if cfg.kv_padded:  # a block holding padded keys is masked for every q block
    padded = kv_block >= cfg.kv_len // bk
    full = lax.select(padded, jnp.int32(num_q_blocks), jnp.asarray(full, jnp.int32))
  return jnp.minimum(full, num_q_blocks)


def _q_start(cfg: _Cfg, kv_block, bq, bk):
  """First q block that can see kv block `kv_block` (causal), else 0."""
  if not cfg.causal:
    return 0
  return masking.div_nonneg(jnp.maximum(kv_block * bk - cfg.offset, 0), bq)


def _reversed_block(num_blocks: int):
  """This program's q block: the last one first (for causal, the heaviest programs first)."""
  return num_blocks - 1 - pl.program_id(0)


# ----------------------------------------------------------------------------- kernels


def _fwd_kernel(q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, o_ref, lse_ref, *, cfg: _Cfg,
                num_q_blocks: int):
  bq, bk = cfg.blocks.block_q, cfg.blocks.block_kv
  i = _reversed_block(num_q_blocks)
  q = q_ref[...]  # [bq, Dp]
  q_seg = None if qseg_ref is None else qseg_ref[...]

  def body(j, carry, masked):
    acc, m_prev, l_prev = carry
    start = pl.multiple_of(j * bk, bk)
    k = k_ref[pl.ds(start, bk), :]
    v = v_ref[pl.ds(start, bk), :]
    s = _logits2(cfg, q, k)  # [bq, bk] f32, base-2 units
    mask = None
    if masked:
      kv_seg = None if kvseg_ref is None else kvseg_ref[pl.ds(start, bk)]
      mask = _mask(cfg, i * bq, start, bq, bk, q_seg, kv_seg)
    if mask is not None:
      s = jnp.where(mask, s, MASK_VALUE)
    m_next = jnp.maximum(m_prev, s.max(axis=1))
    p = jnp.exp2(s - m_next[:, None])
    if mask is not None:
      p = jnp.where(mask, p, 0.0)  # rows with nothing allowed yet keep l == 0
    alpha = jnp.exp2(m_prev - m_next)
    pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return acc * alpha[:, None] + pv, m_next, alpha * l_prev + p.sum(axis=1)

  num_kv_blocks = k_ref.shape[0] // bk
  stop = _kv_stop(cfg, i, bq, bk, num_kv_blocks)
  full = _kv_full_stop(cfg, i, bq, bk, num_kv_blocks, stop)
  carry = (jnp.zeros(q.shape, jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
           jnp.zeros((bq,), jnp.float32))
  carry = lax.fori_loop(0, full, functools.partial(body, masked=False), carry)
  acc, m, l = lax.fori_loop(full, stop, functools.partial(body, masked=True), carry)
  o_ref[...] = (acc / jnp.where(l == 0.0, 1.0, l)[:, None]).astype(o_ref.dtype)
  if lse_ref is not None:
    # Base-2 log-sum-exp; +inf for rows that saw nothing: the backward's exp2(s - lse) is 0.
    lse_ref[...] = jnp.where(l > 0.0, m + jnp.log2(l), jnp.inf)


def _dq_kernel(q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, lse_ref, delta_ref, do_ref,
               dq_ref, *, cfg: _Cfg, num_q_blocks: int):
  bq, bk = cfg.blocks.block_q_dq, cfg.blocks.block_kv_dq
  i = _reversed_block(num_q_blocks)
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]  # [bq] f32
  q_seg = None if qseg_ref is None else qseg_ref[...]

  def body(j, dq, masked):
    start = pl.multiple_of(j * bk, bk)
    k = k_ref[pl.ds(start, bk), :]
    v = v_ref[pl.ds(start, bk), :]
    s = _logits2(cfg, q, k)
    if masked:
      kv_seg = None if kvseg_ref is None else kvseg_ref[pl.ds(start, bk)]
      mask = _mask(cfg, i * bq, start, bq, bk, q_seg, kv_seg)
      if mask is not None:
        s = jnp.where(mask, s, MASK_VALUE)
    # Masked logits are MASK_VALUE and lse is finite (or +inf), so p is exactly 0 there.
    p = jnp.exp2(s - lse[:, None])
    dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
    ds = p * (dp - delta[:, None])
    return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  num_kv_blocks = k_ref.shape[0] // bk
  stop = _kv_stop(cfg, i, bq, bk, num_kv_blocks)
  full = _kv_full_stop(cfg, i, bq, bk, num_kv_blocks, stop)
  dq = lax.fori_loop(0, full, functools.partial(body, masked=False),
                     jnp.zeros(q.shape, jnp.float32))
  dq = lax.fori_loop(full, stop, functools.partial(body, masked=True), dq)
  dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, lse_ref, delta_ref, do_ref,
                dk_ref, dv_ref, *, cfg: _Cfg, num_kv_blocks: int):
  # q_ref/do_ref: [Tp, G, Dp] (the G query heads of this kv head); lse/delta: [G, Tp].
  bq, bk = cfg.blocks.block_q_dkv, cfg.blocks.block_kv_dkv
  j = pl.program_id(0)
  k, v = k_ref[...], v_ref[...]  # [bk, Dp]
  kv_seg = None if kvseg_ref is None else kvseg_ref[...]
  num_q_blocks = q_ref.shape[0] // bq
  first = _q_start(cfg, j, bq, bk)

  def q_step(i, carry, g, masked):
    dk, dv = carry
    start = pl.multiple_of(i * bq, bq)
    q = q_ref[pl.ds(start, bq), g, :]
    do = do_ref[pl.ds(start, bq), g, :]
    lse = lse_ref[g, pl.ds(start, bq)]
    delta = delta_ref[g, pl.ds(start, bq)]
    st = _logits2(cfg, k, q)  # [bk, bq]: S^T
    if masked:
      q_seg = None if qseg_ref is None else qseg_ref[pl.ds(start, bq)]
      mask = _mask(cfg, start, j * bk, bq, bk, q_seg, kv_seg, transposed=True)
      if mask is not None:
        st = jnp.where(mask, st, MASK_VALUE)
    pt = jnp.exp2(st - lse[None, :])
    dv = dv + jnp.dot(pt.astype(do.dtype), do, preferred_element_type=jnp.float32)
    dpt = lax.dot_general(v, do, _NT, preferred_element_type=jnp.float32)  # (dO V^T)^T
    dst = pt * (dpt - delta[None, :])
    dk = dk + jnp.dot(dst.astype(q.dtype), q, preferred_element_type=jnp.float32)
    return dk, dv

  full = _q_full_start(cfg, j, bq, bk, num_q_blocks, num_kv_blocks, first)

  def head_step(g, carry):
    carry = lax.fori_loop(first, full, functools.partial(q_step, g=g, masked=True), carry)
    return lax.fori_loop(full, num_q_blocks, functools.partial(q_step, g=g, masked=False),
                         carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, cfg.group, head_step, (zeros, zeros))
  dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


# ------------------------------------------------------------------------- pallas calls


def _params(cfg: _Cfg, warps: int | None, stages: int | None, default_warps: int,
            default_stages: int):
  if cfg.interpret:
    return dict(interpret=True)
  return dict(compiler_params=plgpu.CompilerParams(
      num_warps=warps or default_warps, num_stages=stages or default_stages))


def _forward(q, k, v, seg, cfg: _Cfg, save_lse: bool):
  """q [B,Tp,Hq,Dp], k/v [B,Sp,Hkv,Dp] -> o (and base-2 lse [B,Hq,Tp] f32)."""
  if cfg.mosaic_forward:
    o, lse = flash_mgpu.flash_forward(q, k, v, causal=cfg.causal, scale=cfg.scale,
                                      segment_ids=seg, blocks=cfg.blocks.mosaic)
    return o, lse if save_lse else None
  b, tp, hq, d = q.shape
  sp = k.shape[1]
  bq, grp = cfg.blocks.block_q, cfg.group
  nq = tp // bq
  rev = lambda i: nq - 1 - i
  kv_head = lambda h: masking.div_nonneg(h, grp)
  in_specs = [
      pl.BlockSpec((None, bq, None, d), lambda i, h, b_: (b_, rev(i), h, 0)),
      pl.BlockSpec((None, sp, None, d), lambda i, h, b_: (b_, 0, kv_head(h), 0)),
      pl.BlockSpec((None, sp, None, d), lambda i, h, b_: (b_, 0, kv_head(h), 0)),
      None if seg is None else pl.BlockSpec((None, bq), lambda i, h, b_: (b_, rev(i))),
      None if seg is None else pl.BlockSpec((None, sp), lambda i, h, b_: (b_, 0)),
  ]
  out_specs = [pl.BlockSpec((None, bq, None, d), lambda i, h, b_: (b_, rev(i), h, 0)),
               pl.BlockSpec((None, None, bq), lambda i, h, b_: (b_, h, rev(i)))
               if save_lse else None]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
               jax.ShapeDtypeStruct((b, hq, tp), jnp.float32) if save_lse else None]
  blk = cfg.blocks
  o, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg, num_q_blocks=nq),
      grid=(nq, hq, b),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      name="flash_fwd_gpu",
      **_params(cfg, blk.fwd_warps, blk.fwd_stages,
                4 if d <= 64 or bq * blk.block_kv < 64 * 64 else 8, 3 if d <= 128 else 2),
  )(q, k, v, seg, seg)
  return o, lse


def _backward(q, k, v, seg, o, lse, do, cfg: _Cfg):
  b, tp, hq, d = q.shape
  sp, hkv = k.shape[1], k.shape[2]
  blk, grp = cfg.blocks, cfg.group
  # delta_i = sum_d o_id * do_id: the softmax-Jacobian term of dS; one fused XLA pass.
  delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))

  bq, nq = blk.block_q_dq, tp // blk.block_q_dq
  rev = lambda i: nq - 1 - i
  kv_head = lambda h: masking.div_nonneg(h, grp)
  q_rows = pl.BlockSpec((None, bq, None, d), lambda i, h, b_: (b_, rev(i), h, 0))
  kv_all = pl.BlockSpec((None, sp, None, d), lambda i, h, b_: (b_, 0, kv_head(h), 0))
  q_stats = pl.BlockSpec((None, None, bq), lambda i, h, b_: (b_, h, rev(i)))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg, num_q_blocks=nq),
      grid=(nq, hq, b),
      in_specs=[
          q_rows, kv_all, kv_all,
          None if seg is None else pl.BlockSpec((None, bq), lambda i, h, b_: (b_, rev(i))),
          None if seg is None else pl.BlockSpec((None, sp), lambda i, h, b_: (b_, 0)),
          q_stats, q_stats, q_rows,
      ],
      out_specs=q_rows,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      name="flash_dq_gpu",
      **_params(cfg, blk.dq_warps, blk.dq_stages, 4, 2),
  )(q, k, v, seg, seg, lse, delta, do)

  # The G query heads of kv head h are heads [h*G, (h+1)*G): one block of size G.
  bk, nk = blk.block_kv_dkv, sp // blk.block_kv_dkv
  group_rows = pl.BlockSpec((None, tp, grp, d), lambda j, h, b_: (b_, 0, h, 0))
  group_stats = pl.BlockSpec((None, grp, tp), lambda j, h, b_: (b_, h, 0))
  kv_block = pl.BlockSpec((None, bk, None, d), lambda j, h, b_: (b_, j, h, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg, num_kv_blocks=nk),
      grid=(nk, hkv, b),
      in_specs=[
          group_rows,
          kv_block,
          kv_block,
          None if seg is None else pl.BlockSpec((None, tp), lambda j, h, b_: (b_, 0)),
          None if seg is None else pl.BlockSpec((None, bk), lambda j, h, b_: (b_, j)),
          group_stats,
          group_stats,
          group_rows,
      ],
      out_specs=[kv_block, kv_block],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      name="flash_dkv_gpu",
      **_params(cfg, blk.dkv_warps, blk.dkv_stages, 4, 2),
  )(q, k, v, seg, seg, lse, delta, do)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, seg, cfg: _Cfg):
  return _forward(q, k, v, seg, cfg, save_lse=False)[0]


def _flash_fwd(q, k, v, seg, cfg: _Cfg):
  o, lse = residuals.name_residuals(*_forward(q, k, v, seg, cfg, save_lse=True))
  return o, (q, k, v, seg, o, lse)


def _flash_bwd(cfg: _Cfg, res, do):
  q, k, v, seg, o, lse = res
  if cfg.mosaic_backward:
    dq, dk, dv = flash_mgpu_bwd.flash_backward(q, k, v, o, lse, do, causal=cfg.causal,
                                               scale=cfg.scale, segment_ids=seg,
                                               blocks=cfg.blocks.mosaic_bwd)
  else:
    dq, dk, dv = _backward(q, k, v, seg, o, lse, do, cfg)
  return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _clip(block: int, length: int) -> int:
  if block < _MIN_BLOCK or block & (block - 1):
    raise ValueError(f"GPU flash attention block sizes must be powers of two >= {_MIN_BLOCK}; "
                     f"got {block}.")
  return min(block, max(next_pow2(length), _MIN_BLOCK))


_CHOICES = ("auto", "triton", "mosaic")


def _use_mosaic(which: str, q, k, causal, segment_ids, blocks: BlockSizes, interpret: bool,
                padded: bool) -> bool:
  """Whether pass `which` ("forward" / "backward") runs the Mosaic GPU kernels."""
  choice = getattr(blocks, which)
  if choice not in _CHOICES:
    raise ValueError(f"BlockSizes.{which} must be one of {_CHOICES}, got {choice!r}.")
  if choice == "triton":
    return False
  reason = flash_mgpu.unsupported_reason(q, k, causal=causal, segment_ids=segment_ids,
                                         blocks=blocks.mosaic)
  if reason is None and which == "backward":
    reason = flash_mgpu_bwd.unsupported_reason(q, k, blocks=blocks.mosaic_bwd)
  if reason is None and padded:
    reason = "lengths not multiples of the Triton kernels' tiles"
  if reason is None and interpret:
    reason = "interpret mode (the Mosaic GPU kernels run compiled only)"
  if reason is None and not flash_mgpu.is_hopper():
    reason = "the default device is not a compute capability 9.x GPU"
  if choice == "mosaic" and reason is not None:
    raise ValueError(f"BlockSizes.{which}='mosaic' cannot run these inputs: {reason}. "
                     f"Use {which}='auto' to fall back to the Triton kernels.")
  return reason is None


def flash_attention(q, k, v, *, causal: bool, segment_ids=None, scale=None,
                    block_sizes: BlockSizes | None = None, interpret: bool = False):
  """GPU flash attention. Inputs are assumed validated (see `unimm_jax.kernels.attention`).

  Args:
    q: [B, T, Hq, D]; k, v: [B, S, Hkv, D], Hq % Hkv == 0; float32, bfloat16 or float16.
    causal: bottom-right aligned causal mask.
    segment_ids: optional int32 [B, T] (S == T).
    scale: softmax scale, default 1/sqrt(D).
    block_sizes: tiles (powers of two >= 16), default `BlockSizes()`.
    interpret: run the kernels in Pallas' interpreter (CPU testing).
  Returns:
    [B, T, Hq, D] in q's dtype.
  """
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  req = block_sizes or BlockSizes()
  blocks = dataclasses.replace(
      req, block_q=_clip(req.block_q, t), block_kv=_clip(req.block_kv, s),
      block_q_dq=_clip(req.block_q_dq, t), block_kv_dq=_clip(req.block_kv_dq, s),
      block_q_dkv=_clip(req.block_q_dkv, t), block_kv_dkv=_clip(req.block_kv_dkv, s))
  # Pad to a multiple of every q (kv) tile: powers of two, so of the largest.
  tp = round_up(t, max(blocks.block_q, blocks.block_q_dq, blocks.block_q_dkv))
  sp = round_up(s, max(blocks.block_kv, blocks.block_kv_dq, blocks.block_kv_dkv))
  dp = max(next_pow2(d), _MIN_BLOCK)
  padded = (tp, sp, dp) != (t, s, d)
  mosaic_forward, mosaic_backward = (
      _use_mosaic(which, q, k, causal, segment_ids, req, interpret, padded)
      for which in ("forward", "backward"))
  cfg = _Cfg(causal=bool(causal), scale=float(1.0 / math.sqrt(d) if scale is None else scale),
             offset=s - t, kv_len=s, kv_padded=sp != s, group=hq // hkv,
             segmented=segment_ids is not None, blocks=blocks, interpret=bool(interpret),
             mosaic_forward=mosaic_forward, mosaic_backward=mosaic_backward)
  pad = lambda x, n: pad_axis(pad_axis(x, 1, n), 3, dp)
  seg = (None if segment_ids is None
         else pad_axis(segment_ids.astype(jnp.int32), 1, max(tp, sp), -1))
  o = _flash(pad(q, tp), pad(k, sp), pad(v, sp), seg, cfg)
  return o[:, :t, :, :d]
