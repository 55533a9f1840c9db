"""DeepSeek-original JanusFlow checkpoints <-> unimm JanusFlow params, tensor by tensor.

DeepSeek key (janus/janusflow/models/modeling_vlm.py)      unimm params path             hook
language_model.model.* / language_model.lm_head.weight      llm/...                       as Janus
vision_und_enc_model.vision_tower.* (fused qkv, pos_embed)  vision/...                    as Janus's vision_model.*
vision_und_enc_aligner.{weight,bias}                        und_aligner/{kernel,bias}     linear
beg_of_und_embed (1, D)                                     beg_of_und_embed (1, D)       copy
vision_gen_enc_model.*                                      gen_encoder/...               janusflow_gen_keys
vision_gen_enc_aligner.{weight,bias}                        gen_enc_aligner/...           linear
vision_gen_dec_model.*                                      gen_decoder/...               janusflow_gen_keys
vision_gen_dec_aligner_norm.weight                          gen_dec_aligner_norm/scale    copy
vision_gen_dec_aligner.{weight,bias}                        gen_dec_aligner/...           linear
unimm_repa_head.layers.{0,2,4}.{weight,bias}                repa_head/dense_{0,1,2}/...   linear (unimm only)

The LLM and SigLIP reuse Janus's one parameter map (`janus_keys`): JanusFlow's names differ
from Janus's only by the `vision_und_enc_model.` prefix. Tensors with no unimm counterpart
(SigLIP's unused attn_pool) travel as extras. Every hook is a transpose or reshape, so
deepseek -> unimm -> deepseek is bit-exact. transformers has no JanusFlow model, so there is
no 'hf' layout for it.
"""
from __future__ import annotations

import os
import shutil

import jax
import numpy as np
from flax import linen as nn
from flax import traverse_util

from unimm_jax.convert import checkpoints as ck
from unimm_jax.convert import janus_keys as keys
from unimm_jax.convert.janus_config_io import read_json, tokenizer_token_ids
from unimm_jax.convert.janusflow_config_io import config_from_deepseek_flow, deepseek_flow_config_from
from unimm_jax.convert.janusflow_gen_keys import (
    gen_decoder_from_torch,
    gen_decoder_to_torch,
    gen_encoder_from_torch,
    gen_encoder_to_torch,
)
from unimm_jax.convert.safetensors_io import CheckpointError, PlannedTensor, iter_plan_from_arrays, write_sharded

VISION_JANUS, VISION_FLOW = "vision_model.", "vision_und_enc_model."
ENC_PREFIX, DEC_PREFIX = "vision_gen_enc_model.", "vision_gen_dec_model."
_LINEARS = {"und_aligner": "vision_und_enc_aligner", "gen_enc_aligner": "vision_gen_enc_aligner",
            "gen_dec_aligner": "vision_gen_dec_aligner"}
_REPA = "unimm_repa_head.layers."
NO_HF = ("transformers has no JanusFlow model, so 'hf' is not a JanusFlow layout; "
         "convert to 'deepseek' (DeepSeek-original) or 'unimm' instead.")


def abstract_flow_params(model_cfg) -> dict:
    """Shapes of every JanusFlow parameter (no memory): nested dict of ShapeDtypeStruct."""
    import jax.numpy as jnp

    from unimm_jax.models.janusflow import JanusFlow
    from unimm_jax.models.janusflow_config import latent_grid, num_understanding_tokens

    m = model_cfg
    s, g = m.vision.image_size, latent_grid(m)
    ids = jnp.concatenate([jnp.array([[m.tokens.bos_token_id, m.tokens.boi_token_id]], jnp.int32),
                           jnp.full((1, num_understanding_tokens(m)), m.tokens.image_token_id, jnp.int32)], axis=1)
    return jax.eval_shape(lambda: nn.unbox(JanusFlow(m).init(
        jax.random.key(0), ids, jnp.zeros((1, s, s, 3)), jnp.zeros((1, g, g, m.latent.channels)),
        method=JanusFlow.init_all))["params"])


