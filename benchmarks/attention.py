"""Attention kernel throughput: our Pallas kernel against jax.nn.dot_product_attention.

    python benchmarks/attention.py [--seqs 4096 8192] [--heads 16] [--kv-heads 16]
                                   [--head-dim 128] [--tokens 16384] [--iters 10]

On a GPU: `pallas_gpu` vs jax.nn.dot_product_attention(implementation="xla" and "cudnn").
On a TPU: `pallas_tpu` vs implementation="xla". bfloat16, causal, forward and
forward+backward; batch = tokens // seq. Prints TFLOP/s and side-by-side ratios.

FLOP counting: forward = 4 * B * Hq * T * S * D (QK^T and PV) halved for causal (the
masked half is not counted, as MaxText does since PR #1988); forward+backward = 3.5x the
forward (the backward's five matmuls: QK^T recompute, dV, dP, dQ, dK = 2.5x). Rates for
kernels that skip masked blocks and for XLA (which computes them) are thus comparable
as useful work per second.

Without an accelerator it says so and runs a tiny correctness check in interpret mode.
"""
from __future__ import annotations

import argparse
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
  fns = {ours: lambda q, k, v: kernels.attention(q, k, v, causal=True, impl=ours),
         "xla": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                              implementation="xla")}
  if backend == "gpu":
    fns["cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                implementation="cudnn")
  return ours, fns


def time_fn(fn, args, iters: int) -> float:
  """Median wall time in seconds of a jitted call (after compile and warm-up)."""
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def bench(args, backend: str):
  ours, fns = attention_fns(backend)
  print(f"device: {jax.devices()[0].device_kind}; bfloat16, causal, Hq={args.heads}, "
        f"Hkv={args.kv_heads}, D={args.head_dim}, batch = {args.tokens} // seq")
  print("FLOPs: fwd = 4*B*Hq*T*S*D / 2 (causal half), fwd+bwd = 3.5 x fwd\n")
  rows = []
  for seq in args.seqs:
    b = max(1, args.tokens // seq)
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(ks[0], (b, seq, args.heads, args.head_dim), jnp.bfloat16)
    k = jax.random.normal(ks[1], (b, seq, args.kv_heads, args.head_dim), jnp.bfloat16)
    v = jax.random.normal(ks[2], (b, seq, args.kv_heads, args.head_dim), jnp.bfloat16)
    do = jax.random.normal(ks[3], q.shape, jnp.bfloat16)
    fwd_flops = 4 * b * args.heads * seq * seq * args.head_dim / 2
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
  args = p.parse_args(argv)
  backend = jax.default_backend()
  if backend in ("gpu", "tpu"):
    bench(args, backend)
    return 0
  print(f"No accelerator (jax backend: {backend}): no timings. Running a tiny correctness "
        f"check of the Pallas kernels in interpret mode instead.")
  return 0 if correctness_check() else 1


if __name__ == "__main__":
  sys.exit(main())
