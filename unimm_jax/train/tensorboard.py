"""TensorBoard event files without TensorFlow: a clu `MetricWriter` on tensorboard's own writer.

    writer = TensorBoardWriter(logdir)                      # events.out.tfevents.* in logdir
    writer.write_scalars(step, {"loss": 1.25, "lr": 3e-4})  # python numbers or 0-d arrays
    writer.write_images(step, {"samples": grid})            # [H, W, C] or [N, H, W, C]
    writer.write_hparams({"lr": 3e-4, "batch_size": 64})
    writer.close()                                          # then: tensorboard --logdir W

clu's own TensorBoard writer (`clu.metric_writers.SummaryWriter`) is built on `tf.summary`, and
`clu.metric_writers` imports TensorFlow at import time, far too heavy a runtime requirement.
The `tensorboard` package ships a pure-python event writer
(`tensorboard.summary.writer.event_file_writer.EventFileWriter`: TFRecord framing + CRC, a
background flush thread) and the `Summary`/`Event` protos, which is all that is needed here.

The base class is clu's `MetricWriter` (`clu/metric_writers/interface.py`, which itself needs
only jax and numpy). Without TensorFlow its package `__init__` fails, so the interface module is
then loaded from its file under its own module name (`_metric_writer_base`): the class is the
same one clu's writers subclass wherever `clu.metric_writers` does import.

Resuming: `TensorBoardWriter(logdir, resume_step=s)` first writes a `SessionLog.START` event at
step s + 1; TensorBoard's loader then drops the events of earlier files with step > s, i.e. the
steps a killed run logged after its last checkpoint, which the resumed run writes again (the
same rule as `metrics.jsonl`'s truncation).
"""
from __future__ import annotations

import importlib.util
import io
import os
import sys
import time
from typing import Any, Mapping

import numpy as np


def _metric_writer_base() -> type:
    """clu's `MetricWriter` abstract base class, with or without TensorFlow installed."""
    try:
        from clu.metric_writers import interface

        return interface.MetricWriter
    except ImportError:  # clu.metric_writers/__init__ imports tensorflow
        pass
    name = "clu.metric_writers.interface"
    module = sys.modules.get(name)  # a failed package import may leave it there already
    if module is None:
        clu_spec = importlib.util.find_spec("clu")
        if clu_spec is None or not clu_spec.submodule_search_locations:
            raise ImportError("clu is not installed (pip install clu).")
        path = os.path.join(list(clu_spec.submodule_search_locations)[0], "metric_writers",
                            "interface.py")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return module.MetricWriter


MetricWriter = _metric_writer_base()


def _scalar(v) -> float:
    a = np.asarray(v)
    if a.size != 1:
        raise ValueError(f"scalar summaries take one number, got an array of shape {a.shape}.")
    return float(a.reshape(()))


