"""Checkpoints: orbax CheckpointManager for the TrainState + Grain iterator, and params-only dirs.

Layout of a run's checkpoint directory (one orbax CheckpointManager, MaxText-style two items):

    ckpt/
      1000/            one finalized step
        state/         the TrainState (step, params, opt_state, rng), orbax PyTree (OCDBT)
        data_iter/     Grain iterator state, process_<i>-of-<n>.json (grain.checkpoint handler)
      2000/ ...
      2500.orbax-checkpoint-tmp/   an unfinished save (a crash mid-save); never read

Atomicity: orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it to `<step>` only
after every item is written (on object stores: a commit_success.txt file instead). Only finalized
steps are listed, so `restore_latest` never sees a half-written checkpoint. Leftover tmp dirs are
deleted when a Checkpointer is opened (`cleanup_tmp_directories`).

Restoring re-shards: leaves are read onto whatever shardings the abstract state carries
(`state.abstract_train_state`), so a run saved on one mesh resumes on another.

Preemption: inside `with ckpt.preemption_guard():` SIGTERM/SIGINT only set `ckpt.should_stop`;
the loop checks it, saves with force=True and exits cleanly. A second SIGINT interrupts at once.
Stages run in worker threads (loop.py runs the tokenizer and vision stages side by side) enter
their guards inside the main thread's `shared_preemption_guard()`, whose event stops them all.

Params-only export dirs (`save_params`/`load_params`): the params tree alone, as the `params/`
dir of the `unimm` model format (orbax items of bounded-size leaf groups + an index; see
`convert.unimm_format`), so saving or loading a 7B model never holds extra copies of all of it.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Any, Iterator, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

try:  # grain registers its orbax handler args when both packages are present.
    import grain.checkpoint as grain_ckpt
except ImportError:  # pragma: no cover - grain is a hard dependency of the package
    grain_ckpt = None

STATE_ITEM = "state"
DATA_ITEM = "data_iter"


def _abs_path(directory) -> epath.Path:
    d = os.fspath(directory)
    return epath.Path(d if "://" in d else os.path.abspath(d))


class Checkpointer:
    """Saves and restores TrainState (+ Grain iterator) every `save_interval_steps`, keeping N.

    Args:
      directory: the checkpoint directory, e.g. `workdir/ckpt` (local path or gs://...).
      max_to_keep: newest finalized steps to keep (None keeps all).
      save_interval_steps: `save(step, ...)` writes only when step % interval == 0 (or force).
      async_save: write in background threads; `save` returns after the device->host copy.
      metadata: JSON-able dict saved once at the directory root (e.g. the run config).
    """

    def __init__(
        self,
        directory,
        *,
        max_to_keep: int | None = 3,
        save_interval_steps: int = 1000,
        async_save: bool = True,
        metadata: Mapping[str, Any] | None = None,
    ):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep={max_to_keep} must be >= 1 or None (keep all).")
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps={save_interval_steps} must be >= 1.")
        handlers = {STATE_ITEM: ocp.StandardCheckpointHandler()}
        if grain_ckpt is not None:
            handlers[DATA_ITEM] = grain_ckpt.CheckpointHandler()
        self._mngr = ocp.CheckpointManager(
            _abs_path(directory),
            item_names=tuple(handlers),
            item_handlers=handlers,
            metadata=dict(metadata) if metadata else None,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                # Explicit policy (as MaxText): save when step % interval == 0, or at JAX's
                # multi-host preemption sync point. Orbax's default would also save the first
                # step of a fresh run (InitialSavePolicy), an unasked-for full save.
                save_decision_policy=ocp.checkpoint_managers.AnySavePolicy([
                    ocp.checkpoint_managers.FixedIntervalPolicy(save_interval_steps),
                    ocp.checkpoint_managers.PreemptionCheckpointingPolicy(),
                ]),
                enable_async_checkpointing=async_save,
                # Half-written steps from a crash are removed on open (they are never read).
                cleanup_tmp_directories=True,
                create=True,
            ),
        )
        self._stop = threading.Event()
        self._shared_stop: threading.Event | None = None  # a shared_preemption_guard's, while in one

    # -- paths and steps ------------------------------------------------------------------------

    @property
    def directory(self) -> epath.Path:
        return epath.Path(self._mngr.directory)

    def all_steps(self) -> list[int]:
        """Finalized steps, ascending (tmp dirs of unfinished saves are never listed)."""
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    # -- save -----------------------------------------------------------------------------------

    def save(self, step: int, state, data_iter=None, force: bool = False) -> bool:
        """Saves `state` (and `data_iter.get_state()`) as step `step` if due, or if `force`.

        Args:
          step: int, usually `int(state.step)`.
          state: the TrainState pytree (any pytree of jax arrays works).
          data_iter: a grain DatasetIterator / DataLoaderIterator, saved as a second item. Its
            state is captured when `save` is called (before returning), so the loop may keep
            drawing batches while the arrays are written in the background.
          force: save even when step is not a multiple of save_interval_steps.
        Returns:
          True if a save was started. A step that already has a checkpoint is skipped (False),
          so a final forced save right after a periodic one is harmless.
        """
        step = int(step)
        if step in self._mngr.all_steps():
            logging.info("checkpoint for step %d already exists; not saving again.", step)
            return False
        args = {STATE_ITEM: ocp.args.StandardSave(state)}
        if data_iter is not None:
            if grain_ckpt is None:  # pragma: no cover
                raise RuntimeError("saving a data iterator needs grain (pip install grain).")
            args[DATA_ITEM] = grain_ckpt.CheckpointSave(data_iter)
        return bool(self._mngr.save(step, args=ocp.args.Composite(**args), force=force))

    # -- restore --------------------------------------------------------------------------------

    def restore(self, step: int, abstract_state, data_iter=None):
        """Restores step `step` onto the shardings of `abstract_state`; returns the state.

        `abstract_state` has jax.ShapeDtypeStruct(shape, dtype, sharding=...) leaves (see
        `state.abstract_train_state`); the saved mesh does not matter. If `data_iter` is given,
        its position is set to the saved one in place.
        """
        step = int(step)
        args = {STATE_ITEM: ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            if not (self.directory / str(step) / DATA_ITEM).exists():
                raise ValueError(
                    f"checkpoint {self.directory / str(step)} has no data-iterator state (it was "
                    f"saved without data_iter=). Restore without data_iter, or start the data "
                    f"pipeline from scratch.")
            args[DATA_ITEM] = grain_ckpt.CheckpointRestore(data_iter)
        try:
            restored = self._mngr.restore(step, args=ocp.args.Composite(**args))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"cannot restore {self.directory / str(step)} into the given abstract state: the "
                f"checkpoint's tree or shapes differ (another model config or training stage?). "
                f"To start a new stage from these weights, load params only. Orbax said: {e}"
            ) from e
        return restored[STATE_ITEM]

    def restore_latest(self, abstract_state, data_iter=None):
        """(state, step) from the newest finalized checkpoint, or None when there is none."""
        step = self.latest_step()
        if step is None:
            return None
        return self.restore(step, abstract_state, data_iter), step

    # -- lifecycle ------------------------------------------------------------------------------

    def wait(self) -> None:
        """Blocks until every started save is finalized on disk."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves, then releases the manager's threads."""
        self._mngr.wait_until_finished()
        self._mngr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- preemption -----------------------------------------------------------------------------

    @property
    def should_stop(self) -> bool:
        """True once SIGTERM/SIGINT arrived inside `preemption_guard` (or `request_stop`, or the
        enclosing `shared_preemption_guard`'s event was set)."""
        shared = self._shared_stop
        return self._stop.is_set() or (shared is not None and shared.is_set())

    def request_stop(self) -> None:
        self._stop.set()

    def stop_requested(self, step: int) -> bool:
        """`should_stop`, agreed across processes.

        Single process: the local flag. Multi-process: True on every process if any process got
        the signal (an all-gather of the flag) or JAX's preemption sync point is reached. It is a
        collective: every process must call it at the same steps (e.g. every N steps).
        """
        if jax.process_count() == 1:
            return self.should_stop
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray(self.should_stop, np.int32))
        return bool(np.any(flags)) or bool(self._mngr.reached_preemption(int(step)))

    def end_stage_step(self, step: int, last_step: int, state, data_iter=None, *, stop_now: bool = False) -> bool:
        """The end of one step of a pretraining stage (tokenizer, vision tower): saves `state` when
        due, or at once when a stop is requested (`stop_requested`, or `stop_now`), except at
        `last_step`, whose result the stage writes itself. Returns True when the stage should stop
        here, i.e. a stop came before the last step. A collective when multi-process (see
        `stop_requested`)."""
        stop = self.stop_requested(step) or stop_now
        if step < last_step:
            self.save(step, state, data_iter, force=stop)
        return stop and step < last_step

    @contextlib.contextmanager
    def preemption_guard(self, signals=(signal.SIGTERM, signal.SIGINT)) -> Iterator["Checkpointer"]:
        """Within the block, the given signals set `should_stop` instead of killing the process.

        The loop then saves (force=True) and returns normally. A second SIGINT raises
        KeyboardInterrupt, so an impatient Ctrl-C still works. Previous handlers come back on exit.
        Must be entered from the main thread (Python delivers signals only there), or from a worker
        thread while the main thread holds a `shared_preemption_guard`, which then stops it.
        """
        if threading.current_thread() is threading.main_thread():
            with _stop_on_signals(self._stop, signals):
                yield self
            return
        if _SHARED_STOP is None:
            raise RuntimeError("preemption_guard must be entered from the main thread, or from a worker "
                               "thread inside the main thread's shared_preemption_guard().")
        self._shared_stop = _SHARED_STOP
        try:
            yield self
        finally:
            self._shared_stop = None


