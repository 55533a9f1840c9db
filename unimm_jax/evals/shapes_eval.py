"""Shapes-world evaluation of a Janus model: understanding and generation accuracy -> eval.json.

    result = evaluate(model, tokenizer, data_cfg, eval_cfg, out_dir)

  understanding: the first `num_understanding` test-split (image, question, answer) records,
                 prompted exactly as in training (chat_format + data.system_prompt), greedy
                 answers of up to `max_new_tokens` tokens, exact match after normalisation
                 (shapes_scorer.score_answers), per question kind.
  generation:    `num_generation` held-out prompts (shapes.generation_prompts("test", ...)),
                 CFG sampling (cfg_weight, temperature, top_k), VQ decode, GenEval-style
                 detection (shapes_scorer.score_batch), per prompt kind. Also "test_code_nll":
                 the teacher-forced NLL (nats per code) of the first `num_generation` test
                 images' VQ codes given their captions, overall and per caption kind: a
                 sampling-free figure (the accuracy of one run moves by several points with
                 the sampling and the init at the same loss).

Writes out_dir/eval.json ({"understanding": {...}, "generation": {...}, "settings": {...}}) and
out_dir/samples.png: a grid of the first `grid_size`^2 generated images (one row per prompt kind
order of the prompts) whose file is named in eval.json along with every prompt.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np

from unimm_jax.data import chat_format, shapes
from unimm_jax.data.text_tokenizer import TextTokenizer
from unimm_jax.evals import shapes_scorer
from unimm_jax.losses import token_cross_entropy
from unimm_jax.models.janus_config import num_understanding_tokens
from unimm_jax.sample.batching import left_pad

EVAL_FILE, SAMPLES_FILE = "eval.json", "samples.png"


def understanding_accuracy(model, tokenizer: TextTokenizer, examples, *, system_prompt: str = "",
                           max_new_tokens: int = 4) -> dict:
    """examples: [(image float32 [H,W,3] in [-1,1], question, answer, kind)] -> score_answers dict
    plus "predictions" (decoded strings)."""
    tokens = model.config.tokens
    n = num_understanding_tokens(model.config)
    prompts = [chat_format.understanding_prompt_ids(tokenizer, q, tokens, n, system_prompt=system_prompt)
               for _, q, _, _ in examples]
    images = np.stack([im for im, _, _, _ in examples]).astype(np.float32)
    out = np.asarray(model.generate_text(prompts, images, max_new_tokens=max_new_tokens, temperature=0.0))
    eos = tokens.eos_token_id
    preds = []
    for row in out:
        row = list(row)
        row = row[: row.index(eos)] if eos in row else row
        preds.append(tokenizer.decode(row).strip())
    res = shapes_scorer.score_answers([q for _, q, _, _ in examples], [a for _, _, a, _ in examples], preds)
    res["predictions"] = preds
    return res


def generate_images(model, tokenizer: TextTokenizer, prompts, *, cfg_weight: float, temperature: float,
                    top_k: int | None, seed: int) -> np.ndarray:
    """float32 [len(prompts), H, W, 3] in about [-1, 1], one image per prompt."""
    ids = [chat_format.generation_prompt_ids(tokenizer, p, model.config.tokens) for p in prompts]
    codes = model.generate_image_tokens(ids, num_images=1, cfg_weight=cfg_weight, temperature=temperature,
                                        top_k=top_k or None, seed=seed)
    return np.asarray(model.vq_decode(np.asarray(codes)))


def generation_nll(model, tokenizer: TextTokenizer, images, captions) -> np.ndarray:
    """Per-image mean teacher-forced NLL of the VQ codes, float32 [n] (nats per code).

    images: float32 [n, H, W, 3] in [-1, 1]; captions: n prompts. Prompts are left-padded to one
    length, as in sampling; the codes are the model's own VQ encoding of the images.
    """
    tokens = model.config.tokens
    ids, mask = left_pad([chat_format.generation_prompt_ids(tokenizer, c, tokens) for c in captions],
                         tokens.pad_token_id)
    codes = model.vq_encode(np.asarray(images, np.float32))
    nll = token_cross_entropy(model.image_logits(ids, codes, mask), codes)
    return np.asarray(nll.mean(-1), np.float32)


def save_grid(images, path: str, cols: int) -> np.ndarray:
    """Writes images (float [N, H, W, 3] in about [-1, 1]) as one PNG grid; returns the grid
    (uint8 [rows * (H + pad), cols * (W + pad), 3]) so callers need not read the file back."""
    from PIL import Image

    from unimm_jax.sample.images import make_grid, to_uint8

    grid = make_grid(to_uint8(images), cols=cols)
    Image.fromarray(grid).save(path)
    return grid


def evaluate(model, tokenizer: TextTokenizer, data_cfg, eval_cfg, out_dir) -> dict:
    """Runs both evaluations and writes eval.json + samples.png into out_dir; returns the dict,
    whose "generation" entry also holds "samples_grid" (the PNG's uint8 [H, W, 3] array, not in
    eval.json).

    data_cfg: config.data (test split location, system_prompt); eval_cfg: config.eval
    (num_understanding, num_generation, cfg_weight, temperature, top_k, max_new_tokens,
    grid_size, seed).
    """
    from unimm_jax.data import pipeline

    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    result = {"settings": {k: eval_cfg[k] for k in eval_cfg}}
    if eval_cfg.num_understanding:
        ex = pipeline.test_understanding_examples(data_cfg, int(eval_cfg.num_understanding))
        und = understanding_accuracy(model, tokenizer, ex, system_prompt=data_cfg.get("system_prompt", ""),
                                     max_new_tokens=int(eval_cfg.max_new_tokens))
        und["examples"] = [dict(question=q, answer=a, prediction=p)
                           for (_, q, a, _), p in zip(ex[:20], und["predictions"][:20])]
        del und["predictions"]
        result["understanding"] = und
    t1 = time.perf_counter()
    if eval_cfg.num_generation:
        prompts = shapes.generation_prompts("test", int(eval_cfg.num_generation), int(eval_cfg.seed))
        images = generate_images(model, tokenizer, prompts, cfg_weight=float(eval_cfg.cfg_weight),
                                 temperature=float(eval_cfg.temperature), top_k=int(eval_cfg.top_k or 0),
                                 seed=int(eval_cfg.seed))
        gen = shapes_scorer.score_batch(prompts, images)
        gen["results"] = [dict(prompt=p, correct=bool(r["correct"]), kind=r["kind"], reason=r["reason"])
                          for p, r in zip(prompts, gen["results"])]
        g = int(eval_cfg.get("grid_size", 8))
        grid = save_grid(images[: g * g], os.path.join(out_dir, SAMPLES_FILE), cols=g)
        gen["samples"] = SAMPLES_FILE
        test_images, captions = pipeline.test_captioned_images(data_cfg, int(eval_cfg.num_generation))
        nll = generation_nll(model, tokenizer, test_images, captions)
        kinds = [shapes.parse_prompt(c).kind for c in captions]
        gen["test_code_nll"] = {"overall": float(nll.mean()), "n": len(captions),
                                "per_kind": {k: float(nll[[i for i, x in enumerate(kinds) if x == k]].mean())
                                             for k in dict.fromkeys(kinds)}}
        result["generation"] = gen
    result["seconds"] = {"understanding": t1 - t0, "generation": time.perf_counter() - t1}
    with open(os.path.join(out_dir, EVAL_FILE), "w") as f:
        json.dump(result, f, indent=2)
    if eval_cfg.num_generation:
        result["generation"]["samples_grid"] = grid
    return result
