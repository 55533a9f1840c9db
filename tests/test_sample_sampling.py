"""Logit warpers and token sampling against a numpy reference (transformers' semantics)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm_jax.sample.sampling import (check_sampling_args, process_logits, row_keys, sample_tokens, step_keys,
                                       top_k_filter, top_p_filter)


def np_top_k(x, k):
    kth = np.sort(x, axis=-1)[:, ::-1][:, min(k, x.shape[-1]) - 1:min(k, x.shape[-1])]
    return np.where(x < kth, -np.inf, x)


def np_top_p(x, p):
    """transformers' TopPLogitsWarper: ascending sort, drop cumulative mass <= 1 - p, keep the top one."""
    out = x.copy()
    for r in range(x.shape[0]):
        order = np.argsort(x[r], kind="stable")
        probs = np.exp(x[r][order] - x[r].max())
        probs /= probs.sum()
        drop = np.cumsum(probs) <= 1 - p
        drop[-1] = False
        out[r, order[drop]] = -np.inf
    return out


@pytest.fixture
def logits():
    return np.random.default_rng(0).normal(0, 2, (6, 50)).astype(np.float32)


@pytest.mark.parametrize("k", [1, 5, 50, 80])
def test_top_k_matches_numpy(logits, k):
    np.testing.assert_array_equal(np.asarray(top_k_filter(jnp.asarray(logits), k)), np_top_k(logits, k))


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9, 0.999])
def test_top_p_matches_numpy(logits, p):
    np.testing.assert_array_equal(np.isfinite(np.asarray(top_p_filter(jnp.asarray(logits), p))),
                                  np.isfinite(np_top_p(logits, p)))


def test_top_p_keeps_the_token_that_crosses_p():
    x = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
    kept = np.isfinite(np.asarray(top_p_filter(jnp.asarray(x), 0.7)))
    np.testing.assert_array_equal(kept, [[True, True, False, False]])


def test_process_logits_order_temperature_then_top_k_then_top_p(logits):
    got = np.asarray(process_logits(jnp.asarray(logits), 0.7, 10, 0.8))
    ref = np_top_p(np_top_k(logits / 0.7, 10), 0.8)
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(ref))
    np.testing.assert_allclose(got[np.isfinite(got)], ref[np.isfinite(ref)], rtol=1e-6)


def test_greedy_is_argmax(logits):
    keys = row_keys(jnp.int32(0), jnp.arange(6))
    np.testing.assert_array_equal(np.asarray(sample_tokens(jnp.asarray(logits), keys, 0.0)), logits.argmax(-1))


def test_sampling_frequencies_follow_softmax_with_temperature():
    x = np.array([1.0, 0.0, -1.0, 0.5], np.float32)
    n = 20000
    keys = row_keys(jnp.int32(1), jnp.arange(n))
    draws = np.asarray(sample_tokens(jnp.broadcast_to(jnp.asarray(x), (n, 4)), keys, 2.0))
    want = np.exp(x / 2.0) / np.exp(x / 2.0).sum()
    np.testing.assert_allclose(np.bincount(draws, minlength=4) / n, want, atol=0.015)
    # top-k / top-p never draw a token outside the kept set
    draws = np.asarray(sample_tokens(jnp.broadcast_to(jnp.asarray(x), (n, 4)), keys, 1.0, top_k=2))
    assert set(np.unique(draws)) == {0, 3}
    draws = np.asarray(sample_tokens(jnp.broadcast_to(jnp.asarray(x), (n, 4)), keys, 1.0, top_p=0.3))
    assert set(np.unique(draws)) == {0}


def test_keys_are_seeded_per_row_and_step():
    a = row_keys(jnp.int32(3), jnp.arange(4))
    b = row_keys(jnp.int32(3), jnp.arange(4))
    np.testing.assert_array_equal(jax.random.key_data(a), jax.random.key_data(b))
    assert not np.array_equal(jax.random.key_data(a), jax.random.key_data(row_keys(jnp.int32(4), jnp.arange(4))))
    s0, s1 = step_keys(a, 0), step_keys(a, 1)
    assert not np.array_equal(jax.random.key_data(s0), jax.random.key_data(s1))
    # row 2 of a batch uses the key of global row 2, whatever else is batched with it
    np.testing.assert_array_equal(jax.random.key_data(a)[2], jax.random.key_data(row_keys(jnp.int32(3), jnp.array([2])))[0])


@pytest.mark.parametrize("args,match", [((-1.0, None, None), "temperature"), ((1.0, 2.5, None), "top_k"),
                                        ((1.0, -3, None), "top_k"), ((1.0, None, 0.0), "top_p"),
                                        ((1.0, None, 1.5), "top_p"), (("hot", None, None), "temperature")])
def test_bad_sampling_args_raise(args, match):
    with pytest.raises(ValueError, match=match):
        check_sampling_args(*args)


def test_sampling_args_normalised():
    assert check_sampling_args(0, 0, 1.0) == (0.0, None, None)
    assert check_sampling_args(0.5, 4, 0.9) == (0.5, 4, 0.9)
