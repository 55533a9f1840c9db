"""The Grain training pipeline end to end on a tiny shapes world (32 px, 64 train records)."""
import json
import logging
import zlib

import numpy as np
import pytest

from unimm_jax.data import packing, pipeline, shapes, shapes_tfds, shapes_vocab
from unimm_jax.data.batch import TASKS, check_batch

S, N_UND, N_GEN, NUM_TRAIN = 32, 16, 16, 64


class FakeEncoder:
    """Deterministic per-image 'VQ': 8x8 block means quantised to 64 codes -> int32 [n, 16]."""

    def __init__(self):
        self.shapes = []

    def __call__(self, x):
        x = np.asarray(x)
        self.shapes.append(x.shape)
        blocks = x.reshape(len(x), 4, 8, 4, 8, 3).mean(axis=(2, 4, 5))
        return np.clip(((blocks + 1) * 32).astype(np.int32), 0, 63).reshape(len(x), 16)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tfds")
    shapes_tfds.build_shapes_world(d, image_size=S, num_train=NUM_TRAIN, num_test=16)
    return str(d)


@pytest.fixture(scope="module")
def tok():
    return shapes_vocab.build_shapes_tokenizer()


def _cfg(data_dir, **over):
    c = pipeline.default_data_config()
    c.update(dict(data_dir=data_dir, image_size=S, num_train=NUM_TRAIN, num_test=16, batch_size=4, seq_len=128,
                  max_images_per_row=2, encode_batch_size=8, read_threads=2))
    for k, v in over.items():
        c[k] = v
    return c


def _kw(tok, **over):
    kw = dict(tokenizer=tok, tokens=shapes_vocab.shapes_token_ids(tok), num_image_tokens=N_UND,
              image_encoder=FakeEncoder())
    kw.update(over)
    return kw


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


def _segments(batch):
    """(row, task, slice) for every packed example."""
    out = []
    for r in range(batch["segment_ids"].shape[0]):
        seg = batch["segment_ids"][r]
        for s in np.unique(seg[seg > 0]):
            where = np.flatnonzero(seg == s)
            assert (np.diff(where) == 1).all()  # never straddles
            sl = slice(where[0], where[-1] + 1)
            np.testing.assert_array_equal(batch["positions"][r, sl], np.arange(len(where)))
            task = np.unique(batch["task_ids"][r, sl])
            assert len(task) == 1
            out.append((r, TASKS[task[0]], sl))
    return out


ANSWERS = {"color": set(shapes.COLORS), "shape": set(shapes.SHAPES), "count": {"one", "two", "three"},
           "exists": {"yes", "no"}}


