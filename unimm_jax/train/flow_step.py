"""The JanusFlow generation training step (config.model.family == "janusflow").

    params = init_flow_params(config.model, jax.random.key(0))
    state  = TrainState.create(params, tx, jax.random.key(1))
    state, metrics = jax.jit(partial(flow_train_step, module=JanusFlow(config.model), tx=tx))(state, batch)

The trainer (`unimm_jax.train.loop`, config.kind == "janusflow") takes `FLOW_HOOKS`: the
validation, module, sharded init, step and host-side batch check it uses in place of Janus's.

The loss is `unimm_jax.models.janusflow.flow_training_loss` (rectified flow + REPA, weights,
t distribution and condition-drop rate from config.model.flow / .repa); its batch is
`FLOW_BATCH_FIELDS` (prompt ids ending in <begin_of_image>, attention mask, target latents,
target image at SigLIP size). `flow_batch_from_images` builds the latents for
latent.kind == "space_to_depth"; for "vae" the pipeline encodes images with the VAE
(`to_model_latents(vae.encode(x))`). The same NaN guard and metrics keys as the Janus step
(`train/step.py`): loss, grad_norm, skipped, lr, plus rf_loss and repa_loss.
"""
from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from unimm_jax.models.janusflow import JanusFlow, check_flow_batch, flow_training_loss, images_to_latents
from unimm_jax.models.janusflow_config import latent_grid, num_understanding_tokens, validate_janusflow_config
from unimm_jax.train.accumulate import accumulated_value_and_grad


def _init_fn(model_cfg):
    """key -> unboxed float32 params of JanusFlow(model_cfg) (touches every parameter)."""
    m = model_cfg
    s, g = m.vision.image_size, latent_grid(m)
    ids = jnp.concatenate([jnp.array([[m.tokens.bos_token_id, m.tokens.boi_token_id]], jnp.int32),
                           jnp.full((1, num_understanding_tokens(m)), m.tokens.image_token_id, jnp.int32)], axis=1)
    return lambda k: nn.unbox(JanusFlow(m).init(k, ids, jnp.zeros((1, s, s, 3)), jnp.zeros((1, g, g, m.latent.channels)),
                                                method=JanusFlow.init_all)["params"])


def init_flow_params(model_cfg, rng: jax.Array) -> dict:
    """Randomly initialised JanusFlow params (plain float32 arrays, logical boxes removed)."""
    return jax.jit(_init_fn(model_cfg))(rng)


def init_flow_params_sharded(model_cfg, mesh, rules, seed: int):
    """(params, shardings): float32 params initialised directly in their sharded layout on `mesh`.

    Same values as `init_flow_params(model_cfg, jax.random.key(seed))`; each leaf is placed by
    its logical axes (`flow_api.janusflow_logical_axes`) under `rules`.
    """
    from unimm_jax import sharding as shd
    from unimm_jax.flow_api import janusflow_logical_axes

    init = _init_fn(model_cfg)
    shapes = jax.eval_shape(init, jax.random.key(seed))
    shardings = shd.params_shardings(janusflow_logical_axes(model_cfg), shapes, mesh, rules)
    # The ConvNeXt towers stay replicated: with their dense kernels split (embed/mlp) next to the
    # fsdp-split depthwise conv, XLA's CPU SPMD partitioner (jax 0.10.2) computed a wrong encoder
    # output on a 2x2x2 mesh (first loss off by 7e-4 relative, `skip` by 1.7 of 5.8), while
    # replicating them gives the 1-device numbers. They are a small share of the params.
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    for tower in ("gen_encoder", "gen_decoder"):
        shardings[tower] = jax.tree.map(lambda _: replicated, shardings[tower])
    return jax.jit(init, out_shardings=shardings)(jax.random.key(seed)), shardings


def check_flow_train_batch(batch: Mapping[str, np.ndarray], model_cfg, *, batch_divisor: int = 1) -> None:
    """Raises ValueError naming the problem when a host flow batch cannot be trained on.

    Checks the fields and shapes (`check_flow_batch`), that the rows divide `batch_divisor` (the
    mesh's batch shards on this process), ids in the vocabulary, left padding with every prompt
    ending in <begin_of_image>, finite latents and images in [-1, 1].
    """
    check_flow_batch(batch, model_cfg)
    ids, mask = np.asarray(batch["input_ids"]), np.asarray(batch["attention_mask"])
    b = ids.shape[0]
    if b % batch_divisor:
        raise ValueError(f"flow batch has {b} rows on this process, which the mesh's batch axes split "
                         f"{batch_divisor} ways here; set data.batch_size to a multiple of {batch_divisor} x "
                         f"process_count, or change mesh.data / mesh.fsdp.")
    v = model_cfg.llm.vocab_size
    if ids.min() < 0 or ids.max() >= v:
        raise ValueError(f"flow batch input_ids hold ids outside [0, {v}); the tokenizer does not match the model.")
    if mask.shape != ids.shape or not mask[:, -1].all():
        raise ValueError("flow batch attention_mask must match input_ids and use left padding (last token real).")
    if not (ids[:, -1] == model_cfg.tokens.boi_token_id).all():
        raise ValueError(f"every flow prompt must end with <begin_of_image> (id {model_cfg.tokens.boi_token_id}).")
    if not np.isfinite(np.asarray(batch["latents"])).all():
        raise ValueError("flow batch latents are not finite; check the images / VAE that produced them.")
    if "pixel_values" in batch:
        px = np.asarray(batch["pixel_values"])
        if not np.isfinite(px).all() or np.abs(px).max() > 1.0 + 1e-3:
            raise ValueError("flow batch pixel_values are a corrupt image (non-finite or outside [-1, 1]); "
                             "images must be uint8 / 127.5 - 1.")


