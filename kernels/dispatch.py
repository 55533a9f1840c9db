"""`attention`: the one entry point; validates inputs and picks an implementation."""
from __future__ import annotations

from . import flash_gpu, flash_tpu, reference
from .validation import check_attention_inputs


def attention(q, k, v, *, causal, segment_ids=None, impl="xla", interpret=False, scale=None):
  """Multi-head / grouped-query dot-product attention.

  Args:
    q: [B, T, Hq, D]; k, v: [B, S, Hkv, D] with Hq % Hkv == 0. Query head h reads kv head
      h // (Hq // Hkv); the Pallas kernels do this by indexing, never repeating K/V.
      One dtype for all three: float32 or bfloat16 (float16 too for pallas_gpu and xla).
    causal: query i attends key j only if j <= i + (S - T) (bottom-right aligned).
    segment_ids: optional int32 [B, T] (self-attention, S == T): query i attends key j
      only if segment_ids[i] == segment_ids[j] (packed sequences; padding is a segment).
    impl: "pallas_tpu" (Mosaic kernels), "pallas_gpu" (Triton kernels; on Hopper the Mosaic
      GPU ones where they apply, see flash_gpu.BlockSizes) or "xla"
      (the pure-jnp float32 reference; O(T*S) memory).
    interpret: run a Pallas impl in the interpreter (CPU tests); ignored for "xla".
    scale: softmax scale, default 1/sqrt(D).
  Returns:
    [B, T, Hq, D] in q's dtype. Rows that may attend nothing are 0.
  """
  check_attention_inputs(q, k, v, causal=causal, segment_ids=segment_ids, impl=impl)
  causal = bool(causal)
  if impl == "pallas_tpu":
    return flash_tpu.flash_attention(q, k, v, causal=causal, segment_ids=segment_ids,
                                     scale=scale, interpret=interpret)
  if impl == "pallas_gpu":
    return flash_gpu.flash_attention(q, k, v, causal=causal, segment_ids=segment_ids,
                                     scale=scale, interpret=interpret)
  return reference.attention_reference(q, k, v, causal=causal, segment_ids=segment_ids,
                                       scale=scale)
