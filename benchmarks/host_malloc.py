"""The default job's training step with and without glibc.malloc.hugetlb=1 (`unimm_jax.host_malloc`,
which unimm-train and unimm-eval apply), side by side on this CPU: compiled-step time and minor
page faults per step.

    python benchmarks/host_malloc.py [--rounds 2] [--steps 15] [--config configs/shapes_tiny.py]

Each (round, mode) runs in a fresh subprocess (glibc reads tunables at process start), modes
alternating so that both see the same host load: "default" (glibc as it comes, no GLIBC_TUNABLES)
and "hugetlb" (GLIBC_TUNABLES=glibc.malloc.hugetlb=1). The work: the config's
LLM stage (Trainer.step_fn: stage, mixture, batch 16 x 256 of the default job) on real packed
batches of a small shapes world built into a temp dir, with a randomly initialised VQ encoding
the generation images (the step's cost does not depend on the VQ's weights). Times are medians of
`--steps` compiled steps after 3 warm-up steps; faults are ru_minflt per step over them.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

MODES = ("default", "hugetlb")


def child(config_path: str, steps: int) -> dict:
    import resource
    import time

    import jax
    from job_batches import default_job_batches
    from unimm_jax.train import loop

    config, work, batches = default_job_batches(config_path, steps + 3)
    trainer = loop.Trainer(config, os.path.join(work, "run"), devices=jax.devices()[:1])
    state, times = trainer.state, []
    for i, b in enumerate(batches):
        if i == 3:
            faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = time.perf_counter()
        state, metrics = trainer.step_fn(state, loop.global_batch(b, trainer.batch_sharding))
        jax.block_until_ready(metrics["loss"])
        if i >= 3:
            times.append(time.perf_counter() - t)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / steps
    return dict(step_ms=1e3 * statistics.median(times), faults_per_step=faults, loss=float(metrics["loss"]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                                     "configs", "shapes_tiny.py"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--child", choices=MODES, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.config, args.steps)))
        return
    from unimm_jax import host_malloc

    if not host_malloc.hugetlb_available():
        sys.exit(f"needs Linux glibc >= 2.35 and transparent huge pages (THP mode: {host_malloc.thp_mode()}).")
    rows = {m: [] for m in MODES}
    for r in range(args.rounds):
        for mode in MODES:
            env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
            env["JAX_PLATFORMS"] = "cpu"
            if mode == "hugetlb":
                env["GLIBC_TUNABLES"] = host_malloc.with_hugetlb("")
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--config", args.config,
                                  "--steps", str(args.steps)], env=env, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{mode} run failed:\n{out.stderr[-3000:]}")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            rows[mode].append(res)
            print(f"round {r} {mode:8s} step {res['step_ms']:7.1f} ms  faults/step {res['faults_per_step']:9.0f}  "
                  f"loss {res['loss']:.4f}", flush=True)
    d, h = (statistics.median(x["step_ms"] for x in rows[m]) for m in MODES)
    print(f"median step: default {d:.1f} ms, hugetlb {h:.1f} ms: {d / h:.2f}x")


if __name__ == "__main__":
    main()
