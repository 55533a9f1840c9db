"""Export a trained model: WORKDIR/model in the unimm layout plus the text tokenizer.json.

    export_model(model_cfg, params, tokenizer, W / "model")
    m = unimm_jax.load_pretrained(W)        # resolves W/model; tokenizer via load_text_tokenizer

The directory is written atomically by `save_pretrained` (format="unimm"); tokenizer.json is
then added beside unimm_config.json so sampling CLIs find it.
"""
from __future__ import annotations

import os

import jax
import numpy as np

from unimm_jax.api import JanusModel, save_pretrained
from unimm_jax.data.text_tokenizer import TOKENIZER_FILE, TextTokenizer

MODEL_DIR = "model"


def export_model(model_cfg, params, tokenizer: TextTokenizer | None, out_dir, *, overwrite: bool = True) -> str:
    """Writes params (float32, gathered to host) + config + tokenizer.json to out_dir; returns it.

    params: the model's params tree (sharded jax arrays are fine: they are gathered leaf by leaf).
    Only process 0 writes; other processes return at once.
    """
    out_dir = os.fspath(out_dir)
    if jax.process_index() != 0:
        return out_dir
    host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), params)
    save_pretrained(JanusModel(model_cfg, host), out_dir, format="unimm", overwrite=overwrite)
    if tokenizer is not None:
        tokenizer.save(os.path.join(out_dir, TOKENIZER_FILE))
    return out_dir
