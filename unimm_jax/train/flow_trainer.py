"""`unimm-train` for JanusFlow (config.kind == "janusflow"): text-to-image rectified flow + REPA
on the shapes world, then export to W/model.

    train_flow(config, workdir)   # -> {"metrics": last step's metrics, "model_dir": W/model}

Each step draws `data.batch_size` shapes-world examples (deterministic per (data.seed, index)),
builds the generation prompt of each caption (`chat_format.generation_prompt_ids`, left padded),
drops a `model.flow.cond_drop_rate` share of prompts to the unconditional one inside the loss,
turns the images into latents (latent.kind "space_to_depth"; a "vae" config needs the VAE
encode step this trainer does not have yet) and runs `flow_step.flow_train_step`. Metrics go to
W/metrics.jsonl. Not yet here (the Janus trainer has them): mesh sharding, resumable orbax
checkpoints with the data iterator, understanding examples mixed into the batch.
"""
from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from unimm_jax.data import shapes
from unimm_jax.data.chat_format import generation_prompt_ids
from unimm_jax.data.shapes_vocab import build_shapes_tokenizer
from unimm_jax.data.text_tokenizer import TOKENIZER_FILE
from unimm_jax.models.janusflow import JanusFlow, check_flow_batch
from unimm_jax.models.janusflow_config import validate_janusflow_config
from unimm_jax.train.flow_step import flow_batch_from_images, flow_train_step, init_flow_params
from unimm_jax.train.metrics import MetricsLogger
from unimm_jax.train.optimizer import make_optimizer, make_schedule
from unimm_jax.train.state import TrainState


def shapes_flow_batch(config, tokenizer, index: int) -> dict:
    """Batch `index` of the shapes-world flow stream: FLOW_BATCH_FIELDS arrays (jax)."""
    m, d = config.model, config.data
    b = d.batch_size
    examples = [shapes.make_example(shapes.example_rng(d.seed, "train", index * b + i), m.vision.image_size)
                for i in range(b)]
    prompts = [generation_prompt_ids(tokenizer, ex["caption"], m.tokens) for ex in examples]
    length = max(len(p) for p in prompts)
    ids = np.full((b, length), m.tokens.pad_token_id, np.int32)
    mask = np.zeros((b, length), np.int32)
    for i, p in enumerate(prompts):
        ids[i, length - len(p):], mask[i, length - len(p):] = p, 1
    images = np.stack([ex["image"] for ex in examples]).astype(np.float32) / 127.5 - 1.0
    return flow_batch_from_images(m, ids, mask, images)


def train_flow(config, workdir) -> dict:
    """Trains config.model (family "janusflow") for config.train.num_steps; exports W/model."""
    import unimm_jax as uj
    from unimm_jax.flow_api import JanusFlowModel

    m = config.model
    validate_janusflow_config(m)
    if m.latent.get("kind", "vae") != "space_to_depth":
        raise ValueError("train_flow trains pixel-patch latents (model.latent.kind='space_to_depth'); "
                         "a 'vae' config needs latents from a VAE encoder, which this trainer does not run yet.")
    workdir = os.path.abspath(os.fspath(workdir))
    os.makedirs(workdir, exist_ok=True)
    tokenizer = build_shapes_tokenizer()
    steps = int(config.train.num_steps)
    params = init_flow_params(m, jax.random.key(config.seed))
    tx = make_optimizer(config.optim, params, total_steps=steps)
    schedule = make_schedule(config.optim, steps)
    state = TrainState.create(params, tx, jax.random.key(config.seed + 1))
    step_fn = jax.jit(functools.partial(flow_train_step, module=JanusFlow(m), tx=tx, schedule=schedule),
                      donate_argnums=0)
    logger = MetricsLogger(workdir, use_tensorboard=False)
    metrics, every = {}, int(config.train.get("log_every", 10))
    for i in range(steps):
        batch = shapes_flow_batch(config, tokenizer, i)
        if i == 0:
            check_flow_batch(batch, m)
        t0 = time.perf_counter()
        state, metrics = step_fn(state, batch)
        if (i + 1) % every == 0 or i + 1 == steps:
            scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
            scalars["step_time_s"] = time.perf_counter() - t0
            logger.write(i + 1, scalars)
    logger.close()
    model_dir = os.path.join(workdir, "model")
    host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), state.params)
    uj.save_pretrained(JanusFlowModel(m, host), model_dir, format="unimm", overwrite=True)
    tokenizer.save(os.path.join(model_dir, TOKENIZER_FILE))
    return {"metrics": {k: float(v) for k, v in jax.device_get(metrics).items()}, "model_dir": model_dir,
            "final_loss": float(jnp.asarray(metrics["loss"]))}
