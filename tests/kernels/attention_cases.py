"""Shared helpers for the kernel tests: random inputs, seeded case sweeps, comparisons."""
from __future__ import annotations

import contextlib
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from unimm_jax import kernels
from unimm_jax.kernels import flash_gpu, flash_tpu

# UNIMM_KERNEL_TESTS_ON_GPU=1 (on a machine with a CUDA GPU): the GPU kernels run compiled
# (Triton), not in the interpreter; the TPU kernels are skipped and the float32 reference runs
# on the CPU. Default (CI, CPU): both kernels run in Pallas' interpreter.
ON_GPU = os.environ.get("UNIMM_KERNEL_TESTS_ON_GPU") == "1"
INTERPRET = not ON_GPU
PALLAS_IMPLS = ("pallas_gpu",) if ON_GPU else ("pallas_tpu", "pallas_gpu")

# Max abs error allowed, relative to max(1, max |reference|) of the compared tensor.
# float32: accumulation-order noise only (interpreter); compiled on a GPU, float32 dots run
# as TF32 (10-bit mantissa, ~1e-3 relative). bfloat16: the kernels round P and dS to bf16
# before their matmuls (as every flash kernel does) and the results are stored in bf16.
TOLERANCE = {
    "float32": {"out": 5e-3, "grad": 5e-3} if ON_GPU else {"out": 1e-5, "grad": 2e-5},
    "bfloat16": {"out": 1e-2, "grad": 2e-2},
}


@dataclasses.dataclass(frozen=True)
class Case:
  batch: int
  q_len: int
  kv_len: int
  q_heads: int
  kv_heads: int
  head_dim: int
  causal: bool
  segmented: bool
  dtype: str
  seed: int
  blocks: tuple[int, int] | None = None  # (block_q, block_kv) for the kernel, None: defaults

  def __str__(self):
    return (f"b{self.batch}-t{self.q_len}-s{self.kv_len}-h{self.q_heads}/{self.kv_heads}"
            f"-d{self.head_dim}-{'causal' if self.causal else 'full'}"
            f"{'-seg' if self.segmented else ''}-{self.dtype}"
            f"{'' if self.blocks is None else '-blk%dx%d' % self.blocks}-s{self.seed}")


