"""Muon (`optim.optimizer="muon"`): which leaves it takes, its update against the SVD polar factor,
AdamW on the rest, config errors, and training with it (resume exact, sharded == 1 device)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from optax.contrib import MuonDimensionNumbers as D

from test_train_loop import _losses
from test_train_step import tiny_train_config
from unimm_jax.train import loop
from unimm_jax.train.muon import describe, muon_dimension_numbers, muon_leaves
from unimm_jax.train.optimizer import default_config, make_optimizer, path_str


@pytest.mark.parametrize("path, axes, expected", [
    ("llm/layers/attn/q/kernel", ("layers", "embed", "heads", "head_dim"), D((1,), (2, 3))),
    ("llm/layers/attn/o/kernel", ("layers", "heads", "head_dim", "embed"), D((1, 2), (3,))),
    ("llm/layers/mlp/up/kernel", ("layers", "embed", "mlp"), D((1,), (2,))),
    ("llm/layers/mlp/down/kernel", ("layers", "mlp", "embed"), D((1,), (2,))),
    ("aligner/dense_1/kernel", ("mlp", "embed"), D((0,), (1,))),
    ("gen_head/proj_out/kernel", ("embed", "mlp"), D((0,), (1,))),
    ("llm/lm_head/kernel", ("embed", "vocab"), None),  # output heads stay on AdamW
    ("gen_head/vision_head/kernel", ("mlp", "codebook"), None),
    ("llm/embed/embedding", ("vocab", "embed"), None),  # embeddings too
    ("vision/pos_embed", ("image_positions", "embed"), None),
    ("vision/patch_embed/kernel", ("conv_height", "conv_width", "conv_in", "embed"), None),
    ("llm/layers/attn_norm/scale", ("layers", "norm"), None),
    ("aligner/dense_0/bias", ("mlp",), None),
    ("llm/layers/tiny/kernel", ("layers", "embed"), None),  # one matrix axis: a vector per layer
])
def test_dimension_numbers_rule(path, axes, expected):
    assert muon_dimension_numbers(tuple(path.split("/")), P(*axes), len(axes)) == expected


def test_rank_mismatch_and_missing_axes_are_errors():
    with pytest.raises(ValueError, match="do not match its rank 3"):
        muon_dimension_numbers(("a", "kernel"), P("embed", "mlp"), 3)
    params = {"a": {"kernel": jnp.zeros((4, 4))}, "b": {"kernel": jnp.zeros((4, 4))}}
    with pytest.raises(ValueError, match="no logical axes for parameter 'b/kernel'"):
        muon_leaves(params, {"a": {"kernel": P("embed", "mlp")}})


def test_describe_counts_muon_and_adamw_leaves():
    assert describe({("a", "kernel"): D(), ("b", "kernel"): D(), ("c", "bias"): None}) == \
        "optimizer: Muon on 2 weight matrices, AdamW on the other 1 leaves"


def _layered():
    """Stacked [L=2, in=8, heads=2, hd=3] and [L=2, heads=2, hd=3, out=8] kernels, a head, a bias."""
    r = np.random.RandomState(0)
    f = lambda *s: jnp.asarray(r.normal(size=s), jnp.float32)
    params = {"q": {"kernel": f(2, 8, 2, 3)}, "o": {"kernel": f(2, 2, 3, 8)},
              "head": {"kernel": f(8, 5)}, "norm": {"scale": f(8)}}
    axes = {"q": {"kernel": P("layers", "embed", "heads", "head_dim")},
            "o": {"kernel": P("layers", "heads", "head_dim", "embed")},
            "head": {"kernel": P("embed", "vocab")}, "norm": {"scale": P("norm")}}
    return params, axes


def _polar(m):
    u, _, vt = np.linalg.svd(m, full_matrices=False)
    return u @ vt


def test_update_is_each_layers_polar_factor_scaled_to_the_rms():
    """One step from zero momentum: every layer's [fan_in, fan_out] update is -lr * rms *
    sqrt(max(fan_in, fan_out)) * (approximately) U V^T of that layer's gradient."""
    params, axes = _layered()
    cfg = default_config(learning_rate=0.5, optimizer="muon", muon_rms=0.2)
    tx = make_optimizer(cfg, params, total_steps=10, logical_axes=axes)
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(3), p.shape), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    for name, to_matrix in (("q", lambda x: x.reshape(8, 6)),
                            ("o", lambda x: x.reshape(6, 8))):
        for layer in range(2):
            g = to_matrix(np.asarray(grads[name]["kernel"][layer]))
            u = to_matrix(np.asarray(updates[name]["kernel"][layer])) / (-0.5 * 0.2 * np.sqrt(8))
            cos = np.sum(u * _polar(g)) / np.linalg.norm(u) / np.linalg.norm(_polar(g))
            assert cos > 0.95, (name, layer, cos)
            sv = np.linalg.svd(u, compute_uv=False)
            assert 0.5 < sv.min() and sv.max() < 1.3, (name, layer, sv)  # Newton-Schulz's band


