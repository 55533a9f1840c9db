"""Losses against hand computations in numpy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm_jax import losses


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_cross_entropy_masked_mean():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 5, 7)).astype(np.float32) * 3
    targets = rng.integers(0, 7, (2, 5))
    mask = np.array([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], np.float32)
    targets[mask == 0] = -100  # ignored positions may hold out-of-range ids
    loss, n = losses.cross_entropy_loss(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32), targets, mask)
    lp = _np_log_softmax(logits.astype(np.float64))
    picked = np.where(mask > 0, np.take_along_axis(lp, np.maximum(targets, 0)[..., None], -1)[..., 0], 0.0)
    want = -picked.sum() / mask.sum()
    assert float(n) == 7.0
    # bf16-rounded logits: compare against the same rounding
    lp_b = _np_log_softmax(np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32), np.float64))
    want_b = -np.where(mask > 0, np.take_along_axis(lp_b, np.maximum(targets, 0)[..., None], -1)[..., 0], 0).sum() / 7
    np.testing.assert_allclose(float(loss), want_b, rtol=1e-5)
    loss32, _ = losses.cross_entropy_loss(logits, targets, mask)
    np.testing.assert_allclose(float(loss32), want, rtol=1e-5)
    assert loss.dtype == jnp.float32


def test_cross_entropy_no_mask_and_empty_mask():
    logits = jnp.array([[[0.0, np.log(3.0)]]])  # p = [1/4, 3/4]
    loss, n = losses.cross_entropy_loss(logits, jnp.array([[1]]))
    np.testing.assert_allclose(float(loss), -np.log(0.75), rtol=1e-6)
    assert float(n) == 1
    loss, n = losses.cross_entropy_loss(logits, jnp.array([[1]]), jnp.zeros((1, 1)))
    assert float(loss) == 0.0 and float(n) == 0.0  # no NaN from 0/0
    with pytest.raises(ValueError, match="must agree"):
        losses.cross_entropy_loss(logits, jnp.zeros((1, 2), jnp.int32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_token_cross_entropy_value_and_gradient(dtype):
    """Values against numpy; the custom gradient against (softmax - onehot) * g in float64 and
    against autodiff of the plain formula, in the logits' dtype."""
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.standard_normal((3, 4, 11)) * 4, dtype)
    targets = jnp.asarray(rng.integers(0, 11, (3, 4)), jnp.int32)
    g = jnp.asarray(rng.standard_normal((3, 4)), jnp.float32)
    x = np.asarray(logits.astype(jnp.float32), np.float64)
    lp = _np_log_softmax(x)
    ce = losses.token_cross_entropy(logits, targets)
    assert ce.dtype == jnp.float32 and ce.shape == (3, 4)
    np.testing.assert_allclose(np.asarray(ce), -np.take_along_axis(lp, np.asarray(targets)[..., None], -1)[..., 0], rtol=1e-5, atol=1e-5)

    grad = jax.grad(lambda l: jnp.sum(losses.token_cross_entropy(l, targets) * g))(logits)
    assert grad.dtype == dtype
    want = (np.exp(lp) - np.eye(11)[np.asarray(targets)]) * np.asarray(g)[..., None]
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(grad, np.float64), want, atol=tol, rtol=tol)

    def plain(l):
        l32 = l.astype(jnp.float32)
        picked = jnp.take_along_axis(l32, targets[..., None], -1)[..., 0]
        return jnp.sum((jax.nn.logsumexp(l32, -1) - picked) * g)

    np.testing.assert_allclose(np.asarray(grad, np.float32), np.asarray(jax.grad(plain)(logits), np.float32),
                               atol=tol, rtol=tol)


def test_sample_flow_timesteps():
    key = jax.random.PRNGKey(0)
    u = np.asarray(losses.sample_flow_timesteps(key, (20000,)))
    assert u.dtype == np.float32 and u.min() >= 0 and u.max() <= 1
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.005
    ln = np.asarray(losses.sample_flow_timesteps(key, (20000,), "logit_normal", mean=0.5, std=0.8))
    assert ln.min() > 0 and ln.max() < 1
    logit = np.log(ln / (1 - ln))
    assert abs(logit.mean() - 0.5) < 0.02 and abs(logit.std() - 0.8) < 0.02
    with pytest.raises(ValueError, match="unknown distribution"):
        losses.sample_flow_timesteps(key, (2,), "beta")


