"""The Grain training input pipeline over the shapes world (TFDS array_record) -> batch.py batches.

    records (SafeRecords over shapes_tfds.shapes_data_source: a corrupt record -> logged skip)
      -> per task: global shuffle by seed, repeated forever (reshuffled every epoch),
         formatted by conversation.py (generation: prompt + code placeholders, CFG drop by seed),
         this process's slice [process_index::process_count]
      -> MapDataset.mix by config.data.mixture (understanding : text : generation)
      -> to_iter_dataset -> packing.PackedBatchIterDataset (batch_size // process_count rows)
      -> [mp_prefetch when worker_count > 0]
      -> encode every generation image of the batch with `image_encoder` in a few batched
         calls (`chunk_sizes`) and write the codes into their rows (packing.fill_codes)

Every step is a deterministic function of config.data.seed, so process p's examples are
exactly the p-th slice of the single-process stream of each task, and the iterator state
(get_state / set_state, saved by train/checkpoint.py) restores the very same next batches.
Sharding happens after shuffling, so processes never share an example position; a record
may serve different processes in different epochs (each epoch is reshuffled).
"""
from __future__ import annotations

import collections
import functools
import threading
from typing import Callable, Mapping, Sequence

import grain
import ml_collections
import numpy as np
from absl import logging

from unimm_jax.data import conversation, shapes, shapes_tfds, shapes_vocab
from unimm_jax.data.batch import TASKS
from unimm_jax.data.packing import PackedBatchIterDataset, fill_codes
from unimm_jax.data.text_tokenizer import TextTokenizer

_TASK_TAG = {t: i + 1 for i, t in enumerate(TASKS)}
_SKIPS = collections.Counter()
_SKIPS_LOCK = threading.Lock()


def default_data_config() -> ml_collections.ConfigDict:
    """config.data of a training run on the shapes world (see the field comments)."""
    c = ml_collections.ConfigDict()
    c.data_dir = ""               # TFDS data dir; "" = WORKDIR/data, filled in by the trainer
    c.image_size = 64             # H = W of the images (must equal the model's image size)
    c.num_train = shapes_tfds.DEFAULT_NUM_TRAIN
    c.num_test = shapes_tfds.DEFAULT_NUM_TEST
    c.seed = 0                    # dataset generation, shuffling and CFG-drop decisions
    c.seq_len = 256               # T: tokens per packed row
    c.batch_size = 16             # global rows per step; each process gets batch_size // process_count
    c.max_images_per_row = 4      # M: understanding images per row
    c.mixture = ml_collections.ConfigDict(dict(understanding=5, text=1, generation=4))
    c.cfg_drop_prob = 0.1         # generation examples whose prompt becomes the unconditional one
    c.system_prompt = ""          # system prompt of understanding examples (chat_format.format_turn)
    c.questions_per_image = 1     # turns of an understanding dialogue: the record's question, then
                                  # up to this many - 1 more of its qa_pairs in random order
    c.question_kinds = ()         # kinds of question asked (shapes.QUESTION_KINDS), () = all; a
                                  # record with none of them is skipped
    c.worker_count = 0            # Grain worker processes packing batches (0 = the main process);
                                  # each worker packs its own slice, so batches differ per count
    c.encode_batch_size = 32      # max images per image_encoder call (see pipeline.chunk_sizes)
    c.read_threads = 4            # threads reading + formatting records per process
    c.prefetch_batches = 0        # batches packed (and VQ-encoded) in a background thread while
                                  # the step runs; 0 = on demand. The same batches either way, and
                                  # the checkpointed state is that of the batches taken. For hosts
                                  # with spare cores: on the 2-core CPU the thread competed with
                                  # XLA's compute threads (LLM step 1.24 s with 1, 1.15 s with 0)
    return c


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------


def skipped_records() -> dict[str, int]:
    """Corrupt records skipped so far in this process, by split (each skip is also logged)."""
    with _SKIPS_LOCK:
        return dict(_SKIPS)


