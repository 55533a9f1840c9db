"""Checkpoint conversion between transformers, DeepSeek-original and unimm layouts."""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from safetensors.numpy import load_file  # noqa: E402

import unimm_jax as uj  # noqa: E402
from deepseek_janus import write_deepseek_from_hf  # noqa: E402
from hf_janus import make_hf_model, prompt_with_image, save_hf_model  # noqa: E402
from unimm_jax.cli.convert import main as convert_main  # noqa: E402
from unimm_jax.convert.safetensors_io import CheckpointError  # noqa: E402

TOKENS = dict(image_token_id=500, boi_token_id=501, eoi_token_id=502, pad_token_id=503, bos_token_id=1, eos_token_id=2)


def tensors(path):
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors") and not f.startswith("extras"):
            out.update(load_file(os.path.join(path, f)))
    return out


def assert_same_tensors(a, b):
    ta, tb = tensors(a), tensors(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype, k
        assert ta[k].shape == tb[k].shape, k
        np.testing.assert_array_equal(ta[k], tb[k], err_msg=k)


def convert(src_fmt, dst_fmt, src, dst, *extra):
    assert convert_main(["--from", src_fmt, "--to", dst_fmt, str(src), str(dst), *extra]) == 0
    return dst


@pytest.fixture(scope="module")
def hf_model():
    return make_hf_model(seed=3)


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
    return save_hf_model(hf_model, tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def ds_dir(hf_model, tmp_path_factory):
    return write_deepseek_from_hf(hf_model, tmp_path_factory.mktemp("ds"), TOKENS)


def test_hf_unimm_hf_bit_exact(hf_dir, tmp_path):
    u = convert("hf", "unimm", hf_dir, tmp_path / "u")
    h = convert("unimm", "hf", u, tmp_path / "h")
    assert_same_tensors(hf_dir, h)


def test_deepseek_unimm_deepseek_bit_exact_with_extras(ds_dir, tmp_path):
    u = convert("deepseek", "unimm", ds_dir, tmp_path / "u")
    d = convert("unimm", "deepseek", u, tmp_path / "d")
    assert_same_tensors(ds_dir, d)
    assert "vision_model.vision_tower.attn_pool.latent" in tensors(d)


def test_hf_unimm_deepseek_unimm_hf_bit_exact(hf_dir, tmp_path):
    u1 = convert("hf", "unimm", hf_dir, tmp_path / "u1")
    d = convert("unimm", "deepseek", u1, tmp_path / "d")
    u2 = convert("deepseek", "unimm", d, tmp_path / "u2")
    h = convert("unimm", "hf", u2, tmp_path / "h")
    assert_same_tensors(hf_dir, h)


def test_hf_export_loads_in_transformers_and_matches(hf_model, ds_dir, tmp_path):
    """DeepSeek -> hf through unimm: transformers loads it and computes the original logits."""
    from transformers import JanusForConditionalGeneration

    h = convert("deepseek", "hf", ds_dir, tmp_path / "h", "--max-shard-size", "100KB")
    assert os.path.exists(h / "model.safetensors.index.json")  # sharded output
    reloaded = JanusForConditionalGeneration.from_pretrained(h).eval()
    rng = np.random.default_rng(0)
    ids = torch.tensor(prompt_with_image(rng))
    px = torch.tensor(rng.uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32))
    with torch.no_grad():
        a = hf_model(input_ids=ids, pixel_values=px).logits
        b = reloaded(input_ids=ids, pixel_values=px).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    gen = json.load(open(h / "generation_config.json"))
    assert gen["generation_kwargs"]["boi_token_id"] == 501 and gen["pad_token_id"] == 503


def test_deepseek_and_hf_layouts_compute_the_same(hf_dir, ds_dir):
    rng = np.random.default_rng(5)
    ids = prompt_with_image(rng)
    px = rng.uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
    a = uj.load_pretrained(hf_dir)
    b = uj.load_pretrained(ds_dir)
    assert b.config.tokens.to_dict() == TOKENS
    np.testing.assert_array_equal(np.asarray(a.understanding_logits(ids, px)), np.asarray(b.understanding_logits(ids, px)))


def test_save_pretrained_all_formats_and_bf16(hf_dir, tmp_path):
    m = uj.load_pretrained(hf_dir)
    for fmt in ("hf", "deepseek", "unimm"):
        uj.save_pretrained(m, tmp_path / fmt, format=fmt)
        again = uj.load_pretrained(tmp_path / fmt)
        for x, y in zip(__import__("jax").tree.leaves(m.params), __import__("jax").tree.leaves(again.params)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    b = convert("hf", "hf", hf_dir, tmp_path / "bf16", "--dtype", "bfloat16")
    t = tensors(b)
    assert all(str(v.dtype) == "bfloat16" for v in t.values())
    assert json.load(open(b / "config.json"))["dtype"] == "bfloat16"
    b2 = convert("hf", "unimm", b, tmp_path / "bf16u")
    assert_same_tensors(b, convert("unimm", "hf", b2, tmp_path / "bf16h"))


def test_missing_tensor_is_named(hf_dir, tmp_path):
    t = tensors(hf_dir)
    del t["model.language_model.layers.1.mlp.up_proj.weight"]
    bad = tmp_path / "bad"
    bad.mkdir()
    from safetensors.numpy import save_file
    save_file(t, str(bad / "model.safetensors"))
    for f in ("config.json", "generation_config.json"):
        (bad / f).write_text((hf_dir / f).read_text())
    with pytest.raises(CheckpointError, match=r"model\.language_model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        uj.load_pretrained(bad)
    assert convert_main(["--from", "hf", "--to", "unimm", str(bad), str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()
    assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]


def test_shape_mismatch_names_key_and_shapes(hf_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = json.load(open(hf_dir / "config.json"))
    cfg["text_config"]["intermediate_size"] = 96
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "generation_config.json").write_text((hf_dir / "generation_config.json").read_text())
    (bad / "model.safetensors").symlink_to(hf_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'model\.language_model\.layers\.0\.mlp\.down_proj\.weight' has shape \(64, 128\).*expects \(64, 96\)"):
        uj.load_pretrained(bad)


def test_unknown_layout_and_out_of_range_config(tmp_path, hf_dir):
    (tmp_path / "x").mkdir()
    with pytest.raises(CheckpointError, match="unknown layout"):
        uj.load_pretrained(tmp_path / "x")
    (tmp_path / "x" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="model_type='bert'"):
        uj.load_pretrained(tmp_path / "x")
    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = json.load(open(hf_dir / "config.json"))
    cfg["text_config"]["num_key_value_heads"] = 3
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "generation_config.json").write_text((hf_dir / "generation_config.json").read_text())
    with pytest.raises(ValueError, match=r"num_kv_heads=3 is out of range: must divide num_heads=4"):
        uj.load_pretrained(bad)
    assert convert_main(["--from", "deepseek", "--to", "hf", str(hf_dir), str(tmp_path / "o")]) == 2


def test_failed_write_leaves_no_destination(hf_dir, tmp_path, monkeypatch):
    from unimm_jax.convert import janus_keys

    calls = {"n": 0}
    real = janus_keys._to_torch

    def flaky(kind, x):
        calls["n"] += 1
        if calls["n"] > 20:
            raise OSError("disk full (simulated)")
        return real(kind, x)

    m = uj.load_pretrained(hf_dir)
    monkeypatch.setattr(janus_keys, "_to_torch", flaky)
    with pytest.raises(OSError, match="disk full"):
        uj.save_pretrained(m, tmp_path / "dst", format="hf")
    assert not (tmp_path / "dst").exists()
    assert os.listdir(tmp_path) == []


def test_existing_destination_is_not_clobbered(hf_dir, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    assert convert_main(["--from", "hf", "--to", "unimm", str(hf_dir), str(dst)]) == 2
    assert (dst / "keep.txt").read_text() == "x"


def test_load_pretrained_sharded_on_mesh(hf_dir):
    import jax
    from unimm_jax.sharding import fraction_sharded, make_mesh

    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    m = uj.load_pretrained(hf_dir, mesh=mesh)
    q = m.params["llm"]["layers"]["attn"]["q"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert len(q.addressable_shards) == 8
    assert fraction_sharded(m.params, jax.tree.map(lambda x: x.sharding, m.params)) > 0.9
    ref = uj.load_pretrained(hf_dir)
    rng = np.random.default_rng(7)
    ids = prompt_with_image(rng)
    px = rng.uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(m.understanding_logits(ids, px)), np.asarray(ref.understanding_logits(ids, px)), atol=1e-5)
