"""First-fit packing: property tests against an independent replay, errors, codes, Grain resume."""
import json

import grain
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unimm_jax.data import packing
from unimm_jax.data.batch import check_batch

IMG = (4, 4, 3)


def _example(uid: int, length: int, n_images: int = 0, task: int = 0, pending: bool = False) -> dict:
    """A synthetic example whose every token encodes its uid, so it can be traced in a row."""
    ids = np.full(length, 1000 * uid, np.int32) + np.arange(length, dtype=np.int32)
    ex = dict(input_ids=ids, input_is_image=np.zeros(length, bool), target_ids=ids + 1,
              target_is_image=np.zeros(length, bool), loss_mask=np.full(length, 0.5, np.float32),
              n_images=n_images, task_id=task)
    if n_images:
        ex["image"] = np.full(IMG, uid / 1000.0, np.float32)
    if pending:  # the last 3 targets and 2 inputs are code slots
        ex["target_is_image"][-3:] = True
        ex["input_is_image"][-2:] = True
        ex["pending_image"] = np.full(IMG, uid % 256, np.uint8)
    return ex


def _segments_of(batch):
    """{uid: (row, segment, start, length)} read back from a packed batch."""
    out = {}
    b, t = batch["segment_ids"].shape
    for r in range(b):
        seg = batch["segment_ids"][r]
        for s in np.unique(seg[seg > 0]):
            where = np.flatnonzero(seg == s)
            # Segments never straddle: one contiguous run per segment id.
            assert (np.diff(where) == 1).all(), (r, s)
            uid = int(batch["input_ids"][r, where[0]]) // 1000
            out[uid] = (r, int(s), int(where[0]), len(where))
    return out


def _replay_first_fit(lengths, images, rows, seq_len, max_images):
    """Independent statement of the policy: list of batches, each a list of (uid, row)."""
    batches, used, imgs, cur = [], [0] * rows, [0] * rows, []
    for uid, (n, k) in enumerate(zip(lengths, images)):
        fit = [r for r in range(rows) if used[r] + n <= seq_len and imgs[r] + k <= max_images]
        if not fit:
            batches.append(cur)
            used, imgs, cur = [0] * rows, [0] * rows, []
            fit = [0]
        used[fit[0]] += n
        imgs[fit[0]] += k
        cur.append((uid, fit[0]))
    if cur:
        batches.append(cur)
    return batches


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 4),
    seq_len=st.integers(8, 40),
    max_images=st.integers(0, 3),
    specs=st.lists(st.tuples(st.integers(1, 40), st.integers(0, 1)), min_size=1, max_size=40),
)
def test_first_fit_properties(rows, seq_len, max_images, specs):
    specs = [(min(n, seq_len), min(k, max_images)) for n, k in specs]
    examples = [_example(u, n, k, task=u % 3) for u, (n, k) in enumerate(specs)]
    batches = list(packing.pack_examples(examples, num_rows=rows, seq_len=seq_len,
                                         max_images_per_row=max_images, image_shape=IMG, pad_id=7))
    expected = _replay_first_fit(*zip(*specs), rows, seq_len, max_images)
    assert len(batches) == len(expected)
    seen = []
    for batch, want in zip(batches, expected):
        pending = {k: batch.pop(k) for k in packing.PENDING_KEYS}
        assert len(pending["pending_rows"]) == 0
        check_batch(batch)
        assert batch["input_ids"].shape == (rows, seq_len)
        segs = _segments_of(batch)
        assert sorted(segs) == sorted(u for u, _ in want)
        for uid, row in want:
            r, s, start, n = segs[uid]
            ex = examples[uid]
            assert r == row and n == len(ex["input_ids"])
            for key in packing.SEQUENCE_FEATURES:
                np.testing.assert_array_equal(batch[key][r, start:start + n], ex[key])
            np.testing.assert_array_equal(batch["positions"][r, start:start + n], np.arange(n))
            assert (batch["task_ids"][r, start:start + n] == ex["task_id"]).all()
        for r in range(rows):
            row_uids = [u for u in sorted(segs) if segs[u][0] == r]
            # Examples keep their order in a row; segment ids count 1, 2, ...; padding only at the end.
            assert [segs[u][1] for u in row_uids] == list(range(1, len(row_uids) + 1))
            assert [segs[u][2] for u in row_uids] == sorted(segs[u][2] for u in row_uids)
            filled = sum(segs[u][3] for u in row_uids)
            assert (batch["segment_ids"][r, :filled] > 0).all() and (batch["segment_ids"][r, filled:] == 0).all()
            pad = batch["segment_ids"][r] == 0
            assert (batch["loss_mask"][r, pad] == 0).all() and (batch["input_ids"][r, pad] == 7).all()
            # Images sit in placeholder (= example) order; at most M per row.
            img_uids = [u for u in row_uids if examples[u]["n_images"]]
            assert batch["image_valid"][r].sum() == len(img_uids) <= max_images
            for slot, u in enumerate(img_uids):
                np.testing.assert_array_equal(batch["pixel_values"][r, slot], examples[u]["image"])
            assert not batch["pixel_values"][r, len(img_uids):].any()
        seen += sorted(u for u, _ in want)
    assert seen == list(range(len(examples)))  # every example exactly once, batches in order


