"""MetricsLogger JSON lines (write, resume, truncate) and the Averages accumulator."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from unimm_jax.train.metrics import JSONL_NAME, Averages, MetricsLogger, read_jsonl


def _lines(workdir):
    with open(os.path.join(workdir, JSONL_NAME)) as f:
        return [json.loads(line) for line in f]


def test_jsonl_lines_parse_and_hold_what_was_written(tmp_path):
    with MetricsLogger(tmp_path) as log:
        assert log.backend in ("tensorboard", "absl-logging")
        for step in (10, 20):
            log.write(step, {"loss": jnp.float32(step / 10), "loss/und": 0.25, "loss/gen": jnp.array(1.5),
                             "lr": 1e-4, "grad_norm": jnp.float32(0.5), "tokens_per_s": 1234.5,
                             "tokens": jnp.int32(4096)})
    got = _lines(tmp_path)
    assert [r["step"] for r in got] == [10, 20]
    assert got[1] == {"step": 20, "loss": 2.0, "loss/und": 0.25, "loss/gen": 1.5, "lr": 1e-4,
                      "grad_norm": 0.5, "tokens_per_s": 1234.5, "tokens": 4096}
    assert isinstance(got[1]["tokens"], int) and isinstance(got[1]["loss"], float)
    if log.backend == "tensorboard":
        assert os.listdir(tmp_path / "tb")


def test_resuming_appends(tmp_path):
    with MetricsLogger(tmp_path, use_tensorboard=False) as log:
        log.write(1, {"loss": 3.0})
        log.write(2, {"loss": 2.0})
    with MetricsLogger(tmp_path, use_tensorboard=False) as log:
        log.write(3, {"loss": 1.0})
    assert [(r["step"], r["loss"]) for r in _lines(tmp_path)] == [(1, 3.0), (2, 2.0), (3, 1.0)]


def test_resume_step_drops_lines_logged_after_the_restored_checkpoint(tmp_path):
    with MetricsLogger(tmp_path, use_tensorboard=False) as log:
        for s in range(1, 6):
            log.write(s, {"loss": float(s)})
    # A hard kill can cut the last line; the reader and the truncation skip it.
    with open(tmp_path / JSONL_NAME, "a") as f:
        f.write('{"step": 6, "lo')
    assert [r["step"] for r in read_jsonl(tmp_path / JSONL_NAME)] == [1, 2, 3, 4, 5]
    with MetricsLogger(tmp_path, use_tensorboard=False, resume_step=3) as log:
        log.write(4, {"loss": 40.0})
    assert [(r["step"], r["loss"]) for r in _lines(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 3.0),
                                                                   (4, 40.0)]


def test_bad_values_are_errors(tmp_path):
    with MetricsLogger(tmp_path, use_tensorboard=False) as log:
        with pytest.raises(ValueError, match="scalars"):
            log.write(1, {"loss": jnp.ones((2,))})
        with pytest.raises(ValueError, match="'step' is reserved"):
            log.write(1, {"step": 3})
        log.write(2, {"loss": float("nan")})
    assert np.isnan(_lines(tmp_path)[-1]["loss"])


def test_averages_weighted_by_mask():
    avg = Averages()
    avg.update("loss", jnp.array([[1.0, 2.0], [3.0, 100.0]]), mask=jnp.array([[1, 1], [1, 0]]))
    avg.update("loss", jnp.array([6.0]))
    avg.update("acc", 1.0)
    avg.update("acc", jnp.array([0.0, 0.0, 1.0]))
    got = avg.compute()
    assert got["loss"] == pytest.approx((1 + 2 + 3 + 6) / 4)
    assert got["acc"] == pytest.approx(2 / 4)
    avg.reset()
    assert avg.compute() == {}
