"""Reading and writing Janus checkpoints in the three layouts, tensor by tensor.

  hf        transformers save_pretrained: config.json (model_type "janus"), generation_config.json,
            model.safetensors or shards + model.safetensors.index.json
  deepseek  DeepSeek-original: config.json (model_type "multi_modality"), safetensors or
            pytorch_model*.bin (read with torch, mmap, weights only); written as safetensors
  unimm     unimm_config.json + params/ (orbax) + extras.safetensors (source tensors with no
            unimm counterpart, e.g. SigLIP's unused attn_pool, re-emitted to the same layout)

Every directory is written under a temporary name and renamed into place only when complete,
so a failed conversion never leaves a DST that looks finished.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from typing import Callable, Iterator

import jax
import ml_collections
import numpy as np

from unimm_jax.convert import janus_keys as keys
from unimm_jax.convert.janus_config_io import (
    config_from_deepseek,
    config_from_hf,
    deepseek_config_from,
    hf_config_from,
    read_json,
    tokenizer_token_ids,
)
from unimm_jax.convert.safetensors_io import (
    CheckpointError,
    PlannedTensor,
    SafetensorsReader,
    iter_plan_from_arrays,
    write_sharded,
)

FORMATS = ("hf", "deepseek", "unimm")
UNIMM_CONFIG = "unimm_config.json"
SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "preprocessor_config.json", "processor_config.json", "chat_template.json", "chat_template.jinja",
)


def detect_layout(path: str) -> str:
    """'hf', 'deepseek' or 'unimm' for a checkpoint directory; CheckpointError otherwise."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a directory: expected a checkpoint directory.")
    if os.path.exists(os.path.join(path, UNIMM_CONFIG)):
        return "unimm"
    cfg_path = os.path.join(path, "config.json")
    if os.path.exists(cfg_path):
        cfg = read_json(cfg_path)
        if cfg.get("model_type") == "janus":
            return "hf"
        if cfg.get("model_type") == "multi_modality" or "language_config" in cfg:
            return "deepseek"
        raise CheckpointError(
            f"{path}: unknown layout (config.json model_type={cfg.get('model_type')!r}). Expected a transformers "
            "Janus directory (model_type 'janus'), a DeepSeek-original one ('multi_modality') or a unimm "
            f"checkpoint ({UNIMM_CONFIG})."
        )
    raise CheckpointError(
        f"{path}: unknown layout: neither {UNIMM_CONFIG} nor config.json is present. Point at a transformers, "
        "DeepSeek-original or unimm checkpoint directory."
    )


# ---------------------------------------------------------------------------------------------
# sources: transformers-named tensors, read lazily


class TensorSource:
    """Tensors under transformers names; `extra` maps raw keys with no Janus counterpart to loaders."""

    def __init__(self, read: Callable[[str], np.ndarray], names: list[str], extra: dict[str, Callable[[], np.ndarray]],
                 dtype_of: Callable[[str], np.dtype] | None = None):
        self._read, self.names, self.extra = read, set(names), extra
        self._dtype_of = dtype_of

    def dtype(self, name: str) -> np.dtype:
        return self._dtype_of(name) if self._dtype_of else self.read(name).dtype

    def read(self, name: str) -> np.ndarray:
        if name not in self.names:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint.")
        return self._read(name)


def _raw_reader(path: str, stem: str = "model"):
    """(keys, read(key)) over safetensors or torch .bin files in `path`."""
    if glob.glob(os.path.join(path, f"{stem}*.safetensors")):
        r = SafetensorsReader.from_dir(path, stem)
        return r.keys(), r.read, lambda k: r.infos[k].dtype
    bins = sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
    if bins:
        try:
            import torch
        except ImportError as e:
            raise CheckpointError(f"{path} holds pytorch_model*.bin files; reading them needs torch "
                                  "(pip install torch==2.13.0), or convert them to safetensors first.") from e
        tensors = {}
        for b in bins:
            tensors.update(torch.load(b, map_location="cpu", mmap=True, weights_only=True))

        def read(k):
            t = tensors[k]
            if t.dtype == torch.bfloat16:
                import ml_dtypes
                return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
            return t.numpy().copy()

        return list(tensors), read, None
    raise CheckpointError(f"{path}: no weights found (model*.safetensors or pytorch_model*.bin).")


def hf_source(path: str) -> TensorSource:
    names, read, dtype_of = _raw_reader(path)
    return TensorSource(read, names, {}, dtype_of)


