"""TensorBoardWriter: event files read back with TensorBoard's own loader (scalars, images, texts,
histograms, hparams), the resume purge, MetricsLogger's TensorBoard backend, and no TensorFlow."""
import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator  # an install requirement

from unimm_jax.train.metrics import MetricsLogger
from unimm_jax.train.tensorboard import TensorBoardWriter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(logdir):
    acc = event_accumulator.EventAccumulator(
        os.fspath(logdir), size_guidance={"scalars": 0, "images": 0, "tensors": 0, "histograms": 0})
    acc.Reload()
    return acc


def _scalars(acc, tag):
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_scalars_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    written = {s: {"loss": float(rng.uniform(0, 5)), "loss/und": float(rng.normal()),
                   "lr": float(rng.uniform(0, 1e-3))} for s in (1, 2, 5, 10)}
    w = TensorBoardWriter(tmp_path)
    for s, vals in written.items():
        # 0-d numpy / float32 values as the trainer passes them
        w.write_scalars(s, {k: np.float32(v) if k == "lr" else v for k, v in vals.items()})
    w.close()
    assert os.path.basename(w.path).startswith("events.out.tfevents.")
    acc = _load(tmp_path)
    assert sorted(acc.Tags()["scalars"]) == ["loss", "loss/und", "lr"]
    for tag in ("loss", "loss/und", "lr"):
        got = _scalars(acc, tag)
        assert [s for s, _ in got] == [1, 2, 5, 10]
        # simple_value is a float32 field
        np.testing.assert_array_equal([v for _, v in got],
                                      np.float32([written[s][tag] for s in (1, 2, 5, 10)]))


def test_images_round_trip_as_png(tmp_path):
    rng = np.random.default_rng(1)
    grid = rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)
    batch = rng.uniform(0, 1, (2, 6, 5, 3)).astype(np.float32)  # floats in [0, 1]
    w = TensorBoardWriter(tmp_path)
    w.write_images(7, {"samples": grid, "batch": batch})
    w.close()
    acc = _load(tmp_path)
    assert sorted(acc.Tags()["images"]) == ["batch/0", "batch/1", "samples"]
    (ev,) = acc.Images("samples")
    assert (ev.step, ev.width, ev.height) == (7, 20, 12)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(ev.encoded_image_string))), grid)
    for i in range(2):
        (ev,) = acc.Images(f"batch/{i}")
        got = np.asarray(Image.open(io.BytesIO(ev.encoded_image_string)))
        np.testing.assert_array_equal(got, np.round(batch[i] * 255).astype(np.uint8))


def test_texts_histograms_hparams(tmp_path):
    x = np.random.default_rng(2).normal(size=1000)
    w = TensorBoardWriter(tmp_path)
    w.write_texts(3, {"config": "lr: 0.001"})
    w.write_histograms(3, {"weights": x}, num_buckets={"weights": 10})
    w.write_hparams({"lr": 1e-3, "batch_size": 64, "mesh": (1, 8, 1)})
    w.close()
    acc = _load(tmp_path)
    (text,) = acc.Tensors("config")
    assert text.step == 3 and text.tensor_proto.string_val == [b"lr: 0.001"]
    (h,) = acc.Histograms("weights")
    hv = h.histogram_value
    assert hv.num == 1000 and len(hv.bucket) == 10 and sum(hv.bucket) == 1000
    np.testing.assert_allclose([hv.min, hv.max, hv.sum], [x.min(), x.max(), x.sum()], rtol=1e-12)
    assert "_hparams_/session_start_info" in acc.Tags()["tensors"]
    from tensorboard.plugins.hparams import plugin_data_pb2

    meta = acc.SummaryMetadata("_hparams_/session_start_info")
    info = plugin_data_pb2.HParamsPluginData.FromString(meta.plugin_data.content).session_start_info
    assert info.hparams["batch_size"].number_value == 64
    assert info.hparams["mesh"].string_value == "(1, 8, 1)"


def test_bad_values_are_errors(tmp_path):
    w = TensorBoardWriter(tmp_path)
    with pytest.raises(ValueError, match="one number"):
        w.write_scalars(1, {"loss": np.ones(3)})
    with pytest.raises(ValueError, match=r"\[H, W, C\] with C in \(1, 3, 4\)"):
        w.write_images(1, {"img": np.zeros((4, 4, 2), np.uint8)})
    w.close()


def test_metrics_logger_writes_tensorboard_and_resume_drops_orphaned_steps(tmp_path):
    with MetricsLogger(tmp_path) as log:
        assert log.backend == "tensorboard"
        for s in range(1, 6):
            log.write(s, {"loss": float(s), "lr": 0.1})
        log.write_images(5, {"samples": np.zeros((4, 4, 3), np.uint8)})
    # Killed after step 5, last checkpoint at 3: the resumed run logs 4..6 again, differently.
    with MetricsLogger(tmp_path, resume_step=3) as log:
        for s in range(4, 7):
            log.write(s, {"loss": 10.0 * s})
    acc = _load(tmp_path / "tb")
    assert _scalars(acc, "loss") == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]
    assert [e.step for e in acc.Scalars("lr")] == [1, 2, 3]
    assert acc.Images("samples") == []  # logged at step 5, after the checkpoint: purged too
    with MetricsLogger(tmp_path / "off", use_tensorboard=False) as log:
        assert log.backend == "absl-logging"
        log.write_images(1, {"samples": np.zeros((4, 4, 3), np.uint8)})  # a no-op
        log.write(1, {"loss": 1.0})
    assert not os.path.exists(tmp_path / "off" / "tb")


def test_no_tensorflow_needed_and_a_clu_metric_writer(tmp_path):
    code = (
        "import sys\n"
        "from unimm_jax.train.metrics import MetricsLogger\n"
        "from unimm_jax.train.tensorboard import TensorBoardWriter\n"
        "log = MetricsLogger(sys.argv[1]); log.write(1, {'loss': 2.0}); log.close()\n"
        "assert log.backend == 'tensorboard', log.backend\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
        "base = sys.modules['clu.metric_writers.interface'].MetricWriter\n"
        "assert issubclass(TensorBoardWriter, base)\n"
        "print('OK')\n")
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "OK", r.stderr[-3000:]
    assert _scalars(_load(tmp_path / "tb"), "loss") == [(1, 2.0)]


def test_base_class_loads_from_clu_file_when_its_package_cannot_import(monkeypatch):
    """Without TensorFlow `import clu.metric_writers` fails; the interface module is then read
    from clu's file, even when no half-imported copy is left in sys.modules."""
    import builtins

    from unimm_jax.train import tensorboard as tb

    for name in [n for n in sys.modules if n.startswith("clu.metric_writers")]:
        monkeypatch.delitem(sys.modules, name)
    real_import = builtins.__import__

    def no_clu_writers(name, *args, **kwargs):
        if name.startswith("clu.metric_writers"):
            raise ImportError("No module named 'tensorflow'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_clu_writers)
    base = tb._metric_writer_base()
    monkeypatch.undo()
    assert base.__name__ == "MetricWriter" and base.__module__ == "clu.metric_writers.interface"
    assert sorted(base.__abstractmethods__) == sorted(
        ["write_summaries", "write_scalars", "write_images", "write_videos", "write_audios",
         "write_texts", "write_histograms", "write_hparams", "flush", "close"])
    # TensorBoardWriter implements every abstract method, so it can be instantiated
    assert not TensorBoardWriter.__abstractmethods__
