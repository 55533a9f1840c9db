"""Pretraining the understanding encoder (SigLIP tower) on the shapes world, before the LLM.

Janus starts from a SigLIP pretrained on billions of image-text pairs; the default job has no
such checkpoint, so it pretrains its tiny SigLIP here with SigLIP's own kind of objective: a
sigmoid loss of the pooled image embedding against a fixed set of text concepts. The concepts
are read from each training image's caption (which names exactly the objects in the scene):

    z = W @ mean_tokens(SigLIP(image)) + b                     [C + 3] logits
    loss = sum_c BCE(z_c, [caption names (colour, shape) pair c])      C = 6 colours x 3 shapes
           + CE(z[C:], number of objects - 1)                          one / two / three
           + token_weight * mean_tokens sum_c mask * BCE(U @ token + u, [token shows concept c])

The per-token term (`token_concept_targets`) makes every token say which objects it shows: a
patch shows (colour, shape) when >= `MIN_PIXELS` of its pixels have that palette colour and the
caption names that colour with that shape (a colour the caption gives two shapes is masked). A
linear probe of the pooled tokens answers the eval's questions at 0.85 while the LLM reading the
same tokens reached 0.71 (shape questions 0.46): pooled features are not what attention reads.

Why: trained through the LLM alone, the from-scratch vision tower does not learn shapes within
the CPU budget, and the LLM settles on the answer priors; with a pretrained tower the LLM learns
to read the image tokens (measured in benchmarks/RESULTS.md, "Default job").

Output: `W/vision/params` (the `vision` subtree of the Janus params, orbax) and
`W/vision/metrics.jsonl`; `pretrain_vision` is a no-op when the params are already there, and
the params are written only when the stage has finished. Every `checkpoint_every` steps the
probe's params and optimizer state go to `W/vision/ckpt`, so an interrupted stage (SIGTERM /
SIGINT save first) resumes from its last checkpoint and ends with the same params as a run
straight through.
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
MIN_PIXELS = 8  # object pixels that make a patch show the object (a 1-px sliver does not)


def vision_pretrain_block(**overrides) -> ml_collections.ConfigDict:
    """`config.vision_pretrain`: the optional SigLIP pretraining stage (num_steps 0 = off)."""
    cfg = dict(
        num_steps=0,  # 0: no pretraining (the vision tower starts from its random init)
        batch_size=128,
        learning_rate=3e-3,
        warmup_steps=30,
        num_images=12000,  # train-split images held in memory (uint8) and sampled from
        token_weight=0.0,  # weight of the per-token concept loss (0 = pooled concepts only)
        checkpoint_every=500,  # steps between resumable checkpoints in <vision dir>/ckpt
        log_every=100,
        # Train side by side with the VQ tokenizer stage (two threads; single-process runs whose
        # tokenizer is trained in the same job): loop._encoder_stages.
        concurrent_with_tokenizer=False,
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


def token_concept_targets(images, captions, patch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-token concept targets: (float32 [n, N, C] multi-hot, float32 [n, N, C] mask).

    images: uint8 [n, S, S, 3] shapes-world renders (exact palette colours); N = (S / patch)^2
    tokens in raster order, as SigLIP's patches. Token t shows concept (colour, shape) when
    >= MIN_PIXELS pixels of its patch have that colour and the caption names that colour only
    with that shape; a colour named with two shapes has its 3 concepts masked (0) in that image.
    """
    images = np.asarray(images)
    n, size = images.shape[:2]
    if size % patch_size:
        raise ValueError(f"image size {size} is not a multiple of patch_size {patch_size}.")
    g = size // patch_size
    patches = images.reshape(n, g, patch_size, g, patch_size, 3).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(n, g * g, patch_size * patch_size, 3)
    target = np.zeros((n, g * g, len(CONCEPTS)), np.float32)
    mask = np.ones_like(target)
    for i, caption in enumerate(captions):
        shapes_of: dict[str, set] = {}
        for color, shape in shapes.parse_prompt(caption).objects:
            shapes_of.setdefault(color, set()).add(shape)
        for color, named in shapes_of.items():
            ci = shapes.COLORS.index(color) * len(shapes.SHAPES)
            if len(named) > 1:
                mask[i, :, ci:ci + len(shapes.SHAPES)] = 0.0
                continue
            shows = (patches[i] == np.asarray(shapes.PALETTE[color], np.uint8)).all(-1).sum(-1) >= MIN_PIXELS
            target[i, shows, CONCEPTS.index((color, next(iter(named))))] = 1.0
    return target, mask


