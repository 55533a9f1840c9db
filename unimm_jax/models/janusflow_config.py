"""Model configs for JanusFlow as ml_collections ConfigDicts, and their validation.

`configs/janusflow_1_3b.py` and `configs/shapes_flow_tiny.py` call `janusflow_model_config(...)`;
the DeepSeek checkpoint reader builds the same dict from a checkpoint's config.json.
`validate_janusflow_config` names the first bad field and the fix.

Layout of `config.model` (family "janusflow"):
  llm           the shared Llama decoder (same fields as Janus's)
  vision        SigLIP understanding encoder (same fields as Janus's)
  gen_encoder   ShallowUViTEncoder: latents [B,h,w,C] -> [B,h/s,w/s,width] (2x2 patchify + ConvNeXt)
  gen_decoder   ShallowUViTDecoder: [B,h/s,w/s,width] (+ skip) -> velocity [B,h,w,C]
  latent        the VAE latent space the flow lives in (SDXL-VAE: 4 channels, /8, scale 0.13025)
  flow          training: t distribution, CFG condition-drop rate, loss weights
  repa          REPA head: an MLP on LLM layer `layer` at the latent tokens -> SigLIP width
  tokens        special token ids (read them from the tokenizer; defaults are DeepSeek's)
"""
from __future__ import annotations

import ml_collections

from unimm_jax.models.janus_config import janus_model_config


def janusflow_model_config(
    *,
    vocab_size: int = 102400,
    hidden_size: int = 2048,
    num_layers: int = 24,
    num_heads: int = 16,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    intermediate_size: int = 5632,
    rope_theta: float = 10000.0,
    rms_norm_eps: float = 1e-6,
    max_position_embeddings: int = 4096,
    vision_hidden: int = 1024,
    vision_layers: int = 24,
    vision_heads: int = 16,
    image_size: int = 384,
    patch_size: int = 16,
    gen_width: int = 768,
    gen_layers_in_middle: int = 2,
    gen_patch: int = 2,
    latent_channels: int = 4,
    vae_downsample: int = 8,
    scaling_factor: float = 0.13025,
    shift_factor: float = 0.0,
    latent_kind: str = "vae",
    repa_enabled: bool = True,
    repa_layer: int = 6,
    repa_hidden: int | None = None,
    image_token_id: int = 100581,
    boi_token_id: int = 100016,
    eoi_token_id: int = 100593,
    pad_token_id: int = 100015,
    bos_token_id: int = 100000,
    eos_token_id: int = 100001,
    dtype: str = "float32",
) -> ml_collections.ConfigDict:
    """The `config.model` dict of a JanusFlow model; defaults are JanusFlow-1.3B.

    The LLM, SigLIP and token sub-dicts are built exactly as for Janus (one place decides them).
    """
    base = janus_model_config(
        vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
        num_kv_heads=num_kv_heads, head_dim=head_dim, intermediate_size=intermediate_size,
        rope_theta=rope_theta, rms_norm_eps=rms_norm_eps, max_position_embeddings=max_position_embeddings,
        vision_hidden=vision_hidden, vision_layers=vision_layers, vision_heads=vision_heads,
        image_size=image_size, patch_size=patch_size, image_token_id=image_token_id,
        boi_token_id=boi_token_id, eoi_token_id=eoi_token_id, pad_token_id=pad_token_id,
        bos_token_id=bos_token_id, eos_token_id=eos_token_id, dtype=dtype,
    )
    gen_encoder = ml_collections.ConfigDict(dict(
        input_channels=latent_channels, kernel_size=gen_patch, stride=gen_patch, padding=0,
        block_out_channels=(gen_width,), layers_in_middle=gen_layers_in_middle, use_bias=True,
        norm_eps=1e-6, dropout=0.0, use_mid_block=True,
    ))
    gen_decoder = ml_collections.ConfigDict(dict(
        in_channels=gen_width, out_channels=latent_channels, block_out_channels=(gen_width,),
        upsamples=1, layers_in_middle=gen_layers_in_middle, use_bias=True, norm_eps=1e-6, dropout=0.0,
        use_mid_block=True,
    ))
    # kind "vae": a diffusers AutoencoderKL decodes (SDXL-VAE for JanusFlow, not in its checkpoints);
    # kind "space_to_depth": latents are f x f pixel patches (no VAE; tiny CPU configs).
    latent = ml_collections.ConfigDict(dict(
        kind=latent_kind, image_size=image_size, downsample=vae_downsample, channels=latent_channels,
        scaling_factor=scaling_factor, shift_factor=shift_factor,
    ))
    # Training knobs. The paper (arXiv 2411.07975 sec. 3) is the only source: no training code
    # was released. Logit-normal t and a 10% condition drop are the usual choices it follows.
    flow = ml_collections.ConfigDict(dict(
        t_distribution="logit_normal", t_mean=0.0, t_std=1.0, cond_drop_rate=0.1,
        rf_weight=1.0, repa_weight=1.0,
    ))
    repa = ml_collections.ConfigDict(dict(
        enabled=repa_enabled, layer=repa_layer, hidden=repa_hidden or hidden_size,
    ))
    return ml_collections.ConfigDict(dict(
        family="janusflow",
        llm=base.llm,
        vision=base.vision,
        gen_encoder=gen_encoder,
        gen_decoder=gen_decoder,
        latent=latent,
        flow=flow,
        repa=repa,
        tokens=base.tokens,
    ))


