"""unimm_jax: unified multimodal models (one transformer that understands and generates images)."""
__version__ = "0.1.0"
