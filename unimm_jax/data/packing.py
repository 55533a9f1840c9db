"""Greedy first-fit packing of variable-length examples into rows of a training batch.

An example (conversation.py) holds 1-D arrays of one length L: input_ids, input_is_image,
target_ids, target_is_image, loss_mask; plus n_images (0 or 1), task_id, and when n_images is 1
its understanding `image` float32 [H, W, 3] in [-1, 1]. A generation example whose VQ codes are
not known yet carries `pending_image` (uint8 or float [H, W, 3]); its code positions hold
placeholders until `fill_codes` writes the codes (the pipeline encodes all images of a batch in
one call after packing, instead of one image at a time).

Policy (deterministic, as Grain's FirstFitPackIterDataset): examples arrive in order; each goes
into the first of the batch's B rows with room for its L tokens and its images (at most M per
row). The first example that fits no row closes the batch, which is emitted, and opens the next.
Examples keep their order within a row; segment k (1-based) of a row is its k-th example, and
positions restart at 0 in every segment. Padding has segment 0, loss 0, input/target = pad_id.

`PackedBatchIterDataset` is the Grain stage. Its checkpoint state is the parent's state before
the first example of the next batch, so a restored iterator rebuilds exactly the same batches.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import grain
import numpy as np

SEQUENCE_FEATURES = ("input_ids", "input_is_image", "target_ids", "target_is_image", "loss_mask")
_DTYPES = {"input_ids": np.int32, "input_is_image": np.bool_, "target_ids": np.int32,
           "target_is_image": np.bool_, "loss_mask": np.float32}
PENDING_KEYS = ("pending_images", "pending_rows", "pending_segments")


def example_length(example: dict) -> int:
    """L of an example; ValueError naming the feature when its arrays are missing or disagree."""
    missing = [k for k in SEQUENCE_FEATURES + ("n_images", "task_id") if k not in example]
    if missing:
        raise ValueError(f"example is missing {missing}; build it with unimm_jax.data.conversation.")
    lengths = {k: np.shape(example[k]) for k in SEQUENCE_FEATURES}
    first = lengths["input_ids"]
    if len(first) != 1 or first[0] < 1 or any(s != first for s in lengths.values()):
        raise ValueError(f"example features must be 1-D arrays of one length >= 1, got shapes {lengths}.")
    return int(first[0])


class FirstFitPacker:
    """The rows of one batch being filled: `add` examples, then `build` the arrays.

    num_rows: B; seq_len: T; max_images_per_row: M (understanding images per row).
    """

    def __init__(self, num_rows: int, seq_len: int, max_images_per_row: int):
        for name, v, lo in (("num_rows", num_rows, 1), ("seq_len", seq_len, 2),
                            ("max_images_per_row", max_images_per_row, 0)):
            if int(v) != v or v < lo:
                raise ValueError(f"{name}={v!r} must be an integer >= {lo}.")
        self.num_rows, self.seq_len, self.max_images = int(num_rows), int(seq_len), int(max_images_per_row)
        self.examples: list[dict] = []
        self.placements: list[tuple[int, int]] = []  # (row, segment id) per added example
        self._used = [0] * self.num_rows
        self._images = [0] * self.num_rows
        self._segments = [0] * self.num_rows

    def __len__(self) -> int:
        return len(self.examples)

    def add(self, example: dict) -> bool:
        """Places `example` in the first row with room; False when no row has room.

        Raises ValueError (checked before any placement) when the example could not fit even
        an empty row: longer than seq_len, or more images than max_images_per_row.
        """
        n = example_length(example)
        k = int(example["n_images"])
        if n > self.seq_len:
            raise ValueError(
                f"an example of {n} tokens is longer than seq_len={self.seq_len}; raise "
                f"config.data.seq_len to at least {n} (prompt + image tokens + answer).")
        if k > self.max_images:
            raise ValueError(
                f"an example with {k} image(s) cannot fit max_images_per_row={self.max_images}; "
                f"raise config.data.max_images_per_row.")
        if k and np.shape(example.get("image"))[-1:] != (3,):
            raise ValueError(f"an example with n_images={k} needs its `image` [H, W, 3], got "
                             f"{np.shape(example.get('image'))}.")
        for r in range(self.num_rows):
            if self._used[r] + n <= self.seq_len and self._images[r] + k <= self.max_images:
                self._used[r] += n
                self._images[r] += k
                self._segments[r] += 1
                self.examples.append(example)
                self.placements.append((r, self._segments[r]))
                return True
        return False

    def build(self, image_shape: Sequence[int], pad_id: int = 0) -> dict:
        """The packed batch (batch.py features) plus PENDING_KEYS for pending images.

        image_shape: (H, W, 3) of pixel_values slots. pending_images: [G, H, W, 3] in the
        pending examples' dtype (uint8 when there are none), pending_rows / pending_segments:
        int32 [G], where the codes of pending image g go (see `fill_codes`).
        """
        b, t, m = self.num_rows, self.seq_len, self.max_images
        out = {k: np.zeros((b, t), d) for k, d in _DTYPES.items()}
        out["input_ids"][:] = pad_id
        out["target_ids"][:] = pad_id
        out["task_ids"] = np.zeros((b, t), np.int32)
        out["segment_ids"] = np.zeros((b, t), np.int32)
        out["positions"] = np.zeros((b, t), np.int32)
        out["pixel_values"] = np.zeros((b, m) + tuple(image_shape), np.float32)
        out["image_valid"] = np.zeros((b, m), np.bool_)
        cursor, slot = [0] * b, [0] * b
        pending, rows, segs = [], [], []
        for ex, (r, seg) in zip(self.examples, self.placements):
            n, s = example_length(ex), cursor[r]
            for k in SEQUENCE_FEATURES:
                out[k][r, s:s + n] = ex[k]
            out["task_ids"][r, s:s + n] = ex["task_id"]
            out["segment_ids"][r, s:s + n] = seg
            out["positions"][r, s:s + n] = np.arange(n)
            cursor[r] += n
            if int(ex["n_images"]):
                image = np.asarray(ex["image"], np.float32)
                if image.shape != tuple(image_shape):
                    raise ValueError(f"understanding image has shape {image.shape}; the batch takes "
                                     f"{tuple(image_shape)} (config.data.image_size).")
                out["pixel_values"][r, slot[r]] = image
                out["image_valid"][r, slot[r]] = True
                slot[r] += 1
            if "pending_image" in ex:
                pending.append(np.asarray(ex["pending_image"]))
                rows.append(r)
                segs.append(seg)
        out["pending_images"] = (np.stack(pending) if pending
                                 else np.zeros((0,) + tuple(image_shape), np.uint8))
        out["pending_rows"] = np.asarray(rows, np.int32)
        out["pending_segments"] = np.asarray(segs, np.int32)
        return out


def fill_codes(batch: dict, codes: np.ndarray) -> dict:
    """Writes VQ codes int [G, N] of the batch's pending images into their rows, in place.

    Pending image g lives in row pending_rows[g], segment pending_segments[g]: its N targets
    with target_is_image get codes[g] and its N - 1 inputs with input_is_image get
    codes[g, :-1]. Returns the batch without the PENDING_KEYS.
    """
    rows, segs = batch.pop("pending_rows"), batch.pop("pending_segments")
    batch.pop("pending_images")
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[0] != len(rows):
        raise ValueError(f"codes must be [G={len(rows)}, N] for the batch's pending images, got {list(codes.shape)}.")
    for g, (r, seg) in enumerate(zip(rows, segs)):
        in_seg = batch["segment_ids"][r] == seg
        tgt = np.flatnonzero(in_seg & batch["target_is_image"][r])
        inp = np.flatnonzero(in_seg & batch["input_is_image"][r])
        if len(tgt) != codes.shape[1] or len(inp) != codes.shape[1] - 1:
            raise ValueError(
                f"the image encoder gives {codes.shape[1]} codes per image but the packed example "
                f"in row {r} has {len(tgt)} code positions; pass num_gen_tokens equal to the "
                f"VQ's tokens per image.")
        batch["target_ids"][r, tgt] = codes[g]
        batch["input_ids"][r, inp] = codes[g, :-1]
    return batch


def pack_examples(examples: Iterable[dict], *, num_rows: int, seq_len: int, max_images_per_row: int,
                  image_shape: Sequence[int], pad_id: int = 0) -> Iterator[dict]:
    """The module's policy over a plain iterable: yields packed batches (`FirstFitPacker.build`)."""
    packer = FirstFitPacker(num_rows, seq_len, max_images_per_row)
    for ex in examples:
        if not packer.add(ex):
            yield packer.build(image_shape, pad_id)
            packer = FirstFitPacker(num_rows, seq_len, max_images_per_row)
            packer.add(ex)  # fits: add() already rejected examples too big for an empty batch
    if len(packer):
        yield packer.build(image_shape, pad_id)


