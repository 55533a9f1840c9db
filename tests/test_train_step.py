"""Train step: the packed-batch loss equals the model's own understanding/generation paths,
per-row image placement, the NaN guard, and host-side batch checks."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from unimm_jax.losses import cross_entropy_loss
from unimm_jax.models.janus import Janus
from unimm_jax.models.janus_config import num_image_tokens, num_understanding_tokens, tiny_janus_config
from unimm_jax.train import loop, step as step_lib
from unimm_jax.train.optimizer import default_config, make_optimizer
from unimm_jax.train.state import TrainState


def tiny_model():
    """16 px images: 4 understanding tokens, 16 codes; one layer everywhere (fast to compile)."""
    return tiny_janus_config(num_layers=1, vision_layers=1, image_size=16, vocab_size=64,
                             image_token_id=60, boi_token_id=61, eoi_token_id=62, pad_token_id=63)


def tiny_train_config(mesh=(1, 1, 1), steps=3, batch=8, **train):
    c = ml_collections.ConfigDict()
    c.kind, c.seed = "janus", 0
    c.mesh = dict(zip(("data", "fsdp", "tensor"), mesh))
    c.model = tiny_model()
    c.data = dict(source="synthetic", batch_size=batch, seq_len=48, max_images_per_row=1)
    c.optim = default_config(learning_rate=1e-3, warmup_steps=1, clip_norm=1.0, weight_decay=0.1)
    c.stage = loop.stage_config(3)
    c.train = loop.train_block(**{**dict(num_steps=steps, log_every=1, checkpoint_every=100, progress_bar=False,
                                         tensorboard=False), **train})
    return c


def _params(m, seed=0):
    from flax import linen as nn
    init = jax.jit(lambda k: nn.unbox(Janus(m).init(k, *loop._init_inputs(m), method=Janus.init_all))["params"])
    return init(jax.random.key(seed))


def test_gather_image_features_per_row_order():
    b, m, n, d, t = 2, 3, 2, 4, 10
    feats = np.random.RandomState(0).normal(size=(b, m, n, d)).astype(np.float32)
    ph = np.zeros((b, t), bool)
    ph[0, [1, 2, 5, 6]] = True  # two images in row 0
    ph[1, [3, 4]] = True  # one image in row 1 (slots 1, 2 unused)
    out = np.asarray(step_lib.gather_image_features(jnp.asarray(ph), jnp.asarray(feats)))
    np.testing.assert_array_equal(out[0, [1, 2, 5, 6]], feats[0, :2].reshape(-1, d))
    np.testing.assert_array_equal(out[1, [3, 4]], feats[1, 0])


def _jit_loss(m):
    return jax.jit(lambda p, b: step_lib.batch_loss(Janus(m), p, b))


def _one_row_batch(m, ids, is_img, loss_from, image=None):
    """A contract batch of one unpacked row: targets = ids shifted, loss on targets >= loss_from."""
    t = len(ids) - 1
    s = m.vision.image_size
    batch = {
        "input_ids": np.asarray([ids[:-1]], np.int32), "input_is_image": np.asarray([is_img[:-1]]),
        "target_ids": np.asarray([ids[1:]], np.int32), "target_is_image": np.asarray([is_img[1:]]),
        "loss_mask": (np.arange(t) >= loss_from - 1).astype(np.float32)[None],
        "task_ids": np.full((1, t), 2 if any(is_img) else 0, np.int32),
        "segment_ids": np.ones((1, t), np.int32), "positions": np.arange(t, dtype=np.int32)[None],
        "pixel_values": np.zeros((1, 1, s, s, 3), np.float32), "image_valid": np.zeros((1, 1), bool),
    }
    if image is not None:
        batch["pixel_values"][0, 0] = image
        batch["image_valid"][0, 0] = True
    return batch


@pytest.mark.slow  # compiles the model: ~1.5-2.5 min on the shared 2-core CPU
def test_understanding_loss_matches_model_logits():
    m = tiny_model()
    params = _params(m)
    n = num_understanding_tokens(m)
    tok = m.tokens
    rng = np.random.RandomState(1)
    image = rng.uniform(-1, 1, (m.vision.image_size,) * 2 + (3,)).astype(np.float32)
    prompt = [tok.bos_token_id, 5, 6, tok.boi_token_id] + [tok.image_token_id] * n + [tok.eoi_token_id, 7, 8]
    answer = [9, 10, tok.eos_token_id]
    ids = prompt + answer
    batch = _one_row_batch(m, ids, [False] * len(ids), len(prompt), image)
    step_lib.check_train_batch(batch, m)
    loss, aux = _jit_loss(m)(params, batch)
    logits = jax.jit(lambda p, i, x: Janus(m).apply({"params": p}, i, x, method=Janus.understanding_logits))(
        params, jnp.asarray([ids[:-1]]), jnp.asarray(image[None]))
    ref, count = cross_entropy_loss(logits, jnp.asarray(batch["target_ids"]), jnp.asarray(batch["loss_mask"]))
    np.testing.assert_allclose(float(loss), float(ref), rtol=1e-5)
    assert float(aux["tokens/understanding"]) == float(count) == len(answer)


@pytest.mark.slow  # compiles the model: ~1.5-2.5 min on the shared 2-core CPU
def test_generation_loss_matches_image_logits():
    m = tiny_model()
    params = _params(m)
    n = num_image_tokens(m)
    tok = m.tokens
    codes = list(np.random.RandomState(2).randint(0, m.vq.codebook_size, n))
    prompt = [tok.bos_token_id, 5, 6, 7, tok.boi_token_id]
    ids = prompt + codes
    is_img = [False] * len(prompt) + [True] * n
    batch = _one_row_batch(m, ids, is_img, len(prompt))
    loss, aux = _jit_loss(m)(params, batch)
    logits = jax.jit(lambda p, i, c: Janus(m).apply({"params": p}, i, c, method=Janus.image_logits))(
        params, jnp.asarray([prompt]), jnp.asarray([codes]))
    ref, _ = cross_entropy_loss(logits, jnp.asarray([codes]))
    np.testing.assert_allclose(float(loss), float(ref), rtol=1e-5)
    assert float(aux["tokens/generation"]) == n


@pytest.mark.slow  # compiles the model: ~1.5-2.5 min on the shared 2-core CPU
def test_nan_guard_keeps_state_and_flags_skip():
    c = tiny_train_config()
    m = c.model
    params = _params(m)
    tx = make_optimizer(c.optim, params, total_steps=10)
    batch = jax.tree.map(jnp.asarray, loop.synthetic_batch(m, c.data, 0, 0))
    state = TrainState.create(params, tx, jax.random.key(0))
    train_step = jax.jit(lambda s, b: step_lib.train_step(s, b, module=Janus(m), tx=tx))
    good, metrics = train_step(state, batch)
    assert float(metrics["skipped"]) == 0 and int(good.step) == 1
    bad_params = jax.tree.map(lambda x: x, params)
    bad_params["gen_head"]["vision_head"]["bias"] = bad_params["gen_head"]["vision_head"]["bias"] * jnp.nan
    bad = TrainState.create(bad_params, tx, jax.random.key(0))
    out, metrics = train_step(bad, batch)
    assert float(metrics["skipped"]) == 1 and not np.isfinite(float(metrics["loss"]))
    assert int(out.step) == 0
    for a, b in zip(jax.tree.leaves(out.opt_state), jax.tree.leaves(bad.opt_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(out.params["llm"]["embed"]["embedding"]),
                                  np.asarray(bad.params["llm"]["embed"]["embedding"]))


def test_bad_batches_are_named():
    c = tiny_train_config()
    m = c.model
    good = loop.synthetic_batch(m, c.data, 0, 0)
    step_lib.check_train_batch(good, m, batch_divisor=4)
    with pytest.raises(ValueError, match="split 3 ways"):
        step_lib.check_train_batch(good, m, batch_divisor=3)
    corrupt = {k: v.copy() for k, v in good.items()}
    corrupt["pixel_values"][0, 0, 1, 1, 0] = np.nan
    with pytest.raises(ValueError, match=r"pixel_values\[0, 0\] is a corrupt image"):
        step_lib.check_train_batch(corrupt, m)
    missing = {k: v.copy() for k, v in good.items()}
    missing["image_valid"][0, 0] = False
    with pytest.raises(ValueError, match="row 0 holds 4 image placeholders but 0 valid"):
        step_lib.check_train_batch(missing, m)
    oob = {k: v.copy() for k, v in good.items()}
    oob["input_ids"][1, 0] = 999
    with pytest.raises(ValueError, match=r"input_ids.*\[1, 0\] = 999 is outside"):
        step_lib.check_train_batch(oob, m)


def test_task_weights_average_per_task_means(monkeypatch):
    """task_weights turns the token-weighted mean into a weighted mean of per-task means (a hand
    computation on fixed per-token losses); None keeps the token-weighted mean; an absent task
    drops out of the normalisation."""
    ce = np.array([[1.0, 2.0, 3.0, 0.0], [4.0, 4.0, 4.0, 8.0]], np.float32)
    task = np.array([[0, 0, 2, 2], [2, 2, 2, 2]], np.int32)
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], np.float32)
    monkeypatch.setattr(step_lib, "per_token_losses",
                        lambda module, params, batch: (jnp.asarray(ce), jnp.zeros_like(ce)))
    batch = {"loss_mask": mask, "task_ids": task}
    token_mean, _ = step_lib.batch_loss(None, None, batch)
    np.testing.assert_allclose(token_mean, (1 + 2 + 3 + 4 + 4 + 4 + 8) / 7, rtol=1e-6)
    und, gen = (1 + 2) / 2, (3 + 4 + 4 + 4 + 8) / 5
    weighted, _ = step_lib.batch_loss(None, None, batch, (3.0, 1.0, 1.0))
    np.testing.assert_allclose(weighted, (3 * und + 1 * gen) / 4, rtol=1e-6)  # text absent: not counted
    only_gen, _ = step_lib.batch_loss(None, None, batch, (0.0, 0.0, 1.0))
    np.testing.assert_allclose(only_gen, gen, rtol=1e-6)


def test_task_weight_vector_orders_and_checks():
    assert loop.task_weight_vector({"generation": 2, "understanding": 1}) == (1.0, 0.0, 2.0)
    with pytest.raises(ValueError, match="unknown task"):
        loop.task_weight_vector({"captions": 1})
    with pytest.raises(ValueError, match="positive sum"):
        loop.task_weight_vector({"text": 0})


def _fake_token_losses(monkeypatch):
    """per_token_losses -> ce = (w_task * x)^2 per token, a function of params and the batch's "x"."""
    def fake(module, params, batch):
        ce = jnp.square(params["w"][batch["task_ids"]] * batch["x"])
        return ce, jnp.zeros_like(ce)

    monkeypatch.setattr(step_lib, "per_token_losses", fake)


