"""Prompt batches for decoding: left padding, length buckets, and memory-aware chunking.

Left padding keeps every row's last prompt token in the same (last) column, so one decode loop
serves prompts of different lengths; pads are masked out of attention and get no RoPE position,
so a padded row decodes exactly as the prompt alone. Prompt lengths are rounded up to a bucket
so that nearby lengths share one compiled loop.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

DEFAULT_BUCKET = 16


def prompt_rows(input_ids, attention_mask=None, name: str = "input_ids") -> list[np.ndarray]:
    """The real tokens of each prompt, as int64 arrays.

    input_ids: a list of token-id sequences (any lengths), or int [B, T] with an optional
    left-padding attention_mask [B, T] (1 = real token). Raises ValueError on empty prompts,
    non-integer ids or a mask that is not left padding.
    """
    if isinstance(input_ids, (list, tuple)) and input_ids and not np.isscalar(input_ids[0]):
        rows = [np.asarray(r) for r in input_ids]
        if attention_mask is not None:
            raise ValueError(f"{name}: pass either a list of unpadded prompts or a padded array with "
                             "attention_mask, not a list with a mask.")
    else:
        ids = np.asarray(input_ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2:
            raise ValueError(f"{name} must be int [batch, length] or a list of prompts, got shape {ids.shape}.")
        if attention_mask is None:
            rows = list(ids)
        else:
            mask = np.asarray(attention_mask)
            if mask.shape != ids.shape:
                raise ValueError(f"attention_mask shape {mask.shape} differs from {name} shape {ids.shape}.")
            mask = mask.astype(bool)
            if (np.diff(mask.astype(np.int8), axis=1) < 0).any():
                raise ValueError("attention_mask must describe LEFT padding (zeros, then ones) so that every "
                                 "prompt ends in the last column; re-pad the batch on the left.")
            rows = [r[m] for r, m in zip(ids, mask)]
    if not rows:
        raise ValueError(f"{name} is empty: pass at least one prompt.")
    for i, r in enumerate(rows):
        if r.ndim != 1 or r.size == 0:
            raise ValueError(f"{name}[{i}] is an empty prompt; every prompt needs at least one token "
                             "(e.g. BOS + text from unimm_jax.data.chat_format).")
        if not np.issubdtype(r.dtype, np.integer):
            raise ValueError(f"{name}[{i}] must hold integer token ids, got dtype {r.dtype}.")
    return [r.astype(np.int64) for r in rows]


def bucket_length(n: int, bucket: int = DEFAULT_BUCKET) -> int:
    """n rounded up to a multiple of `bucket` (bucket <= 1: n itself)."""
    return n if bucket <= 1 else int(math.ceil(n / bucket) * bucket)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ids -> (ids int32 [B, length], mask int32 [B, length]), padded on the left."""
    length = length or max(len(r) for r in rows)
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        if len(r) > length:
            raise ValueError(f"prompt {i} has {len(r)} tokens, more than the padded length {length}.")
        if len(r):
            ids[i, length - len(r):] = r
            mask[i, length - len(r):] = 1
    return ids, mask


def decode_bytes_per_row(llm_cfg, prompt_len: int, new_tokens: int) -> int:
    """Estimated peak device bytes one batch row needs while decoding (excluding params).

    KV cache for prompt + new tokens, plus the prefill's largest activations: float32 attention
    logits [H, T, S] and the MLP's [T, 2 * intermediate] (computed one layer at a time).
    """
    s = prompt_len + new_tokens
    itemsize = np.dtype(llm_cfg.dtype).itemsize if llm_cfg.dtype != "bfloat16" else 2
    kv = 2 * llm_cfg.num_layers * s * llm_cfg.num_kv_heads * llm_cfg.head_dim * itemsize
    attn = 4 * llm_cfg.num_heads * prompt_len * s
    mlp = 3 * prompt_len * llm_cfg.intermediate_size * itemsize
    hidden = 4 * prompt_len * llm_cfg.hidden_size * 4
    return kv + attn + mlp + hidden


def free_device_bytes(fraction: float = 0.7) -> int | None:
    """`fraction` of the first device's free memory, or None where the backend does not report it
    (CPU): then there is no device limit to plan against and one chunk is used."""
    import jax

    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats raise various errors
        stats = None
    if not stats or "bytes_limit" not in stats:
        return None
    return int(fraction * (stats["bytes_limit"] - stats.get("bytes_in_use", 0)))


def plan_chunk_rows(num_rows: int, bytes_per_row: int, budget_bytes: int | None, multiple: int = 1,
                    max_batch: int | None = None) -> int:
    """Rows per chunk: as many as fit `budget_bytes` (None = all), capped by `max_batch`, a
    multiple of `multiple` (the batch-sharding degree). Raises ValueError if not even
    `multiple` rows fit, naming the fix."""
    if max_batch is not None and max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}.")
    rows = num_rows if max_batch is None else min(num_rows, max_batch)
    if budget_bytes is not None:
        fit = budget_bytes // max(bytes_per_row, 1)
        if fit < multiple:
            raise ValueError(f"one chunk of {multiple} row(s) needs about {multiple * bytes_per_row / 2**30:.2f} GiB "
                             f"but only {budget_bytes / 2**30:.2f} GiB is free; use a shorter prompt, fewer "
                             "new tokens, bfloat16 weights, or a mesh with fewer batch shards.")
        rows = min(rows, fit)
    return max(multiple, rows // multiple * multiple) if rows >= multiple else multiple


def run_chunked(fn: Callable[[np.ndarray], np.ndarray], num_rows: int, chunk_rows: int, progress: bool = False,
                desc: str = "decoding") -> np.ndarray:
    """Calls fn(row_indices int [chunk_rows]) for consecutive chunks and stacks the outputs.

    The last chunk is filled up to `chunk_rows` by repeating its first row (so every chunk has
    one shape and compiles once); the extra outputs are dropped. A tqdm bar advances per chunk
    because the per-token loop runs inside jit.
    """
    starts = range(0, num_rows, chunk_rows)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="chunk", total=math.ceil(num_rows / chunk_rows))
    outs = []
    for s in starts:
        idx = np.arange(s, min(s + chunk_rows, num_rows))
        n = len(idx)
        if n < chunk_rows:
            idx = np.concatenate([idx, np.full(chunk_rows - n, idx[0])])
        outs.append(np.asarray(fn(idx))[:n])
    return np.concatenate(outs, axis=0)