def test_other_leaves_take_the_same_adamw_update():
    params, axes = _layered()
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(4), p.shape), params)
    out = {}
    for opt in ("adamw", "muon"):
        tx = make_optimizer(default_config(learning_rate=1e-2, weight_decay=0.1, optimizer=opt), params,
                            total_steps=10, logical_axes=axes)
        state = tx.init(params)
        for _ in range(2):
            u, state = tx.update(grads, state, params)
        out[opt] = u
    for leaf in (("head", "kernel"), ("norm", "scale")):
        np.testing.assert_array_equal(out["muon"][leaf[0]][leaf[1]], out["adamw"][leaf[0]][leaf[1]])
    assert not np.allclose(out["muon"]["q"]["kernel"], out["adamw"]["q"]["kernel"])


def test_weight_decay_and_frozen_leaves():
    params, axes = _layered()
    zero = jax.tree.map(jnp.zeros_like, params)
    tx = make_optimizer(default_config(learning_rate=0.1, weight_decay=0.5, optimizer="muon"), params,
                        lambda path, leaf: path[0] != "o", total_steps=10, logical_axes=axes)
    state = tx.init(params)
    u, _ = tx.update(zero, state, params)
    # zero gradient: the Muon matrix moves by the decoupled decay alone, -lr * wd * W
    np.testing.assert_allclose(u["q"]["kernel"], -0.1 * 0.5 * np.asarray(params["q"]["kernel"]), rtol=1e-5)
    np.testing.assert_array_equal(u["o"]["kernel"], 0.0)  # frozen
    np.testing.assert_array_equal(u["norm"]["scale"], 0.0)  # not decayed
    assert not any(x.size == params["o"]["kernel"].size for x in jax.tree.leaves(state)
                   if getattr(x, "shape", None) == params["o"]["kernel"].shape)


@pytest.mark.parametrize("overrides, match", [
    (dict(optimizer="sgd"), r"optimizer='sgd' is not one of \('adamw', 'muon'\)"),
    (dict(optimizer="muon", muon_beta=1.0), "muon_beta=1.0 must be in"),
    (dict(optimizer="muon", muon_ns_steps=0), "muon_ns_steps=0 must be an integer >= 1"),
    (dict(optimizer="muon", muon_rms=0.0), "muon_rms=0.0 must be a positive number"),
])
def test_bad_muon_config(overrides, match):
    params, axes = _layered()
    with pytest.raises(ValueError, match=match):
        make_optimizer(default_config(**overrides), params, total_steps=10, logical_axes=axes)


def test_muon_needs_logical_axes_and_a_matrix():
    params, axes = _layered()
    with pytest.raises(ValueError, match="needs the model's logical axes"):
        make_optimizer(default_config(optimizer="muon"), params, total_steps=10)
    # a function giving the axes is called for Muon only
    calls = []
    make_optimizer(default_config(), params, total_steps=10, logical_axes=lambda: calls.append(1))
    assert calls == []
    make_optimizer(default_config(optimizer="muon"), params, total_steps=10,
                   logical_axes=lambda: calls.append(1) or axes)
    assert calls == [1]
    only_head = {"head": params["head"]}
    with pytest.raises(ValueError, match="no parameter is a hidden weight matrix"):
        make_optimizer(default_config(optimizer="muon"), only_head, total_steps=10,
                       logical_axes={"head": axes["head"]})


def test_janus_trains_with_muon_and_resumes_exactly(tmp_path):
    """The tiny Janus under the trainer: Muon takes the LLM's and aligners' matrices, the loss
    falls, and a run stopped at step 2 resumes (momentum included) to the straight run's losses
    (on a 2 x 2 x 2 mesh: the Newton-Schulz products run on sharded matrices)."""
    c = tiny_train_config(mesh=(2, 2, 2), steps=4, checkpoint_every=2)
    c.optim.optimizer = "muon"
    from unimm_jax.api import logical_axes

    t = loop.Trainer(c, tmp_path / "probe")
    dims = muon_leaves(t.state.params, logical_axes(c.model))
    muon = sorted(path_str(p) for p, d in dims.items() if d is not None)
    assert "llm/layers/attn/q/kernel" in muon and "aligner/dense_0/kernel" in muon
    assert not any(p.startswith(("llm/embed", "llm/lm_head", "gen_head/vision_head")) for p in muon)
    loop.train(c, tmp_path / "straight")
    loop.train(c, tmp_path / "split", stop_at=2)
    loop.train(c, tmp_path / "split")
    a, b = _losses(tmp_path / "straight"), _losses(tmp_path / "split")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    np.testing.assert_allclose([b[s] for s in range(1, 5)], [a[s] for s in range(1, 5)], rtol=1e-6)
    assert a[4] < a[1]


@pytest.mark.slow
def test_muon_sharded_losses_equal_one_device(tmp_path):
    losses = {}
    for mesh, devices in (((1, 1, 1), jax.devices()[:1]), ((2, 2, 2), None)):
        c = tiny_train_config(mesh=mesh, steps=3)
        c.optim.optimizer = "muon"
        t = loop.Trainer(c, tmp_path / str(mesh), devices=devices)
        losses[mesh] = [float(t.step(loop.synthetic_batch(c.model, c.data, 0, i))["loss"]) for i in range(3)]
    np.testing.assert_allclose(losses[(2, 2, 2)], losses[(1, 1, 1)], rtol=1e-4)