class ConceptProbe(nn.Module):
    """SigLIP tower + a linear concept head on its mean-pooled tokens + a per-token one.

    images float32 [B, H, W, 3] in [-1, 1] -> (logits float32 [B, C + 3] (C concept logits,
    then the 3 count logits), token logits float32 [B, N, C]). Its `vision` subtree has the
    layout of the Janus `vision` params.
    """

    vision_cfg: ml_collections.ConfigDict

    @nn.compact
    def __call__(self, images):
        tokens = SigLIPEncoder(self.vision_cfg, name="vision")(images)
        pooled = nn.Dense(len(CONCEPTS) + MAX_OBJECTS, name="concept_head")(tokens.mean(axis=1))
        per_token = nn.Dense(len(CONCEPTS), name="token_head")(tokens)
        return pooled.astype(jnp.float32), per_token.astype(jnp.float32)


def concept_loss(logits, multi_hot, counts) -> jax.Array:
    """Mean over images of (sum of per-concept sigmoid BCE + count CE): float32 scalar."""
    c = len(CONCEPTS)
    bce = optax.sigmoid_binary_cross_entropy(logits[:, :c], multi_hot).sum(-1)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, c:], counts)
    return jnp.mean(bce + ce)


def token_concept_loss(token_logits, target, mask) -> jax.Array:
    """Mean over images and tokens of the masked sum of per-concept sigmoid BCE: float32 scalar.
    token_logits, target, mask: [B, N, C]."""
    return jnp.mean(jnp.sum(mask * optax.sigmoid_binary_cross_entropy(token_logits, target), axis=-1))


def token_concept_accuracy(token_logits, target, mask) -> float:
    """Fraction of tokens [B, N] whose unmasked concepts [C] are all right."""
    right = ((np.asarray(token_logits) > 0) == (np.asarray(target) > 0)) | (np.asarray(mask) == 0)
    return float(right.all(-1).mean())


def concept_accuracy(logits, multi_hot, counts) -> dict:
    """{"concept": per-concept accuracy, "exact": all concepts right, "count": count accuracy}."""
    logits = np.asarray(logits)
    c = len(CONCEPTS)
    right = (logits[:, :c] > 0) == (multi_hot > 0)
    return {"concept": float(right.mean()), "exact": float(right.all(1).mean()),
            "count": float((logits[:, c:].argmax(1) == counts).mean())}


def _load_split(data_cfg, split: str, n: int, patch_size: int):
    """(uint8 images [n, S, S, 3], multi-hot, counts, token targets, token mask) of the first n
    readable records of split."""
    from unimm_jax.data import pipeline

    records = pipeline.first_readable_records(data_cfg, split, n)
    if not records:
        raise ValueError(f"the {split!r} split of {data_cfg.data_dir!r} has no readable records.")
    images, captions = np.stack([r["image"] for r in records]), [r["caption"] for r in records]
    return (images, *concept_targets(captions), *token_concept_targets(images, captions, patch_size))


