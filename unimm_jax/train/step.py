"""The Janus training step over the batch contract (`unimm_jax/data/batch.py`).

    loss, aux = batch_loss(module, params, batch)          # pure; differentiable in params
    state, metrics = train_step(state, batch, module=m, tx=tx, schedule=lr)   # jit this

Forward pass of one packed batch (B rows of T tokens, M understanding images per row):
  1. text embeddings of `input_ids` (VQ codes masked to id 0 so they never index the vocab);
  2. understanding features: SigLIP -> aligner on all B*M image slots, then the k-th
     `image_token_id` placeholder of row b takes feature k % N of image slot k // N of row b
     (images of a row are in placeholder order; empty slots are never referenced);
  3. generation embeddings `gen_embed -> gen_aligner` wherever `input_is_image` (skipped, by
     `cond`, for a batch without image codes);
  4. `run_llm` with the packed `segment_ids` / `positions` (attention never crosses examples);
  5. per-token CE from `lm_head` where the target is text and from `gen_head` where
     `target_is_image` (the gen_head only runs when some target is an image code), weighted by
     `loss_mask`; the loss is the token-weighted mean over the
     whole (global) batch, and per-task losses split the same sums by `task_ids`.

Mixed precision: params are float32 master weights; the model computes in `model.*.dtype`
(bfloat16 in the pod configs) and every loss is computed in float32.

NaN guard: when the loss or the gradient norm is not finite, the update is dropped (params,
optimizer state and step stay as they were) and `metrics["skipped"]` is 1; the loop counts
consecutive skips and stops with an error after `train.max_consecutive_skips`.
"""
from __future__ import annotations

import functools
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from unimm_jax.data.batch import TASKS, check_batch
from unimm_jax.losses import token_cross_entropy
from unimm_jax.models.janus import Janus
from unimm_jax.models.janus_config import num_understanding_tokens
from unimm_jax.train.accumulate import accumulated_value_and_grad

# ---------------------------------------------------------------------------------------------
# Forward pass and loss
# ---------------------------------------------------------------------------------------------


