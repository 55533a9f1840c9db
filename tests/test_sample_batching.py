"""Prompt normalisation, left padding, buckets and memory-aware chunk planning."""
import numpy as np
import pytest

from unimm_jax.models.janus_config import janus_pro_config, tiny_janus_config
from unimm_jax.sample import batching
from unimm_jax.sample.kv_cache import cache_bytes


def test_prompt_rows_from_list_array_and_mask():
    rows = batching.prompt_rows([[1, 2, 3], [4]])
    assert [r.tolist() for r in rows] == [[1, 2, 3], [4]]
    assert [r.tolist() for r in batching.prompt_rows(np.array([[5, 6]]))] == [[5, 6]]
    assert [r.tolist() for r in batching.prompt_rows([7, 8, 9])] == [[7, 8, 9]]  # one flat prompt
    ids, mask = np.array([[0, 0, 3, 4], [1, 2, 3, 4]]), np.array([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert [r.tolist() for r in batching.prompt_rows(ids, mask)] == [[3, 4], [1, 2, 3, 4]]


@pytest.mark.parametrize("ids,mask,match", [
    ([[1, 2], []], None, "empty prompt"),
    (np.zeros((2, 0), int), None, "empty prompt"),
    ([], None, "empty"),
    (np.array([[1.5, 2.0]]), None, "integer"),
    (np.array([[1, 2, 3]]), np.array([[1, 1, 0]]), "LEFT padding"),
    (np.array([[1, 2, 3]]), np.array([[1, 1]]), "shape"),
    (np.zeros((2, 2, 2), int), None, "batch, length"),
])
def test_prompt_rows_errors(ids, mask, match):
    with pytest.raises(ValueError, match=match):
        batching.prompt_rows(ids, mask)


def test_left_pad_and_buckets():
    ids, mask = batching.left_pad([[1, 2, 3], [4]], pad_id=9, length=5)
    np.testing.assert_array_equal(ids, [[9, 9, 1, 2, 3], [9, 9, 9, 9, 4]])
    np.testing.assert_array_equal(mask, [[0, 0, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert ids.dtype == mask.dtype == np.int32
    assert batching.bucket_length(17, 16) == 32 and batching.bucket_length(16, 16) == 16
    assert batching.bucket_length(5, 1) == 5
    with pytest.raises(ValueError, match="more than the padded length"):
        batching.left_pad([[1, 2, 3]], 0, length=2)


def test_decode_bytes_cover_the_kv_cache():
    cfg = tiny_janus_config().llm
    assert batching.decode_bytes_per_row(cfg, 10, 16) > cache_bytes(cfg, 1, 26)


def test_plan_chunk_rows():
    assert batching.plan_chunk_rows(16, 100, None) == 16
    assert batching.plan_chunk_rows(16, 100, 450) == 4
    assert batching.plan_chunk_rows(16, 100, 450, multiple=4) == 4
    assert batching.plan_chunk_rows(16, 100, 790, multiple=4) == 4
    assert batching.plan_chunk_rows(16, 100, 10_000, max_batch=6, multiple=4) == 4
    assert batching.plan_chunk_rows(3, 100, None, multiple=4) == 4  # padded up to the shard count
    with pytest.raises(ValueError, match="GiB"):
        batching.plan_chunk_rows(16, 100, 350, multiple=4)
    with pytest.raises(ValueError, match="max_batch"):
        batching.plan_chunk_rows(16, 100, None, max_batch=0)


def test_janus_pro_7b_16_images_with_cfg_are_split_on_a_24gb_card():
    """The reference OOMs drawing 16 CFG images (32 rows x 576 codes) on 24 GB cards next to 14 GB of
    bf16 7B weights; the planner fits that in chunks."""
    cfg = janus_pro_config("7b").llm
    cfg.dtype = "bfloat16"
    per_image = 2 * batching.decode_bytes_per_row(cfg, 64, 576)
    budget = int(0.7 * (24 - 14.5) * 2**30)
    assert 16 * per_image > budget
    chunk = batching.plan_chunk_rows(16, per_image, budget)
    assert 1 <= chunk < 16 and chunk * per_image <= budget


def test_run_chunked_pads_the_last_chunk_and_trims():
    seen = []

    def fn(idx):
        seen.append(idx.copy())
        return idx * 10

    out = batching.run_chunked(fn, 5, 2)
    np.testing.assert_array_equal(out, [0, 10, 20, 30, 40])
    assert all(len(s) == 2 for s in seen)
    np.testing.assert_array_equal(seen[-1], [4, 4])
