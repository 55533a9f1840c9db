"""One training example per task -> the unpacked token arrays of the batch contract (batch.py).

A task builds a token sequence s[0..L-1] from chat_format's prompt layout; the example is the
next-token view of it (L - 1 positions):

  input_ids[t] = s[t]       target_ids[t] = s[t + 1]
  input_is_image[t]  = s[t] is a VQ code       target_is_image[t] = s[t + 1] is a VQ code
  loss_mask[t] = 1 where s[t + 1] is trained

  understanding  BOS <|User|>: <boi> N x <image_placeholder> <eoi> question <|Assistant|>: answer EOS
                 [<|User|>: question <|Assistant|>: answer EOS ...]  (more turns: a dialogue)
                 loss on the answers and their EOS only; n_images = 1
  text           BOS caption EOS, a plain language-model sample; loss on every target
  generation     BOS <|User|>: caption <|Assistant|>: <boi> code_0 .. code_{N-1}
                 loss on the N codes only; the last code is never an input, as at sampling time
                 (`Janus.image_logits`). cfg_drop=True swaps the prompt for
                 chat_format.unconditional_ids so the model learns CFG's unconditional branch.

Each function returns dict(input_ids int32 [L-1], input_is_image bool [L-1], target_ids int32
[L-1], target_is_image bool [L-1], loss_mask float32 [L-1], n_images int, task_id int (index in
batch.TASKS)).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from unimm_jax.data import chat_format
from unimm_jax.data.batch import TASKS
from unimm_jax.data.text_tokenizer import TextTokenizer

_REQUIRED_TOKENS = ("image_token_id", "boi_token_id", "eoi_token_id", "pad_token_id", "bos_token_id",
                    "eos_token_id")


def _check_tokens(tokens: Mapping[str, int]) -> None:
    missing = [k for k in _REQUIRED_TOKENS if k not in tokens]
    if missing:
        raise ValueError(f"tokens is missing {missing}; pass config.model.tokens or "
                         f"shapes_vocab.shapes_token_ids(tokenizer).")


def _check_text(name: str, value) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty str, got {value!r}.")


def _example(seq: Sequence[int], is_image: np.ndarray, trained: np.ndarray, n_images: int, task: str) -> dict:
    """Next-token view of `seq` (int [L]); `is_image`/`trained` are bool [L] over `seq`."""
    seq = np.asarray(seq, np.int32)
    return dict(
        input_ids=seq[:-1].copy(),
        input_is_image=is_image[:-1].copy(),
        target_ids=seq[1:].copy(),
        target_is_image=is_image[1:].copy(),
        loss_mask=trained[1:].astype(np.float32),
        n_images=int(n_images),
        task_id=TASKS.index(task),
    )


def understanding_example(
    tokenizer: TextTokenizer,
    tokens: Mapping[str, int],
    question: str,
    answer: str,
    num_image_tokens: int,
    system_prompt: str = "",
) -> dict:
    """An image question and its answer; loss on the answer ids + EOS (chat_format.answer_ids).

    num_image_tokens: placeholders for the one image (SigLIP tokens,
    `janus_config.num_understanding_tokens`). The image itself travels beside the example.
    """
    return understanding_dialogue_example(tokenizer, tokens, [(question, answer)], num_image_tokens,
                                          system_prompt=system_prompt)


def understanding_dialogue_example(
    tokenizer: TextTokenizer,
    tokens: Mapping[str, int],
    turns: Sequence[tuple[str, str]],
    num_image_tokens: int,
    system_prompt: str = "",
) -> dict:
    """Several questions about one image, one turn each; loss on every answer + its EOS.

    turns: ``[(question, answer), ...]``, at least one. The first turn carries the image and
    is exactly `understanding_example` (the layout sampling uses); later turns follow the
    previous answer's EOS as ``<|User|>: question\n\n<|Assistant|>:`` (DeepSeek's multi-turn
    template). More answers per image means more supervised tokens per image read.
    """
    _check_tokens(tokens)
    if not turns:
        raise ValueError("turns must hold at least one (question, answer) pair.")
    if int(num_image_tokens) < 1:
        raise ValueError(f"num_image_tokens={num_image_tokens} must be >= 1.")
    seq: list[int] = []
    trained: list[bool] = []
    for i, (question, answer) in enumerate(turns):
        _check_text("question", question)
        _check_text("answer", answer)
        if i == 0:
            prompt = chat_format.understanding_prompt_ids(tokenizer, question, tokens, int(num_image_tokens),
                                                          system_prompt=system_prompt)
        else:
            prompt = chat_format.followup_prompt_ids(tokenizer, question)
        reply = chat_format.answer_ids(tokenizer, answer, tokens)
        seq += prompt + reply
        trained += [False] * len(prompt) + [True] * len(reply)
    trained = np.asarray(trained, bool)
    return _example(seq, np.zeros(len(trained), bool), trained, 1, "understanding")


def text_example(tokenizer: TextTokenizer, tokens: Mapping[str, int], caption: str) -> dict:
    """BOS + caption + EOS as plain language modelling; every target is trained."""
    _check_tokens(tokens)
    _check_text("caption", caption)
    seq = [tokens["bos_token_id"]] + tokenizer.encode(caption) + [tokens["eos_token_id"]]
    return _example(seq, np.zeros(len(seq), bool), np.ones(len(seq), bool), 0, "text")


def generation_example(
    tokenizer: TextTokenizer,
    tokens: Mapping[str, int],
    caption: str,
    codes,
    cfg_drop: bool = False,
) -> dict:
    """Text-to-image: the generation prompt (or its unconditional form) then the image's codes.

    codes: int [N] VQ codes of the image (N >= 1, non-negative). Loss on the N codes only.
    """
    _check_tokens(tokens)
    _check_text("caption", caption)
    codes = np.asarray(codes)
    if codes.ndim != 1 or codes.size < 1 or not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes must be a 1-D integer array of VQ codes [N], got {codes.dtype}{list(codes.shape)}.")
    if codes.min() < 0:
        raise ValueError(f"codes must be non-negative VQ codebook indices, got min {codes.min()}.")
    prompt = chat_format.generation_prompt_ids(tokenizer, caption, tokens)
    if cfg_drop:
        prompt = chat_format.unconditional_ids(prompt, tokens)
    is_code = np.r_[np.zeros(len(prompt), bool), np.ones(codes.size, bool)]
    return _example(list(prompt) + codes.astype(np.int64).tolist(), is_code, is_code, 0, "generation")
