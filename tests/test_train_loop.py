"""Trainer: sharded == 1-device losses, fsdp coverage, exact resume (same and other mesh), NaN
stop keeps the last good checkpoint, config/mesh/batch errors, SIGTERM, unimm-train CLI."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from test_train_step import tiny_train_config
from unimm_jax import sharding as shd
from unimm_jax.train import loop, step as step_lib
from unimm_jax.train.checkpoint import Checkpointer
from unimm_jax.train.metrics import read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _losses(workdir):
    return {r["step"]: r["loss"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "skipped" in r}


def test_fsdp_shards_at_least_98_percent_of_params():
    """The trainer's param shardings (computed abstractly: no init) split >= 98% of elements."""
    c = tiny_train_config(mesh=(1, 8, 1))
    mesh = loop.mesh_of(c)
    from unimm_jax.api import logical_axes
    from flax import linen as nn
    from unimm_jax.models.janus import Janus

    shapes = jax.eval_shape(lambda k: nn.unbox(Janus(c.model).init(
        k, *loop._init_inputs(c.model), method=Janus.init_all))["params"], jax.random.key(0))
    shardings = shd.params_shardings(logical_axes(c.model), shapes, mesh, shd.DEFAULT_RULES)
    frac = shd.fraction_sharded(shapes, shardings)
    assert frac >= 0.98, frac


@pytest.mark.slow
def test_sharded_losses_equal_one_device(tmp_path):
    losses = {}
    for mesh, devices in (((1, 1, 1), jax.devices()[:1]), ((2, 2, 2), None)):
        c = tiny_train_config(mesh=mesh, steps=3)
        t = loop.Trainer(c, tmp_path / str(mesh), devices=devices)
        losses[mesh] = [float(t.step(loop.synthetic_batch(c.model, c.data, 0, i))["loss"]) for i in range(3)]
        if mesh == (2, 2, 2):  # params and Adam moments really are split over the devices
            emb = t.state.params["llm"]["embed"]["embedding"]
            assert emb.addressable_shards[0].data.size * 4 == emb.size  # vocab/tensor x embed/fsdp
    np.testing.assert_allclose(losses[(2, 2, 2)], losses[(1, 1, 1)], rtol=1e-4)


@pytest.mark.slow
def test_resume_is_exact_on_same_and_other_mesh(tmp_path):
    c = tiny_train_config(mesh=(2, 2, 2), steps=6, checkpoint_every=3)
    loop.train(c, tmp_path / "straight")
    loop.train(c, tmp_path / "split", stop_at=3)
    assert Checkpointer(tmp_path / "split" / "ckpt").all_steps() == [3]
    out = loop.train(c, tmp_path / "split")
    assert out["step"] == 6
    a, b = _losses(tmp_path / "straight"), _losses(tmp_path / "split")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([b[s] for s in range(1, 7)], [a[s] for s in range(1, 7)], rtol=1e-6)
    # resume the same checkpoint onto a different mesh (fsdp=8 instead of 2x2x2)
    other = tiny_train_config(mesh=(1, 8, 1), steps=6, checkpoint_every=3)
    loop.train(other, tmp_path / "split2", stop_at=3)
    loop.train(other, tmp_path / "split2")
    c2 = _losses(tmp_path / "split2")
    np.testing.assert_allclose([c2[s] for s in range(1, 7)], [a[s] for s in range(1, 7)], rtol=1e-4)


