"""Training-step throughput on this machine: tokens/s, MFU against a measured matmul peak, and
the step time against the same model in PyTorch (transformers' Janus + torch AdamW).

    python benchmarks/train_step.py [--config configs/shapes_tiny.py] [--batch 8] [--seq 256]
                                    [--iters 5] [--threads N]

Work per step (the same in both frameworks): B rows of T tokens, each row BOS + text + one
understanding image (placeholders filled by SigLIP -> aligner) + text, loss on every text
target through lm_head; forward + backward + AdamW update of all LLM/SigLIP/aligner params.
The PyTorch model is our freshly initialised params written with save_pretrained(format="hf")
and loaded by transformers' JanusForConditionalGeneration, so both hold identical weights; the
first-step losses are printed as a check that the work is the same.

FLOPs: from XLA's cost analysis of the compiled step (what the CPU actually executes), and the
usual 6 * params * tokens estimate for reference. Peak: a jitted 2048^3 float32 matmul on the
same devices (the best of several runs). MFU = step FLOPs / step time / peak.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np


def matmul_peak(n: int = 2048, iters: int = 10) -> float:
    """Measured float32 matmul FLOP/s on the default device (best of `iters`)."""
    a = jnp.asarray(np.random.rand(n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(iters):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def load_config(path):
    spec = importlib.util.spec_from_file_location("bench_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def understanding_batch(m, b: int, t: int, seed: int = 0) -> dict:
    """B unpacked understanding rows of exactly T tokens (contract layout, numpy)."""
    from unimm_jax.models.janus_config import num_understanding_tokens

    rng = np.random.default_rng(seed)
    n, s, tok = num_understanding_tokens(m), m.vision.image_size, m.tokens
    special = set(tok.values())
    words = np.array([i for i in range(m.llm.vocab_size) if i not in special])
    ids = np.zeros((b, t + 1), np.int32)
    for r in range(b):
        pre = [tok.bos_token_id] + list(rng.choice(words, 4)) + [tok.boi_token_id] + [tok.image_token_id] * n + [tok.eoi_token_id]
        ids[r] = (pre + list(rng.choice(words, t + 1 - len(pre))))[: t + 1]
    z = np.zeros((b, t), bool)
    return {
        "input_ids": ids[:, :-1], "input_is_image": z, "target_ids": ids[:, 1:], "target_is_image": z,
        "loss_mask": np.ones((b, t), np.float32), "task_ids": np.zeros((b, t), np.int32),
        "segment_ids": np.ones((b, t), np.int32), "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
        "pixel_values": rng.uniform(-1, 1, (b, 1, s, s, 3)).astype(np.float32),
        "image_valid": np.ones((b, 1), bool),
    }


def bench_jax(config, batch, iters):
    from unimm_jax.train import loop

    config.mesh = dict(data=1, fsdp=1, tensor=1)
    config.data.batch_size = batch["input_ids"].shape[0]
    config.stage = loop.stage_config(3)
    config.optim.clip_norm = None  # torch side has no clipping either
    trainer = loop.Trainer(config, tempfile.mkdtemp(), devices=jax.devices()[:1])
    params0 = jax.tree.map(np.asarray, trainer.state.params)
    gb = loop.global_batch(batch, trainer.batch_sharding)
    compiled = trainer.step_fn.lower(trainer.state, gb).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", float("nan")))
    state, metrics = compiled(trainer.state, gb)
    first_loss = float(metrics["loss"])
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        state, metrics = compiled(state, loop.global_batch(batch, trainer.batch_sharding))
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - t)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params0))
    return dict(step_s=statistics.median(times), flops=flops, first_loss=first_loss, params=params0,
                n_params=n_params)


def bench_torch(config, params, batch, iters, lr):
    import torch
    from transformers import JanusForConditionalGeneration

    from unimm_jax.api import JanusModel, save_pretrained

    d = tempfile.mkdtemp()
    save_pretrained(JanusModel(config.model, params), os.path.join(d, "hf"), format="hf", overwrite=True)
    model = JanusForConditionalGeneration.from_pretrained(os.path.join(d, "hf"), dtype=torch.float32)
    model.train()
    trainable = [p for n, p in model.named_parameters() if "vqmodel" not in n and "generation" not in n]
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    ids = torch.as_tensor(batch["input_ids"], dtype=torch.long)
    labels = torch.as_tensor(np.concatenate([batch["input_ids"][:, :1], batch["target_ids"]], 1)[:, 1:], dtype=torch.long)
    px = torch.as_tensor(batch["pixel_values"][:, 0]).permute(0, 3, 1, 2).contiguous()

    def step():
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=ids, pixel_values=px, logits_to_keep=0)
        logits = out.logits.float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        opt.step()
        return float(loss)

    first = step()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return dict(step_s=statistics.median(times), first_loss=first)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs", "shapes_tiny.py"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args()
    config = load_config(args.config)
    # transformers' Janus VQ hard-codes 32 GroupNorm groups; the VQ is frozen and outside the
    # timed step in both frameworks, so give it reference-compatible widths for loading.
    config.model.vq.base_channels = max(32, config.model.vq.base_channels)
    config.model.vq.norm_groups = 32
    batch = understanding_batch(config.model, args.batch, args.seq)
    tokens = args.batch * args.seq
    peak = matmul_peak()
    j = bench_jax(config, batch, args.iters)
    mfu = j["flops"] / j["step_s"] / peak
    print(f"devices: {jax.devices()[0].device_kind} x1, cpu cores: {os.cpu_count()}")
    print(f"measured f32 matmul peak: {peak / 1e9:.1f} GFLOP/s")
    print(f"model params: {j['n_params'] / 1e6:.2f} M; batch {args.batch} x {args.seq} = {tokens} tokens")
    print(f"jax   step {j['step_s'] * 1e3:.0f} ms  {tokens / j['step_s']:.0f} tokens/s  "
          f"XLA flops/step {j['flops'] / 1e9:.1f} G (6ND {6 * j['n_params'] * tokens / 1e9:.1f} G)  "
          f"MFU {100 * mfu:.1f}%  first loss {j['first_loss']:.4f}")
    if not args.no_torch:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        t = bench_torch(config, j["params"], batch, args.iters, config.optim.learning_rate)
        print(f"torch step {t['step_s'] * 1e3:.0f} ms  {tokens / t['step_s']:.0f} tokens/s  first loss "
              f"{t['first_loss']:.4f}  (torch {torch.__version__}, {torch.get_num_threads()} threads)")
        print(f"speed ratio torch/jax step time: {t['step_s'] / j['step_s']:.2f}x")


if __name__ == "__main__":
    main()
