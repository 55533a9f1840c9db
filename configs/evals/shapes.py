"""unimm-eval --config configs/evals/shapes.py --checkpoint W --out DIR

Shapes-world evaluation (unimm_jax/evals/shapes_eval.py): understanding accuracy on the test
split and GenEval-style generation accuracy on held-out prompts, per kind -> DIR/eval.json and
DIR/samples.png. The test split is rebuilt deterministically into data.data_dir ("" = DIR/data)
with the same settings the default job trains with.
"""
import ml_collections

from unimm_jax.data.pipeline import default_data_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.evaluator = "shapes"
    config.data = default_data_config()
    config.data.num_train = 20000  # must match the training run's dataset config name
    config.data.num_test = 500
    # The default job's eval (configs/shapes_tiny.py): every test image's question, 360 prompts.
    config.eval = dict(num_understanding=500, num_generation=360, cfg_weight=2.0, temperature=0.8,
                       top_k=0, max_new_tokens=4, grid_size=8, seed=0)
    return config
