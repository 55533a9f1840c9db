"""unimm-chat --checkpoint DIR --image PATH --question TEXT [--max-new-tokens N --temperature T
             --top-k K --top-p P --seed S]

Asks a Janus checkpoint a question about one image (DeepSeek's chat template with the
understanding system prompt) and prints the answer as the last line of output (newlines inside
the answer are folded to spaces so that this holds). DIR may also be a training workdir.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

DEFAULT_MAX_NEW_TOKENS = 512


def answer(args) -> str:
    import unimm_jax as uj
    from unimm_jax.data.chat_format import understanding_prompt_ids
    from unimm_jax.data.text_tokenizer import load_text_tokenizer
    from unimm_jax.models.janus_config import num_understanding_tokens
    from unimm_jax.sample.images import load_image

    model = uj.load_pretrained(args.checkpoint)
    cfg = model.config
    tok = load_text_tokenizer(model.checkpoint_dir)
    pixels = load_image(args.image, cfg.vision.image_size)
    ids = understanding_prompt_ids(tok, args.question, cfg.tokens, num_understanding_tokens(cfg))
    room = cfg.llm.max_position_embeddings - len(ids)
    if room < 1:
        raise ValueError(f"the question makes a {len(ids)}-token prompt, which fills the model's context of "
                         f"{cfg.llm.max_position_embeddings} tokens; ask a shorter question.")
    new = args.max_new_tokens if args.max_new_tokens is not None else min(DEFAULT_MAX_NEW_TOKENS, room)
    out = model.generate_text([ids], pixels, max_new_tokens=new, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed)[0]
    eos = np.flatnonzero(out == cfg.tokens.eos_token_id)
    out = out[: eos[0]] if eos.size else out
    return " ".join(tok.decode(out.tolist()).split())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="unimm-chat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (hf, deepseek, unimm) or training workdir")
    p.add_argument("--image", required=True, help="image file (PNG, JPEG, ...)")
    p.add_argument("--question", required=True)
    p.add_argument("--max-new-tokens", type=int, default=None, help=f"default: {DEFAULT_MAX_NEW_TOKENS} or what fits")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        text = answer(args)
    except (ValueError, OSError) as e:
        print(f"unimm-chat: error: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
