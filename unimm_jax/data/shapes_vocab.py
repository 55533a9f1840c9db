"""The word-level text tokenizer of the shapes world (a closed vocabulary, built, not trained).

Every word a shapes-world caption, question or answer can contain (data/shapes.py), the
DeepSeek template pieces of chat_format.py ("<|User|>", "<|Assistant|>", ":"), punctuation,
and the words of chat_format's default system prompt (so a configured system prompt never
turns into <unk>) get one id each. Ids are deterministic: the special tokens first in a fixed
order, then the template tokens, then the words sorted. Text is lower-cased and split on
whitespace and punctuation, so "What color is the circle?" -> what color is the circle ?.
Decoding joins words with single spaces (newlines of the template are not tokens).

The trainer saves the tokenizer as WORKDIR/model/tokenizer.json (`TextTokenizer.save`), and
sampling reads it back with `text_tokenizer.load_text_tokenizer`, like a released checkpoint.
"""
from __future__ import annotations

from typing import Iterable

from unimm_jax.data import chat_format, shapes
from unimm_jax.data.text_tokenizer import TextTokenizer

# Fixed order = fixed ids: <pad> 0, <bos> 1, <eos> 2, <unk> 3, <begin_of_image> 4, ...
SPECIAL_TOKENS = (
    "<pad>", "<bos>", "<eos>", "<unk>", "<begin_of_image>", "<end_of_image>", "<image_placeholder>",
)
# Not special: decode keeps them, as DeepSeek's tokenizer does for its role tags.
TEMPLATE_TOKENS = (chat_format.USER, chat_format.ASSISTANT)
PUNCTUATION = (":", "?", ".", ",", "!")
_TOKEN_OF = {
    "pad_token_id": "<pad>", "bos_token_id": "<bos>", "eos_token_id": "<eos>",
    "boi_token_id": "<begin_of_image>", "eoi_token_id": "<end_of_image>",
    "image_token_id": "<image_placeholder>",
}


def _pre_tokenizer():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")])


def all_captions() -> list[str]:
    """Every caption / generation prompt pattern of the shapes world, one per kind and combination
    (two-object kinds repeat the combination: the words do not depend on the second object)."""
    combos = [(c, s) for c in shapes.COLORS for s in shapes.SHAPES]
    two = ("two_objects", "left_of", "above")
    return [shapes.format_prompt(kind, [a, a] if kind in two else [a])
            for kind in shapes.CAPTION_KINDS for a in combos]


def all_questions() -> list[str]:
    """Every question `shapes.questions_for` can ask."""
    return ([f"What color is the {s}?" for s in shapes.SHAPES]
            + [f"What shape is the {c} object?" for c in shapes.COLORS]
            + ["How many shapes are there?"]
            + [f"Is there a {c} {s}?" for c in shapes.COLORS for s in shapes.SHAPES])


def all_answers() -> list[str]:
    """Every one-word answer of the shapes world."""
    return list(shapes.COLORS + shapes.SHAPES + shapes.NUMBER_WORDS + ("yes", "no"))


def _vocabulary_texts() -> Iterable[str]:
    """Every caption, question and answer text the shapes world can produce, plus extras."""
    yield from all_captions()
    yield from all_questions()
    yield from all_answers()
    # Spellings parse_prompt / question_kind also accept.
    yield "an colour"
    yield chat_format.UNDERSTANDING_SYSTEM_PROMPT
    yield " ".join(PUNCTUATION)


def shapes_words() -> list[str]:
    """The sorted word tokens (lower case) of the closed vocabulary, template tokens excluded."""
    pre = _pre_tokenizer()
    words = set()
    for text in _vocabulary_texts():
        words.update(w for w, _ in pre.pre_tokenize_str(text.lower()))
    return sorted(words)


def build_shapes_tokenizer() -> TextTokenizer:
    """A `tokenizers` WordLevel tokenizer over the shapes-world vocabulary, wrapped.

    Returns a TextTokenizer whose ids are identical on every call and machine:
    SPECIAL_TOKENS get 0..6, TEMPLATE_TOKENS the next two, then `shapes_words()` in order.
    Out-of-vocabulary words encode to <unk>.
    """
    from tokenizers import AddedToken, Tokenizer, models, normalizers

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + TEMPLATE_TOKENS + tuple(shapes_words()))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = _pre_tokenizer()
    # Added tokens are matched in the raw text before normalisation and splitting, so
    # "<|Assistant|>:" -> <|Assistant|> + ":" instead of "<", "|", "assistant", ...
    tok.add_special_tokens([AddedToken(t, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, normalized=False) for t in TEMPLATE_TOKENS])
    return TextTokenizer(tok)


def shapes_token_ids(tokenizer: TextTokenizer) -> dict[str, int]:
    """The config.model.tokens layout (image/boi/eoi/pad/bos/eos token ids) of `tokenizer`.

    Raises ValueError naming the missing special token when `tokenizer` is not a shapes
    tokenizer (e.g. a released Janus tokenizer: take its ids from the checkpoint config).
    """
    out = {}
    for key, token in _TOKEN_OF.items():
        i = tokenizer.token_to_id(token)
        if i is None:
            raise ValueError(
                f"tokenizer has no {token!r} token, so {key} is undefined; use "
                f"build_shapes_tokenizer() (or a tokenizer.json it saved) for the shapes world.")
        out[key] = int(i)
    return out
