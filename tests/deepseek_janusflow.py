"""A tiny DeepSeek-original JanusFlow checkpoint built by hand from the reference's key table
(janus/janusflow/models/modeling_vlm.py + uvit.py + siglip_vit.py), independent of unimm's
own mapping code: key names and torch shapes are spelled out here.

Sizes (TINY): Llama 64 wide, 3 layers, 4 heads / 2 kv heads, vocab 512; SigLIP 32 wide, 2 layers,
32x32 images with 8x8 patches (16 tokens); UViT width 32 with one ConvNeXt block each side;
4-channel 4x4 latents (32 pixels / 8) -> 2x2 = 4 latent tokens.
"""
from __future__ import annotations

import json
import os

import numpy as np

TINY = dict(vocab=512, d=64, layers=3, heads=4, kv_heads=2, inter=128, dv=32, v_layers=2, image=32, patch=8,
            width=32, mid=1, latent_ch=4, rope_theta=50000.0)
TOKENS = dict(image_token_id=500, boi_token_id=501, eoi_token_id=502, pad_token_id=503, bos_token_id=1, eos_token_id=2)


def _convnext_shapes(prefix: str, c: int, hidden: int) -> dict:
    return {
        f"{prefix}depthwise.weight": (c, 1, 7, 7), f"{prefix}depthwise.bias": (c,),
        f"{prefix}norm.weight": (c,),
        f"{prefix}channelwise_linear_1.weight": (4 * c, c), f"{prefix}channelwise_linear_1.bias": (4 * c,),
        f"{prefix}channelwise_norm.weight": (1, 1, 1, 4 * c), f"{prefix}channelwise_norm.bias": (1, 1, 1, 4 * c),
        f"{prefix}channelwise_linear_2.weight": (c, 4 * c), f"{prefix}channelwise_linear_2.bias": (c,),
        f"{prefix}cond_embeds_mapper.weight": (2 * c, hidden), f"{prefix}cond_embeds_mapper.bias": (2 * c,),
    }


