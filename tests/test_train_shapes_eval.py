"""shapes_eval.evaluate: eval.json holds both accuracies per kind and samples.png the grid."""
import json

import ml_collections
import numpy as np
import pytest
from PIL import Image

from unimm_jax.api import JanusModel
from unimm_jax.data import shapes
from unimm_jax.data.pipeline import default_data_config
from unimm_jax.data.shapes_tfds import build_shapes_world
from unimm_jax.data.shapes_vocab import build_shapes_tokenizer, shapes_token_ids
from unimm_jax.evals import shapes_eval
from unimm_jax.models.janus_config import tiny_janus_config


@pytest.mark.slow  # compiles the text and CFG image decoders: ~1-2 min on the shared 2-core CPU
def test_evaluate_writes_eval_json_and_grid(tmp_path):
    from test_train_step import _params

    tok = build_shapes_tokenizer()
    m = tiny_janus_config(num_layers=1, vision_layers=1, vocab_size=tok.vocab_size, **shapes_token_ids(tok))
    model = JanusModel(m, _params(m))
    data = default_data_config()
    data.data_dir, data.image_size, data.num_train, data.num_test = str(tmp_path / "data"), 32, 8, 8
    build_shapes_world(data.data_dir, 32, 8, 8, 0)
    ev = ml_collections.ConfigDict(dict(num_understanding=4, num_generation=3, cfg_weight=2.0, temperature=1.0,
                                        top_k=0, max_new_tokens=3, grid_size=2, seed=0))
    res = shapes_eval.evaluate(model, tok, data, ev, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "eval.json").read_text())
    for key, n in (("understanding", 4), ("generation", 3)):
        assert saved[key]["n"] == n and 0.0 <= saved[key]["overall"] <= 1.0
        assert set(saved[key]["per_kind"]) and res[key]["overall"] == saved[key]["overall"]
    assert len(saved["generation"]["results"]) == 3 and "prompt" in saved["generation"]["results"][0]
    nll = saved["generation"]["test_code_nll"]
    assert nll["n"] == 3 and 0 < nll["overall"] < 10 and set(nll["per_kind"]) <= set(shapes.CAPTION_KINDS)
    grid = np.asarray(Image.open(tmp_path / "out" / "samples.png"))
    assert grid.shape == (2 * 32 + 2, 2 * 32 + 2, 3)
    np.testing.assert_array_equal(res["generation"]["samples_grid"], grid)  # what eval_summary logs
    assert "samples_grid" not in saved["generation"]


def test_generation_nll_is_each_unpadded_prompts_code_cross_entropy():
    """Left-padded prompts of different lengths in one batch: each image's NLL equals the mean
    cross-entropy of its VQ codes under image_logits of its prompt alone."""
    import optax

    from test_train_step import _params
    from unimm_jax.data import chat_format

    tok = build_shapes_tokenizer()
    m = tiny_janus_config(num_layers=1, vision_layers=1, vocab_size=tok.vocab_size, image_size=16,
                          **shapes_token_ids(tok))
    model = JanusModel(m, _params(m))
    images = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    captions = ["a red circle", "a blue square to the left of a green triangle"]
    got = shapes_eval.generation_nll(model, tok, images, captions)
    codes = np.asarray(model.vq_encode(images))
    for i, caption in enumerate(captions):
        ids = np.asarray([chat_format.generation_prompt_ids(tok, caption, m.tokens)], np.int32)
        logits = model.image_logits(ids, codes[i:i + 1])
        want = optax.softmax_cross_entropy_with_integer_labels(logits, codes[i:i + 1]).mean()
        np.testing.assert_allclose(got[i], float(want), rtol=1e-4)
    assert got.shape == (2,) and got.dtype == np.float32
