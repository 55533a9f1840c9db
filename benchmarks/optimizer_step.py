"""The default job's training step with AdamW and with Muon (`optim.optimizer`), side by side on
this CPU: compiled-step time per optimizer, in one process, rounds alternating.

    python benchmarks/optimizer_step.py [--rounds 3] [--steps 10] [--config configs/shapes_tiny.py]

The work: the config's LLM stage (Trainer.step_fn: stage, mixture, batch 16 x 256 of the default
job) on real packed batches of a small shapes world built into a temp dir, a randomly initialised
VQ encoding the generation images. Both trainers start from the same params and take the same
batches; each round times `--steps` compiled steps of one optimizer, then of the other (after
3 warm-up steps each), so both see the same host load. Muon adds the Newton-Schulz products of
every hidden matrix to the step. Like unimm-train, the process re-executes itself once with
glibc's huge-page tunable where `unimm_jax.host_malloc` finds it useful.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
from job_batches import default_job_batches

from unimm_jax import host_malloc
from unimm_jax.train import loop

OPTIMIZERS = ("adamw", "muon")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs", "shapes_tiny.py"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    host_malloc.reexec_with_hugetlb()

    config, work, batches = default_job_batches(args.config, args.steps)
    trainers, states = {}, {}
    for name in OPTIMIZERS:
        c = config.copy_and_resolve_references()
        c.optim.optimizer = name
        trainers[name] = loop.Trainer(c, os.path.join(work, name), devices=jax.devices()[:1])
        states[name] = trainers[name].state
    times = {name: [] for name in OPTIMIZERS}

    def run(name, record):
        t = trainers[name]
        for b in batches if record else batches[:3]:
            start = time.perf_counter()
            states[name], metrics = t.step_fn(states[name], loop.global_batch(b, t.batch_sharding))
            jax.block_until_ready(metrics["loss"])
            if record:
                times[name].append(time.perf_counter() - start)

    for name in OPTIMIZERS:
        run(name, record=False)
    for r in range(args.rounds):
        for name in OPTIMIZERS if r % 2 == 0 else OPTIMIZERS[::-1]:
            run(name, record=True)
            print(f"round {r} {name}: median {1e3 * statistics.median(times[name][-args.steps:]):.1f} ms/step",
                  flush=True)
    med = {name: 1e3 * statistics.median(v) for name, v in times.items()}
    print(f"{os.uname().nodename}, jax {jax.__version__}, {os.cpu_count()} CPUs: AdamW {med['adamw']:.1f} ms, "
          f"Muon {med['muon']:.1f} ms per step; Muon / AdamW = {med['muon'] / med['adamw']:.3f}")


if __name__ == "__main__":
    main()
