"""Flash attention for TPU in Pallas (Mosaic): forward, dq and dk/dv kernels.

Public entry: `flash_attention(q, k, v, *, causal, segment_ids=None, scale=None, ...)` with
q [B, T, Hq, D], k/v [B, S, Hkv, D]; returns [B, T, Hq, D] in q's dtype, differentiable
through a `jax.custom_vjp` whose backward runs two Pallas kernels.

Inside, arrays are laid out [B, H, T, D] so a block's last two dims are (sequence, head
dim), the (sublane, lane) tile of a TPU vector register. T and S are padded up to block
multiples (padded keys are masked, padded query rows are sliced away).

 * forward: grid (B, Hq, T/bq, S/bk); the kv axis is sequential ("arbitrary") and carries
   the online-softmax state (row max m, row sum l, f32 accumulator) in VMEM scratch.
 * dq:      same grid; accumulates dS @ K over the kv axis.
 * dk/dv:   grid (B, Hkv, S/bk, G, T/bq) with G = Hq/Hkv; the last two axes are sequential
   and sum over the G query heads that share a kv head, so grouped-query attention never
   materialises repeated K/V (nor per-query-head dK/dV).
Causal attention skips blocks above the diagonal: `pl.when` skips the compute, and index
maps repeat the previous block index so the pipeline skips the copy too.

On CPU pass `interpret=True` (Pallas' interpreter runs the same kernels), or
`interpret=pltpu.InterpretParams()` for the stricter TPU interpreter.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from . import masking, residuals
from .masking import MASK_VALUE
from .tiling import pad_axis, round_up

LANES = 128  # TPU vector lane count: per-row statistics are stored lane-replicated.
SUBLANES = 8
_NT = (((1,), (1,)), ((), ()))  # dot_general dims for a @ b.T


@dataclasses.dataclass(frozen=True)
class _Cfg:
  """Static facts every kernel needs (hashable: it keys jit/custom_vjp caches)."""
  causal: bool
  scale: float
  offset: int  # S - T (real lengths): causal diagonal shift
  kv_len: int  # real S; keys at or past it are padding
  kv_padded: bool
  block_q: int
  block_kv: int
  num_q_blocks: int
  num_kv_blocks: int
  group: int  # query heads per kv head
  segmented: bool
  interpret: bool | pltpu.InterpretParams


def _pick_block(requested: int, length: int, dtype) -> int:
  """The request, or the whole sequence if shorter, rounded up to the sublane tile
  (8 rows of 32-bit values; 16 for bfloat16, which packs two rows per sublane)."""
  return min(requested, round_up(length, SUBLANES * 4 // jnp.dtype(dtype).itemsize))


def _lanes(x, n):
  """[rows, 128] lane-replicated values -> [rows, n]."""
  if n == LANES:
    return x
  if n < LANES:
    return x[:, :n]
  return jnp.tile(x, (1, n // LANES))


def _mask(cfg: _Cfg, q_block, kv_block, qseg_ref, kvseg_ref):
  """Allowed-pairs mask [bq, bk] for one (q block, kv block) tile, or None."""
  shape = (cfg.block_q, cfg.block_kv)
  rows = q_block * cfg.block_q + lax.broadcasted_iota(jnp.int32, shape, 0)
  cols = kv_block * cfg.block_kv + lax.broadcasted_iota(jnp.int32, shape, 1)
  q_seg = kv_seg = None
  if cfg.segmented:
    q_seg = _lanes(qseg_ref[...], cfg.block_kv)  # [bq, bk]
    kv_seg = kvseg_ref[:1, :]  # [1, bk]
  return masking.attend_mask(rows, cols, causal=cfg.causal, offset=cfg.offset,
                             kv_len=cfg.kv_len, kv_padded=cfg.kv_padded,
                             q_seg=q_seg, kv_seg=kv_seg)


def _visible(cfg: _Cfg, q_block, kv_block):
  if not cfg.causal:
    return True
  return masking.kv_block_visible(q_block, kv_block, block_q=cfg.block_q,
                                  block_kv=cfg.block_kv, offset=cfg.offset)


def _full_tile(cfg: _Cfg, q_block, kv_block):
  """Whether every pair of the tile is allowed (so it needs no mask): a traced bool, or
  a Python bool when the answer is static."""
  if cfg.segmented:
    return False  # segment boundaries may cut any tile
  full = True
  if cfg.causal:
    full = masking.kv_block_full(q_block, kv_block, block_q=cfg.block_q,
                                 block_kv=cfg.block_kv, offset=cfg.offset)
  if cfg.kv_padded:
    full = jnp.logical_and(full, kv_block < cfg.num_kv_blocks - 1)
  return full


def _for_tiles(cfg: _Cfg, q_block, kv_block, step):
  """Runs step(masked) on a visible tile, with masked=False on tiles that need no mask
  (below the causal diagonal, away from padding: most tiles of a long sequence)."""
  full = _full_tile(cfg, q_block, kv_block)
  if full is True:
    step(False)
    return
  visible = _visible(cfg, q_block, kv_block)
  if full is False:
    pl.when(visible)(lambda: step(True))
    return
  pl.when(full)(lambda: step(False))
  pl.when(jnp.logical_and(visible, jnp.logical_not(full)))(lambda: step(True))


def _logits(cfg: _Cfg, q, k):
  return lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * cfg.scale


# ----------------------------------------------------------------------------- kernels


def _fwd_kernel(q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, o_ref, lse_ref,
                m_scr, l_scr, acc_scr, *, cfg: _Cfg):
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  def step(masked):
    s = _logits(cfg, q_ref[...], k_ref[...])  # [bq, bk] f32
    mask = _mask(cfg, i, j, qseg_ref, kvseg_ref) if masked else None
    if mask is not None:
      s = jnp.where(mask, s, MASK_VALUE)
    m_prev, l_prev = m_scr[:, :1], l_scr[:, :1]  # [bq, 1]
    m_next = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
    p = jnp.exp(s - m_next)
    if mask is not None:
      # A row with no allowed key yet has m_next == MASK_VALUE and exp(0) == 1 on masked
      # entries: zero them so such rows keep l == 0 and end as 0.
      p = jnp.where(mask, p, 0.0)
    alpha = jnp.exp(m_prev - m_next)
    l_scr[...] = jnp.broadcast_to(alpha * l_prev + p.sum(axis=1, keepdims=True), l_scr.shape)
    m_scr[...] = jnp.broadcast_to(m_next, m_scr.shape)
    v = v_ref[...]
    pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    acc_scr[...] = acc_scr[...] * alpha + pv

  _for_tiles(cfg, i, j, step)

  @pl.when(j == cfg.num_kv_blocks - 1)
  def _finish():
    l = l_scr[:, :1]
    o_ref[...] = (acc_scr[...] / jnp.where(l == 0.0, 1.0, l)).astype(o_ref.dtype)
    if lse_ref is not None:
      # +inf for rows that saw nothing: the backward's exp(s - lse) is then exactly 0.
      lse = jnp.where(l > 0.0, m_scr[:, :1] + jnp.log(l), jnp.inf)
      lse_ref[...] = jnp.broadcast_to(lse, lse_ref.shape)


def _dq_kernel(q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, lse_ref, delta_ref, do_ref,
               dq_ref, dq_scr, *, cfg: _Cfg):
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

  def step(masked):
    k, v = k_ref[...], v_ref[...]
    s = _logits(cfg, q_ref[...], k)
    mask = _mask(cfg, i, j, qseg_ref, kvseg_ref) if masked else None
    if mask is not None:
      s = jnp.where(mask, s, MASK_VALUE)
    # Masked logits are MASK_VALUE and lse is finite (or +inf), so p is exactly 0 there.
    p = jnp.exp(s - _lanes(lse_ref[...], cfg.block_kv))
    dp = lax.dot_general(do_ref[...], v, _NT, preferred_element_type=jnp.float32)
    ds = p * (dp - _lanes(delta_ref[...], cfg.block_kv))
    dq_scr[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  _for_tiles(cfg, i, j, step)

  @pl.when(j == cfg.num_kv_blocks - 1)
  def _finish():
    dq_ref[...] = (dq_scr[...] * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, lse_ref, delta_ref, do_ref,
                dk_ref, dv_ref, dk_scr, dv_scr, *, cfg: _Cfg):
  j, g, i = pl.program_id(2), pl.program_id(3), pl.program_id(4)

  @pl.when((g == 0) & (i == 0))
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  def step(masked):
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    s = _logits(cfg, q, k)  # [bq, bk]
    mask = _mask(cfg, i, j, qseg_ref, kvseg_ref) if masked else None
    if mask is not None:
      s = jnp.where(mask, s, MASK_VALUE)
    p = jnp.exp(s - _lanes(lse_ref[...], cfg.block_kv))
    dv_scr[...] += jnp.dot(p.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
    dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
    ds = p * (dp - _lanes(delta_ref[...], cfg.block_kv))
    dk_scr[...] += jnp.dot(ds.T.astype(q.dtype), q, preferred_element_type=jnp.float32)

  _for_tiles(cfg, i, j, step)

  @pl.when((g == cfg.group - 1) & (i == cfg.num_q_blocks - 1))
  def _finish():
    dk_ref[...] = (dk_scr[...] * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


# ------------------------------------------------------------------------- pallas calls


def _kv_index(cfg: _Cfg, i, j):
  """kv block to load at grid step (q block i, kv step j): clamped on skipped steps."""
  if not cfg.causal:
    return j
  return jnp.minimum(j, masking.last_kv_block(i, block_q=cfg.block_q, block_kv=cfg.block_kv,
                                               offset=cfg.offset,
                                               num_kv_blocks=cfg.num_kv_blocks))


def _q_index(cfg: _Cfg, j, i):
  """q block to load at dk/dv grid step (kv block j, q step i): clamped on skipped steps."""
  if not cfg.causal:
    return i
  return jnp.maximum(i, masking.first_q_block(j, block_q=cfg.block_q, block_kv=cfg.block_kv,
                                              offset=cfg.offset,
                                              num_q_blocks=cfg.num_q_blocks))


def _params(cfg: _Cfg, semantics):
  if cfg.interpret is True:
    return dict(interpret=True)  # generic interpreter: the fastest on CPU
  if cfg.interpret:
    # pltpu.InterpretParams: the TPU interpreter, which models VMEM and DMAs, fills
    # uninitialised memory with NaN and raises on out-of-bounds reads (slower).
    return dict(interpret=cfg.interpret)
  return dict(compiler_params=pltpu.CompilerParams(dimension_semantics=semantics))


def _seg_inputs(seg):
  """Segment ids lane/sublane-replicated so blocks are whole (8, 128) tiles on TPU."""
  if seg is None:
    return None, None
  b, t = seg.shape
  q_seg = lax.broadcast_in_dim(seg, (b, t, LANES), (0, 1))
  kv_seg = lax.broadcast_in_dim(seg, (b, SUBLANES, t), (0, 2))
  return q_seg, kv_seg


def _forward(q, k, v, seg, cfg: _Cfg, save_lse: bool):
  """q [B,Hq,Tp,D], k/v [B,Hkv,Sp,D] -> o [B,Hq,Tp,D] (and lse [B,Hq,Tp] f32)."""
  b, hq, tp, d = q.shape
  bq, bk, grp = cfg.block_q, cfg.block_kv, cfg.group
  q_seg, kv_seg = _seg_inputs(seg)
  kv_spec = pl.BlockSpec((None, None, bk, d),
                         lambda b_, h, i, j: (b_, masking.div_nonneg(h, grp), _kv_index(cfg, i, j), 0))
  in_specs = [
      pl.BlockSpec((None, None, bq, d), lambda b_, h, i, j: (b_, h, i, 0)),
      kv_spec,
      kv_spec,
      None if seg is None else pl.BlockSpec((None, bq, LANES), lambda b_, h, i, j: (b_, i, 0)),
      None if seg is None else pl.BlockSpec(
          (None, SUBLANES, bk), lambda b_, h, i, j: (b_, 0, _kv_index(cfg, i, j))),
  ]
  row_spec = pl.BlockSpec((None, None, bq, d), lambda b_, h, i, j: (b_, h, i, 0))
  lse_spec = pl.BlockSpec((None, None, bq, LANES), lambda b_, h, i, j: (b_, h, i, 0))
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
               jax.ShapeDtypeStruct((b, hq, tp, LANES), jnp.float32) if save_lse else None]
  out_specs = [row_spec, lse_spec if save_lse else None]
  o, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg),
      grid=(b, hq, cfg.num_q_blocks, cfg.num_kv_blocks),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32),
                      pltpu.VMEM((bq, LANES), jnp.float32),
                      pltpu.VMEM((bq, d), jnp.float32)],
      name="flash_fwd_tpu",
      **_params(cfg, ("parallel", "parallel", "parallel", "arbitrary")),
  )(q, k, v, q_seg, kv_seg)
  return o, (None if lse is None else lse[..., 0])


def _backward(q, k, v, seg, o, lse, do, cfg: _Cfg):
  """Residuals in kernel layout -> (dq, dk, dv) in kernel layout."""
  b, hq, tp, d = q.shape
  hkv, sp = k.shape[1], k.shape[2]
  bq, bk, grp = cfg.block_q, cfg.block_kv, cfg.group
  q_seg, kv_seg = _seg_inputs(seg)
  # delta_i = sum_d o_id * do_id: the softmax-Jacobian term of dS; cheap, so plain XLA.
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
  lse_l = jnp.broadcast_to(lse[..., None], (b, hq, tp, LANES))
  delta_l = jnp.broadcast_to(delta[..., None], (b, hq, tp, LANES))

  # dq: grid (B, Hq, Tq blocks, kv blocks), kv axis sequential.
  row = lambda b_, h, i, j: (b_, h, i, 0)
  kv = lambda b_, h, i, j: (b_, masking.div_nonneg(h, grp), _kv_index(cfg, i, j), 0)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg),
      grid=(b, hq, cfg.num_q_blocks, cfg.num_kv_blocks),
      in_specs=[
          pl.BlockSpec((None, None, bq, d), row),
          pl.BlockSpec((None, None, bk, d), kv),
          pl.BlockSpec((None, None, bk, d), kv),
          None if seg is None else pl.BlockSpec((None, bq, LANES),
                                                lambda b_, h, i, j: (b_, i, 0)),
          None if seg is None else pl.BlockSpec(
              (None, SUBLANES, bk), lambda b_, h, i, j: (b_, 0, _kv_index(cfg, i, j))),
          pl.BlockSpec((None, None, bq, LANES), row),
          pl.BlockSpec((None, None, bq, LANES), row),
          pl.BlockSpec((None, None, bq, d), row),
      ],
      out_specs=pl.BlockSpec((None, None, bq, d), row),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
      name="flash_dq_tpu",
      **_params(cfg, ("parallel", "parallel", "parallel", "arbitrary")),
  )(q, k, v, q_seg, kv_seg, lse_l, delta_l, do)

  # dk/dv: grid (B, Hkv, kv blocks, G, q blocks); (G, q) axes sequential, summed in VMEM.
  qrow = lambda b_, h, j, g, i: (b_, h * grp + g, _q_index(cfg, j, i), 0)
  kvb = lambda b_, h, j, g, i: (b_, h, j, 0)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg),
      grid=(b, hkv, cfg.num_kv_blocks, grp, cfg.num_q_blocks),
      in_specs=[
          pl.BlockSpec((None, None, bq, d), qrow),
          pl.BlockSpec((None, None, bk, d), kvb),
          pl.BlockSpec((None, None, bk, d), kvb),
          None if seg is None else pl.BlockSpec(
              (None, bq, LANES), lambda b_, h, j, g, i: (b_, _q_index(cfg, j, i), 0)),
          None if seg is None else pl.BlockSpec(
              (None, SUBLANES, bk), lambda b_, h, j, g, i: (b_, 0, j)),
          pl.BlockSpec((None, None, bq, LANES), qrow),
          pl.BlockSpec((None, None, bq, LANES), qrow),
          pl.BlockSpec((None, None, bq, d), qrow),
      ],
      out_specs=[pl.BlockSpec((None, None, bk, d), kvb),
                 pl.BlockSpec((None, None, bk, d), kvb)],
      out_shape=[jax.ShapeDtypeStruct((b, hkv, sp, d), k.dtype),
                 jax.ShapeDtypeStruct((b, hkv, sp, d), v.dtype)],
      scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
      name="flash_dkv_tpu",
      **_params(cfg, ("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
  )(q, k, v, q_seg, kv_seg, lse_l, delta_l, do)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, seg, cfg: _Cfg):
  return _forward(q, k, v, seg, cfg, save_lse=False)[0]


def _flash_fwd(q, k, v, seg, cfg: _Cfg):
  o, lse = residuals.name_residuals(*_forward(q, k, v, seg, cfg, save_lse=True))
  return o, (q, k, v, seg, o, lse)


def _flash_bwd(cfg: _Cfg, res, do):
  q, k, v, seg, o, lse = res
  dq, dk, dv = _backward(q, k, v, seg, o, lse, do, cfg)
  return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q, k, v, *, causal: bool, segment_ids=None, scale=None,
                    block_q: int = 128, block_kv: int = 128,
                    interpret: bool | pltpu.InterpretParams = False):
  """TPU flash attention. Inputs are assumed validated (see `unimm_jax.kernels.attention`).

  Args:
    q: [B, T, Hq, D]; k, v: [B, S, Hkv, D], Hq % Hkv == 0; float32 or bfloat16.
    causal: bottom-right aligned causal mask.
    segment_ids: optional int32 [B, T] (S == T).
    scale: softmax scale, default 1/sqrt(D).
    block_q, block_kv: tile sizes (multiples of 8; block_kv <= 128 or a multiple of 128,
      and on real TPUs a multiple of 128 unless it covers the whole padded sequence).
    interpret: True runs the kernels in Pallas' generic interpreter (CPU testing); a
      `pltpu.InterpretParams()` runs them in the stricter, slower TPU interpreter.
  Returns:
    [B, T, Hq, D] in q's dtype.
  """
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  bq, bk = _pick_block(block_q, t, q.dtype), _pick_block(block_kv, s, q.dtype)
  if bq % SUBLANES or bk % SUBLANES or (bk > LANES and bk % LANES):
    raise ValueError(f"TPU flash attention: block_q={block_q}, block_kv={block_kv} must be "
                     f"multiples of {SUBLANES}, and block_kv <= {LANES} or a multiple of "
                     f"{LANES}. Pick e.g. block_q=block_kv=128.")
  tp, sp = round_up(t, bq), round_up(s, bk)
  if not interpret and segment_ids is not None and bk % LANES and bk != sp:
    raise ValueError(f"TPU flash attention with segment_ids needs block_kv a multiple of "
                     f"{LANES} on TPU hardware (got {bk}). Use block_kv=128.")
  cfg = _Cfg(causal=bool(causal), scale=float(1.0 / math.sqrt(d) if scale is None else scale),
             offset=s - t, kv_len=s, kv_padded=sp != s, block_q=bq, block_kv=bk,
             num_q_blocks=tp // bq, num_kv_blocks=sp // bk, group=hq // hkv,
             segmented=segment_ids is not None,
             interpret=interpret if isinstance(interpret, pltpu.InterpretParams)
             else bool(interpret))
  # [B, T, H, D] -> [B, H, T, D], padded to block multiples; autodiff undoes both.
  qt = pad_axis(jnp.swapaxes(q, 1, 2), 2, tp)
  kt = pad_axis(jnp.swapaxes(k, 1, 2), 2, sp)
  vt = pad_axis(jnp.swapaxes(v, 1, 2), 2, sp)
  # One padded copy serves as q ids (read up to tp) and kv ids (read up to sp).
  seg = (None if segment_ids is None
         else pad_axis(segment_ids.astype(jnp.int32), 1, max(tp, sp), -1))
  o = _flash(qt, kt, vt, seg, cfg)
  return jnp.swapaxes(o[:, :, :t], 1, 2)
