"""Checkpointer: round trip, re-sharding restore, Grain resume, keep-N, crash safety, SIGTERM."""
import os
import signal
import subprocess
import sys
import threading

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from unimm_jax.sharding import make_mesh, params_shardings
from unimm_jax.train.checkpoint import Checkpointer, load_params, save_params, shared_preemption_guard
from unimm_jax.train.optimizer import default_config, make_optimizer, stage_trainable
from unimm_jax.train.state import TrainState, abstract_train_state, state_shardings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

AXES = {"params": {
    "vision": {"kernel": ("embed", "mlp"), "bias": ("mlp",)},
    "aligner": {"kernel": ("embed", "mlp"), "bias": ("mlp",)},
    "ln": {"scale": ("norm",)},
}}


def _params(seed=0):
    r = np.random.RandomState(seed)
    f = lambda *s: jnp.asarray(r.normal(size=s), jnp.float32)
    return {"params": {"vision": {"kernel": f(16, 8), "bias": f(8)},
                       "aligner": {"kernel": f(16, 8), "bias": f(8)},
                       "ln": {"scale": f(8)}}}


def _tx(params):
    # Freezing: the opt_state holds MaskedNodes, EmptyStates and counters.
    cfg = default_config(learning_rate=1e-2, warmup_steps=1, weight_decay=0.1, clip_norm=1.0)
    return make_optimizer(cfg, params, stage_trainable({"frozen": ["vision"]}), total_steps=100)


def _sharded(tree, shardings):
    return jax.tree.map(jax.device_put, tree, shardings)


def _abstract(params, shardings, tx):
    pa = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      params, shardings)
    return abstract_train_state(pa, tx)


def _trained_state(params, tx, shardings=None, steps=3):
    if shardings is not None:
        params = _sharded(params, shardings)
    state = TrainState.create(params, tx, jax.random.key(7))
    step = jax.jit(lambda s, g: s.apply_gradients(g, tx))
    for i in range(steps):
        state = step(state, jax.tree.map(lambda p: jnp.full_like(p, 0.1 * (i + 1)), params))
    return state


def _assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_save_restore_roundtrip(tmp_path):
    params = _params()
    tx = _tx(params)
    state = _trained_state(params, tx)
    with Checkpointer(tmp_path / "ckpt", save_interval_steps=10) as ck:
        assert ck.restore_latest(_abstract(params, jax.tree.map(lambda x: x.sharding, params), tx)) is None
        assert ck.save(int(state.step), state, force=True)
        assert not ck.save(int(state.step), state, force=True)  # same step again: skipped
        ck.wait()
        assert ck.all_steps() == [3]
    with Checkpointer(tmp_path / "ckpt") as ck:
        abstract = abstract_train_state(params, tx)
        restored, step = ck.restore_latest(abstract)
    assert step == 3 and int(restored.step) == 3
    _assert_trees_equal(restored, state)  # params, opt_state (moments, counters), step, rng
    assert restored.rng.dtype == jnp.uint32
    np.testing.assert_array_equal(restored.rng, jax.random.key_data(jax.random.key(7)))


def test_restore_onto_a_different_mesh(tmp_path):
    params = _params()
    tx = _tx(params)
    mesh8 = make_mesh(data=8)
    save_sh = jax.tree.map(
        lambda x: NamedSharding(mesh8, P("data") if x.shape[0] % 8 == 0 else P()), params)
    state = _trained_state(params, tx, save_sh)
    assert state.params["params"]["aligner"]["kernel"].sharding.spec == P("data")
    with Checkpointer(tmp_path / "ckpt") as ck:
        ck.save(3, state, force=True)

    mesh42 = make_mesh(data=1, fsdp=4, tensor=2)
    new_sh = params_shardings(AXES, params, mesh42)
    abstract = _abstract(params, new_sh, tx)
    with Checkpointer(tmp_path / "ckpt") as ck:
        restored, _ = ck.restore_latest(abstract)
    _assert_trees_equal(restored, state)
    jax.tree.map(lambda r, a: (r.sharding.is_equivalent_to(a.sharding, r.ndim) or
                               pytest.fail(f"{r.sharding} != {a.sharding}")),
                 restored, abstract)
    kernel = restored.params["params"]["aligner"]["kernel"]
    assert kernel.sharding.spec == P("fsdp", "tensor") and kernel.sharding.mesh.shape["fsdp"] == 4
    assert {s.data.shape for s in kernel.addressable_shards} == {(4, 4)}
    # The Adam moment of a param follows that param's sharding.
    shardings = state_shardings(abstract)
    mu = [s for s in jax.tree.leaves(shardings) if s.spec == P("fsdp", "tensor")]
    # Both kernels, plus the aligner kernel's mu and nu (vision is frozen: none).
    assert len(mu) == 2 + 2


