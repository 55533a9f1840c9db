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

GPU mode (`--size 1b`, see `gpu_main`): a Janus-Pro-1B-shaped LLM training step in bf16 on one
accelerator, several (attention_impl, remat_policy, batch) variants in one process:

    python benchmarks/train_step.py --size 1b --dtype bfloat16 --seq 4096 \
        --variants cudnn:none:2 pallas:none:2 pallas:dots_no_batch:4 xla:full:2
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from unimm_jax.config_files import load_config


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


def gpu_model_flops(m, b: int, t: int) -> dict:
    """Model FLOPs of one training step of B rows of T tokens (one causal sequence per row).

    matmul params N = L * (4 * H * Dh * D [q,k,v,o with Hq = Hkv] + 3 * D * F [gate, up, down])
    + D * V (lm_head); the embedding lookup is no matmul. dense = 6 * N * B * T (forward 2,
    backward 4); attention = 6 * L * B * T^2 * Hq * Dh (QK^T and PV, 2 * 2 * T^2 * Hq * Dh
    forward, halved for causal, x3 for forward + backward), as MaxText counts it. The
    gen_head (D x D + D x codebook) that the Janus step also applies to every token is
    reported separately and not counted in the model FLOPs.
    """
    c = m.llm
    d, f, v, l = c.hidden_size, c.intermediate_size, c.vocab_size, c.num_layers
    qkvo = d * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
    n = l * (qkvo + 3 * d * f) + d * v
    gen = d * m.gen_head.hidden_size + m.gen_head.hidden_size * m.vq.codebook_size
    dense = 6 * n * b * t
    attn = 6 * l * b * t * t * c.num_heads * c.head_dim
    return dict(n_matmul=n, dense=dense, attention=attn, total=dense + attn, gen_head=6 * gen * b * t)


