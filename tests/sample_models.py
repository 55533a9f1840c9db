"""Shared fixtures for sampling tests: a tiny transformers Janus with more varied outputs."""
from __future__ import annotations

import numpy as np


def make_varied_hf_model(seed: int = 3, scale: float = 0.15):
    """make_hf_model plus a larger perturbation of the output heads and embeddings, so greedy
    decoding of a random model does not collapse onto one repeated token (a weak parity test)."""
    import torch

    from hf_janus import make_hf_model

    hf = make_hf_model(seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if any(k in name for k in ("generation_head", "lm_head", "generation_embeddings", "embed_tokens")):
                p.add_(torch.randn(p.shape, generator=gen) * scale)
    return hf


def gen_prompt(rng: np.random.Generator, length: int, boi: int = 501) -> np.ndarray:
    """BOS + random text + BOI, int64 [length]."""
    return np.concatenate([[1], rng.integers(3, 400, length - 2), [boi]]).astype(np.int64)
