"""loop._encoder_stages: the VQ tokenizer and SigLIP stages one after the other, or side by side in
two threads (config.vision_pretrain.concurrent_with_tokenizer): the same results, one signal stops
both, and one stage's error stops the other and reaches the caller."""
import os
import signal
import threading
import time

import jax
import ml_collections
import numpy as np
import pytest

from test_shapes_job import tiny_job_config
from unimm_jax.train import loop
from unimm_jax.train.checkpoint import Checkpointer


def stage_config(side_by_side=True, checkpoint=""):
    return ml_collections.ConfigDict(dict(
        tokenizer=dict(checkpoint=checkpoint),
        vision_pretrain=dict(num_steps=4, concurrent_with_tokenizer=side_by_side)))


def waiting_stage(name, log, *, fail=None):
    """A stand-in stage: inside its Checkpointer's preemption_guard, waits for a stop (-> the
    stopped result) for up to 30 s; `fail`: raise it after 0.2 s instead."""
    def stage(config, workdir):
        log.append((name, threading.current_thread().name))
        with Checkpointer(os.path.join(workdir, name)) as ck, ck.preemption_guard():
            t0 = time.time()
            while time.time() - t0 < 30:
                if fail is not None and time.time() - t0 > 0.2:
                    raise fail
                if ck.should_stop:
                    return None if name == "tokenizer" else {"stopped_early": True}
                time.sleep(0.02)
        return "finished"
    return stage


@pytest.fixture
def fakes(monkeypatch):
    def install(tokenizer_fail=None, vision_fail=None):
        log = []
        monkeypatch.setattr(loop, "_tokenizer_stage", waiting_stage("tokenizer", log, fail=tokenizer_fail))
        monkeypatch.setattr(loop, "_vision_stage", waiting_stage("vision", log, fail=vision_fail))
        return log
    return install


def test_one_stages_error_stops_the_other_and_is_raised(tmp_path, fakes):
    log = fakes(vision_fail=ValueError("bad vision_pretrain.batch_size"))
    t0 = time.time()
    with pytest.raises(ValueError, match="bad vision_pretrain.batch_size"):
        loop._encoder_stages(stage_config(), str(tmp_path))
    assert time.time() - t0 < 20  # the tokenizer stage stopped, it did not run out its 30 s
    assert sorted(name for name, _ in log) == ["tokenizer", "vision"]
    assert all(thread.startswith("unimm-") for _, thread in log)


def test_a_signal_stops_both_stages(tmp_path, fakes):
    fakes()
    before = signal.getsignal(signal.SIGTERM)
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
    t0 = time.time()
    vq, vision = loop._encoder_stages(stage_config(), str(tmp_path))
    assert time.time() - t0 < 20
    assert vq is None and vision == {"stopped_early": True}
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("cfg", [stage_config(side_by_side=False), stage_config(checkpoint="/some/tokenizer")],
                         ids=["flag_off", "tokenizer_given"])
def test_one_after_the_other_otherwise(tmp_path, monkeypatch, cfg):
    log = []
    monkeypatch.setattr(loop, "_tokenizer_stage", lambda c, w: log.append(threading.current_thread().name) or "vq")
    monkeypatch.setattr(loop, "_vision_stage", lambda c, w: log.append(threading.current_thread().name) or "tower")
    assert loop._encoder_stages(cfg, str(tmp_path)) == ("vq", "tower")
    assert log == ["MainThread", "MainThread"]


@pytest.mark.slow  # two tiny VQ + SigLIP stage runs: ~1 min on 2 cores
def test_side_by_side_trains_the_same_params_as_one_after_the_other(tmp_path):
    results = {}
    for side_by_side in (False, True):
        c = tiny_job_config()
        c.vision_pretrain.concurrent_with_tokenizer = side_by_side
        w = str(tmp_path / f"w{int(side_by_side)}")
        loop._shapes_setup(c, w)
        vq, vision = loop._encoder_stages(c, w)
        results[side_by_side] = (vq, vision["params"])
    for a, b in zip(jax.tree.leaves(results[False]), jax.tree.leaves(results[True])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
