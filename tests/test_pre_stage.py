"""config.pre_stage: an LLM stage trained before the main one, which starts from its params."""
import os

import jax
import numpy as np
import pytest

from test_train_step import tiny_train_config
from unimm_jax.train import loop
from unimm_jax.train.checkpoint import Checkpointer
from unimm_jax.train.metrics import read_jsonl


def _config(pre_steps=2):
    c = tiny_train_config(mesh=(-1, 1, 1), steps=2)
    # Janus-Pro stage 1 (adaptors and heads) first: the LLM must come out of it unchanged.
    c.pre_stage = loop.pre_stage_block(num_steps=pre_steps, stage=1, mixture=(1, 0, 0))
    return c


def _steps(workdir):
    return [r["step"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "loss" in r]


def test_pre_stage_config_sets_stage_mixture_and_steps():
    c = _config(pre_steps=5)
    c.lock()  # as unimm-train's config flags hand it over
    sub = loop.pre_stage_config(c)
    assert "pre_stage" not in sub and sub.train.num_steps == 5 and sub.train.eval_every == 0
    assert sub.stage.name == 1 and list(sub.stage.trainable) == list(loop.JANUS_PRO_STAGES[1]["trainable"])
    assert dict(sub.stage.mixture) == {"understanding": 1, "text": 0, "generation": 0}
    assert sub.data.batch_size == c.data.batch_size  # no data overrides: the main stage's data
    with c.unlocked():
        c.pre_stage.data = dict(batch_size=4, max_images_per_row=2)
    sub = loop.pre_stage_config(c)
    assert sub.data.batch_size == 4 and sub.data.max_images_per_row == 2
    assert c.data.batch_size == 8 and c.data.max_images_per_row == 1  # the main stage's data is untouched
    assert loop.pre_stage_config(tiny_train_config()) is None  # no block: no pre-stage
    assert loop.pre_stage_config(_config(pre_steps=0)) is None


@pytest.mark.parametrize("field, value, message", [
    ("stage", 4, r"config\.pre_stage\.stage must be one of \[1, 2, 3\], got 4"),
    ("num_steps", -1, r"config\.pre_stage\.num_steps=-1 must be >= 0"),
    ("num_steps", 1, r"config\.pre_stage\.num_steps=1 must be larger than optim\.warmup_steps=1"),
    ("mixture", {"captioning": 1}, r"config\.pre_stage\.mixture has unknown task\(s\) \['captioning'\]"),
    ("data", {"batch": 4}, r"config\.pre_stage\.data has unknown field\(s\) \['batch'\]: it sets fields of "
                           r"config\.data"),
    ("data", {"mixture": {"text": 1}}, r"config\.pre_stage\.data\.mixture: set the pre-stage's mixture as "
                                       r"config\.pre_stage\.mixture"),
])
def test_pre_stage_errors_name_the_field(field, value, message):
    c = _config()
    c.pre_stage[field] = value
    with pytest.raises(ValueError, match=message):
        loop.pre_stage_config(c)


def test_main_stage_starts_from_pre_stage_params_and_pre_stage_resumes(tmp_path, monkeypatch):
    c = _config(pre_steps=2)
    real_train = loop.train
    # Preempted after the pre-stage's first step: "stopped", with a checkpoint at step 1.
    monkeypatch.setattr(loop, "train", lambda *a, **k: real_train(*a, **k, stop_at=1))
    assert loop._pre_stage(c, tmp_path, None) == "stopped"
    pre_dir = tmp_path / loop.PRE_STAGE_DIR
    assert Checkpointer(pre_dir / "ckpt").all_steps() == [1]
    monkeypatch.setattr(loop, "train", real_train)
    init = loop._pre_stage(c, tmp_path, None)  # resumes at step 1 and finishes step 2
    assert _steps(pre_dir) == [1, 2]
    assert Checkpointer(pre_dir / "ckpt").all_steps()[-1] == 2

    fresh = loop.Trainer(c, tmp_path / "fresh").state.params
    started = init(fresh)
    again = loop._pre_stage(c, tmp_path, None)(fresh)  # finished: restored, not trained again
    assert _steps(pre_dir) == [1, 2]
    flat = lambda t: {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(t)[0]}
    fresh, started, again = flat(fresh), flat(started), flat(again)
    changed = {k for k in fresh if not np.array_equal(fresh[k], started[k])}
    # stage 1 trained only the adaptors and heads; the LLM and the encoders are the init's
    assert changed and all(k.split("'")[1] in loop.JANUS_PRO_STAGES[1]["trainable"] for k in changed), changed
    assert any("gen_head" in k for k in changed) and any("aligner" in k for k in changed)
    for k in fresh:
        np.testing.assert_array_equal(again[k], started[k])


def test_run_trains_pre_stage_then_main_stage(tmp_path):
    c = _config(pre_steps=2)
    c.lock()
    out = loop.run(c, tmp_path)
    assert out["step"] == 2 and not out["stopped_early"]
    assert _steps(tmp_path / loop.PRE_STAGE_DIR) == [1, 2] and _steps(tmp_path) == [1, 2]