@pytest.mark.slow
def test_nan_steps_stop_with_error_and_keep_last_good_checkpoint(tmp_path, monkeypatch):
    c = tiny_train_config(steps=8, checkpoint_every=2, max_consecutive_skips=3)
    dev = jax.devices()[:1]
    loop.train(c, tmp_path, devices=dev, stop_at=2)
    real = step_lib.per_token_losses

    def nan_losses(module, params, batch):
        ce, correct = real(module, params, batch)
        return ce * np.nan, correct

    monkeypatch.setattr(step_lib, "per_token_losses", nan_losses)
    with pytest.raises(FloatingPointError, match=r"3 consecutive non-finite steps.*last good checkpoint is step 2"):
        loop.train(c, tmp_path, devices=dev)
    monkeypatch.undo()
    ckpt = Checkpointer(tmp_path / "ckpt")
    assert ckpt.all_steps() == [2]
    t = loop.Trainer(c, tmp_path, devices=dev)
    state, step = ckpt.restore_latest(t.abstract_state)
    assert step == 2 and int(state.step) == 2
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
    skipped = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r.get("skipped") == 1.0]
    assert len(skipped) == 3


def test_config_mesh_and_batch_errors(tmp_path):
    c = tiny_train_config()
    c.unknown_block = 1
    with pytest.raises(ValueError, match=r"unknown top-level field\(s\) \['unknown_block'\]"):
        loop.check_config(c)
    c = tiny_train_config(mesh=(3, 1, 1))
    with pytest.raises(ValueError, match="does not divide 8 devices|needs 3 devices but 8"):
        loop.Trainer(c, tmp_path)
    c = tiny_train_config(mesh=(4, 2, 1), batch=12)
    with pytest.raises(ValueError, match="batch_size=12 does not divide over the mesh's 8 batch shards"):
        loop.Trainer(c, tmp_path)
    c = tiny_train_config(mesh=(4, 2, 1), batch=8)
    c.optim.grad_accum_steps = 2  # 8 rows over 8 shards: one row each, not two micro-batches
    with pytest.raises(ValueError, match="batch_size=8 must split into optim.grad_accum_steps=2 micro-batches "
                                         "over the mesh's 8 batch shards; use a multiple of 16"):
        loop.Trainer(c, tmp_path)
    c = tiny_train_config()
    c.train.not_a_field = 1
    with pytest.raises(ValueError, match=r"config.train has unknown field\(s\) \['not_a_field'\]"):
        loop.check_config(c)


CLI_CONFIG = '''
import sys
sys.path.insert(0, {tests!r})
from test_train_step import tiny_train_config

def get_config(arg=None):
    return tiny_train_config(mesh=(1, 1, 1), steps={steps}, checkpoint_every=2)
'''


def _cli(tmp_path, *args, steps=4):
    cfg = tmp_path / "cfg.py"
    cfg.write_text(CLI_CONFIG.format(tests=os.path.join(REPO, "tests"), steps=steps))
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=REPO)
    cmd = [sys.executable, "-m", "unimm_jax.cli.train", f"--config={cfg}", f"--workdir={tmp_path / 'w'}", *args]
    return cmd, env


def test_cli_rejects_unknown_config_key(tmp_path):
    cmd, env = _cli(tmp_path, "--config.train.no_such_key=3")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "no_such_key" in r.stderr


def test_cli_names_a_bad_config_value_and_exits_2(tmp_path):
    cmd, env = _cli(tmp_path, "--config.optim.warmup_steps=10", steps=4)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]  # the named error, not a traceback, ends the output
    assert last.startswith("unimm-train: error:") and "warmup_steps=10" in last