class _PackedBatchIterator(grain.DatasetIterator):
    """Checkpointable iterator of PackedBatchIterDataset (see the module docstring)."""

    def __init__(self, parent: grain.DatasetIterator, cfg: dict):
        super().__init__(parent)
        self._cfg = cfg
        self._carry = None          # the example that closed the last batch
        self._carry_state = None    # parent state just before that example was read

    def __next__(self) -> dict:
        c = self._cfg
        packer = FirstFitPacker(c["num_rows"], c["seq_len"], c["max_images_per_row"])
        if self._carry is not None:
            packer.add(self._carry)
            self._carry = self._carry_state = None
        while True:
            state = self._parent.get_state()
            try:
                ex = next(self._parent)
            except StopIteration:
                if not len(packer):
                    raise
                break
            if not packer.add(ex):
                self._carry, self._carry_state = ex, state
                break
        return packer.build(c["image_shape"], c["pad_id"])

    def get_state(self) -> dict:
        parent = self._carry_state if self._carry is not None else self._parent.get_state()
        return {"parent": parent}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._carry = self._carry_state = None


class PackedBatchIterDataset(grain.IterDataset):
    """Grain stage: an IterDataset of examples -> packed batches of `num_rows` rows.

    Each element is `FirstFitPacker.build`'s dict: the batch.py features for [num_rows, seq_len]
    plus PENDING_KEYS (empty when no example carries a pending image).
    """

    def __init__(self, parent: grain.IterDataset, *, num_rows: int, seq_len: int, max_images_per_row: int,
                 image_shape: Sequence[int], pad_id: int = 0):
        super().__init__(parent)
        FirstFitPacker(num_rows, seq_len, max_images_per_row)  # validates the sizes now
        self._cfg = dict(num_rows=num_rows, seq_len=seq_len, max_images_per_row=max_images_per_row,
                         image_shape=tuple(image_shape), pad_id=int(pad_id))

    def __iter__(self) -> grain.DatasetIterator:
        return _PackedBatchIterator(self._parent.__iter__(), self._cfg)

    def __str__(self) -> str:
        return f"PackedBatchIterDataset({self._cfg})"
