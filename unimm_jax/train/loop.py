"""The Janus trainer: `train(config, workdir)` and the whole default job `run(config, workdir)`.

    mesh      = make_mesh(**config.mesh)                 -1 fills the rest; rules in config.sharding
    params    = sharded init (or resumed)                fp32 master weights, fsdp/tensor sharded
    tx        = make_optimizer(config.optim, stage)      AdamW, warmup-cosine, clip, decay mask
    for step: state, metrics = jit(train_step)(state, global batch)   explicit in/out shardings
              metrics -> W/metrics.jsonl (+ TensorBoard); checkpoint every N (async, keep-N,
              with the Grain iterator); SIGTERM/SIGINT -> save and return cleanly

Re-running the same command resumes from the newest finalized checkpoint in W/ckpt: the state
(params, optimizer, step, RNG) and the data iterator are restored, onto whatever mesh this run
uses, so the losses continue exactly as in an uninterrupted run.

JanusFlow (config.kind "janusflow") runs this same loop: `model_hooks` swaps in its module,
sharded init, step and batch check (`flow_step.FLOW_HOOKS`), and `make_data_iterator` its Grain
batches (`flow_trainer`); `run` hands the whole flow job to `flow_trainer.run_flow`.

Config blocks read here (configs/shapes_tiny.py has them all): seed, mesh, sharding, model,
data, tokenizer, optim, stage, train, eval. Unknown top-level blocks are an error.

Data sources (`config.data.source`):
  "shapes"    - the Grain pipeline over the synthetic shapes world (unimm_jax.data.pipeline);
                generation images are VQ-encoded by the trained tokenizer.
  "synthetic" - random batches obeying the batch contract (tests, benchmarks, smoke runs of
                large configs): deterministic per (seed, step), so 1 and N processes see the
                same global batch.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Callable, Mapping

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec

from unimm_jax import sharding as shd
from unimm_jax.api import logical_axes
from unimm_jax.data.batch import FEATURES, TASKS
from unimm_jax.models.janus import Janus
from unimm_jax.models.janus_config import num_image_tokens, num_understanding_tokens, validate_janus_config
from unimm_jax.models.vq import l2_normalize
from unimm_jax.train import step as step_lib
from unimm_jax.train.checkpoint import Checkpointer, shared_preemption_guard
from unimm_jax.train.metrics import MetricsLogger
from unimm_jax.train.optimizer import make_optimizer, make_schedule, stage_trainable, trainable_mask
from unimm_jax.train.state import TrainState, abstract_train_state, state_shardings

PRE_STAGE_DIR = "pre_stage"
KNOWN_BLOCKS = ("kind", "seed", "mesh", "sharding", "model", "data", "tokenizer", "vision_pretrain",
                "optim", "pre_stage", "stage", "train", "eval")

# Janus-Pro's three stages as trainable sets (paths are regexes over param path components).
# Stage 1 trains the adaptors and the image head; stage 2 all but the two encoders; stage 3
# also the understanding encoder. The VQ tokenizer is trained separately and always frozen.
JANUS_PRO_STAGES = {
    1: dict(trainable=("aligner", "gen_aligner", "gen_embed", "gen_head"), frozen=("vq",)),
    2: dict(trainable=(), frozen=("vision", "vq")),
    3: dict(trainable=(), frozen=("vq",)),
}


def stage_config(n: int, mixture: tuple[int, int, int] = (5, 1, 4)) -> ml_collections.ConfigDict:
    """`config.stage` for Janus-Pro stage n, with its data ratios (understanding, text, generation)."""
    if n not in JANUS_PRO_STAGES:
        raise ValueError(f"stage must be one of {sorted(JANUS_PRO_STAGES)}, got {n!r}.")
    s = JANUS_PRO_STAGES[n]
    return ml_collections.ConfigDict(dict(
        name=n, trainable=list(s["trainable"]), frozen=list(s["frozen"]),
        mixture=dict(zip(TASKS, mixture))))


def pre_stage_block(num_steps: int = 0, stage: int = 2, mixture: tuple[int, int, int] = (1, 0, 0),
                    data: dict | None = None) -> ml_collections.ConfigDict:
    """`config.pre_stage`: an LLM stage trained before the main one (`config.stage`,
    `config.train`), which then starts from its params, as Janus-Pro trains stage 2 from stage 1.

    It runs in W/pre_stage (its own ckpt/, metrics.jsonl) with the main stage's optimizer
    settings, its own schedule over `num_steps`, the trainable set of Janus-Pro stage `stage`,
    its own data `mixture` (understanding, text, generation) and `data`: fields of config.data
    it sets for itself (e.g. dict(batch_size=4, question_kinds=("color", "shape"))).
    num_steps 0: no pre-stage.
    """
    return ml_collections.ConfigDict(dict(num_steps=int(num_steps), stage=int(stage),
                                          mixture=dict(zip(TASKS, mixture)), data=dict(data or {})))


def pre_stage_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict | None:
    """The full config the pre-stage trains with (None when config.pre_stage is absent or has
    num_steps 0): `config` with its stage, mixture and step count, no periodic eval."""
    pre = config.get("pre_stage", None)
    if pre is None or int(pre.get("num_steps", 0)) == 0:
        return None
    unknown = sorted(set(pre.keys()) - {"num_steps", "stage", "mixture", "data"})
    if unknown:
        raise ValueError(f"config.pre_stage has unknown field(s) {unknown}; known: ['data', 'mixture', 'num_steps', "
                         f"'stage'].")
    data = dict(pre.get("data", None) or {})
    if "mixture" in data:
        raise ValueError("config.pre_stage.data.mixture: set the pre-stage's mixture as config.pre_stage.mixture.")
    unknown = sorted(set(data) - set(config.data.keys()))
    if unknown:
        raise ValueError(f"config.pre_stage.data has unknown field(s) {unknown}: it sets fields of config.data "
                         f"({sorted(config.data.keys())}).")
    if int(pre.num_steps) < 0:
        raise ValueError(f"config.pre_stage.num_steps={pre.num_steps} must be >= 0 (0: no pre-stage).")
    warmup = int(config.optim.get("warmup_steps", 0))
    if int(pre.num_steps) <= warmup:
        raise ValueError(f"config.pre_stage.num_steps={pre.num_steps} must be larger than optim.warmup_steps="
                         f"{warmup}: the pre-stage runs its own warmup + decay schedule.")
    mixture = dict(pre.get("mixture", {}))
    unknown = sorted(set(mixture) - set(TASKS))
    if unknown:
        raise ValueError(f"config.pre_stage.mixture has unknown task(s) {unknown}; tasks are {list(TASKS)}.")
    try:  # stage_config checks the stage number; the message gains the field's full name
        stage = stage_config(int(pre.get("stage", 2)), tuple(mixture.get(t, 0) for t in TASKS))
    except ValueError as e:
        raise ValueError(f"config.pre_stage.{e}") from None
    sub = config.copy_and_resolve_references()
    with sub.unlocked():  # unimm-train's config flags lock the config
        del sub["pre_stage"]
        sub.stage = stage
        sub.train.num_steps = int(pre.num_steps)
        sub.train.eval_every = 0
        for key, value in data.items():
            sub.data[key] = value
    return sub


def train_block(**overrides) -> ml_collections.ConfigDict:
    """`config.train` with defaults; every field is documented inline."""
    cfg = dict(
        num_steps=100,  # optimizer updates, each on data.batch_size rows (in optim.grad_accum_steps micro-batches)
        log_every=10,  # updates between metrics.jsonl lines
        checkpoint_every=100,  # updates between checkpoints (the last step always saves)
        keep_checkpoints=3,
        async_checkpoints=True,
        eval_every=0,  # updates between periodic evaluations (0: only at the end)
        max_consecutive_skips=5,  # NaN/inf steps tolerated in a row before stopping with an error
        progress_bar=True,
        tensorboard=True,
        # Per-task loss weights {understanding, text, generation}: the loss becomes the weighted
        # mean of per-task means (step.batch_loss). None: token-weighted mean, as Janus trains.
        task_weights=ml_collections.FieldReference(None, field_type=dict),
        # Start gen_embed (the LLM's input table of VQ codes, [K, codebook_dim]) from the trained
        # VQ's own code vectors (`gen_embed_from_vq`), so codes that look alike start alike.
        gen_embed_from_vq=False,
    )
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def task_weight_vector(weights) -> tuple[float, ...]:
    """config.train.task_weights (a mapping task -> weight) as a tuple in TASKS order; a task
    left out weighs 0. Raises ValueError on an unknown task or a negative / all-zero weight."""
    from unimm_jax.data.batch import TASKS

    weights = dict(weights)
    unknown = sorted(set(weights) - set(TASKS))
    if unknown:
        raise ValueError(f"train.task_weights has unknown task(s) {unknown}; tasks are {list(TASKS)}.")
    vec = tuple(float(weights.get(t, 0.0)) for t in TASKS)
    if min(vec) < 0 or sum(vec) <= 0:
        raise ValueError(f"train.task_weights must be >= 0 with a positive sum, got {weights}.")
    return vec


# ---------------------------------------------------------------------------------------------
# Config, mesh, params
# ---------------------------------------------------------------------------------------------


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming an unknown block or a missing one."""
    unknown = sorted(set(config.keys()) - set(KNOWN_BLOCKS))
    if unknown:
        raise ValueError(f"config has unknown top-level field(s) {unknown}; known: {list(KNOWN_BLOCKS)}.")
    for need in ("mesh", "model", "data", "optim", "train"):
        if need not in config:
            raise ValueError(f"config has no `{need}` block; see configs/shapes_tiny.py for a full config.")
    unknown = sorted(set(config.train.keys()) - set(train_block().keys()))
    if unknown:
        raise ValueError(f"config.train has unknown field(s) {unknown}; known: {sorted(train_block().keys())}.")


