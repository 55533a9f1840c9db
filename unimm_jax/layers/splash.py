"""`splash` attention: JAX's own Pallas TPU splash kernel, wrapped for our layouts.

jax.experimental.pallas.ops.tpu.splash_attention works per example on [heads, T, D] and
needs lengths that are multiples of its block size; it does not scale q. This wrapper takes
the model's [B, T, Hq, D] / [B, T, Hkv, D] tensors, runs grouped-query heads through the
MQA form of the kernel (one kv head shared by its group, no repeated K/V), pads T to the
block size with a segment that no real token sees, and applies 1/sqrt(D).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

BLOCK = 128


def _kernel(group: int, length: int, interpret: bool):
    # Built per trace, not cached: the kernel holds mask-info arrays that must not outlive a trace.
    causal = mask_lib.MultiHeadMask([mask_lib.CausalMask((length, length)) for _ in range(group)])
    blocks = splash.BlockSizes.get_default()
    return splash.make_splash_mqa_single_device(causal, block_sizes=blocks, interpret=interpret)


def splash_attention(q, k, v, segment_ids, *, interpret: bool = False):
    """Causal packed self-attention with the splash kernel.

    q: [B, T, Hq, D]; k, v: [B, T, Hkv, D]; segment_ids int32 [B, T] (0 = padding; padded
    queries return values that callers ignore) -> [B, T, Hq, D] in q's dtype.
    """
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    group = hq // hkv
    pad = (-t) % BLOCK
    if pad:
        widths = ((0, 0), (0, pad), (0, 0), (0, 0))
        q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
        # -1 is a segment of its own, so the block padding is invisible to real tokens.
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-1)
    length = t + pad
    kernel = _kernel(group, length, bool(interpret))
    qg = (q * (d**-0.5)).astype(q.dtype).reshape(b, length, hkv, group, d).transpose(0, 2, 3, 1, 4)
    kk, vv = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, Hkv, T, D]

    def one_example(qe, ke, ve, seg):
        ids = splash.SegmentIds(q=seg, kv=seg)
        return jax.vmap(lambda qh, kh, vh: kernel(qh, kh, vh, segment_ids=ids))(qe, ke, ve)

    out = jax.vmap(one_example)(qg, kk, vv, segment_ids)  # [B, Hkv, G, T, D]
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, length, hq, d)
    return out[:, :t].astype(q.dtype)
