"""Sampling against transformers' JanusForConditionalGeneration.generate, and batch invariances.

Greedy decoding must give the same tokens as transformers (image mode with CFG, text mode
with an image in the prompt); left-padded mixed-length batches, chunking and seeds must not
change what a row produces.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import unimm_jax as uj  # noqa: E402
from hf_janus import prompt_with_image, save_hf_model  # noqa: E402
from sample_models import gen_prompt, make_varied_hf_model  # noqa: E402


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = make_varied_hf_model()
    return hf, uj.load_pretrained(save_hf_model(hf, tmp_path_factory.mktemp("hf")))


def hf_image_tokens(hf, prompts, cfg_weight, num_images=1):
    ids = torch.tensor(prompts)
    # transformers refuses greedy with num_return_sequences > 1; sampling with top_k=1 is greedy.
    mode = dict(do_sample=False) if num_images == 1 else dict(do_sample=True, top_k=1)
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_mode="image",
                          guidance_scale=cfg_weight, num_return_sequences=num_images, **mode)
    return out.numpy()


@pytest.mark.parametrize("cfg_weight", [5.0, 2.5])
def test_image_tokens_greedy_match_transformers(pair, cfg_weight):
    hf, ours = pair
    rng = np.random.default_rng(0)
    prompts = np.stack([gen_prompt(rng, 9), gen_prompt(rng, 9)])
    ref = hf_image_tokens(hf, prompts, cfg_weight)
    got = ours.generate_image_tokens(prompts, cfg_weight=cfg_weight, temperature=0)
    assert got.dtype == np.int32 and got.shape == ref.shape == (2, 16)
    np.testing.assert_array_equal(got, ref)
    assert len(np.unique(got)) > 3  # a varied sequence, not one repeated code


def test_image_tokens_num_images_are_prompt_major(pair):
    hf, ours = pair
    rng = np.random.default_rng(1)
    prompts = np.stack([gen_prompt(rng, 9), gen_prompt(rng, 9)])
    ref = hf_image_tokens(hf, prompts, 5.0, num_images=2)
    got = ours.generate_image_tokens(prompts, num_images=2, temperature=1.0, top_k=1, seed=3)
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(got, ours.generate_image_tokens(prompts, num_images=2, temperature=0))
    np.testing.assert_array_equal(got[0], got[1])


def test_text_greedy_with_image_matches_transformers(pair):
    hf, ours = pair
    rng = np.random.default_rng(2)
    ids = np.concatenate([prompt_with_image(rng), prompt_with_image(rng)])
    px = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        ref = hf.generate(torch.tensor(ids), pixel_values=torch.tensor(px).permute(0, 3, 1, 2),
                          attention_mask=torch.ones(ids.shape, dtype=torch.long), max_new_tokens=12,
                          do_sample=False).numpy()[:, ids.shape[1]:]
    got = ours.generate_text(ids, px, max_new_tokens=12)
    assert got.dtype == np.int32 and got.shape == (2, 12)
    np.testing.assert_array_equal(got, ref)
    assert len(np.unique(got)) > 3


def test_mixed_length_image_batch_equals_each_prompt_alone(pair):
    _, ours = pair
    rng = np.random.default_rng(3)
    prompts = [gen_prompt(rng, 5), gen_prompt(rng, 13), gen_prompt(rng, 8)]
    batch = ours.generate_image_tokens(prompts, temperature=0)
    for i, p in enumerate(prompts):
        np.testing.assert_array_equal(batch[i], ours.generate_image_tokens([p], temperature=0)[0])
    # The padded array + attention_mask form means the same as the list form.
    ids = np.full((3, 13), 503)
    mask = np.zeros((3, 13), int)
    for i, p in enumerate(prompts):
        ids[i, 13 - len(p):], mask[i, 13 - len(p):] = p, 1
    np.testing.assert_array_equal(ours.generate_image_tokens(ids, attention_mask=mask, temperature=0), batch)


def test_mixed_length_text_batch_with_images_equals_each_prompt_alone(pair):
    _, ours = pair
    rng = np.random.default_rng(4)
    a, b = prompt_with_image(rng)[0], np.concatenate([prompt_with_image(rng)[0], rng.integers(3, 400, 7)])
    px = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    batch = ours.generate_text([a, b], px, max_new_tokens=10)
    np.testing.assert_array_equal(batch[0], ours.generate_text([a], px[:1], max_new_tokens=10)[0])
    np.testing.assert_array_equal(batch[1], ours.generate_text([b], px[1:], max_new_tokens=10)[0])


def test_sampled_image_tokens_seeded_and_chunk_invariant(pair):
    _, ours = pair
    rng = np.random.default_rng(5)
    prompts = [gen_prompt(rng, 7), gen_prompt(rng, 10)]
    kw = dict(num_images=2, temperature=1.0, top_k=20, top_p=0.9)
    one = ours.generate_image_tokens(prompts, seed=7, **kw)
    np.testing.assert_array_equal(one, ours.generate_image_tokens(prompts, seed=7, **kw))
    # Three chunks of at most 2 images (the last one padded) draw exactly the same samples.
    np.testing.assert_array_equal(one, ours.generate_image_tokens(prompts, seed=7, max_batch=3, **kw))
    other = ours.generate_image_tokens(prompts, seed=8, **kw)
    assert (one != other).any()
    assert (one[0] != one[1]).any()  # two images of one prompt differ


def test_text_stops_at_eos_and_pads(tmp_path_factory, pair):
    hf, _ = pair
    ours = uj.load_pretrained(save_hf_model(hf, tmp_path_factory.mktemp("hf_eos")))
    rng = np.random.default_rng(6)
    ids = rng.integers(3, 400, (2, 9))
    free = ours.generate_text(ids, max_new_tokens=10)
    # Declare the 4th token of row 0 the EOS: row 0 must stop there and pad, as transformers does.
    eos = int(free[0, 3])
    assert eos not in free[0, :3]
    ours.config.tokens.eos_token_id = eos
    ours._jit.clear()
    got = ours.generate_text(ids, max_new_tokens=10)
    pad = ours.config.tokens.pad_token_id
    np.testing.assert_array_equal(got[0, :4], free[0, :4])
    assert (got[0, 4:] == pad).all()
    hit = np.flatnonzero(free[1] == eos)
    stop = hit[0] + 1 if hit.size else 10
    np.testing.assert_array_equal(got[1, :stop], free[1, :stop])
    assert (got[1, stop:] == pad).all()
    hf.generation_config.eos_token_id = eos
    with torch.no_grad():
        ref = hf.generate(torch.tensor(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long),
                          max_new_tokens=10, do_sample=False).numpy()[:, 9:]
    hf.generation_config.eos_token_id = 2
    np.testing.assert_array_equal(got[:, :ref.shape[1]], ref)


def test_sampled_text_seeded_and_chunk_invariant(pair):
    _, ours = pair
    ids = np.random.default_rng(7).integers(3, 400, (3, 6))
    kw = dict(max_new_tokens=8, temperature=1.5, top_k=50, top_p=0.95)
    one = ours.generate_text(ids, seed=1, **kw)
    np.testing.assert_array_equal(one, ours.generate_text(ids, seed=1, max_batch=2, **kw))
    assert (one != ours.generate_text(ids, seed=2, **kw)).any()
    assert (one != ours.generate_text(ids, **{**kw, "temperature": 0.0})).any()  # it does sample