def flow_train_step(state, batch: Mapping[str, jax.Array], *, module: JanusFlow, tx: optax.GradientTransformation,
                    schedule: Callable | None = None, grad_accum_steps: int = 1, trainable=None):
    """One optimizer update on a flow batch: (new TrainState, metrics dict of float32 scalars).

    The state's rng is advanced and split for t, the noise and the condition drop, so no key is
    reused and a resumed run draws the same noise. grad_accum_steps k > 1 splits the rows into k
    equal micro-batches (`train/accumulate.py`; micro-batch j draws with fold_in(key, j)); the
    loss is a mean over rows, so the mean of the k micro-batch losses and gradients is the whole
    batch's. A non-finite loss or gradient keeps the old state. trainable: as in
    `step.train_step` (frozen params get no gradient computation).
    """
    k = grad_accum_steps
    state, (key,) = state.split_rng(1)

    def micro_loss(p, mb, j):
        loss, aux = flow_training_loss(module, p, mb, key if k == 1 else jax.random.fold_in(key, j))
        return loss / k, jax.tree.map(lambda a: a / k, aux)

    (loss, aux), grads = accumulated_value_and_grad(micro_loss, state.params, batch, k, trainable=trainable)
    grad_norm = optax.global_norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    lr_step = state.step
    state = state.apply_gradients_if(ok, grads, tx)
    metrics = {**aux, "grad_norm": grad_norm, "skipped": 1.0 - ok.astype(jnp.float32)}
    if schedule is not None:
        metrics["lr"] = jnp.asarray(schedule(lr_step), jnp.float32)
    return state, metrics


def flow_batch_from_images(model_cfg, input_ids, attention_mask, images) -> dict:
    """A flow batch for latent.kind == "space_to_depth": latents are the images' pixel patches.

    images [B, S, S, 3] in [-1, 1] at the model's image size (also the REPA target).
    """
    if model_cfg.latent.get("kind", "vae") != "space_to_depth":
        raise ValueError("flow_batch_from_images makes pixel-patch latents; with latent.kind='vae' encode the "
                         "images with the VAE: latents = vae.to_model_latents(vae.encode(images)).")
    images = jnp.asarray(images, jnp.float32)
    return dict(input_ids=jnp.asarray(input_ids, jnp.int32), attention_mask=jnp.asarray(attention_mask, jnp.int32),
                latents=images_to_latents(images, model_cfg), pixel_values=images)


def synthetic_flow_batch(model_cfg, batch_size: int, prompt_len: int, seed: int, index: int) -> dict:
    """A deterministic random batch obeying FLOW_BATCH_FIELDS (smoke runs, tests, benchmarks)."""
    m = model_cfg
    rng = np.random.default_rng([seed, index])
    t = m.tokens
    ids = rng.integers(3, min(m.llm.vocab_size, 400), (batch_size, prompt_len)).astype(np.int32)
    ids[:, 0], ids[:, -1] = t.bos_token_id, t.boi_token_id
    s, g = m.vision.image_size, latent_grid(m)
    return dict(input_ids=ids, attention_mask=np.ones_like(ids),
                latents=rng.standard_normal((batch_size, g, g, m.latent.channels)).astype(np.float32),
                pixel_values=rng.uniform(-1, 1, (batch_size, s, s, 3)).astype(np.float32))


# What the trainer (`loop.Trainer`) swaps in for config.kind == "janusflow": see loop.model_hooks.
def _flow_logical_axes(model_cfg):
    from unimm_jax.flow_api import janusflow_logical_axes

    return janusflow_logical_axes(model_cfg)


FLOW_HOOKS = dict(validate=validate_janusflow_config, module=JanusFlow, init_params=init_flow_params_sharded,
                  train_step=flow_train_step, check_batch=check_flow_train_batch,
                  logical_axes=_flow_logical_axes)
