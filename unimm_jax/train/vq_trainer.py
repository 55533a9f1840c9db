"""Training the VQ image tokenizer (`models/vq.py`) on the shapes world.

    loss = mean_px(w * (l1_weight * |x - x_hat| + l2_weight * (x - x_hat)^2)) / mean_px(w)
           + codebook_loss + commit_loss                           (VQModel.quantize; beta in cfg)
           + constant_patch_weight * constant_patch_loss           (identical flat patches, one latent)
    w = 1 + foreground_weight where the target pixel is not the background colour, else 1

The foreground weight matters on sparse images like the shapes world (~90% white): with a plain
mean the background dominates the first hundreds of steps and objects decode as grey-brown
blobs; weighting object pixels makes colour and outline the first thing the VQ learns.

No perceptual or GAN loss: the shapes images are flat colours on white, which a pixel loss
reconstructs well, and it keeps the tokenizer stage a few CPU minutes. The codebook is
re-seeded from encoder outputs for codes unused over the last `restart_every` steps (dead-code
restart, as in many VQ-GAN recipes), so the small codebook stays in use.

Background codes: the encoder sees far beyond one patch (stacked convolutions, a global attention
block, GroupNorm statistics), so plain white patches get latents that vary with the rest of the
image, and k-means-style codebook learning splits that cloud among many codes (measured on the
shapes world: 246 codes with 4.8 nats of entropy at white patches for a 512-code book; far from
any object still 4.1 nats). Reconstructions do not care, but the LLM must then predict that
noise at ~3/4 of the image positions (61% of its generation loss). `constant_patch_loss` pulls
the latents of identical flat patches together and `merge_distance` restarts codes that sit
inside another's cluster, so a flat colour gets one code (0.09 nats far from objects).

Output: `W/tokenizer/params` (orbax params of `VQModel`), `W/tokenizer/vq_config.json` and
`W/tokenizer/metrics.jsonl`. `train_vq` is a no-op when the params already exist (re-running
the default job resumes after the tokenizer stage).
"""
from __future__ import annotations

import json
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

from unimm_jax.models.vq import VQModel, l2_normalize
from unimm_jax.train.checkpoint import load_params, save_params
from unimm_jax.train.metrics import MetricsLogger

PARAMS_DIR, CONFIG_FILE = "params", "vq_config.json"


def vq_train_block(**overrides) -> ml_collections.ConfigDict:
    """`config.tokenizer`: where the VQ comes from and how it is trained when it is not given."""
    cfg = dict(
        checkpoint="",  # a W/tokenizer dir from an earlier run; "" = train one into W/tokenizer
        num_steps=400,
        batch_size=32,
        learning_rate=1e-3,
        warmup_steps=20,
        l1_weight=1.0,
        l2_weight=1.0,
        foreground_weight=0.0,  # extra weight of pixels that differ from `background` (0 = plain mean)
        constant_patch_weight=0.0,  # weight of `constant_patch_loss` (0 = off)
        background=1.0,  # background value in [-1, 1] (white), per channel
        restart_every=50,  # dead-code restart period in steps (0 = off)
        merge_distance=0.0,  # at a restart, also restart codes this close to a more used one (0 = off)
        checkpoint_every=100,  # steps between resumable checkpoints in <tokenizer dir>/ckpt
        log_every=25,
    )
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def unit_distance2(u, v):
    """|u_i - v_j|^2 = 2 - 2 u_i . v_j of L2-normalised rows u [n, d], v [m, d] -> [n, m]
    (clipped at 0 against rounding); numpy in, numpy out, jax in, jax out."""
    xp = np if isinstance(u, np.ndarray) and isinstance(v, np.ndarray) else jnp
    return xp.maximum(0.0, 2.0 - 2.0 * u @ v.T)


