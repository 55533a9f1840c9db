"""`unimm-train` for JanusFlow (config.kind == "janusflow"): the data, export and evaluation
around the shared trainer (`loop.train`, which takes the flow step via `flow_step.FLOW_HOOKS`).

    run_flow(config, workdir)    # what loop.run does for a JanusFlow config

  1. the shapes world is built into W/data (as for the Janus job);
  2. `loop.train` trains text-to-image rectified flow + REPA with the same machinery as Janus:
     mesh + shardings from the config, orbax checkpoints with the Grain iterator state (re-running
     resumes), SIGTERM save, metrics.jsonl; the batches come from `make_flow_data_iterator`;
  3. W/model: the unimm checkpoint + tokenizer.json (`unimm_jax.load_pretrained(W)`,
     `unimm-generate --checkpoint W`);
  4. W/eval.json + W/samples.png: `evaluate_flow` samples the same held-out prompts as the Janus
     eval (`shapes.generation_prompts("test", n, seed)`) and scores them with the same GenEval-style
     scorer (`shapes_scorer.score_batch`), overall and per prompt kind.

Text-to-image only: understanding examples (SigLIP -> und_aligner, answer loss) are not mixed in
(config.data.mixture is not read), so the exported model's understanding path is untrained.

Batches (FLOW_BATCH_FIELDS, numpy, `data.batch_size // process_count` rows per process):
  input_ids      int32 [B, L]: BOS + chat template of the caption + <begin_of_image>, left padded
                 with pad_token_id to L = the longest shapes-world prompt (one compiled shape)
  attention_mask int32 [B, L]: 1 = real token
  latents        float32 [B, S/f, S/f, 3f^2]: the images' pixel patches (latent.kind "space_to_depth")
  pixel_values   float32 [B, S, S, 3] in [-1, 1]: the images (REPA target)
The condition drop for classifier-free guidance happens inside the loss (model.flow.cond_drop_rate).
"""
from __future__ import annotations

import functools
import json
import os
import time

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from unimm_jax.data import pipeline, shapes, shapes_vocab
from unimm_jax.data.chat_format import generation_prompt_ids
from unimm_jax.data.shapes_vocab import build_shapes_tokenizer
from unimm_jax.data.text_tokenizer import TOKENIZER_FILE
from unimm_jax.models.janusflow import images_to_latents
from unimm_jax.train.flow_step import synthetic_flow_batch

_FLOW_TAG = 11  # shuffle-seed tag of the flow stream (pipeline.py's tasks use 1-3, the VQ 99)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def max_prompt_length(tokenizer, tokens) -> int:
    """The longest generation prompt (ids) over every caption the shapes world can produce."""
    return max(len(generation_prompt_ids(tokenizer, c, tokens)) for c in shapes_vocab.all_captions())


