"""The sampling entry points behind JanusModel.generate_text / generate_image_tokens.

Everything here runs outside jit: it validates input (clear errors instead of XLA failures),
left-pads prompts into length buckets, plans memory-aware chunks, places each chunk on the
mesh (batch over data/fsdp) and calls a cached jitted decode loop (sample/text.py, image.py).
A loop is compiled once per (chunk rows, bucketed prompt length, max_new_tokens, sampling
settings); seeds and cfg weights are traced values.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from unimm_jax.models.janus_config import num_image_tokens, num_understanding_tokens
from unimm_jax.sample import batching
from unimm_jax.sample.image import build_image_decoder
from unimm_jax.sample.sampling import check_sampling_args
from unimm_jax.sample.text import build_text_decoder


def batch_axes(mesh) -> tuple[str, ...]:
    """Mesh axes the batch is split over (data, fsdp; size-1 axes dropped)."""
    if mesh is None:
        return ()
    return tuple(a for a in ("data", "fsdp") if mesh.shape.get(a, 1) > 1)


def _shards(mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in batch_axes(mesh)])) if mesh is not None else 1


def _put(x, mesh, batched: bool = True):
    """Host array -> device; split along axis 0 over the batch axes when on a mesh."""
    if mesh is None:
        return jnp.asarray(x)
    axes = batch_axes(mesh)
    spec = PartitionSpec(axes if batched and axes else None)
    return jax.device_put(np.asarray(x), NamedSharding(mesh, spec))


def _cache_sharding(mesh):
    if mesh is None or not batch_axes(mesh):
        return None
    return NamedSharding(mesh, PartitionSpec(batch_axes(mesh)))  # per-layer [B, S, Hkv, Dh]


def _check_rows(model, rows, new_tokens: int, what: str):
    m = model.config
    v, ctx = m.llm.vocab_size, m.llm.max_position_embeddings
    for i, r in enumerate(rows):
        if r.min() < 0 or r.max() >= v:
            raise ValueError(f"input_ids[{i}] holds ids outside [0, {v}); check the tokenizer matches this checkpoint.")
        if len(r) + new_tokens > ctx:
            raise ValueError(f"prompt {i} has {len(r)} tokens and {what} adds {new_tokens}: {len(r) + new_tokens} "
                             f"exceeds the context of {ctx} positions (max_position_embeddings); shorten the prompt"
                             f"{' or lower max_new_tokens' if what == 'generate_text' else ''}.")


def _jitted(model, key, build):
    if key not in model._jit:
        model._jit[key] = jax.jit(build())
    return model._jit[key]


def generate_text(model, input_ids, pixel_values=None, *, max_new_tokens: int, temperature: float = 0.0,
                  top_k=None, top_p=None, seed: int = 0, attention_mask=None, max_batch: int | None = None,
                  bucket: int = batching.DEFAULT_BUCKET, progress: bool = False) -> np.ndarray:
    """See JanusModel.generate_text. Returns int32 [B, max_new_tokens]."""
    cfg = model.config
    temperature, top_k, top_p = check_sampling_args(temperature, top_k, top_p)
    if int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
    max_new_tokens = int(max_new_tokens)
    rows = batching.prompt_rows(input_ids, attention_mask)
    _check_rows(model, rows, max_new_tokens, "generate_text")
    per_image = num_understanding_tokens(cfg)
    slots = [int((r == cfg.tokens.image_token_id).sum()) for r in rows]
    if pixel_values is None:
        if any(slots):
            raise ValueError(f"input_ids hold {sum(slots)} image placeholder tokens but no pixel_values were given.")
        images = None
    else:
        images = np.asarray(model._check_images(pixel_values, cfg.vision.image_size, "pixel_values"))
        bad = [i for i, s in enumerate(slots) if s % per_image]
        if bad or sum(slots) != images.shape[0] * per_image:
            raise ValueError(f"input_ids hold {sum(slots)} image placeholder tokens but {images.shape[0]} image(s) "
                             f"need {images.shape[0] * per_image} ({per_image} each, whole images per prompt); "
                             f"expand each placeholder to {per_image} tokens.")
    first_image = np.concatenate([[0], np.cumsum(slots) // per_image])

    length = batching.bucket_length(max(len(r) for r in rows), bucket)
    ids, mask = batching.left_pad(rows, cfg.tokens.pad_token_id, length)
    per_row = batching.decode_bytes_per_row(cfg.llm, length, max_new_tokens)
    chunk = batching.plan_chunk_rows(len(rows), per_row, batching.free_device_bytes(), _shards(model.mesh), max_batch)
    key = ("text", chunk, length, max_new_tokens, temperature, top_k, top_p, images is not None,
           cfg.tokens.eos_token_id, cfg.tokens.pad_token_id)  # ids are baked into the loop
    decode = _jitted(model, key,
                     lambda: build_text_decoder(cfg, max_new_tokens=max_new_tokens, temperature=temperature,
                                                top_k=top_k, top_p=top_p, cache_sharding=_cache_sharding(model.mesh)))

    def run(idx):
        px = None
        if images is not None:
            px = np.concatenate([images[first_image[i]:first_image[i + 1]] for i in idx])
            px = _put(px, model.mesh, batched=False)
        return decode(model.params, _put(ids[idx], model.mesh), _put(mask[idx], model.mesh), px,
                      jnp.int32(seed), _put(idx.astype(np.int32), model.mesh))

    return batching.run_chunked(run, len(rows), chunk, progress, "text").astype(np.int32)


def generate_image_tokens(model, input_ids, *, num_images: int = 1, cfg_weight: float = 5.0, temperature: float = 1.0,
                          top_k=None, top_p=None, seed: int = 0, pad_token_id=None, attention_mask=None,
                          max_batch: int | None = None, bucket: int = batching.DEFAULT_BUCKET,
                          progress: bool = False) -> np.ndarray:
    """See JanusModel.generate_image_tokens. Returns int32 [B * num_images, N], prompt-major."""
    cfg = model.config
    toks = cfg.tokens
    temperature, top_k, top_p = check_sampling_args(temperature, top_k, top_p)
    if int(num_images) != num_images or num_images < 1:
        raise ValueError(f"num_images must be a positive integer, got {num_images!r}.")
    pad = toks.pad_token_id if pad_token_id is None else int(pad_token_id)
    if not 0 <= pad < cfg.llm.vocab_size:
        raise ValueError(f"pad_token_id={pad} is not a token id in [0, {cfg.llm.vocab_size}).")
    n = num_image_tokens(cfg)
    rows = batching.prompt_rows(input_ids, attention_mask)
    _check_rows(model, rows, n, "image generation")
    for i, r in enumerate(rows):
        if r[-1] != toks.boi_token_id:
            raise ValueError(f"prompt {i} must end with <begin_of_image> (id {toks.boi_token_id}), got id {r[-1]}; "
                             "build it with unimm_jax.data.chat_format.generation_prompt_ids.")
    keep = (toks.bos_token_id, toks.boi_token_id)
    rows = [r for r in rows for _ in range(int(num_images))]  # prompt-major, as num_return_sequences
    uncond = [np.where(np.isin(r, keep), r, pad) for r in rows]
    length = batching.bucket_length(max(len(r) for r in rows), bucket)
    ids_c, mask = batching.left_pad(rows, pad, length)
    ids_u, _ = batching.left_pad(uncond, pad, length)

    per_image = 2 * batching.decode_bytes_per_row(cfg.llm, length, n)  # cond + uncond rows
    chunk = batching.plan_chunk_rows(len(rows), per_image, batching.free_device_bytes(), _shards(model.mesh), max_batch)
    decode = _jitted(model, ("image", chunk, length, temperature, top_k, top_p),
                     lambda: build_image_decoder(cfg, temperature=temperature, top_k=top_k, top_p=top_p,
                                                 cache_sharding=_cache_sharding(model.mesh)))

    def run(idx):
        both = np.concatenate([ids_c[idx], ids_u[idx]])
        both_mask = np.concatenate([mask[idx], mask[idx]])
        return decode(model.params, _put(both, model.mesh), _put(both_mask, model.mesh), jnp.float32(cfg_weight),
                      jnp.int32(seed), _put(idx.astype(np.int32), model.mesh))

    return batching.run_chunked(run, len(rows), chunk, progress, "image tokens").astype(np.int32)
