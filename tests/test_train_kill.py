"""Trainer-level crash safety: `unimm-train` (the real CLI, a tiny Janus config, a checkpoint every
step) is SIGKILLed mid-save and at random moments, and re-running the same command resumes from
the newest finalized checkpoint every time, until the run completes with the same losses as an
uninterrupted run.

tests/test_checkpoint.py kills a bare Checkpointer mid-save; these tests cover what that cannot:
the trainer's own restore path, the Grain iterator state, metrics.jsonl and TensorBoard
truncation, and orbax's keep-N deletions racing the kill. Every launch compiles the model (the
first one ~1.5-2.5 min on a shared 2-core CPU; later ones hit a persistent compilation cache
shared through the test module), hence `slow`.
"""
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from unimm_jax.train.metrics import read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = '''
import sys
sys.path.insert(0, {tests!r})
from test_train_step import tiny_train_config

def get_config(arg=None):
    return tiny_train_config(mesh=(1, 1, 1), steps={steps}, checkpoint_every=1, keep_checkpoints=2,
                             log_every=1, tensorboard=True)
'''

RESUMED = re.compile(r"resumed from step (\d+) in ")


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


def _command(tmp_path, workdir, steps, jax_cache):
    cfg = tmp_path / f"cfg_{steps}.py"
    cfg.write_text(CONFIG.format(tests=os.path.join(REPO, "tests"), steps=steps))
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=REPO,
               JAX_COMPILATION_CACHE_DIR=str(jax_cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    cmd = [sys.executable, "-m", "unimm_jax.cli.train", f"--config={cfg}", f"--workdir={workdir}",
           "--config.train.progress_bar=False"]
    return cmd, env


class Launch:
    """One run of the command, its output in a log file (a pipe could fill and block it)."""

    def __init__(self, cmd, env, log_path):
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        with open(self.log_path) as f:
            return f.read()

    def resumed_from(self):
        m = RESUMED.findall(self.log())
        return int(m[0]) if m else None

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=60)
        self._log.close()

    def wait(self, timeout=900) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self._log.close()
        return rc


def _listing(ckpt):
    """(finalized steps, names of orbax's unfinished-save dirs) in the checkpoint directory."""
    names = os.listdir(ckpt) if os.path.isdir(ckpt) else []
    return sorted(int(n) for n in names if n.isdigit()), sorted(n for n in names if "tmp" in n)


def _kill_when(launch, ckpt, condition, timeout=900):
    """Polls the checkpoint dir every few ms; SIGKILLs the run as soon as `condition(steps, tmps)`
    holds. Returns the listing seen right after the kill (the truth the next run must resume)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if launch.proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {launch.proc.returncode}) before the kill:\n"
                                 + launch.log()[-3000:])
        if condition(*_listing(ckpt)):
            launch.kill()
            return _listing(ckpt)
        time.sleep(0.003)
    launch.kill()
    raise AssertionError("the kill condition never held:\n" + launch.log()[-3000:])


def _check_resumed(launch, expected):
    got = launch.resumed_from()
    if expected is None:
        assert got is None, launch.log()[-3000:]
    else:
        assert got == expected, (got, expected, launch.log()[-3000:])


def _mid_save(after):
    """This run has finalized a step > `after` (so it already removed a killed run's stale tmp
    dir, whose name a new save of that step would reuse) and a save is in flight (a tmp dir)."""
    return lambda steps, tmps: bool(steps) and steps[-1] > after and bool(tmps)


def _check_finished_run(workdir, steps, launch):
    ckpt = workdir / "ckpt"
    final_steps, tmps = _listing(ckpt)
    assert final_steps[-1] == steps and not tmps, (final_steps, tmps)
    recs = read_jsonl(workdir / "metrics.jsonl")
    # Lines a killed run logged after its last checkpoint were dropped on resume: each step once.
    assert [r["step"] for r in recs] == list(range(1, steps + 1)), [r["step"] for r in recs]
    losses = np.array([r["loss"] for r in recs])
    assert np.isfinite(losses).all()
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(workdir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    tb = [(e.step, e.value) for e in acc.Scalars("loss")]
    assert [s for s, _ in tb] == list(range(1, steps + 1)), launch.log()[-2000:]
    np.testing.assert_array_equal([v for _, v in tb], losses.astype(np.float32))
    return losses


@pytest.mark.slow
def test_sigkill_mid_save_then_rerun_resumes(tmp_path, jax_cache):
    """The short variant: one kill while a checkpoint is being written, one re-run to the end."""
    steps, workdir = 6, tmp_path / "w"
    cmd, env = _command(tmp_path, workdir, steps, jax_cache)
    ckpt = workdir / "ckpt"
    for attempt in range(3):
        first = Launch(cmd, env, tmp_path / f"log_first_{attempt}")
        done, tmps = _kill_when(first, ckpt, _mid_save(after=0))
        if tmps:  # killed with a half-written step on disk (else the save won the race: again)
            break
    assert tmps and done, (done, tmps)
    last = Launch(cmd, env, tmp_path / "log_last")
    assert last.wait() == 0, last.log()[-3000:]
    _check_resumed(last, done[-1])
    _check_finished_run(workdir, steps, last)


@pytest.mark.slow
def test_killed_at_random_moments_resumes_every_time_and_matches_uninterrupted(tmp_path, jax_cache):
    steps = 14
    rng = random.Random(0)
    workdir = tmp_path / "killed"
    cmd, env = _command(tmp_path, workdir, steps, jax_cache)
    ckpt = workdir / "ckpt"
    ref_cmd, _ = _command(tmp_path, tmp_path / "straight", steps, jax_cache)
    ref = Launch(ref_cmd, env, tmp_path / "log_ref")  # also fills the compilation cache
    assert ref.wait() == 0, ref.log()[-3000:]

    def after_new_step(start, delay):
        """Kill `delay` s after this run finalized its first step (a random moment mid-training:
        stepping, logging, or inside the next save)."""
        seen = {}

        def cond(done, tmps):
            if done and done[-1] > (start or 0):
                seen.setdefault("t", time.time())
            return "t" in seen and time.time() - seen["t"] >= delay
        return cond

    expected, mid_save_kills = None, 0
    plan = ["mid_save", "random", "startup", "random", "mid_save"]
    for i, how in enumerate(plan):
        launch = Launch(cmd, env, tmp_path / f"log_{i}_{how}")
        if how == "startup":  # during imports, compile or the restore itself
            time.sleep(rng.uniform(1.0, 6.0))
            launch.kill()
            done, tmps = _listing(ckpt)
        else:
            cond = (_mid_save(after=expected or 0) if how == "mid_save"
                    else after_new_step(expected, rng.uniform(0.0, 1.5)))
            done, tmps = _kill_when(launch, ckpt, cond)
            _check_resumed(launch, expected)  # it got past its restore: from the right step
        mid_save_kills += how == "mid_save" and bool(tmps)
        assert not done or done[-1] < steps, f"kill {i} came after the run finished: {done}"
        # The next run must start from the newest finalized step; orbax's tmp dirs never count.
        expected = done[-1] if done else None
    assert mid_save_kills >= 1
    last = Launch(cmd, env, tmp_path / "log_last")
    assert last.wait() == 0, last.log()[-3000:]
    _check_resumed(last, expected)
    losses = _check_finished_run(workdir, steps, last)
    straight = np.array([r["loss"] for r in read_jsonl(tmp_path / "straight" / "metrics.jsonl")])
    np.testing.assert_allclose(losses, straight, rtol=1e-6)