@pytest.mark.parametrize("task_weights", [None, (2.0, 0.25, 1.0)])
def test_accumulated_step_is_the_whole_batch_step(monkeypatch, task_weights):
    """grad_accum_steps k: the k micro-batches' summed gradients, normalised by the whole batch's
    token counts, give exactly the whole batch's loss, gradient and update, also when the
    micro-batches hold different numbers of loss tokens per task (where a mean of micro-batch
    means, the old accumulation, is off: checked below so the test can tell them apart)."""
    _fake_token_losses(monkeypatch)
    rng = np.random.RandomState(0)
    b, t = 8, 6
    task = rng.randint(0, 3, (b, t)).astype(np.int32)
    task[::2, :] = 2  # micro-batch 0 of k=2 (rows 0, 2, ...) is all generation
    mask = (rng.uniform(size=(b, t)) < 0.7).astype(np.float32)
    mask[::2, 3:] = 0  # ... and holds fewer loss tokens, with smaller losses
    x = rng.normal(size=(b, t)).astype(np.float32) * np.where(np.arange(b) % 2, 2.0, 0.5)[:, None]
    batch = {"loss_mask": mask, "task_ids": task, "x": x}
    params = {"w": jnp.asarray([0.5, -1.5, 2.0], jnp.float32)}
    tx = optax.sgd(0.1)
    run = jax.jit(lambda s, bt, k: step_lib.train_step(s, bt, module=None, tx=tx, grad_accum_steps=k,
                                                       task_weights=task_weights), static_argnums=2)
    state = TrainState.create(params, tx, jax.random.key(0))
    whole, m1 = run(state, batch, 1)
    for k in (2, 4):
        acc, mk = run(state, batch, k)
        for key in ("loss", "grad_norm", "tokens", "loss/understanding", "loss/generation"):
            np.testing.assert_allclose(float(mk[key]), float(m1[key]), rtol=1e-6, err_msg=f"k={k} {key}")
        np.testing.assert_allclose(np.asarray(acc.params["w"]), np.asarray(whole.params["w"]), rtol=1e-6)
        assert int(acc.step) == int(whole.step) == 1

    # The micro-batches' own means (rows j::2) average to something else: the test discriminates.
    micro_means = [float(step_lib.batch_loss(None, params, {k: v[j::2] for k, v in batch.items()}, task_weights)[0])
                   for j in range(2)]
    assert abs(np.mean(micro_means) - float(m1["loss"])) > 0.1 * float(m1["loss"]), (micro_means, float(m1["loss"]))


