"""The one parameter map between unimm's Janus params and transformers' Janus state dict,
plus DeepSeek-original <-> transformers key renames.

unimm leaf path (tuple)            transformers key                                   layout hook
llm/layers/attn/q/kernel [L,D,H,Dh]  model.language_model.layers.{i}.self_attn.q_proj.weight  heads_in
vision/layers/o/kernel [L,H,Dh,D]    model.vision_model.encoder.layers.{i}.self_attn.projection_layer.weight  heads_out
vq/encoder/down_0_block_1/conv1/kernel  model.vqmodel.encoder.down.0.block.1.conv1.weight      conv
...
Layer-stacked leaves (under `layers`) map to one key per layer; every hook is an exact
inverse pair (transpose/reshape only), so conversions round-trip bit for bit.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

# ---------------------------------------------------------------------------------------------
# layout hooks: unimm array <-> torch tensor (both numpy), exact inverses


def _to_torch(kind: str, x: np.ndarray) -> np.ndarray:
    if kind == "copy":
        return x
    if kind == "linear":  # [in, out] -> [out, in]
        return x.T
    if kind == "heads_in":  # [D, H, Dh] -> [H*Dh, D]
        return x.reshape(x.shape[0], -1).T
    if kind == "heads_bias":  # [H, Dh] -> [H*Dh]
        return x.reshape(-1)
    if kind == "heads_out":  # [H, Dh, D] -> [D, H*Dh]
        return x.reshape(-1, x.shape[-1]).T
    if kind == "conv":  # [kh, kw, I, O] -> [O, I, kh, kw]
        return x.transpose(3, 2, 0, 1)
    raise KeyError(kind)


def _from_torch(kind: str, t: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if kind == "copy":
        return t
    if kind == "linear":
        return t.T
    if kind in ("heads_in", "heads_out"):
        return t.T.reshape(shape)
    if kind == "heads_bias":
        return t.reshape(shape)
    if kind == "conv":
        return t.transpose(2, 3, 1, 0)
    raise KeyError(kind)


def torch_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the torch tensor for a unimm array of `shape` (without the layer axis)."""
    shape = tuple(shape)
    if kind == "copy":
        return shape
    if kind == "linear":
        return shape[::-1]
    if kind == "heads_in":
        return (int(np.prod(shape[1:])), shape[0])
    if kind == "heads_bias":
        return (int(np.prod(shape)),)
    if kind == "heads_out":
        return (shape[-1], int(np.prod(shape[:-1])))
    if kind == "conv":
        return (shape[3], shape[2], shape[0], shape[1])
    raise KeyError(kind)


