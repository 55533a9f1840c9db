"""Model configs for Janus / Janus-Pro as ml_collections ConfigDicts, and their validation.

`configs/*.py` call `janus_model_config(...)`; `load_pretrained` builds the same dict from a
checkpoint's config.json. `validate_janus_config` names the field and the fix on bad values.
"""
from __future__ import annotations

import ml_collections

# Published sizes (reference: Janus-Pro-1B / 7B config.json; 1B intermediate is 5632, not 5504).
PRESETS = {
    "1b": dict(hidden_size=2048, num_layers=24, num_heads=16, num_kv_heads=16, intermediate_size=5632),
    "7b": dict(hidden_size=4096, num_layers=30, num_heads=32, num_kv_heads=32, intermediate_size=11008),
}


def janus_model_config(
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
    max_position_embeddings: int = 16384,
    tie_word_embeddings: bool = False,
    vision_hidden: int = 1024,
    vision_layers: int = 24,
    vision_heads: int = 16,
    image_size: int = 384,
    patch_size: int = 16,
    vq_base_channels: int = 128,
    vq_channel_multiplier: tuple[int, ...] = (1, 1, 2, 2, 4),
    vq_latent_channels: int = 256,
    codebook_size: int = 16384,
    codebook_dim: int = 8,
    num_res_blocks: int = 2,
    image_token_id: int = 100581,
    boi_token_id: int = 100016,
    eoi_token_id: int = 100593,
    pad_token_id: int = 100015,
    bos_token_id: int = 100000,
    eos_token_id: int = 100001,
    dtype: str = "float32",
) -> ml_collections.ConfigDict:
    """The `config.model` dict of a Janus model; defaults are Janus-Pro-1B.

    `model.attention_impl` (auto | xla | pallas | splash | cudnn) is one field shared by
    reference with `model.llm.attention_impl`, so `--config.model.attention_impl=pallas` switches
    the LLM's attention kernel.
    """
    attention_impl = ml_collections.FieldReference("auto", field_type=str)
    llm = ml_collections.ConfigDict(
        dict(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads or num_heads,
            head_dim=head_dim or hidden_size // num_heads,
            rms_norm_eps=rms_norm_eps,
            rope_theta=float(rope_theta),
            max_position_embeddings=max_position_embeddings,
            tie_word_embeddings=tie_word_embeddings,
            # Multiplier on the q / k projections' init std (0.02). Init only: loaded weights ignore it.
            qk_init_scale=1.0,
            attention_bias=False,
            mlp_bias=False,
            scan_layers=True,
            remat_policy="none",
            attention_impl=attention_impl,
            dtype=dtype,
        )
    )
    vision = ml_collections.ConfigDict(
        dict(
            image_size=image_size,
            patch_size=patch_size,
            num_channels=3,
            hidden_size=vision_hidden,
            num_layers=vision_layers,
            num_heads=vision_heads,
            mlp_ratio=4.0,
            layer_norm_eps=1e-6,
            attention_bias=True,
            scan_layers=True,
            dtype=dtype,
        )
    )
    vq = ml_collections.ConfigDict(
        dict(
            image_size=image_size,
            codebook_size=codebook_size,
            codebook_dim=codebook_dim,
            base_channels=vq_base_channels,
            channel_multiplier=tuple(vq_channel_multiplier),
            num_res_blocks=num_res_blocks,
            latent_channels=vq_latent_channels,
            in_channels=3,
            out_channels=3,
            norm_groups=32,
            # "global" as LlamaGen / Janus; "local": codes independent of the rest of the image
            # (models/vq.py encoder_is_local); only the unimm format stores such a VQ.
            encoder_context="global",
            commit_beta=0.25,
            encode_l2_norm=True,
        )
    )
    tokens = ml_collections.ConfigDict(
        dict(
            image_token_id=image_token_id,
            boi_token_id=boi_token_id,
            eoi_token_id=eoi_token_id,
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
        )
    )
    return ml_collections.ConfigDict(
        dict(
            family="janus",
            attention_impl=attention_impl,
            llm=llm,
            vision=vision,
            aligner=dict(depth=2),
            vq=vq,
            gen_aligner=dict(depth=2),
            gen_head=dict(hidden_size=hidden_size),
            tokens=tokens,
        )
    )


def janus_pro_config(size: str = "1b", **overrides) -> ml_collections.ConfigDict:
    """Janus-Pro-1B or -7B with the reference's exact values."""
    if size not in PRESETS:
        raise ValueError(f"Unknown Janus-Pro size {size!r}; choose one of {sorted(PRESETS)}.")
    kwargs = dict(PRESETS[size])
    if size == "7b":
        kwargs["image_token_id"] = 100594  # the 7B tokenizer's <image_placeholder>
    kwargs.update(overrides)
    return janus_model_config(**kwargs)