class SafeRecords:
    """Random-access source: record j -> dict(image uint8 [S,S,3], caption, question, answer,
    question_kind, index), or None when the record cannot be read or decoded (Grain skips it).

    A skip is logged and counted (`skipped_records`). A record that decodes to an image of
    another size or dtype is a configuration error, not corruption: ValueError with the fix.
    When every record of the source has been skipped, RuntimeError (instead of spinning forever).
    """

    _TEXT = ("caption", "question", "answer", "question_kind")
    _OPTIONAL_TEXT = ("qa_pairs",)  # shapes world >= 1.1.0; checked where it is needed

    def __init__(self, source, image_size: int, split: str = "train"):
        self._source, self._size, self._split = source, int(image_size), split
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, j: int):
        try:
            rec = self._source[j]
            image = np.asarray(rec["image"])
            text = lambda v: v if isinstance(v, str) else v.decode("utf-8")
            out = {k: text(rec[k]) for k in self._TEXT}
            out.update({k: text(rec[k]) for k in self._OPTIONAL_TEXT if k in rec})
            out["index"] = int(rec.get("index", j))
        except Exception as e:  # any read/decode failure of one record: skip it, loudly
            self._skip(j, e)
            return None
        want = (self._size, self._size, 3)
        if image.shape != want or image.dtype != np.uint8:
            raise ValueError(
                f"{self._split} record {j} has a {image.dtype}{list(image.shape)} image but config.data."
                f"image_size={self._size} expects uint8{list(want)}; set data.image_size to the "
                f"dataset's size or rebuild the dataset at this size.")
        out["image"] = image
        return out

    def _skip(self, j: int, error: Exception) -> None:
        with _SKIPS_LOCK:
            _SKIPS[self._split] += 1
            self._bad.add(int(j))
            total, bad = _SKIPS[self._split], len(self._bad)
        logging.warning("skipping corrupt %s record %d (%s: %s); %d skipped so far.",
                        self._split, j, type(error).__name__, error, total)
        if bad >= len(self._source):
            raise RuntimeError(f"every one of the {bad} {self._split} records failed to decode "
                               f"(last error: {error!r}); the dataset is unreadable, rebuild it.")


def _open_records(data_cfg, split: str, source=None) -> SafeRecords:
    if source is None:
        if not data_cfg.data_dir:
            raise ValueError("config.data.data_dir is empty: set it to the TFDS data directory "
                             "(the trainer fills in WORKDIR/data).")
        source = shapes_tfds.shapes_data_source(
            data_cfg.data_dir, split, image_size=data_cfg.image_size, num_train=data_cfg.num_train,
            num_test=data_cfg.num_test, seed=data_cfg.seed)
    return SafeRecords(source, data_cfg.image_size, split)