def _png(image) -> tuple[bytes, int, int, int]:
    """uint8 PNG bytes and (height, width, channels) of an [H, W, C] image.

    Floats are taken as [0, 1] (clu's convention) and clipped; C is 1, 3 or 4.
    """
    from PIL import Image

    a = np.asarray(image)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise ValueError(f"an image must be [H, W, C] with C in (1, 3, 4), got shape {a.shape}.")
    if a.dtype != np.uint8:
        a = np.round(np.clip(np.asarray(a, np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(buf, format="PNG")
    return buf.getvalue(), a.shape[0], a.shape[1], a.shape[2]


class TensorBoardWriter(MetricWriter):
    """Writes scalars, images, texts, histograms and hparams as TensorBoard events in `logdir`.

    Args:
      logdir: the run's event directory (created); each writer opens a new event file there.
      resume_step: when resuming from checkpoint step s, marks s + 1 as a restart (see module doc).
      flush_secs: the background thread's flush period; `flush()` / `close()` flush at once.
    """

    def __init__(self, logdir, *, resume_step: int | None = None, flush_secs: float = 30.0):
        from tensorboard.compat.proto import event_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._event_pb2 = event_pb2
        self.logdir = os.fspath(logdir)
        self._writer = EventFileWriter(self.logdir, max_queue_size=100, flush_secs=flush_secs)
        if resume_step is not None:
            self._add(int(resume_step) + 1, session_log=event_pb2.SessionLog(
                status=event_pb2.SessionLog.START))

    @property
    def path(self) -> str:
        """The event file this writer appends to."""
        return self._writer._file_name  # pylint: disable=protected-access

    def _add(self, step: int, **fields) -> None:
        self._writer.add_event(self._event_pb2.Event(wall_time=time.time(), step=int(step), **fields))

    def _add_values(self, step: int, values: list) -> None:
        from tensorboard.compat.proto import summary_pb2

        if values:
            self._add(step, summary=summary_pb2.Summary(value=values))

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """One scalar per tag at `step`; values are python numbers or one-element arrays."""
        from tensorboard.compat.proto import summary_pb2

        self._add_values(step, [summary_pb2.Summary.Value(tag=k, simple_value=_scalar(v))
                                for k, v in scalars.items()])

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        """Images as PNG: each value is [H, W, C] or a batch [N, H, W, C] (tags `name/i`);
        uint8, or floats in [0, 1]."""
        from tensorboard.compat.proto import summary_pb2

        values = []
        for k, v in images.items():
            a = np.asarray(v)
            batch = [(k, a)] if a.ndim <= 3 else [(f"{k}/{i}", x) for i, x in enumerate(a)]
            for tag, img in batch:
                png, h, w, c = _png(img)
                values.append(summary_pb2.Summary.Value(tag=tag, image=summary_pb2.Summary.Image(
                    height=h, width=w, colorspace=c, encoded_image_string=png)))
        self._add_values(step, values)

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        """Markdown strings for TensorBoard's text tab."""
        from tensorboard.compat.proto import summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
        from tensorboard.plugins.text import metadata as text_metadata

        values = []
        for k, s in texts.items():
            tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=[str(s).encode()],
                                            tensor_shape=tensor_shape_pb2.TensorShapeProto())
            values.append(summary_pb2.Summary.Value(
                tag=k, tensor=tensor, metadata=text_metadata.create_summary_metadata(k, "")))
        self._add_values(step, values)

    def write_histograms(self, step: int, arrays: Mapping[str, Any],
                         num_buckets: Mapping[str, int] | None = None) -> None:
        """Histograms of the arrays' values (30 equal-width buckets unless `num_buckets[name]`)."""
        from tensorboard.compat.proto import summary_pb2

        values = []
        for k, v in arrays.items():
            a = np.asarray(v, np.float64).ravel()
            a = a[np.isfinite(a)]
            if a.size == 0:
                continue
            counts, edges = np.histogram(a, bins=(num_buckets or {}).get(k, 30))
            values.append(summary_pb2.Summary.Value(tag=k, histo=summary_pb2.HistogramProto(
                min=float(a.min()), max=float(a.max()), num=float(a.size), sum=float(a.sum()),
                sum_squares=float(np.dot(a, a)), bucket_limit=[float(e) for e in edges[1:]],
                bucket=[float(c) for c in counts])))
        self._add_values(step, values)

    def write_summaries(self, step: int, values: Mapping[str, Any],
                        metadata: Mapping[str, Any] | None = None) -> None:
        """Arbitrary tensors (for custom plugins); metadata[name] is a SummaryMetadata proto or
        its serialized bytes."""
        from tensorboard.compat.proto import summary_pb2
        from tensorboard.util import tensor_util

        out = []
        for k, v in values.items():
            meta = (metadata or {}).get(k)
            if isinstance(meta, bytes):
                meta = summary_pb2.SummaryMetadata.FromString(meta)
            out.append(summary_pb2.Summary.Value(
                tag=k, tensor=tensor_util.make_tensor_proto(np.asarray(v)), metadata=meta))
        self._add_values(step, out)

    def write_videos(self, step: int, videos: Mapping[str, Any]) -> None:
        raise NotImplementedError("TensorBoardWriter does not write videos; log frames with "
                                  "write_images instead.")

    def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int) -> None:
        raise NotImplementedError("TensorBoardWriter does not write audio.")

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """The run's hyperparameters for the HPARAMS tab (values that are not bool/int/float/str
        are written as their str())."""
        from tensorboard.plugins.hparams import summary_v2 as hparams_summary

        clean = {str(k): v if isinstance(v, (bool, int, float, str)) else str(v)
                 for k, v in hparams.items()}
        self._add(0, summary=hparams_summary.hparams_pb(clean))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
