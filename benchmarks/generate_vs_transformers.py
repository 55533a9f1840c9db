"""Image-token generation speed: our jitted sampler against transformers' Janus generate.

    python benchmarks/generate_vs_transformers.py [--layers 4] [--hidden 512] [--batch 4]
                                                  [--repeats 3] [--text-tokens 64]

The same random model (transformers' JanusForConditionalGeneration, converted with
load_pretrained) and the same prompts: `--batch` prompts with CFG (2x rows), 256 image tokens
(16x16 VQ grid), greedy so both must produce identical tokens (checked). Both sides are warmed
up first (our compile time is reported separately); the median of `--repeats` timed runs is
compared. Also times text generation with an image in the prompt (`--text-tokens` new tokens,
no early EOS). Prints one line per measurement and the ratios (transformers time / ours).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np


def hf_model(layers: int, hidden: int, seed: int = 0):
    import torch
    from transformers import (JanusConfig, JanusForConditionalGeneration, JanusVisionConfig, JanusVQVAEConfig,
                              LlamaConfig)

    text = LlamaConfig(vocab_size=4096, hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                       num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, max_position_embeddings=1024,
                       rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=4003)
    vision = JanusVisionConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=256, patch_size=16,
                               projection_dim=hidden, depth=2, num_image_tokens=256)
    vq = JanusVQVAEConfig(embed_dim=8, num_embeddings=16384, latent_channels=32, base_channels=32,
                          channel_multiplier=[1, 1, 2, 2, 4], num_res_blocks=1, projection_dim=hidden,
                          image_token_embed_dim=hidden, num_hidden_layers=2, num_patches=16)
    cfg = JanusConfig(text_config=text, vision_config=vision, vq_config=vq, image_token_id=4000)
    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    gc = model.generation_config
    gc.pad_token_id, gc.bos_token_id, gc.eos_token_id = 4003, 1, 2
    gc.generation_kwargs = {"boi_token_id": 4001}
    return model


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=24)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--text-tokens", type=int, default=64, help="0 skips the text benchmark")
    p.add_argument("--skip-image", action="store_true", help="only the text benchmark")
    args = p.parse_args(argv)

    import jax
    import torch

    import unimm_jax as uj

    hf = hf_model(args.layers, args.hidden)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d, safe_serialization=True)
        ours = uj.load_pretrained(d)
    rng = np.random.default_rng(0)
    prompts = np.concatenate([np.ones((args.batch, 1), int), rng.integers(3, 3900, (args.batch, args.prompt_len - 2)),
                              np.full((args.batch, 1), 4001)], axis=1)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__} "
          f"({jax.default_backend()}), torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"model: {args.layers} layers, hidden {args.hidden}, 256 image tokens, batch {args.batch} x CFG, "
          f"prompt {args.prompt_len} tokens")

    ids = torch.tensor(prompts)
    def run_hf():
        with torch.no_grad():
            return hf.generate(ids, attention_mask=torch.ones_like(ids), generation_mode="image", do_sample=False,
                               guidance_scale=5.0).numpy()

    def run_ours():
        return ours.generate_image_tokens(prompts, cfg_weight=5.0, temperature=0)

    if not args.skip_image:
        t0 = time.perf_counter()
        run_ours()
        compile_s = time.perf_counter() - t0
        run_hf()  # warm-up
        t_hf, ref = timed(run_hf, args.repeats)
        t_ours, got = timed(run_ours, args.repeats)
        same = np.array_equal(ref, got)
        print(f"image tokens: transformers {t_hf:.3f} s, ours {t_ours:.3f} s (first call incl. compile {compile_s:.1f} s), "
              f"ratio {t_hf / t_ours:.2f}x, identical tokens: {same}")
        if not same:
            print(f"  tokens differ in {(ref != got).mean():.1%} of positions", file=sys.stderr)

    if args.text_tokens:
        n = args.text_tokens
        und = np.concatenate([np.ones((args.batch, 1), int), rng.integers(3, 3900, (args.batch, 4)),
                              np.full((args.batch, 256), 4000), rng.integers(3, 3900, (args.batch, 8))], axis=1)
        px = rng.uniform(-1, 1, (args.batch, 256, 256, 3)).astype(np.float32)
        hf.generation_config.eos_token_id = None  # no early stop: both decode exactly n tokens
        ours.config.tokens.eos_token_id = -1
        tids, tpx = torch.tensor(und), torch.tensor(px).permute(0, 3, 1, 2)

        def run_hf_text():
            with torch.no_grad():
                return hf.generate(tids, pixel_values=tpx, attention_mask=torch.ones_like(tids), max_new_tokens=n,
                                   min_new_tokens=n, do_sample=False).numpy()[:, und.shape[1]:]

        def run_ours_text():
            return ours.generate_text(und, px, max_new_tokens=n)

        t0 = time.perf_counter()
        run_ours_text()
        compile_s = time.perf_counter() - t0
        run_hf_text()
        t_hf, ref = timed(run_hf_text, args.repeats)
        t_ours, got = timed(run_ours_text, args.repeats)
        print(f"text ({n} tokens, image in prompt): transformers {t_hf:.3f} s, ours {t_ours:.3f} s (first call incl. "
              f"compile {compile_s:.1f} s), ratio {t_hf / t_ours:.2f}x, identical tokens: {np.array_equal(ref, got)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