_SHARED_STOP: threading.Event | None = None  # the active shared_preemption_guard's event


@contextlib.contextmanager
def _stop_on_signals(event: threading.Event, signals) -> Iterator[threading.Event]:
    """The given signals set `event` (a second SIGINT raises KeyboardInterrupt) until exit."""
    def handler(signum, frame):
        if signum == signal.SIGINT and event.is_set():
            raise KeyboardInterrupt
        logging.warning("received %s: will save a checkpoint and stop.", signal.Signals(signum).name)
        event.set()

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield event
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def shared_preemption_guard(signals=(signal.SIGTERM, signal.SIGINT)) -> Iterator[threading.Event]:
    """Main thread: while inside, stages running in worker threads may enter their
    `Checkpointer.preemption_guard()`; a signal (or setting the yielded event, e.g. when one stage
    fails) makes every such stage save and stop at its next step."""
    global _SHARED_STOP
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("shared_preemption_guard must be entered from the main thread.")
    if _SHARED_STOP is not None:
        raise RuntimeError("shared_preemption_guard is already active.")
    with _stop_on_signals(threading.Event(), signals) as event:
        _SHARED_STOP = event
        try:
            yield event
        finally:
            _SHARED_STOP = None


# ---------------------------------------------------------------------------------------------
# Params-only checkpoints (the `unimm` model-export format)
# ---------------------------------------------------------------------------------------------