def _dataset():
    return grain.MapDataset.range(100).shuffle(seed=3).map(lambda x: x * 10).to_iter_dataset()


def test_grain_iterator_resumes_at_the_next_element(tmp_path):
    params = _params()
    tx = optax.sgd(0.1)
    state = TrainState.create(params, tx, jax.random.key(0))
    it = iter(_dataset())
    seen = [next(it) for _ in range(7)]
    with Checkpointer(tmp_path / "ckpt") as ck:
        ck.save(7, state, data_iter=it, force=True)
        # The iterator's position is taken when save() is called, not when the async write ends.
        expected = [next(it) for _ in range(5)]
    assert len(set(seen + expected)) == 12

    fresh = iter(_dataset())
    with Checkpointer(tmp_path / "ckpt") as ck:
        _, step = ck.restore_latest(abstract_train_state(params, tx), data_iter=fresh)
    assert step == 7
    assert [next(fresh) for _ in range(5)] == expected


def test_restoring_a_data_iter_that_was_not_saved_is_an_error(tmp_path):
    params = _params()
    tx = optax.sgd(0.1)
    with Checkpointer(tmp_path / "ckpt") as ck:
        ck.save(1, TrainState.create(params, tx, jax.random.key(0)), force=True)
        ck.wait()
        with pytest.raises(ValueError, match="no data-iterator state"):
            ck.restore_latest(abstract_train_state(params, tx), data_iter=iter(_dataset()))


def test_restore_into_a_mismatched_state_is_a_clear_error(tmp_path):
    params = _params()
    tx = optax.sgd(0.1)
    with Checkpointer(tmp_path / "ckpt") as ck:
        ck.save(1, TrainState.create(params, tx, jax.random.key(0)), force=True)
        ck.wait()
        other = dict(params["params"], extra={"kernel": jnp.zeros((2, 2))})
        with pytest.raises(ValueError, match="cannot restore"):
            ck.restore_latest(abstract_train_state({"params": other}, tx))


def test_keep_n_and_save_interval(tmp_path):
    params = {"w": jnp.zeros((4,))}
    tx = optax.sgd(0.1)
    state = TrainState.create(params, tx, jax.random.key(0))
    with Checkpointer(tmp_path / "ckpt", max_to_keep=2, save_interval_steps=2) as ck:
        started = [s for s in range(1, 8) if ck.save(s, state.replace(step=jnp.int32(s)))]
        assert started == [2, 4, 6]
        assert ck.save(7, state.replace(step=jnp.int32(7)), force=True)
        ck.wait()
        assert ck.all_steps() == [6, 7]
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["6", "7"]