@dataclass(frozen=True)
class Entry:
    path: tuple[str, ...]  # unimm params path
    key: str  # transformers key; contains "{i}" when `layered`
    kind: str  # layout hook
    layered: bool

    def keys(self, num_layers: int) -> list[str]:
        return [self.key.format(i=i) for i in range(num_layers)] if self.layered else [self.key]

    def to_torch(self, x: np.ndarray) -> np.ndarray:
        return _to_torch(self.kind, x)

    def from_torch(self, t: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return _from_torch(self.kind, t, shape)


def _leaf(name: str, ndim: int) -> tuple[str, str]:
    """(torch leaf name, hook) for a flax leaf."""
    if name == "kernel":
        return "weight", "conv" if ndim == 4 else "linear"
    if name in ("scale", "embedding"):
        return "weight", "copy"
    if name == "bias":
        return "bias", "copy"
    raise KeyError(name)


_LLM_LAYER = {
    "attn_norm": "input_layernorm",
    "mlp_norm": "post_attention_layernorm",
    "attn/q": "self_attn.q_proj",
    "attn/k": "self_attn.k_proj",
    "attn/v": "self_attn.v_proj",
    "attn/o": "self_attn.o_proj",
    "mlp/gate": "mlp.gate_proj",
    "mlp/up": "mlp.up_proj",
    "mlp/down": "mlp.down_proj",
}
_VISION_LAYER = {
    "norm1": "layer_norm1",
    "norm2": "layer_norm2",
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.projection_layer",
    "fc1": "mlp.fc1",
    "fc2": "mlp.fc2",
}


def _mlp_projector(name: str) -> str:
    i = int(name.split("_")[1])
    return "fc1" if i == 0 else f"hidden_layers.{i - 1}"


def _vq_module(parts: list[str]) -> str:
    """vq encoder/decoder module path -> transformers path (down_2_attn_0 -> down.2.attn.0)."""
    out = []
    for p in parts:
        m = re.fullmatch(r"(down|up)_(\d+)_(block|attn)_(\d+)", p)
        if m:
            out.append(f"{m[1]}.{m[2]}.{m[3]}.{m[4]}")
            continue
        m = re.fullmatch(r"(down|up)_(\d+)_(downsample|upsample)", p)
        out.append(f"{m[1]}.{m[2]}.{m[3]}" if m else p)
    return ".".join(out)


def entry_for(path: tuple[str, ...], ndim: int) -> Entry:
    """The transformers key and hook for one unimm leaf (ndim counts the layer axis)."""
    top, rest, leaf = path[0], list(path[1:-1]), path[-1]
    if top == "vision" and path == ("vision", "pos_embed"):
        return Entry(path, "model.vision_model.embeddings.position_embedding.weight", "copy", False)
    layered = "layers" in path[:2]
    tleaf, kind = _leaf(leaf, ndim - (1 if layered else 0))
    if top == "llm":
        if layered:
            mod = "/".join(rest[1:])
            if mod in ("attn/q", "attn/k", "attn/v", "attn/o"):
                kind = {"kernel": "heads_out" if mod == "attn/o" else "heads_in", "bias": "copy" if mod == "attn/o" else "heads_bias"}[leaf]
            return Entry(path, f"model.language_model.layers.{{i}}.{_LLM_LAYER[mod]}.{tleaf}", kind, True)
        if rest == ["lm_head"]:
            return Entry(path, f"lm_head.{tleaf}", kind, False)
        mod = {"embed": "embed_tokens", "final_norm": "norm"}[rest[0]]
        return Entry(path, f"model.language_model.{mod}.{tleaf}", kind, False)
    if top == "vision":
        if layered:
            mod = rest[1]
            if mod in ("q", "k", "v", "o"):
                kind = {"kernel": "heads_out" if mod == "o" else "heads_in", "bias": "copy" if mod == "o" else "heads_bias"}[leaf]
            return Entry(path, f"model.vision_model.encoder.layers.{{i}}.{_VISION_LAYER[mod]}.{tleaf}", kind, True)
        mod = {"patch_embed": "embeddings.patch_embedding", "post_norm": "post_layernorm"}[rest[0]]
        return Entry(path, f"model.vision_model.{mod}.{tleaf}", kind, False)
    if top == "aligner":
        return Entry(path, f"model.aligner.{_mlp_projector(rest[0])}.{tleaf}", kind, False)
    if top == "gen_aligner":
        return Entry(path, f"model.generation_aligner.{_mlp_projector(rest[0])}.{tleaf}", kind, False)
    if top == "gen_embed":
        return Entry(path, "model.generation_embeddings.weight", "copy", False)
    if top == "gen_head":
        return Entry(path, f"model.generation_head.{rest[0]}.{tleaf}", kind, False)
    if top == "vq":
        if rest == ["codebook"]:
            return Entry(path, "model.vqmodel.quantize.embedding.weight", "copy", False)
        return Entry(path, f"model.vqmodel.{_vq_module(rest)}.{tleaf}", kind, False)
    raise KeyError(f"no transformers key for unimm parameter {'/'.join(path)}")


# ---------------------------------------------------------------------------------------------
# DeepSeek-original <-> transformers names (as transformers' convert_janus_weights_to_hf.py).
# Each rule: (deepseek regex, transformers template, transformers regex, deepseek template).

_RENAMES = [
    (r"language_model\.model\.(.+)", r"model.language_model.\1"),
    (r"language_model\.lm_head\.(.+)", r"lm_head.\1"),
    (r"vision_model\.vision_tower\.blocks\.(\d+)\.norm(\d)\.(.+)", r"model.vision_model.encoder.layers.\1.layer_norm\2.\3"),
    (r"vision_model\.vision_tower\.blocks\.(\d+)\.attn\.proj\.(.+)", r"model.vision_model.encoder.layers.\1.self_attn.projection_layer.\2"),
    (r"vision_model\.vision_tower\.blocks\.(\d+)\.mlp\.(fc\d)\.(.+)", r"model.vision_model.encoder.layers.\1.mlp.\2.\3"),
    (r"vision_model\.vision_tower\.patch_embed\.proj\.(.+)", r"model.vision_model.embeddings.patch_embedding.\1"),
    (r"vision_model\.vision_tower\.norm\.(.+)", r"model.vision_model.post_layernorm.\1"),
    (r"gen_head\.output_mlp_projector\.(.+)", r"model.generation_head.proj_out.\1"),
    (r"gen_head\.vision_head\.(.+)", r"model.generation_head.vision_head.\1"),
    (r"gen_embed\.weight", r"model.generation_embeddings.weight"),
    (r"gen_vision_model\.quantize\.embedding\.weight", r"model.vqmodel.quantize.embedding.weight"),
    (r"gen_vision_model\.encoder\.conv_blocks\.(\d+)\.res\.(\d+)\.(.+)", r"model.vqmodel.encoder.down.\1.block.\2.\3"),
    (r"gen_vision_model\.encoder\.conv_blocks\.(\d+)\.attn\.(\d+)\.(.+)", r"model.vqmodel.encoder.down.\1.attn.\2.\3"),
    (r"gen_vision_model\.encoder\.conv_blocks\.(\d+)\.downsample\.(.+)", r"model.vqmodel.encoder.down.\1.downsample.\2"),
    (r"gen_vision_model\.decoder\.conv_blocks\.(\d+)\.res\.(\d+)\.(.+)", r"model.vqmodel.decoder.up.\1.block.\2.\3"),
    (r"gen_vision_model\.decoder\.conv_blocks\.(\d+)\.attn\.(\d+)\.(.+)", r"model.vqmodel.decoder.up.\1.attn.\2.\3"),
    (r"gen_vision_model\.decoder\.conv_blocks\.(\d+)\.upsample\.(.+)", r"model.vqmodel.decoder.up.\1.upsample.\2"),
    (r"gen_vision_model\.(encoder|decoder)\.mid\.0\.(.+)", r"model.vqmodel.\1.mid.block_1.\2"),
    (r"gen_vision_model\.(encoder|decoder)\.mid\.1\.(.+)", r"model.vqmodel.\1.mid.attn_1.\2"),
    (r"gen_vision_model\.(encoder|decoder)\.mid\.2\.(.+)", r"model.vqmodel.\1.mid.block_2.\2"),
    (r"gen_vision_model\.(encoder|decoder)\.(conv_in|norm_out|conv_out)\.(.+)", r"model.vqmodel.\1.\2.\3"),
    (r"gen_vision_model\.(quant_conv|post_quant_conv)\.(.+)", r"model.vqmodel.\1.\2"),
]
_POS_DS = "vision_model.vision_tower.pos_embed"
_POS_HF = "model.vision_model.embeddings.position_embedding.weight"
_QKV_DS = re.compile(r"vision_model\.vision_tower\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)")
_QKV_HF = re.compile(r"model\.vision_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")
_PROJ_DS = re.compile(r"(aligner|gen_aligner)\.layers\.(\d+)\.(weight|bias)")
_PROJ_HF = re.compile(r"model\.(aligner|generation_aligner)\.(fc1|hidden_layers\.(\d+))\.(weight|bias)")


def _invert(template: str) -> str:
    """r"model.x.\\1.y" -> regex matching it, with groups in order."""
    out, i = [], 0
    parts = re.split(r"(\\\d)", template)
    for p in parts:
        if re.fullmatch(r"\\\d", p):
            out.append("(.+)" if p == parts[-2] and parts[-1] == "" else r"([^.]+)")
        else:
            out.append(re.escape(p))
    return "".join(out)


def deepseek_to_hf_name(key: str) -> str | None:
    """Transformers name of a DeepSeek key, or None for tensors with no counterpart
    (fused qkv and pos_embed are handled by `deepseek_view`; attn_pool, codebook_used, ...)."""
    m = _PROJ_DS.fullmatch(key)
    if m:
        idx = int(m[2])
        if idx % 2:
            return None
        mod = "aligner" if m[1] == "aligner" else "generation_aligner"
        sub = "fc1" if idx == 0 else f"hidden_layers.{idx // 2 - 1}"
        return f"model.{mod}.{sub}.{m[3]}"
    for pat, tmpl in _RENAMES:
        m = re.fullmatch(pat, key)
        if m:
            return m.expand(tmpl)
    return None


def hf_to_deepseek_name(key: str) -> str | None:
    m = _PROJ_HF.fullmatch(key)
    if m:
        mod = "aligner" if m[1] == "aligner" else "gen_aligner"
        idx = 0 if m[2] == "fc1" else 2 * (int(m[3]) + 1)
        return f"{mod}.layers.{idx}.{m[4]}"
    for pat, tmpl in _RENAMES:
        m = re.fullmatch(_invert(tmpl), key)
        if m:
            # rebuild the DeepSeek name by substituting groups into the DeepSeek pattern
            ds = pat
            for g in m.groups():
                ds = re.sub(r"\((?:[^()]|\\\()*\)", lambda _: g, ds, count=1)
            ds = ds.replace("\\.", ".")
            if deepseek_to_hf_name(ds) == key:
                return ds
    return None


def qkv_parts_ds(key: str):
    """(layer, leaf) for a DeepSeek fused qkv key, else None."""
    m = _QKV_DS.fullmatch(key)
    return (int(m[1]), m[2]) if m else None


def qkv_parts_hf(key: str):
    """(layer, which in 'qkv', leaf) for a transformers vision q/k/v key, else None."""
    m = _QKV_HF.fullmatch(key)
    return (int(m[1]), m[2], m[3]) if m else None


def qkv_hf_key(layer: int, which: str, leaf: str) -> str:
    return f"model.vision_model.encoder.layers.{layer}.self_attn.{which}_proj.{leaf}"


def qkv_ds_key(layer: int, leaf: str) -> str:
    return f"vision_model.vision_tower.blocks.{layer}.attn.qkv.{leaf}"


POS_EMBED_DS, POS_EMBED_HF = _POS_DS, _POS_HF
