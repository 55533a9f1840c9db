"""Attention kernel throughput: our Pallas kernel against jax.nn.dot_product_attention.

    python benchmarks/attention.py [--seqs 4096 8192] [--heads 16] [--kv-heads 16]
                                   [--head-dim 128] [--tokens 16384] [--iters 10]

On a GPU: `pallas_gpu` (on Hopper: the Mosaic GPU kernels) and `triton` (our Triton kernels
alone) vs jax.nn.dot_product_attention(implementation="xla" and "cudnn").
On a TPU: `pallas_tpu` vs implementation="xla". bfloat16, causal, forward and
forward+backward; batch = tokens // seq. Prints TFLOP/s and side-by-side ratios.

FLOP counting: forward = 4 * B * Hq * T * S * D (QK^T and PV) halved for causal (the
masked half is not counted, as MaxText does since PR #1988); forward+backward = 3.5x the
forward (the backward's five matmuls: QK^T recompute, dV, dP, dQ, dK = 2.5x). Rates for
kernels that skip masked blocks and for XLA (which computes them) are thus comparable
as useful work per second.

Without an accelerator it says so and runs a tiny correctness check in interpret mode.

`--sweep` (GPU): times `pallas_gpu` over the tile / num_warps / num_stages variants in
FWD_VARIANTS and BWD_VARIANTS (forward alone, and forward+backward with the default forward),
to pick BlockSizes defaults; `--mosaic-sweep` (GPU): the same for the Mosaic GPU kernels
(MOSAIC_VARIANTS, MOSAIC_BWD_VARIANTS). `--check` (GPU): compiled-kernel errors against the
float32 reference (CHECK_CASES), with the Triton kernels and, where they apply, the Mosaic ones.
Timing: the median of 5 rounds of `--iters` back-to-back calls, one sync per round.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from unimm_jax import kernels


def attention_fns(backend: str):
  """name -> f(q, k, v) for the implementations to compare on this backend."""
  ours = "pallas_gpu" if backend == "gpu" else "pallas_tpu"
  fns = {ours: lambda q, k, v: kernels.attention(q, k, v, causal=True, impl=ours)}
  if backend == "gpu":  # the Triton kernels alone, to show what the Mosaic ones add
    from unimm_jax.kernels import flash_gpu
    fns["triton"] = lambda q, k, v: flash_gpu.flash_attention(
        q, k, v, causal=True,
        block_sizes=flash_gpu.BlockSizes(forward="triton", backward="triton"))
  fns |= {
      "xla": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                           implementation="xla")}
  if backend == "gpu":
    fns["cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                implementation="cudnn")
  return ours, fns


def time_fn(fn, args, iters: int, rounds: int = 5) -> float:
  """Median over `rounds` of the mean wall time of `iters` back-to-back calls of a jitted
  function (after compile and warm-up); one sync per round, so host dispatch overlaps the
  device work and sub-millisecond kernels are timed without a sync each."""
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    out = None
    for _ in range(iters):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / iters)
  return statistics.median(times)


def bench_inputs(args, seq: int, seed: int):
  """bf16 q [B,T,Hq,D], k/v [B,T,Hkv,D], cotangent do, and the causal forward FLOPs, with
  B = args.tokens // seq (at least 1)."""
  b = max(1, args.tokens // seq)
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(ks[0], (b, seq, args.heads, args.head_dim), jnp.bfloat16)
  k = jax.random.normal(ks[1], (b, seq, args.kv_heads, args.head_dim), jnp.bfloat16)
  v = jax.random.normal(ks[2], (b, seq, args.kv_heads, args.head_dim), jnp.bfloat16)
  do = jax.random.normal(ks[3], q.shape, jnp.bfloat16)
  return q, k, v, do, 4 * b * args.heads * seq * seq * args.head_dim / 2


def bench(args, backend: str):
  ours, fns = attention_fns(backend)
  print(f"device: {jax.devices()[0].device_kind}; bfloat16, causal, Hq={args.heads}, "
        f"Hkv={args.kv_heads}, D={args.head_dim}, batch = {args.tokens} // seq")
  print("FLOPs: fwd = 4*B*Hq*T*S*D / 2 (causal half), fwd+bwd = 3.5 x fwd\n")
  rows = []
  for seq in args.seqs:
    q, k, v, do, fwd_flops = bench_inputs(args, seq, seed=0)
    for name, f in fns.items():
      fwd = jax.jit(f)
      fwd_bwd = jax.jit(lambda q, k, v, do, f=f: jax.vjp(f, q, k, v)[1](do))
      for label, fn, fargs, flops in (("fwd", fwd, (q, k, v), fwd_flops),
                                      ("fwd+bwd", fwd_bwd, (q, k, v, do), 3.5 * fwd_flops)):
        try:
          rate = flops / time_fn(fn, fargs, args.iters) / 1e12
        except Exception as e:  # e.g. XLA out of memory at long seq, cuDNN unsupported
          print(f"  {name} {label} seq={seq}: failed ({type(e).__name__}: {str(e)[:120]})")
          rate = float("nan")
        rows.append((seq, label, name, rate))
  print_table(rows, ours, list(fns))


def print_table(rows, ours: str, names):
  rate = {(s, p, n): r for s, p, n, r in rows}
  others = [n for n in names if n != ours]
  header = (f"{'seq':>6} {'pass':>8} " + " ".join(f"{n + ' TF/s':>16}" for n in names) + " "
            + " ".join(f"{ours + '/' + n:>18}" for n in others))
  print(header)
  print("-" * len(header))
  for seq in sorted({s for s, *_ in rows}):
    for p in ("fwd", "fwd+bwd"):
      cells = " ".join(f"{rate[seq, p, n]:>16.1f}" for n in names)
      ratios = " ".join(f"{rate[seq, p, ours] / rate[seq, p, n]:>17.2f}x" for n in others)
      print(f"{seq:>6} {p:>8} {cells} {ratios}")


# (block_q, block_kv, num_warps, num_stages) of the forward kernel; the first is the default.
FWD_VARIANTS = [(128, 64, 8, 3), (128, 64, 8, 2), (128, 64, 4, 3), (128, 128, 8, 3),
                (64, 64, 4, 3), (256, 64, 16, 3)]
# (block_q, block_kv, num_warps, num_stages) of the dq kernel, then of the dk/dv kernel;
# the first is the default.
BWD_VARIANTS = [((64, 64, 4, 2), (64, 64, 4, 2)), ((64, 64, 8, 2), (64, 64, 8, 2)),
                ((64, 64, 4, 3), (64, 64, 4, 3)), ((128, 64, 8, 3), (64, 64, 4, 2)),
                ((128, 64, 8, 3), (64, 128, 8, 3)), ((128, 32, 4, 3), (32, 128, 4, 3))]


def variant_rate(sizes, inputs, iters: int, backward: bool) -> str:
  """TF/s of flash_gpu with BlockSizes `sizes` on `inputs` = bench_inputs(...), forward or
  forward+backward (same FLOP rule as `bench`), formatted; or why it failed (e.g. a tile
  that exceeds shared memory), so a sweep goes on."""
  from unimm_jax.kernels import flash_gpu

  q, k, v, do, fwd_flops = inputs
  f = lambda q, k, v: flash_gpu.flash_attention(q, k, v, causal=True, block_sizes=sizes)
  try:
    if backward:
      fn = jax.jit(lambda q, k, v, do: jax.vjp(f, q, k, v)[1](do))
      return f"{3.5 * fwd_flops / time_fn(fn, (q, k, v, do), iters) / 1e12:7.1f}"
    return f"{fwd_flops / time_fn(jax.jit(f), (q, k, v), iters) / 1e12:7.1f}"
  except Exception as e:
    return f"failed ({type(e).__name__}: {str(e)[-300:]})"


def sweep(args):
  """Times the Triton kernels per BlockSizes variant; prints TF/s."""
  from unimm_jax.kernels import flash_gpu

  print(f"device: {jax.devices()[0].device_kind}; sweep, bfloat16 causal Hq={args.heads} "
        f"Hkv={args.kv_heads} D={args.head_dim}")
  # Pinned to Triton: on Hopper "auto" would hand these shapes to the Mosaic kernels.
  base = flash_gpu.BlockSizes(forward="triton", backward="triton")
  for seq in args.seqs:
    inputs = bench_inputs(args, seq, seed=1)
    for bq, bk, w, st in FWD_VARIANTS:
      sizes = dataclasses.replace(base, block_q=bq, block_kv=bk, fwd_warps=w, fwd_stages=st)
      r = variant_rate(sizes, inputs, args.iters, backward=False)
      print(f"  seq={seq} fwd  bq={bq:<3} bk={bk:<3} warps={w} stages={st}: {r} TF/s", flush=True)
    for (bq1, bk1, w1, st1), (bq2, bk2, w2, st2) in BWD_VARIANTS:
      sizes = dataclasses.replace(base, block_q_dq=bq1, block_kv_dq=bk1, dq_warps=w1,
                                  dq_stages=st1, block_q_dkv=bq2, block_kv_dkv=bk2,
                                  dkv_warps=w2, dkv_stages=st2)
      r = variant_rate(sizes, inputs, args.iters, backward=True)
      print(f"  seq={seq} fwd+bwd dq=({bq1},{bk1},w{w1},s{st1}) dkv=({bq2},{bk2},w{w2},s{st2}): "
            f"{r} TF/s", flush=True)


# (causal, Hq, Hkv, D, T, S, dtype, segments) cases for --check: the Mosaic kernels take all
# but float32; the first is the long packed case the Triton kernels were checked on.
CHECK_CASES = [(True, 8, 2, 128, 2048, 2048, "bfloat16", True),
               (True, 8, 2, 128, 2048, 2048, "float32", True),
               (True, 8, 2, 128, 2048, 2048, "bfloat16", False),
               (False, 4, 4, 64, 1024, 1024, "float16", False),
               (True, 4, 1, 128, 512, 1024, "bfloat16", False),
               (False, 4, 2, 128, 256, 512, "bfloat16", False),
               (True, 8, 2, 64, 1024, 1024, "bfloat16", False)]


# (block_q, block_kv, stages) of the Mosaic GPU forward; the first is the default.
MOSAIC_VARIANTS = [(64, 128, 2), (64, 64, 2), (64, 64, 3)]
# MosaicBwdBlocks(block_q_dq, block_kv_dq, block_q_dkv, block_kv_dkv, stages); first: default.
MOSAIC_BWD_VARIANTS = [(64, 64, 64, 64, 2), (64, 64, 64, 64, 3), (64, 128, 64, 64, 2),
                       (64, 64, 128, 64, 2)]


def mosaic_sweep(args):
  """TF/s of the Mosaic GPU kernels per MosaicBlocks (forward) and MosaicBwdBlocks
  (forward+backward) variant."""
  from unimm_jax.kernels import flash_gpu, flash_mgpu, flash_mgpu_bwd

  for seq in args.seqs:
    inputs = bench_inputs(args, seq, seed=2)
    for bq, bk, st in MOSAIC_VARIANTS:
      sizes = flash_gpu.BlockSizes(forward="mosaic", mosaic=flash_mgpu.MosaicBlocks(bq, bk, st))
      r = variant_rate(sizes, inputs, args.iters, backward=False)
      print(f"  seq={seq} mosaic fwd bq={bq} bk={bk} stages={st}: {r} TF/s", flush=True)
    for variant in MOSAIC_BWD_VARIANTS:
      sizes = flash_gpu.BlockSizes(forward="mosaic", backward="mosaic",
                                   mosaic_bwd=flash_mgpu_bwd.MosaicBwdBlocks(*variant))
      r = variant_rate(sizes, inputs, args.iters, backward=True)
      print(f"  seq={seq} mosaic fwd+bwd {variant}: {r} TF/s", flush=True)


def device_check() -> bool:
  """Compiled pallas_gpu vs the float32 reference (run on upcast inputs): relative max error
  of out, dq, dk, dv, with the Triton forward and (where it applies) the Mosaic one."""
  from unimm_jax.kernels import flash_gpu, flash_mgpu, flash_mgpu_bwd

  ok = True
  for causal, hq, hkv, d, t, s_len, dtype, segmented in CHECK_CASES:
    rng = np.random.default_rng(t + d)
    shapes = ((2, t, hq, d), (2, s_len, hkv, d), (2, s_len, hkv, d), (2, t, hq, d))
    q, k, v, do = (jnp.asarray(rng.standard_normal(x, np.float32)).astype(dtype) for x in shapes)
    seg = (jnp.asarray(np.repeat([[1, 2, 3]], [t // 2, t // 4 + 3, t // 4 - 3], axis=1)
                       .repeat(2, 0).astype(np.int32)) if segmented else None)

    def run(f, *xs):
      out, vjp = jax.vjp(f, *xs[:3])
      return (out, *vjp(xs[3]))

    with jax.default_matmul_precision("highest"):
      ref = jax.jit(lambda *xs: run(lambda q, k, v: kernels.attention_reference(
          q, k, v, causal=causal, segment_ids=seg), *xs))(
              *(x.astype(jnp.float32) for x in (q, k, v, do)))
    kernels_used = ["triton"]
    if (flash_mgpu.unsupported_reason(q, k, causal=causal, segment_ids=seg,
                                      blocks=flash_mgpu.MosaicBlocks()) is None
        and flash_mgpu_bwd.unsupported_reason(q, k, blocks=flash_mgpu_bwd.MosaicBwdBlocks())
        is None):
      kernels_used.append("mosaic")
    for fwd in kernels_used:
      sizes = flash_gpu.BlockSizes(forward=fwd, backward=fwd)
      try:
        ours = jax.jit(lambda *xs: run(lambda q, k, v: flash_gpu.flash_attention(
            q, k, v, causal=causal, segment_ids=seg, block_sizes=sizes), *xs))(q, k, v, do)
      except Exception as e:  # report and go on: the table below still runs
        ok = False
        print(f"  check {fwd} {dtype} causal={causal} T={t} S={s_len}: failed "
              f"({type(e).__name__}: {str(e)[-1500:]})", flush=True)
        continue
      errs = [float(jnp.abs(a.astype(jnp.float32) - r).max()
                    / jnp.maximum(1.0, jnp.abs(r).max())) for a, r in zip(ours, ref)]
      tol = 5e-3 if dtype == "float32" else 2e-2
      good = max(errs) < tol and all(bool(jnp.isfinite(a).all()) for a in ours)
      ok &= good
      print(f"  check {fwd:>6} {dtype} causal={causal} GQA {hq}/{hkv} D={d} T={t} S={s_len}"
            f"{' segments' if segmented else ''}: rel max err out/dq/dk/dv "
            + " ".join(f"{e:.1e}" for e in errs) + ("  ok" if good else "  FAIL"), flush=True)
  return ok


def correctness_check() -> bool:
  """Tiny fwd+grad comparison of both Pallas kernels (interpret mode) to the reference."""
  rng = np.random.default_rng(0)
  shapes = ((1, 80, 4, 64), (1, 80, 2, 64), (1, 80, 2, 64), (1, 80, 4, 64))
  q, k, v, do = (jnp.asarray(rng.standard_normal(s, np.float32)) for s in shapes)
  seg = jnp.asarray(np.repeat([[1, 2, 0]], [40, 30, 10], axis=1).astype(np.int32))

  def run(f):
    out, vjp = jax.vjp(f, q, k, v)
    return (out, *vjp(do))

  want = jax.jit(lambda: run(lambda q, k, v: kernels.attention_reference(
      q, k, v, causal=True, segment_ids=seg)))()
  ok = True
  for impl in ("pallas_gpu", "pallas_tpu"):
    got = jax.jit(lambda impl=impl: run(lambda q, k, v: kernels.attention(
        q, k, v, causal=True, segment_ids=seg, impl=impl, interpret=True)))()
    errs = [float(jnp.abs(g - w).max()) for g, w in zip(got, want)]
    good = max(errs) < 1e-4
    ok &= good
    print(f"  {impl:>10} (interpret) max |err| out/dq/dk/dv: "
          + " ".join(f"{e:.1e}" for e in errs) + ("  ok" if good else "  FAIL"))
  return ok


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--seqs", type=int, nargs="+", default=[4096, 8192])
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--kv-heads", type=int, default=16)
  p.add_argument("--head-dim", type=int, default=128)
  p.add_argument("--tokens", type=int, default=16384, help="batch * seq per step")
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--sweep", action="store_true", help="GPU: time BlockSizes variants")
  p.add_argument("--check", action="store_true", help="GPU: compiled kernel vs reference")
  p.add_argument("--mosaic-sweep", action="store_true",
                 help="GPU: time the Mosaic forward's MosaicBlocks variants")
  p.add_argument("--no-bench", action="store_true", help="skip the side-by-side table")
  args = p.parse_args(argv)
  backend = jax.default_backend()
  if backend in ("gpu", "tpu"):
    ok = True
    if args.check and backend == "gpu":
      ok = device_check()
    if args.sweep and backend == "gpu":
      sweep(args)
    if args.mosaic_sweep and backend == "gpu":
      mosaic_sweep(args)
    if not args.no_bench:
      bench(args, backend)
    return 0 if ok else 1
  print(f"No accelerator (jax backend: {backend}): no timings. Running a tiny correctness "
        f"check of the Pallas kernels in interpret mode instead.")
  return 0 if correctness_check() else 1


if __name__ == "__main__":
  sys.exit(main())