@pytest.mark.slow
def test_cli_saves_config_and_command_and_sigterm_saves(tmp_path):
    cmd, env = _cli(tmp_path, "--config.train.log_every=1", steps=400)
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    w = tmp_path / "w"
    deadline = time.time() + 400
    while time.time() < deadline and not (w / "metrics.jsonl").exists():
        time.sleep(1)
    while time.time() < deadline and len(read_jsonl(w / "metrics.jsonl")) < 3:
        time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-3000:]
    assert json.loads((w / "config.json").read_text())["train"]["num_steps"] == 400
    assert "--config.train.log_every=1" in (w / "command.txt").read_text()
    steps = Checkpointer(w / "ckpt").all_steps()
    last = max(r["step"] for r in read_jsonl(w / "metrics.jsonl"))
    assert steps and steps[-1] == last and 3 <= last < 400


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    """launch/local_multiprocess.sh 2: jax.distributed over localhost (gloo), one CPU device
    each, the global batch split by rows; losses equal the single-process run."""
    cmd, env = _cli(tmp_path, "--config.train.log_every=1", "--config.train.progress_bar=False", steps=3)
    one = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    single = _losses(tmp_path / "w")
    multi_dir = tmp_path / "multi"
    args = [a if not a.startswith("--workdir=") else f"--workdir={multi_dir}" for a in cmd[3:]]
    env2 = dict(env, PORT=str(20000 + os.getpid() % 20000))
    r = subprocess.run(["bash", os.path.join(REPO, "launch", "local_multiprocess.sh"), "2", *args,
                        "--config.mesh.data=-1"], env=env2, capture_output=True, text=True, timeout=900)
    logs = "".join((multi_dir / "logs" / f"process_{i}.log").read_text()[-2000:] for i in range(2))
    assert r.returncode == 0, logs
    multi = _losses(multi_dir)
    assert sorted(multi) == sorted(single) == [1, 2, 3]
    np.testing.assert_allclose([multi[s] for s in (1, 2, 3)], [single[s] for s in (1, 2, 3)], rtol=1e-5)


def test_cli_log_filter_drops_library_info_but_keeps_warnings_and_ours():
    import logging as py_logging

    from unimm_jax.cli.train import QuietLibraries

    def record(path, level):
        return py_logging.LogRecord("absl", level, path, 1, "msg", (), None)

    f = QuietLibraries()
    lib = os.path.join(os.sep, "site-packages", "orbax", "checkpoint", "x.py")
    ours = os.path.join(os.sep, "repo", "unimm_jax", "train", "loop.py")
    assert not f.filter(record(lib, py_logging.INFO))
    assert f.filter(record(lib, py_logging.WARNING))
    assert f.filter(record(ours, py_logging.INFO))


def test_evaluations_reach_metrics_jsonl_and_tensorboard(tmp_path):
    """evaluate_fn's summaries (what the shapes job's periodic eval returns via eval_summary) are
    logged at their step: eval scalars in metrics.jsonl and TensorBoard, the sample grid as an image."""
    from tensorboard.backend.event_processing import event_accumulator

    grid = np.zeros((6, 10, 3), np.uint8)
    grid[:, :5] = (230, 25, 75)
    result = {"understanding": {"overall": 0.5, "per_kind": {"count": 1.0, "shape": 0.0}},
              "generation": {"overall": 0.25, "per_kind": {"single": 0.25}, "samples_grid": grid}}
    summary = loop.eval_summary(result)
    assert summary["scalars"] == {"eval/understanding": 0.5, "eval/understanding/count": 1.0,
                                  "eval/understanding/shape": 0.0, "eval/generation": 0.25,
                                  "eval/generation/single": 0.25}
    np.testing.assert_array_equal(summary["images"]["eval/samples"], grid)
    assert loop.eval_summary({"understanding": result["understanding"]})["images"] == {}

    calls = []
    c = tiny_train_config(steps=4, eval_every=2, tensorboard=True)
    loop.train(c, tmp_path / "w", evaluate_fn=lambda trainer, step: calls.append(step) or summary,
               devices=jax.devices()[:1])
    assert calls == [2]  # every eval_every steps, not at the last step (the final eval's job)
    rows = [r for r in read_jsonl(tmp_path / "w" / "metrics.jsonl") if "eval/understanding" in r]
    assert [(r["step"], r["eval/generation"]) for r in rows] == [(2, 0.25)]
    acc = event_accumulator.EventAccumulator(str(tmp_path / "w" / "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("eval/understanding")] == [(2, 0.5)]
    assert [(e.step, e.width, e.height) for e in acc.Images("eval/samples")] == [(2, 10, 6)]
