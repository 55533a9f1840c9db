"""16 images with CFG at 384 px on a 24 GiB memory budget: Janus-Pro-7B shapes, random bf16 weights.

    XLA_PYTHON_CLIENT_MEM_FRACTION=0.29 python benchmarks/generate_memory_gpu.py ours [--max-batch N]
    python benchmarks/generate_memory_gpu.py transformers --mem-fraction 0.29

DeepSeek's reference draws 16 images as 32 CFG rows x 576 codes in one batch and runs out of
memory on 24 GB cards (Janus issue #41). `ours` lets generate_image_tokens plan memory-aware
chunks from the device's free memory (--max-batch only lowers the chunk further); `transformers`
runs JanusForConditionalGeneration.generate(num_return_sequences=16) in bf16 under the same cap
(torch.cuda.set_per_process_memory_fraction). Needs a GPU; prints peak memory, time, OOM or not.
"""
from __future__ import annotations

import argparse
import sys
import time

PROMPT_LEN = 40
NUM_IMAGES = 16


def run_ours(max_batch):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from unimm_jax.api import JanusModel
    from unimm_jax.convert.checkpoints import abstract_params
    from unimm_jax.models.janus_config import janus_pro_config

    cfg = janus_pro_config("7b")
    cfg.llm.dtype = "bfloat16"
    shapes = abstract_params(cfg)
    leaves, tree = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    init = jax.jit(lambda k, shape: (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(jnp.bfloat16),
                   static_argnums=1)
    params = jax.tree.unflatten(tree, [init(k, s.shape) for k, s in zip(keys, leaves)])
    n_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    dev = jax.devices()[0]
    print(f"device {dev.device_kind}, limit {dev.memory_stats()['bytes_limit'] / 2**30:.1f} GiB, "
          f"params {n_bytes / 2**30:.1f} GiB bf16")
    model = JanusModel(cfg, params)
    prompt = [np.concatenate([[cfg.tokens.bos_token_id], np.arange(100, 100 + PROMPT_LEN - 2), [cfg.tokens.boi_token_id]])]
    t = time.perf_counter()
    try:
        codes = model.generate_image_tokens(prompt, num_images=NUM_IMAGES, cfg_weight=5.0, temperature=1.0,
                                            max_batch=max_batch, progress=True)
    except Exception as e:  # noqa: BLE001 - report the OOM rather than a traceback
        print(f"ours: FAILED after {time.perf_counter() - t:.1f} s: {type(e).__name__}: {str(e)[:300]}")
        return 1
    first = time.perf_counter() - t
    t = time.perf_counter()
    model.generate_image_tokens(prompt, num_images=NUM_IMAGES, cfg_weight=5.0, temperature=1.0, max_batch=max_batch)
    again = time.perf_counter() - t
    peak = dev.memory_stats().get("peak_bytes_in_use", 0)
    print(f"ours: {codes.shape} codes; first call {first:.1f} s (with compile), second {again:.1f} s; "
          f"peak {peak / 2**30:.1f} GiB")
    return 0


def run_transformers(mem_fraction):
    import torch
    from transformers import JanusConfig, JanusForConditionalGeneration, JanusVisionConfig, JanusVQVAEConfig, LlamaConfig

    torch.cuda.set_per_process_memory_fraction(mem_fraction)
    text = LlamaConfig(vocab_size=102400, hidden_size=4096, intermediate_size=11008, num_hidden_layers=30,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=16384,
                       bos_token_id=100000, eos_token_id=100001, pad_token_id=100015)
    cfg = JanusConfig(text_config=text, vision_config=JanusVisionConfig(projection_dim=4096),
                      vq_config=JanusVQVAEConfig(projection_dim=4096, image_token_embed_dim=4096),
                      image_token_id=100594)
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        model = JanusForConditionalGeneration(cfg).eval()
    gc = model.generation_config
    gc.pad_token_id, gc.bos_token_id, gc.eos_token_id = 100015, 100000, 100001
    gc.generation_kwargs = {"boi_token_id": 100016}
    limit = torch.cuda.get_device_properties(0).total_memory * mem_fraction
    print(f"transformers: limit {limit / 2**30:.1f} GiB, params "
          f"{sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30:.1f} GiB bf16")
    ids = torch.tensor([[100000] + list(range(100, 100 + PROMPT_LEN - 2)) + [100016]], device="cuda")
    t = time.perf_counter()
    try:
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_mode="image", do_sample=True,
                                 guidance_scale=5.0, num_return_sequences=NUM_IMAGES)
    except torch.OutOfMemoryError as e:
        print(f"transformers: OUT OF MEMORY after {time.perf_counter() - t:.1f} s "
              f"(peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB): {str(e)[:200]}")
        return 1
    print(f"transformers: {tuple(out.shape)} codes in {time.perf_counter() - t:.1f} s, "
          f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", choices=["ours", "transformers"])
    p.add_argument("--max-batch", type=int, default=None)
    p.add_argument("--mem-fraction", type=float, default=0.29)
    args = p.parse_args(argv)
    run_ours(args.max_batch) if args.which == "ours" else run_transformers(args.mem_fraction)
    return 0


if __name__ == "__main__":
    sys.exit(main())