def gather_image_features(placeholder: jax.Array, features: jax.Array) -> jax.Array:
    """Per-row placement of understanding features at placeholder slots.

    placeholder: bool [B, T]; features: [B, M, N, D] (slot m of row b = its m-th image).
    Returns [B, T, D]: at the k-th placeholder of row b, features[b, k // N, k % N]; elsewhere
    an arbitrary row (the caller selects with `placeholder`).
    """
    b, m, n, _ = features.shape
    k = jnp.cumsum(placeholder.astype(jnp.int32), axis=1) - 1
    k = jnp.clip(k, 0, m * n - 1)
    rows = jnp.arange(b)[:, None]
    return features[rows, k // n, k % n]


def _hidden(module: Janus, batch: Mapping[str, jax.Array]) -> jax.Array:
    """Final LLM hidden states [B, T, H] (compute dtype) for a contract batch."""
    c = module.cfg
    ids, is_img = batch["input_ids"], batch["input_is_image"]
    embeds = module.llm.embed_tokens(jnp.where(is_img, 0, ids))
    px = batch["pixel_values"]
    b, m = px.shape[:2]
    if m:
        feats = module.image_features(px.reshape((b * m,) + px.shape[2:]))
        feats = feats.reshape((b, m) + feats.shape[1:]).astype(embeds.dtype)
        placeholder = (ids == c.tokens.image_token_id) & ~is_img
        embeds = jnp.where(placeholder[..., None], gather_image_features(placeholder, feats), embeds)

    # Only a batch holding image codes pays for gen_embed -> gen_aligner over its tokens.
    def with_codes(mdl, e):
        gen = mdl.image_token_embeds(jnp.where(is_img, ids, 0)).astype(e.dtype)
        return jnp.where(is_img[..., None], gen, e)

    embeds = nn.cond(jnp.any(is_img), with_codes, lambda mdl, e: e, module, embeds)
    return module.run_llm(embeds, None, batch["segment_ids"], batch["positions"])


def _token_ce(logits: jax.Array, targets: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(cross-entropy float32 [B, T], argmax int32 [B, T]) of logits [B, T, V]; targets outside
    `valid` are replaced by 0 before the gather."""
    ce = token_cross_entropy(logits, jnp.where(valid, targets, 0).astype(jnp.int32))
    return ce, jnp.argmax(logits, -1).astype(jnp.int32)


def per_token_losses(module: Janus, params, batch) -> tuple[jax.Array, jax.Array]:
    """(ce float32 [B, T], correct float32 [B, T]): each token scored by the head of its target.

    The gen_head (and its CE over the codebook) runs only when some target is an image code:
    text and understanding batches skip it (~2% of a Janus-Pro-1B step).
    """
    apply = functools.partial(module.apply, {"params": params})
    hidden = apply(batch, method=_hidden)
    tgt, tgt_img = batch["target_ids"], batch["target_is_image"]
    text_ce, text_pred = _token_ce(apply(hidden, method=lambda m, h: m.llm.logits(h)), tgt, ~tgt_img)
    code_ce, code_pred = jax.lax.cond(
        jnp.any(tgt_img),
        lambda h: _token_ce(apply(h, method=lambda m, h: m.gen_head(h)), tgt, tgt_img),
        lambda h: (jnp.zeros(tgt.shape, jnp.float32), jnp.zeros(tgt.shape, jnp.int32)),
        hidden)
    ce = jnp.where(tgt_img, code_ce, text_ce)
    pred = jnp.where(tgt_img, code_pred, text_pred)
    return ce, (pred == tgt).astype(jnp.float32)


def task_token_counts(batch) -> jax.Array:
    """Loss tokens per task, float32 [len(TASKS)]: the sum of `loss_mask` where `task_ids == t`."""
    w = batch["loss_mask"].astype(jnp.float32)
    return jnp.stack([jnp.sum(w * (batch["task_ids"] == i)) for i in range(len(TASKS))])


def loss_coefficients(counts: jax.Array, task_weights=None) -> jax.Array:
    """Per-task factors c [len(TASKS)] with loss = sum_t c_t * (CE sum of task t), float32.

    counts: loss tokens per task of the batch the loss is a mean over (`task_token_counts`).
    task_weights None: c_t = 1 / (all loss tokens), Janus' token-weighted mean. Otherwise
    c_t = w_t / n_t / sum_s w_s over the tasks present (n > 0), the weighted mean of task means.
    Linear in the CE sums, so micro-batches that use the whole batch's counts add up exactly.
    """
    counts = jnp.asarray(counts, jnp.float32)
    if task_weights is None:
        return jnp.broadcast_to(1.0 / jnp.maximum(jnp.sum(counts), 1.0), counts.shape)
    tw = jnp.where(counts > 0, jnp.asarray(task_weights, jnp.float32), 0.0)
    return tw / jnp.maximum(counts, 1.0) / jnp.maximum(jnp.sum(tw), 1e-9)


def batch_loss(module: Janus, params, batch, task_weights=None, counts=None) -> tuple[jax.Array, dict]:
    """Mean CE over the batch (float32 scalar) and an aux dict of sums/counts.

    task_weights: None (Janus' token-weighted mean over all loss tokens), or one weight per task
    in TASKS order: the loss is then sum_t w_t * mean_t / sum_t w_t over the tasks present in
    the batch, so a task whose examples carry few loss tokens (one-word answers next to 576 or
    64 image codes) still gets its share of the gradient.
    counts: loss tokens per task of the batch the mean is over (`task_token_counts`); None = this
    batch's own. A micro-batch given its whole batch's counts returns its exact share of the
    whole batch's loss (`train/accumulate.py`).
    aux: "ce_sum/<task>", "tokens/<task>", "correct/<task>" (float32 scalars) for each task in
    TASKS; sums, not means, so callers can combine them over steps without bias.
    """
    ce, correct = per_token_losses(module, params, batch)
    w = batch["loss_mask"].astype(jnp.float32)
    own = task_token_counts(batch)
    aux = {}
    for i, task in enumerate(TASKS):
        wt = w * (batch["task_ids"] == i)
        aux[f"ce_sum/{task}"] = jnp.sum(ce * wt)
        aux[f"tokens/{task}"] = own[i]
        aux[f"correct/{task}"] = jnp.sum(correct * wt)
    coef = loss_coefficients(own if counts is None else counts, task_weights)
    loss = jnp.sum(coef * jnp.stack([aux[f"ce_sum/{t}"] for t in TASKS]))
    return loss, aux


def summarize(aux: Mapping[str, jax.Array]) -> dict:
    """Per-task loss and accuracy from `batch_loss`'s sums (NaN for a task absent from the batch)."""
    out = {}
    for task in TASKS:
        n = aux[f"tokens/{task}"]
        out[f"loss/{task}"] = jnp.where(n > 0, aux[f"ce_sum/{task}"] / jnp.maximum(n, 1.0), jnp.nan)
        out[f"accuracy/{task}"] = jnp.where(n > 0, aux[f"correct/{task}"] / jnp.maximum(n, 1.0), jnp.nan)
    out["tokens"] = sum(aux[f"tokens/{t}"] for t in TASKS)
    return out


# ---------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------


def train_step(state, batch, *, module: Janus, tx: optax.GradientTransformation,
               schedule: Callable | None = None, grad_accum_steps: int = 1, task_weights=None, trainable=None):
    """One optimizer update: gradients of `batch_loss` over the batch, then `tx.update`.

    grad_accum_steps k > 1: the batch's rows are split into k micro-batches whose gradients are
    summed in a scan (`train/accumulate.py`); each micro-batch's loss is normalised by the whole
    batch's token counts, so the update is exactly the whole batch's (not a mean of micro-batch
    means). task_weights: see `batch_loss` (None = token-weighted mean). trainable: a bool tree
    like the params (`optimizer.trainable_mask`; None = all train): frozen params get no
    gradient computation at all (see `accumulate.stop_frozen_gradients`), and grad_norm is the
    trainable gradients' norm, the one the optimizer clips.
    state: `TrainState`; batch: dict of arrays per the contract (global batch, sharded).
    Returns (new state, metrics) where metrics holds float32 scalars: loss, loss/<task>,
    accuracy/<task>, tokens, grad_norm, lr (the rate of this update), skipped (1.0 when the NaN
    guard dropped the update).
    """
    counts = task_token_counts(batch)
    (loss, aux), grads = accumulated_value_and_grad(
        lambda p, mb, j: batch_loss(module, p, mb, task_weights, counts=counts),
        state.params, batch, grad_accum_steps, trainable=trainable)
    grad_norm = optax.global_norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # Keep the old state on a non-finite step: params, moments and the step.
    lr_step = state.step
    state = state.apply_gradients_if(ok, grads, tx)
    metrics = {"loss": loss, "grad_norm": grad_norm, "skipped": 1.0 - ok.astype(jnp.float32),
               **summarize(aux)}
    if schedule is not None:
        metrics["lr"] = jnp.asarray(schedule(lr_step), jnp.float32)
    return state, metrics


def eval_step(params, batch, *, module: Janus) -> dict:
    """Loss sums of one batch without gradients (for held-out loss): `batch_loss`'s aux + loss."""
    loss, aux = batch_loss(module, params, batch)
    return {"loss": loss, **aux}


# ---------------------------------------------------------------------------------------------
# Host-side checks (outside jit, so a bad batch is named instead of training on garbage)
# ---------------------------------------------------------------------------------------------


def check_train_batch(batch: Mapping[str, np.ndarray], model_cfg, *, batch_divisor: int = 1) -> None:
    """Raises ValueError naming the problem when a host batch cannot be trained on.

    Checks the contract (`check_batch`), that the rows divide `batch_divisor` (the mesh's batch
    shards on this process), token ids are in range, every row's placeholder count equals
    (valid images) x N, and images are finite and in [-1, 1] (a corrupt image record).
    """
    check_batch(batch)
    b, t = batch["input_ids"].shape
    if b % batch_divisor:
        raise ValueError(
            f"batch has {b} rows on this process, which the mesh's batch axes split {batch_divisor} "
            f"ways here; set data.batch_size to a multiple of {batch_divisor} x process_count, or "
            f"change mesh.data / mesh.fsdp.")
    ids, is_img = np.asarray(batch["input_ids"]), np.asarray(batch["input_is_image"])
    v, k = model_cfg.llm.vocab_size, model_cfg.vq.codebook_size
    for name, where in (("input_ids", ids), ("target_ids", np.asarray(batch["target_ids"]))):
        img = is_img if name == "input_ids" else np.asarray(batch["target_is_image"])
        mask = np.asarray(batch["loss_mask"]) > 0 if name == "target_ids" else np.ones_like(img)
        bad_text = mask & ~img & ((where < 0) | (where >= v))
        bad_code = mask & img & ((where < 0) | (where >= k))
        if bad_text.any() or bad_code.any():
            r, c = np.argwhere(bad_text | bad_code)[0]
            raise ValueError(
                f"batch[{name!r}][{r}, {c}] = {where[r, c]} is outside the text vocabulary "
                f"[0, {v}) / codebook [0, {k}); the tokenizer or VQ does not match model config.")
    task = np.asarray(batch["task_ids"])
    if task.min() < 0 or task.max() >= len(TASKS):
        raise ValueError(f"batch['task_ids'] must be in [0, {len(TASKS)}) ({TASKS}).")
    n = num_understanding_tokens(model_cfg)
    placeholders = ((ids == model_cfg.tokens.image_token_id) & ~is_img).sum(1)
    valid = np.asarray(batch["image_valid"])
    want = valid.sum(1) * n
    if (placeholders != want).any():
        r = int(np.flatnonzero(placeholders != want)[0])
        raise ValueError(
            f"row {r} holds {placeholders[r]} image placeholders but {valid[r].sum()} valid "
            f"image(s) x {n} tokens = {want[r]}; the pipeline's num_image_tokens must be {n}.")
    px = np.asarray(batch["pixel_values"])
    if px.size:
        if px.shape[2:] != (model_cfg.vision.image_size, model_cfg.vision.image_size, 3):
            raise ValueError(f"pixel_values are {px.shape[2:]} images; the model takes "
                             f"{model_cfg.vision.image_size}x{model_cfg.vision.image_size}x3.")
        finite = np.isfinite(px).reshape(px.shape[:2] + (-1,)).all(-1)
        inrange = (np.abs(np.where(np.isfinite(px), px, 0)) <= 1.0 + 1e-3).reshape(
            px.shape[:2] + (-1,)).all(-1)
        bad = valid & ~(finite & inrange)
        if bad.any():
            r, m = np.argwhere(bad)[0]
            raise ValueError(
                f"pixel_values[{r}, {m}] is a corrupt image (non-finite or outside [-1, 1]); "
                f"check the image record that produced it (images must be uint8 / 127.5 - 1).")
