"""Pretraining the understanding encoder (SigLIP tower) on the shapes world, before the LLM.

Janus starts from a SigLIP pretrained on billions of image-text pairs; the default job has no
such checkpoint, so it pretrains its tiny SigLIP here with SigLIP's own kind of objective: a
sigmoid loss of the pooled image embedding against a fixed set of text concepts. The concepts
are read from each training image's caption (which names exactly the objects in the scene):

    z = W @ mean_tokens(SigLIP(image)) + b                     [C + 3] logits
    loss = sum_c BCE(z_c, [caption names (colour, shape) pair c])      C = 6 colours x 3 shapes
           + CE(z[C:], number of objects - 1)                          one / two / three

Why: trained through the LLM alone, the from-scratch vision tower does not learn shapes within
the CPU budget, and the LLM settles on the answer priors; with a pretrained tower the LLM learns
to read the image tokens (measured in benchmarks/RESULTS.md, "Default job").

Output: `W/vision/params` (the `vision` subtree of the Janus params, orbax) and
`W/vision/metrics.jsonl`; `pretrain_vision` is a no-op when the params are already there, and
the params are written only when the stage has finished (an interrupted stage reruns).
"""
from __future__ import annotations

import os
import shutil
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import linen as nn

from unimm_jax.data import shapes
from unimm_jax.models.siglip import SigLIPEncoder
from unimm_jax.train.checkpoint import load_params, save_params
from unimm_jax.train.metrics import MetricsLogger

PARAMS_DIR, DONE_FILE = "params", "DONE"
CONCEPTS: tuple[tuple[str, str], ...] = tuple((c, s) for c in shapes.COLORS for s in shapes.SHAPES)
MAX_OBJECTS = 3


def vision_pretrain_block(**overrides) -> ml_collections.ConfigDict:
    """`config.vision_pretrain`: the optional SigLIP pretraining stage (num_steps 0 = off)."""
    cfg = dict(
        num_steps=0,  # 0: no pretraining (the vision tower starts from its random init)
        batch_size=128,
        learning_rate=3e-3,
        warmup_steps=30,
        num_images=12000,  # train-split images held in memory (uint8) and sampled from
        log_every=100,
    )
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def concept_targets(captions) -> tuple[np.ndarray, np.ndarray]:
    """(float32 [n, C] multi-hot of the (colour, shape) pairs each caption names, int32 [n]
    number of objects - 1). Raises ValueError for a caption outside the shapes grammar."""
    multi_hot = np.zeros((len(captions), len(CONCEPTS)), np.float32)
    counts = np.zeros(len(captions), np.int32)
    for i, caption in enumerate(captions):
        objects = shapes.parse_prompt(caption).objects
        for obj in objects:
            multi_hot[i, CONCEPTS.index(tuple(obj))] = 1.0
        counts[i] = len(objects) - 1
    return multi_hot, counts


class ConceptProbe(nn.Module):
    """SigLIP tower + a linear concept head on its mean-pooled tokens.

    images float32 [B, H, W, 3] in [-1, 1] -> logits float32 [B, C + 3] (C concept logits, then
    the 3 count logits). Its `vision` subtree has the layout of the Janus `vision` params.
    """

    vision_cfg: ml_collections.ConfigDict

    @nn.compact
    def __call__(self, images):
        pooled = SigLIPEncoder(self.vision_cfg, name="vision")(images).mean(axis=1)
        return nn.Dense(len(CONCEPTS) + MAX_OBJECTS, name="concept_head")(pooled).astype(jnp.float32)


def concept_loss(logits, multi_hot, counts) -> jax.Array:
    """Mean over images of (sum of per-concept sigmoid BCE + count CE): float32 scalar."""
    c = len(CONCEPTS)
    bce = optax.sigmoid_binary_cross_entropy(logits[:, :c], multi_hot).sum(-1)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, c:], counts)
    return jnp.mean(bce + ce)


def concept_accuracy(logits, multi_hot, counts) -> dict:
    """{"concept": per-concept accuracy, "exact": all concepts right, "count": count accuracy}."""
    logits = np.asarray(logits)
    c = len(CONCEPTS)
    right = (logits[:, :c] > 0) == (multi_hot > 0)
    return {"concept": float(right.mean()), "exact": float(right.all(1).mean()),
            "count": float((logits[:, c:].argmax(1) == counts).mean())}