def _normalise(image: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] -> float32 in [-1, 1] (the SigLIP / VQ normalisation, mean = std = 0.5)."""
    return np.asarray(image, np.float32) / 127.5 - 1.0


def _derive_seed(seed: int, *tags: int) -> int:
    """A 32-bit seed for one stage, independent across tags (Grain takes seeds < 2**32)."""
    return int(np.random.SeedSequence([int(seed), *tags]).generate_state(1)[0])


# ---------------------------------------------------------------------------------------------
# Per-task formatting (module-level functions so worker processes can unpickle them)
# ---------------------------------------------------------------------------------------------


def dialogue_turns(rec, rng: np.random.Generator, questions_per_image: int,
                   question_kinds: Sequence[str] = ()) -> list[tuple[str, str]]:
    """The record's own question first, then up to ``questions_per_image - 1`` other pairs of
    its ``qa_pairs`` in random order, skipping any whose answer the earlier turns already give
    (`shapes.answerable_from`: every answer must be read from the image). A record without
    qa_pairs is an older shapes world: error.

    question_kinds: only questions of these kinds (`shapes.question_kind`); when the record's
    own question is of another kind, a random allowed pair comes first. [] when the record has
    none (the caller skips it). () = every kind.
    """
    own = (rec["question"], rec["answer"])
    if questions_per_image <= 1 and not question_kinds:
        return [own]
    if "qa_pairs" not in rec:
        raise ValueError("data.questions_per_image > 1 (or data.question_kinds) needs records with qa_pairs "
                         "(shapes world >= 1.1.0); rebuild the dataset (a new data_dir) or set "
                         "data.questions_per_image=1 and data.question_kinds=().")
    others = [qa for qa in shapes.parse_qa_pairs(rec["qa_pairs"]) if qa[0] != own[0]]
    if question_kinds:
        allowed = lambda qa: shapes.question_kind(qa[0]) in question_kinds
        others = [qa for qa in others if allowed(qa)]
        if not allowed(own):
            if not others:
                return []
            own = others.pop(int(rng.integers(len(others))))
    turns = [own]
    for i in rng.permutation(len(others)):
        if len(turns) >= questions_per_image:
            break
        if not shapes.answerable_from(turns, others[i][0]):
            turns.append(others[i])
    return turns


def _question_kinds(data_cfg) -> tuple[str, ...]:
    kinds = tuple(data_cfg.get("question_kinds", ()) or ())
    unknown = sorted(set(kinds) - set(shapes.QUESTION_KINDS))
    if unknown:
        raise ValueError(f"config.data.question_kinds has unknown kind(s) {unknown}; kinds are "
                         f"{list(shapes.QUESTION_KINDS)} (() = all).")
    return kinds


def _format_understanding(rec, rng=None, *, tokenizer, tokens, num_image_tokens, system_prompt,
                          questions_per_image=1, question_kinds=()):
    turns = dialogue_turns(rec, rng, questions_per_image, question_kinds)
    if not turns:  # none of question_kinds applies to this image
        return None
    ex = conversation.understanding_dialogue_example(tokenizer, tokens, turns, num_image_tokens,
                                                     system_prompt=system_prompt)
    ex["image"] = _normalise(rec["image"])
    return ex


def _format_text(rec, *, tokenizer, tokens):
    return conversation.text_example(tokenizer, tokens, rec["caption"])


def _format_generation(rec, rng, *, tokenizer, tokens, num_gen_tokens, cfg_drop_prob):
    drop = bool(rng.random() < cfg_drop_prob)
    # Codes are written after packing, when the whole batch's images are encoded at once.
    ex = conversation.generation_example(tokenizer, tokens, rec["caption"],
                                         np.zeros(num_gen_tokens, np.int32), cfg_drop=drop)
    ex["pending_image"] = rec["image"]
    return ex


def chunk_sizes(n: int, chunk: int) -> list[int]:
    """Sizes of the encoder calls for n images: full chunks, then the rest as descending powers
    of two (21 with chunk 8 -> [8, 8, 4, 1]). No padding is wasted, and a jitted encoder sees
    at most 1 + log2(chunk) distinct shapes, so it compiles a bounded number of times."""
    sizes = [chunk] * (n // chunk)
    rest = n % chunk
    while rest:
        sizes.append(1 << (rest.bit_length() - 1))
        rest -= sizes[-1]
    return sizes


class _EncodePending:
    """Batch map: encodes the batch's pending generation images and writes their codes.

    image_encoder: float32 [n, H, W, 3] in [-1, 1] -> int [n, N], called with n from
    `chunk_sizes` (batched calls, a bounded set of shapes).
    """

    def __init__(self, image_encoder, chunk: int, num_gen_tokens: int):
        self._encode, self._chunk, self._n = image_encoder, int(chunk), int(num_gen_tokens)

    def __call__(self, batch: dict) -> dict:
        images = batch["pending_images"]
        codes = np.zeros((len(images), self._n), np.int32)
        start = 0
        for size in chunk_sizes(len(images), self._chunk):
            part = _normalise(images[start:start + size])
            codes[start:start + size] = _check_codes(self._encode(part), size, self._n)
            start += size
        return fill_codes(batch, codes)


def _check_codes(codes, rows: int, n: int | None) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[0] != rows or (n is not None and codes.shape[1] != n):
        raise ValueError(f"image_encoder returned {codes.dtype}{list(codes.shape)} for {rows} images; it must "
                         f"map float32 [n, H, W, 3] to int32 codes [n, N]"
                         + (f" with N = num_gen_tokens = {n}." if n is not None else "."))
    if not np.issubdtype(codes.dtype, np.integer) or codes.min() < 0:
        raise ValueError(f"image_encoder must return non-negative integer VQ codes, got {codes.dtype} "
                         f"with min {codes.min()}.")
    return codes.astype(np.int32)


# ---------------------------------------------------------------------------------------------
# Training batches
# ---------------------------------------------------------------------------------------------


def _mixture(data_cfg) -> dict[str, float]:
    mix = dict(data_cfg.mixture)
    unknown = sorted(set(mix) - set(TASKS))
    if unknown:
        raise ValueError(f"config.data.mixture has unknown task(s) {unknown}; tasks are {TASKS}.")
    weights = {t: float(mix.get(t, 0)) for t in TASKS}
    if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
        raise ValueError(f"config.data.mixture={mix} needs non-negative weights with at least one "
                         f"positive, e.g. dict(understanding=5, text=1, generation=4).")
    return {t: w for t, w in weights.items() if w > 0}


def _questions_per_image(data_cfg) -> int:
    n = data_cfg.get("questions_per_image", 1)
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"config.data.questions_per_image={n!r} must be an int >= 1 (1 = one question per image).")
    return n


def _check_process(process_index: int, process_count: int) -> None:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count}).")


def _check_sharding(batch_size: int, process_index: int, process_count: int) -> int:
    """Rows per process; ValueError when the global batch does not split evenly."""
    _check_process(process_index, process_count)
    if batch_size < 1 or batch_size % process_count:
        raise ValueError(f"batch_size={batch_size} (global) must be a positive multiple of "
                         f"process_count={process_count}; each process takes batch_size // process_count.")
    return batch_size // process_count


def example_dataset(data_cfg, *, tokenizer: TextTokenizer, tokens: Mapping[str, int], num_image_tokens: int,
                    num_gen_tokens: int = 0, process_index: int = 0, process_count: int = 1,
                    source=None) -> grain.MapDataset:
    """This process's infinite, mixed stream of unpacked examples (before packing).

    Elements are conversation.py examples (None for skipped records); generation examples
    carry `pending_image` uint8 [S, S, 3] and zero codes. Exposed for inspection and tests.
    """
    weights = _mixture(data_cfg)
    _check_process(process_index, process_count)
    if not 0.0 <= data_cfg.cfg_drop_prob <= 1.0:
        raise ValueError(f"config.data.cfg_drop_prob={data_cfg.cfg_drop_prob} must be in [0, 1].")
    records = grain.MapDataset.source(_open_records(data_cfg, "train", source))
    fmt = dict(tokenizer=tokenizer, tokens=dict(tokens))
    per_task = []
    for task in weights:
        ds = records.shuffle(seed=_derive_seed(data_cfg.seed, _TASK_TAG[task])).repeat()
        if task == "understanding":
            ds = ds.random_map(functools.partial(
                _format_understanding, num_image_tokens=int(num_image_tokens), system_prompt=data_cfg.system_prompt,
                questions_per_image=_questions_per_image(data_cfg), question_kinds=_question_kinds(data_cfg),
                **fmt),
                seed=_derive_seed(data_cfg.seed, _TASK_TAG[task], 7))
        elif task == "text":
            ds = ds.map(functools.partial(_format_text, **fmt))
        else:
            ds = ds.random_map(functools.partial(_format_generation, num_gen_tokens=int(num_gen_tokens),
                                                 cfg_drop_prob=float(data_cfg.cfg_drop_prob), **fmt),
                               seed=_derive_seed(data_cfg.seed, _TASK_TAG[task], 7))
        per_task.append(ds[process_index::process_count])
    if len(per_task) == 1:
        return per_task[0]
    return grain.MapDataset.mix(per_task, list(weights.values()))


def max_example_length(data_cfg, *, tokenizer: TextTokenizer, tokens: Mapping[str, int], num_image_tokens: int,
                       num_gen_tokens: int = 0) -> dict[str, int]:
    """The longest example (tokens, = positions in a row) of each task in the mixture, over every
    caption / question / answer the shapes world can produce (shapes_vocab.all_*)."""
    weights = _mixture(data_cfg)
    longest = lambda texts: max(texts, key=lambda t: len(tokenizer.encode(t)))
    caption = longest(shapes_vocab.all_captions())
    out = {}
    if "understanding" in weights:
        turn = (longest(shapes_vocab.all_questions()), longest(shapes_vocab.all_answers()))
        ex = conversation.understanding_dialogue_example(
            tokenizer, tokens, [turn] * _questions_per_image(data_cfg), int(num_image_tokens),
            system_prompt=data_cfg.system_prompt)
        out["understanding"] = len(ex["input_ids"])
    if "text" in weights:
        out["text"] = len(conversation.text_example(tokenizer, tokens, caption)["input_ids"])
    if "generation" in weights:
        codes = np.zeros(max(int(num_gen_tokens), 1), np.int32)
        out["generation"] = len(conversation.generation_example(tokenizer, tokens, caption, codes)["input_ids"])
    return out


def _check_fits(data_cfg, lengths: Mapping[str, int]) -> None:
    """Fail at construction, not at step k, when some task's examples cannot fit a row."""
    task, need = max(lengths.items(), key=lambda kv: kv[1])
    if need > int(data_cfg.seq_len):
        raise ValueError(f"seq_len={data_cfg.seq_len} is too short: {task} examples take up to {need} tokens "
                         f"({dict(lengths)}); raise config.data.seq_len to at least {need}.")
    if "understanding" in lengths and int(data_cfg.max_images_per_row) < 1:
        raise ValueError("config.data.max_images_per_row=0 leaves no room for understanding images; "
                         "set it >= 1 or mixture.understanding=0.")


