"""Optimizer: schedule, freezing, weight-decay mask, clipping, accumulation, config errors."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from unimm_jax.train.optimizer import (
    decays,
    default_config,
    flatten_with_paths,
    make_optimizer,
    make_schedule,
    path_str,
    stage_trainable,
)
from unimm_jax.train.state import TrainState


def _params(seed=0):
    r = np.random.RandomState(seed)
    f = lambda *s: jnp.asarray(r.normal(size=s), jnp.float32)
    return {"params": {
        "vision": {"kernel": f(4, 8), "bias": f(8)},
        "aligner": {"kernel": f(8, 8), "bias": f(8)},
        "gen_aligner": {"kernel": f(8, 4), "bias": f(4)},
        "llm": {"embed": {"embedding": f(16, 8)}, "ln": {"scale": f(8)},
                "layers": {"mlp": {"kernel": f(2, 8, 8), "bias": f(2, 8)}, "norm": {"scale": f(2, 8)}}},
    }}


def _grads(params, seed):
    r = np.random.RandomState(seed)
    return jax.tree.map(lambda p: jnp.asarray(r.normal(size=p.shape), jnp.float32), params)


def _paths(tree):
    return [path_str(p) for p, _ in flatten_with_paths(tree)]


# -- schedule ---------------------------------------------------------------------------------

def test_schedule_values_by_hand():
    cfg = default_config(learning_rate=0.1, warmup_steps=10, end_lr_fraction=0.1)
    lr = make_schedule(cfg, total_steps=110)
    # warmup: linear from 0; cosine over the 100 steps after it, down to 0.1 * 0.1.
    cos = lambda t: 0.1 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))
    expected = {0: 0.0, 5: 0.05, 10: 0.1, 35: cos(0.25), 60: 0.055, 85: cos(0.75), 110: 0.01,
                500: 0.01}
    for s, v in expected.items():
        np.testing.assert_allclose(float(lr(s)), v, rtol=1e-5, atol=1e-9, err_msg=f"step {s}")


def test_schedule_without_warmup_starts_at_peak():
    lr = make_schedule(default_config(learning_rate=2e-3, warmup_steps=0), total_steps=10)
    np.testing.assert_allclose(float(lr(0)), 2e-3, rtol=1e-6)
    np.testing.assert_allclose(float(lr(10)), 0.0, atol=1e-9)


# -- freezing ---------------------------------------------------------------------------------

def test_stage_patterns_match_whole_components():
    pred = stage_trainable({"trainable": ["aligner", "llm/layers"]})
    assert pred(("params", "aligner", "kernel"))
    assert not pred(("params", "gen_aligner", "kernel"))  # no substring matches
    assert pred(("params", "llm", "layers", "mlp", "kernel"))
    assert not pred(("params", "llm", "embed", "embedding"))
    both = stage_trainable({"trainable": ["gen_.*", "llm"], "frozen": ["llm/embed"]})
    assert both(("params", "gen_aligner", "bias"))
    assert not both(("params", "llm", "embed", "embedding"))
    assert both(("params", "llm", "ln", "scale"))
    assert stage_trainable(None) is None
    assert stage_trainable({"trainable": [], "frozen": []}) is None


def test_frozen_params_unchanged_and_have_no_optimizer_state():
    params = _params()
    cfg = default_config(learning_rate=1e-2, warmup_steps=0, weight_decay=0.1, clip_norm=1.0)
    trainable = stage_trainable({"frozen": ["vision", "llm/embed"]})
    tx = make_optimizer(cfg, params, trainable, total_steps=10)
    state = TrainState.create(params, tx, jax.random.key(0))
    step = jax.jit(lambda s, g: s.apply_gradients(g, tx))
    for i in range(4):
        state = step(state, _grads(params, i))

    for path, new in flatten_with_paths(state.params):
        old = dict(flatten_with_paths(params))[path]
        frozen = not trainable(path)
        assert frozen == bool(np.array_equal(np.asarray(new), np.asarray(old))), path_str(path)

    opt_paths = _paths(state.opt_state)
    assert not [p for p in opt_paths if "vision" in p or "llm/embed" in p], opt_paths
    # Memory: Adam mu + nu hold exactly 2 copies of the trainable params (accumulation happens in
    # the train step and keeps no state).
    n_train = sum(x.size for p, x in flatten_with_paths(params) if trainable(p))
    n_state = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert n_state == 2 * n_train


def test_freezing_everything_or_a_typo_is_an_error():
    params = _params()
    cfg = default_config(learning_rate=1e-3)
    with pytest.raises(ValueError, match="freezes every parameter"):
        make_optimizer(cfg, params, stage_trainable({"frozen": ["params"]}), total_steps=10)
    with pytest.raises(ValueError, match="'visoin' matches no parameter"):
        make_optimizer(cfg, params, stage_trainable({"frozen": ["visoin"]}), total_steps=10)
    with pytest.raises(ValueError, match="list of patterns"):
        stage_trainable({"frozen": "vision"})


# -- weight decay -----------------------------------------------------------------------------

def test_weight_decay_mask():
    params = _params()
    lr, wd = 0.1, 0.5
    cfg = default_config(learning_rate=lr, warmup_steps=0, weight_decay=wd, no_decay=["llm/embed"])
    tx = make_optimizer(cfg, params, total_steps=100)
    # Zero gradients: Adam's step is exactly 0, so any change is the decoupled decay lr*wd*p.
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
    decayed = {"params/vision/kernel", "params/aligner/kernel", "params/gen_aligner/kernel",
               "params/llm/layers/mlp/kernel"}
    for path, u in flatten_with_paths(updates):
        p = dict(flatten_with_paths(params))[path]
        want = -lr * wd * p if path_str(path) in decayed else jnp.zeros_like(p)
        np.testing.assert_allclose(u, want, rtol=1e-6, atol=1e-8, err_msg=path_str(path))
    # The rule itself: 1-D, bias and scale (also stacked [layers, dim]) are never decayed.
    assert not decays(("x", "norm", "scale"), jnp.zeros((2, 8)))
    assert not decays(("x", "mlp", "bias"), jnp.zeros((2, 8)))
    assert not decays(("x", "pos"), jnp.zeros((8,)))
    assert decays(("x", "embed", "embedding"), jnp.zeros((16, 8)))


# -- clipping ---------------------------------------------------------------------------------

def test_clipping_bounds_the_trainable_gradient_norm():
    params = _params()
    b1, c = 0.9, 0.5
    cfg = default_config(learning_rate=1e-3, warmup_steps=0, b1=b1, clip_norm=c)
    trainable = stage_trainable({"frozen": ["vision"]})
    tx = make_optimizer(cfg, params, trainable, total_steps=10)

    def mu_after(grads):
        """Adam's first moment after one step: (1 - b1) * clipped_grad (frozen leaves absent)."""
        _, st = jax.jit(tx.update)(grads, tx.init(params), params)
        is_adam = lambda n: isinstance(n, optax.ScaleByAdamState)
        (adam,) = [n for n in jax.tree.leaves(st, is_leaf=is_adam) if is_adam(n)]
        return adam.mu

    big = jax.tree.map(lambda g: 10.0 * g, _grads(params, 1))
    clipped = jax.tree.map(lambda m: m / (1 - b1), mu_after(big))
    np.testing.assert_allclose(float(optax.global_norm(clipped)), c, rtol=1e-5)
    # Direction is kept: the clipped gradient is a positive multiple of the raw one.
    raw = dict(flatten_with_paths(big))
    scale = c / float(optax.global_norm([g for p, g in raw.items() if trainable(p)]))
    assert scale < 1
    for p, g in flatten_with_paths(clipped):
        np.testing.assert_allclose(g, scale * raw[p], rtol=1e-4, atol=1e-7)

    # A huge gradient on a frozen param does not enter the norm: small grads pass unclipped.
    small = jax.tree.map(lambda g: 1e-3 * g, _grads(params, 2))
    small["params"]["vision"]["kernel"] = small["params"]["vision"]["kernel"] * 1e6
    got = jax.tree.map(lambda m: m / (1 - b1), mu_after(small))
    for p, g in flatten_with_paths(got):
        np.testing.assert_allclose(g, dict(flatten_with_paths(small))[p], rtol=1e-5, atol=1e-9)