def small_leaf_key(path: tuple[str, ...]) -> tuple[str, str]:
    """(DeepSeek key, hook) for a leaf outside llm/vision/gen_encoder/gen_decoder."""
    top, leaf = path[0], path[-1]
    tleaf = {"kernel": "weight", "bias": "bias", "scale": "weight"}.get(leaf)
    if top == "beg_of_und_embed":
        return "beg_of_und_embed", "copy"
    if top in _LINEARS and tleaf:
        return f"{_LINEARS[top]}.{tleaf}", "linear" if leaf == "kernel" else "copy"
    if top == "gen_dec_aligner_norm" and leaf == "scale":
        return "vision_gen_dec_aligner_norm.weight", "copy"
    if top == "repa_head" and tleaf:
        i = int(path[1].split("_")[1])
        return f"{_REPA}{2 * i}.{tleaf}", "linear" if leaf == "kernel" else "copy"
    raise KeyError(f"no DeepSeek JanusFlow key for unimm parameter {'/'.join(path)}")


def _flat(tree) -> dict:
    return traverse_util.flatten_dict(tree) if tree else {}


# ---------------------------------------------------------------------------------------------
# reading


def _janus_view(names, read) -> tuple[ck.TensorSource, dict[str, str]]:
    """The LLM + SigLIP tensors under transformers' Janus names; also {Janus name: raw key}."""
    mapping, origin = {}, {}
    for k in names:
        if k.startswith(VISION_FLOW):
            as_janus = VISION_JANUS + k[len(VISION_FLOW):]
        elif k.startswith("language_model."):
            as_janus = k
        else:
            continue
        for hf, reader in (ck.deepseek_readers(k, as_janus, read) or {}).items():
            mapping[hf] = reader
            origin[hf] = k
    return ck.TensorSource(lambda name: mapping[name](), list(mapping), {}), origin


def _cast(x: np.ndarray, dtype):
    return x if dtype is None else np.asarray(x).astype(dtype)


def read_janusflow_deepseek(path: str, dtype: str | None = None, lazy: bool = False) -> ck.Checkpoint:
    """A DeepSeek-original JanusFlow directory -> Checkpoint (numpy params; LazyLeaf for the LLM and
    SigLIP when `lazy`). Every expected tensor must be present with the expected shape."""
    from unimm_jax.models.janusflow import gen_decoder_module, gen_encoder_module

    cfg = config_from_deepseek_flow(read_json(os.path.join(path, "config.json")), tokenizer_token_ids(path))
    names, read, dtype_of = ck._raw_reader(path)
    names = list(names)
    shapes = abstract_flow_params(cfg)
    source, origin = _janus_view(names, read)
    used = set(origin.values())
    params: dict = {}
    for p, spec in ck._leaves({"llm": shapes["llm"], "vision": shapes["vision"]}):
        entry = keys.entry_for(p, len(spec.shape))
        layers = spec.shape[0] if entry.layered else 1
        missing = [k for k in entry.keys(layers) if k not in source.names]
        if missing:
            raise CheckpointError(f"tensor {_ds_name(missing[0])!r} is missing from the checkpoint.")
        if lazy:
            first = origin[entry.keys(layers)[0]]
            leaf_dtype = np.dtype(dtype) if dtype else np.dtype(dtype_of(first) if dtype_of else read(first).dtype)
            ck._set(params, p, ck.LazyLeaf(spec.shape, leaf_dtype, lambda e=entry, s=spec: ck._read_leaf(source, e, s, dtype)))
        else:
            ck._set(params, p, ck._read_leaf(source, entry, spec, dtype))
    raw = {k: None for k in names}
    for prefix, name, from_torch, module in (
        (ENC_PREFIX, "gen_encoder", gen_encoder_from_torch, gen_encoder_module(cfg, parent=None)),
        (DEC_PREFIX, "gen_decoder", gen_decoder_from_torch, gen_decoder_module(cfg, parent=None)),
    ):
        sub = {k: read(k) for k in raw if k.startswith(prefix)}
        try:
            params[name] = jax.tree.map(lambda x: _cast(x, dtype), from_torch(sub, prefix, module))
        except ValueError as e:
            raise CheckpointError(str(e)) from e
        used.update(sub)
    for p, spec in _flat({k: v for k, v in shapes.items() if k not in ("llm", "vision", "gen_encoder", "gen_decoder")}).items():
        key, hook = small_leaf_key(p)
        if key not in raw:
            raise CheckpointError(f"tensor {key!r} is missing from the checkpoint.")
        t = read(key)
        want = keys.torch_shape(hook, spec.shape)
        if tuple(t.shape) != want:
            raise CheckpointError(f"tensor {key!r} has shape {tuple(t.shape)} but the model config expects {want} "
                                  f"(unimm parameter {'/'.join(p)}). Check that config.json matches the weights.")
        ck._set(params, p, _cast(keys._from_torch(hook, t, spec.shape), dtype))
        used.add(key)
    extras = {k: read(k) for k in names if k not in used}
    unexpected = [k for k in extras if k.startswith(_REPA)]
    if unexpected:
        raise CheckpointError(f"{path}: REPA head tensors {unexpected[:2]} are present but config.json's unimm_repa "
                              "does not enable the head; set unimm_repa.enabled=true.")
    return ck.Checkpoint(cfg, params, extras, "deepseek", path)