def test_preemption_guard_sets_the_flag_and_restores_handlers(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with Checkpointer(tmp_path / "ckpt") as ck:
        with ck.preemption_guard():
            assert not ck.should_stop
            os.kill(os.getpid(), signal.SIGTERM)
            assert ck.should_stop and ck.stop_requested(0)
            # A second SIGINT is an impatient user: it interrupts at once.
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                signal.getsignal(signal.SIGINT)  # a bytecode boundary for the handler to run
    assert signal.getsignal(signal.SIGTERM) is before


def test_worker_threads_take_their_stop_from_the_shared_guard(tmp_path):
    """Stages in worker threads (loop._encoder_stages) enter their preemption_guard inside the main
    thread's shared_preemption_guard: one signal stops them all; without it they refuse."""
    before = signal.getsignal(signal.SIGTERM)
    seen, errors = {}, []

    def stage(name, started, release):
        try:
            with Checkpointer(tmp_path / name) as ck, ck.preemption_guard():
                seen[name + "_before"] = ck.should_stop
                started.set()
                release.wait(30)
                seen[name + "_after"] = ck.should_stop
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    def run_two():
        events = [(threading.Event(), threading.Event()) for _ in range(2)]
        threads = [threading.Thread(target=stage, args=(f"s{i}", *ev)) for i, ev in enumerate(events)]
        for t in threads:
            t.start()
        for started, _ in events:
            assert started.wait(30)
        return threads, events

    with shared_preemption_guard() as stop:
        threads, events = run_two()
        os.kill(os.getpid(), signal.SIGTERM)  # handled here, in the main thread
        signal.getsignal(signal.SIGTERM)
        assert stop.is_set()
        for _, release in events:
            release.set()
        for t in threads:
            t.join(30)
    assert not errors, errors
    assert seen == {"s0_before": False, "s1_before": False, "s0_after": True, "s1_after": True}
    assert signal.getsignal(signal.SIGTERM) is before

    # Outside a shared guard a worker thread cannot take signals: a clear error, not a silent no-op;
    # and the shared guard itself belongs to the main thread.
    def in_thread(fn):
        out = []

        def target():
            try:
                fn()
            except RuntimeError as e:
                out.append(e)
        t = threading.Thread(target=target)
        t.start()
        t.join(30)
        return out

    def worker_guard():
        with Checkpointer(tmp_path / "s2") as ck, ck.preemption_guard():
            pass

    def worker_shared():
        with shared_preemption_guard():
            pass

    assert "inside the main thread's shared_preemption_guard" in str(in_thread(worker_guard)[0])
    assert "must be entered from the main thread" in str(in_thread(worker_shared)[0])


def test_params_only_save_and_load(tmp_path):
    params = _params()
    mesh = make_mesh(data=1, fsdp=4, tensor=2)
    save_params(tmp_path / "model", _sharded(params, params_shardings(AXES, params, mesh)))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_params(tmp_path / "model", params)

    plain = load_params(tmp_path / "model")
    _assert_trees_equal(plain, params)
    assert len(plain["params"]["aligner"]["kernel"].sharding.device_set) == 1

    mesh8 = make_mesh(data=8)
    target = jax.tree.map(lambda x: NamedSharding(mesh8, P("data") if x.shape[0] % 8 == 0 else P()),
                          params)
    resharded = load_params(tmp_path / "model", target)
    _assert_trees_equal(resharded, params)
    assert resharded["params"]["vision"]["kernel"].sharding.spec == P("data")

    bf16 = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16, sharding=s),
                        params, target)
    cast = load_params(tmp_path / "model", bf16)
    assert cast["params"]["ln"]["scale"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(cast["params"]["ln"]["scale"],
                                  params["params"]["ln"]["scale"].astype(jnp.bfloat16))
    with pytest.raises(FileNotFoundError):
        load_params(tmp_path / "nothing")


# -- subprocess tests: a real kill and a real SIGTERM ------------------------------------------

_CHILD_COMMON = """
import os, sys, time, signal, asyncio
import jax, jax.numpy as jnp, optax
from unimm_jax.train.checkpoint import Checkpointer
from unimm_jax.train.state import TrainState

def make_state(step, n):
    params = {"w": jnp.full((n,), float(step)), "b": jnp.arange(16.0) + step}
    return TrainState.create(params, optax.sgd(0.1), jax.random.key(step), step=step)
"""

_KILL_CHILD = _CHILD_COMMON + """
ckpt_dir, mode, marker = sys.argv[1], sys.argv[2], sys.argv[3]
ck = Checkpointer(ckpt_dir, save_interval_steps=1, max_to_keep=5)
ck.save(1, make_state(1, 1024)); ck.wait()
if mode == "commit":
    # Block the final commit (the tmp -> step rename) of the next save, with its data written:
    # the sharpest point for a kill.
    from orbax.checkpoint._src.path import atomicity
    async def blocked(self, *a, **k):
        open(marker, "w").close()
        while True:
            await asyncio.sleep(1)
    atomicity.AtomicRenameTemporaryPath.finalize = blocked
    ck.save(2, make_state(2, 1024))
    while not os.path.exists(marker):
        time.sleep(0.01)
else:
    # Kill as soon as the async save has started: its ~64 MB are still being written.
    ck.save(2, make_state(2, 16 * 1024 * 1024))
os.kill(os.getpid(), signal.SIGKILL)
"""

_SIGTERM_CHILD = _CHILD_COMMON + """
ck = Checkpointer(sys.argv[1], save_interval_steps=1000, max_to_keep=2)
state = make_state(0, 64)
grads = jax.tree.map(jnp.ones_like, state.params)
step_fn = jax.jit(lambda s: s.apply_gradients(grads, optax.sgd(0.1)))
with ck.preemption_guard():
    state = step_fn(state)  # one step before READY: a loaded machine may deliver the signal at once
    print("READY", flush=True)
    while not ck.should_stop:
        state = step_fn(state)
        ck.save(int(state.step), state)  # periodic saves: none due in this short run
        time.sleep(0.005)
        if int(state.step) > 200000:
            sys.exit(3)  # the signal never arrived
    ck.save(int(state.step), state, force=True)
    ck.close()
print("SAVED", int(state.step), flush=True)
"""


def _child_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = ""  # one device is enough and starts faster
    return env


@pytest.mark.parametrize("mode", ["commit", "write"])
def test_sigkill_mid_save_leaves_the_previous_checkpoint(tmp_path, mode):
    script = tmp_path / "child.py"
    script.write_text(_KILL_CHILD)
    ckpt_dir, marker = tmp_path / "ckpt", tmp_path / "marker"
    proc = subprocess.run([sys.executable, str(script), str(ckpt_dir), mode, str(marker)],
                          env=_child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]

    entries = sorted(os.listdir(ckpt_dir))
    tmp_dirs = [e for e in entries if e.startswith("2.") and "tmp" in e]
    if mode == "commit":
        # The data of step 2 is on disk, but never committed.
        assert tmp_dirs and "2" not in entries, entries
    # Orbax itself lists only finalized steps (read-only manager: no clean-up yet).
    if tmp_dirs:
        assert ocp.CheckpointManager(
            ckpt_dir, options=ocp.CheckpointManagerOptions(read_only=True)).all_steps() == [1]
    expected_step = 2 if "2" in entries else 1  # "write" mode: only if the save outran the kill
    w_len = 16 * 1024 * 1024 if expected_step == 2 and mode == "write" else 1024
    abstract_params = {"w": jax.ShapeDtypeStruct((w_len,), jnp.float32),
                       "b": jax.ShapeDtypeStruct((16,), jnp.float32)}
    with Checkpointer(ckpt_dir, save_interval_steps=1) as ck:
        assert ck.all_steps() == list(range(1, expected_step + 1))
        restored, step = ck.restore_latest(abstract_train_state(abstract_params, optax.sgd(0.1)))
        assert step == expected_step and int(restored.step) == expected_step
        np.testing.assert_array_equal(restored.params["b"], np.arange(16.0) + expected_step)
        assert float(restored.params["w"][0]) == expected_step
        if tmp_dirs:  # the interrupted step can be saved again; the stale tmp dir is removed
            params = {"w": jnp.full((1024,), 2.0), "b": jnp.arange(16.0) + 2}
            assert ck.save(2, TrainState.create(params, optax.sgd(0.1), jax.random.key(2), step=2))
            ck.wait()
            assert ck.all_steps() == [1, 2]
    if tmp_dirs:
        assert sorted(os.listdir(ckpt_dir)) == ["1", "2"]


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(_SIGTERM_CHILD)
    ckpt_dir = tmp_path / "ckpt"
    proc = subprocess.Popen([sys.executable, str(script), str(ckpt_dir)], env=_child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "READY", line + proc.stderr.read()[-3000:]
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    saved = int(out.split("SAVED")[1].split()[0])
    assert saved >= 1

    with Checkpointer(ckpt_dir) as ck:
        abstract = abstract_train_state(
            {"w": jax.ShapeDtypeStruct((64,), jnp.float32),
             "b": jax.ShapeDtypeStruct((16,), jnp.float32)}, optax.sgd(0.1))
        restored, step = ck.restore_latest(abstract)
    assert step == saved == int(restored.step)
    # Every step subtracted 0.1 * 1 from each param: the restored params are the final ones.
    np.testing.assert_allclose(restored.params["w"], np.full(64, -0.1 * saved), rtol=1e-4, atol=1e-4)


def test_train_state_rng_is_raw_key_data_and_split_advances_it():
    state = TrainState.create({"w": jnp.zeros(2)}, optax.sgd(0.1), jax.random.key(3))
    assert state.rng.dtype == jnp.uint32 and state.step.dtype == jnp.int32
    same = TrainState.create({"w": jnp.zeros(2)}, optax.sgd(0.1), jax.random.PRNGKey(3))
    np.testing.assert_array_equal(state.rng, same.rng)  # typed and legacy keys both accepted
    new, keys = state.split_rng(2)
    assert keys.shape == (2,) and not np.array_equal(new.rng, state.rng)
    k = jax.random.key_data(keys)
    assert not np.array_equal(k[0], k[1]) and not np.array_equal(k[0], new.rng)


def test_end_stage_step_saves_when_due_or_stopping_and_never_the_last_step(tmp_path):
    state = {"w": jnp.arange(3.0)}
    with Checkpointer(tmp_path / "ckpt", save_interval_steps=3, async_save=False, max_to_keep=5) as ck:
        assert [ck.end_stage_step(i, 6, state) for i in range(1, 7)] == [False] * 6
        assert ck.all_steps() == [3]  # due at 3; 6 is the stage's last step: the stage writes it
        assert ck.end_stage_step(4, 6, state, stop_now=True)  # a stop saves at once and says stop
        assert ck.all_steps() == [3, 4]
        assert not ck.end_stage_step(6, 6, state, stop_now=True)  # at the last step: nothing to resume
        assert ck.all_steps() == [3, 4]
        ck.request_stop()  # as SIGTERM inside preemption_guard
        assert ck.end_stage_step(5, 6, state) and ck.all_steps() == [3, 4, 5]