def _load_split(data_cfg, split: str, n: int):
    """(uint8 images [n, S, S, 3], multi-hot, counts) of the first n readable records of split."""
    from unimm_jax.data import pipeline

    records = pipeline.first_readable_records(data_cfg, split, n)
    if not records:
        raise ValueError(f"the {split!r} split of {data_cfg.data_dir!r} has no readable records.")
    return (np.stack([r["image"] for r in records]), *concept_targets([r["caption"] for r in records]))


def pretrain_vision(vision_cfg, pre_cfg, data_cfg, out_dir, *, seed: int = 0) -> dict:
    """Trains the SigLIP tower into `out_dir` (see module doc); returns {"params", "metrics"}.

    vision_cfg: config.model.vision; pre_cfg: `vision_pretrain_block()`; data_cfg: config.data.
    "params" is the `vision` params subtree (numpy); "metrics" the test-split concept accuracy.
    Every process runs the same steps on the same images (the stage is small), so the result is
    identical everywhere; process 0 writes it.
    """
    out_dir = os.fspath(out_dir)
    if os.path.isfile(os.path.join(out_dir, DONE_FILE)):  # written last: the params are complete
        logging.info("vision tower already pretrained in %s; loading it.", out_dir)
        return {"params": load_vision(out_dir), "metrics": {}}
    if pre_cfg.num_steps <= 0:
        raise ValueError("vision_pretrain.num_steps must be > 0 to pretrain the vision tower.")
    images, multi_hot, counts = _load_split(data_cfg, "train", int(pre_cfg.num_images))
    test = _load_split(data_cfg, "test", 500)
    test_x = jnp.asarray(test[0], jnp.float32) / 127.5 - 1.0

    model = ConceptProbe(vision_cfg)
    params = nn.unbox(model.init(jax.random.PRNGKey(seed), test_x[:1])["params"])
    sched = optax.warmup_cosine_decay_schedule(
        0.0, pre_cfg.learning_rate, pre_cfg.warmup_steps, max(pre_cfg.num_steps, pre_cfg.warmup_steps + 1),
        0.05 * pre_cfg.learning_rate)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, b2=0.98, weight_decay=0.05))
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y, n):
        x = x.astype(jnp.float32) / 127.5 - 1.0
        loss, grads = jax.value_and_grad(lambda p: concept_loss(model.apply({"params": p}, x), y, n))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    predict = jax.jit(lambda p, x: model.apply({"params": p}, x))
    rng = np.random.default_rng([seed, 7])
    os.makedirs(out_dir, exist_ok=True)
    logger = MetricsLogger(out_dir, use_tensorboard=False) if jax.process_index() == 0 else None
    t0, losses = time.perf_counter(), []
    for i in range(1, int(pre_cfg.num_steps) + 1):
        j = rng.integers(0, len(images), int(pre_cfg.batch_size))
        params, opt_state, loss = step(params, opt_state, images[j], multi_hot[j], counts[j])
        losses.append(float(loss))
        if not np.isfinite(losses[-1]):
            raise FloatingPointError(f"vision pretraining loss is {losses[-1]} at step {i}; "
                                     "lower vision_pretrain.learning_rate.")
        if logger is not None and (i % int(pre_cfg.log_every) == 0 or i == pre_cfg.num_steps):
            logger.write(i, {"loss": float(np.mean(losses[-int(pre_cfg.log_every):])),
                             "lr": float(sched(i)), "seconds": time.perf_counter() - t0})
    metrics = concept_accuracy(predict(params, test_x), test[1], test[2])
    logging.info("vision pretraining: %d steps in %.0f s, test %s", pre_cfg.num_steps,
                 time.perf_counter() - t0, metrics)
    vision = jax.device_get(params["vision"])
    if jax.process_index() == 0:
        if logger is not None:
            logger.write(int(pre_cfg.num_steps), {f"test/{k}": v for k, v in metrics.items()})
            logger.close()
        target = os.path.join(out_dir, PARAMS_DIR)
        if os.path.isdir(target):  # killed while writing it last time
            shutil.rmtree(target)
        save_params(target, vision)
        with open(os.path.join(out_dir, DONE_FILE), "w") as f:
            f.write(f"{metrics}\n")
    return {"params": vision, "metrics": metrics}


def load_vision(directory) -> dict:
    """The `vision` params subtree saved by `pretrain_vision` (numpy leaves)."""
    return jax.device_get(load_params(os.path.join(os.fspath(directory), PARAMS_DIR)))