def pretrain_vision(vision_cfg, pre_cfg, data_cfg, out_dir, *, seed: int = 0,
                    stop_after: int | None = None) -> dict:
    """Trains the SigLIP tower into `out_dir` (see module doc); returns {"params", "metrics",
    "stopped_early"}.

    vision_cfg: config.model.vision; pre_cfg: `vision_pretrain_block()`; data_cfg: config.data.
    "params" is the `vision` params subtree (numpy); "metrics" the test-split concept accuracy.
    Every process runs the same steps on the same images (the stage is small), so the result is
    identical everywhere; process 0 writes it. Resumes from `out_dir/ckpt`; a SIGTERM/SIGINT, or
    `stop_after` steps of this call (tests, time-boxed runs), saves a checkpoint and returns
    {"params": None, "stopped_early": True}.
    """
    from unimm_jax.train.checkpoint import Checkpointer

    out_dir = os.fspath(out_dir)
    if os.path.isfile(os.path.join(out_dir, DONE_FILE)):  # written last: the params are complete
        logging.info("vision tower already pretrained in %s; loading it.", out_dir)
        return {"params": load_vision(out_dir), "metrics": {}, "stopped_early": False}
    if pre_cfg.num_steps <= 0:
        raise ValueError("vision_pretrain.num_steps must be > 0 to pretrain the vision tower.")
    train = _load_split(data_cfg, "train", int(pre_cfg.num_images), int(vision_cfg.patch_size))
    test = _load_split(data_cfg, "test", 500, int(vision_cfg.patch_size))
    token_weight = float(pre_cfg.get("token_weight", 0.0))
    test_x = jnp.asarray(test[0], jnp.float32) / 127.5 - 1.0

    model = ConceptProbe(vision_cfg)
    params = nn.unbox(model.init(jax.random.PRNGKey(seed), test_x[:1])["params"])
    sched = optax.warmup_cosine_decay_schedule(
        0.0, pre_cfg.learning_rate, pre_cfg.warmup_steps, max(pre_cfg.num_steps, pre_cfg.warmup_steps + 1),
        0.05 * pre_cfg.learning_rate)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, b2=0.98, weight_decay=0.05))
    opt_state = tx.init(params)

    def loss_fn(p, x, y, n, token_y, token_mask):
        logits, token_logits = model.apply({"params": p}, x)
        loss = concept_loss(logits, y, n)
        if token_weight:
            loss = loss + token_weight * token_concept_loss(token_logits, token_y, token_mask)
        return loss

    @jax.jit
    def step(params, opt_state, x, *targets):
        x = x.astype(jnp.float32) / 127.5 - 1.0
        loss, grads = jax.value_and_grad(loss_fn)(params, x, *targets)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    predict = jax.jit(lambda p, x: model.apply({"params": p}, x))
    rng = np.random.default_rng([seed, 7])
    os.makedirs(out_dir, exist_ok=True)
    ckpt = Checkpointer(os.path.join(out_dir, "ckpt"), max_to_keep=1, async_save=False,
                        save_interval_steps=int(pre_cfg.get("checkpoint_every", 500)))
    state = {"params": params, "opt_state": opt_state}
    restored = ckpt.restore_latest(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state))
    start = 0
    if restored is not None:
        state, start = restored
        logging.info("vision pretraining: resuming from step %d of %d (%s).", start, pre_cfg.num_steps,
                     ckpt.directory)
    params, opt_state = state["params"], state["opt_state"]
    for _ in range(start):  # the batches already trained on: the same draws as a straight run
        rng.integers(0, len(train[0]), int(pre_cfg.batch_size))
    logger = MetricsLogger(out_dir, use_tensorboard=False, resume_step=start) if jax.process_index() == 0 else None
    t0, losses, stopped = time.perf_counter(), [], False
    try:
        with ckpt.preemption_guard():
            for i in range(start + 1, int(pre_cfg.num_steps) + 1):
                j = rng.integers(0, len(train[0]), int(pre_cfg.batch_size))
                params, opt_state, loss = step(params, opt_state, *(a[j] for a in train))
                losses.append(float(loss))
                if not np.isfinite(losses[-1]):
                    raise FloatingPointError(f"vision pretraining loss is {losses[-1]} at step {i}; "
                                             "lower vision_pretrain.learning_rate.")
                if logger is not None and (i % int(pre_cfg.log_every) == 0 or i == pre_cfg.num_steps):
                    logger.write(i, {"loss": float(np.mean(losses[-int(pre_cfg.log_every):])),
                                     "lr": float(sched(i)), "seconds": time.perf_counter() - t0})
                if ckpt.end_stage_step(i, int(pre_cfg.num_steps), {"params": params, "opt_state": opt_state},
                                       stop_now=stop_after is not None and i - start >= stop_after):
                    logging.warning("vision pretraining stopped at step %d; re-run the same command to resume.", i)
                    stopped = True
                    break
    finally:
        ckpt.close()
        if logger is not None and stopped:
            logger.close()
    if stopped:
        return {"params": None, "metrics": {}, "stopped_early": True}
    logits, token_logits = predict(params, test_x)
    metrics = concept_accuracy(logits, test[1], test[2])
    if token_weight:
        metrics["token"] = token_concept_accuracy(token_logits, test[3], test[4])
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
    return {"params": vision, "metrics": metrics, "stopped_early": False}


def load_vision(directory) -> dict:
    """The `vision` params subtree saved by `pretrain_vision` (numpy leaves)."""
    return jax.device_get(load_params(os.path.join(os.fspath(directory), PARAMS_DIR)))
