"""Tiny random transformers Janus models for parity and conversion tests."""
from __future__ import annotations

import numpy as np


def tiny_hf_config(gqa: bool = True, rope_theta: float = 50000.0, tie: bool = False, vocab: int = 512):
    from transformers import JanusConfig, JanusVisionConfig, JanusVQVAEConfig, LlamaConfig

    text = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2 if gqa else 4, max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta}, rms_norm_eps=1e-6,
        bos_token_id=1, eos_token_id=2, pad_token_id=503, tie_word_embeddings=tie,
    )
    vision = JanusVisionConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
        projection_dim=64, depth=2, num_image_tokens=16,
    )
    vq = JanusVQVAEConfig(
        embed_dim=8, num_embeddings=64, latent_channels=32, base_channels=32, channel_multiplier=[1, 1, 2],
        num_res_blocks=1, projection_dim=64, image_token_embed_dim=64, num_hidden_layers=2,
    )
    cfg = JanusConfig(text_config=text, vision_config=vision, vq_config=vq, image_token_id=500, tie_word_embeddings=tie)
    return cfg


def make_hf_model(seed: int = 0, **kw):
    import torch
    from transformers import JanusForConditionalGeneration

    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(tiny_hf_config(**kw)).eval()
    # Random init leaves norms at 1/0 and many biases at 0; perturb everything so parity
    # tests exercise every parameter.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.generation_config.pad_token_id = 503
    model.generation_config.bos_token_id = 1
    model.generation_config.eos_token_id = 2
    model.generation_config.generation_kwargs = {"boi_token_id": 501}
    return model


def save_hf_model(model, path):
    model.save_pretrained(path, safe_serialization=True)
    return path


def prompt_with_image(rng: np.random.Generator, n_image_tokens: int = 16, image_token_id: int = 500):
    """[1, T] ids: BOS, text, BOI, image placeholders, EOI, text."""
    text = rng.integers(3, 400, size=5)
    ids = np.concatenate([[1], text[:3], [501], [image_token_id] * n_image_tokens, [502], text[3:]])
    return ids[None].astype(np.int64)
