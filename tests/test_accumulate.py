"""train/accumulate.py: the strided micro-batch split and the summed value-and-gradient."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm_jax.train.accumulate import accumulated_value_and_grad, split_micro_batches, stop_frozen_gradients


def test_split_is_strided_and_keeps_trailing_dims():
    x = np.arange(12 * 2).reshape(12, 2)
    out = np.asarray(split_micro_batches({"x": jnp.asarray(x)}, 3)["x"])
    assert out.shape == (3, 4, 2)
    for j in range(3):
        np.testing.assert_array_equal(out[j], x[j::3])
    with pytest.raises(ValueError, match="does not split into 5 micro-batches.*multiple of optim.grad_accum_steps=5"):
        split_micro_batches({"x": jnp.zeros((12, 2))}, 5)


def test_sums_over_micro_batches_equal_the_whole_batch():
    """A loss additive over rows (each row's share normalised by the whole batch): the summed loss,
    aux and gradients of k micro-batches equal one pass over the whole batch; j reaches the loss."""
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.normal(size=(12, 5)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(12,)), jnp.float32)
    params = {"w": jnp.asarray(rng.normal(size=(5,)), jnp.float32), "b": jnp.float32(0.3)}
    n = x.shape[0]

    def loss(p, mb, j):
        err = mb["x"] @ p["w"] + p["b"] - mb["y"]
        return jnp.sum(err ** 2) / n, {"rows": jnp.float32(mb["x"].shape[0]), "j": j.astype(jnp.float32)}

    (l1, a1), g1 = accumulated_value_and_grad(loss, params, {"x": x, "y": y}, 1)
    assert float(a1["j"]) == 0 and float(a1["rows"]) == 12
    for k in (2, 3, 4):
        (lk, ak), gk = jax.jit(lambda p, b: accumulated_value_and_grad(loss, p, b, k))(params, {"x": x, "y": y})
        np.testing.assert_allclose(float(lk), float(l1), rtol=1e-6)
        assert float(ak["rows"]) == 12 and float(ak["j"]) == sum(range(k))
        for a, b in zip(jax.tree.leaves(gk), jax.tree.leaves(g1)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_frozen_params_get_zero_gradients_and_are_not_differentiated():
    """trainable=False leaves: exactly zero gradients, the trainable ones as without a mask (k 1 and
    2), and the backward pass into a subtree only the frozen leaves feed is gone from the program:
    the compiled FLOPs drop by at least the frozen 256 x 256 weight's gradient product."""
    rng = np.random.RandomState(1)
    x = jnp.asarray(rng.normal(size=(8, 256)), jnp.float32)
    params = {"tower": jnp.asarray(rng.normal(size=(256, 256)) / 16, jnp.float32),
              "head": jnp.asarray(rng.normal(size=(256,)), jnp.float32)}

    def loss(p, mb, j):
        return jnp.sum(jnp.tanh(mb["x"] @ p["tower"]) @ p["head"]) / 8, {}

    frozen = {"tower": False, "head": True}
    for k in (1, 2):
        _, g_all = accumulated_value_and_grad(loss, params, {"x": x}, k)
        _, g = jax.jit(lambda p, b: accumulated_value_and_grad(loss, p, b, k, trainable=frozen))(params, {"x": x})
        np.testing.assert_array_equal(np.asarray(g["tower"]), 0.0)
        assert np.abs(np.asarray(g_all["tower"])).max() > 1e-3  # it would have had a gradient
        np.testing.assert_allclose(np.asarray(g["head"]), np.asarray(g_all["head"]), rtol=1e-6)

    def flops(trainable):
        f = jax.jit(lambda p, b: accumulated_value_and_grad(loss, p, b, 1, trainable=trainable)[1])
        return f.lower(params, {"x": x}).compile().cost_analysis()["flops"]

    # forward 2 x 8 x 256 x 256 for the tower; its weight gradient is another such product
    assert flops(None) - flops(frozen) >= 2 * 8 * 256 * 256
    assert stop_frozen_gradients(params, None) is params