@pytest.mark.parametrize("stage", [1, 2])
def test_trainer_step_does_not_differentiate_frozen_params(tmp_path, stage):
    """Janus-Pro stages 1 and 2 through the Trainer: its step (frozen params under stop_gradient)
    makes exactly the update of the same step differentiating everything, leaves the frozen
    params as they were, and reports the trainable gradients' norm (the clipped one), which is
    smaller than the norm over every param's gradient."""
    from unimm_jax.train.optimizer import trainable_mask

    c = tiny_train_config()
    c.stage = loop.stage_config(stage)
    tr = loop.Trainer(c, tmp_path, devices=jax.devices()[:1])
    batch = next(loop.make_data_iterator(c))
    before = jax.tree.map(np.asarray, tr.state.params)
    everything = jax.jit(lambda s, b: step_lib.train_step(s, b, module=tr.module, tx=tr.tx))
    ref_state, ref = everything(jax.tree.map(jnp.copy, tr.state), batch)  # tr.step donates its state
    m = tr.step(batch)
    mask = trainable_mask(before, tr.trainable)
    for path_mask, new, old, want in zip(jax.tree.leaves(mask), jax.tree.leaves(tr.state.params),
                                         jax.tree.leaves(before), jax.tree.leaves(ref_state.params)):
        if path_mask:
            np.testing.assert_allclose(np.asarray(new), np.asarray(want), rtol=1e-5, atol=1e-7)
        else:
            np.testing.assert_array_equal(np.asarray(new), old)
    np.testing.assert_allclose(float(m["loss"]), float(ref["loss"]), rtol=1e-6)
    assert float(m["grad_norm"]) < float(ref["grad_norm"])