def test_batches_follow_contract_and_train_only_the_right_tokens(data_dir, tok):
    ids = shapes_vocab.shapes_token_ids(tok)
    kw = _kw(tok)
    it = pipeline.make_train_iterator(_cfg(data_dir), **kw)
    seen, n_gen = set(), 0
    for batch in _take(it, 6):
        check_batch(batch)
        assert batch["input_ids"].shape == (4, 128) and batch["pixel_values"].shape == (4, 2, S, S, 3)
        assert np.abs(batch["pixel_values"]).max() <= 1.0
        for r, task, sl in _segments(batch):
            seen.add(task)
            inp, tgt = batch["input_ids"][r, sl], batch["target_ids"][r, sl]
            loss = batch["loss_mask"][r, sl] > 0
            if task == "understanding":
                assert (inp == ids["image_token_id"]).sum() == N_UND
                prompt = tok.decode(inp)
                question = prompt.split("<|User|> : ")[1].split(" <|Assistant|>")[0]
                kind = shapes.question_kind(question.replace(" ?", "?"))
                answer = tok.decode(tgt[loss], skip_special_tokens=False).split()
                assert len(answer) == 2 and answer[1] == "<eos>" and answer[0] in ANSWERS[kind], answer
                assert loss[-2:].all() and loss.sum() == 2  # the answer word + EOS only
            elif task == "text":
                assert loss.all()
                caption = tok.decode(tgt[loss], skip_special_tokens=False)
                assert caption.endswith(" <eos>")
                shapes.parse_prompt(caption[:-len(" <eos>")])
            else:
                n_gen += 1
                is_code = batch["target_is_image"][r, sl]
                np.testing.assert_array_equal(loss, is_code)
                assert is_code.sum() == N_GEN and batch["input_is_image"][r, sl].sum() == N_GEN - 1
                assert tgt[is_code].min() >= 0 and tgt[is_code].max() < 64
                text = tok.decode(inp[~batch["input_is_image"][r, sl]], skip_special_tokens=False)
                if "<pad>" in text:  # CFG drop: only BOS and BOI survive
                    assert set(text.split()) == {"<bos>", "<pad>", "<begin_of_image>"}
                else:
                    shapes.parse_prompt(text.split("<|User|> : ")[1].split(" <|Assistant|>")[0])
        # Images fill slots in placeholder order; one slot per understanding segment.
        n_und = [sum(t == "understanding" for rr, t, _ in _segments(batch) if rr == r) for r in range(4)]
        np.testing.assert_array_equal(batch["image_valid"].sum(1), n_und)
        pad = batch["segment_ids"] == 0
        assert (batch["loss_mask"][pad] == 0).all()
    assert seen == set(TASKS)
    # One probe image (reads N), then each batch's images in batched calls of at most
    # encode_batch_size=8 with sizes from a bounded set, and no padding.
    calls = kw["image_encoder"].shapes
    assert calls[0] == (1, S, S, 3) and {c[1:] for c in calls} == {(S, S, 3)}
    assert {c[0] for c in calls} <= {8, 4, 2, 1} and sum(c[0] for c in calls[1:]) == n_gen
    assert len(calls) - 1 < n_gen / 2


def test_dialogues_ask_more_questions_of_each_image(data_dir, tok):
    """questions_per_image=3: each understanding segment asks the record's question and two more
    of its qa_pairs, answered right, with loss on every answer + EOS and the image read once."""
    ids = shapes_vocab.shapes_token_ids(tok)
    records = {r["caption"] + r["question"]: r for r in pipeline.first_readable_records(_cfg(data_dir), "train", NUM_TRAIN)}
    it = pipeline.make_train_iterator(_cfg(data_dir, questions_per_image=3, mixture=dict(understanding=1)), **_kw(tok))
    n = 0
    for batch in _take(it, 3):
        check_batch(batch)
        for r, task, sl in _segments(batch):
            inp, tgt, loss = batch["input_ids"][r, sl], batch["target_ids"][r, sl], batch["loss_mask"][r, sl] > 0
            assert (inp == ids["image_token_id"]).sum() == N_UND
            text = tok.decode(inp)
            questions = [t.split(" <|Assistant|>")[0].replace(" ?", "?") for t in text.split("<|User|> : ")[1:]]
            answers = tok.decode(tgt[loss], skip_special_tokens=False).split(" <eos>")[:-1]
            assert len(questions) == len(answers) == len(set(questions)) and 2 <= len(questions) <= 3
            kinds = [shapes.question_kind(q) for q in questions]
            for q, a, k in zip(questions, answers, kinds):
                assert a.strip() in ANSWERS[k], (q, a)
            # No later question can be answered from the earlier answers alone.
            turns = [(q, a.strip()) for q, a in zip(questions, answers)]
            assert not any(shapes.answerable_from(turns[:i], q) for i, (q, _) in enumerate(turns))
            n += 1
    assert n >= 8
    # Every dialogue's answers are the ones its record's qa_pairs give (the tokenizer lower-cases).
    for rec in records.values():
        qas = dict((q.lower(), a) for q, a in shapes.parse_qa_pairs(rec["qa_pairs"]))
        assert qas[rec["question"].lower()] == rec["answer"]
    rng = np.random.default_rng(0)
    rec = next(iter(records.values()))
    turns = pipeline.dialogue_turns(rec, rng, 3)
    assert turns[0] == (rec["question"], rec["answer"]) and set(turns[1:]) <= set(shapes.parse_qa_pairs(rec["qa_pairs"]))
    assert pipeline.dialogue_turns(rec, rng, 1) == [turns[0]]
    old = {k: v for k, v in rec.items() if k != "qa_pairs"}  # a record of shapes world 1.0.0
    with pytest.raises(ValueError, match="needs records with qa_pairs"):
        pipeline.dialogue_turns(old, rng, 2)
    with pytest.raises(ValueError, match="questions_per_image=0 must be an int >= 1"):
        pipeline.make_train_iterator(_cfg(data_dir, questions_per_image=0), **_kw(tok))