def constant_patch_loss(images, z):
    """Mean squared distance between the L2-normalised latents of every two different constant
    patches of the same colour in the batch: float32 scalar (0 when there are no such pairs).

    images: float32 [B, H, W, 3]; z: pre-quantisation latents [B, h, w, d] (H = f * h). A patch
    is the f x f block of pixels under one latent; it is constant when all its pixels are equal.
    The encoder's context (convolutions spanning several patches, the global attention block,
    GroupNorm statistics) otherwise gives identical white patches latents that scatter over many
    codes; the LLM then has to predict that scatter at every background position.
    """
    b, h, w, d = z.shape
    f = images.shape[1] // h
    blocks = images.reshape(b, h, f, w, f, 3)
    const = ((blocks.max(axis=(2, 4)) - blocks.min(axis=(2, 4))).max(-1) < 1e-3).reshape(-1)
    colour = blocks[:, :, 0, :, 0, :].reshape(-1, 3)
    unit = l2_normalize(z.reshape(-1, d).astype(jnp.float32))
    same = (jnp.abs(colour[:, None] - colour[None]).max(-1) < 1e-3) & const[:, None] & const[None]
    same = same & ~jnp.eye(same.shape[0], dtype=bool)  # pairs of two different patches
    dist2 = unit_distance2(unit, unit)
    return jnp.sum(jnp.where(same, dist2, 0.0)) / jnp.maximum(jnp.sum(same), 1)


def vq_loss(params, images, vq_cfg, l1_weight=1.0, l2_weight=1.0, foreground_weight=0.0, background=1.0,
            constant_patch_weight=0.0):
    """(scalar loss, aux) for float32 images [B, H, W, 3] in [-1, 1]; aux has the terms (l1/l2
    unweighted means, for logging) and the latents z [B*h*w, d] (L2-normalised) and codes
    int32 [B, h*w] for code restarts."""
    def fwd(m, x):  # one encoder pass gives the latents (for code restarts) and the quantisation
        z = m.quant_conv(m.encoder(x))
        q = m.quantize(z)
        return m.decode_latents(q.quantized), q, z

    x_hat, q, z = VQModel(vq_cfg).apply({"params": params}, images, method=fwd)
    x_hat = x_hat.astype(jnp.float32)
    err1, err2 = jnp.abs(x_hat - images), jnp.square(x_hat - images)
    l1, l2 = jnp.mean(err1), jnp.mean(err2)
    fg = jnp.max(jnp.abs(images - background), axis=-1, keepdims=True) > 0.05
    w = 1.0 + foreground_weight * fg.astype(jnp.float32)
    pixel = jnp.mean(w * (l1_weight * err1 + l2_weight * err2)) / jnp.mean(w)
    loss = pixel + q.codebook_loss + q.commit_loss
    constant = constant_patch_loss(images, z) if constant_patch_weight else jnp.zeros((), jnp.float32)
    loss = loss + constant_patch_weight * constant
    z = jax.lax.stop_gradient(l2_normalize(z.reshape(-1, z.shape[-1]).astype(jnp.float32)))
    return loss, dict(l1=l1, l2=l2, codebook=q.codebook_loss, commit=q.commit_loss, constant=constant, z=z,
                      codes=q.codes)


def init_vq(vq_cfg, seed: int = 0):
    s = vq_cfg.image_size
    return nn.unbox(VQModel(vq_cfg).init(jax.random.key(seed), jnp.zeros((1, s, s, 3))))["params"]


def _restart_dead_codes(params, usage, z, rng, merge_distance: float = 0.0):
    """Codebook rows unused since the last restart take recent encoder outputs, drawn with
    probability proportional to their squared distance from the nearest live code (k-means++).

    Uniform draws would mostly pick background latents (~75% of shapes-world patches are plain
    white), splitting one background code into hundreds of interchangeable ones: reconstructions
    do not care, but the LLM then has to predict noise at every background position. Drawing by
    distance sends the new codes where the codebook represents the data worst.
    merge_distance > 0 also restarts every used code within that distance (of unit vectors) of a
    more used one: k-means splits a tight cluster (the background's, under
    `constant_patch_loss`) among all the codes inside it, which gives the LLM the same noise.
    z: float32 [n, d] L2-normalised latents; usage: int [K] counts since the last restart.
    """
    book = np.asarray(params["codebook"]["embedding"])
    dead = usage == 0
    if merge_distance > 0:
        unit = np.asarray(l2_normalize(jnp.asarray(book, jnp.float32)))
        kept: list[int] = []
        for i in np.argsort(-usage, kind="stable"):  # most used first; each keeps its neighbourhood
            if dead[i]:
                continue
            if kept and np.sqrt(unit_distance2(unit[kept], unit[i:i + 1])).min() < merge_distance:
                dead[i] = True
            else:
                kept.append(int(i))
    if not dead.any():
        return params, 0
    live = l2_normalize(jnp.asarray(book[~dead] if (~dead).any() else book))
    d2 = np.asarray(unit_distance2(z, live)).min(axis=1)  # |z - nearest live code|^2
    p = d2 / d2.sum() if d2.sum() > 0 else None
    picks = z[rng.choice(z.shape[0], size=book.shape[0], p=p)]
    new = np.where(dead[:, None], picks, book)
    params = jax.tree.map(lambda x: x, params)
    params["codebook"]["embedding"] = jnp.asarray(new, params["codebook"]["embedding"].dtype)
    return params, int(dead.sum())


