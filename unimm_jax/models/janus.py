"""Janus / Janus-Pro: one LLM, two visual paths (decoupled encoders).

  understanding:  image -> SigLIP -> aligner -> features scattered into the
                  <image_placeholder> slots of the text embeddings -> LLM -> lm_head
  generation:     image codes -> gen_embed -> gen_aligner -> LLM -> gen_head -> code logits
  tokenizer:      VQ-16 (images <-> codes), frozen during LLM training
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from unimm_jax.layers.mlp import MlpProjector, dense, gelu
from unimm_jax.models.llm import LLM
from unimm_jax.models.siglip import SigLIPEncoder
from unimm_jax.models.vq import VQModel


def scatter_image_features(embeds: jax.Array, mask: jax.Array, features: jax.Array) -> jax.Array:
    """Fills the masked slots of embeds, in row-major order, with the rows of features.

    embeds: [B, T, D]; mask: bool [B, T]; features: [M, N, D] with M*N == mask.sum()
    (checked by the caller, outside jit) -> [B, T, D]. Same as torch's masked_scatter.
    """
    flat = features.reshape(-1, features.shape[-1]).astype(embeds.dtype)
    order = jnp.cumsum(mask.reshape(-1).astype(jnp.int32)) - 1
    picked = flat[jnp.clip(order, 0, flat.shape[0] - 1)].reshape(embeds.shape)
    return jnp.where(mask[..., None], picked, embeds)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """RoPE positions for left-padded rows: int32 [B, T], 0 at the first real token."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)


class GenHead(nn.Module):
    """proj_out -> GELU -> vision_head: hidden [..., D] -> code logits [..., K]."""

    hidden_size: int
    codebook_size: int
    dtype: str = "float32"

    @nn.compact
    def __call__(self, h):
        dt = jnp.dtype(self.dtype)
        h = dense(self.hidden_size, ("embed", "mlp"), "proj_out", dtype=dt)(h)
        return dense(self.codebook_size, ("mlp", "codebook"), "vision_head", dtype=dt)(gelu(h)).astype(jnp.float32)


class Janus(nn.Module):
    """The unified model. `cfg` is `config.model` (see configs/janus_pro_1b.py)."""

    cfg: ml_collections.ConfigDict

    def setup(self):
        c = self.cfg
        d = c.llm.hidden_size
        self.llm = LLM(c.llm)
        self.vision = SigLIPEncoder(c.vision)
        self.aligner = MlpProjector(d, c.aligner.depth, c.llm.dtype)
        self.vq = VQModel(c.vq)
        self.gen_embed = nn.Embed(
            c.vq.codebook_size,
            c.vq.codebook_dim,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0), ("codebook", "codebook_dim")),
        )
        self.gen_aligner = MlpProjector(d, c.gen_aligner.depth, c.llm.dtype)
        self.gen_head = GenHead(c.gen_head.hidden_size, c.vq.codebook_size, c.llm.dtype)

    # -- understanding -------------------------------------------------------------------
    def image_features(self, pixel_values: jax.Array) -> jax.Array:
        """[M, H, W, 3] in [-1, 1] -> aligned features [M, N_und, D]."""
        return self.aligner(self.vision(pixel_values))

    def text_embeds(self, input_ids, pixel_values=None):
        """Token embeddings with image features placed at the image-token slots: [B, T, D]."""
        embeds = self.llm.embed_tokens(input_ids)
        if pixel_values is not None:
            mask = input_ids == self.cfg.tokens.image_token_id
            embeds = scatter_image_features(embeds, mask, self.image_features(pixel_values))
        return embeds

    def understanding_logits(self, input_ids, pixel_values=None, attention_mask=None):
        """input_ids int32 [B, T] (+ pixel_values [M, H, W, 3]) -> float32 text logits [B, T, V]."""
        embeds = self.text_embeds(input_ids, pixel_values)
        hidden = self.run_llm(embeds, attention_mask)
        return self.llm.logits(hidden)

    # -- generation ----------------------------------------------------------------------
    def image_token_embeds(self, codes: jax.Array) -> jax.Array:
        """int32 codes [B, N] -> LLM input embeddings [B, N, D]."""
        return self.gen_aligner(self.gen_embed(codes))

    def image_logits(self, input_ids, image_tokens, attention_mask=None):
        """Teacher-forced code logits.

        input_ids: int32 [B, L] ending with <begin_of_image>; image_tokens: int32 [B, N].
        Returns float32 [B, N, K]: row i = logits of code i given the prompt and codes[:, :i].
        """
        prompt = self.llm.embed_tokens(input_ids)
        embeds = jnp.concatenate([prompt, self.image_token_embeds(image_tokens[:, :-1]).astype(prompt.dtype)], axis=1)
        if attention_mask is not None:
            ones = jnp.ones(image_tokens[:, :-1].shape, attention_mask.dtype)
            attention_mask = jnp.concatenate([attention_mask, ones], axis=1)
        hidden = self.run_llm(embeds, attention_mask)
        return self.gen_head(hidden[:, input_ids.shape[1] - 1 :])

    # -- shared ----------------------------------------------------------------------------
    def run_llm(self, embeds, attention_mask=None, segment_ids=None, positions=None):
        """LLM over embeddings [B, T, D]; attention_mask (1 = real token, left padding) or
        packed segment_ids/positions. Returns final hidden states [B, T, D]."""
        b, t, _ = embeds.shape
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32) if attention_mask is None else attention_mask.astype(jnp.int32)
        if positions is None:
            positions = positions_from_mask(segment_ids > 0)
        hidden, _ = self.llm(embeds, positions, segment_ids)
        return hidden

    def vq_encode(self, images):
        """[B, H, W, 3] in [-1, 1] -> int32 codes [B, N]."""
        return self.vq.encode(images).codes

    def vq_decode(self, codes):
        """int32 codes [B, N] -> float32 images [B, H, W, 3] (about [-1, 1])."""
        return self.vq.decode(codes).astype(jnp.float32)

    def init_all(self, input_ids, pixel_values, image_tokens, images):
        """Touches every parameter; the `method` for `init`."""
        return (
            self.understanding_logits(input_ids, pixel_values),
            self.image_logits(input_ids, image_tokens),
            self.vq(images),
        )
