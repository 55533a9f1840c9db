"""unimm-train --config configs/NAME.py --workdir W [--config.key=value ...]

Runs `unimm_jax.train.loop.run`: the whole job of the config (for configs/shapes_tiny.py:
data, VQ tokenizer, model, export, evaluation). The resolved config is saved as W/config.json
and every invocation's exact command line is appended to W/command.txt. Re-running the same
command resumes from W's newest checkpoint. An override naming a key that the config does not
have is an error (ml_collections config_flags), as is an unknown top-level block.

Multi-process (one process per host, or N local CPU processes, see launch/): pass
--coordinator_address HOST:PORT --num_processes N --process_id I (or set the UNIMM_COORDINATOR,
UNIMM_NUM_PROCESSES, UNIMM_PROCESS_ID environment variables); on Cloud TPU pods plain
`jax.distributed.initialize()` auto-detects them (--distributed).
"""
from __future__ import annotations

import json
import logging as py_logging
import os
import shlex
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from unimm_jax import host_malloc

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, model, eval.")
_COORD = flags.DEFINE_string("coordinator_address", os.environ.get("UNIMM_COORDINATOR"),
                             "host:port of process 0 for jax.distributed (multi-process runs).")
_NPROC = flags.DEFINE_integer("num_processes", int(os.environ.get("UNIMM_NUM_PROCESSES", "1")),
                              "Number of processes in a multi-process run.")
_PID = flags.DEFINE_integer("process_id", int(os.environ.get("UNIMM_PROCESS_ID", "0")),
                            "This process's index in a multi-process run.")
_DIST = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with auto-detection (TPU pods).")


class QuietLibraries(py_logging.Filter):
    """Drops INFO/DEBUG records logged from inside orbax and grain (one dozen lines per checkpoint
    save otherwise drown the progress bar); their warnings and errors, and ours, still show."""

    NOISY = (os.sep + "orbax" + os.sep, os.sep + "grain" + os.sep)

    def filter(self, record: py_logging.LogRecord) -> bool:
        return record.levelno >= py_logging.WARNING or not any(n in record.pathname for n in self.NOISY)


def init_distributed() -> None:
    """jax.distributed for multi-process runs; CPU processes talk over gloo collectives."""
    import jax

    if _COORD.value and _NPROC.value > 1:
        if os.environ.get("JAX_PLATFORMS", "") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(_COORD.value, _NPROC.value, _PID.value)
    elif _DIST.value:
        jax.distributed.initialize()


def save_run_files(config, workdir: str, argv) -> None:
    """W/config.json (the resolved config) and W/command.txt (each invocation appended)."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    with open(os.path.join(workdir, "command.txt"), "a") as f:
        f.write(" ".join(shlex.quote(a) for a in ["unimm-train"] + list(argv[1:])) + "\n")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; use --config, --workdir, --config.KEY=VALUE.")
    if _CONFIG.value is None or not _WORKDIR.value:
        raise app.UsageError("--config and --workdir are required.")
    logging.get_absl_handler().python_handler.addFilter(QuietLibraries())  # ABSLHandler.handle skips its own filters
    if os.environ.get(host_malloc.REEXECUTED):
        logging.info("host malloc: GLIBC_TUNABLES=%s (unimm_jax/host_malloc.py)", os.environ.get("GLIBC_TUNABLES"))
    init_distributed()
    import jax

    from unimm_jax.train import loop

    workdir = os.path.abspath(_WORKDIR.value)
    config = _CONFIG.value
    if jax.process_index() == 0:
        save_run_files(config, workdir, sys.argv)
    try:
        out = loop.run(config, workdir)
    except (ValueError, OSError, FloatingPointError) as e:
        # Bad config or data: the message names the problem and the fix; the traceback stays in
        # the log (the last good checkpoint is untouched, so fixing and re-running resumes).
        logging.exception("unimm-train failed")
        print(f"unimm-train: error: {e}", file=sys.stderr)
        sys.exit(2)
    summary = {k: v for k, v in (out or {}).items() if k in ("step", "stopped_early", "last", "eval")}
    if jax.process_index() == 0:
        print(json.dumps(summary, indent=1, default=str))
    logging.info("done: %s", workdir)


def run() -> None:
    """Console-script entry point."""
    # XLA:CPU's large per-step temporaries in 2 MiB pages (unimm_jax/host_malloc.py): glibc reads
    # the tunable only at process start, so this re-executes the command once, before any work.
    host_malloc.reexec_with_hugetlb()
    app.run(main)


if __name__ == "__main__":
    run()