def test_question_kinds_restrict_the_questions_asked(data_dir, tok):
    """data.question_kinds=("color", "shape"): every question asked is of those kinds, records
    with none of them (e.g. "two red circles") are skipped, and other kinds are named errors."""
    it = pipeline.make_train_iterator(_cfg(data_dir, questions_per_image=4, question_kinds=("color", "shape"),
                                           mixture=dict(understanding=1)), **_kw(tok))
    kinds = []
    for batch in _take(it, 3):
        check_batch(batch)
        for r, task, sl in _segments(batch):
            text = tok.decode(batch["input_ids"][r, sl])
            questions = [t.split(" <|Assistant|>")[0].replace(" ?", "?") for t in text.split("<|User|> : ")[1:]]
            assert 1 <= len(questions) <= 4
            kinds += [shapes.question_kind(q) for q in questions]
    assert len(kinds) >= 8 and set(kinds) == {"color", "shape"}
    rng = np.random.default_rng(0)
    for rec in pipeline.first_readable_records(_cfg(data_dir), "train", NUM_TRAIN):
        pairs = [(q, a) for q, a in shapes.parse_qa_pairs(rec["qa_pairs"]) if shapes.question_kind(q) == "count"]
        turns = pipeline.dialogue_turns(rec, rng, 2, ("count",))
        assert turns == pairs  # one count question per image, asked even when the record's is another kind
        asked = {shapes.question_kind(q) for q, _ in shapes.parse_qa_pairs(rec["qa_pairs"])}
        assert bool(pipeline.dialogue_turns(rec, rng, 4, ("color", "shape"))) == bool(asked & {"color", "shape"})
    with pytest.raises(ValueError, match=r"question_kinds has unknown kind\(s\) \['colour'\]; kinds are"):
        pipeline.make_train_iterator(_cfg(data_dir, question_kinds=("colour",)), **_kw(tok))


@pytest.mark.parametrize("chunk", [1, 3, 8, 32])
def test_chunk_sizes(chunk):
    shapes_seen = set()
    for n in range(100):
        sizes = pipeline.chunk_sizes(n, chunk)
        assert sum(sizes) == n and all(0 < s <= chunk for s in sizes)
        tail = [s for s in sizes if s != chunk]
        assert tail == sorted(tail, reverse=True) and all(s & (s - 1) == 0 for s in tail)
        assert len(tail) == len(set(tail))
        shapes_seen.update(sizes)
    assert len(shapes_seen) <= 1 + chunk.bit_length()


def test_codes_equal_per_image_encoding_of_the_packed_examples(data_dir, tok):
    """Independent path: unpacked examples -> pack_examples -> codes one image at a time."""
    cfg, kw = _cfg(data_dir), _kw(tok)
    got = _take(pipeline.make_train_iterator(cfg, **kw), 4)
    examples = pipeline.example_dataset(cfg, tokenizer=tok, tokens=kw["tokens"], num_image_tokens=N_UND,
                                        num_gen_tokens=N_GEN)
    stream = (examples[i] for i in range(10_000))
    enc = FakeEncoder()
    packed = packing.pack_examples(stream, num_rows=4, seq_len=128, max_images_per_row=2, image_shape=(S, S, 3))
    for batch, want in zip(got, packed):
        imgs = want["pending_images"]
        codes = np.stack([enc(img[None].astype(np.float32) / 127.5 - 1)[0] for img in imgs])
        assert _same(batch, packing.fill_codes(want, codes))
        assert len(imgs) > 0


