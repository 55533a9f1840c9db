"""Metrics: scalars to TensorBoard (via clu metric_writers) and to `workdir/metrics.jsonl`.

    logger = MetricsLogger(workdir)
    logger.write(step, {"loss": loss, "loss/und": l_und, "loss/gen": l_gen, "lr": lr,
                        "grad_norm": gn, "tokens_per_s": tps})
    logger.close()

`metrics.jsonl` holds one JSON object per `write`, `{"step": int, name: float, ...}`, appended,
so a resumed run continues the same file; `MetricsLogger(..., resume_step=s)` first drops lines
logged after step `s` (steps re-run after a restore would otherwise appear twice). The file is
the backend-independent record: plot it with pandas (`pd.read_json(path, lines=True)`).

TensorBoard: event files in `workdir/tb` (view with `tensorboard --logdir W`), written by
`unimm_jax.train.tensorboard.TensorBoardWriter`, a clu `MetricWriter` on the `tensorboard`
package's pure-python event writer: clu's own TensorBoard writer needs TensorFlow, which is not
a dependency. Scalars also go to absl logging. Without the `tensorboard` package (or with
use_tensorboard=False) only absl logging and the JSON lines are written; `backend` tells which
("tensorboard" or "absl-logging"). Images (`write_images`, e.g. the sample grid) go to
TensorBoard only. Only process 0 writes anything.

`Averages` accumulates eval metrics with `clu.metrics.Average` (weighted by an optional mask).
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging

JSONL_NAME = "metrics.jsonl"


class _AbslLoggingWriter:
    """The subset of clu's MetricWriter that MetricsLogger uses, writing to absl logging."""

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        logging.info("[%d] %s", step, ", ".join(f"{k}={v:.6g}" for k, v in sorted(scalars.items())))

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        logging.info("hparams: %s", dict(hparams))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class _FanOut:
    """Forwards each call to several writers (clu's MultiWriter needs TensorFlow to import)."""

    def __init__(self, *writers):
        self.writers = writers

    def __getattr__(self, name):
        def call(*args, **kwargs):
            for w in self.writers:
                if hasattr(w, name):
                    getattr(w, name)(*args, **kwargs)
        return call


def _make_writer(logdir: str, use_tensorboard: bool, resume_step: int | None = None):
    """(writer, backend name): TensorBoard event files + absl logging, or absl logging only."""
    if not use_tensorboard:
        return _AbslLoggingWriter(), "absl-logging"
    try:
        from unimm_jax.train.tensorboard import TensorBoardWriter

        tb = TensorBoardWriter(logdir, resume_step=resume_step)
    except ImportError as e:
        logging.warning("TensorBoard summaries are off (%s); scalars go to absl logging and %s "
                        "only. `pip install tensorboard` enables them.", e, JSONL_NAME)
        return _AbslLoggingWriter(), "absl-logging"
    return _FanOut(tb, _AbslLoggingWriter()), "tensorboard"


def _to_python(v):
    """A JSON-able float/int from a python number or a 0-d (host) array."""
    a = np.asarray(v)
    if a.size != 1:
        raise ValueError(f"metric values must be scalars, got shape {a.shape}.")
    a = a.reshape(())
    if np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.bool_):
        return int(a)
    return float(a)


class MetricsLogger:
    """Writes per-step scalar metrics to TensorBoard (or logging) and `workdir/metrics.jsonl`.

    Args:
      workdir: run directory; TensorBoard events go to `workdir/tb`, the JSON lines to
        `workdir/metrics.jsonl` (appended to if present).
      use_tensorboard: False writes only logging + JSON lines.
      resume_step: if given, lines with step > resume_step are removed first (atomic rewrite),
        and TensorBoard is told to drop the older event files' steps > resume_step.
    """

    def __init__(self, workdir, use_tensorboard: bool = True, resume_step: int | None = None):
        self.workdir = os.fspath(workdir)
        self.path = os.path.join(self.workdir, JSONL_NAME)
        self.is_writer = jax.process_index() == 0
        self._file = None
        self._writer = None
        self.backend = "none"
        if not self.is_writer:
            return
        os.makedirs(self.workdir, exist_ok=True)
        if resume_step is not None and os.path.exists(self.path):
            self._truncate_after(int(resume_step))
        self._writer, self.backend = _make_writer(os.path.join(self.workdir, "tb"),
                                                  use_tensorboard, resume_step)
        # Line-buffered: each step's line reaches the OS at once, so a crash loses nothing
        # that was logged (a hard kill can still cut the very last line; readers skip it).
        self._file = open(self.path, "a", buffering=1, encoding="utf-8")

    def _truncate_after(self, step: int) -> None:
        kept = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a hard kill
                    continue
                if rec.get("step", -1) <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def write(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Logs scalars for `step`. Values: python numbers or 0-d arrays (device arrays are
        fetched in one transfer). Keys are free-form ("loss", "loss/und", "lr", ...).
        NaN/inf are written as JSON NaN/Infinity (Python's json and pandas read them)."""
        if not self.is_writer:
            return
        host = jax.device_get(dict(scalars))
        values = {k: _to_python(v) for k, v in host.items()}
        if "step" in values:
            raise ValueError("'step' is reserved; pass it as the step argument.")
        step = int(step)
        self._file.write(json.dumps({"step": step, **values}) + "\n")
        self._writer.write_scalars(step, values)
        # Event files are written by a background thread that flushes every 30 s: flush now, so
        # a killed run keeps in TensorBoard, too, every step it logged (as in metrics.jsonl).
        self._writer.flush()

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        """Images to TensorBoard only (not to metrics.jsonl): each value [H, W, C] or
        [N, H, W, C], uint8 or floats in [0, 1]. A no-op without the TensorBoard backend."""
        if self.is_writer and self.backend == "tensorboard":
            self._writer.write_images(int(step), {k: np.asarray(v) for k, v in images.items()})

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        if self.is_writer:
            self._writer.write_hparams(dict(hparams))

    def flush(self) -> None:
        if self.is_writer:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._writer.flush()

    def close(self) -> None:
        if self.is_writer and self._file is not None:
            self.flush()
            self._file.close()
            self._file = None
            self._writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_jsonl(path) -> list[dict]:
    """All complete records of a metrics.jsonl (a line cut by a hard kill is skipped)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


class Averages:
    """Named running means for eval metrics, backed by `clu.metrics.Average`.

        avg = Averages()
        avg.update("loss", per_token_loss, mask=targets_mask)   # any shape; mask same shape
        avg.update("accuracy", correct)                         # unweighted mean
        avg.compute()  # {"loss": float, "accuracy": float}
    """

    def __init__(self):
        from clu import metrics as clu_metrics

        self._Average = clu_metrics.Average
        self._acc: dict[str, Any] = {}

    def update(self, name: str, values, mask=None) -> None:
        """Adds `values` (array of any shape, or scalar) to `name`'s mean; `mask` (same shape,
        bool or 0/1) selects which entries count."""
        import jax.numpy as jnp

        values = jnp.asarray(values, jnp.float32)
        if values.ndim == 0:
            values = values[None]
        if mask is not None:
            mask = jnp.broadcast_to(jnp.asarray(mask), values.shape)
        new = self._Average.from_model_output(values, mask=mask)
        self._acc[name] = new if name not in self._acc else self._acc[name].merge(new)

    def compute(self) -> dict[str, float]:
        """{name: mean}; a metric whose every entry was masked gives NaN."""
        return {k: float(v.compute()) for k, v in self._acc.items()}

    def reset(self) -> None:
        self._acc.clear()
