"""unimm_jax: unified multimodal models (one transformer that understands and generates images).

    import unimm_jax as uj
    m = uj.load_pretrained(path)            # transformers, DeepSeek-original or unimm directory
    m.understanding_logits(ids, pixel_values); m.image_logits(ids, codes)
    m.vq_encode(images); m.vq_decode(codes)
    uj.save_pretrained(m, out_dir, format="hf" | "deepseek" | "unimm")
"""
__version__ = "0.1.0"

from unimm_jax.api import JanusModel, load_pretrained, save_pretrained  # noqa: E402
from unimm_jax.models.vae import load_vae  # noqa: E402

__all__ = ["JanusModel", "load_pretrained", "save_pretrained", "load_vae", "__version__"]
