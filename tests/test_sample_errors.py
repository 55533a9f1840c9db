"""Bad input to generate_text / generate_image_tokens: clear errors raised before any XLA work."""
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import unimm_jax as uj  # noqa: E402
from hf_janus import prompt_with_image, save_hf_model  # noqa: E402
from sample_models import make_varied_hf_model  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return uj.load_pretrained(save_hf_model(make_varied_hf_model(), tmp_path_factory.mktemp("hf")))


GEN = np.array([[1, 5, 6, 501]])


@pytest.mark.parametrize("kwargs,match", [
    (dict(input_ids=[[]]), "empty prompt"),
    (dict(input_ids=[[1, 5], []]), r"input_ids\[1\] is an empty prompt"),
    (dict(input_ids=np.ones((1, 510), int)), "exceeds the context of 512"),
    (dict(input_ids=np.ones((1, 20), int), max_new_tokens=493), "lower max_new_tokens"),
    (dict(input_ids=[[1, 600]]), "outside"),
    (dict(input_ids=[[1, 2]], max_new_tokens=0), "max_new_tokens"),
    (dict(input_ids=[[1, 2]], temperature=-1), "temperature"),
    (dict(input_ids="hello"), "int"),
    (dict(input_ids=[[1.5, 2.0]]), "integer token ids"),
])
def test_generate_text_bad_input(model, kwargs, match):
    kwargs.setdefault("max_new_tokens", 4)
    with pytest.raises(ValueError, match=match):
        model.generate_text(**kwargs)


@pytest.mark.parametrize("px,match", [
    (np.zeros((1, 16, 16, 3), np.float32), "takes 32x32"),
    (np.zeros((1, 32, 32, 4), np.float32), "3 channels"),
    (np.zeros((1, 32, 32), np.float32), "3 channels"),
    (np.full((1, 32, 32, 3), 200.0, np.float32), r"\[-1, 1\]"),
    (np.zeros((2, 32, 32, 3), np.float32), "2 image"),
    (None, "no pixel_values"),
])
def test_generate_text_bad_images(model, px, match):
    ids = prompt_with_image(np.random.default_rng(0))
    with pytest.raises(ValueError, match=match):
        model.generate_text(ids, px, max_new_tokens=4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(input_ids=[[1, 5, 6]]), "must end with <begin_of_image>"),
    (dict(input_ids=[[]]), "empty prompt"),
    (dict(input_ids=np.concatenate([[1], np.full(497, 5), [501]])[None]), "exceeds the context"),
    (dict(input_ids=GEN, num_images=0), "num_images"),
    (dict(input_ids=GEN, pad_token_id=9999), "pad_token_id"),
    (dict(input_ids=GEN, top_p=2.0), "top_p"),
    (dict(input_ids=GEN, top_k=-1), "top_k"),
    (dict(input_ids=GEN, max_batch=0), "max_batch"),
])
def test_generate_image_tokens_bad_input(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        model.generate_image_tokens(**kwargs)


def test_custom_pad_id_changes_only_the_unconditional_branch(model):
    """pad_token_id=None means the checkpoint's pad; another id gives another uncond prompt."""
    default = model.generate_image_tokens(GEN, temperature=0)
    np.testing.assert_array_equal(default, model.generate_image_tokens(GEN, temperature=0, pad_token_id=503))
    assert (default != model.generate_image_tokens(GEN, temperature=0, pad_token_id=7)).any()
    # with cfg_weight 1 the guided logits are the conditional ones: the pad id cannot matter
    np.testing.assert_array_equal(model.generate_image_tokens(GEN, cfg_weight=1.0, temperature=0, pad_token_id=7),
                                  model.generate_image_tokens(GEN, cfg_weight=1.0, temperature=0))