def tiny_janus_config(**overrides) -> ml_collections.ConfigDict:
    """A few-layer model for tests (32x32 images, GQA, non-default rope theta)."""
    kwargs = dict(
        vocab_size=512,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
        rope_theta=50000.0,
        vision_hidden=32,
        vision_layers=2,
        vision_heads=2,
        image_size=32,
        patch_size=8,
        vq_base_channels=32,
        vq_channel_multiplier=(1, 1, 2),
        vq_latent_channels=32,
        codebook_size=64,
        codebook_dim=8,
        num_res_blocks=1,
        image_token_id=500,
        boi_token_id=501,
        eoi_token_id=502,
        pad_token_id=503,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(overrides)
    return janus_model_config(**kwargs)


def _check(cond: bool, field: str, value, fix: str):
    if not cond:
        raise ValueError(f"config field {field}={value!r} is out of range: {fix}")


def validate_janus_config(m: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first field out of range (and how to fix it)."""
    llm, vis, vq = m.llm, m.vision, m.vq
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
        _check(int(llm[name]) > 0, f"model.llm.{name}", llm[name], "must be a positive integer.")
    _check(llm.num_heads % llm.num_kv_heads == 0, "model.llm.num_kv_heads", llm.num_kv_heads,
           f"must divide num_heads={llm.num_heads} (grouped-query attention).")
    _check(llm.head_dim % 2 == 0, "model.llm.head_dim", llm.head_dim, "must be even for rotary embeddings.")
    _check(llm.rope_theta > 0, "model.llm.rope_theta", llm.rope_theta, "must be positive.")
    _check(llm.rms_norm_eps > 0, "model.llm.rms_norm_eps", llm.rms_norm_eps, "must be positive.")
    _check(llm.get("qk_init_scale", 1.0) > 0, "model.llm.qk_init_scale", llm.get("qk_init_scale"), "must be positive.")
    from unimm_jax.layers.attention import ATTENTION_IMPLS

    _check(llm.get("attention_impl", "auto") in ATTENTION_IMPLS, "model.attention_impl", llm.get("attention_impl"),
           f"must be one of {ATTENTION_IMPLS}.")
    _check(vis.hidden_size % vis.num_heads == 0, "model.vision.num_heads", vis.num_heads,
           f"must divide vision hidden_size={vis.hidden_size}.")
    _check(vis.image_size % vis.patch_size == 0, "model.vision.patch_size", vis.patch_size,
           f"must divide image_size={vis.image_size}.")
    for i, mult in enumerate(vq.channel_multiplier):
        ch = vq.base_channels * mult
        _check(ch % vq.norm_groups == 0, f"model.vq.channel_multiplier[{i}]", mult,
               f"base_channels*multiplier={ch} must be a multiple of norm_groups={vq.norm_groups}.")
    down = 2 ** (len(vq.channel_multiplier) - 1)
    _check(vq.image_size % down == 0, "model.vq.image_size", vq.image_size,
           f"must be divisible by the VQ downsampling factor {down}.")
    _check(vq.codebook_size > 0, "model.vq.codebook_size", vq.codebook_size, "must be positive.")
    from unimm_jax.models.vq import ENCODER_CONTEXTS

    _check(vq.get("encoder_context", "global") in ENCODER_CONTEXTS, "model.vq.encoder_context",
           vq.get("encoder_context"), f"must be one of {ENCODER_CONTEXTS}.")
    toks = m.tokens
    for name in ("image_token_id", "boi_token_id", "pad_token_id", "bos_token_id"):
        _check(0 <= toks[name] < llm.vocab_size, f"model.tokens.{name}", toks[name],
               f"must be a token id in [0, vocab_size={llm.vocab_size}).")
    _check(m.aligner.depth >= 1, "model.aligner.depth", m.aligner.depth, "must be >= 1.")
    _check(m.gen_aligner.depth >= 1, "model.gen_aligner.depth", m.gen_aligner.depth, "must be >= 1.")


def num_image_tokens(m: ml_collections.ConfigDict) -> int:
    """Codes per generated image: (image_size / VQ downsampling)^2."""
    g = m.vq.image_size // 2 ** (len(m.vq.channel_multiplier) - 1)
    return g * g


def num_understanding_tokens(m: ml_collections.ConfigDict) -> int:
    return (m.vision.image_size // m.vision.patch_size) ** 2
