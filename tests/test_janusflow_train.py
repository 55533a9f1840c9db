"""JanusFlow on the shapes world: the flow batch stream, and `unimm-train`'s dispatch end to end."""
import importlib.util
import json
import os

import numpy as np
import pytest

from unimm_jax.data.shapes_vocab import build_shapes_tokenizer
from unimm_jax.models.janusflow import check_flow_batch, latents_to_images


def _tiny_config(steps=3):
    spec = importlib.util.spec_from_file_location("shapes_flow_tiny", os.path.join("configs", "shapes_flow_tiny.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    c.model = mod.shapes_flow_model(hidden_size=64, num_layers=2, intermediate_size=128, vision_hidden=32,
                                    vision_layers=1, vision_heads=2, gen_width=32, repa_layer=1, repa_hidden=32)
    c.data.batch_size = 2
    c.train.num_steps, c.train.log_every = steps, 1
    c.optim.warmup_steps = 1
    return c


def test_shapes_flow_batches_are_left_padded_prompts_and_pixel_latents():
    from unimm_jax.train.flow_trainer import shapes_flow_batch

    c = _tiny_config()
    tok = build_shapes_tokenizer()
    batch = shapes_flow_batch(c, tok, 0)
    check_flow_batch(batch, c.model)
    ids, mask = np.asarray(batch["input_ids"]), np.asarray(batch["attention_mask"])
    assert (ids[:, -1] == c.model.tokens.boi_token_id).all() and mask[:, -1].all()
    first = mask.argmax(axis=1)
    assert (ids[np.arange(len(ids)), first] == c.model.tokens.bos_token_id).all()
    # latents are the images' pixel patches: decoding gives the images back
    np.testing.assert_allclose(np.asarray(latents_to_images(batch["latents"], c.model)),
                               np.asarray(batch["pixel_values"]), atol=1e-6)
    again = shapes_flow_batch(c, tok, 0)
    np.testing.assert_array_equal(np.asarray(again["latents"]), np.asarray(batch["latents"]))  # deterministic


@pytest.mark.slow
def test_unimm_train_dispatches_janusflow_and_exports(tmp_path):
    import unimm_jax as uj
    from unimm_jax.train import loop

    c = _tiny_config(steps=3)
    metrics = loop.run(c, str(tmp_path))
    assert np.isfinite(metrics["loss"]) and metrics["skipped"] == 0.0
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [x["step"] for x in lines] == [1, 2, 3] and "repa_loss" in lines[0]
    m = uj.load_pretrained(str(tmp_path))  # W/model
    img = np.asarray(m.generate_images_flow([[c.model.tokens.bos_token_id, c.model.tokens.boi_token_id]], steps=2))
    assert img.shape == (1, 64, 64, 3) and np.abs(img).max() <= 1.0