# -- accumulation -----------------------------------------------------------------------------

def test_grad_accum_steps_is_validated_but_not_an_optimizer_wrapper():
    """grad_accum_steps is applied by the train step (train/accumulate.py), which sums micro-batch
    gradients into one update; the optimizer makes that update, so its state has no accumulator."""
    params = _params()
    base = dict(learning_rate=1e-2, warmup_steps=1, weight_decay=0.1, clip_norm=1.0)
    tx1 = make_optimizer(default_config(**base, grad_accum_steps=1), params, total_steps=4)
    tx4 = make_optimizer(default_config(**base, grad_accum_steps=4), params, total_steps=4)
    assert jax.tree.structure(tx4.init(params)) == jax.tree.structure(tx1.init(params))
    g = _grads(params, 0)
    s1, s4 = (TrainState.create(params, tx, jax.random.key(0)) for tx in (tx1, tx4))
    for _ in range(2):  # the second update has a non-zero learning rate
        s1, s4 = s1.apply_gradients(g, tx1), s4.apply_gradients(g, tx4)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), s4.params, s1.params)


# -- config errors ----------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,match", [
    ({"learnin_rate": 1e-3}, r"unknown field\(s\) \['learnin_rate'\]"),
    ({"warmup_steps": 10}, "warmup_steps=10 must be smaller than the 10 total"),
    ({"weight_decay": -1.0}, "weight_decay=-1.0 must be a number >= 0"),
    ({"grad_accum_steps": 0}, "grad_accum_steps=0 must be an integer >= 1"),
    ({"b2": 1.0}, r"b2=1.0 must be in \[0, 1\)"),
    ({"learning_rate": 0.0}, "learning_rate=0.0 must be a positive number"),
    ({"end_lr_fraction": 2.0}, "end_lr_fraction"),
    ({"no_decay": "embed"}, "not a string"),
    ({"no_decay": ["embedd"]}, "'embedd' matches no parameter"),
])
def test_bad_config_errors(overrides, match):
    cfg = dict(default_config(learning_rate=1e-3).to_dict(), **overrides)
    with pytest.raises(ValueError, match=match):
        make_optimizer(cfg, _params(), total_steps=10)


