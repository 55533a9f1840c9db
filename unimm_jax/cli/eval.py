"""unimm-eval --config configs/evals/NAME.py --checkpoint DIR --out DIR [--config.key=value ...]

Loads DIR (a checkpoint, or a training workdir holding model/), runs the evaluator the config
names (`config.evaluator`; today "shapes") and writes OUT/eval.json (+ OUT/samples.png).
"""
from __future__ import annotations

import json
import os

from absl import app, flags
from ml_collections import config_flags

from unimm_jax import host_malloc

_CONFIG = config_flags.DEFINE_config_file("config", None, "Eval config (configs/evals/NAME.py).", lock_config=True)
_CKPT = flags.DEFINE_string("checkpoint", None, "Checkpoint dir or training workdir (uses WORKDIR/model).")
_OUT = flags.DEFINE_string("out", None, "Output directory for eval.json and samples.png.")

EVALUATORS = ("shapes",)


def evaluate(config, checkpoint: str, out: str) -> dict:
    """Runs `config.evaluator` on the checkpoint; returns the eval dict written to out/eval.json."""
    name = config.get("evaluator", "shapes")
    if name not in EVALUATORS:
        raise ValueError(f"config.evaluator={name!r} is unknown; choose one of {EVALUATORS}.")
    import unimm_jax as uj
    from unimm_jax.data.shapes_tfds import build_shapes_world
    from unimm_jax.data.text_tokenizer import load_text_tokenizer
    from unimm_jax.evals import shapes_eval

    model = uj.load_pretrained(checkpoint)
    tokenizer = load_text_tokenizer(model.checkpoint_dir)
    d = config.data
    if not d.data_dir:
        d.data_dir = os.path.join(out, "data")
    if model.config.vision.image_size != d.image_size:
        raise ValueError(f"the model takes {model.config.vision.image_size}px images but config.data.image_size="
                         f"{d.image_size}; set --config.data.image_size={model.config.vision.image_size}.")
    build_shapes_world(d.data_dir, d.image_size, d.num_train, d.num_test, d.seed)
    return shapes_eval.evaluate(model, tokenizer, d, config.eval, out)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}.")
    if _CONFIG.value is None or not _CKPT.value or not _OUT.value:
        raise app.UsageError("--config, --checkpoint and --out are required.")
    res = evaluate(_CONFIG.value, _CKPT.value, os.path.abspath(_OUT.value))
    print(json.dumps({k: {kk: v[kk] for kk in ("overall", "per_kind", "n")} for k, v in res.items()
                      if k in ("understanding", "generation")}, indent=1))


def run() -> None:
    # XLA:CPU's large per-step temporaries in 2 MiB pages (unimm_jax/host_malloc.py): glibc reads
    # the tunable only at process start, so this re-executes the command once, before any work.
    host_malloc.reexec_with_hugetlb()
    app.run(main)


if __name__ == "__main__":
    run()