def _num_gen_tokens(image_encoder, image_size: int) -> int:
    """Codes per image, read off one encoder call on one zero image (a shape chunk_sizes uses)."""
    probe = image_encoder(np.zeros((1, image_size, image_size, 3), np.float32))
    return int(_check_codes(probe, 1, None).shape[1])


def make_train_dataset(data_cfg, *, tokenizer: TextTokenizer, tokens: Mapping[str, int], num_image_tokens: int,
                       image_encoder: Callable | None = None, process_index: int = 0, process_count: int = 1,
                       num_gen_tokens: int | None = None, source=None) -> grain.IterDataset:
    """Infinite Grain IterDataset of this process's packed batches (dicts per batch.py).

    Each batch has B = batch_size // process_count rows of T = seq_len tokens and M =
    max_images_per_row image slots of image_size pixels.

    Args:
      data_cfg: `default_data_config()`-shaped config (config.data).
      tokenizer, tokens: the text tokenizer and config.model.tokens ids.
      num_image_tokens: placeholders per understanding image (janus_config.num_understanding_tokens).
      image_encoder: float32 [n, H, W, 3] in [-1, 1] -> int32 codes [n, N], e.g. a jitted VQ
        encode; required when mixture.generation > 0. Called from the main process on
        chunks of at most data_cfg.encode_batch_size images (sizes from `chunk_sizes`).
      num_gen_tokens: N; None = read off one encoder call on a zero image.
      source: a random-access source of shapes-world records to read instead of the TFDS
        train split (tests, custom data).

    With data_cfg.worker_count > 0, packing runs in Grain worker processes, each on its own
    slice of the example stream: still deterministic and exactly resumable, but a different
    batch sequence than worker_count = 0 (as Grain documents for stateful stages).
    """
    rows = _check_sharding(int(data_cfg.batch_size), process_index, process_count)
    weights = _mixture(data_cfg)
    chunk = int(data_cfg.get("encode_batch_size", 32))
    if "generation" in weights:
        if image_encoder is None:
            raise ValueError("config.data.mixture.generation > 0 needs image_encoder (images -> VQ codes, "
                             "e.g. the model's jitted vq_encode); pass it or set mixture.generation=0.")
        if chunk < 1:
            raise ValueError(f"config.data.encode_batch_size={chunk} must be >= 1.")
        if num_gen_tokens is None:
            num_gen_tokens = _num_gen_tokens(image_encoder, data_cfg.image_size)
    if source is None:  # the shapes world: every example length is known in advance
        _check_fits(data_cfg, max_example_length(data_cfg, tokenizer=tokenizer, tokens=tokens,
                                                 num_image_tokens=num_image_tokens,
                                                 num_gen_tokens=num_gen_tokens or 0))
    examples = example_dataset(data_cfg, tokenizer=tokenizer, tokens=tokens, num_image_tokens=num_image_tokens,
                               num_gen_tokens=num_gen_tokens or 0, process_index=process_index,
                               process_count=process_count, source=source)
    threads = int(data_cfg.get("read_threads", 4))
    ds = examples.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(16, 8 * threads)))
    s = int(data_cfg.image_size)
    ds = PackedBatchIterDataset(ds, num_rows=rows, seq_len=int(data_cfg.seq_len),
                                max_images_per_row=int(data_cfg.max_images_per_row), image_shape=(s, s, 3),
                                pad_id=int(tokens["pad_token_id"]))
    if int(data_cfg.worker_count) > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags (defaults will do)
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(data_cfg.worker_count)))
    ds = ds.map(_EncodePending(image_encoder, chunk, num_gen_tokens or 0))
    prefetch = int(data_cfg.get("prefetch_batches", 0))
    if prefetch < 0:
        raise ValueError(f"config.data.prefetch_batches={prefetch} must be >= 0.")
    if prefetch:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
    return ds