def janusflow_1_3b_config(**overrides) -> ml_collections.ConfigDict:
    """JanusFlow-1.3B with the reference's sizes (DeepSeek-LLM 1.3B, SigLIP-L/16@384, 768-wide UViT)."""
    return janusflow_model_config(**overrides)


def tiny_janusflow_config(**overrides) -> ml_collections.ConfigDict:
    """A few-layer model for tests: 32x32 images -> 4x4x4 latents -> 2x2 = 4 latent tokens, GQA."""
    kwargs = dict(
        vocab_size=512, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=128,
        rope_theta=50000.0, max_position_embeddings=512, vision_hidden=32, vision_layers=2, vision_heads=2,
        image_size=32, patch_size=8, gen_width=32, gen_layers_in_middle=1, repa_layer=1, repa_hidden=48,
        image_token_id=500, boi_token_id=501, eoi_token_id=502, pad_token_id=503, bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(overrides)
    return janusflow_model_config(**kwargs)


def latent_grid(m: ml_collections.ConfigDict) -> int:
    """Latent side length h = w (48 for 384-pixel images through SDXL-VAE's /8)."""
    return m.latent.image_size // m.latent.downsample


def num_latent_tokens(m: ml_collections.ConfigDict) -> int:
    """LLM tokens per image on the generation path: (h / patch)^2 (576 for JanusFlow-1.3B)."""
    g = latent_grid(m) // m.gen_encoder.stride
    return g * g


def num_understanding_tokens(m: ml_collections.ConfigDict) -> int:
    """SigLIP features per understanding image: (image / patch)^2 (576 at 384/16)."""
    return (m.vision.image_size // m.vision.patch_size) ** 2


def normalize_janusflow_config(m: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Tuples where JSON round trips produce lists (block_out_channels); returns `m`."""
    for sub in ("gen_encoder", "gen_decoder"):
        m[sub].block_out_channels = tuple(int(c) for c in m[sub].block_out_channels)
    return m


def _check(cond: bool, field: str, value, fix: str):
    if not cond:
        raise ValueError(f"config field {field}={value!r} is out of range: {fix}")


def validate_janusflow_config(m: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first field out of range (and how to fix it)."""
    _check(m.get("family") == "janusflow", "model.family", m.get("family"), "must be 'janusflow' for this config.")
    llm, vis, enc, dec, lat = m.llm, m.vision, m.gen_encoder, m.gen_decoder, m.latent
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
        _check(int(llm[name]) > 0, f"model.llm.{name}", llm[name], "must be a positive integer.")
    _check(llm.num_heads % llm.num_kv_heads == 0, "model.llm.num_kv_heads", llm.num_kv_heads,
           f"must divide num_heads={llm.num_heads} (grouped-query attention).")
    _check(llm.head_dim % 2 == 0, "model.llm.head_dim", llm.head_dim, "must be even for rotary embeddings.")
    _check(vis.hidden_size % vis.num_heads == 0, "model.vision.num_heads", vis.num_heads,
           f"must divide vision hidden_size={vis.hidden_size}.")
    _check(vis.image_size % vis.patch_size == 0, "model.vision.patch_size", vis.patch_size,
           f"must divide image_size={vis.image_size}.")
    _check(lat.image_size % lat.downsample == 0, "model.latent.image_size", lat.image_size,
           f"must be a multiple of the VAE downsampling factor {lat.downsample}.")
    _check(lat.get("kind", "vae") in ("vae", "space_to_depth"), "model.latent.kind", lat.get("kind"),
           "use 'vae' (a diffusers AutoencoderKL decodes) or 'space_to_depth' (pixel patches, no VAE).")
    if lat.get("kind", "vae") == "space_to_depth":
        _check(lat.channels == 3 * lat.downsample ** 2, "model.latent.channels", lat.channels,
               f"space_to_depth latents have 3 * downsample^2 = {3 * lat.downsample ** 2} channels.")
    _check(lat.scaling_factor > 0, "model.latent.scaling_factor", lat.scaling_factor, "must be positive.")
    _check(enc.input_channels == lat.channels, "model.gen_encoder.input_channels", enc.input_channels,
           f"must equal model.latent.channels={lat.channels}.")
    _check(dec.out_channels == lat.channels, "model.gen_decoder.out_channels", dec.out_channels,
           f"must equal model.latent.channels={lat.channels}.")
    _check(enc.kernel_size == enc.stride and enc.padding == 0, "model.gen_encoder.kernel_size", enc.kernel_size,
           "must equal stride with padding 0 (a patchify conv), as JanusFlow's decoder unpatchifies by 2^upsamples.")
    _check(dec.upsamples == 1 and enc.stride == 2, "model.gen_decoder.upsamples", dec.upsamples,
           "JanusFlow's decoder unpatchifies once by 2: use gen_encoder.stride=2 and gen_decoder.upsamples=1.")
    _check(dec.in_channels == enc.block_out_channels[-1], "model.gen_decoder.in_channels", dec.in_channels,
           f"must equal the encoder width {enc.block_out_channels[-1]} (the aligners map to and from it).")
    g = lat.image_size // lat.downsample
    _check(g % enc.stride == 0, "model.latent.image_size", lat.image_size,
           f"the latent grid {g} must be divisible by gen_encoder.stride={enc.stride}.")
    if m.repa.enabled:
        _check(1 <= m.repa.layer <= llm.num_layers - 1, "model.repa.layer", m.repa.layer,
               f"must be in [1, num_layers-1={llm.num_layers - 1}] (features after that many LLM layers).")
        _check(m.repa.hidden > 0, "model.repa.hidden", m.repa.hidden, "must be positive.")
        gv, gl = vis.image_size // vis.patch_size, g // enc.stride
        _check(gv % gl == 0, "model.vision.patch_size", vis.patch_size,
               f"REPA pools the {gv}x{gv} SigLIP grid onto the {gl}x{gl} latent token grid: it must divide evenly.")
    f = m.flow
    _check(f.t_distribution in ("uniform", "logit_normal"), "model.flow.t_distribution", f.t_distribution,
           "use 'uniform' or 'logit_normal'.")
    _check(0.0 <= f.cond_drop_rate < 1.0, "model.flow.cond_drop_rate", f.cond_drop_rate, "must be in [0, 1).")
    toks = m.tokens
    for name in ("image_token_id", "boi_token_id", "pad_token_id", "bos_token_id"):
        _check(0 <= toks[name] < llm.vocab_size, f"model.tokens.{name}", toks[name],
               f"must be a token id in [0, vocab_size={llm.vocab_size}).")
