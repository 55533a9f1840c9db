"""Train only the shapes-world VQ tokenizer: `unimm-train --config configs/shapes_vq.py --workdir W`.

Writes W/tokenizer (params + vq_config.json + metrics.jsonl), which configs/shapes_tiny.py takes
as `--config.tokenizer.checkpoint=W/tokenizer` (it trains the same VQ itself when that is unset).
"""
import os

import ml_collections

from unimm_jax.config_files import load_config_module
from unimm_jax.data.pipeline import default_data_config
from unimm_jax.train.vq_trainer import vq_train_block


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    tiny = load_config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "shapes_tiny.py"))
    config = ml_collections.ConfigDict()
    config.kind = "vq"
    config.seed = 0
    config.model = tiny.shapes_model()
    config.data = default_data_config()
    config.data.num_train = 20000
    config.data.num_test = 500
    config.tokenizer = tiny.get_config().tokenizer
    return config
