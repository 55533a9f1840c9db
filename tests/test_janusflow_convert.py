"""JanusFlow DeepSeek-original <-> unimm conversion: bit-exact round trips, the key map itself
checked tensor by tensor against the reference's layout, and errors that name the problem."""
import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import unimm_jax as uj
from deepseek_janusflow import TINY, deepseek_janusflow_config, write_deepseek_janusflow
from unimm_jax.cli.convert import main as convert_main
from unimm_jax.convert.safetensors_io import CheckpointError
from unimm_jax.flow_api import JanusFlowModel
from unimm_jax.models.janusflow_config import tiny_janusflow_config
from unimm_jax.train.flow_step import init_flow_params


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("jf") / "ds")
    sd = write_deepseek_janusflow(path, seed=1)
    return path, sd


def _convert(*argv):
    assert convert_main(list(argv)) == 0


def test_deepseek_unimm_deepseek_bit_exact(ds, tmp_path):
    path, sd = ds
    _convert("--from", "deepseek", "--to", "unimm", path, str(tmp_path / "u"))
    _convert("--from", "unimm", "--to", "deepseek", str(tmp_path / "u"), str(tmp_path / "ds2"))
    back = load_file(str(tmp_path / "ds2" / "model.safetensors"))
    assert sorted(back) == sorted(sd)  # incl. SigLIP's unused attn_pool (carried as extras)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k
    cfg = json.load(open(tmp_path / "ds2" / "config.json"))
    assert cfg["vision_gen_enc_config"]["cls"] == "ShallowUViTEncoder"
    assert cfg["language_config"]["num_key_value_heads"] == TINY["kv_heads"]


def test_deepseek_to_deepseek_bf16(ds, tmp_path):
    path, sd = ds
    _convert("--from", "deepseek", "--to", "deepseek", "--dtype", "bfloat16", path, str(tmp_path / "bf"))
    back = load_file(str(tmp_path / "bf" / "model.safetensors"))
    k = "vision_gen_enc_model.in_conv.weight"
    assert str(back[k].dtype) == "bfloat16"
    np.testing.assert_array_equal(back[k], sd[k].astype(back[k].dtype))


def test_key_map_places_each_tensor(ds):
    """The reference's layout, tensor by tensor (transposes, fused qkv, GRN, pos_embed)."""
    path, sd = ds
    p = uj.load_pretrained(path).params
    dv, hd = TINY["dv"], TINY["d"] // TINY["heads"]
    np.testing.assert_array_equal(p["und_aligner"]["kernel"], sd["vision_und_enc_aligner.weight"].T)
    np.testing.assert_array_equal(p["beg_of_und_embed"], sd["beg_of_und_embed"])
    qkv = sd["vision_und_enc_model.vision_tower.blocks.1.attn.qkv.weight"]
    np.testing.assert_array_equal(np.asarray(p["vision"]["layers"]["k"]["kernel"][1]).reshape(dv, dv), qkv[dv:2 * dv].T)
    np.testing.assert_array_equal(p["vision"]["pos_embed"], sd["vision_und_enc_model.vision_tower.pos_embed"][0])
    q = sd["language_model.model.layers.2.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(np.asarray(p["llm"]["layers"]["attn"]["q"]["kernel"][2]).reshape(TINY["d"], -1), q.T)
    assert p["llm"]["layers"]["attn"]["q"]["kernel"].shape[2:] == (TINY["heads"], hd)
    np.testing.assert_array_equal(p["gen_encoder"]["in_conv"]["kernel"],
                                  sd["vision_gen_enc_model.in_conv.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(p["gen_decoder"]["mid_block"]["res_blocks_0"]["channelwise_norm"]["gamma"],
                                  sd["vision_gen_dec_model.mid_block.res_blocks.0.channelwise_norm.weight"].reshape(-1))
    np.testing.assert_array_equal(p["gen_dec_aligner_norm"]["scale"], sd["vision_gen_dec_aligner_norm.weight"])
    np.testing.assert_array_equal(p["gen_dec_aligner"]["kernel"], sd["vision_gen_dec_aligner.weight"].T)
    assert "repa_head" not in p  # DeepSeek checkpoints have no REPA head


def test_unimm_with_repa_head_round_trips_through_deepseek(tmp_path):
    import jax

    cfg = tiny_janusflow_config()
    params = jax.tree.map(np.asarray, init_flow_params(cfg, jax.random.key(0)))
    uj.save_pretrained(JanusFlowModel(cfg, params), str(tmp_path / "u"), format="unimm")
    _convert("--from", "unimm", "--to", "deepseek", str(tmp_path / "u"), str(tmp_path / "ds"))
    assert "unimm_repa_head.layers.4.weight" in load_file(str(tmp_path / "ds" / "model.safetensors"))
    _convert("--from", "deepseek", "--to", "unimm", str(tmp_path / "ds"), str(tmp_path / "u2"))
    m = uj.load_pretrained(str(tmp_path / "u2"))
    assert m.config.repa.enabled and m.config.repa.layer == cfg.repa.layer
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, m.params), params)


def test_hf_target_is_refused_with_the_fix(ds, tmp_path, capsys):
    path, _ = ds
    assert convert_main(["--from", "deepseek", "--to", "hf", path, str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "transformers has no JanusFlow model" in err and "'deepseek'" in err
    assert not os.path.exists(tmp_path / "hf")


def _copy_without(src, dst, drop=None, reshape=None):
    os.makedirs(dst)
    sd = load_file(os.path.join(src, "model.safetensors"))
    if drop:
        del sd[drop]
    if reshape:
        sd[reshape] = sd[reshape][:-1]
    save_file(sd, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(deepseek_janusflow_config(), f)


def test_missing_and_misshapen_tensors_are_named(ds, tmp_path):
    path, _ = ds
    for drop in ("vision_gen_dec_aligner.bias", "vision_gen_enc_model.in_conv.weight",
                 "language_model.model.layers.1.mlp.up_proj.weight"):
        d = str(tmp_path / drop.replace(".", "_"))
        _copy_without(path, d, drop=drop)
        with pytest.raises(CheckpointError, match=drop.split(".")[-2]):
            uj.load_pretrained(d)
    d = str(tmp_path / "shape")
    _copy_without(path, d, reshape="vision_und_enc_aligner.weight")
    with pytest.raises(CheckpointError, match=r"vision_und_enc_aligner.weight.*\(63, 32\).*\(64, 32\)"):
        uj.load_pretrained(d)


def test_unsupported_config_is_named(ds, tmp_path):
    path, _ = ds
    d = tmp_path / "bad"
    os.makedirs(d)
    os.symlink(os.path.join(path, "model.safetensors"), d / "model.safetensors")
    cfg = deepseek_janusflow_config()
    cfg["vision_gen_dec_config"]["params"]["block_out_channels"] = [64]
    with open(d / "config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(CheckpointError, match="block_out_channels"):
        uj.load_pretrained(str(d))