def test_packing_is_deterministic():
    rng = np.random.default_rng(1)
    examples = [_example(u, int(rng.integers(1, 30)), int(rng.integers(0, 2))) for u in range(50)]
    kw = dict(num_rows=3, seq_len=32, max_images_per_row=2, image_shape=IMG)
    a, b = list(packing.pack_examples(examples, **kw)), list(packing.pack_examples(examples, **kw))
    assert len(a) == len(b) > 1
    for x, y in zip(a, b):
        assert all(np.array_equal(x[k], y[k]) for k in x)


def test_too_long_or_too_many_images_is_a_clear_error():
    packer = packing.FirstFitPacker(2, 16, 1)
    with pytest.raises(ValueError, match="longer than seq_len=16"):
        packer.add(_example(0, 17))
    with pytest.raises(ValueError, match="max_images_per_row=0"):
        packing.FirstFitPacker(2, 16, 0).add(_example(0, 4, n_images=1))
    with pytest.raises(ValueError, match="same length|one length"):
        bad = _example(0, 4)
        bad["loss_mask"] = bad["loss_mask"][:3]
        packer.add(bad)
    with pytest.raises(ValueError, match="seq_len"):
        packing.FirstFitPacker(2, 1, 1)
    with pytest.raises(ValueError, match="missing"):
        packer.add({"input_ids": np.zeros(3, np.int32)})
    assert len(packer) == 0


def test_fill_codes_writes_pending_images_codes():
    examples = [_example(0, 6), _example(1, 7, pending=True), _example(2, 5, pending=True), _example(3, 4)]
    (batch,) = packing.pack_examples(examples, num_rows=2, seq_len=12, max_images_per_row=1, image_shape=IMG)
    assert batch["pending_images"].shape == (2,) + IMG and batch["pending_images"].dtype == np.uint8
    np.testing.assert_array_equal(batch["pending_images"][:, 0, 0, 0], [1, 2])
    segs = _segments_of(batch)
    codes = np.array([[11, 12, 13], [21, 22, 23]], np.int32)
    out = packing.fill_codes({k: v.copy() for k, v in batch.items()}, codes)
    assert not set(packing.PENDING_KEYS) & set(out)
    for g, uid in enumerate((1, 2)):
        r, _, start, n = segs[uid]
        np.testing.assert_array_equal(out["target_ids"][r, start + n - 3:start + n], codes[g])
        np.testing.assert_array_equal(out["input_ids"][r, start + n - 2:start + n], codes[g, :2])
        # Nothing else in the row changed.
        keep = np.ones(12, bool)
        keep[start + n - 3:start + n] = False
        np.testing.assert_array_equal(out["target_ids"][r, keep], batch["target_ids"][r, keep])
    with pytest.raises(ValueError, match="codes per image"):
        packing.fill_codes({k: v.copy() for k, v in batch.items()}, np.zeros((2, 4), np.int32))


def test_grain_stage_matches_policy_and_resumes_exactly():
    rng = np.random.default_rng(2)
    examples = [_example(u, int(rng.integers(1, 20)), int(rng.integers(0, 2))) for u in range(120)]
    kw = dict(num_rows=2, seq_len=24, max_images_per_row=2, image_shape=IMG)
    expected = list(packing.pack_examples(examples, **kw))
    source = grain.MapDataset.source(examples).to_iter_dataset()
    ds = packing.PackedBatchIterDataset(source, **kw)
    got = list(ds)
    assert len(got) == len(expected)
    for x, y in zip(got, expected):
        assert all(np.array_equal(x[k], y[k]) for k in y)
    for k in (0, 1, 5):
        it = iter(ds)
        for _ in range(k):
            next(it)
        state = json.loads(json.dumps(it.get_state()))  # what the orbax handler stores
        resumed = iter(ds)
        resumed.set_state(state)
        for want in expected[k:k + 4]:
            x = next(resumed)
            assert all(np.array_equal(x[key], want[key]) for key in want)