def train_vq(vq_cfg, tok_cfg, data_cfg, out_dir, *, seed: int = 0, images_iter=None,
             stop_after: int | None = None) -> dict:
    """Trains the VQ into `out_dir` (see module doc); returns {"params", "metrics", "stopped_early"}.

    vq_cfg: config.model.vq; tok_cfg: `vq_train_block()`; data_cfg: config.data (for the shapes
    images via pipeline.vq_image_dataset). `images_iter` overrides the data (yields
    {"images": float32 [b, H, W, 3]}); a Grain iterator (with get_state) is checkpointed too.

    Resumable: every `tok_cfg.checkpoint_every` steps, params, optimizer state, code usage and
    the data position go to `out_dir/ckpt` (orbax; a half-written step is never read). A new
    call continues from the newest one; SIGTERM/SIGINT saves and returns with
    "stopped_early": True ("params" is then None). `stop_after` stops the same way after that
    many steps of this call (time-boxed runs, tests). Dead-code restarts draw from a generator
    seeded by (seed, step), so a resumed run equals an uninterrupted one.
    """
    from unimm_jax.train.checkpoint import Checkpointer

    out_dir = os.fspath(out_dir)
    if os.path.isfile(os.path.join(out_dir, CONFIG_FILE)):  # written last: the params are complete
        logging.info("VQ tokenizer already trained in %s; loading it.", out_dir)
        return {"params": load_vq(out_dir)[1], "metrics": {}, "stopped_early": False}
    if os.path.isdir(os.path.join(out_dir, PARAMS_DIR)) and jax.process_index() == 0:
        shutil.rmtree(os.path.join(out_dir, PARAMS_DIR))  # killed while writing the result
    os.makedirs(out_dir, exist_ok=True)
    if images_iter is None:
        from unimm_jax.data import pipeline

        images_iter = iter(pipeline.vq_image_dataset(
            data_cfg, batch_size=tok_cfg.batch_size, process_index=jax.process_index(),
            process_count=jax.process_count()))
    params = init_vq(vq_cfg, seed)
    sched = optax.warmup_cosine_decay_schedule(0.0, tok_cfg.learning_rate, tok_cfg.warmup_steps,
                                               max(tok_cfg.num_steps, tok_cfg.warmup_steps + 1), 0.05 * tok_cfg.learning_rate)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(sched))
    state = {"params": params, "opt_state": tx.init(params),
             "usage": jnp.zeros(vq_cfg.codebook_size, jnp.int32)}

    @jax.jit
    def step(params, opt_state, images):
        (loss, aux), grads = jax.value_and_grad(vq_loss, has_aux=True)(
            params, images, vq_cfg, tok_cfg.l1_weight, tok_cfg.l2_weight,
            tok_cfg.get("foreground_weight", 0.0), tok_cfg.get("background", 1.0),
            tok_cfg.get("constant_patch_weight", 0.0))
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, aux

    data_iter = images_iter if hasattr(images_iter, "get_state") else None
    ckpt = Checkpointer(os.path.join(out_dir, "ckpt"), max_to_keep=1, async_save=False,
                        save_interval_steps=int(tok_cfg.get("checkpoint_every", 100)))
    start = 0
    restored = ckpt.restore_latest(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state), data_iter)
    if restored is not None:
        state, start = restored
        logging.info("VQ tokenizer: resuming from step %d of %d (%s).", start, tok_cfg.num_steps, ckpt.directory)
    params, opt_state, usage = state["params"], state["opt_state"], np.asarray(state["usage"]).astype(np.int64)
    logger = MetricsLogger(out_dir, use_tensorboard=False)
    last, t0, stopped = {}, time.perf_counter(), False
    try:
        with ckpt.preemption_guard():
            for i in range(start + 1, tok_cfg.num_steps + 1):
                images = jnp.asarray(next(images_iter)["images"], jnp.float32)
                params, opt_state, loss, aux = step(params, opt_state, images)
                usage += np.bincount(np.asarray(aux["codes"]).ravel(), minlength=vq_cfg.codebook_size)
                restarted, codes_used = 0, int((usage > 0).sum())  # since the last restart
                if tok_cfg.restart_every and i % tok_cfg.restart_every == 0 and i < tok_cfg.num_steps * 0.8:
                    params, restarted = _restart_dead_codes(params, usage, np.asarray(aux["z"]),
                                                            np.random.default_rng([seed, i]),
                                                            tok_cfg.get("merge_distance", 0.0))
                    usage[:] = 0
                if i % tok_cfg.log_every == 0 or i == tok_cfg.num_steps:
                    if not np.isfinite(float(loss)):
                        raise FloatingPointError(f"VQ loss is {float(loss)} at step {i}; lower tokenizer.learning_rate.")
                    last = {k: float(aux[k]) for k in ("l1", "l2", "codebook", "commit", "constant")}
                    last.update(loss=float(loss), codes_used=codes_used,
                                restarted=restarted, step_time_s=(time.perf_counter() - t0) / tok_cfg.log_every)
                    logger.write(i, last)
                    logging.info("vq step %d: %s", i, last)
                    t0 = time.perf_counter()
                state = {"params": params, "opt_state": opt_state, "usage": jnp.asarray(usage, jnp.int32)}
                if ckpt.end_stage_step(i, tok_cfg.num_steps, state, data_iter,
                                       stop_now=stop_after is not None and i - start >= stop_after):
                    logging.warning("VQ tokenizer stopped at step %d; re-run the same command to resume.", i)
                    stopped = True
                    break
    finally:
        ckpt.close()
        logger.close()
    if stopped:
        return {"params": None, "metrics": last, "stopped_early": True}
    if jax.process_index() == 0:
        save_params(os.path.join(out_dir, PARAMS_DIR), jax.device_get(params))
        with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
            json.dump(vq_cfg.to_dict(), f, indent=2, default=list)
    return {"params": params, "metrics": last, "stopped_early": False}


