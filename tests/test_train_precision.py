"""The full training loop with mixed precision, remat and gradient accumulation.

- bf16 compute + remat + accumulation 2: `loop.train` runs a tiny Janus whose towers compute in
  bfloat16 with rematerialised LLM layers; params and Adam moments stay float32 (master
  weights), the step really computes in bf16, rematerialises and scans over micro-batches, and
  the loss is finite and falls on a repeated batch.
- Accumulation is exact (float32): one update of a batch in 2 micro-batches equals one update of
  the same batch in one piece, with task-weighted losses whose micro-batches hold different
  numbers of loss tokens per task (the micro-batches normalise by the whole batch's counts).

Each run compiles the model (~1.5-2.5 min on the shared 2-core CPU): `slow`.
"""
import grain
import jax
import numpy as np
import pytest

from test_train_step import tiny_train_config
from unimm_jax.train import loop
from unimm_jax.train.metrics import read_jsonl


def _iterator(batches):
    """A checkpointable Grain iterator yielding `batches` (dicts of numpy arrays) in order."""
    return iter(grain.MapDataset.source(list(batches)).to_iter_dataset())


def _losses(workdir):
    return [(r["step"], r["loss"]) for r in read_jsonl(workdir / "metrics.jsonl") if "skipped" in r]


@pytest.mark.slow
def test_bf16_remat_and_accumulation_train_in_the_full_loop(tmp_path):
    c = tiny_train_config(steps=5, batch=8)
    c.model.llm.dtype = c.model.vision.dtype = "bfloat16"
    c.model.llm.remat_policy = "full"
    c.optim.grad_accum_steps = 2
    c.optim.learning_rate = 3e-3
    batch = loop.synthetic_batch(c.model, c.data, 0, 0)
    out = loop.train(c, tmp_path, data_iter=_iterator([batch] * 5), devices=jax.devices()[:1])
    trainer = out["trainer"]
    assert out["step"] == 5  # 5 updates, each of 2 micro-batches of 4 rows

    # Master weights and Adam moments stay float32.
    assert {x.dtype for x in jax.tree.leaves(trainer.state.params)} == {np.dtype("float32")}
    moments = [x for x in jax.tree.leaves(trainer.state.opt_state) if np.issubdtype(x.dtype, np.floating)]
    assert moments and {x.dtype for x in moments} == {np.dtype("float32")}
    # ... while the step computes in bf16, rematerialises the LLM layers and scans micro-batches.
    with trainer._ctx():
        jaxpr = str(jax.make_jaxpr(trainer.step_fn)(
            trainer.state, loop.global_batch(batch, trainer.batch_sharding)))
    assert "bf16" in jaxpr and "remat" in jaxpr and "scan" in jaxpr

    losses = _losses(tmp_path)
    assert [s for s, _ in losses] == list(range(1, 6))
    loss = np.array([x for _, x in losses])
    assert np.isfinite(loss).all()
    # (warmup_steps=1: the first update has learning rate 0 and leaves the params as they are)
    np.testing.assert_allclose(loss[1], loss[0], rtol=1e-6)
    assert (np.diff(loss[1:]) < 0).all(), loss
    assert loss[-1] < loss[0] - 0.1, loss


@pytest.mark.slow
def test_accumulated_updates_equal_whole_batch_updates(tmp_path):
    updates, b = 3, 8  # warmup_steps=1: the first update has learning rate 0
    weights = dict(understanding=2.0, text=0.25, generation=1.0)
    acc = tiny_train_config(steps=updates, batch=b, task_weights=weights)
    acc.optim.grad_accum_steps = 2
    whole = tiny_train_config(steps=updates, batch=b, task_weights=weights)
    batches = [loop.synthetic_batch(acc.model, acc.data, 0, u) for u in range(updates)]
    counts = [[int(np.sum(x["loss_mask"][j::2] * (x["task_ids"][j::2] == t))) for t in range(3)]
              for x in batches for j in range(2)]
    assert counts[0] != counts[1], counts  # the two micro-batches hold different token counts
    dev = jax.devices()[:1]
    init = []  # the initial params, fetched to host through the init hook (no extra compile)
    out_acc = loop.train(acc, tmp_path / "acc", data_iter=_iterator(batches), devices=dev,
                         init_params_fn=lambda p: init.append(jax.device_get(p)) or p)
    out_whole = loop.train(whole, tmp_path / "whole", data_iter=_iterator(batches), devices=dev)
    assert out_acc["step"] == out_whole["step"] == updates

    la = np.array([x for _, x in _losses(tmp_path / "acc")])
    lw = np.array([x for _, x in _losses(tmp_path / "whole")])
    np.testing.assert_allclose(la, lw, rtol=1e-5)

    pa, pw = out_acc["trainer"].state.params, out_whole["trainer"].state.params
    moved = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                for x, y in zip(jax.tree.leaves(pw), jax.tree.leaves(init[0])))
    assert moved > 5e-4  # the updates did something (lr 1e-3)
    err = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
              for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pw)))
    assert err < 2e-5, err