def sweep(seed: int, n: int, *, max_len: int, head_dims=(64, 128), batches=(1, 2)):
  """`n` seeded random cases. Features cycle so that the first 8 cover causal/full,
  segments/none, MHA and GQA 2:1 and 4:1, float32/bfloat16, each head dim, S > T and S < T
  (causal), default and small (64) blocks; lengths are drawn and never a multiple of 64,
  so every case pads."""
  rng = np.random.default_rng(seed)
  cases = []
  for i in range(n):
    causal = bool(i % 2)
    segmented = bool((i // 2) % 2)
    kv_heads, q_heads = [(2, 2), (1, 4), (2, 4), (1, 2)][i % 4 if i % 8 < 4 else (i + 1) % 4]
    dtype = ("float32", "bfloat16")[(i // 4) % 2]
    head_dim = head_dims[i % len(head_dims)] if i % 3 else head_dims[-1 - i % len(head_dims)]
    q_len = int(rng.integers(33, max_len))
    if q_len % 64 == 0:
      q_len += 7
    kv_len = q_len
    if i % 8 == 1:  # causal, no segments: S > T (bottom-right aligned diagonal)
      kv_len = q_len + int(rng.integers(1, max_len // 2))
    elif i % 8 == 5:  # causal, no segments: T > S, the leading T - S rows see nothing
      kv_len = int(rng.integers(17, q_len))
    blocks = None if i % 3 == 0 else (64, 64)
    cases.append(Case(int(rng.choice(batches)), q_len, kv_len, q_heads, kv_heads, head_dim,
                      causal, segmented, dtype, int(rng.integers(1 << 30)), blocks))
  return cases


def make_inputs(case: Case):
  """q, k, v, segment_ids (or None), output cotangent; values standard normal.

  NumPy draws them: jax.random would compile anew for every shape.
  """
  rng = np.random.default_rng(case.seed)
  dt = jnp.dtype(case.dtype)
  b, t, s, d = case.batch, case.q_len, case.kv_len, case.head_dim
  draw = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32)).astype(dt)
  q = draw(b, t, case.q_heads, d)
  k = draw(b, s, case.kv_heads, d)
  v = draw(b, s, case.kv_heads, d)
  ct = draw(b, t, case.q_heads, d)
  seg = packed_segments(rng, b, t) if case.segmented else None
  return q, k, v, seg, ct


def packed_segments(rng, batch: int, length: int):
  """int32 [batch, length]: 1-4 packed documents (ids 1, 2, ...) of random lengths, then a
  padding run (id 0) at the end, as a packing data pipeline produces."""
  rows = []
  for _ in range(batch):
    n_docs = int(rng.integers(1, 5))
    cuts = np.sort(rng.choice(np.arange(1, length), size=min(n_docs, length - 1), replace=False))
    bounds = [0, *cuts.tolist()]
    ids = np.zeros(length, np.int32)
    for doc in range(len(bounds) - 1):
      ids[bounds[doc]:bounds[doc + 1]] = doc + 1
    rows.append(ids)  # positions from the last cut on stay 0: padding
  return jnp.asarray(np.stack(rows))


def attention_fn(impl: str, case: Case, seg):
  """q, k, v -> out for `impl`, through the kernel entry with the case's block sizes."""
  if impl == "reference":
    return lambda q, k, v: kernels.attention_reference(q, k, v, causal=case.causal,
                                                       segment_ids=seg)
  if case.blocks is None:
    return lambda q, k, v: kernels.attention(q, k, v, causal=case.causal, segment_ids=seg,
                                             impl=impl, interpret=INTERPRET)
  bq, bk = case.blocks
  if impl == "pallas_tpu":
    return lambda q, k, v: flash_tpu.flash_attention(
        q, k, v, causal=case.causal, segment_ids=seg, block_q=bq, block_kv=bk, interpret=True)
  # The backward kernels get the transposed shape (q tile = bk, kv tile = bq), so their
  # block counts differ from the forward's whenever bq != bk.
  sizes = flash_gpu.BlockSizes(block_q=bq, block_kv=bk, block_q_dq=bk, block_kv_dq=bq,
                               block_q_dkv=bk, block_kv_dkv=bq)
  return lambda q, k, v: flash_gpu.flash_attention(
      q, k, v, causal=case.causal, segment_ids=seg, block_sizes=sizes, interpret=INTERPRET)


def outputs_and_grads(impl: str, case: Case):
  """(plain forward, forward under vjp, (dq, dk, dv)) as float32 numpy, from one jit.

  The reference runs on the inputs upcast to float32 (the exact answer for the rounded
  inputs); a kernel runs in the case's dtype.
  """
  on_cpu = impl == "reference" and ON_GPU  # an exact float32 oracle, not TF32 GPU dots
  with jax.default_device(jax.devices("cpu")[0]) if on_cpu else contextlib.nullcontext():
    q, k, v, seg, ct = make_inputs(case)
    if impl == "reference":
      q, k, v, ct = (x.astype(jnp.float32) for x in (q, k, v, ct))
    f = attention_fn(impl, case, seg)

    @jax.jit
    def run(q, k, v, ct):
      out, vjp = jax.vjp(f, q, k, v)
      return f(q, k, v), out, vjp(ct)

    return jax.tree.map(lambda x: np.asarray(x.astype(jnp.float32)), run(q, k, v, ct))


def max_err(got, want) -> float:
  """Max abs error scaled by max(1, max |want|)."""
  return float(np.max(np.abs(got - want)) / max(1.0, float(np.max(np.abs(want)))))


def dead_rows(case: Case, seg) -> np.ndarray:
  """bool [B, T]: query rows that may attend no key (causal with T > S)."""
  mask = np.asarray(kernels.reference.attention_mask(case.q_len, case.kv_len,
                                                    causal=case.causal, segment_ids=seg))
  return np.broadcast_to(~mask.any(-1), (case.batch, case.q_len))