def test_missing_learning_rate_and_total_steps():
    with pytest.raises(ValueError, match="`learning_rate` is required"):
        make_optimizer({"warmup_steps": 1}, _params(), total_steps=10)
    with pytest.raises(ValueError, match="pass total_steps= or set optim.total_steps"):
        make_optimizer({"learning_rate": 1e-3}, _params())
    # total_steps may come from the config block instead.
    make_optimizer({"learning_rate": 1e-3, "total_steps": 5}, _params())


def test_boxed_params_are_an_error():
    import flax.linen as nn

    boxed = {"params": {"k": nn.Partitioned(jnp.ones((2, 2)), names=("embed", "mlp"))}}
    with pytest.raises(ValueError, match="unbox"):
        make_optimizer({"learning_rate": 1e-3}, boxed, total_steps=3)


def test_apply_gradients_if_updates_or_keeps_the_whole_state():
    """The NaN guard's conditional update: ok -> exactly apply_gradients; not ok -> the state as it
    was (params, Adam moments, step), also with the state donated to the jit."""
    params = _params()
    tx = make_optimizer(default_config(learning_rate=1e-2, warmup_steps=0),
                        params, None, total_steps=10)
    state = TrainState.create(params, tx, jax.random.key(0))
    state = jax.jit(lambda s, g: s.apply_gradients(g, tx))(state, _grads(params, 0))
    grads = _grads(params, 1)
    # (jitted like the guarded update: eager and compiled Adam may round differently)
    want_new = jax.tree.map(np.asarray, jax.jit(lambda s: s.apply_gradients(grads, tx))(state))
    want_old = jax.tree.map(np.asarray, state)
    guarded = jax.jit(lambda s, ok: s.apply_gradients_if(ok, grads, tx), donate_argnums=(0,))
    copy = lambda s: jax.tree.map(jnp.array, s)
    for ok, want in ((True, want_new), (False, want_old)):
        got = guarded(copy(state), jnp.asarray(ok))
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(a), b)
    assert int(want_new.step) == int(want_old.step) + 1
