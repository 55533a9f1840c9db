"""JanusFlow: one LLM, autoregressive understanding and rectified-flow generation.

  understanding:  image -> SigLIP -> und_aligner (Linear) -> features placed at the
                  <begin_of_image> (takes the learned `beg_of_und_embed`) and <image_placeholder>
                  slots of the text embeddings -> LLM -> lm_head
  generation:     VAE latents z_t [B,h,w,C] and t -> gen_encoder (2x2 patchify + ConvNeXt, t*1000)
                  -> gen_enc_aligner -> N latent tokens; LLM input = [prompt without its final
                  <begin_of_image>, t_emb (one token), N latent tokens]; the last N hidden states
                  -> gen_dec_aligner(RMSNorm) -> gen_decoder (+ encoder skip, t_emb) -> velocity
  training:       rectified flow on z_t = t*x + (1-t)*z0 (target x - z0) plus REPA: negative
                  cosine between repa_head(LLM layer `repa.layer` at the latent tokens) and the
                  stop-gradient SigLIP features of the clean image (`flow_training_loss`).

Parameter names follow DeepSeek's `janus/janusflow/models/modeling_vlm.py` (see
`unimm_jax/convert/janusflow_checkpoint.py`). Images NHWC in [-1,1]; latents NHWC in the VAE's
scaled ("model") space: x = (vae_mean - shift) * scaling_factor.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from unimm_jax.layers.mlp import dense
from unimm_jax.layers.norms import RMSNorm
from unimm_jax.layers.rope import rope_frequencies
from unimm_jax.losses import flow_interpolate, rectified_flow_loss, repa_loss, sample_flow_timesteps
from unimm_jax.models.flow import ShallowUViTDecoder, ShallowUViTEncoder
from unimm_jax.models.janus import positions_from_mask, scatter_image_features
from unimm_jax.models.janusflow_config import latent_grid, num_latent_tokens
from unimm_jax.models.llm import LLM
from unimm_jax.models.siglip import SigLIPEncoder

# JanusFlow feeds the encoder t * 1000 (t in [0, 1]); the sinusoidal embedding was trained on that scale.
TIME_SCALE = 1000.0


class RepaHead(nn.Module):
    """REPA projector h_phi (as in REPA's build_mlp): Linear -> SiLU -> Linear -> SiLU -> Linear.

    x [..., D] -> [..., features]. Training only; DeepSeek checkpoints do not have it.
    """

    hidden: int
    features: int
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x):
        dt = jnp.dtype(self.dtype)
        x = nn.silu(dense(self.hidden, ("embed", "mlp"), "dense_0", dtype=dt)(x))
        x = nn.silu(dense(self.hidden, ("mlp", "mlp"), "dense_1", dtype=dt)(x))
        return dense(self.features, ("mlp", "embed"), "dense_2", dtype=dt)(x)


def gen_encoder_module(c: ml_collections.ConfigDict, **kw) -> ShallowUViTEncoder:
    """The ShallowUViTEncoder `config.model` describes (conditioning width = the LLM's)."""
    e = c.gen_encoder
    return ShallowUViTEncoder(
        input_channels=e.input_channels, kernel_size=e.kernel_size, stride=e.stride, padding=e.padding,
        block_out_channels=tuple(e.block_out_channels), layers_in_middle=e.layers_in_middle,
        hidden_size=c.llm.hidden_size, use_bias=e.use_bias, norm_eps=e.norm_eps, dropout=e.dropout,
        use_mid_block=e.use_mid_block, dtype=jnp.dtype(c.llm.dtype), **kw,
    )


def gen_decoder_module(c: ml_collections.ConfigDict, **kw) -> ShallowUViTDecoder:
    """The ShallowUViTDecoder `config.model` describes."""
    d = c.gen_decoder
    return ShallowUViTDecoder(
        in_channels=d.in_channels, out_channels=d.out_channels, block_out_channels=tuple(d.block_out_channels),
        upsamples=d.upsamples, layers_in_middle=d.layers_in_middle, hidden_size=c.llm.hidden_size,
        use_bias=d.use_bias, norm_eps=d.norm_eps, dropout=d.dropout, use_mid_block=d.use_mid_block,
        dtype=jnp.dtype(c.llm.dtype), **kw,
    )


def _with_layers(c: ml_collections.ConfigDict, n: int) -> ml_collections.ConfigDict:
    out = ml_collections.ConfigDict(c.to_dict())
    out.num_layers = n
    return out


class JanusFlow(nn.Module):
    """The unified flow model. `cfg` is `config.model` (see configs/janusflow_1_3b.py)."""

    cfg: ml_collections.ConfigDict

    def setup(self):
        c = self.cfg
        d = c.llm.hidden_size
        dt = jnp.dtype(c.llm.dtype)
        self.llm = LLM(c.llm)
        self.vision = SigLIPEncoder(c.vision)
        self.und_aligner = dense(d, ("mlp", "embed"), "und_aligner", dtype=dt)
        self.beg_of_und_embed = self.param(
            "beg_of_und_embed", nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")), (1, d)
        )
        self.gen_encoder = gen_encoder_module(c)
        self.gen_enc_aligner = dense(d, ("mlp", "embed"), "gen_enc_aligner", dtype=dt)
        self.gen_decoder = gen_decoder_module(c)
        self.gen_dec_aligner_norm = RMSNorm(c.llm.rms_norm_eps)
        self.gen_dec_aligner = dense(c.gen_decoder.in_channels, ("embed", "mlp"), "gen_dec_aligner", dtype=dt)
        if c.repa.enabled:
            self.repa_head = RepaHead(c.repa.hidden, c.vision.hidden_size, c.llm.dtype)

    # -- understanding ------------------------------------------------------------------------
    def image_features(self, pixel_values: jax.Array) -> jax.Array:
        """[M, H, W, 3] in [-1, 1] -> [M, 1 + N_und, D]: beg_of_und_embed then the aligned SigLIP features."""
        feats = self.und_aligner(self.vision(pixel_values))
        beg = jnp.broadcast_to(self.beg_of_und_embed[None].astype(feats.dtype), (feats.shape[0], 1, feats.shape[-1]))
        return jnp.concatenate([beg, feats], axis=1)

    def text_embeds(self, input_ids, pixel_values=None):
        """Token embeddings [B, T, D]; with images, each <begin_of_image> + N <image_placeholder> run
        takes that image's `image_features` (the caller checks the counts, outside jit)."""
        embeds = self.llm.embed_tokens(input_ids)
        if pixel_values is not None:
            t = self.cfg.tokens
            mask = (input_ids == t.image_token_id) | (input_ids == t.boi_token_id)
            embeds = scatter_image_features(embeds, mask, self.image_features(pixel_values))
        return embeds

    def understanding_logits(self, input_ids, pixel_values=None, attention_mask=None):
        """input_ids int32 [B, T] (+ pixel_values [M, H, W, 3]) -> float32 text logits [B, T, V]."""
        embeds = self.text_embeds(input_ids, pixel_values)
        seg = jnp.ones(input_ids.shape, jnp.int32) if attention_mask is None else attention_mask.astype(jnp.int32)
        hidden = self.run_llm(embeds, seg, positions_from_mask(seg > 0))
        return self.llm.logits(hidden)

    # -- generation -----------------------------------------------------------------------------
    def encode_latents(self, z: jax.Array, t: jax.Array):
        """z [B, h, w, C] at times t [B] (in [0, 1]) -> (tokens [B, N, D], t_emb [B, D], skip [B, h/2, w/2, W])."""
        x_emb, t_emb, hs = self.gen_encoder(z, t * TIME_SCALE)
        b, gh, gw, w = x_emb.shape
        tokens = self.gen_enc_aligner(x_emb.reshape(b, gh * gw, w))  # row-major = torch's view+permute
        return tokens, t_emb, hs[-1]

    def decode_velocity(self, hidden: jax.Array, skip: jax.Array, t_emb: jax.Array) -> jax.Array:
        """LLM hidden states at the N latent tokens [B, N, D] -> velocity [B, h, w, C] (float32)."""
        b, gh, gw, _ = skip.shape
        x = self.gen_dec_aligner(self.gen_dec_aligner_norm(hidden))
        x = x.reshape(b, gh, gw, x.shape[-1])
        return self.gen_decoder(x, [skip], t_emb).astype(jnp.float32)

    def encode_latents_tiled(self, z: jax.Array, t: jax.Array, repeat: int = 1):
        """`encode_latents` of z [b, ...] with every output tiled `repeat` times along the batch.

        CFG feeds the same z to the conditional and unconditional rows: encoding it once and
        tiling ([z; z] order) halves the encoder's work and gives identical results.
        """
        out = self.encode_latents(z, t)
        return tuple(jnp.concatenate([x] * repeat, axis=0) if repeat > 1 else x for x in out)

    def generation_embeds(self, prefix_embeds, z, t, repeat: int = 1):
        """[prefix [B, P, D], t_emb, latent tokens] -> (embeds [B, P+1+N, D], skip, t_emb).

        z, t may cover B / repeat rows (see `encode_latents_tiled`)."""
        tokens, t_emb, skip = self.encode_latents_tiled(z, t, repeat)
        dt = prefix_embeds.dtype
        embeds = jnp.concatenate([prefix_embeds, t_emb[:, None].astype(dt), tokens.astype(dt)], axis=1)
        return embeds, skip, t_emb

    def velocity(self, prefix_embeds, z, t, segment_ids, positions, repeat: int = 1):
        """One full (uncached) pass: prefix [B, P, D], z [B, h, w, C], t [B] -> velocity [B, h, w, C].

        segment_ids / positions: int32 [B, P+1+N] (0 = a key nobody attends to, e.g. the masked
        prompt of an unconditional row; positions are the RoPE positions). With repeat=r, z and t
        hold B / r rows, used for every block of B / r rows (CFG's [z; z]).
        """
        embeds, skip, t_emb = self.generation_embeds(prefix_embeds, z, t, repeat)
        hidden = self.run_llm(embeds, segment_ids, positions)
        n = skip.shape[1] * skip.shape[2]
        return self.decode_velocity(hidden[:, -n:], skip, t_emb)

    # -- shared ---------------------------------------------------------------------------------
    def run_llm(self, embeds, segment_ids, positions):
        """Final hidden states [B, T, D] over embeddings with segment ids (0 = masked key) and positions."""
        hidden, _ = self.llm(embeds, positions, segment_ids)
        return hidden

    def run_llm_split(self, embeds, segment_ids, positions, split: int):
        """(final hidden [B, T, D], hidden after the first `split` layers [B, T, D]).

        The scanned layer stack is run as two scans over slices of the same stacked params, so
        the intermediate state comes out without changing the LLM module or its checkpoint layout.
        """
        if self.is_initializing():
            h = self.run_llm(embeds, segment_ids, positions)
            return h, h
        c = self.cfg.llm
        layers = nn.unbox(self.llm.variables["params"]["layers"])
        cos, sin = rope_frequencies(positions, c.head_dim, c.rope_theta)
        slots = jnp.broadcast_to(jnp.arange(embeds.shape[1], dtype=jnp.int32), segment_ids.shape)

        def run(n, lo, h):
            sub = jax.tree.map(lambda x: x[lo:lo + n], layers)
            stack = LLM(_with_layers(c, n), parent=None)  # a detached copy, applied to sliced params
            return nn.apply(lambda m, *a: m.layers(*a)[0], stack)(
                {"params": {"layers": sub}}, h, cos, sin, segment_ids, slots, None, None, None
            )

        h_mid = run(split, 0, embeds.astype(jnp.dtype(c.dtype)))
        h_out = run(c.num_layers - split, split, h_mid)
        return self.llm.final_norm(h_out), h_mid

    def siglip_targets(self, pixel_values: jax.Array, n_tokens: int) -> jax.Array:
        """REPA targets: SigLIP features [B, N_und, Dv] average-pooled to the latent token grid [B, n, Dv]."""
        feats = self.vision(pixel_values)
        b, nv, dv = feats.shape
        gv, g = int(round(nv ** 0.5)), int(round(n_tokens ** 0.5))
        if gv != g:
            r = gv // g
            feats = feats.reshape(b, g, r, g, r, dv).mean(axis=(2, 4)).reshape(b, g * g, dv)
        return feats

    def init_all(self, input_ids, pixel_values, z):
        """Touches every parameter; the `method` for `init`.

        input_ids [B, T] holding one <begin_of_image> + N_und placeholders per image; z latents [B, h, w, C].
        """
        b = z.shape[0]
        out = [self.understanding_logits(input_ids, pixel_values)]
        prefix = self.llm.embed_tokens(input_ids[:, :1])
        n = num_latent_tokens(self.cfg)
        t_len = prefix.shape[1] + 1 + n
        ones = jnp.ones((b, t_len), jnp.int32)
        out.append(self.velocity(prefix, z, jnp.zeros((b,)), ones, positions_from_mask(ones > 0)))
        if self.cfg.repa.enabled:
            out.append(self.repa_head(jnp.zeros((1, 1, self.cfg.llm.hidden_size), prefix.dtype)))
        return out


# ---------------------------------------------------------------------------------------------
# pixel-space latents (latent.kind == "space_to_depth": no VAE, for tiny CPU runs)


def images_to_latents(images: jax.Array, m: ml_collections.ConfigDict) -> jax.Array:
    """Images [B, H, W, 3] in [-1, 1] -> latents [B, H/f, W/f, 3f^2] * scaling_factor (f = latent.downsample).

    The parameter-free "autoencoder" of latent.kind == "space_to_depth": each f x f patch becomes
    one latent pixel (channel order (i, j, c)); exact inverse `latents_to_images`.
    """
    f = m.latent.downsample
    b, h, w, c = images.shape
    x = images.reshape(b, h // f, f, w // f, f, c).transpose(0, 1, 3, 2, 4, 5)
    return (x.reshape(b, h // f, w // f, f * f * c) - m.latent.shift_factor) * m.latent.scaling_factor


def latents_to_images(latents: jax.Array, m: ml_collections.ConfigDict) -> jax.Array:
    """Inverse of `images_to_latents`: [B, h, w, 3f^2] -> float32 images [B, h*f, w*f, 3] clipped to [-1, 1]."""
    f = m.latent.downsample
    b, h, w, _ = latents.shape
    x = latents.astype(jnp.float32) / m.latent.scaling_factor + m.latent.shift_factor
    x = x.reshape(b, h, w, f, f, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, h * f, w * f, 3)
    return jnp.clip(x, -1.0, 1.0)


# ---------------------------------------------------------------------------------------------
# prompt layout shared by training and sampling


def prompt_layout(attention_mask: jax.Array, keep_prompt: jax.Array, n_tail: int):
    """Segment ids and positions for [prompt without its final token (P = L-1), tail of n_tail].

    attention_mask int [B, L] (1 = real token, left padding); keep_prompt bool [B] (False = the
    CFG-unconditional row: only its first real token, BOS, stays visible, as the reference masks
    `attention_mask[B:, 1:P] = 0`). Returns (segment_ids int32 [B, P+n_tail], positions int32
    [B, P+n_tail]); positions count masked prompt tokens too, exactly as the reference (whose
    positions are 0..T-1 whatever the mask) when there is no left padding.
    """
    m = attention_mask[:, :-1].astype(jnp.int32)
    b, p = m.shape
    first = jnp.argmax(m, axis=1)
    only_bos = (jnp.arange(p)[None, :] == first[:, None]).astype(jnp.int32)
    seg_prompt = jnp.where(keep_prompt[:, None], m, only_bos * m)
    tail = jnp.ones((b, n_tail), jnp.int32)
    positions = positions_from_mask(jnp.concatenate([m, tail], axis=1) > 0)
    return jnp.concatenate([seg_prompt, tail], axis=1), positions


# ---------------------------------------------------------------------------------------------
# training loss

FLOW_BATCH_FIELDS = {
    "input_ids": "int32 [B, L]: prompt ending with <begin_of_image> (left padded)",
    "attention_mask": "int32 [B, L]: 1 = real token",
    "latents": "float [B, h, w, C]: model-space VAE latents of the target image (x_res)",
    "pixel_values": "float [B, S, S, 3] in [-1, 1]: the same image at SigLIP size (REPA target)",
}


def check_flow_batch(batch: Mapping, model_cfg: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming a missing field or a wrong shape (call outside jit)."""
    need = ["input_ids", "attention_mask", "latents"] + (["pixel_values"] if model_cfg.repa.enabled else [])
    for k in need:
        if k not in batch:
            raise ValueError(f"flow batch is missing {k!r} ({FLOW_BATCH_FIELDS[k]}).")
    b, L = batch["input_ids"].shape
    if L < 2:
        raise ValueError(f"flow batch input_ids has length {L}; a prompt needs BOS ... <begin_of_image>.")
    g, ch = latent_grid(model_cfg), model_cfg.latent.channels
    if tuple(batch["latents"].shape) != (b, g, g, ch):
        raise ValueError(f"flow batch latents have shape {tuple(batch['latents'].shape)}, expected {(b, g, g, ch)} "
                         "(VAE latents of the configured image size, channels-last, scaled by scaling_factor).")
    if model_cfg.repa.enabled:
        s = model_cfg.vision.image_size
        if tuple(batch["pixel_values"].shape) != (b, s, s, 3):
            raise ValueError(f"flow batch pixel_values have shape {tuple(batch['pixel_values'].shape)}, "
                             f"expected {(b, s, s, 3)} (the target image at SigLIP resolution, in [-1, 1]).")


def flow_training_loss(module: JanusFlow, params, batch: Mapping[str, jax.Array], rng: jax.Array):
    """Generation loss of one batch: rf_weight * L_RF + repa_weight * L_REPA. Pure; differentiable.

    module: JanusFlow(config.model); params: its params; batch: `FLOW_BATCH_FIELDS`; rng: a key
    for t, the noise z0 and the condition drop. Returns (loss float32 [], aux dict of float32
    scalars: loss, rf_loss, repa_loss, t_mean, cond_dropped).
    """
    c = module.cfg
    f = c.flow
    x = batch["latents"]
    b = x.shape[0]
    k_t, k_z, k_drop = jax.random.split(rng, 3)
    t = sample_flow_timesteps(k_t, (b,), f.t_distribution, f.t_mean, f.t_std)
    z0 = jax.random.normal(k_z, x.shape, jnp.float32).astype(x.dtype)
    z_t = flow_interpolate(x, z0, t)
    keep = jax.random.uniform(k_drop, (b,)) >= f.cond_drop_rate
    n = num_latent_tokens(c)
    seg, pos = prompt_layout(batch["attention_mask"], keep, 1 + n)

    def fwd(m: JanusFlow):
        ids = batch["input_ids"][:, :-1]
        prefix = m.llm.embed_tokens(jnp.where(keep[:, None], ids, c.tokens.pad_token_id))
        embeds, skip, t_emb = m.generation_embeds(prefix, z_t, t)
        if c.repa.enabled:
            hidden, mid = m.run_llm_split(embeds, seg, pos, c.repa.layer)
        else:
            hidden, mid = m.run_llm(embeds, seg, pos), None
        v = m.decode_velocity(hidden[:, -n:], skip, t_emb)
        rf = rectified_flow_loss(v, x, z0)
        if mid is None:
            return rf, jnp.zeros((), jnp.float32)
        proj = m.repa_head(mid[:, -n:])
        target = m.siglip_targets(batch["pixel_values"], n)
        return rf, repa_loss(proj, target)

    rf, rp = nn.apply(fwd, module)({"params": params})
    loss = f.rf_weight * rf + (f.repa_weight * rp if c.repa.enabled else 0.0)
    aux = dict(loss=loss, rf_loss=rf, repa_loss=rp, t_mean=jnp.mean(t), cond_dropped=1.0 - jnp.mean(keep))
    return loss, aux
