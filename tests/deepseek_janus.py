"""A DeepSeek-original checkpoint built by hand from a transformers one, following the
reference's key table (independent of unimm's own mapping code)."""
from __future__ import annotations

import json
import os
import re

import numpy as np


def _ds_name(k: str) -> str:
    rules = [
        (r"^model\.language_model\.", "language_model.model."),
        (r"^lm_head\.", "language_model.lm_head."),
        (r"^model\.vision_model\.encoder\.layers\.(\d+)\.layer_norm(\d)", r"vision_model.vision_tower.blocks.\1.norm\2"),
        (r"^model\.vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection_layer", r"vision_model.vision_tower.blocks.\1.attn.proj"),
        (r"^model\.vision_model\.encoder\.layers\.(\d+)\.mlp", r"vision_model.vision_tower.blocks.\1.mlp"),
        (r"^model\.vision_model\.embeddings\.patch_embedding", "vision_model.vision_tower.patch_embed.proj"),
        (r"^model\.vision_model\.post_layernorm", "vision_model.vision_tower.norm"),
        (r"^model\.aligner\.fc1", "aligner.layers.0"),
        (r"^model\.aligner\.hidden_layers\.0", "aligner.layers.2"),
        (r"^model\.generation_aligner\.fc1", "gen_aligner.layers.0"),
        (r"^model\.generation_aligner\.hidden_layers\.0", "gen_aligner.layers.2"),
        (r"^model\.generation_head\.proj_out", "gen_head.output_mlp_projector"),
        (r"^model\.generation_head\.vision_head", "gen_head.vision_head"),
        (r"^model\.generation_embeddings", "gen_embed"),
        (r"^model\.vqmodel\.", "gen_vision_model."),
        (r"\.(encoder)\.down\.(\d+)\.block\.", r".\1.conv_blocks.\2.res."),
        (r"\.(encoder)\.down\.(\d+)\.attn\.", r".\1.conv_blocks.\2.attn."),
        (r"\.(encoder)\.down\.(\d+)\.downsample", r".\1.conv_blocks.\2.downsample"),
        (r"\.(decoder)\.up\.(\d+)\.block\.", r".\1.conv_blocks.\2.res."),
        (r"\.(decoder)\.up\.(\d+)\.attn\.", r".\1.conv_blocks.\2.attn."),
        (r"\.(decoder)\.up\.(\d+)\.upsample", r".\1.conv_blocks.\2.upsample"),
        (r"\.mid\.block_1\.", ".mid.0."),
        (r"\.mid\.attn_1\.", ".mid.1."),
        (r"\.mid\.block_2\.", ".mid.2."),
    ]
    for pat, rep in rules:
        k = re.sub(pat, rep, k)
    return k


def write_deepseek_from_hf(hf_model, path, tokens: dict):
    """Writes `hf_model` in the DeepSeek-original layout (safetensors) with the extras a real
    checkpoint has: SigLIP's unused attn_pool weights and the VQ codebook_used buffer."""
    from safetensors.numpy import save_file

    sd = {k: v.detach().numpy().copy() for k, v in hf_model.state_dict().items()}
    out = {}
    layers = {}
    for k, v in sd.items():
        m = re.match(r"model\.vision_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", k)
        if m:
            layers.setdefault((int(m[1]), m[3]), {})[m[2]] = v
            continue
        if k == "model.vision_model.embeddings.position_embedding.weight":
            out["vision_model.vision_tower.pos_embed"] = v[None]
            continue
        out[_ds_name(k)] = v
    for (i, leaf), parts in layers.items():
        out[f"vision_model.vision_tower.blocks.{i}.attn.qkv.{leaf}"] = np.concatenate([parts[w] for w in "qkv"])
    rng = np.random.default_rng(0)
    d = hf_model.config.vision_config.hidden_size
    out["vision_model.vision_tower.attn_pool.latent"] = rng.standard_normal((1, 1, d)).astype(np.float32)
    out["vision_model.vision_tower.attn_pool.q.weight"] = rng.standard_normal((d, d)).astype(np.float32)
    out["gen_vision_model.quantize.codebook_used"] = rng.integers(0, 5, (256,)).astype(np.float32)
    os.makedirs(path, exist_ok=True)
    save_file(out, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    c = hf_model.config
    t, v, q = c.text_config, c.vision_config, c.vq_config
    cfg = {
        "model_type": "multi_modality",
        "language_config": {"model_type": "llama", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
                            "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
                            "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
                            "rope_theta": t.rope_parameters["rope_theta"], "max_position_embeddings": 512},
        "vision_config": {"cls": "CLIPVisionTower", "params": {"model_name": "unimm_custom", "image_size": v.image_size,
                          "unimm_vision": {"vision_hidden": v.hidden_size, "vision_layers": v.num_hidden_layers,
                                           "vision_heads": v.num_attention_heads, "patch_size": v.patch_size,
                                           "image_size": v.image_size}}},
        "aligner_config": {"cls": "MlpProjector", "params": {"depth": 2}},
        "gen_vision_config": {"cls": "VQ-16", "params": {"image_token_size": q.num_embeddings, "n_embed": q.embed_dim,
                              "unimm_image_size": q.num_patches * 2 ** (len(q.channel_multiplier) - 1),
                              "unimm_vq": {"vq_base_channels": q.base_channels, "vq_channel_multiplier": list(q.channel_multiplier),
                                           "vq_latent_channels": q.latent_channels, "num_res_blocks": q.num_res_blocks}}},
        "gen_aligner_config": {"cls": "MlpProjector", "params": {"depth": 2}},
        "gen_head_config": {"cls": "vision_head", "params": {"image_token_embed": t.hidden_size}},
        "unimm_tokens": tokens,
    }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    return path
