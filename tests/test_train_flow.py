"""JanusFlow through the shared trainer (`loop.train` with `flow_step.FLOW_HOOKS`): the Grain flow
batches, the loss going down, exact resume, 2x2x2-mesh == 1-device losses, and `unimm-train`'s
whole flow job (export loadable by load_pretrained, eval.json, samples.png)."""
import json
import os

import jax
import numpy as np
import pytest

from unimm_jax.config_files import load_config_module
from unimm_jax.data import shapes
from unimm_jax.data.chat_format import generation_prompt_ids
from unimm_jax.data.shapes_vocab import build_shapes_tokenizer
from unimm_jax.models.janusflow import latents_to_images
from unimm_jax.train import flow_trainer, loop
from unimm_jax.train.checkpoint import Checkpointer
from unimm_jax.train.flow_step import check_flow_train_batch
from unimm_jax.train.metrics import read_jsonl

S, NUM_RECORDS = 32, 48


def _config_module():
    return load_config_module(os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "shapes_flow_tiny.py"))


def tiny_flow_config(mesh=(1, 1, 1), steps=3, batch=8, **train):
    """configs/shapes_flow_tiny.py shrunk: 32 px images -> 4x4x192 pixel-patch latents -> 4 latent
    tokens; 2-layer LLM of width 64; REPA on layer 1 (against a 4x4 SigLIP grid pooled to 2x2)."""
    mod = _config_module()
    c = mod.get_config()
    c.mesh = dict(zip(("data", "fsdp", "tensor"), mesh))
    c.model = mod.shapes_flow_model(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                                    vision_hidden=32, vision_layers=1, vision_heads=2, image_size=S, gen_width=32,
                                    vae_downsample=8, latent_channels=192, repa_enabled=True, repa_layer=1,
                                    repa_hidden=32)
    c.data.image_size, c.data.batch_size, c.data.read_threads = S, batch, 1
    c.optim.warmup_steps = 1
    c.train = loop.train_block(**{**dict(num_steps=steps, log_every=1, checkpoint_every=100, progress_bar=False,
                                         tensorboard=False), **train})
    c.eval = dict(num_generation=12, steps=2, cfg_weight=2.0, seed=0, batch_size=6, grid_rows=2)
    return c


def records(n=NUM_RECORDS):
    """An in-memory shapes-world train source (what the TFDS source returns, without building it)."""
    out = []
    for i in range(n):
        ex = shapes.make_example(shapes.example_rng(0, "train", i), S)
        out.append(dict(ex, index=i))
    return out


def _iter(c):
    return flow_trainer.make_flow_data_iterator(c, source=records())


