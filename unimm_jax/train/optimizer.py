"""Optimizer: AdamW + warmup/cosine schedule + clipping + decay mask + stage freezing.

One function builds the whole `optax.GradientTransformation` from the `optim` config block:

    tx = make_optimizer(config.optim, params, stage_trainable(config.stage), total_steps=N)

The chain, innermost first:
  1. `clip_by_global_norm(clip_norm)`   over the *trainable* gradients only (frozen ones never
                                         enter the norm, so freezing a tower does not shrink the
                                         effective clip bound);
  2. `adamw(schedule, b1, b2, eps, weight_decay, mask=decay_mask)`   decoupled weight decay,
                                         multiplied by the learning rate as in PyTorch's AdamW;
                                         with `optimizer="muon"` the hidden weight matrices take
                                         Muon's orthogonalised momentum instead (train/muon.py)
                                         and every other leaf this AdamW;
  3. `multi_transform({"trainable": 1-2, "frozen": set_to_zero()})`   only when some params are
                                         frozen: frozen params get zero updates, and since they are
                                         masked out of 1-2, no Adam moments either.

Weight-decay rule (on parameter paths, "/".join of the pytree keys):
  a leaf is decayed iff it has ndim >= 2, its last path component is not `bias` or `scale`, and
  no pattern in `optim.no_decay` matches its path. So norms (`scale`) and biases are never decayed,
  also when stacked into [layers, dim] by a scanned module; embeddings are decayed unless the
  config names them (e.g. `no_decay=("embed",)`), as in nanoGPT/MaxText-style recipes.

Path patterns (`optim.no_decay`, `stage.trainable`, `stage.frozen`) are regexes matched at the
start of any path component and ending at a component boundary: "aligner" matches
"params/aligner/dense/kernel" but not "params/gen_aligner/..." nor "params/aligner2/...";
"llm/layers_\\d+/attn" and "gen_.*" work as expected. A pattern that matches no parameter is an
error (it is almost always a typo).

Master weights: params are kept in float32 and this optimizer updates them in float32 (Adam
moments take the params' dtype); the model casts to its compute dtype (bf16) inside `apply`.

Steps: `tx.update` is called once per optimizer update and `total_steps` counts updates.
`optim.grad_accum_steps` is validated here but applied by the train step (`train/step.py`,
`train/accumulate.py`): it sums the gradients of k micro-batches of one batch, normalised by the
whole batch's token counts, and makes one update of this optimizer, so accumulation is exact.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import ml_collections
import optax
from absl import logging
from flax.core import meta as flax_meta

Path = tuple[str, ...]
TrainablePredicate = Callable[[Path, Any], bool]

# Every field the `optim` block may hold, with its default (None = required).
_REQUIRED = object()
OPTIM_FIELDS: dict[str, Any] = {
    "learning_rate": _REQUIRED,  # peak learning rate, reached at the end of warmup
    "warmup_steps": 0,  # linear warmup from 0 over this many optimizer updates
    "end_lr_fraction": 0.0,  # cosine floor, as a fraction of learning_rate
    "b1": 0.9,
    "b2": 0.999,
    "eps": 1e-8,
    "weight_decay": 0.0,  # decoupled; multiplied by the current learning rate
    "clip_norm": None,  # global-norm clip bound; None or 0 disables clipping
    "grad_accum_steps": 1,  # micro-batches per update, summed in the train step (train/accumulate.py)
    "no_decay": (),  # extra path patterns excluded from weight decay (e.g. "embed")
    "total_steps": None,  # optimizer updates in the schedule; or pass total_steps=
    "optimizer": "adamw",  # "adamw", or "muon": hidden weight matrices by Muon (train/muon.py)
    "muon_beta": 0.95,  # Muon's Nesterov momentum
    "muon_ns_steps": 5,  # Newton-Schulz iterations orthogonalising the momentum
    "muon_rms": 0.2,  # Muon update RMS, matched to AdamW's so learning_rate / weight_decay carry over
}

OPTIMIZERS = ("adamw", "muon")

_NO_DECAY_NAMES = ("bias", "scale")


def default_config(**overrides) -> ml_collections.ConfigDict:
    """An `optim` block with every field set to its default (learning_rate=1e-4 here)."""
    cfg = {k: (1e-4 if v is _REQUIRED else v) for k, v in OPTIM_FIELDS.items()}
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


# ---------------------------------------------------------------------------------------------
# Paths and patterns
# ---------------------------------------------------------------------------------------------


def _key_str(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_tuple(keypath) -> Path:
    """A jax key path (DictKey/GetAttrKey/SequenceKey...) as a tuple of strings."""
    return tuple(_key_str(k) for k in keypath)


def path_str(path: Path) -> str:
    return "/".join(path)


def flatten_with_paths(tree) -> list[tuple[Path, Any]]:
    """[(path tuple, leaf)] in tree order."""
    return [(path_tuple(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


class PathPatterns:
    """Regexes over "/"-joined param paths, anchored at component boundaries (see module doc)."""

    def __init__(self, patterns: Iterable[str], field: str):
        self.field = field
        self.patterns = tuple(patterns)
        self._compiled = []
        for p in self.patterns:
            if not isinstance(p, str) or not p:
                raise ValueError(f"{field}: patterns must be non-empty strings, got {p!r}.")
            try:
                self._compiled.append(re.compile(rf"(?:{p})(?:/|$)"))
            except re.error as e:
                raise ValueError(f"{field}: {p!r} is not a valid regex ({e}).") from None

    def __bool__(self):
        return bool(self.patterns)

    def _match_one(self, rx, s: str) -> bool:
        starts = [0] + [i + 1 for i, c in enumerate(s) if c == "/"]
        return any(rx.match(s, i) for i in starts)

    def matches(self, path: Path | str) -> bool:
        s = path if isinstance(path, str) else path_str(path)
        return any(self._match_one(rx, s) for rx in self._compiled)

    def check_all_used(self, paths: Sequence[Path]) -> None:
        """Raises if a pattern matches none of `paths` (a typo would otherwise pass silently)."""
        strs = [path_str(p) for p in paths]
        for p, rx in zip(self.patterns, self._compiled):
            if not any(self._match_one(rx, s) for s in strs):
                tops = sorted({"/".join(q.split("/")[:2]) for q in strs})[:12]
                raise ValueError(
                    f"{self.field}: pattern {p!r} matches no parameter. Param paths start with "
                    f"{tops}. Fix the pattern (it matches whole path components)."
                )


class StageTrainable:
    """`trainable(path, leaf) -> bool` built from `stage.trainable` / `stage.frozen` patterns.

    A param is trainable iff (no `trainable` list is given or it matches one) and it matches no
    `frozen` pattern.
    """

    def __init__(self, trainable: Sequence[str] = (), frozen: Sequence[str] = ()):
        self.trainable = PathPatterns(trainable, "stage.trainable")
        self.frozen = PathPatterns(frozen, "stage.frozen")

    def __call__(self, path: Path, leaf=None) -> bool:
        if self.trainable and not self.trainable.matches(path):
            return False
        return not self.frozen.matches(path)

    def check(self, paths: Sequence[Path]) -> None:
        self.trainable.check_all_used(paths)
        self.frozen.check_all_used(paths)

    def __repr__(self):
        return f"StageTrainable(trainable={self.trainable.patterns}, frozen={self.frozen.patterns})"


def stage_trainable(stage_cfg: Mapping | None) -> StageTrainable | None:
    """Builds the `trainable` predicate for `make_optimizer` from a stage config.

    Reads only `stage_cfg.trainable` and `stage_cfg.frozen` (lists of path patterns; other stage
    fields are ignored). Returns None (everything trainable) when `stage_cfg` is None or both
    lists are empty. Example: `trainable=["aligner", "gen_aligner", "gen_head"]` trains only
    those; `frozen=["vision", "vq"]` trains everything but the two towers.
    """
    if stage_cfg is None:
        return None
    get = stage_cfg.get if hasattr(stage_cfg, "get") else (lambda k, d=None: getattr(stage_cfg, k, d))
    trainable, frozen = get("trainable", None) or (), get("frozen", None) or ()
    for name, v in (("trainable", trainable), ("frozen", frozen)):
        if isinstance(v, str):
            raise ValueError(f"stage.{name} must be a list of patterns, got the string {v!r}; "
                             f"write [{v!r}].")
    if not trainable and not frozen:
        return None
    return StageTrainable(tuple(trainable), tuple(frozen))


# ---------------------------------------------------------------------------------------------
# Config and schedule
# ---------------------------------------------------------------------------------------------


def validate_config(optim_cfg: Mapping) -> ml_collections.ConfigDict:
    """Fills defaults and checks every `optim` field; raises ValueError naming the bad one."""
    given = dict(optim_cfg.to_dict() if hasattr(optim_cfg, "to_dict") else optim_cfg)
    unknown = sorted(set(given) - set(OPTIM_FIELDS))
    if unknown:
        raise ValueError(f"optim config: unknown field(s) {unknown}. Known fields: "
                         f"{sorted(OPTIM_FIELDS)}.")
    cfg = {}
    for k, default in OPTIM_FIELDS.items():
        if k in given:
            cfg[k] = given[k]
        elif default is _REQUIRED:
            raise ValueError(f"optim config: `{k}` is required (e.g. --config.optim.{k}=...).")
        else:
            cfg[k] = default

    def bad(k, why):
        raise ValueError(f"optim config: {k}={cfg[k]!r} {why}.")

    def is_num(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    if not is_num(cfg["learning_rate"]) or cfg["learning_rate"] <= 0:
        bad("learning_rate", "must be a positive number")
    if not is_int(cfg["warmup_steps"]) or cfg["warmup_steps"] < 0:
        bad("warmup_steps", "must be an integer >= 0")
    if not is_num(cfg["end_lr_fraction"]) or not 0 <= cfg["end_lr_fraction"] <= 1:
        bad("end_lr_fraction", "must be in [0, 1]")
    for k in ("b1", "b2"):
        if not is_num(cfg[k]) or not 0 <= cfg[k] < 1:
            bad(k, "must be in [0, 1)")
    if not is_num(cfg["eps"]) or cfg["eps"] <= 0:
        bad("eps", "must be a positive number")
    if not is_num(cfg["weight_decay"]) or cfg["weight_decay"] < 0:
        bad("weight_decay", "must be a number >= 0")
    if cfg["clip_norm"] is not None and (not is_num(cfg["clip_norm"]) or cfg["clip_norm"] < 0):
        bad("clip_norm", "must be None, 0 (off) or a positive number")
    if not is_int(cfg["grad_accum_steps"]) or cfg["grad_accum_steps"] < 1:
        bad("grad_accum_steps", "must be an integer >= 1")
    if isinstance(cfg["no_decay"], str):
        bad("no_decay", "must be a list of patterns, not a string")
    cfg["no_decay"] = tuple(cfg["no_decay"] or ())
    if cfg["total_steps"] is not None and (not is_int(cfg["total_steps"]) or cfg["total_steps"] < 1):
        bad("total_steps", "must be None or an integer >= 1")
    if cfg["optimizer"] not in OPTIMIZERS:
        bad("optimizer", f"is not one of {OPTIMIZERS}")
    if not is_num(cfg["muon_beta"]) or not 0 <= cfg["muon_beta"] < 1:
        bad("muon_beta", "must be in [0, 1)")
    if not is_int(cfg["muon_ns_steps"]) or cfg["muon_ns_steps"] < 1:
        bad("muon_ns_steps", "must be an integer >= 1")
    if not is_num(cfg["muon_rms"]) or cfg["muon_rms"] <= 0:
        bad("muon_rms", "must be a positive number")
    return ml_collections.ConfigDict(cfg)


def make_schedule(optim_cfg: Mapping, total_steps: int | None = None) -> optax.Schedule:
    """Learning rate per optimizer update: 0 -> learning_rate linearly over warmup_steps, then
    cosine down to learning_rate * end_lr_fraction at total_steps (constant after).

    lr(s) = lr * s / W                                   for s < W
    lr(s) = lr * (f + (1 - f) * (1 + cos(pi * (s - W) / (T - W))) / 2)   for W <= s <= T
    Returns a function of an int step giving a float32 scalar.
    """
    cfg = validate_config(optim_cfg)
    total = total_steps if total_steps is not None else cfg.total_steps
    if total is None:
        raise ValueError("make_schedule: pass total_steps= or set optim.total_steps.")
    if not isinstance(total, int) or total < 1:
        raise ValueError(f"total_steps={total!r} must be an integer >= 1.")
    if cfg.warmup_steps >= total:
        raise ValueError(f"optim.warmup_steps={cfg.warmup_steps} must be smaller than the "
                         f"{total} total optimizer steps.")
    peak = cfg.learning_rate
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=cfg.warmup_steps, decay_steps=total,
        end_value=peak * cfg.end_lr_fraction)


# ---------------------------------------------------------------------------------------------
# The optimizer
# ---------------------------------------------------------------------------------------------


def _by_path(lookup: dict[Path, Any], what: str):
    """A mask/label function over any tree whose leaf paths are in `lookup`.

    Masks are functions of paths (not fixed trees) because optax hands inner transforms a tree in
    which frozen leaves are replaced by empty `MaskedNode`s, which a fixed tree would not match.
    """

    def fn(tree):
        def one(kp, _):
            p = path_tuple(kp)
            if p not in lookup:
                raise ValueError(f"{what}: parameter {path_str(p)!r} was not in the params tree "
                                 f"given to make_optimizer; build the optimizer from the same "
                                 f"params structure you train.")
            return lookup[p]

        return jax.tree_util.tree_map_with_path(one, tree)

    return fn


def decays(path: Path, leaf, no_decay: PathPatterns | None = None) -> bool:
    """The weight-decay rule (module docstring): ndim >= 2, not bias/scale, not in no_decay."""
    if getattr(leaf, "ndim", 0) < 2 or (path and path[-1] in _NO_DECAY_NAMES):
        return False
    return not (no_decay is not None and no_decay.matches(path))


def make_optimizer(
    optim_cfg: Mapping,
    params,
    trainable: TrainablePredicate | None = None,
    *,
    total_steps: int | None = None,
    logical_axes=None,
) -> optax.GradientTransformation:
    """Builds the training optimizer (see module docstring for the chain and the rules).

    Args:
      optim_cfg: the `optim` block (fields in OPTIM_FIELDS; unknown fields are an error).
      params: the params tree (arrays or ShapeDtypeStructs); used for paths and ndims only.
      trainable: `(path tuple, leaf) -> bool`; None trains everything. A `StageTrainable` is also
        checked for patterns that match nothing.
      total_steps: optimizer updates in the schedule (falls back to optim.total_steps).
      logical_axes: a tree like params of PartitionSpecs of logical axis names, or a function of
        no arguments returning it (called only when needed); required by `optimizer="muon"`,
        which picks its matrices by them (train/muon.py).
    Returns:
      An optax GradientTransformation; its `update` takes float32 grads shaped like params.
    """
    cfg = validate_config(optim_cfg)
    if any(isinstance(x, flax_meta.AxisMetadata) for x in jax.tree.leaves(
            params, is_leaf=lambda x: isinstance(x, flax_meta.AxisMetadata))):
        raise ValueError("make_optimizer: params hold boxed (nn.Partitioned) leaves; pass "
                         "flax.linen.unbox(params), the same tree the train step updates.")
    flat = flatten_with_paths(params)
    if not flat:
        raise ValueError("make_optimizer: params tree has no leaves.")
    paths = [p for p, _ in flat]
    if trainable is not None and hasattr(trainable, "check"):
        trainable.check(paths)
    train_by_path = {p: bool(trainable(p, x)) if trainable is not None else True for p, x in flat}
    if not any(train_by_path.values()):
        raise ValueError(f"make_optimizer: the stage freezes every parameter ({trainable!r}); "
                         f"nothing would train.")
    no_decay = PathPatterns(cfg.no_decay, "optim.no_decay")
    no_decay.check_all_used(paths)
    decay_by_path = {p: decays(p, x, no_decay) for p, x in flat}

    schedule = make_schedule(cfg, total_steps)
    parts = []
    if cfg.clip_norm:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    decay_mask = _by_path(decay_by_path, "weight-decay mask")
    adamw = optax.adamw(learning_rate=schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=decay_mask)
    if cfg.optimizer == "muon":
        parts.append(_muon_and_adamw(cfg, params, logical_axes, schedule, decay_mask, adamw, train_by_path))
    else:
        parts.append(adamw)
    tx = optax.chain(*parts)
    if all(train_by_path.values()):
        return tx
    labels = {p: "trainable" if t else "frozen" for p, t in train_by_path.items()}
    return optax.multi_transform(
        {"trainable": tx, "frozen": optax.set_to_zero()},
        _by_path(labels, "trainable labels"))


def _muon_and_adamw(cfg, params, logical_axes, schedule, decay_mask, adamw, train_by_path):
    """Muon on the hidden matrices, `adamw` on every other leaf (train/muon.py)."""
    from unimm_jax.train import muon

    if logical_axes is None:
        raise ValueError("optim.optimizer='muon' needs the model's logical axes to pick its "
                         "matrices: pass make_optimizer(..., logical_axes=...).")
    if callable(logical_axes):
        logical_axes = logical_axes()
    dims = muon.muon_leaves(params, logical_axes)
    if not any(d is not None for d in dims.values()):
        raise ValueError("optim.optimizer='muon': no parameter is a hidden weight matrix "
                         "(train/muon.py's rule); use optimizer='adamw'.")
    matrices = muon.muon_matrices(
        schedule, _by_path(dims, "muon dimension numbers"), beta=cfg.muon_beta,
        ns_steps=cfg.muon_ns_steps, rms=cfg.muon_rms, weight_decay=cfg.weight_decay,
        decay_mask=decay_mask)
    logging.info(muon.describe({p: d for p, d in dims.items() if train_by_path.get(p, True)}))
    labels = {p: "muon" if d is not None else "adamw" for p, d in dims.items()}
    return optax.multi_transform({"muon": matrices, "adamw": adamw}, _by_path(labels, "muon labels"))


def trainable_mask(params, trainable: TrainablePredicate | None) -> Any:
    """A bool tree like params: True where the param trains (for logging param counts)."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: True if trainable is None else bool(trainable(path_tuple(kp), x)), params)