def _ds_name(hf: str) -> str:
    ds = keys.qkv_parts_hf(hf)
    if ds:
        name = keys.qkv_ds_key(ds[0], ds[2])
    elif hf == keys.POS_EMBED_HF:
        name = keys.POS_EMBED_DS
    else:
        name = keys.hf_to_deepseek_name(hf) or hf
    return VISION_FLOW + name[len(VISION_JANUS):] if name.startswith(VISION_JANUS) else name


# ---------------------------------------------------------------------------------------------
# writing


def deepseek_flow_plan(params: dict, model_cfg, dtype: str | None = None) -> list[PlannedTensor]:
    """Every DeepSeek JanusFlow tensor of `params`, produced lazily for the LLM and SigLIP."""
    plan = []
    for t in ck.deepseek_plan({"llm": params["llm"], "vision": params["vision"]}, model_cfg, dtype):
        if t.name.startswith(VISION_JANUS):
            t = PlannedTensor(VISION_FLOW + t.name[len(VISION_JANUS):], t.shape, t.dtype, t.produce)
        plan.append(t)
    small = {}
    small.update(gen_encoder_to_torch(jax.tree.map(np.asarray, params["gen_encoder"]), ENC_PREFIX))
    small.update(gen_decoder_to_torch(jax.tree.map(np.asarray, params["gen_decoder"]), DEC_PREFIX))
    rest = {k: v for k, v in params.items() if k not in ("llm", "vision", "gen_encoder", "gen_decoder")}
    for p, w in _flat(rest).items():
        key, hook = small_leaf_key(p)
        small[key] = np.ascontiguousarray(keys._to_torch(hook, np.asarray(w)))
    small = {k: _cast(v, dtype) for k, v in small.items()}
    return plan + list(iter_plan_from_arrays(small))


def write_janusflow(ckpt: ck.Checkpoint, dst: str, fmt: str, dtype: str | None = None, overwrite: bool = False,
                    max_shard_bytes: int = 5 * 1024**3) -> None:
    """Writes a JanusFlow Checkpoint as 'deepseek' (atomically); 'hf' is refused with the fix."""
    if fmt == "hf":
        raise CheckpointError(NO_HF)
    if fmt != "deepseek":
        raise CheckpointError(f"write_janusflow writes 'deepseek' only, not {fmt!r} ('unimm' goes through write_checkpoint).")
    params = ck._np_params(ckpt.params)
    first = next(iter(jax.tree.leaves(params)))
    dtype_name = str(np.dtype(dtype) if dtype else first.dtype)
    extras = ckpt.extras if ckpt.extras_format == "deepseek" else {}
    extras = {k: _cast(v, dtype) if np.issubdtype(np.asarray(v).dtype, np.floating) else v for k, v in extras.items()}
    with ck.atomic_directory(dst, overwrite) as tmp:
        plan = deepseek_flow_plan(params, ckpt.config, dtype) + list(iter_plan_from_arrays(extras))
        write_sharded(tmp, plan, max_shard_bytes=max_shard_bytes)
        ck._dump(os.path.join(tmp, "config.json"), deepseek_flow_config_from(ckpt.config, dtype_name))
        copy_side_dirs(ckpt.side_dir, tmp)


def copy_side_dirs(src_dir: str | None, dst_dir: str) -> None:
    """Tokenizer/processor files, and a `vae/` subdirectory (the decoding VAE) when there is one."""
    ck._copy_side_files(src_dir, dst_dir)
    if src_dir and os.path.isdir(os.path.join(src_dir, "vae")):
        shutil.copytree(os.path.join(src_dir, "vae"), os.path.join(dst_dir, "vae"))


def is_janusflow_dir(path: str) -> bool:
    """True for a DeepSeek-original JanusFlow directory (config.json names gen encoder/decoder configs)."""
    from unimm_jax.convert.janusflow_config_io import is_janusflow_config

    cfg_path = os.path.join(path, "config.json")
    return os.path.exists(cfg_path) and is_janusflow_config(read_json(cfg_path))

