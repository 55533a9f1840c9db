"""The default job's whole path (`loop.run` on configs/shapes_tiny.py, shrunk): the shapes world,
the VQ tokenizer stage, the SigLIP pretraining stage, the LLM's pre-stage and main stage, export
and eval, including a run stopped inside each earlier stage and resumed by re-running the same config.

The README's default job runs this path at full size (~18 min); these tests run it on 32 px
images with one-layer models in a few minutes, hence `slow`.
"""
import json
import os

import numpy as np
import pytest

from test_configs import load_module
from unimm_jax.train import loop, vision_pretrain, vq_trainer


def tiny_job_config():
    """configs/shapes_tiny.py with every size cut: 32 px, 16 VQ codes and 4 SigLIP tokens per image."""
    mod = load_module("shapes_tiny")
    c = mod.get_config()
    c.model = mod.shapes_model(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=16,
                               intermediate_size=64, vision_hidden=16, vision_layers=1, vision_heads=2,
                               image_size=32, codebook_size=16)
    c.data.image_size, c.data.num_train, c.data.num_test = 32, 48, 8
    c.data.batch_size, c.data.seq_len = 8, 128  # one row per (fake) device
    c.tokenizer.update(num_steps=4, batch_size=4, warmup_steps=1, restart_every=2, checkpoint_every=2, log_every=2)
    # One after the other: the resume test below stops inside each stage in turn.
    c.vision_pretrain.update(num_steps=4, batch_size=8, warmup_steps=1, num_images=32, checkpoint_every=2,
                             log_every=2, concurrent_with_tokenizer=False)
    c.optim.warmup_steps = 1
    c.train.update(num_steps=3, log_every=1, checkpoint_every=2, progress_bar=False, tensorboard=False)
    c.pre_stage.num_steps = 2
    c.eval.update(num_understanding=4, num_generation=6, grid_size=2)
    return c


def _stopping(fn, after):
    """`fn` (train_vq / pretrain_vision) that stops after `after` steps, as a preemption would."""
    def stopped(*args, **kwargs):
        return fn(*args, **kwargs, stop_after=after)
    return stopped


@pytest.mark.slow
def test_shapes_job_resumes_from_each_pretraining_stage_then_trains_exports_and_evaluates(tmp_path, monkeypatch):
    import unimm_jax as uj

    w = str(tmp_path / "w")
    # 1. stopped inside the tokenizer stage: nothing later has started
    with monkeypatch.context() as m:
        m.setattr(vq_trainer, "train_vq", _stopping(vq_trainer.train_vq, 1))
        out = loop.run(tiny_job_config(), w)
    assert out == {"step": 0, "stopped_early": True, "stage": "tokenizer", "last": {}}
    assert os.path.isdir(os.path.join(w, "tokenizer", "ckpt"))
    assert not os.path.exists(os.path.join(w, "tokenizer", vq_trainer.CONFIG_FILE))
    assert not os.path.exists(os.path.join(w, "vision")) and not os.path.exists(os.path.join(w, "ckpt"))

    # 2. the same command again finishes the tokenizer, then is stopped inside the vision stage
    with monkeypatch.context() as m:
        m.setattr(vision_pretrain, "pretrain_vision", _stopping(vision_pretrain.pretrain_vision, 1))
        out = loop.run(tiny_job_config(), w)
    assert out == {"step": 0, "stopped_early": True, "stage": "vision", "last": {}}
    assert os.path.isfile(os.path.join(w, "tokenizer", vq_trainer.CONFIG_FILE))
    vq_steps = [json.loads(line)["step"] for line in open(os.path.join(w, "tokenizer", "metrics.jsonl"))]
    assert max(vq_steps) == 4  # the resumed stage ran to its configured end
    assert os.path.isdir(os.path.join(w, "vision", "ckpt"))
    assert not os.path.exists(os.path.join(w, "vision", vision_pretrain.DONE_FILE))
    assert not os.path.exists(os.path.join(w, "ckpt"))

    # 3. and again: the vision stage finishes, then the LLM's pre-stage is stopped after a step
    real_train = loop.train
    with monkeypatch.context() as m:
        m.setattr(loop, "train", lambda *a, **k: real_train(*a, **k, stop_at=1))
        out = loop.run(tiny_job_config(), w)
    assert out == {"step": 0, "stopped_early": True, "stage": "pre_stage", "last": {}}
    assert os.path.isfile(os.path.join(w, "vision", vision_pretrain.DONE_FILE))
    assert os.path.isdir(os.path.join(w, loop.PRE_STAGE_DIR, "ckpt")) and not os.path.exists(os.path.join(w, "ckpt"))

    # 4. and again: the pre-stage resumes, the LLM trains from it, W/model and W/eval.json are written
    out = loop.run(tiny_job_config(), w)
    assert out["step"] == 3 and not out["stopped_early"] and "stage" not in out
    assert os.path.isfile(os.path.join(w, "vision", vision_pretrain.DONE_FILE))
    res = json.load(open(os.path.join(w, "eval.json")))
    assert res["understanding"]["n"] == 4 and res["generation"]["n"] == 6
    assert out["eval"]["generation"]["overall"] == res["generation"]["overall"]
    assert os.path.isfile(os.path.join(w, "samples.png"))
    losses = [json.loads(line) for line in open(os.path.join(w, "metrics.jsonl")) if '"loss"' in line]
    assert [r["step"] for r in losses] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in losses)
    pre = [json.loads(line) for line in open(os.path.join(w, loop.PRE_STAGE_DIR, "metrics.jsonl")) if '"loss"' in line]
    # the pre-stage (understanding only) ran to its end across the stop
    assert [r["step"] for r in pre] == [1, 2] and all("loss/generation" not in r for r in pre)

    # the exported model holds the stages' weights: its VQ is W/tokenizer's, its tower W/vision's
    model = uj.load_pretrained(w)
    _, vq_params = vq_trainer.load_vq(os.path.join(w, "tokenizer"))
    np.testing.assert_array_equal(np.asarray(model.params["vq"]["codebook"]["embedding"]),
                                  vq_params["codebook"]["embedding"])
    tower = vision_pretrain.load_vision(os.path.join(w, "vision"))
    np.testing.assert_array_equal(np.asarray(model.params["vision"]["pos_embed"]), tower["pos_embed"])