def rules_of(config) -> tuple:
    rules = config.get("sharding", {}).get("rules", None) if "sharding" in config else None
    return tuple(tuple(r) for r in rules) if rules else shd.DEFAULT_RULES


def mesh_of(config, devices=None) -> jax.sharding.Mesh:
    """The (data, fsdp, tensor) mesh of config.mesh over `devices` (default: all)."""
    m = config.mesh
    return shd.make_mesh(m.get("data", -1), m.get("fsdp", 1), m.get("tensor", 1), devices=devices)


def batch_sharding(mesh, rules) -> NamedSharding:
    """Batch arrays split their leading (row) axis over the mesh's batch axes."""
    return NamedSharding(mesh, shd.logical_to_spec(("batch",), rules, mesh))


def batch_shards(mesh, rules) -> int:
    spec = shd.logical_to_spec(("batch",), rules, mesh)[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else spec
    return int(np.prod([mesh.shape[a] for a in axes]))


def _init_inputs(m):
    s = m.vision.image_size
    ids = jnp.full((1, num_understanding_tokens(m) + 2), m.tokens.image_token_id, jnp.int32)
    return (ids, jnp.zeros((1, s, s, 3)), jnp.zeros((1, num_image_tokens(m)), jnp.int32),
            jnp.zeros((1, m.vq.image_size, m.vq.image_size, 3)))


def init_params(model_cfg, mesh, rules, seed: int):
    """(params, shardings): float32 params initialised directly in their sharded layout."""
    module = Janus(model_cfg)

    def init(key):
        return nn.unbox(module.init(key, *_init_inputs(model_cfg), method=Janus.init_all))["params"]

    shapes = jax.eval_shape(init, jax.random.key(seed))
    shardings = shd.params_shardings(logical_axes(model_cfg), shapes, mesh, rules)
    params = jax.jit(init, out_shardings=shardings)(jax.random.key(seed))
    return params, shardings


JANUS_HOOKS = dict(validate=validate_janus_config, module=Janus, init_params=init_params,
                   train_step=step_lib.train_step, check_batch=step_lib.check_train_batch,
                   logical_axes=logical_axes)


def is_flow(config) -> bool:
    """True for a JanusFlow run (config.kind "janusflow" or model.family "janusflow")."""
    return config.get("kind", "janus") == "janusflow" or config.model.get("family") == "janusflow"


def model_hooks(config) -> dict:
    """The model-specific pieces the Trainer uses: validate(model_cfg), module(model_cfg),
    init_params(model_cfg, mesh, rules, seed) -> (params, shardings), train_step(state, batch,
    module=, tx=, schedule=, grad_accum_steps=), check_batch(host batch, model_cfg, batch_divisor=),
    logical_axes(model_cfg) -> PartitionSpecs like the params (for optim.optimizer="muon").
    Janus's by default; `flow_step.FLOW_HOOKS` (rectified flow + REPA) for JanusFlow."""
    if is_flow(config):
        from unimm_jax.train.flow_step import FLOW_HOOKS

        return FLOW_HOOKS
    return JANUS_HOOKS


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def synthetic_batch(model_cfg, data_cfg, seed: int, index: int) -> dict:
    """A random global batch obeying the contract: packed rows of understanding (one image),
    text and generation examples. Same (seed, index) -> same batch on every process."""
    rng = np.random.default_rng([seed, index])
    b, t = data_cfg.batch_size, data_cfg.seq_len
    m = max(1, data_cfg.get("max_images_per_row", 1))
    s = model_cfg.vision.image_size
    n_und, n_gen = num_understanding_tokens(model_cfg), num_image_tokens(model_cfg)
    v, k = model_cfg.llm.vocab_size, model_cfg.vq.codebook_size
    special = set(model_cfg.tokens.values())
    words = np.array([i for i in range(v) if i not in special])
    out = {n: np.zeros((b, t), dt) for n, (dt, nd) in FEATURES.items() if nd == 2 and n != "image_valid"}
    out["pixel_values"] = np.zeros((b, m, s, s, 3), np.float32)
    out["image_valid"] = np.zeros((b, m), bool)
    tok = model_cfg.tokens
    for r in range(b):
        task = r % 3
        seq, is_img = [tok.bos_token_id], [False]
        n_text = int(rng.integers(4, 12))
        seq += list(rng.choice(words, n_text))
        is_img += [False] * n_text
        if task == 0:  # understanding: <boi> placeholders <eoi> question answer
            seq += [tok.boi_token_id] + [tok.image_token_id] * n_und + [tok.eoi_token_id]
            is_img += [False] * (n_und + 2)
            out["pixel_values"][r, 0] = rng.uniform(-1, 1, (s, s, 3))
            out["image_valid"][r, 0] = True
            ans = list(rng.choice(words, 2)) + [tok.eos_token_id]
            seq += ans
            is_img += [False] * len(ans)
        elif task == 2:  # generation: prompt <boi> codes
            seq += [tok.boi_token_id] + list(rng.integers(0, k, n_gen))
            is_img += [False] + [True] * n_gen
        seq = seq[: t + 1]
        is_img = is_img[: t + 1]
        n = len(seq) - 1
        out["input_ids"][r, :n] = seq[:n]
        out["input_is_image"][r, :n] = is_img[:n]
        out["target_ids"][r, :n] = seq[1:]
        out["target_is_image"][r, :n] = is_img[1:]
        out["loss_mask"][r, :n] = 1.0
        out["loss_mask"][r, :n_text // 2] = 0.0  # the "prompt" part is not trained
        out["task_ids"][r, :n] = task
        out["segment_ids"][r, :n] = 1
        out["positions"][r, :n] = np.arange(n)
    return out


class SyntheticSource:
    """Grain random-access source: record i = this process's rows of the global batch
    `batch_fn(i)` (a dict of arrays with `batch_size` rows), so every process count sees the
    same global batches (Janus `synthetic_batch`, the flow trainer's synthetic batches)."""

    def __init__(self, batch_fn, batch_size: int, process_index: int, process_count: int, length=1 << 30):
        self.batch_fn, self.rows = batch_fn, int(batch_size) // process_count
        self.pi, self.length = process_index, length

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        full = self.batch_fn(int(i))
        return {k: v[self.pi * self.rows:(self.pi + 1) * self.rows] for k, v in full.items()}


def make_data_iterator(config, *, image_encoder: Callable | None = None, tokenizer=None, tokens=None):
    """The checkpointable per-process iterator of batch dicts for `config.data.source`."""
    d = config.data
    pc, pi = jax.process_count(), jax.process_index()
    if d.batch_size % pc:
        raise ValueError(f"data.batch_size={d.batch_size} must divide over {pc} processes.")
    source = d.get("source", "shapes")
    if is_flow(config):  # prompt ids + image latents instead of packed token rows
        from unimm_jax.train import flow_trainer

        return flow_trainer.make_flow_data_iterator(config, tokenizer=tokenizer)
    if source == "synthetic":
        return iter(grain.MapDataset.source(
            SyntheticSource(lambda i: synthetic_batch(config.model, d, config.seed, i), d.batch_size, pi, pc)
        ).to_iter_dataset())
    if source == "shapes":
        from unimm_jax.data import pipeline

        data_cfg = ml_collections.ConfigDict(d.to_dict())
        del data_cfg["source"]
        if "stage" in config and config.stage.get("mixture"):
            data_cfg.mixture = dict(config.stage.mixture)
        return pipeline.make_train_iterator(
            data_cfg, tokenizer=tokenizer, tokens=tokens,
            num_image_tokens=num_understanding_tokens(config.model), image_encoder=image_encoder,
            process_index=pi, process_count=pc)
    raise ValueError(f"data.source={source!r} is not one of 'shapes', 'synthetic'.")


def global_batch(local: dict, sharding: NamedSharding) -> dict:
    """Per-process rows -> global jax.Arrays split over the batch axes (one or many processes)."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------


class Trainer:
    """Everything `train` builds before its loop: mesh, state, jitted step, checkpointer."""

    def __init__(self, config, workdir, *, init_params_fn: Callable | None = None, devices=None):
        check_config(config)
        self.hooks = model_hooks(config)
        self.hooks["validate"](config.model)
        self.config, self.workdir = config, os.fspath(workdir)
        self.rules = rules_of(config)
        self.mesh = mesh_of(config, devices)
        self.module = self.hooks["module"](config.model)
        n_shards = batch_shards(self.mesh, self.rules)
        if config.data.batch_size % n_shards:
            raise ValueError(
                f"data.batch_size={config.data.batch_size} does not divide over the mesh's "
                f"{n_shards} batch shards (mesh {dict(self.mesh.shape)}); use a multiple of {n_shards}.")
        self.local_divisor = max(1, n_shards // jax.process_count())
        self.accum = int(config.optim.get("grad_accum_steps", 1))
        if config.data.batch_size % (n_shards * self.accum):
            raise ValueError(
                f"data.batch_size={config.data.batch_size} must split into optim.grad_accum_steps="
                f"{self.accum} micro-batches over the mesh's {n_shards} batch shards; use a multiple "
                f"of {n_shards * self.accum}.")
        self.total_steps = int(config.train.num_steps)
        # Init runs outside the logical-rules context: flax would otherwise apply activation
        # constraints to the boxed params; placement comes from out_shardings instead.
        params, self.param_shardings = self.hooks["init_params"](config.model, self.mesh, self.rules, config.seed)
        if init_params_fn is not None:
            params = init_params_fn(params)
        self.trainable = stage_trainable(config.get("stage", None))
        # Lazily: Muon alone needs the logical axes, which an abstract init of the model finds.
        self.tx = make_optimizer(config.optim, params, self.trainable, total_steps=int(config.train.num_steps),
                                 logical_axes=lambda: self.hooks["logical_axes"](config.model))
        self.schedule = make_schedule(config.optim, int(config.train.num_steps))
        pa = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          params, self.param_shardings)
        self.abstract_state = abstract_train_state(pa, self.tx, NamedSharding(self.mesh, PartitionSpec()))
        self.state_shardings = state_shardings(self.abstract_state)
        self.state = jax.jit(lambda p: TrainState.create(p, self.tx, jax.random.key(config.seed)),
                             out_shardings=self.state_shardings)(params)
        self.batch_sharding = batch_sharding(self.mesh, self.rules)
        replicated = NamedSharding(self.mesh, PartitionSpec())
        # Frozen params' gradients are never formed (the step stops them), not computed and zeroed.
        extra = {} if self.trainable is None else {"trainable": trainable_mask(params, self.trainable)}
        if config.train.get("task_weights"):
            extra["task_weights"] = task_weight_vector(config.train.task_weights)
        fn = lambda s, b: self.hooks["train_step"](s, b, module=self.module, tx=self.tx,
                                              schedule=self.schedule, grad_accum_steps=self.accum, **extra)
        self.step_fn = jax.jit(fn, in_shardings=(self.state_shardings, self.batch_sharding),
                               out_shardings=(self.state_shardings, replicated), donate_argnums=(0,))

    def _ctx(self):
        import contextlib

        # Only the mesh: params and batches get explicit shardings and XLA propagates them
        # through the step. (flax's logical-rules context would also constrain the params that
        # nn.scan re-boxes inside `apply`, which fails for DenseGeneral kernels.)
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        return stack

    def num_params(self) -> tuple[int, int]:
        """(total, trainable) parameter counts."""
        mask = trainable_mask(self.state.params, self.trainable)
        sizes = jax.tree.map(lambda x: int(np.prod(x.shape)), self.state.params)
        total = sum(jax.tree.leaves(sizes))
        return total, sum(s for s, m in zip(jax.tree.leaves(sizes), jax.tree.leaves(mask)) if m)

    def step(self, local_batch: dict):
        """One checked update on a per-process batch; returns the metrics (device scalars)."""
        self.hooks["check_batch"](local_batch, self.config.model, batch_divisor=self.local_divisor)
        with self._ctx():
            self.state, metrics = self.step_fn(self.state, global_batch(local_batch, self.batch_sharding))
        return metrics


def _log_line(metrics: dict, dt: float, tokens: int) -> dict:
    out = {k: float(v) for k, v in jax.device_get(metrics).items()}
    out["tokens_per_s"] = tokens / max(dt, 1e-9)
    out["step_time_s"] = dt
    return {k: v for k, v in out.items() if not (k.startswith("loss/") or k.startswith("accuracy/")) or np.isfinite(v)}


def _log_eval(logger: MetricsLogger, step: int, summary: Mapping | None) -> None:
    """An evaluation's {"scalars", "images"} into metrics.jsonl / TensorBoard (None: nothing)."""
    if not summary:
        return
    if summary.get("scalars"):
        logger.write(step, summary["scalars"])
    if summary.get("images"):
        logger.write_images(step, summary["images"])


def eval_summary(result: Mapping) -> dict:
    """A shapes eval (`shapes_eval.evaluate`'s dict) as loggable summaries: scalars
    eval/understanding, eval/generation (overall accuracies) and eval/<task>/<kind>, and the image
    eval/samples (the generation's "samples_grid", uint8 [H, W, 3]) when generation ran."""
    scalars = {}
    for task in ("understanding", "generation"):
        if task in result:
            scalars[f"eval/{task}"] = float(result[task]["overall"])
            scalars.update({f"eval/{task}/{k}": float(v) for k, v in result[task]["per_kind"].items()})
    grid = result.get("generation", {}).get("samples_grid")
    images = {} if grid is None else {"eval/samples": np.asarray(grid)}
    return {"scalars": scalars, "images": images}


def train(config: ml_collections.ConfigDict, workdir, *, data_iter=None, image_encoder=None,
          tokenizer=None, tokens=None, init_params_fn=None, evaluate_fn: Callable | None = None,
          devices=None, stop_at: int | None = None) -> dict:
    """Trains (or resumes) the Janus model of `config` in `workdir`; returns a summary dict.

    workdir gets ckpt/ (orbax), metrics.jsonl, tb/. `data_iter` overrides the configured data
    (it must be a checkpointable Grain iterator); `init_params_fn(params) -> params` patches the
    freshly initialised params (e.g. to load the trained VQ); `evaluate_fn(trainer, step)` runs
    every train.eval_every updates and may return {"scalars": {...}, "images": {...}} for
    metrics.jsonl / TensorBoard at that step; `devices` restricts the mesh; `stop_at` ends the run
    after that update as a preemption would (save, return). Returns {"step",
    "stopped_early", "last": last logged metrics, "trainer"}.
    """
    t_cfg = config.train
    trainer = Trainer(config, workdir, init_params_fn=init_params_fn, devices=devices)
    if data_iter is None:
        data_iter = make_data_iterator(config, image_encoder=image_encoder, tokenizer=tokenizer, tokens=tokens)
    ckpt = Checkpointer(os.path.join(trainer.workdir, "ckpt"), max_to_keep=t_cfg.keep_checkpoints,
                        save_interval_steps=t_cfg.checkpoint_every, async_save=t_cfg.async_checkpoints)
    restored = ckpt.restore_latest(trainer.abstract_state, data_iter)
    start = 0
    if restored is not None:
        trainer.state, start = restored
        logging.info("resumed from step %d in %s", start, ckpt.directory)
    total, trainable = trainer.num_params()
    logging.info("params: %d total, %d trainable; mesh %s", total, trainable, dict(trainer.mesh.shape))
    logger = MetricsLogger(trainer.workdir, use_tensorboard=t_cfg.tensorboard, resume_step=start)
    bar = None
    if t_cfg.progress_bar and jax.process_index() == 0:
        from tqdm import tqdm

        bar = tqdm(total=trainer.total_steps, initial=start, desc="train", dynamic_ncols=True)
    step, skips, stopped, last = start, 0, False, {}
    tokens_per_step = config.data.batch_size * config.data.seq_len
    t0, n0 = time.perf_counter(), step
    try:
        with ckpt.preemption_guard():
            while step < trainer.total_steps:
                metrics = trainer.step(next(data_iter))
                skipped = float(metrics["skipped"]) > 0  # one host sync per step: the NaN guard
                if skipped:
                    skips += 1
                    logging.warning("step %d: non-finite loss or gradient; update skipped (%d in a row).",
                                    step, skips)
                    logger.write(step, {"skipped": 1.0, "loss": float(metrics["loss"])})
                    if skips >= t_cfg.max_consecutive_skips:
                        raise FloatingPointError(
                            f"{skips} consecutive non-finite steps at step {step}; stopping without "
                            f"saving. The last good checkpoint is step {ckpt.latest_step()} in "
                            f"{ckpt.directory}. Lower optim.learning_rate or check the data.")
                    continue
                skips = 0
                step = int(trainer.state.step)
                if bar is not None:
                    bar.update(1)
                if step % t_cfg.log_every == 0 or step == trainer.total_steps:
                    dt = time.perf_counter() - t0
                    last = _log_line(metrics, dt / max(step - n0, 1), tokens_per_step)
                    logger.write(step, last)
                    if bar is not None:
                        bar.set_postfix(loss=f"{last['loss']:.4f}")
                    t0, n0 = time.perf_counter(), step
                ckpt.save(step, trainer.state, data_iter)
                if evaluate_fn is not None and t_cfg.eval_every and step % t_cfg.eval_every == 0 \
                        and step < trainer.total_steps:
                    _log_eval(logger, step, evaluate_fn(trainer, step))
                    t0 = time.perf_counter()
                if ckpt.stop_requested(step) or (stop_at is not None and step >= stop_at):
                    logging.warning("stop requested: saving step %d and exiting.", step)
                    stopped = True
                    break
            ckpt.save(step, trainer.state, data_iter, force=True)
            ckpt.wait()
    finally:
        if bar is not None:
            bar.close()
        logger.close()
        ckpt.close()
    return {"step": step, "stopped_early": stopped, "last": last, "trainer": trainer}


# ---------------------------------------------------------------------------------------------
# The whole job: data -> tokenizer -> model -> export -> eval
# ---------------------------------------------------------------------------------------------


def _shapes_setup(config, workdir):
    """Builds the shapes world into config.data.data_dir (default W/data); returns the tokenizer
    and the tokens dict of config.model."""
    from unimm_jax.data.shapes_tfds import build_shapes_world
    from unimm_jax.data.shapes_vocab import build_shapes_tokenizer

    if not config.data.get("data_dir"):
        config.data.data_dir = os.path.join(workdir, "data")
    d = config.data
    if jax.process_index() == 0:
        build_shapes_world(d.data_dir, d.image_size, d.num_train, d.num_test, d.seed)
    _sync("shapes_world_built")
    return build_shapes_tokenizer(), dict(config.model.tokens)


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _tokenizer_stage(config, workdir):
    """(vq params) from config.tokenizer.checkpoint, or trained into W/tokenizer first; None when
    the tokenizer stage was stopped by a signal (re-running the command resumes it)."""
    from unimm_jax.train import vq_trainer

    src = config.tokenizer.get("checkpoint", "")
    if not src:
        src = os.path.join(workdir, "tokenizer")
        if vq_trainer.train_vq(config.model.vq, config.tokenizer, config.data, src, seed=config.seed)["stopped_early"]:
            return None
        _sync("vq_trained")
    vq_cfg, params = vq_trainer.load_vq(src)
    vq_trainer.check_vq_matches(config.model.vq, vq_cfg)
    return params


def _vision_stage(config, workdir):
    """`pretrain_vision`'s result (config.vision_pretrain, into W/vision): {"params", "metrics",
    "stopped_early"}; None when the config has no such stage or its num_steps is 0 (the tower then
    starts from its random init)."""
    pre = config.get("vision_pretrain")
    if pre is None or int(pre.get("num_steps", 0)) <= 0:
        return None
    from unimm_jax.train import vision_pretrain

    out = vision_pretrain.pretrain_vision(config.model.vision, pre, config.data, os.path.join(workdir, "vision"),
                                          seed=config.seed)
    if not out["stopped_early"]:
        _sync("vision_pretrained")
    return out


def _encoder_stages(config, workdir):
    """(`_tokenizer_stage`'s result, `_vision_stage`'s result): one after the other, or side by
    side in two threads when config.vision_pretrain.concurrent_with_tokenizer is set, both stages
    train here, and the run is single-process. Each stage's small steps leave part of the CPU
    idle: side by side they took 161 s where one after the other took 220 s (2-core CPU,
    benchmarks/RESULTS.md, session 17). Their results do not depend on it (separate data, params
    and RNGs). A signal stops both (each saves; re-running resumes both); if one stage raises,
    the other is stopped at its next step and the error is re-raised here."""
    pre = config.get("vision_pretrain")
    side_by_side = (pre is not None and bool(pre.get("concurrent_with_tokenizer", False))
                    and int(pre.get("num_steps", 0)) > 0 and not config.tokenizer.get("checkpoint", "")
                    and jax.process_count() == 1)
    if not side_by_side:
        vq_params = _tokenizer_stage(config, workdir)
        if vq_params is None:  # preempted: the vision stage has not started
            return None, None
        return vq_params, _vision_stage(config, workdir)
    results = {}
    with shared_preemption_guard() as stop:
        def work(name, stage):
            try:
                results[name] = stage(config, workdir)
            except BaseException as e:  # noqa: BLE001  (re-raised in the main thread below)
                results[name] = e
                stop.set()

        threads = [threading.Thread(target=work, args=(name, stage), name=f"unimm-{name}-stage", daemon=True)
                   for name, stage in (("tokenizer", _tokenizer_stage), ("vision", _vision_stage))]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():  # short joins: the main thread must stay free to take signals
                t.join(0.5)
    for name in ("tokenizer", "vision"):
        if isinstance(results[name], BaseException):
            raise results[name]
    return results["tokenizer"], results["vision"]


def _with_pretrained(params, subtrees):
    """params with the named subtrees (e.g. {"vq": ..., "vision": ...}) replaced by the given
    arrays, each cast and placed like the leaf it replaces. Raises ValueError naming the leaf when
    a pretrained array's shape differs from the model's (a stage dir from another config)."""
    params = dict(params)
    for name, tree in subtrees.items():
        def put(path, new, old):
            if np.shape(new) != old.shape:
                raise ValueError(
                    f"pretrained {name} param {jax.tree_util.keystr(path)} has shape {np.shape(new)} but the "
                    f"model's is {old.shape}: it was trained with another config.model.{name}; delete that "
                    f"stage's directory in the workdir (or point the config at a matching one) and rerun.")
            return jax.device_put(jnp.asarray(new, old.dtype), old.sharding)

        params[name] = jax.tree_util.tree_map_with_path(put, dict(tree), params[name])
    return params


def _pre_stage(config, workdir, init_params_fn, **data_kwargs):
    """Trains (or resumes, or restores when finished) config.pre_stage in W/pre_stage. Returns
    None without a pre-stage, "stopped" when it was preempted, else the main stage's
    init_params_fn: the pre-stage's final params (on the same mesh, so already placed)."""
    sub = pre_stage_config(config)
    if sub is None:
        return None
    out = train(sub, os.path.join(workdir, PRE_STAGE_DIR), init_params_fn=init_params_fn, **data_kwargs)
    if out["stopped_early"]:
        return "stopped"
    params = out.pop("trainer").state.params  # the optimizer state is dropped with the trainer
    logging.info("pre-stage done (%d steps in %s); the main stage starts from its params.", out["step"],
                 os.path.join(workdir, PRE_STAGE_DIR))
    return lambda fresh: jax.tree.map(lambda new, old: new.astype(old.dtype), params, fresh)


def gen_embed_from_vq(vq_params) -> dict:
    """The `gen_embed` params subtree {"embedding": float32 [K, d]} holding the VQ's L2-normalised
    code vectors scaled by sqrt(d): the norm of gen_embed's N(0, 1) init, so the gen aligner
    sees inputs of the scale it was initialised for."""
    unit = np.asarray(l2_normalize(jnp.asarray(vq_params["codebook"]["embedding"], jnp.float32)))
    return {"embedding": unit * np.sqrt(unit.shape[-1])}


def _vq_encoder(model_cfg, vq_params):
    """numpy float32 [n, H, W, 3] -> numpy int32 codes [n, N] with the trained VQ (jitted)."""
    from unimm_jax.models.vq import VQModel

    enc = jax.jit(lambda p, x: VQModel(model_cfg.vq).apply({"params": p}, x, method=VQModel.encode).codes)
    return lambda images: np.asarray(enc(vq_params, jnp.asarray(images, jnp.float32)))


def run(config: ml_collections.ConfigDict, workdir) -> dict:
    """What `unimm-train` runs. kind "vq": train the tokenizer into W/tokenizer. kind "janus"
    (default): [tokenizer] -> [vision pretraining into W/vision] -> train -> export W/model ->
    W/eval.json + W/samples.png (shapes data)."""
    workdir = os.path.abspath(os.fspath(workdir))
    kind = config.get("kind", "janus")
    if kind == "vq":
        from unimm_jax.train import vq_trainer

        _shapes_setup(config, workdir)
        return vq_trainer.train_vq(config.model.vq, config.tokenizer, config.data,
                                   os.path.join(workdir, "tokenizer"), seed=config.seed)["metrics"]
    if is_flow(config):  # JanusFlow: this trainer with the flow hooks, then export + flow eval
        from unimm_jax.train.flow_trainer import run_flow

        if pre_stage_config(config) is not None:
            raise ValueError("config.pre_stage is for Janus models; set pre_stage.num_steps=0 for JanusFlow.")

        return run_flow(config, workdir)
    if kind != "janus":
        raise ValueError(f"config.kind={kind!r} is not one of 'janus', 'janusflow', 'vq'.")
    check_config(config)
    if config.data.get("source", "shapes") != "shapes":
        init = _pre_stage(config, workdir, None)
        if init == "stopped":
            return {"step": 0, "stopped_early": True, "stage": "pre_stage", "last": {}}
        out = train(config, workdir, init_params_fn=init)
        out.pop("trainer")
        return out
    tokenizer, tokens = _shapes_setup(config, workdir)
    vq_params, vision = _encoder_stages(config, workdir)
    if vq_params is None:  # preempted during the tokenizer stage
        return {"step": 0, "stopped_early": True, "stage": "tokenizer", "last": {}}
    if vision is not None and vision["stopped_early"]:  # preempted: re-running the command resumes it
        return {"step": 0, "stopped_early": True, "stage": "vision", "last": {}}
    encoder = _vq_encoder(config.model, vq_params)
    pretrained = {"vq": vq_params}
    if config.train.get("gen_embed_from_vq", False):
        pretrained["gen_embed"] = gen_embed_from_vq(vq_params)
    if vision is not None:
        pretrained["vision"] = vision["params"]

    def periodic_eval(trainer, step):  # a small eval + sample grid into W/eval/step_<N>/
        from unimm_jax.api import JanusModel
        from unimm_jax.evals import shapes_eval

        if jax.process_index() != 0 or "eval" not in config:
            return
        small = ml_collections.ConfigDict(config.eval.to_dict())
        small.num_understanding = min(int(small.num_understanding), 32)
        small.num_generation = min(int(small.num_generation), 16)
        small.grid_size = 4
        host = jax.tree.map(lambda x: jnp.asarray(np.asarray(jax.device_get(x))), trainer.state.params)
        out_dir = os.path.join(workdir, "eval", f"step_{step}")
        res = shapes_eval.evaluate(JanusModel(config.model, host), tokenizer, config.data, small, out_dir)
        logging.info("step %d eval: %s", step, {k: res[k]["overall"] for k in ("understanding", "generation")
                                                if k in res})
        return eval_summary(res)

    data_kwargs = dict(image_encoder=encoder, tokenizer=tokenizer, tokens=tokens)

    def with_stages(params):  # the earlier stages' VQ / tower (and gen_embed) put into fresh params
        return _with_pretrained(params, pretrained)

    init = _pre_stage(config, workdir, with_stages, **data_kwargs)
    if init == "stopped":  # preempted during the pre-stage
        return {"step": 0, "stopped_early": True, "stage": "pre_stage", "last": {}}
    out = train(config, workdir, init_params_fn=init or with_stages, evaluate_fn=periodic_eval, **data_kwargs)
    if out["stopped_early"]:  # preempted: no export/eval; re-running the command resumes
        out.pop("trainer")
        return out
    from unimm_jax.evals import shapes_eval
    from unimm_jax.train.export import export_model

    trainer = out.pop("trainer")
    model_dir = export_model(config.model, trainer.state.params, tokenizer, os.path.join(workdir, "model"))
    _sync("exported")
    if "eval" in config and jax.process_index() == 0:
        from unimm_jax.api import JanusModel

        host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), trainer.state.params)
        model = JanusModel(config.model, jax.tree.map(jnp.asarray, host))
        res = shapes_eval.evaluate(model, tokenizer, config.data, config.eval, workdir)
        out["eval"] = {k: {kk: v[kk] for kk in ("overall", "per_kind", "n")} for k, v in res.items()
                       if k in ("understanding", "generation")}
        with MetricsLogger(workdir, use_tensorboard=config.train.tensorboard) as logger:
            _log_eval(logger, out["step"], eval_summary(res))
        logging.info("eval: %s (model in %s)", out["eval"], model_dir)
    return out
