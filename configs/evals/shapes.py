"""unimm-eval --config configs/evals/shapes.py --checkpoint W --out DIR

Shapes-world evaluation (unimm_jax/evals/shapes_eval.py): understanding accuracy on the test
split and GenEval-style generation accuracy on held-out prompts, per kind -> DIR/eval.json and
DIR/samples.png. The test split is rebuilt deterministically into data.data_dir ("" = DIR/data)
with the same settings the default job trains with.
"""
import os

import ml_collections

from unimm_jax.config_files import load_config
from unimm_jax.data.pipeline import default_data_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    tiny = load_config(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "shapes_tiny.py"))
    config = ml_collections.ConfigDict()
    config.evaluator = "shapes"
    config.data = default_data_config()
    # The dataset config name (and so the rebuilt test split) follows these: the default job's.
    config.data.num_train = tiny.data.num_train
    config.data.num_test = tiny.data.num_test
    # The default job's eval (every test image's question, 360 prompts, its sampling settings).
    config.eval = tiny.eval
    return config
