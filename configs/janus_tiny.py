"""A few-layer Janus for tests and smoke runs: GQA (4 heads / 2 kv), rope theta 5e4, 32x32 images."""
import ml_collections

from unimm_jax.models.janus_config import tiny_janus_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = tiny_janus_config()
    return config