def save_params(directory, params, *, overwrite: bool = False) -> None:
    """Writes the params tree (nested dict of arrays) in the unimm params layout; blocks.

    One orbax item per bounded-size group of leaves plus an index written last
    (`convert.unimm_format.save_params_groups`), so host memory stays near one group, not
    three copies of the model. Raises FileExistsError when `directory` exists, unless `overwrite`.
    """
    from unimm_jax.convert.unimm_format import save_params_groups

    path = _abs_path(directory)
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it.")
        if jax.process_index() == 0:
            path.rmtree()
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("unimm_save_params_rmtree")
    save_params_groups(path, params)


def load_params(directory, target=None):
    """Reads a `save_params` dir group by group, straight onto the asked devices.

    Args:
      target: None (every array on the first local device), a tree of `jax.sharding.Sharding`
        matching the saved tree (shapes and dtypes from the checkpoint), or a tree of
        jax.ShapeDtypeStruct with shardings (dtypes may differ: values are cast, e.g. to bf16).
    Returns:
      the params tree with jax.Array leaves laid out as asked.
    """
    from unimm_jax.convert.unimm_format import restore_params_groups

    path = _abs_path(directory)
    if not path.exists():
        raise FileNotFoundError(f"no params checkpoint at {path}.")
    return restore_params_groups(path, target)