def make_train_iterator(data_cfg, **kwargs) -> grain.DatasetIterator:
    """`iter(make_train_dataset(...))`: a checkpointable iterator (get_state / set_state)."""
    return iter(make_train_dataset(data_cfg, **kwargs))


# ---------------------------------------------------------------------------------------------
# VQ tokenizer training and evaluation data
# ---------------------------------------------------------------------------------------------


def _image_only(rec):
    return _normalise(rec["image"])


def _as_images(batch):
    return {"images": batch}


def vq_image_dataset(data_cfg, *, batch_size: int, process_index: int = 0, process_count: int = 1,
                     source=None) -> grain.IterDataset:
    """Infinite {"images": float32 [b, H, W, 3] in [-1, 1]} batches of train images for the VQ.

    batch_size is global, like config.data.batch_size: each process yields
    b = batch_size // process_count images of its own slice of the shuffled stream.
    """
    b = _check_sharding(int(batch_size), process_index, process_count)
    records = grain.MapDataset.source(_open_records(data_cfg, "train", source))
    ds = records.shuffle(seed=_derive_seed(data_cfg.seed, 99)).repeat().map(_image_only)
    ds = ds[process_index::process_count].to_iter_dataset(
        grain.ReadOptions(num_threads=int(data_cfg.get("read_threads", 4)), prefetch_buffer_size=4 * b))
    return ds.batch(b, drop_remainder=True).map(_as_images)


