"""unimm-generate --checkpoint DIR --prompt TEXT [--num-images N --cfg W --temperature T --top-k K
                 --top-p P --seed S --steps N --max-batch B] --out DIR

Text-to-image with a Janus checkpoint (VQ tokens + CFG, decoded by the VQ decoder) or, when the
loaded model offers `generate_images_flow`, with JanusFlow's rectified-flow sampler. Writes one
PNG per image and grid.png. DIR may also be a training workdir (its model/ is loaded).
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

JANUS_CFG, FLOW_CFG = 5.0, 2.0


def decode_in_chunks(model, codes: np.ndarray, batch: int, progress: bool) -> np.ndarray:
    """VQ-decodes int32 [N, n_codes] a few images at a time (a 384 px decode is memory-hungry)."""
    from unimm_jax.sample.batching import run_chunked

    batch = max(1, min(batch, len(codes)))
    return run_chunked(lambda idx: model.vq_decode(codes[idx]), len(codes), batch, progress, "vq decode")


def generate(args) -> list[str]:
    import unimm_jax as uj
    from unimm_jax.data.chat_format import generation_prompt_ids
    from unimm_jax.data.text_tokenizer import load_text_tokenizer
    from unimm_jax.sample.images import save_images

    model = uj.load_pretrained(args.checkpoint)
    tok = load_text_tokenizer(model.checkpoint_dir)
    ids = [generation_prompt_ids(tok, args.prompt, model.config.tokens)]
    if hasattr(model, "generate_images_flow"):
        images = model.generate_images_flow(ids, num_images=args.num_images, steps=args.steps,
                                            cfg_weight=FLOW_CFG if args.cfg is None else args.cfg, seed=args.seed)
    else:
        codes = model.generate_image_tokens(
            ids, num_images=args.num_images, cfg_weight=JANUS_CFG if args.cfg is None else args.cfg,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
            max_batch=args.max_batch, progress=True)
        images = decode_in_chunks(model, codes, args.max_batch or 4, progress=True)
    return save_images(np.asarray(images), args.out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="unimm-generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (hf, deepseek, unimm) or training workdir")
    p.add_argument("--prompt", required=True, help="text description of the image")
    p.add_argument("--out", required=True, help="output directory for the PNGs")
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--cfg", type=float, default=None, help=f"CFG weight (default {JANUS_CFG} Janus, {FLOW_CFG} JanusFlow)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=30, help="flow steps (JanusFlow only)")
    p.add_argument("--max-batch", type=int, default=None, help="images decoded at once (default: what fits)")
    args = p.parse_args(argv)
    try:
        paths = generate(args)
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError; FileNotFoundError an OSError
        print(f"unimm-generate: error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
