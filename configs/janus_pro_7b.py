"""Janus-Pro-7B: 4096 hidden, 30 layers, 32 heads, 11008 intermediate, vocab 102400; SigLIP-L/16
at 384; VQ-16 with 16384 x 8 codes, 576 image tokens.

    config = get_config()        # or get_config("bf16") for bfloat16 compute
"""
import ml_collections

from unimm_jax.models.janus_config import janus_pro_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = janus_pro_config("7b", dtype="bfloat16" if arg == "bf16" else "float32")
    return config
