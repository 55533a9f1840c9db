"""JanusFlow sampling: the prompt's KV cache computed once vs re-running the prompt at every step.

    python benchmarks/flow_sampling.py [--size cpu|1.3b] [--prompt-lens 40 256] [--num-images 5]
                                       [--steps 30] [--cfg 2.0] [--iters 3]

Both variants are the same jitted function (`unimm_jax.flow_api.sample_flow_latents`): 30 Euler
steps with classifier-free guidance ([cond; uncond] rows, the unconditional prompt masked), the
whole loop under one jit. `use_cache=False` recomputes the prompt through the LLM at every step,
as DeepSeek's demo does in effect (its cache loop iterates an empty list); `use_cache=True`
prefills it once (per prompt, shared by its num_images copies) and runs only the time token +
latent tokens per step. Random weights (speed does not depend on them). Prints the median
wall time of `iters` runs after a compile+warm-up call, and the ratio uncached / cached.

Sizes: "cpu" = a small model for a laptop CPU (LLM 256 wide x 4 layers, 192 px -> 24x24x4
latents -> 144 latent tokens); "1.3b" = JanusFlow-1.3B's sizes in bfloat16 (576 latent tokens).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from unimm_jax.flow_api import JanusFlowModel
from unimm_jax.models.janusflow_config import janusflow_1_3b_config, janusflow_model_config, num_latent_tokens
from unimm_jax.train.flow_step import init_flow_params


def model_config(size: str):
    if size == "1.3b":
        return janusflow_1_3b_config(dtype="bfloat16", repa_enabled=False)
    if size == "cpu":
        return janusflow_model_config(
            vocab_size=1024, hidden_size=256, num_layers=4, num_heads=4, intermediate_size=688,
            vision_hidden=64, vision_layers=1, vision_heads=2, image_size=192, patch_size=16,
            gen_width=128, gen_layers_in_middle=2, repa_enabled=False, image_token_id=1000,
            boi_token_id=1001, eoi_token_id=1002, pad_token_id=1003, bos_token_id=1, eos_token_id=2)
    raise SystemExit(f"unknown --size {size!r}; use cpu or 1.3b")


def timed(fn, iters: int) -> tuple[float, float]:
    """(first call incl. compile, median of `iters` later calls) in seconds."""
    t = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return first, statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="cpu", choices=("cpu", "1.3b"))
    p.add_argument("--prompt-lens", type=int, nargs="+", default=[40, 256])
    p.add_argument("--num-images", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--cfg", type=float, default=2.0)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--attention", default="xla", help="llm.attention_impl of the uncached full passes "
                   "(cached steps always use the masked xla path)")
    args = p.parse_args(argv)

    cfg = model_config(args.size)
    cfg.llm.attention_impl = args.attention
    cfg.llm.max_position_embeddings = max(cfg.llm.max_position_embeddings, max(args.prompt_lens) + 1024)
    params = init_flow_params(cfg, jax.random.key(0))
    params = jax.tree.map(lambda x: x.astype(jnp.dtype(cfg.llm.dtype)), params)
    model = JanusFlowModel(cfg, params)
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}, {platform.processor() or platform.machine()}")
    print(f"model: {args.size} (LLM {cfg.llm.hidden_size}x{cfg.llm.num_layers}, {num_latent_tokens(cfg)} latent tokens, "
          f"{cfg.llm.dtype}, attention {args.attention}); {args.steps} steps, cfg {args.cfg}, {args.num_images} images of 1 prompt")
    rows = []
    for length in args.prompt_lens:
        rng = np.random.default_rng(length)
        ids = rng.integers(3, 900, (1, length)).astype(np.int32)
        ids[0, 0], ids[0, -1] = cfg.tokens.bos_token_id, cfg.tokens.boi_token_id
        res = {}
        for use_cache in (True, False):
            res[use_cache] = timed(lambda: model.generate_latents_flow(
                ids, num_images=args.num_images, steps=args.steps, cfg_weight=args.cfg, seed=0, use_cache=use_cache),
                args.iters)
        a = np.asarray(model.generate_latents_flow(ids, num_images=args.num_images, steps=args.steps, seed=0))
        b = np.asarray(model.generate_latents_flow(ids, num_images=args.num_images, steps=args.steps, seed=0,
                                                   use_cache=False))
        row = dict(prompt_len=length, cached_s=res[True][1], uncached_s=res[False][1],
                   speedup=res[False][1] / res[True][1], compile_cached_s=res[True][0],
                   compile_uncached_s=res[False][0], max_abs_diff=float(np.abs(a - b).max()))
        rows.append(row)
        print(f"prompt {length:5d}: cached {row['cached_s']:.3f} s, uncached {row['uncached_s']:.3f} s, "
              f"uncached/cached {row['speedup']:.2f}x (first call {row['compile_cached_s']:.1f} / "
              f"{row['compile_uncached_s']:.1f} s); max |cached - uncached| = {row['max_abs_diff']:.2e}")
    print(json.dumps(dict(device=dev.device_kind, size=args.size, steps=args.steps, num_images=args.num_images,
                          rows=rows)))


if __name__ == "__main__":
    main()
