"""JanusFlow model config <-> DeepSeek-original config.json (model_type "multi_modality").

A DeepSeek JanusFlow config.json has `language_config` (a LlamaConfig), `vision_und_enc_config`
(CLIPVisionTower, SigLIP-L/16 by name), `vision_gen_enc_config` (ShallowUViTEncoder params) and
`vision_gen_dec_config` (ShallowUViTDecoder params); that last pair is what tells it apart from a
Janus checkpoint. Sizes the original code hard-codes or does not record (SigLIP of another size,
the VAE latent space, REPA and training knobs, token ids) travel in `unimm_*` fields, which the
original code ignores.
"""
from __future__ import annotations

import ml_collections

from unimm_jax.convert.janus_config_io import SIGLIP_PRESETS, TOKEN_STRINGS, _rope_theta
from unimm_jax.convert.safetensors_io import CheckpointError
from unimm_jax.models.janusflow_config import (
    janusflow_model_config,
    normalize_janusflow_config,
    validate_janusflow_config,
)

GEN_ENC_KEY, GEN_DEC_KEY = "vision_gen_enc_config", "vision_gen_dec_config"


def is_janusflow_config(config: dict) -> bool:
    """True for a DeepSeek JanusFlow config.json dict (it names generation encoder/decoder configs)."""
    return GEN_ENC_KEY in config or GEN_DEC_KEY in config


def config_from_deepseek_flow(config: dict, tokenizer_ids: dict | None = None) -> ml_collections.ConfigDict:
    """The unimm model config of a DeepSeek-original JanusFlow checkpoint."""
    lang = config.get("language_config") or {}
    und = (config.get("vision_und_enc_config") or {}).get("params") or {}
    enc_cfg, dec_cfg = config.get(GEN_ENC_KEY) or {}, config.get(GEN_DEC_KEY) or {}
    for name, c, cls in ((GEN_ENC_KEY, enc_cfg, "ShallowUViTEncoder"), (GEN_DEC_KEY, dec_cfg, "ShallowUViTDecoder")):
        if c.get("cls", cls) != cls:
            raise CheckpointError(f"config.json {name}.cls={c.get('cls')!r} is not supported; expected {cls!r}.")
    enc, dec = enc_cfg.get("params") or {}, dec_cfg.get("params") or {}
    vision = und.get("unimm_vision")
    if vision is None:
        name = und.get("model_name", "siglip_large_patch16_384")
        if name not in SIGLIP_PRESETS:
            raise CheckpointError(f"vision_und_enc model {name!r} is not known; supported: {sorted(SIGLIP_PRESETS)}.")
        vision = dict(SIGLIP_PRESETS[name], image_size=und.get("image_size", 384))
    if und.get("select_layer", -1) != -1:
        raise CheckpointError(f"vision_und_enc select_layer={und.get('select_layer')} is not supported (only -1, all layers).")
    tok = dict(tokenizer_ids or {})
    tok.update(config.get("unimm_tokens") or {})
    hidden = lang.get("hidden_size", 2048)
    heads = lang.get("num_attention_heads", 16)
    width = list(enc.get("block_out_channels", [768]))
    if len(width) != 1 or list(dec.get("block_out_channels", width)) != width:
        raise CheckpointError(f"gen encoder/decoder block_out_channels {width} / {dec.get('block_out_channels')}: "
                              "only one equal width for both is supported (JanusFlow uses [768]).")
    latent = dict(config.get("unimm_latent") or {})
    cfg = janusflow_model_config(
        vocab_size=lang.get("vocab_size", 102400),
        hidden_size=hidden,
        num_layers=lang.get("num_hidden_layers", 24),
        num_heads=heads,
        num_kv_heads=lang.get("num_key_value_heads") or heads,
        head_dim=lang.get("head_dim") or hidden // heads,
        intermediate_size=lang.get("intermediate_size", 5632),
        rope_theta=_rope_theta(lang),
        rms_norm_eps=lang.get("rms_norm_eps", 1e-6),
        max_position_embeddings=lang.get("max_position_embeddings", 4096),
        gen_width=width[0],
        gen_layers_in_middle=enc.get("layers_in_middle", 2),
        gen_patch=enc.get("stride", 2),
        latent_channels=enc.get("input_channels", 4),
        vae_downsample=latent.get("downsample", 8),
        scaling_factor=latent.get("scaling_factor", 0.13025),
        shift_factor=latent.get("shift_factor", 0.0),
        latent_kind=latent.get("kind", "vae"),
        repa_enabled=False,
        **vision,
        **{k: tok[k] for k in TOKEN_STRINGS if k in tok},
    )
    cfg.latent.image_size = int(latent.get("image_size", cfg.vision.image_size))
    if lang.get("tie_word_embeddings"):
        raise CheckpointError("language_config.tie_word_embeddings=True is not supported for JanusFlow (its lm_head is untied).")
    e, d = cfg.gen_encoder, cfg.gen_decoder
    e.kernel_size = int(enc.get("kernel_size", 2))
    e.padding = int(enc.get("padding", 0)) if enc.get("padding", 0) is not None else 0
    d.upsamples = int(dec.get("upsamples", 1))
    d.layers_in_middle = int(dec.get("layers_in_middle", 2))
    d.in_channels = int(dec.get("in_channels", width[0]))
    d.out_channels = int(dec.get("out_channels", e.input_channels))
    for sub, params in ((e, enc), (d, dec)):
        sub.norm_eps = float(params.get("norm_eps", 1e-6))
        sub.use_bias = bool(params.get("use_bias", True))
        sub.use_mid_block = bool(params.get("use_mid_block", True))
        if params.get("elementwise_affine", True) is not True:
            raise CheckpointError("gen encoder/decoder elementwise_affine=False is not supported (JanusFlow uses True).")
    if config.get("unimm_repa"):
        cfg.repa.update(config["unimm_repa"])
    if config.get("unimm_flow"):
        cfg.flow.update(config["unimm_flow"])
    normalize_janusflow_config(cfg)
    validate_janusflow_config(cfg)
    return cfg


