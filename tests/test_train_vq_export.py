"""VQ trainer (loss decreases, output dir round-trips, config mismatch is named) and export
(W/model loads with load_pretrained and carries tokenizer.json)."""
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from test_train_step import _params, tiny_model
from unimm_jax.train import vq_trainer
from unimm_jax.train.export import export_model


def _vq_cfg():
    m = tiny_model()
    m.vq.base_channels, m.vq.norm_groups, m.vq.latent_channels = 8, 4, 8
    return m.vq


def _images(n=4, s=16, seed=0):
    """Flat coloured squares on white: what the shapes-world VQ sees, at 16 px."""
    rng = np.random.default_rng(seed)
    while True:
        x = np.ones((n, s, s, 3), np.float32)
        for i in range(n):
            a, b = rng.integers(0, s // 2, 2)
            x[i, a:a + 6, b:b + 6] = rng.uniform(-1, 1, 3)
        yield {"images": x}


@pytest.mark.slow  # compiles the VQ's forward+backward: ~1 min on the shared 2-core CPU
def test_train_vq_learns_and_round_trips(tmp_path):
    vq = _vq_cfg()
    tok = vq_trainer.vq_train_block(num_steps=30, batch_size=4, learning_rate=3e-3, warmup_steps=2,
                                    restart_every=10, log_every=10)
    out = vq_trainer.train_vq(vq, tok, None, tmp_path / "tok", images_iter=_images())
    lines = [l for l in open(tmp_path / "tok" / "metrics.jsonl")]
    import json
    losses = [json.loads(l)["loss"] for l in lines]
    assert losses[-1] < losses[0]
    cfg, params = vq_trainer.load_vq(tmp_path / "tok")
    vq_trainer.check_vq_matches(vq, cfg)
    for a, b in zip(jax.tree.leaves(out["params"]), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # a second call finds the trained tokenizer and does not retrain
    again = vq_trainer.train_vq(vq, tok, None, tmp_path / "tok", images_iter=None)
    assert again["metrics"] == {}


def test_vq_config_mismatch_and_missing_dir_are_named(tmp_path):
    a = _vq_cfg()
    b = ml_collections.ConfigDict(a.to_dict())
    b.codebook_size = 32
    with pytest.raises(ValueError, match=r"differs from the trained tokenizer's config in \['codebook_size'\]"):
        vq_trainer.check_vq_matches(a, b)
    with pytest.raises(FileNotFoundError, match="is not a trained VQ tokenizer"):
        vq_trainer.load_vq(tmp_path)


def test_export_loads_with_load_pretrained(tmp_path):
    import unimm_jax as uj
    from unimm_jax.data.shapes_vocab import build_shapes_tokenizer
    from unimm_jax.data.text_tokenizer import load_text_tokenizer

    m = tiny_model()
    params = _params(m)
    tok = build_shapes_tokenizer()
    export_model(m, params, tok, tmp_path / "model")
    assert os.path.isfile(tmp_path / "model" / "tokenizer.json")
    loaded = uj.load_pretrained(str(tmp_path))  # a workdir resolves to W/model
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert load_text_tokenizer(loaded.checkpoint_dir).encode("a red circle") == tok.encode("a red circle")


def test_vq_loss_foreground_weight_matches_hand_computation():
    """The pixel term is mean(w * (|e| + e^2)) / mean(w) with w = 1 + fg on non-white pixels;
    fg = 0 is the plain mean."""
    import jax.numpy as jnp
    from unimm_jax.models.vq import VQModel

    vq = _vq_cfg()
    params = vq_trainer.init_vq(vq, 0)
    x = next(_images(2))["images"]
    m = VQModel(vq)
    x_hat = np.asarray(m.apply({"params": params}, jnp.asarray(x),
                               method=lambda mm, im: mm.decode_latents(mm.quantize(mm.quant_conv(mm.encoder(im))).quantized)))
    err = np.abs(x_hat - x) + np.square(x_hat - x)
    fg = (np.abs(x - 1.0).max(-1, keepdims=True) > 0.05).astype(np.float32)
    for weight in (0.0, 4.0):
        loss, aux = vq_trainer.vq_loss(params, jnp.asarray(x), vq, foreground_weight=weight)
        w = 1.0 + weight * fg
        want = (w * err).mean() / w.mean() + float(aux["codebook"]) + float(aux["commit"])
        np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert 0.0 < fg.mean() < 1.0  # the images really have both kinds of pixels


def test_constant_patch_loss_by_hand():
    """Mean |u_i - u_j|^2 over pairs of different constant patches of the same colour (u the unit
    latents); patches with an edge inside, or of another colour, do not count."""
    import jax.numpy as jnp

    f = 2  # 4 x 4 pixels, a 2 x 2 latent grid per image
    x = np.ones((2, 4, 4, 3), np.float32)  # white
    x[0, 0:2, 2:4] = [1.0, -1.0, -1.0]  # image 0, patch (0, 1): constant red
    x[1, 2:4, 2:4] = 0.5
    x[1, 3, 3] = -1.0  # image 1, patch (1, 1): not constant
    z = np.random.default_rng(0).normal(size=(2, 2, 2, 3)).astype(np.float32)
    u = z / np.linalg.norm(z, axis=-1, keepdims=True)
    white = [(0, 0, 0), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0)]  # (image, row, col)
    pairs = [(a, b) for a in white for b in white if a != b]
    want = np.mean([np.sum((u[a] - u[b]) ** 2) for a, b in pairs])
    got = float(vq_trainer.constant_patch_loss(jnp.asarray(x), jnp.asarray(z)))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert f == x.shape[1] // z.shape[1]
    same = np.broadcast_to(u[0, 0, 0], z.shape).copy()  # every latent equal: nothing to pull
    assert float(vq_trainer.constant_patch_loss(jnp.asarray(x), jnp.asarray(same))) < 1e-6


def test_restart_merges_codes_closer_than_merge_distance():
    """With merge_distance, a used code next to a more used one is restarted like a dead one;
    the more used code and far codes stay. Without it only unused codes move."""
    book = np.array([[1.0, 0.0], [0.999, 0.045], [0.0, 1.0], [-1.0, 0.0]], np.float32)  # 0 and 1: ~0.045 apart
    params = {"codebook": {"embedding": book}}
    usage = np.array([50, 10, 5, 0])
    z = np.array([[0.6, -0.8], [-0.6, -0.8]], np.float32)
    rng = lambda: np.random.default_rng(0)
    same, n = vq_trainer._restart_dead_codes(params, usage, z, rng())
    assert n == 1 and np.array_equal(np.asarray(same["codebook"]["embedding"])[:3], book[:3])
    merged, n = vq_trainer._restart_dead_codes(params, usage, z, rng(), merge_distance=0.1)
    new = np.asarray(merged["codebook"]["embedding"])
    assert n == 2 and np.array_equal(new[[0, 2]], book[[0, 2]])
    assert any(np.allclose(new[1], zz) for zz in z) and any(np.allclose(new[3], zz) for zz in z)


def _grain_images(n_images=16, batch=4, s=16):
    """A checkpointable (Grain) iterator of image batches, like pipeline.vq_image_dataset."""
    import grain

    pool = list(np.concatenate([next(_images(n_images, s, seed=1))["images"]]))
    ds = grain.MapDataset.source(pool).shuffle(seed=3).repeat().to_iter_dataset()
    return iter(ds.batch(batch, drop_remainder=True).map(lambda x: {"images": x}))


@pytest.mark.slow  # two VQ trainings + orbax checkpoints: ~1-2 min on the shared 2-core CPU
def test_train_vq_resumes_exactly(tmp_path):
    """6 steps straight == 3 steps, stop (checkpoint), resume to 6: same params and code usage
    (dead-code restarts at step 2 and 4 included); a stopped run has no params dir yet."""
    vq = _vq_cfg()
    tok = vq_trainer.vq_train_block(num_steps=6, batch_size=4, learning_rate=3e-3, warmup_steps=2,
                                    restart_every=2, log_every=1, checkpoint_every=100)
    straight = vq_trainer.train_vq(vq, tok, None, tmp_path / "a", images_iter=_grain_images())
    first = vq_trainer.train_vq(vq, tok, None, tmp_path / "b", images_iter=_grain_images(), stop_after=3)
    assert first["stopped_early"] and first["params"] is None
    assert not (tmp_path / "b" / vq_trainer.PARAMS_DIR).exists()
    resumed = vq_trainer.train_vq(vq, tok, None, tmp_path / "b", images_iter=_grain_images())
    assert not resumed["stopped_early"]
    for a, b in zip(jax.tree.leaves(straight["params"]), jax.tree.leaves(resumed["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    import json
    la = [json.loads(l)["loss"] for l in open(tmp_path / "a" / "metrics.jsonl")]
    lb = [json.loads(l)["loss"] for l in open(tmp_path / "b" / "metrics.jsonl")]
    np.testing.assert_allclose(la, lb, rtol=1e-6)


def test_unit_distance2_is_the_squared_distance_of_unit_rows():
    rng = np.random.RandomState(0)
    u = rng.normal(size=(5, 8)).astype(np.float32)
    v = rng.normal(size=(3, 8)).astype(np.float32)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    want = ((u[:, None] - v[None]) ** 2).sum(-1)
    got_np = vq_trainer.unit_distance2(u, v)
    assert isinstance(got_np, np.ndarray)
    np.testing.assert_allclose(got_np, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(vq_trainer.unit_distance2(jnp.asarray(u), jnp.asarray(v))), want,
                               rtol=1e-5, atol=1e-6)
    assert (vq_trainer.unit_distance2(u, u).diagonal() >= 0).all()  # rounding never goes negative