def load_vq(directory):
    """(vq config, params) of a `train_vq` output directory; clear errors when incomplete."""
    directory = os.fspath(directory)
    cfg_path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{directory} is not a trained VQ tokenizer ({CONFIG_FILE} missing); set "
                                f"config.tokenizer.checkpoint to a W/tokenizer dir or leave it empty to train one.")
    with open(cfg_path) as f:
        raw = json.load(f)
    raw["channel_multiplier"] = tuple(raw["channel_multiplier"])
    raw.setdefault("encoder_context", "global")  # tokenizers trained before the option existed
    return ml_collections.ConfigDict(raw), load_params(os.path.join(directory, PARAMS_DIR))


def check_vq_matches(model_vq_cfg, trained_cfg) -> None:
    """The model's VQ config must equal the trained tokenizer's (else codes mean other things)."""
    a, b = model_vq_cfg.to_dict(), trained_cfg.to_dict()
    diff = sorted(k for k in set(a) | set(b) if (tuple(a.get(k)) if isinstance(a.get(k), (list, tuple)) else a.get(k))
                  != (tuple(b.get(k)) if isinstance(b.get(k), (list, tuple)) else b.get(k)))
    if diff:
        raise ValueError(f"config.model.vq differs from the trained tokenizer's config in {diff}; use the same "
                         f"VQ settings or retrain the tokenizer.")
