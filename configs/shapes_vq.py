"""Train only the shapes-world VQ tokenizer: `unimm-train --config configs/shapes_vq.py --workdir W`.

Writes W/tokenizer (params + vq_config.json + metrics.jsonl), which configs/shapes_tiny.py takes
as `--config.tokenizer.checkpoint=W/tokenizer` (it trains the same VQ itself when that is unset).
"""
import ml_collections

from unimm_jax.data.pipeline import default_data_config
from unimm_jax.train.vq_trainer import vq_train_block


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location("shapes_tiny", os.path.join(os.path.dirname(__file__), "shapes_tiny.py"))
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    config = ml_collections.ConfigDict()
    config.kind = "vq"
    config.seed = 0
    config.model = tiny.shapes_model()
    config.data = default_data_config()
    config.data.num_train = 20000
    config.data.num_test = 500
    config.tokenizer = tiny.get_config().tokenizer
    return config
