"""The shipped configs hold the reference's exact values and pass validation."""
import os

import pytest

from unimm_jax.config_files import load_config, load_config_module
from unimm_jax.models.janus_config import num_image_tokens, num_understanding_tokens, validate_janus_config

ROOT = os.path.join(os.path.dirname(__file__), "..", "configs")


def load_module(name):
    """configs/<name>.py as a module (configs/ is not a package)."""
    return load_config_module(os.path.join(ROOT, name + ".py"))


def load(name, arg=None):
    return load_module(name).get_config(arg)


@pytest.mark.parametrize("name,hidden,layers,heads,inter", [("janus_pro_1b", 2048, 24, 16, 5632), ("janus_pro_7b", 4096, 30, 32, 11008)])
def test_janus_pro_sizes(name, hidden, layers, heads, inter):
    m = load(name).model
    validate_janus_config(m)
    assert (m.llm.hidden_size, m.llm.num_layers, m.llm.num_heads, m.llm.num_kv_heads, m.llm.intermediate_size) == (hidden, layers, heads, heads, inter)
    assert m.llm.vocab_size == 102400 and m.llm.head_dim == 128 and m.llm.rope_theta == 10000.0
    assert (m.vision.hidden_size, m.vision.num_layers, m.vision.patch_size, m.vision.image_size) == (1024, 24, 16, 384)
    assert (m.vq.codebook_size, m.vq.codebook_dim) == (16384, 8)
    assert num_image_tokens(m) == num_understanding_tokens(m) == 576
    assert m.gen_head.hidden_size == hidden and not m.llm.tie_word_embeddings


def test_validation_names_field_and_fix():
    m = load("janus_tiny").model
    validate_janus_config(m)
    m.llm.num_kv_heads = 3
    with pytest.raises(ValueError, match=r"model\.llm\.num_kv_heads=3 is out of range: must divide num_heads=4"):
        validate_janus_config(m)
    m = load("janus_tiny").model
    m.llm.qk_init_scale = 0.0
    with pytest.raises(ValueError, match=r"model\.llm\.qk_init_scale=0\.0 is out of range: must be positive"):
        validate_janus_config(m)
    m = load("janus_tiny").model
    m.vq.encoder_context = "nearby"
    with pytest.raises(ValueError, match=r"model\.vq\.encoder_context='nearby' is out of range: must be one of \('global', 'local'\)"):
        validate_janus_config(m)
    m = load("janus_tiny").model
    m.vq.base_channels = 48
    with pytest.raises(ValueError, match=r"channel_multiplier\[0\]=1.*=48 must be a multiple of norm_groups=32"):
        validate_janus_config(m)


def test_shapes_configs_validate_and_share_one_vq():
    """The default job's config validates, and configs/shapes_vq.py trains the very VQ it uses
    (its W/tokenizer must pass check_vq_matches against shapes_tiny's model)."""
    from unimm_jax.train.vq_trainer import check_vq_matches

    tiny, vq = load("shapes_tiny"), load("shapes_vq")
    validate_janus_config(tiny.model)
    check_vq_matches(tiny.model.vq, vq.model.vq)
    assert tiny.model.vq.encoder_context == "local"
    assert tiny.tokenizer.to_dict() == vq.tokenizer.to_dict()


def test_shapes_eval_config_scores_what_the_default_job_scores():
    """`unimm-eval --config configs/evals/shapes.py` reproduces the default job's eval.json: the same
    eval settings and dataset config (name), and understanding over the whole test split."""
    tiny, ev = load("shapes_tiny"), load("evals/shapes")
    assert ev.eval.to_dict() == tiny.eval.to_dict()
    assert (ev.data.num_train, ev.data.num_test) == (tiny.data.num_train, tiny.data.num_test)
    assert tiny.eval.num_understanding == tiny.data.num_test


def test_load_config_by_path_passes_arg_and_names_bad_paths(tmp_path):
    f = tmp_path / "mine.py"
    f.write_text("import ml_collections\n\ndef get_config(arg=None):\n"
                 "    return ml_collections.ConfigDict(dict(arg=arg, n=3))\n")
    assert load_config(str(f), "x").to_dict() == {"arg": "x", "n": 3}
    assert load_config_module(str(f)).__name__ == "mine"
    with pytest.raises(FileNotFoundError, match="nope.py does not exist"):
        load_config(str(tmp_path / "nope.py"))
    (tmp_path / "empty.py").write_text("X = 1\n")
    with pytest.raises(AttributeError, match="has no get_config"):
        load_config(str(tmp_path / "empty.py"))
