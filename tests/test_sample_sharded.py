"""Sampling on a mesh of 8 fake CPU devices: batch over data/fsdp, params by the logical rules,
same tokens as on one device."""
import jax
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import unimm_jax as uj  # noqa: E402
from hf_janus import prompt_with_image, save_hf_model  # noqa: E402
from sample_models import gen_prompt, make_varied_hf_model  # noqa: E402
from unimm_jax.sharding import make_mesh  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    assert len(jax.devices()) == 8
    path = save_hf_model(make_varied_hf_model(), tmp_path_factory.mktemp("hf"))
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    return uj.load_pretrained(path), uj.load_pretrained(path, mesh=mesh)


def test_params_are_sharded(models):
    _, sharded = models
    specs = [x.sharding.spec for x in jax.tree.leaves(sharded.params)]
    assert any(any(e is not None for e in s) for s in specs)


def test_sharded_image_tokens_match_single_device(models):
    single, sharded = models
    rng = np.random.default_rng(0)
    prompts = [gen_prompt(rng, 6), gen_prompt(rng, 11), gen_prompt(rng, 9)]
    want = single.generate_image_tokens(prompts, temperature=0)
    got = sharded.generate_image_tokens(prompts, temperature=0)  # 3 images -> one chunk of 4 (2x2 batch shards)
    np.testing.assert_array_equal(got, want)
    kw = dict(num_images=2, temperature=1.0, top_k=10, seed=4)
    np.testing.assert_array_equal(sharded.generate_image_tokens(prompts[:1], **kw),
                                  single.generate_image_tokens(prompts[:1], **kw))


def test_sharded_text_with_images_matches_single_device(models):
    single, sharded = models
    rng = np.random.default_rng(1)
    ids = [prompt_with_image(rng)[0], np.concatenate([prompt_with_image(rng)[0], [7, 8, 9]])]
    px = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_array_equal(sharded.generate_text(ids, px, max_new_tokens=8),
                                  single.generate_text(ids, px, max_new_tokens=8))
