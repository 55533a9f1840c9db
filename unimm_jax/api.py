"""The public Python API: load_pretrained / save_pretrained and the loaded-model object."""
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
from unimm_jax.convert.checkpoints import Checkpoint, read_checkpoint, write_checkpoint
from unimm_jax.models.janus import Janus
from unimm_jax.models.janus_config import num_image_tokens, num_understanding_tokens


def logical_axes(model_cfg: ml_collections.ConfigDict):
    """Tree of logical axis-name PartitionSpecs for every Janus parameter (computed abstractly)."""
    m = model_cfg
    s = m.vision.image_size
    ids = jnp.full((1, num_understanding_tokens(m) + 2), m.tokens.image_token_id, jnp.int32)
    boxed = jax.eval_shape(
        lambda: Janus(m).init(
            jax.random.key(0), ids, jnp.zeros((1, s, s, 3)), jnp.zeros((1, num_image_tokens(m)), jnp.int32),
            jnp.zeros((1, m.vq.image_size, m.vq.image_size, 3)), method=Janus.init_all,
        )
    )
    return nn.get_partition_spec(boxed)["params"]


def place_params(params, model_cfg, mesh: Mesh | None, rules=shd.DEFAULT_RULES):
    """Moves host params (numpy arrays, or LazyLeaf objects read here) onto devices: replicated
    on one device, or sharded by the logical rules over `mesh`. Leaf by leaf, so host memory holds
    one tensor (one unimm group) at a time besides what is already on the devices."""
    if mesh is None:
        return jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), params)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    shardings = shd.params_shardings(logical_axes(model_cfg), shapes, mesh, rules)
    return jax.tree.map(lambda x, s: jax.device_put(np.asarray(x), s), params, shardings)


class JanusModel:
    """A loaded Janus / Janus-Pro model: config, params and jitted entry points.

    Images are NHWC float32 in [-1, 1]; token ids int32.
    """

    def __init__(self, config: ml_collections.ConfigDict, params, mesh: Mesh | None = None, checkpoint: Checkpoint | None = None):
        self.config = config
        self.params = params
        self.mesh = mesh
        self.module = Janus(config)
        self._checkpoint = checkpoint  # keeps passthrough extras and tokenizer files for save_pretrained
        self._jit = {}
        self.checkpoint_dir = None  # the directory actually loaded (set by load_pretrained)

    def _call(self, method: str, *args):
        if method not in self._jit:
            fn = functools.partial(self.module.apply, method=getattr(Janus, method))
            self._jit[method] = jax.jit(lambda p, *a: fn({"params": p}, *a))
        return self._jit[method](self.params, *args)

    # -- input checks (outside jit, so errors name the problem instead of failing in XLA) ------
    def _check_ids(self, input_ids, name="input_ids"):
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ValueError(f"{name} must be int [batch, length] with length >= 1, got shape {ids.shape}.")
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"{name} must be integer token ids, got dtype {ids.dtype}.")
        v = self.config.llm.vocab_size
        if ids.min() < 0 or ids.max() >= v:
            raise ValueError(f"{name} holds ids outside [0, {v}); check the tokenizer matches this checkpoint.")
        if ids.shape[1] > self.config.llm.max_position_embeddings:
            raise ValueError(f"{name} length {ids.shape[1]} exceeds the context of "
                             f"{self.config.llm.max_position_embeddings} tokens; shorten the prompt.")
        return jnp.asarray(ids, jnp.int32)

    def _check_images(self, images, size, name):
        x = np.asarray(images)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"{name} must be NHWC with 3 channels, got shape {x.shape}; "
                             "convert grayscale/RGBA images to RGB and stack them as [N, H, W, 3].")
        if x.shape[1:3] != (size, size):
            raise ValueError(f"{name} are {x.shape[1]}x{x.shape[2]} but this model takes {size}x{size}; "
                             "resize (and pad to square) first.")
        if x.size and (np.nanmax(np.abs(x)) > 1.5 or not np.isfinite(x).all()):
            raise ValueError(f"{name} must be float in [-1, 1] (mean=std=0.5 normalisation); got values up to "
                             f"{np.nanmax(np.abs(x)):.3g}. Divide 0-255 images by 127.5 and subtract 1.")
        return jnp.asarray(x, jnp.float32)

    # -- public API -------------------------------------------------------------------------------
    def understanding_logits(self, input_ids, pixel_values=None, attention_mask=None):
        """int32 [B, T] (+ [M, H, W, 3] images) -> float32 [B, T, V]."""
        ids = self._check_ids(input_ids)
        n_slots = int((np.asarray(ids) == self.config.tokens.image_token_id).sum())
        if pixel_values is None:
            if n_slots:
                raise ValueError(f"input_ids hold {n_slots} image placeholder tokens but no pixel_values were given.")
            return self._call("understanding_logits", ids, None, attention_mask)
        px = self._check_images(pixel_values, self.config.vision.image_size, "pixel_values")
        per_image = num_understanding_tokens(self.config)
        if n_slots != px.shape[0] * per_image:
            raise ValueError(f"input_ids hold {n_slots} image placeholder tokens but {px.shape[0]} image(s) need "
                             f"{px.shape[0] * per_image} ({per_image} each); expand each placeholder to {per_image} tokens.")
        return self._call("understanding_logits", ids, px, attention_mask)

    def image_logits(self, input_ids, image_tokens, attention_mask=None):
        """Prompt int32 [B, L] ending with <begin_of_image>, codes int32 [B, N] -> float32 [B, N, K]."""
        ids = self._check_ids(input_ids)
        codes = np.asarray(image_tokens)
        if codes.ndim != 2 or codes.shape[0] != ids.shape[0] or codes.shape[1] == 0:
            raise ValueError(f"image_tokens must be int [B={ids.shape[0]}, N], got shape {codes.shape}.")
        if codes.min() < 0 or codes.max() >= self.config.vq.codebook_size:
            raise ValueError(f"image_tokens must be codes in [0, {self.config.vq.codebook_size}).")
        return self._call("image_logits", ids, jnp.asarray(codes, jnp.int32), attention_mask)

    def vq_encode(self, images):
        """[B, H, W, 3] in [-1, 1] -> int32 [B, N]."""
        return self._call("vq_encode", self._check_images(images, self.config.vq.image_size, "images"))

    def vq_decode(self, image_tokens):
        """int32 [B, N] -> float32 [B, H, W, 3] in about [-1, 1]."""
        codes = np.asarray(image_tokens)
        n = num_image_tokens(self.config)
        if codes.ndim != 2 or codes.shape[1] != n:
            raise ValueError(f"image_tokens must be int [B, {n}] for this VQ, got shape {codes.shape}.")
        if codes.min() < 0 or codes.max() >= self.config.vq.codebook_size:
            raise ValueError(f"image_tokens must be codes in [0, {self.config.vq.codebook_size}).")
        return self._call("vq_decode", jnp.asarray(codes, jnp.int32))

    # -- sampling (unimm_jax/sample) -------------------------------------------------------------
    def generate_text(self, input_ids, pixel_values=None, *, max_new_tokens, temperature=0.0, top_k=None,
                      top_p=None, seed=0, attention_mask=None, max_batch=None, progress=False):
        """Sampled (temperature 0: greedy) answers: int32 [B, max_new_tokens], pad id after EOS.

        input_ids: a list of prompts of any lengths, or int [B, T] (+ left-padding attention_mask);
        image placeholders are filled from pixel_values [M, H, W, 3] in [-1, 1], in order.
        max_batch caps the rows decoded at once (default: as many as fit in device memory).
        """
        from unimm_jax.sample.generate import generate_text

        return generate_text(self, input_ids, pixel_values, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_k=top_k, top_p=top_p, seed=seed, attention_mask=attention_mask,
                             max_batch=max_batch, progress=progress)

    def generate_image_tokens(self, input_ids, *, num_images=1, cfg_weight=5.0, temperature=1.0, top_k=None,
                              top_p=None, seed=0, pad_token_id=None, attention_mask=None, max_batch=None,
                              progress=False):
        """Image codes with classifier-free guidance: int32 [B * num_images, N], prompt-major.

        Prompts end with <begin_of_image>; the unconditional prompt replaces every token but BOS
        and BOI with pad_token_id (None: config.tokens.pad_token_id); logits u + cfg_weight (c - u).
        max_batch caps the images decoded at once (each is two rows with CFG).
        """
        from unimm_jax.sample.generate import generate_image_tokens

        return generate_image_tokens(self, input_ids, num_images=num_images, cfg_weight=cfg_weight,
                                     temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                     pad_token_id=pad_token_id, attention_mask=attention_mask,
                                     max_batch=max_batch, progress=progress)