def first_readable_records(data_cfg, split: str, n: int, source=None) -> list[dict]:
    """Up to n records of `split` in index order, corrupt ones skipped (SafeRecords): fewer when
    the split has fewer readable records."""
    records = _open_records(data_cfg, split, source)
    out = []
    for j in range(len(records)):
        if len(out) == n:
            break
        rec = records[j]
        if rec is not None:
            out.append(rec)
    return out


def test_understanding_examples(data_cfg, n: int, source=None) -> list[tuple[np.ndarray, str, str, str]]:
    """The first n readable test-split records as (image float32 [H, W, 3] in [-1, 1], question,
    answer, question kind); the same list on every call."""
    out = [(_normalise(rec["image"]), rec["question"], rec["answer"], rec["question_kind"])
           for rec in first_readable_records(data_cfg, "test", n, source)]
    if len(out) < n:
        raise ValueError(f"asked for {n} test examples but the test split has {len(out)} readable ones; "
                         f"raise config.data.num_test or ask for fewer.")
    return out


def test_captioned_images(data_cfg, n: int, source=None) -> tuple[np.ndarray, list[str]]:
    """The first n readable test-split records as (images float32 [n, H, W, 3] in [-1, 1],
    their captions): held-out text-to-image pairs, the same on every call."""
    recs = first_readable_records(data_cfg, "test", n, source)
    if len(recs) < n:
        raise ValueError(f"asked for {n} test images but the test split has {len(recs)} readable ones; "
                         f"raise config.data.num_test or ask for fewer.")
    return np.stack([_normalise(r["image"]) for r in recs]), [r["caption"] for r in recs]


def test_generation_prompts(n: int, seed: int = 0) -> list[str]:
    """n deterministic test-split generation prompts (shapes.generation_prompts("test", n, seed))."""
    return shapes.generation_prompts("test", n, seed)


# Not pytest tests, despite their names (pytest would collect them where they are imported).
test_understanding_examples.__test__ = False
test_generation_prompts.__test__ = False
test_captioned_images.__test__ = False
