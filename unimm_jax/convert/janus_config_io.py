"""Janus config <-> transformers config.json / generation_config.json / DeepSeek config.json.

Special token ids are read as transformers reads them: image_token_id from config.json, the
begin-of-image id from generation_config.json's generation_kwargs, pad/bos/eos from
generation_config.json then the text config; DeepSeek directories carry them in their tokenizer.
"""
from __future__ import annotations

import json
import os

import ml_collections

from unimm_jax.convert.safetensors_io import CheckpointError
from unimm_jax.models.janus_config import janus_model_config, validate_janus_config
from unimm_jax.models.vq import encoder_is_local

# DeepSeek names fixed architectures; anything else we export carries explicit sizes.
SIGLIP_PRESETS = {"siglip_large_patch16_384": dict(vision_hidden=1024, vision_layers=24, vision_heads=16, patch_size=16, image_size=384)}
VQ16 = dict(vq_base_channels=128, vq_channel_multiplier=(1, 1, 2, 2, 4), vq_latent_channels=256, num_res_blocks=2)
TOKEN_STRINGS = {
    "image_token_id": "<image_placeholder>",
    "boi_token_id": "<begin_of_image>",
    "eoi_token_id": "<end_of_image>",
    "pad_token_id": "<｜▁pad▁｜>",
    "bos_token_id": "<｜begin▁of▁sentence｜>",
    "eos_token_id": "<｜end▁of▁sentence｜>",
}


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing.") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}).") from e


def tokenizer_token_ids(directory: str) -> dict[str, int]:
    """Special token ids found in the directory's tokenizer.json (empty if there is none)."""
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.exists(path):
        return {}
    tok = read_json(path)
    vocab = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    model_vocab = tok.get("model", {}).get("vocab", {})
    if isinstance(model_vocab, dict):
        vocab = {**model_vocab, **vocab}
    return {field: vocab[s] for field, s in TOKEN_STRINGS.items() if s in vocab}


def _rope_theta(text: dict) -> float:
    params = text.get("rope_parameters") or {}
    scaling = text.get("rope_scaling")
    rope_type = params.get("rope_type", (scaling or {}).get("rope_type", "default"))
    if rope_type not in ("default", None) or (scaling and scaling.get("type", "default") != "default"):
        raise CheckpointError(f"text_config rope type {rope_type!r} is not supported (only default RoPE); "
                              "remove rope_scaling or convert a model without it.")
    return float(params.get("rope_theta", text.get("rope_theta", 10000.0)))


def _llm_kwargs(text: dict, default_vocab: int) -> dict:
    """janus_model_config's LLM arguments from a Llama text config.

    transformers' text_config and DeepSeek's language_config are both LlamaConfig dicts: the same
    field names and defaults, except the vocabulary size each format assumes when it is absent.
    """
    if text.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"text config hidden_act={text.get('hidden_act')!r} is not supported (Llama uses 'silu').")
    heads = text.get("num_attention_heads", 32)
    hidden = text.get("hidden_size", 4096)
    return dict(
        vocab_size=text.get("vocab_size", default_vocab),
        hidden_size=hidden,
        num_layers=text.get("num_hidden_layers", 32),
        num_heads=heads,
        num_kv_heads=text.get("num_key_value_heads") or heads,
        head_dim=text.get("head_dim") or hidden // heads,
        intermediate_size=text.get("intermediate_size", 11008),
        rope_theta=_rope_theta(text),
        rms_norm_eps=text.get("rms_norm_eps", 1e-6),
        max_position_embeddings=text.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(text.get("tie_word_embeddings", False)),
    )


def _set_llm_biases(cfg: ml_collections.ConfigDict, text: dict) -> None:
    cfg.llm.attention_bias = bool(text.get("attention_bias", False))
    cfg.llm.mlp_bias = bool(text.get("mlp_bias", False))