def load_pretrained(path: str, mesh: Mesh | None = None, dtype: str | None = None, vae=None) -> JanusModel:
    """Loads a transformers, DeepSeek-original or unimm Janus checkpoint directory.

    mesh: place parameters sharded over it by the logical axis rules (None: default device).
    dtype: cast parameters (None keeps the checkpoint's dtype).
    vae: JanusFlow only: a diffusers VAE directory or a loaded VAE (default: `path/vae` if present).
    JanusFlow checkpoints (DeepSeek-original or unimm) load as a `unimm_jax.flow_api.JanusFlowModel`.
    """
    path = resolve_checkpoint_dir(os.fspath(path))
    ckpt = read_checkpoint(path, dtype, lazy=True)  # read leaf by leaf while placing on devices
    if ckpt.config.get("family", "janus") == "janusflow":
        from unimm_jax.flow_api import load_janusflow
        ckpt.params = jax.tree.map(np.asarray, ckpt.params)  # flow_api.place_params takes numpy leaves
        return load_janusflow(ckpt, mesh, vae, path)
    params = place_params(ckpt.params, ckpt.config, mesh)
    ckpt.params = None  # the numpy copy is no longer needed
    model = JanusModel(ckpt.config, params, mesh, ckpt)
    model.checkpoint_dir = path
    return model


def resolve_checkpoint_dir(path: str) -> str:
    """`path` if it is a checkpoint; `path/model` if `path` is a training workdir that exported one."""
    from unimm_jax.convert.checkpoints import detect_layout
    from unimm_jax.convert.safetensors_io import CheckpointError

    try:
        detect_layout(path)
        return path
    except CheckpointError as err:
        inner = os.path.join(path, "model")
        if os.path.isdir(inner):
            try:
                detect_layout(inner)
                return inner
            except CheckpointError as inner_err:
                raise CheckpointError(f"{path} is not a checkpoint and its model/ subdirectory is not one either: "
                                      f"{inner_err}") from None
        raise CheckpointError(f"{err} (A training workdir works too once unimm-train has exported WORKDIR/model.)") from None


def save_pretrained(model: JanusModel, out_dir: str, format: str = "unimm", dtype: str | None = None, overwrite: bool = False) -> None:
    """Writes `model` as a transformers ("hf"), DeepSeek-original ("deepseek") or "unimm" checkpoint."""
    src = model._checkpoint
    ckpt = Checkpoint(model.config, model.params, src.extras if src else None, src.extras_format if src else None,
                      src.side_dir if src else None)
    write_checkpoint(ckpt, os.fspath(out_dir), format, dtype, overwrite)