@pytest.mark.parametrize("mixture,process", [
    (dict(understanding=5, text=1, generation=4), (0, 1)),
    (dict(understanding=5, text=1, generation=4), (1, 2)),  # every process gets the ratio, too
    (dict(understanding=1, text=0, generation=3), (0, 1)),
])
def test_mixing_ratio_follows_config(data_dir, tok, mixture, process):
    p, n = process
    it = pipeline.make_train_iterator(_cfg(data_dir, mixture=mixture, batch_size=8 * n), process_index=p,
                                      process_count=n, **_kw(tok))
    counts = dict.fromkeys(TASKS, 0)
    for batch in _take(it, 12):
        for _, task, _ in _segments(batch):
            counts[task] += 1
    total = sum(counts.values())
    assert total > 300
    for task in TASKS:
        assert abs(counts[task] / total - mixture[task] / sum(mixture.values())) < 0.02, counts


@pytest.mark.parametrize("prob", [0.0, 0.3, 1.0])
def test_cfg_drop_follows_probability_and_seed(data_dir, tok, prob):
    ids = shapes_vocab.shapes_token_ids(tok)
    common = dict(tokenizer=tok, tokens=ids, num_image_tokens=N_UND, num_gen_tokens=N_GEN)
    cfg = _cfg(data_dir, mixture=dict(generation=1), cfg_drop_prob=prob)
    ds = pipeline.example_dataset(cfg, **common)
    prompt_has_pad = lambda ex: ids["pad_token_id"] in ex["input_ids"][~ex["input_is_image"]]
    dropped = [prompt_has_pad(ds[i]) for i in range(300)]
    assert abs(np.mean(dropped) - prob) < 0.07
    again = pipeline.example_dataset(cfg, **common)
    assert dropped == [prompt_has_pad(again[i]) for i in range(300)]


def test_text_only_mixture_needs_no_encoder(data_dir, tok):
    it = pipeline.make_train_iterator(_cfg(data_dir, mixture=dict(text=1)), **_kw(tok, image_encoder=None))
    batch = next(it)
    check_batch(batch)
    assert {t for _, t, _ in _segments(batch)} == {"text"} and not batch["image_valid"].any()


def _image_key(ex):
    return (ex.get("image") if "image" in ex else ex.get("pending_image", np.zeros(1))).tobytes()