def deepseek_readers(raw_key: str, janus_name: str, read) -> dict[str, Callable[[], np.ndarray]] | None:
    """Lazy readers, under transformers' Janus names, of one DeepSeek-layout tensor.

    raw_key: the key in the file; janus_name: that key as DeepSeek's Janus names it (JanusFlow
    prefixes SigLIP differently). A fused SigLIP qkv gives three readers, the position embedding
    drops its batch axis; None when the tensor has no transformers counterpart.
    """
    qkv = keys.qkv_parts_ds(janus_name)
    if qkv:
        layer, leaf = qkv

        def part(j):
            t = read(raw_key)
            n = t.shape[0] // 3
            return t[j * n:(j + 1) * n].copy()

        return {keys.qkv_hf_key(layer, which, leaf): (lambda j=j: part(j)) for j, which in enumerate("qkv")}
    if janus_name == keys.POS_EMBED_DS:
        return {keys.POS_EMBED_HF: lambda: (lambda t: t.reshape(t.shape[-2:]))(read(raw_key))}
    hf = keys.deepseek_to_hf_name(janus_name)
    return None if hf is None else {hf: lambda: read(raw_key)}


def deepseek_source(path: str) -> TensorSource:
    raw_names, read, raw_dtype = _raw_reader(path)
    mapping: dict[str, Callable[[], np.ndarray]] = {}
    origin: dict[str, str] = {}
    extra = {}
    for k in raw_names:
        readers = deepseek_readers(k, k, read)
        if readers is None:
            extra[k] = lambda k=k: read(k)
        for hf, reader in (readers or {}).items():
            mapping[hf] = reader
            origin[hf] = k
    dtype_of = (lambda name: raw_dtype(origin[name])) if raw_dtype else None
    return TensorSource(lambda name: mapping[name](), list(mapping), extra, dtype_of)


# ---------------------------------------------------------------------------------------------
# params <-> transformers-named tensors