def test_rectified_flow_loss_and_interpolation():
    rng = np.random.default_rng(1)
    x, z0, v = (rng.standard_normal((3, 4, 4, 2)).astype(np.float32) for _ in range(3))
    t = np.array([0.0, 0.25, 1.0], np.float32)
    zt = np.asarray(losses.flow_interpolate(x, z0, t))
    np.testing.assert_allclose(zt[0], z0[0], atol=1e-6)  # t=0 is noise
    np.testing.assert_allclose(zt[2], x[2], atol=1e-6)  # t=1 is data
    np.testing.assert_allclose(zt[1], 0.25 * x[1] + 0.75 * z0[1], atol=1e-6)
    want = ((v - (x - z0)) ** 2).mean()
    np.testing.assert_allclose(float(losses.rectified_flow_loss(v, x, z0)), want, rtol=1e-5)
    # the exact velocity gives zero loss
    assert float(losses.rectified_flow_loss(x - z0, x, z0)) == 0.0
    # per-sample mask: only rows 0 and 2
    m = np.array([1.0, 0.0, 1.0], np.float32)
    want_m = ((v - (x - z0)) ** 2)[[0, 2]].mean()
    np.testing.assert_allclose(float(losses.rectified_flow_loss(v, x, z0, m)), want_m, rtol=1e-5)
    with pytest.raises(ValueError, match="must match"):
        losses.rectified_flow_loss(v[:2], x, z0)


def test_repa_loss_value_and_stop_gradient():
    rng = np.random.default_rng(2)
    p, f = rng.standard_normal((2, 3, 8)).astype(np.float32), rng.standard_normal((2, 3, 8)).astype(np.float32)
    cos = (p * f).sum(-1) / (np.linalg.norm(p, axis=-1) * np.linalg.norm(f, axis=-1))
    np.testing.assert_allclose(float(losses.repa_loss(p, f)), -cos.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(losses.repa_loss(p, 2.5 * p)), -1.0, rtol=1e-6)
    mask = np.array([[1, 0, 1], [0, 0, 1]], np.float32)
    np.testing.assert_allclose(float(losses.repa_loss(p, f, mask)), -(cos * mask).sum() / 3, rtol=1e-5)
    g_target = jax.grad(lambda tgt: losses.repa_loss(jnp.asarray(p), tgt))(jnp.asarray(f))
    assert float(jnp.abs(g_target).max()) == 0.0
    g_pred = jax.grad(lambda pr: losses.repa_loss(pr, jnp.asarray(f)))(jnp.asarray(p))
    assert float(jnp.abs(g_pred).max()) > 0.0


def test_multiscale_alignment_loss():
    rng = np.random.default_rng(3)
    preds = {s: rng.standard_normal((2, s * s, 5)).astype(np.float32) for s in (4, 8, 16)}
    tgts = {s: rng.standard_normal((2, s * s, 5)).astype(np.float32) for s in (4, 8, 16)}
    per = {s: ((preds[s] - tgts[s]) ** 2).mean() for s in preds}
    loss, got = losses.multiscale_alignment_loss(preds, tgts, return_per_scale=True)
    np.testing.assert_allclose(float(loss), np.mean(list(per.values())), rtol=1e-5)
    for s in per:
        np.testing.assert_allclose(float(got[s]), per[s], rtol=1e-5)
    with pytest.raises(ValueError, match="scales"):
        losses.multiscale_alignment_loss(preds, {4: tgts[4]})
    with pytest.raises(ValueError, match="scale 8"):
        losses.multiscale_alignment_loss(preds, {**tgts, 8: tgts[8][:, :3]})


def test_embedding_regression_loss():
    rng = np.random.default_rng(4)
    p, t = rng.standard_normal((2, 9, 6)).astype(np.float32), rng.standard_normal((2, 9, 6)).astype(np.float32)
    mse = ((p - t) ** 2).mean()
    cos = ((p * t).sum(-1) / (np.linalg.norm(p, axis=-1) * np.linalg.norm(t, axis=-1))).mean()
    np.testing.assert_allclose(float(losses.embedding_regression_loss(p, t)), 0.5 * mse + 0.5 * (1 - cos), rtol=1e-5)
    assert abs(float(losses.embedding_regression_loss(t, t))) < 1e-6
    mask = np.array([1.0, 0.0], np.float32)
    mse_m = ((p[0] - t[0]) ** 2).mean()
    cos_m = ((p[0] * t[0]).sum(-1) / (np.linalg.norm(p[0], axis=-1) * np.linalg.norm(t[0], axis=-1))).mean()
    got = float(losses.embedding_regression_loss(p, t, mask))
    np.testing.assert_allclose(got, 0.5 * mse_m + 0.5 * (1 - cos_m), rtol=1e-5)