def left_pad(prompts, length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Lists of ids -> (ids int32 [B, length], mask int32 [B, length]) padded on the left."""
    ids = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for i, p in enumerate(prompts):
        if len(p) > length:
            raise ValueError(f"prompt {i} has {len(p)} tokens, more than the padded length {length}.")
        ids[i, length - len(p):], mask[i, length - len(p):] = p, 1
    return ids, mask


def _format_flow(rec, *, tokenizer, tokens, length):
    """A shapes-world record -> one unbatched flow example (prompt row + uint8 image)."""
    ids, mask = left_pad([generation_prompt_ids(tokenizer, rec["caption"], tokens)], length, tokens["pad_token_id"])
    return dict(input_ids=ids[0], attention_mask=mask[0], image=rec["image"])


def _to_flow_batch(batch, *, model_cfg):
    """Stacked examples -> FLOW_BATCH_FIELDS (numpy): the images become pixel-patch latents."""
    images = np.asarray(batch["image"], np.float32) / 127.5 - 1.0  # the pipeline's normalisation
    return dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                latents=np.asarray(images_to_latents(images, model_cfg), np.float32), pixel_values=images)


def make_flow_dataset(config, *, tokenizer=None, process_index: int = 0, process_count: int = 1,
                      source=None) -> grain.IterDataset:
    """This process's infinite Grain IterDataset of flow batches (see the module docstring).

    config.data.source "shapes": the shapes-world train split (config.data.data_dir, or `source`,
    a random-access source of shapes-world records), shuffled by data.seed and reshuffled every
    epoch, this process's slice [process_index::process_count]. "synthetic": random batches.
    Deterministic in data.seed, and its iterator's state is saved with the checkpoints.
    """
    m, d = config.model, config.data
    rows = pipeline._check_sharding(int(d.batch_size), process_index, process_count)
    if d.get("source", "shapes") == "synthetic":
        from unimm_jax.train.loop import SyntheticSource  # loop imports this module lazily too

        return grain.MapDataset.source(
            SyntheticSource(lambda i: synthetic_flow_batch(m, d.batch_size, int(d.get("prompt_len", 12)), config.seed, i),
                            d.batch_size, process_index, process_count)).to_iter_dataset()
    if d.get("source", "shapes") != "shapes":
        raise ValueError(f"data.source={d.source!r} is not one of 'shapes', 'synthetic'.")
    if m.latent.get("kind", "vae") != "space_to_depth":
        raise ValueError("the JanusFlow trainer builds pixel-patch latents (model.latent.kind='space_to_depth'); "
                         "a 'vae' config needs VAE-encoded latents, which this pipeline does not compute.")
    if int(d.image_size) != m.vision.image_size or m.latent.image_size != m.vision.image_size:
        raise ValueError(f"data.image_size={d.image_size} must equal model.vision.image_size="
                         f"{m.vision.image_size} and model.latent.image_size={m.latent.image_size}.")
    tokenizer = tokenizer or build_shapes_tokenizer()
    tokens = dict(m.tokens)
    records = grain.MapDataset.source(pipeline._open_records(d, "train", source))
    ds = records.shuffle(seed=pipeline._derive_seed(d.seed, _FLOW_TAG)).repeat()
    ds = ds.map(functools.partial(_format_flow, tokenizer=tokenizer, tokens=tokens,
                                  length=max_prompt_length(tokenizer, tokens)))
    threads = int(d.get("read_threads", 4))
    ds = ds[process_index::process_count].to_iter_dataset(
        grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(16, 2 * rows)))
    return ds.batch(rows, drop_remainder=True).map(functools.partial(_to_flow_batch, model_cfg=m))


def make_flow_data_iterator(config, *, tokenizer=None, source=None) -> grain.DatasetIterator:
    """`iter(make_flow_dataset(...))` for this process: checkpointable (get_state / set_state)."""
    if config.data.batch_size % jax.process_count():
        raise ValueError(f"data.batch_size={config.data.batch_size} must divide over {jax.process_count()} processes.")
    return iter(make_flow_dataset(config, tokenizer=tokenizer, process_index=jax.process_index(),
                                  process_count=jax.process_count(), source=source))


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def generate_flow_images(model, tokenizer, prompts, *, steps: int, cfg_weight: float, seed: int,
                         batch: int = 64) -> np.ndarray:
    """float32 [len(prompts), H, W, 3] in [-1, 1]: one image per prompt, `batch` prompts per call.

    Prompts are left padded to the longest shapes-world prompt, so every call has one shape;
    chunk k draws its noise from seed + k.
    """
    tokens = dict(model.config.tokens)
    length = max_prompt_length(tokenizer, tokens)
    out = []
    for k, start in enumerate(range(0, len(prompts), batch)):
        chunk = [generation_prompt_ids(tokenizer, p, tokens) for p in prompts[start:start + batch]]
        chunk += [chunk[-1]] * (batch - len(chunk))  # a full chunk: one compiled shape
        ids, mask = left_pad(chunk, length, tokens["pad_token_id"])
        images = model.generate_images_flow(ids, attention_mask=mask, steps=steps, cfg_weight=cfg_weight,
                                            seed=seed + k)
        out.append(np.asarray(images)[: len(prompts) - start])
    return np.concatenate(out)


def evaluate_flow(model, tokenizer, eval_cfg, out_dir) -> dict:
    """GenEval-style generation accuracy of a JanusFlow model -> out_dir/eval.json + samples.png.

    eval_cfg (config.eval): num_generation held-out prompts (shapes.generation_prompts("test",
    n, seed), the Janus eval's prompts), steps Euler steps, cfg_weight, seed, grid_rows (the
    samples grid has one column per prompt kind, since the prompts cycle through the kinds).
    Returns {"generation": score_batch's dict + per-prompt results, "settings", "seconds"}.
    """
    from unimm_jax.evals import shapes_eval, shapes_scorer

    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    prompts = shapes.generation_prompts("test", int(eval_cfg.num_generation), int(eval_cfg.seed))
    images = generate_flow_images(model, tokenizer, prompts, steps=int(eval_cfg.steps),
                                  cfg_weight=float(eval_cfg.cfg_weight), seed=int(eval_cfg.seed),
                                  batch=int(eval_cfg.get("batch_size", 64)))
    gen = shapes_scorer.score_batch(prompts, images)
    gen["results"] = [dict(prompt=p, correct=bool(r["correct"]), kind=r["kind"], reason=r["reason"])
                      for p, r in zip(prompts, gen["results"])]
    cols = len(shapes.CAPTION_KINDS)
    rows = min(int(eval_cfg.get("grid_rows", 8)), len(images) // cols)
    shapes_eval.save_grid(images[: rows * cols], os.path.join(out_dir, shapes_eval.SAMPLES_FILE), cols=cols)
    gen["samples"] = shapes_eval.SAMPLES_FILE
    gen["sample_kinds"] = list(shapes.CAPTION_KINDS)  # column order of samples.png
    result = {"settings": {k: eval_cfg[k] for k in eval_cfg}, "generation": gen,
              "seconds": {"generation": time.perf_counter() - t0}}
    with open(os.path.join(out_dir, shapes_eval.EVAL_FILE), "w") as f:
        json.dump(result, f, indent=2)
    return result


# ---------------------------------------------------------------------------------------------
# The whole job
# ---------------------------------------------------------------------------------------------


def export_flow_model(model_cfg, params, tokenizer, out_dir) -> str:
    """W/model: params (gathered to host) + config in the unimm layout + tokenizer.json; process 0 writes."""
    import unimm_jax as uj
    from unimm_jax.flow_api import JanusFlowModel

    out_dir = os.fspath(out_dir)
    if jax.process_index() != 0:
        return out_dir
    host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), params)
    uj.save_pretrained(JanusFlowModel(model_cfg, host), out_dir, format="unimm", overwrite=True)
    if tokenizer is not None:
        tokenizer.save(os.path.join(out_dir, TOKENIZER_FILE))
    return out_dir


def run_flow(config: ml_collections.ConfigDict, workdir) -> dict:
    """data -> `loop.train` (flow hooks) -> W/model -> W/eval.json + W/samples.png; returns the
    summary {"step", "stopped_early", "last", "eval"?}. A preempted run returns before exporting;
    re-running resumes."""
    from unimm_jax.flow_api import JanusFlowModel
    from unimm_jax.train import loop

    workdir = os.path.abspath(os.fspath(workdir))
    loop.check_config(config)
    if config.data.get("source", "shapes") == "shapes":
        tokenizer, _ = loop._shapes_setup(config, workdir)
    else:
        tokenizer = build_shapes_tokenizer()
    out = loop.train(config, workdir, tokenizer=tokenizer)
    trainer = out.pop("trainer")
    if out["stopped_early"]:
        return out
    model_dir = export_flow_model(config.model, trainer.state.params, tokenizer, os.path.join(workdir, "model"))
    loop._sync("exported")
    if "eval" in config and jax.process_index() == 0:
        host = jax.tree.map(lambda x: jnp.asarray(np.asarray(jax.device_get(x))), trainer.state.params)
        res = evaluate_flow(JanusFlowModel(config.model, host), tokenizer, config.eval, workdir)
        out["eval"] = {"generation": {k: res["generation"][k] for k in ("overall", "per_kind", "n")}}
        logging.info("eval: %s (model in %s)", out["eval"], model_dir)
    return out