def bf16_matmul_peak(n: int = 8192, iters: int = 10) -> float:
    """Measured bf16 matmul FLOP/s (n^3 product of random matrices, best of `iters`)."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(k1, (n, n), jnp.bfloat16)
    b = jax.random.normal(k2, (n, n), jnp.bfloat16)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(iters):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def text_batch(m, b: int, t: int, seed: int = 0) -> dict:
    """B rows of T text tokens, one causal sequence per row, loss on every target (no images)."""
    rng = np.random.default_rng(seed)
    special = np.array(sorted(set(m.tokens.values())))
    ids = rng.integers(0, min(m.llm.vocab_size, 100000), (b, t + 1)).astype(np.int32)
    ids[np.isin(ids, special)] = min(set(range(len(special) + 1)) - set(special.tolist()))
    z = np.zeros((b, t), bool)
    s = m.vision.image_size
    return {
        "input_ids": ids[:, :-1], "input_is_image": z, "target_ids": ids[:, 1:], "target_is_image": z,
        "loss_mask": np.ones((b, t), np.float32), "task_ids": np.full((b, t), 1, np.int32),
        "segment_ids": np.ones((b, t), np.int32), "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
        "pixel_values": np.zeros((b, 0, s, s, 3), np.float32), "image_valid": np.zeros((b, 0), bool),
    }


def gpu_main(args):
    """Janus-Pro-`size` LLM step on one accelerator: our `train_step` + `make_optimizer` (AdamW,
    fp32 master params, compute in `--dtype`), Janus-Pro stage 3 trainable set (all but the VQ).
    Each variant `impl:remat:batch` jits its own step on the same params; prints tokens/s and
    MFU against the H100 bf16 dense spec (989 TFLOP/s) and a measured bf16 matmul peak."""
    import functools

    import ml_collections
    from flax import linen as nn

    from unimm_jax.models.janus import Janus
    from unimm_jax.models.janus_config import janus_pro_config, num_image_tokens, num_understanding_tokens
    from unimm_jax.train import step as step_lib
    from unimm_jax.train.optimizer import default_config, make_optimizer, stage_trainable
    from unimm_jax.train.state import TrainState

    dev = jax.devices()[0]
    peak = bf16_matmul_peak()
    print(f"device: {dev.device_kind}; jax {jax.__version__}; measured bf16 matmul peak "
          f"{peak / 1e12:.0f} TFLOP/s; spec peak {args.spec_peak:.0f} TFLOP/s", flush=True)

    def model_cfg(impl="xla", remat="none"):
        m = janus_pro_config(args.size, dtype=args.dtype)
        m.attention_impl = impl  # a FieldReference shared with m.llm.attention_impl
        m.llm.remat_policy = remat
        return m

    m0 = model_cfg()
    s = m0.vision.image_size
    init_inputs = (jnp.full((1, num_understanding_tokens(m0) + 2), m0.tokens.image_token_id, jnp.int32),
                   jnp.zeros((1, s, s, 3)), jnp.zeros((1, num_image_tokens(m0)), jnp.int32),
                   jnp.zeros((1, m0.vq.image_size, m0.vq.image_size, 3)))
    init = jax.jit(lambda key: nn.unbox(Janus(m0).init(key, *init_inputs, method=Janus.init_all))["params"])
    params = init(jax.random.key(0))
    n_total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    trainable = stage_trainable(ml_collections.ConfigDict(dict(trainable=[], frozen=["vq"])))
    tx = make_optimizer(default_config(learning_rate=1e-5, weight_decay=0.1, clip_norm=1.0), params,
                        trainable, total_steps=1000)
    new_state = jax.jit(lambda p: TrainState.create(p, tx, jax.random.key(0)))
    print(f"params: {n_total / 1e9:.3f} B in all (LLM + SigLIP + aligners + VQ + gen head); "
          f"seq {args.seq}", flush=True)
    rows = []
    for variant in args.variants:
        impl, remat, b = variant.split(":")
        b = int(b)
        m = model_cfg(impl, remat)
        fl = gpu_model_flops(m, b, args.seq)
        batch = {k: jnp.asarray(v) for k, v in text_batch(m, b, args.seq).items()}
        step = jax.jit(functools.partial(step_lib.train_step, module=Janus(m), tx=tx), donate_argnums=(0,))
        try:
            state = new_state(params)
            t0 = time.perf_counter()
            state, met = step(state, batch)
            first_loss = float(met["loss"])
            compile_s = time.perf_counter() - t0
            times = []
            for _ in range(args.iters):
                t0 = time.perf_counter()
                state, met = step(state, batch)
                jax.block_until_ready(met["loss"])
                times.append(time.perf_counter() - t0)
            dt = statistics.median(times)
            mem = dev.memory_stats() or {}
            row = dict(variant=variant, step_ms=dt * 1e3, tokens_s=b * args.seq / dt,
                       tflops=fl["total"] / dt / 1e12, mfu_spec=fl["total"] / dt / (args.spec_peak * 1e12),
                       mfu_measured=fl["total"] / dt / peak, first_loss=first_loss,
                       loss=float(met["loss"]), compile_s=compile_s,
                       peak_gib=mem.get("peak_bytes_in_use", 0) / 2**30)
            print("  " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in row.items()), flush=True)
        except Exception as e:  # e.g. out of memory for a batch too large without remat
            row = dict(variant=variant, error=f"{type(e).__name__}: {str(e)[:200]}")
            print(f"  {variant}: failed {row['error']}", flush=True)
        rows.append(row)
        state = met = step = None
    fl1 = gpu_model_flops(m0, 1, args.seq)
    print(f"\nFLOPs/step = 6 * N * B * T + 6 * L * B * T^2 * Hq * Dh with N = {fl1['n_matmul'] / 1e9:.3f} B "
          f"matmul params (LLM layers + lm_head); gen_head adds {fl1['gen_head'] / fl1['total'] * 100:.1f}% "
          f"(not counted)")
    print(f"{'impl:remat:batch':<24} {'step ms':>8} {'tok/s':>8} {'TFLOP/s':>8} {'MFU spec':>9} {'MFU meas':>9} {'GiB':>6}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<24} failed: {r['error'][:80]}")
        else:
            print(f"{r['variant']:<24} {r['step_ms']:>8.0f} {r['tokens_s']:>8.0f} {r['tflops']:>8.0f} "
                  f"{100 * r['mfu_spec']:>8.1f}% {100 * r['mfu_measured']:>8.1f}% {r['peak_gib']:>6.1f}")
    if args.json:
        import json

        with open(args.json, "w") as fh:
            json.dump(dict(device=dev.device_kind, peak_measured=peak, rows=rows), fh, indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs", "shapes_tiny.py"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--size", default=None, help="GPU mode: Janus-Pro preset (1b or 7b) instead of --config")
    ap.add_argument("--dtype", default="bfloat16", help="GPU mode: compute dtype")
    ap.add_argument("--variants", nargs="+", default=["cudnn:none:2", "pallas:none:2"],
                    help="GPU mode: attention_impl:remat_policy:batch per run")
    ap.add_argument("--spec-peak", type=float, default=989.0, help="GPU mode: dense bf16 TFLOP/s spec")
    ap.add_argument("--json", default=None, help="GPU mode: write the rows here")
    args = ap.parse_args()
    if args.size:
        if args.seq == 256:
            args.seq = 4096
        return gpu_main(args)
    config = load_config(args.config)
    # transformers' Janus VQ hard-codes 32 GroupNorm groups; the VQ is frozen and outside the
    # timed step in both frameworks, so give it reference-compatible widths (and encoder) for loading.
    config.model.vq.base_channels = max(32, config.model.vq.base_channels)
    config.model.vq.norm_groups = 32
    config.model.vq.encoder_context = "global"
    config.model.vq.num_res_blocks = max(1, config.model.vq.num_res_blocks)
    # ... and transformers' Janus places one understanding token per VQ code: match the grids.
    from unimm_jax.models.janus_config import num_image_tokens

    config.model.vision.patch_size = config.model.vision.image_size // math.isqrt(num_image_tokens(config.model))
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
