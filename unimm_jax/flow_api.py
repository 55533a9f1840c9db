"""The loaded JanusFlow model (`load_pretrained` returns it for JanusFlow checkpoints) and its sampler.

    m = uj.load_pretrained("JanusFlow-1.3B", vae="sdxl-vae")   # or a vae/ subdirectory
    images = m.generate_images_flow(ids, num_images=4, steps=30, cfg_weight=2.0, seed=0)

Sampling (`sample_flow_latents`, one jitted function): the prompt rows are stacked
[conditional; unconditional] (the unconditional copy sees only BOS of its prompt, as DeepSeek's
demo masks it), the prompt's KV cache is computed once (per prompt, shared by its images, in
the per-layer buffers of `unimm_jax.sample.kv_cache`), and each of the `steps` Euler steps runs
only the time token + latent tokens of both halves against that cache, then combines
v = w * v_cond - (w - 1) * v_uncond. DeepSeek's demo meant to do the same but its cache loop
iterates over an empty list, so it re-runs the whole prompt at every step; `use_cache=False`
reproduces that (the benchmark and the parity test compare the two).
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh

from unimm_jax import sharding as shd
from unimm_jax.models.janusflow import JanusFlow, latents_to_images, prompt_layout
from unimm_jax.models.janusflow_config import (
    latent_grid,
    normalize_janusflow_config,
    num_latent_tokens,
    num_understanding_tokens,
    validate_janusflow_config,
)
from unimm_jax.sample.flow import cfg_velocity, euler_sample
from unimm_jax.sample.kv_cache import forward_cached, init_cache


def _two_halves(x: jax.Array, n: int) -> jax.Array:
    """Rows [cond B; uncond B] -> [cond B*n; uncond B*n], each prompt repeated n times in place."""
    b2 = x.shape[0]
    x = x.reshape((2, b2 // 2) + x.shape[1:])
    return jnp.repeat(x, n, axis=1).reshape((-1,) + x.shape[2:])


def _full_velocity(module, params, prefix, segment_ids, positions, w, z, t):
    tt = jnp.full((z.shape[0],), t, jnp.float32)
    v = module.apply({"params": params}, prefix, z, tt, segment_ids, positions, 2, method=JanusFlow.velocity)
    v_cond, v_uncond = jnp.split(v, 2, axis=0)
    return cfg_velocity(v_cond, v_uncond, w)


def _cached_euler(module, params, prefix, seg, pos, z0, w, *, steps: int, num_images: int) -> jax.Array:
    """The cached sampler: prefill the [cond; uncond] prompts once, then Euler steps over the time +
    latent tokens only. The cache (one buffer per layer, `sample.kv_cache`) is carried through
    the loop: each step writes its own keys/values into the slots after the prompt, in place, and
    the next step overwrites them; the bookkeeping (valid slots, write index) is reset to the
    prompt's, so every step sees exactly the prompt plus itself.
    """
    c = module.cfg
    lc, ap = c.llm, functools.partial(module.apply, {"params": params})
    rows, p = prefix.shape[0], prefix.shape[1]
    n = num_latent_tokens(c)
    cache = init_cache(lc, rows, p + 1 + n)
    _, cache = forward_cached(params["llm"], lc, prefix, seg[:, :p] > 0, cache)
    # RoPE positions as the reference's: masked prompt slots still count (pos from the cond mask).
    cache = cache.replace(next_pos=pos[:, p])
    rep = lambda x: _two_halves(x, num_images)  # noqa: E731  one prefill per prompt, shared by its images
    cache = cache.replace(k=tuple(rep(x) for x in cache.k), v=tuple(rep(x) for x in cache.v),
                          valid=rep(cache.valid), next_pos=rep(cache.next_pos))
    step_valid = jnp.ones((rows * num_images, 1 + n), bool)
    dt = 1.0 / steps

    def body(i, carry):
        z, kv = carry
        t = jnp.full((z.shape[0],), i.astype(jnp.float32) * dt, jnp.float32)
        # z serves both halves ([z; z]): the generation encoder runs once on it (repeat=2).
        tokens, t_emb, skip = ap(z, t, 2, method=JanusFlow.encode_latents_tiled)
        embeds = jnp.concatenate([t_emb[:, None], tokens], axis=1).astype(jnp.dtype(lc.dtype))
        hidden, new = forward_cached(params["llm"], lc, embeds, step_valid, kv)
        v = ap(hidden[:, 1:], skip, t_emb, method=JanusFlow.decode_velocity)
        v_cond, v_uncond = jnp.split(v, 2, axis=0)
        z = z + dt * cfg_velocity(v_cond, v_uncond, w).astype(jnp.float32)
        return z, new.replace(index=kv.index, valid=kv.valid, next_pos=kv.next_pos)

    return jax.lax.fori_loop(0, steps, body, (z0.astype(jnp.float32), cache))[0]


def sample_flow_latents(module: JanusFlow, params, input_ids, attention_mask, z0, cfg_weight, *,
                        steps: int, num_images: int, use_cache: bool = True) -> jax.Array:
    """Euler-integrates JanusFlow's guided velocity from noise z0 at t=0 to latents at t=1.

    input_ids int32 [B, L] ending with <begin_of_image> (dropped: the time token takes its
    place); attention_mask int32 [B, L] (left padding); z0 float32 [B*num_images, h, w, C]
    (row i*num_images + j is image j of prompt i); cfg_weight float scalar.
    Returns float32 model-space latents [B*num_images, h, w, C]. Jit with steps/num_images/use_cache static.
    """
    c = module.cfg
    b, L = input_ids.shape
    p, n = L - 1, num_latent_tokens(c)
    keep = jnp.concatenate([jnp.ones((b,), bool), jnp.zeros((b,), bool)])
    ids2 = jnp.concatenate([input_ids, input_ids])
    seg, pos = prompt_layout(jnp.concatenate([attention_mask, attention_mask]), keep, 1 + n)
    # The unconditional prompt is pad ids but BOS, as the reference writes it (masked anyway).
    prompt = jnp.where(keep[:, None] | (seg[:, :p] > 0), ids2[:, :-1], c.tokens.pad_token_id)
    prefix = module.apply({"params": params}, prompt, method=lambda m, i: m.llm.embed_tokens(i))
    w = jnp.asarray(cfg_weight, jnp.float32)
    if use_cache:
        return _cached_euler(module, params, prefix, seg, pos, z0, w, steps=steps, num_images=num_images)
    fn = jax.tree_util.Partial(functools.partial(_full_velocity, module), params, _two_halves(prefix, num_images),
                               _two_halves(seg, num_images), _two_halves(pos, num_images), w)
    return euler_sample(fn, z0.astype(jnp.float32), steps=steps).astype(jnp.float32)


def janusflow_logical_axes(model_cfg: ml_collections.ConfigDict):
    """Tree of logical-axis PartitionSpecs for every JanusFlow parameter (computed abstractly)."""
    m = model_cfg
    s, g = m.vision.image_size, latent_grid(m)
    ids = jnp.concatenate([jnp.array([[m.tokens.bos_token_id, m.tokens.boi_token_id]]),
                           jnp.full((1, num_understanding_tokens(m)), m.tokens.image_token_id)], axis=1)
    boxed = jax.eval_shape(lambda: JanusFlow(m).init(
        jax.random.key(0), ids, jnp.zeros((1, s, s, 3)), jnp.zeros((1, g, g, m.latent.channels)),
        method=JanusFlow.init_all))
    return nn.get_partition_spec(boxed)["params"]


def place_params(params, model_cfg, mesh: Mesh | None, rules=shd.DEFAULT_RULES):
    """numpy params -> device arrays: replicated (mesh None) or sharded by the logical rules."""
    if mesh is None:
        return jax.tree.map(jnp.asarray, params)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    shardings = shd.params_shardings(janusflow_logical_axes(model_cfg), shapes, mesh, rules)
    return jax.tree.map(lambda x, sh: jax.device_put(x, sh), params, shardings)


NO_VAE_HELP = (
    "DeepSeek's JanusFlow checkpoints do not include the SDXL VAE that decodes the latents. Pass one: "
    "uj.load_pretrained(path, vae='path/to/sdxl-vae') (a diffusers AutoencoderKL directory, e.g. "
    "stabilityai/sdxl-vae), or put it in a vae/ subdirectory of the checkpoint, or set model.vae = "
    "uj.load_vae(dir); or call generate_latents_flow(...) to get the latents without decoding."
)


class JanusFlowModel:
    """A loaded JanusFlow model: config, params, an optional VAE, and jitted entry points.

    Images NHWC float32 in [-1, 1]; token ids int32; latents NHWC in the VAE's scaled space.
    """

    def __init__(self, config: ml_collections.ConfigDict, params, mesh: Mesh | None = None, checkpoint=None, vae=None):
        self.config = config
        self.params = params
        self.mesh = mesh
        self.vae = vae
        self.module = JanusFlow(config)
        self._checkpoint = checkpoint  # extras and side files for save_pretrained
        self._und = jax.jit(lambda p, ids, px, am: self.module.apply({"params": p}, ids, px, am,
                                                                     method=JanusFlow.understanding_logits))
        self._sample = jax.jit(functools.partial(sample_flow_latents, self.module),
                               static_argnames=("steps", "num_images", "use_cache"))

    # -- input checks (outside jit) -------------------------------------------------------------
    def _check_ids(self, input_ids, attention_mask=None):
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"input_ids must be int [batch, length] with length >= 1, got {ids.dtype} {ids.shape}.")
        v = self.config.llm.vocab_size
        if ids.min() < 0 or ids.max() >= v:
            raise ValueError(f"input_ids hold ids outside [0, {v}); check the tokenizer matches this checkpoint.")
        if attention_mask is None:
            mask = np.ones(ids.shape, np.int32)
        else:
            mask = np.asarray(attention_mask).astype(np.int32)
            if mask.shape != ids.shape:
                raise ValueError(f"attention_mask shape {mask.shape} must equal input_ids shape {ids.shape}.")
            if not mask[:, -1].all():
                raise ValueError("attention_mask must use left padding (every row's last token real); pad on the left.")
        return jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)

    def _check_images(self, images, size, name):
        x = np.asarray(images)
        if x.ndim != 4 or x.shape[-1] != 3 or x.shape[1:3] != (size, size):
            raise ValueError(f"{name} must be NHWC [N, {size}, {size}, 3], got shape {x.shape}; resize and pad to square.")
        if x.size and (not np.isfinite(x).all() or np.abs(x).max() > 1.5):
            raise ValueError(f"{name} must be float in [-1, 1]; divide 0-255 images by 127.5 and subtract 1.")
        return jnp.asarray(x, jnp.float32)

    # -- understanding ------------------------------------------------------------------------
    def understanding_logits(self, input_ids, pixel_values=None, attention_mask=None):
        """int32 [B, T] (+ [M, H, W, 3] images) -> float32 [B, T, V].

        Each image takes one <begin_of_image> slot (the learned begin-of-understanding embedding)
        followed by N <image_placeholder> slots, in order.
        """
        ids, mask = self._check_ids(input_ids, attention_mask)
        t = self.config.tokens
        n_img = int((np.asarray(ids) == t.image_token_id).sum())
        n_boi = int((np.asarray(ids) == t.boi_token_id).sum())
        if pixel_values is None:
            if n_img:
                raise ValueError(f"input_ids hold {n_img} image placeholder tokens but no pixel_values were given.")
            return self._und(self.params, ids, None, mask)
        px = self._check_images(pixel_values, self.config.vision.image_size, "pixel_values")
        per = num_understanding_tokens(self.config)
        if n_img != px.shape[0] * per or n_boi != px.shape[0]:
            raise ValueError(f"{px.shape[0]} image(s) need {px.shape[0]} <begin_of_image> tokens each followed by "
                             f"{per} <image_placeholder> tokens; input_ids hold {n_boi} and {n_img}.")
        return self._und(self.params, ids, px, mask)

    # -- generation -------------------------------------------------------------------------------
    def generate_latents_flow(self, input_ids, *, num_images: int = 1, steps: int = 30, cfg_weight: float = 2.0,
                              seed: int = 0, attention_mask=None, use_cache: bool = True) -> jax.Array:
        """Prompts int32 [B, L], each ending with <begin_of_image> -> float32 latents [B*num_images, h, w, C].

        The latents are in the VAE's scaled space (decode `vae.decode(vae.from_model_latents(z))`).
        use_cache=False recomputes the prompt at every step (the reference's behaviour; for checks).
        """
        ids, mask = self._check_ids(input_ids, attention_mask)
        c = self.config
        if not (np.asarray(ids)[:, -1] == c.tokens.boi_token_id).all():
            raise ValueError(f"every prompt must end with <begin_of_image> (id {c.tokens.boi_token_id}); "
                             "build it with unimm_jax.data.chat_format.generation_prompt_ids.")
        if int(num_images) < 1 or int(steps) < 1:
            raise ValueError(f"num_images and steps must be >= 1, got {num_images} and {steps}.")
        total = ids.shape[1] + num_latent_tokens(c)
        if total > c.llm.max_position_embeddings:
            raise ValueError(f"prompt of {ids.shape[1]} tokens + {num_latent_tokens(c)} latent tokens exceeds the "
                             f"context of {c.llm.max_position_embeddings}; shorten the prompt.")
        z0 = self.flow_noise(ids.shape[0] * int(num_images), seed)
        return self._sample(self.params, ids, mask, z0, jnp.float32(cfg_weight), steps=int(steps),
                            num_images=int(num_images), use_cache=bool(use_cache))

    def flow_noise(self, n: int, seed: int = 0) -> jax.Array:
        """The starting noise z0 ~ N(0, I) of `generate_latents_flow`: float32 [n, h, w, C] from `seed`."""
        g, ch = latent_grid(self.config), self.config.latent.channels
        return jax.random.normal(jax.random.key(seed), (n, g, g, ch), jnp.float32)

    def decode_latents(self, latents) -> jax.Array:
        """Model-space latents [N, h, w, C] -> float32 images [N, H, W, 3] clipped to [-1, 1].

        latent.kind "vae" needs a VAE; "space_to_depth" latents are pixel patches (no VAE).
        """
        if self.config.latent.get("kind", "vae") == "space_to_depth":
            return latents_to_images(jnp.asarray(latents), self.config)
        if self.vae is None:
            raise ValueError("JanusFlowModel has no VAE. " + NO_VAE_HELP)
        if self.vae.config.latent_channels != self.config.latent.channels:
            raise ValueError(f"the VAE has {self.vae.config.latent_channels} latent channels but this model makes "
                             f"{self.config.latent.channels}; load the VAE the model was trained with (SDXL-VAE).")
        return jnp.clip(self.vae.decode(self.vae.from_model_latents(jnp.asarray(latents))), -1.0, 1.0)

    def generate_images_flow(self, input_ids, *, num_images: int = 1, steps: int = 30, cfg_weight: float = 2.0,
                             seed: int = 0, attention_mask=None) -> jax.Array:
        """Prompts int32 [B, L] ending with <begin_of_image> -> float32 images [B*num_images, H, W, 3] in [-1, 1].

        Euler with `steps` steps, classifier-free guidance weight `cfg_weight`, noise from `seed`;
        row i*num_images + j is image j of prompt i. Needs a VAE (see NO_VAE_HELP).
        """
        if self.vae is None and self.config.latent.get("kind", "vae") == "vae":
            raise ValueError("generate_images_flow needs a VAE to decode latents. " + NO_VAE_HELP)
        z = self.generate_latents_flow(input_ids, num_images=num_images, steps=steps, cfg_weight=cfg_weight,
                                       seed=seed, attention_mask=attention_mask)
        return self.decode_latents(z)


def resolve_vae(vae, checkpoint_dir: str | None):
    """A VAE object, a diffusers directory path, or None (then `checkpoint_dir/vae` if it exists)."""
    from unimm_jax.models.vae import VAE, load_vae

    if vae is None and checkpoint_dir and os.path.isdir(os.path.join(checkpoint_dir, "vae")):
        vae = os.path.join(checkpoint_dir, "vae")
    if vae is None or isinstance(vae, VAE):
        return vae
    if isinstance(vae, (str, os.PathLike)):
        return load_vae(vae)
    raise ValueError(f"vae must be a unimm_jax VAE, a diffusers VAE directory or None, got {type(vae).__name__}.")


def load_janusflow(ckpt, mesh: Mesh | None = None, vae=None, checkpoint_dir: str | None = None) -> JanusFlowModel:
    """A JanusFlowModel from a read Checkpoint (config.model.family == 'janusflow')."""
    normalize_janusflow_config(ckpt.config)  # a unimm_config.json round trip turns tuples into lists
    validate_janusflow_config(ckpt.config)
    params = place_params(ckpt.params, ckpt.config, mesh)
    ckpt.params = None
    model = JanusFlowModel(ckpt.config, params, mesh, ckpt, resolve_vae(vae, checkpoint_dir))
    model.checkpoint_dir = checkpoint_dir
    return model