def config_from_hf(config: dict, generation: dict | None, tokenizer_ids: dict | None = None) -> ml_collections.ConfigDict:
    """The unimm model config of a transformers Janus checkpoint."""
    if config.get("model_type") != "janus":
        raise CheckpointError(f"config.json has model_type={config.get('model_type')!r}, expected 'janus'.")
    text, vis, vq = config.get("text_config") or {}, config.get("vision_config") or {}, config.get("vq_config") or {}
    if vis.get("use_qk_norm"):
        raise CheckpointError("vision_config.use_qk_norm=True is not supported (no released Janus uses it).")
    if vq.get("double_latent"):
        raise CheckpointError("vq_config.double_latent=True is not supported (Janus's VQ-16 has a single latent).")
    llm = _llm_kwargs(text, default_vocab=32000)
    llm["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", llm["tie_word_embeddings"]))
    hidden = llm["hidden_size"]
    gen = generation or {}
    tok = dict(tokenizer_ids or {})
    ids = dict(
        image_token_id=config.get("image_token_id", tok.get("image_token_id", 100581)),
        boi_token_id=(gen.get("generation_kwargs") or {}).get("boi_token_id", tok.get("boi_token_id", 100016)),
        eoi_token_id=tok.get("eoi_token_id", 100593),
        pad_token_id=_first(gen.get("pad_token_id"), tok.get("pad_token_id"), text.get("pad_token_id"), 100015),
        bos_token_id=_first(gen.get("bos_token_id"), text.get("bos_token_id"), tok.get("bos_token_id"), 100000),
        eos_token_id=_first(_scalar(gen.get("eos_token_id")), _scalar(text.get("eos_token_id")), tok.get("eos_token_id"), 100001),
    )
    if vq.get("projection_dim", hidden) != hidden or vis.get("projection_dim", hidden) != hidden:
        raise CheckpointError("vision/vq projection_dim must equal text hidden_size "
                              f"({vis.get('projection_dim')}, {vq.get('projection_dim')} vs {hidden}).")
    image_size = vis.get("image_size", 384)
    cfg = janus_model_config(
        **llm,
        vision_hidden=vis.get("hidden_size", 1024),
        vision_layers=vis.get("num_hidden_layers", 24),
        vision_heads=vis.get("num_attention_heads", 16),
        image_size=image_size,
        patch_size=vis.get("patch_size", 16),
        vq_base_channels=vq.get("base_channels", 128),
        vq_channel_multiplier=tuple(vq.get("channel_multiplier", (1, 1, 2, 2, 4))),
        vq_latent_channels=vq.get("latent_channels", 256),
        codebook_size=vq.get("num_embeddings", 16384),
        codebook_dim=vq.get("embed_dim", 8),
        num_res_blocks=vq.get("num_res_blocks", 2),
        **ids,
    )
    _set_llm_biases(cfg, text)
    cfg.vision.mlp_ratio = float(vis.get("mlp_ratio", 4.0))
    cfg.vision.layer_norm_eps = float(vis.get("layer_norm_eps", 1e-6))
    cfg.vision.attention_bias = bool(vis.get("attention_bias", True))
    cfg.aligner.depth = int(vis.get("depth", 2))
    cfg.gen_aligner.depth = int(vq.get("num_hidden_layers", 2))
    # transformers ties the VQ token grid to the vision grid (vq_config.num_patches).
    cfg.vq.image_size = vq.get("num_patches", image_size // cfg.vision.patch_size) * 2 ** (len(cfg.vq.channel_multiplier) - 1)
    validate_janus_config(cfg)
    return cfg


def _first(*values):
    return next(v for v in values if v is not None)


def _scalar(v):
    return v[0] if isinstance(v, list) and v else v


def _check_reference_vq(vq: ml_collections.ConfigDict, fmt: str) -> None:
    """VQs the reference code cannot build: a local encoder, or no res blocks (its encoder then
    expects base_channels * channel_multiplier[-2] channels at the mid block, which no layer makes)."""
    if encoder_is_local(vq):
        raise CheckpointError(f"model.vq.encoder_context={vq.encoder_context!r}: the {fmt} VQ has no such encoder "
                              f"(its encoder attends over the whole image); save this model with format='unimm'.")
    if vq.num_res_blocks < 1:
        raise CheckpointError(f"model.vq.num_res_blocks={vq.num_res_blocks}: the {fmt} VQ needs at least one res "
                              f"block per level to build its encoder; save this model with format='unimm'.")


def hf_config_from(m: ml_collections.ConfigDict, dtype: str) -> tuple[dict, dict]:
    """(config.json, generation_config.json) dicts for a transformers Janus checkpoint."""
    llm, vis, vq, toks = m.llm, m.vision, m.vq, m.tokens
    _check_reference_vq(vq, "transformers")
    if m.gen_head.hidden_size != llm.hidden_size:
        raise CheckpointError("transformers' Janus ties gen_head hidden size to the LLM width: "
                              f"gen_head.hidden_size={m.gen_head.hidden_size} != {llm.hidden_size}.")
    grid = vq.image_size // 2 ** (len(vq.channel_multiplier) - 1)
    if grid != vis.image_size // vis.patch_size:
        raise CheckpointError(f"transformers' Janus needs the VQ token grid ({grid}) to equal the vision patch grid "
                              f"({vis.image_size // vis.patch_size}); this model cannot be exported as 'hf'.")
    text = dict(
        model_type="llama",
        vocab_size=llm.vocab_size,
        hidden_size=llm.hidden_size,
        intermediate_size=llm.intermediate_size,
        num_hidden_layers=llm.num_layers,
        num_attention_heads=llm.num_heads,
        num_key_value_heads=llm.num_kv_heads,
        head_dim=llm.head_dim,
        hidden_act="silu",
        max_position_embeddings=llm.max_position_embeddings,
        rms_norm_eps=llm.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": llm.rope_theta},
        rope_theta=llm.rope_theta,
        attention_bias=llm.attention_bias,
        mlp_bias=llm.mlp_bias,
        tie_word_embeddings=llm.tie_word_embeddings,
        bos_token_id=toks.bos_token_id,
        eos_token_id=toks.eos_token_id,
        pad_token_id=toks.pad_token_id,
        dtype=dtype,
    )
    vision = dict(
        model_type="janus_vision_model",
        hidden_size=vis.hidden_size,
        num_hidden_layers=vis.num_layers,
        num_attention_heads=vis.num_heads,
        num_channels=vis.num_channels,
        image_size=vis.image_size,
        patch_size=vis.patch_size,
        hidden_act="gelu",
        layer_norm_eps=vis.layer_norm_eps,
        mlp_ratio=vis.mlp_ratio,
        attention_bias=vis.attention_bias,
        projection_dim=llm.hidden_size,
        depth=m.aligner.depth,
        num_image_tokens=(vis.image_size // vis.patch_size) ** 2,
        use_qk_norm=False,
    )
    vqc = dict(
        model_type="janus_vqgan",
        embed_dim=vq.codebook_dim,
        num_embeddings=vq.codebook_size,
        double_latent=False,
        latent_channels=vq.latent_channels,
        in_channels=vq.in_channels,
        base_channels=vq.base_channels,
        channel_multiplier=list(vq.channel_multiplier),
        num_res_blocks=vq.num_res_blocks,
        dropout=0.0,
        out_channels=vq.out_channels,
        projection_dim=llm.hidden_size,
        num_hidden_layers=m.gen_aligner.depth,
        hidden_act="gelu",
        image_token_embed_dim=llm.hidden_size,
        num_patches=grid,
    )
    config = dict(
        architectures=["JanusForConditionalGeneration"],
        model_type="janus",
        text_config=text,
        vision_config=vision,
        vq_config=vqc,
        image_token_id=toks.image_token_id,
        tie_word_embeddings=llm.tie_word_embeddings,
        dtype=dtype,
    )
    generation = dict(
        bos_token_id=toks.bos_token_id,
        eos_token_id=toks.eos_token_id,
        pad_token_id=toks.pad_token_id,
        generation_kwargs={"boi_token_id": toks.boi_token_id},
        guidance_scale=5.0,
        num_image_tokens=grid * grid,
    )
    return config, generation


def config_from_deepseek(config: dict, tokenizer_ids: dict | None = None) -> ml_collections.ConfigDict:
    """The unimm model config of a DeepSeek-original Janus checkpoint (model_type multi_modality)."""
    lang = config.get("language_config") or {}
    vparams = (config.get("vision_config") or {}).get("params") or {}
    gparams = (config.get("gen_vision_config") or {}).get("params") or {}
    custom_vq = gparams.get("unimm_vq")
    vision = vparams.get("unimm_vision")
    if vision is None:
        name = vparams.get("model_name", "siglip_large_patch16_384")
        if name not in SIGLIP_PRESETS:
            raise CheckpointError(f"vision model {name!r} is not known; supported: {sorted(SIGLIP_PRESETS)}.")
        vision = dict(SIGLIP_PRESETS[name], image_size=vparams.get("image_size", 384))
    vq = dict(VQ16) if custom_vq is None else dict(custom_vq, vq_channel_multiplier=tuple(custom_vq["vq_channel_multiplier"]))
    tok = dict(tokenizer_ids or {})
    tok.update(config.get("unimm_tokens") or {})
    llm = _llm_kwargs(lang, default_vocab=102400)
    hidden = llm["hidden_size"]
    cfg = janus_model_config(
        **llm,
        codebook_size=gparams.get("image_token_size", 16384),
        codebook_dim=gparams.get("n_embed", 8),
        **vision,
        **vq,
        **{k: tok[k] for k in TOKEN_STRINGS if k in tok},
    )
    _set_llm_biases(cfg, lang)
    cfg.aligner.depth = int(((config.get("aligner_config") or {}).get("params") or {}).get("depth", 2))
    cfg.gen_aligner.depth = int(((config.get("gen_aligner_config") or {}).get("params") or {}).get("depth", 2))
    cfg.gen_head.hidden_size = int(((config.get("gen_head_config") or {}).get("params") or {}).get("image_token_embed", hidden))
    cfg.vq.image_size = int(gparams.get("unimm_image_size", cfg.vision.image_size))
    validate_janus_config(cfg)
    return cfg


def deepseek_config_from(m: ml_collections.ConfigDict, dtype: str) -> dict:
    """config.json for a DeepSeek-original checkpoint; non-standard sizes are carried in
    `unimm_*` fields (the original code accepts and ignores extra keys)."""
    llm, vis, vq = m.llm, m.vision, m.vq
    _check_reference_vq(vq, "DeepSeek")
    vparams = dict(image_size=vis.image_size, select_feature="same", select_layer=-1)
    own = dict(vision_hidden=vis.hidden_size, vision_layers=vis.num_layers, vision_heads=vis.num_heads,
               patch_size=vis.patch_size, image_size=vis.image_size)
    preset = next((n for n, p in SIGLIP_PRESETS.items() if p == own), None)
    vparams["model_name"] = preset or "unimm_custom"
    if preset is None:
        vparams["unimm_vision"] = own
    gparams = dict(image_token_size=vq.codebook_size, n_embed=vq.codebook_dim, unimm_image_size=vq.image_size)
    own_vq = dict(vq_base_channels=vq.base_channels, vq_channel_multiplier=list(vq.channel_multiplier),
                  vq_latent_channels=vq.latent_channels, num_res_blocks=vq.num_res_blocks)
    if own_vq != dict(VQ16, vq_channel_multiplier=list(VQ16["vq_channel_multiplier"])):
        gparams["unimm_vq"] = own_vq
    d = llm.hidden_size
    return dict(
        architectures=["MultiModalityCausalLM"],
        model_type="multi_modality",
        torch_dtype=dtype,
        language_config=dict(
            model_type="llama",
            vocab_size=llm.vocab_size,
            hidden_size=d,
            intermediate_size=llm.intermediate_size,
            num_hidden_layers=llm.num_layers,
            num_attention_heads=llm.num_heads,
            num_key_value_heads=llm.num_kv_heads,
            head_dim=llm.head_dim,
            max_position_embeddings=llm.max_position_embeddings,
            rms_norm_eps=llm.rms_norm_eps,
            rope_theta=llm.rope_theta,
            tie_word_embeddings=llm.tie_word_embeddings,
            attention_bias=llm.attention_bias,
            mlp_bias=llm.mlp_bias,
            torch_dtype=dtype,
        ),
        vision_config=dict(cls="CLIPVisionTower", model_type="vision", params=vparams),
        aligner_config=dict(cls="MlpProjector", model_type="aligner",
                            params=dict(depth=m.aligner.depth, input_dim=vis.hidden_size, n_embed=d, projector_type="mlp_gelu")),
        gen_vision_config=dict(cls="VQ-16", model_type="gen_vision", params=gparams),
        gen_aligner_config=dict(cls="MlpProjector", model_type="gen_aligner",
                                params=dict(depth=m.gen_aligner.depth, input_dim=vq.codebook_dim, n_embed=d, projector_type="mlp_gelu")),
        gen_head_config=dict(cls="vision_head", model_type="gen_head",
                             params=dict(image_token_embed=m.gen_head.hidden_size, image_token_size=vq.codebook_size, n_embed=d)),
        unimm_tokens=dict(m.tokens),
    )