def _losses(workdir):
    return {r["step"]: r["loss"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "skipped" in r}


def test_flow_batches_are_left_padded_prompts_and_pixel_latents_and_resumable():
    c = tiny_flow_config()
    it = _iter(c)
    batch = next(it)
    check_flow_train_batch(batch, c.model)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    tok = build_shapes_tokenizer()
    assert ids.shape == (8, flow_trainer.max_prompt_length(tok, dict(c.model.tokens)))
    assert (ids[:, -1] == c.model.tokens.boi_token_id).all() and mask[:, -1].all()
    first = mask.argmax(axis=1)
    assert (ids[np.arange(len(ids)), first] == c.model.tokens.bos_token_id).all()
    assert (ids[mask == 0] == c.model.tokens.pad_token_id).all() and (mask[:, :1] == 0).any()
    # the latents are the images' pixel patches: decoding them gives the images back
    np.testing.assert_allclose(np.asarray(latents_to_images(batch["latents"], c.model)), batch["pixel_values"],
                               atol=1e-6)
    # the prompt is the caption of that very image (the record it came from)
    src = records()
    by_image = {r["image"].tobytes(): r["caption"] for r in src}
    img0 = np.round((batch["pixel_values"][0] + 1) * 127.5).astype(np.uint8)
    want = flow_trainer.left_pad([generation_prompt_ids(tok, by_image[img0.tobytes()], dict(c.model.tokens))],
                                 ids.shape[1], c.model.tokens.pad_token_id)[0]
    np.testing.assert_array_equal(ids[0], want[0])
    # deterministic, and the iterator state restores the very same next batches
    state = it.get_state()
    nxt = [next(it) for _ in range(2)]
    again = _iter(c)
    np.testing.assert_array_equal(next(again)["latents"], batch["latents"])
    again.set_state(state)
    for a, b in zip(nxt, [next(again) for _ in range(2)]):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
        np.testing.assert_array_equal(a["pixel_values"], b["pixel_values"])


def test_flow_batch_errors_are_named():
    c = tiny_flow_config()
    batch = next(_iter(c))
    with pytest.raises(ValueError, match="split 3 ways"):
        check_flow_train_batch(batch, c.model, batch_divisor=3)
    bad = dict(batch, input_ids=batch["input_ids"].copy())
    bad["input_ids"][:, -1] = c.model.tokens.bos_token_id
    with pytest.raises(ValueError, match="must end with <begin_of_image>"):
        check_flow_train_batch(bad, c.model)
    bad = dict(batch, pixel_values=batch["pixel_values"] * 3)
    with pytest.raises(ValueError, match="corrupt image"):
        check_flow_train_batch(bad, c.model)
    c.model.latent.kind = "vae"
    with pytest.raises(ValueError, match="space_to_depth"):
        flow_trainer.make_flow_dataset(c, source=records())


def test_flow_config_trains_through_the_trainer_and_loss_decreases(tmp_path):
    c = tiny_flow_config(steps=12)
    c.optim.learning_rate = 3e-3
    out = loop.train(c, tmp_path, data_iter=_iter(c), devices=jax.devices()[:1])
    assert out["step"] == 12 and out["trainer"].hooks["module"].__name__ == "JanusFlow"
    lines = read_jsonl(tmp_path / "metrics.jsonl")
    assert {"rf_loss", "repa_loss", "grad_norm", "lr"} <= set(lines[0])
    losses = _losses(tmp_path)
    assert sorted(losses) == list(range(1, 13)) and all(np.isfinite(list(losses.values())))
    assert np.mean([losses[s] for s in (10, 11, 12)]) < 0.7 * np.mean([losses[s] for s in (1, 2, 3)]), losses
    assert Checkpointer(tmp_path / "ckpt").all_steps() == [12]


@pytest.mark.slow
def test_flow_resume_is_exact(tmp_path):
    dev = jax.devices()[:1]
    c = tiny_flow_config(steps=6, checkpoint_every=3)
    loop.train(c, tmp_path / "straight", data_iter=_iter(c), devices=dev)
    loop.train(c, tmp_path / "split", data_iter=_iter(c), devices=dev, stop_at=3)
    assert Checkpointer(tmp_path / "split" / "ckpt").all_steps() == [3]
    out = loop.train(c, tmp_path / "split", data_iter=_iter(c), devices=dev)  # resumes params, rng, data
    assert out["step"] == 6
    a, b = _losses(tmp_path / "straight"), _losses(tmp_path / "split")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([b[s] for s in range(1, 7)], [a[s] for s in range(1, 7)], rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_flow_sharded_losses_equal_one_device(tmp_path):
    losses = {}
    for mesh, devices in (((1, 1, 1), jax.devices()[:1]), ((2, 2, 2), None)):
        c = tiny_flow_config(mesh=mesh, steps=3)
        t = loop.Trainer(c, tmp_path / str(mesh), devices=devices)
        it = _iter(c)
        losses[mesh] = [float(t.step(next(it))["loss"]) for _ in range(3)]
        if mesh == (2, 2, 2):  # params really are split over the devices
            emb = t.state.params["llm"]["embed"]["embedding"]
            assert emb.addressable_shards[0].data.size < emb.size
    np.testing.assert_allclose(losses[(2, 2, 2)], losses[(1, 1, 1)], rtol=1e-4)


@pytest.mark.slow
def test_unimm_train_flow_job_exports_and_evaluates(tmp_path):
    """loop.run on a tiny shapes world: TFDS data -> train -> W/model -> W/eval.json + samples.png."""
    import unimm_jax as uj

    c = tiny_flow_config(mesh=(-1, 1, 1), steps=3)  # data parallel over all (8 fake) devices
    c.data.num_train, c.data.num_test = 32, 8
    out = loop.run(c, str(tmp_path))
    assert out["step"] == 3 and not out["stopped_early"]
    res = json.load(open(tmp_path / "eval.json"))
    gen = res["generation"]
    assert gen["n"] == 12 and set(gen["per_kind"]) == set(shapes.CAPTION_KINDS) and 0.0 <= gen["overall"] <= 1.0
    assert [r["prompt"] for r in gen["results"]] == shapes.generation_prompts("test", 12, 0)  # the Janus eval's
    assert out["eval"]["generation"]["overall"] == gen["overall"]
    assert (tmp_path / "samples.png").exists()
    m = uj.load_pretrained(str(tmp_path))  # W/model
    t = c.model.tokens
    img = np.asarray(m.generate_images_flow([[t.bos_token_id, t.boi_token_id]], steps=2))
    assert img.shape == (1, S, S, 3) and np.abs(img).max() <= 1.0
    # re-running the finished command resumes at the last step and does not train again
    again = loop.run(c, str(tmp_path))
    assert again["step"] == 3 and len(_losses(tmp_path)) == 3