def abstract_params(model_cfg: ml_collections.ConfigDict):
    """Shapes of every Janus parameter (no memory): nested dict of ShapeDtypeStruct."""
    from flax import linen as nn
    import jax.numpy as jnp
    from unimm_jax.models.janus import Janus
    from unimm_jax.models.janus_config import num_image_tokens

    m = model_cfg
    s = m.vision.image_size
    n_und = (s // m.vision.patch_size) ** 2
    ids = jnp.full((1, n_und + 2), m.tokens.image_token_id, jnp.int32)
    shapes = jax.eval_shape(
        lambda: nn.unbox(Janus(m).init(
            jax.random.key(0), ids, jnp.zeros((1, s, s, 3)),
            jnp.zeros((1, num_image_tokens(m)), jnp.int32), jnp.zeros((1, m.vq.image_size, m.vq.image_size, 3)),
            method=Janus.init_all,
        ))["params"]
    )
    return shapes


def _leaves(tree, prefix=()):
    for k in sorted(tree):
        v = tree[k]
        if isinstance(v, dict):
            yield from _leaves(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _set(tree: dict, path: tuple[str, ...], value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]):
    for p in path:
        tree = tree[p]
    return tree


class LazyLeaf:
    """A params leaf read from the source only when used (streaming hf/deepseek -> hf/deepseek).

    The most recently loaded leaf is cached, so emitting a stacked leaf layer by layer reads it once.
    """

    _cache: tuple[int, np.ndarray] | None = None

    def __init__(self, shape, dtype, load: Callable[[], np.ndarray]):
        self.shape, self.dtype, self._load = tuple(shape), np.dtype(dtype), load
        self.ndim = len(self.shape)

    def load(self) -> np.ndarray:
        if LazyLeaf._cache is None or LazyLeaf._cache[0] != id(self):
            LazyLeaf._cache = None  # drop the previous leaf before reading the next
            LazyLeaf._cache = (id(self), self._load())
        return LazyLeaf._cache[1]

    def __getitem__(self, i):
        return self.load()[i]

    def __array__(self, dtype=None, copy=None):
        a = self.load()
        return a if dtype is None else a.astype(dtype)


def import_params(source: TensorSource, model_cfg, dtype: str | None = None, lazy: bool = False) -> dict:
    """Builds the unimm params tree (numpy) from transformers-named tensors, one at a time.

    Every expected tensor must be present with the expected shape; the error names the key
    and both shapes. `dtype` casts while streaming (None keeps the checkpoint's dtype).
    """
    params: dict = {}
    used = set()
    for path, spec in _leaves(abstract_params(model_cfg)):
        entry = keys.entry_for(path, len(spec.shape))
        layers = spec.shape[0] if entry.layered else 1
        if lazy:
            names = entry.keys(layers)
            missing = [k for k in names if k not in source.names]
            if missing:
                raise CheckpointError(f"tensor {missing[0]!r} is missing from the checkpoint.")
            used.update(names)
            leaf_dtype = np.dtype(dtype) if dtype else source.dtype(names[0])
            _set(params, path, LazyLeaf(spec.shape, leaf_dtype,
                                        lambda e=entry, s=spec: _read_leaf(source, e, s, dtype)))
            continue
        _set(params, path, _read_leaf(source, entry, spec, dtype))
        used.update(entry.keys(layers))
    return params, sorted(source.names - used)


def _read_leaf(source: TensorSource, entry: keys.Entry, spec, dtype: str | None) -> np.ndarray:
    """One unimm leaf from its transformers tensor(s), checking every shape."""
    path = entry.path
    layers = spec.shape[0] if entry.layered else 1
    inner = spec.shape[1:] if entry.layered else spec.shape
    out = None
    for i, key in enumerate(entry.keys(layers)):
        t = source.read(key)
        want = keys.torch_shape(entry.kind, inner)
        if tuple(t.shape) != want:
            raise CheckpointError(
                f"tensor {key!r} has shape {tuple(t.shape)} but the model config expects {want} "
                f"(unimm parameter {'/'.join(path)}). Check that config.json matches the weights."
            )
        value = entry.from_torch(t, inner)
        if dtype is not None:
            value = value.astype(dtype)
        if out is None:
            out = np.empty(spec.shape, value.dtype)
        (out[i] if entry.layered else out)[...] = value
        del t, value
    return out


def hf_plan(params: dict, model_cfg, dtype: str | None = None) -> list[PlannedTensor]:
    """Transformers-named tensors of `params`, produced lazily in a stable order."""
    plan = []
    for path, arr in _leaves(params):
        entry = keys.entry_for(path, arr.ndim)
        out_dtype = np.dtype(dtype) if dtype else arr.dtype
        if entry.layered:
            for i, key in enumerate(entry.keys(arr.shape[0])):
                shape = keys.torch_shape(entry.kind, arr.shape[1:])
                plan.append(PlannedTensor(key, shape, out_dtype, lambda a=arr, i=i, e=entry: e.to_torch(np.asarray(a[i])).astype(out_dtype, copy=False)))
        else:
            shape = keys.torch_shape(entry.kind, arr.shape)
            plan.append(PlannedTensor(entry.key, shape, out_dtype, lambda a=arr, e=entry: e.to_torch(np.asarray(a)).astype(out_dtype, copy=False)))
    return plan


def deepseek_plan(params: dict, model_cfg, dtype: str | None = None) -> list[PlannedTensor]:
    """DeepSeek-named tensors: renamed transformers tensors, q/k/v fused, pos_embed [1, N, D]."""
    by_name = {t.name: t for t in hf_plan(params, model_cfg, dtype)}
    plan, done = [], set()
    for t in by_name.values():
        if t.name in done:
            continue
        qkv = keys.qkv_parts_hf(t.name)
        if qkv:
            layer, _, leaf = qkv
            parts = [by_name[keys.qkv_hf_key(layer, w, leaf)] for w in "qkv"]
            done.update(p.name for p in parts)
            shape = (sum(p.shape[0] for p in parts),) + tuple(parts[0].shape[1:])
            plan.append(PlannedTensor(keys.qkv_ds_key(layer, leaf), shape, t.dtype,
                                      lambda parts=parts: np.concatenate([p.produce() for p in parts], axis=0)))
            continue
        if t.name == keys.POS_EMBED_HF:
            plan.append(PlannedTensor(keys.POS_EMBED_DS, (1,) + tuple(t.shape), t.dtype, lambda t=t: t.produce()[None]))
            continue
        ds = keys.hf_to_deepseek_name(t.name)
        if ds is None:
            raise CheckpointError(f"no DeepSeek name for {t.name!r}.")
        plan.append(PlannedTensor(ds, t.shape, t.dtype, t.produce))
    return plan


# ---------------------------------------------------------------------------------------------
# whole checkpoints


class Checkpoint:
    """A Janus checkpoint in memory: model config, params (numpy or jax), passthrough extras."""

    def __init__(self, config, params, extras=None, extras_format=None, side_dir=None):
        self.config, self.params = config, params
        self.extras = extras or {}  # raw name -> array, only meaningful for `extras_format`
        self.extras_format = extras_format
        self.side_dir = side_dir  # directory whose tokenizer/processor files travel along


def read_checkpoint(path: str, dtype: str | None = None, lazy: bool = False) -> Checkpoint:
    """Reads any of the three layouts into a Checkpoint (numpy params).

    lazy: leaves are LazyLeaf objects read on use (unimm sources: one orbax group at a time),
    so a conversion holds about one leaf or group at a time.
    """
    layout = detect_layout(path)
    if layout == "unimm":
        from unimm_jax.convert.unimm_format import read_unimm
        return read_unimm(path, dtype, lazy)
    from unimm_jax.convert.janusflow_checkpoint import is_janusflow_dir, read_janusflow_deepseek
    if layout == "deepseek" and is_janusflow_dir(path):  # JanusFlow: its own key map and config
        return read_janusflow_deepseek(path, dtype, lazy)
    tok_ids = tokenizer_token_ids(path)
    if layout == "hf":
        gen_path = os.path.join(path, "generation_config.json")
        cfg = config_from_hf(read_json(os.path.join(path, "config.json")),
                             read_json(gen_path) if os.path.exists(gen_path) else None, tok_ids)
        source = hf_source(path)
    else:
        cfg = config_from_deepseek(read_json(os.path.join(path, "config.json")), tok_ids)
        source = deepseek_source(path)
    params, unused = import_params(source, cfg, dtype, lazy)
    extras = {k: source.extra[k]() for k in source.extra}
    if layout == "hf":
        extras.update({k: source.read(k) for k in unused})
    return Checkpoint(cfg, params, extras, layout, path)


@contextlib.contextmanager
def atomic_directory(dst: str, overwrite: bool = False) -> Iterator[str]:
    """Yields a temporary directory beside `dst`, renamed to `dst` only on success."""
    dst = os.path.abspath(dst)
    if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
        if not overwrite:
            raise CheckpointError(f"{dst} already exists and is not empty; choose a new destination or pass overwrite.")
    parent = os.path.dirname(dst) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(dst) + ".partial-", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(dst):
        shutil.rmtree(dst)
    os.rename(tmp, dst)


def _copy_side_files(src_dir: str | None, dst_dir: str):
    if not src_dir:
        return
    for name in SIDE_FILES:
        p = os.path.join(src_dir, name)
        if os.path.exists(p):
            shutil.copy2(p, os.path.join(dst_dir, name))


def _np_params(params):
    return jax.tree.map(lambda x: x if isinstance(x, LazyLeaf) else np.asarray(x), params)


def write_checkpoint(ckpt: Checkpoint, dst: str, fmt: str, dtype: str | None = None,
                     overwrite: bool = False, max_shard_bytes: int = 5 * 1024**3) -> None:
    """Writes `ckpt` to `dst` in layout `fmt` ('hf' | 'deepseek' | 'unimm'), atomically."""
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown format {fmt!r}; choose one of {FORMATS}.")
    if ckpt.config.get("family", "janus") == "janusflow" and fmt != "unimm":
        from unimm_jax.convert.janusflow_checkpoint import write_janusflow
        return write_janusflow(ckpt, dst, fmt, dtype, overwrite, max_shard_bytes)
    # unimm takes jax arrays as they are (orbax saves each group from its devices, sharded or not);
    # the safetensors layouts read host numpy (LazyLeaf stays lazy).
    params = ckpt.params if fmt == "unimm" else _np_params(ckpt.params)
    first = next(iter(jax.tree.leaves(params)))
    dtype_name = str(np.dtype(dtype) if dtype else first.dtype)
    extras = ckpt.extras if ckpt.extras_format == fmt else {}
    with atomic_directory(dst, overwrite) as tmp:
        if fmt == "unimm":
            from unimm_jax.convert.unimm_format import write_unimm
            write_unimm(tmp, ckpt.config, params, ckpt.extras, ckpt.extras_format, dtype)
        elif fmt == "hf":
            config, generation = hf_config_from(ckpt.config, dtype_name)
            plan = hf_plan(params, ckpt.config, dtype) + list(iter_plan_from_arrays(extras))
            write_sharded(tmp, plan, max_shard_bytes=max_shard_bytes)
            _dump(os.path.join(tmp, "config.json"), config)
            _dump(os.path.join(tmp, "generation_config.json"), generation)
        else:
            plan = deepseek_plan(params, ckpt.config, dtype) + list(iter_plan_from_arrays(extras))
            write_sharded(tmp, plan, max_shard_bytes=max_shard_bytes)
            _dump(os.path.join(tmp, "config.json"), deepseek_config_from(ckpt.config, dtype_name))
        _copy_side_files(ckpt.side_dir, tmp)


def _dump(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, default=lambda o: o.to_dict() if hasattr(o, "to_dict") else list(o))