def deepseek_janusflow_shapes(s: dict = TINY) -> dict[str, tuple[int, ...]]:
    """Every tensor of a DeepSeek JanusFlow state dict (incl. SigLIP's unused attn_pool) -> torch shape."""
    d, hd = s["d"], s["d"] // s["heads"]
    out = {"language_model.model.embed_tokens.weight": (s["vocab"], d), "language_model.model.norm.weight": (d,),
           "language_model.lm_head.weight": (s["vocab"], d)}
    for i in range(s["layers"]):
        p = f"language_model.model.layers.{i}."
        out.update({
            p + "self_attn.q_proj.weight": (s["heads"] * hd, d), p + "self_attn.k_proj.weight": (s["kv_heads"] * hd, d),
            p + "self_attn.v_proj.weight": (s["kv_heads"] * hd, d), p + "self_attn.o_proj.weight": (d, s["heads"] * hd),
            p + "mlp.gate_proj.weight": (s["inter"], d), p + "mlp.up_proj.weight": (s["inter"], d),
            p + "mlp.down_proj.weight": (d, s["inter"]),
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
        })
    dv, n = s["dv"], (s["image"] // s["patch"]) ** 2
    v = "vision_und_enc_model.vision_tower."
    out.update({v + "pos_embed": (1, n, dv), v + "patch_embed.proj.weight": (dv, 3, s["patch"], s["patch"]),
                v + "patch_embed.proj.bias": (dv,), v + "norm.weight": (dv,), v + "norm.bias": (dv,),
                v + "attn_pool.latent": (1, 1, dv), v + "attn_pool.q.weight": (dv, dv), v + "attn_pool.q.bias": (dv,)})
    for i in range(s["v_layers"]):
        p = f"{v}blocks.{i}."
        out.update({
            p + "norm1.weight": (dv,), p + "norm1.bias": (dv,), p + "norm2.weight": (dv,), p + "norm2.bias": (dv,),
            p + "attn.qkv.weight": (3 * dv, dv), p + "attn.qkv.bias": (3 * dv,),
            p + "attn.proj.weight": (dv, dv), p + "attn.proj.bias": (dv,),
            p + "mlp.fc1.weight": (4 * dv, dv), p + "mlp.fc1.bias": (4 * dv,),
            p + "mlp.fc2.weight": (dv, 4 * dv), p + "mlp.fc2.bias": (dv,),
        })
    w, ch = s["width"], s["latent_ch"]
    out.update({"vision_und_enc_aligner.weight": (d, dv), "vision_und_enc_aligner.bias": (d,),
                "beg_of_und_embed": (1, d),
                "vision_gen_enc_aligner.weight": (d, w), "vision_gen_enc_aligner.bias": (d,),
                "vision_gen_dec_aligner_norm.weight": (d,),
                "vision_gen_dec_aligner.weight": (w, d), "vision_gen_dec_aligner.bias": (w,)})
    e = "vision_gen_enc_model."
    out.update({e + "time_embed.linear_1.weight": (d, w), e + "time_embed.linear_1.bias": (d,),
                e + "time_embed.linear_2.weight": (d, d), e + "time_embed.linear_2.bias": (d,),
                e + "in_conv.weight": (w, ch, 2, 2), e + "in_conv.bias": (w,)})
    for i in range(s["mid"]):
        out.update(_convnext_shapes(f"{e}mid_block.res_blocks.{i}.", w, d))
    g = "vision_gen_dec_model."
    out.update({g + "input_norm.weight": (w,), g + "out_convs.0.norm.weight": (2 * w,),
                g + "out_convs.0.unpatch_conv.weight": (ch * 4, 2 * w, 1, 1), g + "out_convs.0.unpatch_conv.bias": (ch * 4,)})
    for i in range(s["mid"]):
        out.update(_convnext_shapes(f"{g}mid_block.res_blocks.{i}.", 2 * w, d))
    return out


def random_state(shapes: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Float32 tensors: norm weights around 1, matrices fan-in scaled, everything else (GRN too) non-zero."""
    rng = np.random.default_rng(seed)
    sd = {}
    for k, shape in sorted(shapes.items()):
        w = rng.standard_normal(shape).astype(np.float32)
        if (k.endswith("norm.weight") or "norm1.weight" in k or "norm2.weight" in k or "layernorm" in k) \
                and "channelwise_norm" not in k:
            w = 1.0 + 0.2 * w
        elif len(shape) >= 2 and "channelwise_norm" not in k and "pos_embed" not in k and k != "beg_of_und_embed":
            w *= 1.0 / np.sqrt(np.prod(shape[1:]))
        else:
            w *= 0.3
        sd[k] = w
    return sd


def deepseek_janusflow_config(s: dict = TINY) -> dict:
    """config.json as DeepSeek writes it for JanusFlow (+ the unimm_* fields a non-standard size needs)."""
    common = dict(hidden_size=s["d"], layers_in_middle=s["mid"], norm_eps=1e-6, use_bias=True,
                  elementwise_affine=True, use_mid_block=True, block_out_channels=[s["width"]])
    return {
        "architectures": ["MultiModalityCausalLM"], "model_type": "multi_modality", "torch_dtype": "float32",
        "language_config": {"model_type": "llama", "vocab_size": s["vocab"], "hidden_size": s["d"],
                            "intermediate_size": s["inter"], "num_hidden_layers": s["layers"],
                            "num_attention_heads": s["heads"], "num_key_value_heads": s["kv_heads"],
                            "rope_theta": s["rope_theta"], "max_position_embeddings": 512, "rms_norm_eps": 1e-6},
        "vision_und_enc_config": {"cls": "CLIPVisionTower", "model_type": "vision_und_enc", "params": {
            "model_name": "unimm_custom", "image_size": s["image"], "select_feature": "same", "select_layer": -1,
            "unimm_vision": {"vision_hidden": s["dv"], "vision_layers": s["v_layers"], "vision_heads": 2,
                             "patch_size": s["patch"], "image_size": s["image"]}}},
        "vision_gen_enc_config": {"cls": "ShallowUViTEncoder", "model_type": "vision_gen_enc", "params": dict(
            common, input_channels=s["latent_ch"], kernel_size=2, stride=2, padding=0)},
        "vision_gen_dec_config": {"cls": "ShallowUViTDecoder", "model_type": "vision_gen_dec", "params": dict(
            common, in_channels=s["width"], out_channels=s["latent_ch"], upsamples=1)},
        "unimm_tokens": TOKENS,
        "unimm_latent": {"image_size": s["image"], "downsample": 8, "channels": s["latent_ch"],
                         "scaling_factor": 0.13025, "shift_factor": 0.0},
    }


def write_deepseek_janusflow(path: str, seed: int = 0, s: dict = TINY) -> dict[str, np.ndarray]:
    """Writes model.safetensors + config.json to `path`; returns the state dict written."""
    from safetensors.numpy import save_file

    sd = random_state(deepseek_janusflow_shapes(s), seed)
    os.makedirs(path, exist_ok=True)
    save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(deepseek_janusflow_config(s), f)
    return sd