def deepseek_flow_config_from(m: ml_collections.ConfigDict, dtype: str) -> dict:
    """config.json for a DeepSeek-original JanusFlow checkpoint."""
    llm, vis, enc, dec = m.llm, m.vision, m.gen_encoder, m.gen_decoder
    own = dict(vision_hidden=vis.hidden_size, vision_layers=vis.num_layers, vision_heads=vis.num_heads,
               patch_size=vis.patch_size, image_size=vis.image_size)
    preset = next((n for n, p in SIGLIP_PRESETS.items() if p == own), None)
    und = dict(model_name=preset or "unimm_custom", image_size=vis.image_size, select_feature="same", select_layer=-1)
    if preset is None:
        und["unimm_vision"] = own
    common = dict(hidden_size=llm.hidden_size, layers_in_middle=enc.layers_in_middle, norm_eps=enc.norm_eps,
                  use_bias=enc.use_bias, use_mid_block=enc.use_mid_block, elementwise_affine=True, dropout=0.0)
    return dict(
        architectures=["MultiModalityCausalLM"],
        model_type="multi_modality",
        torch_dtype=dtype,
        language_config=dict(
            model_type="llama", vocab_size=llm.vocab_size, hidden_size=llm.hidden_size,
            intermediate_size=llm.intermediate_size, num_hidden_layers=llm.num_layers,
            num_attention_heads=llm.num_heads, num_key_value_heads=llm.num_kv_heads, head_dim=llm.head_dim,
            max_position_embeddings=llm.max_position_embeddings, rms_norm_eps=llm.rms_norm_eps,
            rope_theta=llm.rope_theta, tie_word_embeddings=False, torch_dtype=dtype,
        ),
        vision_und_enc_config=dict(cls="CLIPVisionTower", model_type="vision_und_enc", params=und),
        vision_gen_enc_config=dict(cls="ShallowUViTEncoder", model_type="vision_gen_enc", params=dict(
            common, input_channels=enc.input_channels, kernel_size=enc.kernel_size, stride=enc.stride,
            padding=enc.padding, block_out_channels=list(enc.block_out_channels))),
        vision_gen_dec_config=dict(cls="ShallowUViTDecoder", model_type="vision_gen_dec", params=dict(
            common, layers_in_middle=dec.layers_in_middle, norm_eps=dec.norm_eps, use_bias=dec.use_bias,
            use_mid_block=dec.use_mid_block, in_channels=dec.in_channels, out_channels=dec.out_channels,
            upsamples=dec.upsamples, block_out_channels=list(dec.block_out_channels))),
        unimm_tokens=dict(m.tokens),
        unimm_latent=dict(m.latent),
        unimm_repa=dict(m.repa),
        unimm_flow=dict(m.flow),
    )
