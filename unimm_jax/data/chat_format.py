"""DeepSeek's `deepseek` conversation template and the token layout of Janus prompts.

Text form (janus/utils/conversation.py):
    "{system}\n\n<|User|>: {message}\n\n<|Assistant|>:{answer}<eos>"
with no system part when the system prompt is empty (generation prompts).
Token form: BOS + text, where an understanding image expands to
    <begin_of_image> + N x <image_placeholder> + <end_of_image>
and a generation prompt ends with <begin_of_image>, after which N image codes follow.
Training and sampling both build prompts here, so they can never disagree.
"""
from __future__ import annotations

from typing import Mapping

from unimm_jax.data.text_tokenizer import TextTokenizer

UNDERSTANDING_SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using natural language."
)
USER, ASSISTANT = "<|User|>", "<|Assistant|>"
IMAGE_PLACEHOLDER = "<image_placeholder>"


def format_turn(message: str, system_prompt: str = "") -> str:
    """One user turn awaiting the assistant: text up to and including `<|Assistant|>:`."""
    head = f"{system_prompt}\n\n" if system_prompt else ""
    return f"{head}{USER}: {message}\n\n{ASSISTANT}:"


def understanding_prompt_ids(
    tokenizer: TextTokenizer,
    question: str,
    tokens: Mapping[str, int],
    num_image_tokens: int,
    system_prompt: str = UNDERSTANDING_SYSTEM_PROMPT,
) -> list[int]:
    """BOS + template with one image before the question -> list of ids ending at `<|Assistant|>:`.

    tokens: config.model.tokens (bos/boi/eoi/image token ids).
    """
    text = format_turn(f"{IMAGE_PLACEHOLDER}\n{question}", system_prompt)
    before, after = text.split(IMAGE_PLACEHOLDER)
    image = [tokens["boi_token_id"]] + [tokens["image_token_id"]] * num_image_tokens + [tokens["eoi_token_id"]]
    return [tokens["bos_token_id"]] + tokenizer.encode(before) + image + tokenizer.encode(after)


def followup_prompt_ids(tokenizer: TextTokenizer, question: str) -> list[int]:
    """A later user turn of a dialogue, after the previous answer's EOS: no BOS, no system prompt,
    ending at `<|Assistant|>:`."""
    return tokenizer.encode(format_turn(question))


def generation_prompt_ids(tokenizer: TextTokenizer, prompt: str, tokens: Mapping[str, int]) -> list[int]:
    """BOS + template (empty system prompt) + `<begin_of_image>`; image codes follow it."""
    return [tokens["bos_token_id"]] + tokenizer.encode(format_turn(prompt)) + [tokens["boi_token_id"]]


def answer_ids(tokenizer: TextTokenizer, answer: str, tokens: Mapping[str, int]) -> list[int]:
    """The assistant's reply as trained: " {answer}" + EOS (loss is taken on these ids)."""
    return tokenizer.encode(f" {answer}") + [tokens["eos_token_id"]]


def unconditional_ids(prompt_ids: list[int], tokens: Mapping[str, int]) -> list[int]:
    """The CFG unconditional prompt: every id but BOS and BOI replaced by the pad id (transformers' layout)."""
    keep = (tokens["bos_token_id"], tokens["boi_token_id"])
    return [i if i in keep else tokens["pad_token_id"] for i in prompt_ids]
