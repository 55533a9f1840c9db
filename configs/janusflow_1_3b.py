"""JanusFlow-1.3B: DeepSeek-LLM 1.3B (2048 hidden, 24 layers, 16 heads, 5632 intermediate, vocab
102400), SigLIP-L/16 at 384 for understanding, 768-wide ShallowUViT encoder/decoder (2x2 patchify,
two ConvNeXt blocks each) around the LLM, generating 48x48x4 SDXL-VAE latents (576 latent tokens).

    config = get_config()        # or get_config("bf16") for bfloat16 compute

DeepSeek's checkpoints do not include the VAE: sample with
`uj.load_pretrained(ckpt, vae="path/to/sdxl-vae")`. The REPA head (layer 6 -> SigLIP width) and
the flow training knobs in config.model.flow are training-only; they follow the paper.
"""
import ml_collections

from unimm_jax.models.janusflow_config import janusflow_1_3b_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = janusflow_1_3b_config(dtype="bfloat16" if arg == "bf16" else "float32")
    return config