def test_two_processes_partition_the_single_process_stream(data_dir, tok):
    cfg, kw = _cfg(data_dir), _kw(tok)
    common = dict(tokenizer=tok, tokens=kw["tokens"], num_image_tokens=N_UND, num_gen_tokens=N_GEN)
    single = pipeline.example_dataset(cfg, **common)
    procs = [pipeline.example_dataset(cfg, process_index=p, process_count=2, **common) for p in (0, 1)]
    k = 40  # a multiple of the mixing period (5 + 1 + 4), so each task's share is exact
    by_task = lambda exs: {t: [e for e in exs if TASKS[e["task_id"]] == t] for t in TASKS}
    one = by_task([single[i] for i in range(2 * k)])
    parts = [by_task([ds[i] for i in range(k)]) for ds in procs]
    for t in TASKS:
        assert len(one[t]) == len(parts[0][t]) + len(parts[1][t]) > 0
        for p in (0, 1):  # process p holds exactly every other example of the single stream
            assert all(_same(a, b) for a, b in zip(one[t][p::2], parts[p][t]))
    # Within an epoch the processes read disjoint records that together cover the split.
    und = dict(mixture=dict(understanding=1))
    halves = [pipeline.example_dataset(_cfg(data_dir, **und), process_index=p, process_count=2, **common)
              for p in (0, 1)]
    keys = [{_image_key(h[i]) for i in range(NUM_TRAIN // 2)} for h in halves]
    assert not keys[0] & keys[1]
    full = pipeline.example_dataset(_cfg(data_dir, **und), **common)
    assert keys[0] | keys[1] == {_image_key(full[i]) for i in range(NUM_TRAIN)}
    # And the packed batches of each process have batch_size // process_count rows.
    batch = next(pipeline.make_train_iterator(cfg, process_index=1, process_count=2, **kw))
    check_batch(batch)
    assert batch["input_ids"].shape == (2, 128)


def test_epochs_repeat_forever_reshuffled_and_seeded(data_dir, tok):
    common = dict(tokenizer=tok, tokens=shapes_vocab.shapes_token_ids(tok), num_image_tokens=N_UND)
    ds = pipeline.example_dataset(_cfg(data_dir, mixture=dict(understanding=1)), **common)
    first = [_image_key(ds[i]) for i in range(NUM_TRAIN)]
    second = [_image_key(ds[i]) for i in range(NUM_TRAIN, 2 * NUM_TRAIN)]
    assert len(set(first)) == NUM_TRAIN and set(first) == set(second) and first != second
    a = next(pipeline.make_train_iterator(_cfg(data_dir), **_kw(tok)))
    b = next(pipeline.make_train_iterator(_cfg(data_dir), **_kw(tok)))
    c = next(pipeline.make_train_iterator(_cfg(data_dir, seed=1, num_train=NUM_TRAIN), **_kw(tok),
                                          source=_source(data_dir)))
    assert _same(a, b) and not _same(a, c)


@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_resume_from_saved_state_gives_the_same_batches(data_dir, tok, prefetch):
    """Also with batches prefetched in a background thread: the saved state is that of the
    batches taken, not of those already packed ahead."""
    cfg = _cfg(data_dir, prefetch_batches=prefetch)
    for k in (0, 1, 3):
        it = pipeline.make_train_iterator(cfg, **_kw(tok))
        _take(it, k)
        state = json.loads(json.dumps(it.get_state()))
        want = _take(it, 3)
        resumed = pipeline.make_train_iterator(cfg, **_kw(tok))
        resumed.set_state(state)
        assert all(_same(x, y) for x, y in zip(_take(resumed, 3), want))


def test_resume_through_the_orbax_checkpointer(data_dir, tok, tmp_path):
    import jax.numpy as jnp

    from unimm_jax.train.checkpoint import Checkpointer

    cfg = _cfg(data_dir)
    it = pipeline.make_train_iterator(cfg, **_kw(tok))
    _take(it, 2)
    with Checkpointer(tmp_path / "ckpt", async_save=False) as ckpt:
        assert ckpt.save(2, {"w": jnp.zeros(3)}, data_iter=it, force=True)
    want = _take(it, 2)
    resumed = pipeline.make_train_iterator(cfg, **_kw(tok))
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        import jax
        ckpt.restore(2, {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}, data_iter=resumed)
    assert all(_same(x, y) for x, y in zip(_take(resumed, 2), want))


def test_prefetching_gives_the_same_batches(data_dir, tok):
    want = _take(pipeline.make_train_iterator(_cfg(data_dir, prefetch_batches=0), **_kw(tok)), 4)
    got = _take(pipeline.make_train_iterator(_cfg(data_dir, prefetch_batches=2), **_kw(tok)), 4)
    assert all(_same(x, y) for x, y in zip(got, want))


def _source(data_dir):
    return shapes_tfds.shapes_data_source(data_dir, "train", image_size=S, num_train=NUM_TRAIN, num_test=16)


class CorruptSource:
    """The real records, except that records `bad` fail to decode as a damaged zlib image would."""

    def __init__(self, source, bad):
        self._source, self.bad = source, set(bad)

    def __len__(self):
        return len(self._source)

    def __getitem__(self, j):
        if j in self.bad:
            raise zlib.error("Error -3 while decompressing data: invalid stored block lengths")
        return self._source[j]


def test_corrupt_records_are_skipped_logged_and_counted(data_dir, tok, caplog):
    real = _source(data_dir)
    bad = {3, 17}
    bad_images = {(real[j]["image"].astype(np.float32) / 127.5 - 1).tobytes() for j in bad}
    common = dict(tokenizer=tok, tokens=shapes_vocab.shapes_token_ids(tok), num_image_tokens=N_UND)
    cfg = _cfg(data_dir, mixture=dict(understanding=1))
    ds = pipeline.example_dataset(cfg, source=CorruptSource(real, bad), **common)
    before = pipeline.skipped_records().get("train", 0)
    with caplog.at_level(logging.WARNING):
        epoch = [ds[i] for i in range(NUM_TRAIN)]
    assert pipeline.skipped_records()["train"] - before == len(bad)
    assert sum(e is None for e in epoch) == len(bad)
    assert not {e["image"].tobytes() for e in epoch if e is not None} & bad_images
    assert sum("skipping corrupt train record" in r.getMessage() for r in caplog.records) == len(bad)
    # Through the whole pipeline: batches stay valid and never hold a corrupt record's image.
    it = pipeline.make_train_iterator(_cfg(data_dir), source=CorruptSource(real, bad), **_kw(tok))
    for batch in _take(it, 8):
        check_batch(batch)
        slots = batch["pixel_values"][batch["image_valid"]]
        assert not {x.tobytes() for x in slots} & bad_images


def test_unreadable_dataset_and_wrong_image_size_are_clear_errors(data_dir, tok):
    real = _source(data_dir)
    common = dict(tokenizer=tok, tokens=shapes_vocab.shapes_token_ids(tok), num_image_tokens=N_UND)
    ds = pipeline.example_dataset(_cfg(data_dir, mixture=dict(text=1)), source=CorruptSource(real, range(NUM_TRAIN)),
                                  **common)
    with pytest.raises(RuntimeError, match="unreadable"):
        for i in range(NUM_TRAIN):
            ds[i]
    ds = pipeline.example_dataset(_cfg(data_dir, image_size=24, mixture=dict(text=1)), source=real, **common)
    with pytest.raises(ValueError, match="image_size=24"):
        ds[0]


def test_bad_arguments_are_clear_errors(data_dir, tok):
    cfg = _cfg(data_dir)
    with pytest.raises(ValueError, match="needs image_encoder"):
        pipeline.make_train_dataset(cfg, **_kw(tok, image_encoder=None))
    with pytest.raises(ValueError, match=r"image_encoder returned"):
        pipeline.make_train_dataset(cfg, **_kw(tok, image_encoder=lambda x: np.zeros((3, 16), np.int32)))
    with pytest.raises(ValueError, match="non-negative integer"):
        pipeline.make_train_dataset(cfg, **_kw(tok, image_encoder=lambda x: np.zeros((len(x), 16), np.float32)))
    with pytest.raises(ValueError, match="multiple of process_count=2"):
        pipeline.make_train_dataset(_cfg(data_dir, batch_size=5), process_count=2, **_kw(tok))
    with pytest.raises(ValueError, match="process_index=2"):
        pipeline.make_train_dataset(cfg, process_index=2, process_count=2, **_kw(tok))
    with pytest.raises(ValueError, match="unknown task"):
        pipeline.make_train_dataset(_cfg(data_dir, mixture=dict(understanding=1, video=1)), **_kw(tok))
    with pytest.raises(ValueError, match="at least one"):
        pipeline.make_train_dataset(_cfg(data_dir, mixture=dict(understanding=0, text=0, generation=0)),
                                    **_kw(tok))
    with pytest.raises(ValueError, match="data_dir is empty"):
        pipeline.make_train_dataset(_cfg(""), **_kw(tok))
    with pytest.raises(ValueError, match="cfg_drop_prob"):
        pipeline.make_train_dataset(_cfg(data_dir, cfg_drop_prob=1.5), **_kw(tok))
    with pytest.raises(ValueError, match="seq_len=20 is too short"):
        pipeline.make_train_iterator(_cfg(data_dir, seq_len=20), **_kw(tok))
    with pytest.raises(ValueError, match="prefetch_batches=-1 must be >= 0"):
        pipeline.make_train_dataset(_cfg(data_dir, prefetch_batches=-1), **_kw(tok))
    with pytest.raises(ValueError, match="max_images_per_row=0"):
        pipeline.make_train_iterator(_cfg(data_dir, max_images_per_row=0), **_kw(tok))
    # A custom source is checked example by example, when packed.
    it = pipeline.make_train_iterator(_cfg(data_dir, seq_len=20), source=_source(data_dir), **_kw(tok))
    with pytest.raises(ValueError, match="longer than seq_len=20"):
        next(it)


def test_max_example_length_bounds_the_stream(data_dir, tok):
    ids = shapes_vocab.shapes_token_ids(tok)
    common = dict(tokenizer=tok, tokens=ids, num_image_tokens=N_UND, num_gen_tokens=N_GEN)
    cfg = _cfg(data_dir, system_prompt="You are a helpful assistant.")
    bound = pipeline.max_example_length(cfg, **common)
    assert set(bound) == set(TASKS)
    ds = pipeline.example_dataset(cfg, **common)
    seen = dict.fromkeys(TASKS, 0)
    for i in range(400):
        ex = ds[i]
        task = TASKS[ex["task_id"]]
        seen[task] = max(seen[task], len(ex["input_ids"]))
    for task in TASKS:
        assert 0 < seen[task] <= bound[task]
    # Construction accepts rows of exactly the longest example and rejects one token less.
    cfg.seq_len = max(bound.values())
    pipeline.make_train_dataset(cfg, **_kw(tok))
    cfg.seq_len -= 1
    with pytest.raises(ValueError, match="too short"):
        pipeline.make_train_dataset(cfg, **_kw(tok))


def test_vq_image_dataset(data_dir, tok):
    cfg = _cfg(data_dir)
    batches = [_take(iter(pipeline.vq_image_dataset(cfg, batch_size=8, process_index=p, process_count=2)), 4)
               for p in (0, 1)]
    keys = []
    for per_proc in batches:
        for b in per_proc:
            assert set(b) == {"images"}
            x = b["images"]
            assert x.shape == (4, S, S, 3) and x.dtype == np.float32 and -1 <= x.min() and x.max() <= 1
        keys.append({im.tobytes() for b in per_proc for im in b["images"]})
    assert len(keys[0]) == 16 and not keys[0] & keys[1]  # disjoint halves of the first epoch
    one = next(iter(pipeline.vq_image_dataset(cfg, batch_size=8)))["images"]
    assert one.shape == (8, S, S, 3)


def test_eval_examples_and_prompts(data_dir):
    cfg = _cfg(data_dir)
    exs = pipeline.test_understanding_examples(cfg, 6)
    again = pipeline.test_understanding_examples(cfg, 6)
    assert len(exs) == 6
    test_images = {(r["image"].astype(np.float32) / 127.5 - 1).tobytes()
                   for r in (shapes_tfds.shapes_data_source(data_dir, "test", image_size=S, num_train=NUM_TRAIN,
                                                            num_test=16)[j] for j in range(16))}
    for (img, q, a, kind), (img2, *rest) in zip(exs, again):
        assert img.shape == (S, S, 3) and img.dtype == np.float32 and np.array_equal(img, img2)
        assert img.tobytes() in test_images and rest == [q, a, kind]
        assert shapes.question_kind(q) == kind and a in ANSWERS[kind]
    with pytest.raises(ValueError, match="num_test"):
        pipeline.test_understanding_examples(cfg, 17)
    assert pipeline.test_generation_prompts(12, seed=3) == shapes.generation_prompts("test", 12, 3)


@pytest.mark.slow
def test_worker_processes_resume_exactly(data_dir, tok):
    cfg = _cfg(data_dir, worker_count=2)
    it = pipeline.make_train_iterator(cfg, **_kw(tok))
    _take(it, 2)
    state = it.get_state()
    want = _take(it, 3)
    resumed = pipeline.make_train_iterator(cfg, **_kw(tok))
    resumed.set_state(state)
    got = _take(resumed, 3)
    it.close()
    resumed.close()
    for x in got:
        check_batch(x)
    assert all(_same(x, y) for x, y in zip(got, want))
