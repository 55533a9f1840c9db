"""The full training loop with mixed precision, remat and gradient accumulation.

- bf16 compute + remat + accumulation 2: `loop.train` runs a tiny Janus whose towers compute in
  bfloat16 with rematerialised LLM layers; params and Adam moments stay float32 (master
  weights), the step really computes in bf16 and really rematerialises, and the loss is finite
  and falls on a repeated batch.
- Accumulation 2 x batch b == 1 x batch 2b (float32): the same 2b rows fed as two micro-batches
  of b rows give the same params as one batch of 2b rows. The step's loss is a per-token mean
  and accumulation averages the micro-batch gradients, so the two agree exactly when the
  micro-batches hold equal numbers of loss tokens per task; the test's second micro-batch is the
  first one with its tokens relabelled (text ids and image codes permuted, images negated): the
  same counts, different gradients.

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


def _relabelled(batch, model_cfg, seed):
    """The batch with the same masks, tasks and lengths but other tokens: text ids through a
    permutation of the non-special vocabulary, image codes through a permutation of the
    codebook, images negated."""
    rng = np.random.default_rng(seed)
    v, k = model_cfg.llm.vocab_size, model_cfg.vq.codebook_size
    special = set(model_cfg.tokens.values())
    words = np.array([i for i in range(v) if i not in special])
    text_map = np.arange(v)
    text_map[words] = rng.permutation(words)
    code_map = rng.permutation(k)
    out = {name: x.copy() for name, x in batch.items()}
    for ids, is_img in (("input_ids", "input_is_image"), ("target_ids", "target_is_image")):
        x, img = batch[ids], batch[is_img]
        out[ids] = np.where(img, code_map[np.clip(x, 0, k - 1)], text_map[np.clip(x, 0, v - 1)]).astype(x.dtype)
    out["pixel_values"] = -batch["pixel_values"]
    return out


@pytest.mark.slow
def test_bf16_remat_and_accumulation_train_in_the_full_loop(tmp_path):
    c = tiny_train_config(steps=5, batch=8)
    c.model.llm.dtype = c.model.vision.dtype = "bfloat16"
    c.model.llm.remat_policy = "full"
    c.optim.grad_accum_steps = 2
    c.optim.learning_rate = 3e-3
    batch = loop.synthetic_batch(c.model, c.data, 0, 0)
    out = loop.train(c, tmp_path, data_iter=_iterator([batch] * 10), devices=jax.devices()[:1])
    trainer = out["trainer"]
    assert out["step"] == 10  # 5 updates x 2 micro-steps

    # Master weights and Adam moments stay float32.
    assert {x.dtype for x in jax.tree.leaves(trainer.state.params)} == {np.dtype("float32")}
    moments = [x for x in jax.tree.leaves(trainer.state.opt_state) if np.issubdtype(x.dtype, np.floating)]
    assert moments and {x.dtype for x in moments} == {np.dtype("float32")}
    # ... while the step computes in bf16 and rematerialises the LLM layers.
    with trainer._ctx():
        jaxpr = str(jax.make_jaxpr(trainer.step_fn)(
            trainer.state, loop.global_batch(batch, trainer.batch_sharding)))
    assert "bf16" in jaxpr and "remat" in jaxpr

    losses = _losses(tmp_path)
    assert [s for s, _ in losses] == list(range(1, 11))
    loss = np.array([x for _, x in losses])
    assert np.isfinite(loss).all()
    # One update per two micro-steps on the same batch: the loss falls from update to update.
    per_update = loss.reshape(5, 2)
    np.testing.assert_allclose(per_update[:, 0], per_update[:, 1], rtol=1e-6)  # no update in between
    # (warmup_steps=1: the first update has learning rate 0 and leaves the params as they are)
    np.testing.assert_allclose(per_update[1, 0], per_update[0, 0], rtol=1e-6)
    assert (np.diff(per_update[1:, 0]) < 0).all(), per_update[:, 0]
    assert per_update[-1, 0] < per_update[0, 0] - 0.1, per_update[:, 0]


@pytest.mark.slow
def test_accumulating_two_micro_batches_equals_one_double_batch(tmp_path):
    updates, b = 3, 4  # warmup_steps=1: the first update has learning rate 0
    acc = tiny_train_config(steps=updates, batch=b)
    acc.optim.grad_accum_steps = 2
    full = tiny_train_config(steps=updates, batch=2 * b)
    micro = []
    for u in range(updates):
        a = loop.synthetic_batch(acc.model, acc.data, 0, u)
        micro += [a, _relabelled(a, acc.model, seed=u)]
        assert not np.array_equal(micro[-1]["input_ids"], a["input_ids"])
    doubles = [{k: np.concatenate([micro[2 * u][k], micro[2 * u + 1][k]]) for k in micro[0]}
               for u in range(updates)]
    dev = jax.devices()[:1]
    out_acc = loop.train(acc, tmp_path / "acc", data_iter=_iterator(micro), devices=dev)
    init = []  # the initial params, fetched to host through the init hook (no extra compile)
    out_full = loop.train(full, tmp_path / "full", data_iter=_iterator(doubles), devices=dev,
                          init_params_fn=lambda p: init.append(jax.device_get(p)) or p)
    assert out_acc["step"] == 2 * updates and out_full["step"] == updates

    # Equal token counts: the double batch's per-token loss is the mean of the two micro losses.
    la = np.array([x for _, x in _losses(tmp_path / "acc")]).reshape(updates, 2)
    lf = np.array([x for _, x in _losses(tmp_path / "full")])
    np.testing.assert_allclose(la.mean(1), lf, rtol=1e-5)
    assert not np.allclose(la[:, 0], la[:, 1], rtol=1e-3)  # the micro-batches really differ

    pa, pf = out_acc["trainer"].state.params, out_full["trainer"].state.params
    p0 = init[0]
    moved = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                for x, y in zip(jax.tree.leaves(pf), jax.tree.leaves(p0)))
    assert moved > 5e-4  # the updates did something (lr 1e-3)
    err = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
              for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pf)))
    assert err < 2e-5, err
