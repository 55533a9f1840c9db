"""The shapes-world tokenizer: closed vocabulary, deterministic ids, template pieces, save/load."""
import numpy as np
import pytest

from unimm_jax.data import chat_format, shapes, shapes_vocab
from unimm_jax.data.text_tokenizer import TextTokenizer, load_text_tokenizer


@pytest.fixture(scope="module")
def tok():
    return shapes_vocab.build_shapes_tokenizer()


def test_ids_are_deterministic_and_specials_fixed(tok):
    again = shapes_vocab.build_shapes_tokenizer()
    assert tok._tok.get_vocab(with_added_tokens=True) == again._tok.get_vocab(with_added_tokens=True)
    for i, t in enumerate(shapes_vocab.SPECIAL_TOKENS + shapes_vocab.TEMPLATE_TOKENS):
        assert tok.token_to_id(t) == i
    words = shapes_vocab.shapes_words()
    assert words == sorted(words)
    first = len(shapes_vocab.SPECIAL_TOKENS) + len(shapes_vocab.TEMPLATE_TOKENS)
    assert [tok.token_to_id(w) for w in words] == list(range(first, first + len(words)))
    assert tok.vocab_size == first + len(words)
    ids = shapes_vocab.shapes_token_ids(tok)
    assert ids == dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, boi_token_id=4, eoi_token_id=5,
                       image_token_id=6)


def test_every_shapes_text_is_in_vocabulary(tok):
    unk = tok.token_to_id("<unk>")
    texts = shapes.generation_prompts("train", 60) + shapes.generation_prompts("test", 60)
    rng = np.random.default_rng(0)
    for _ in range(150):
        ex = shapes.make_example(rng, 32)
        texts += [ex["caption"], ex["question"], ex["answer"]]
    texts += [chat_format.UNDERSTANDING_SYSTEM_PROMPT, "Is there an orange circle?", "What colour is the square?"]
    for text in texts:
        ids = tok.encode(text)
        assert ids and unk not in ids, text
        # Lower-cased words separated by single spaces, punctuation split off.
        expected = " ".join(text.lower().replace("?", " ?").replace(".", " .").replace(",", " ,").split())
        assert tok.decode(ids) == expected


def test_text_lists_cover_what_the_world_produces():
    rng = np.random.default_rng(1)
    questions, answers = set(shapes_vocab.all_questions()), set(shapes_vocab.all_answers())
    captions = set(shapes_vocab.all_captions())
    for _ in range(200):
        scene = shapes.sample_scene(rng, 32)
        for q, a in shapes.questions_for(scene, rng):
            assert q in questions and a in answers
        for cap, kind in shapes.captions_for(scene):  # the same words as one listed caption of its kind
            spec = shapes.parse_prompt(cap)
            assert shapes.format_prompt(kind, [spec.objects[0]] * 2) in captions


def test_template_pieces_are_single_tokens(tok):
    text = chat_format.format_turn("a red circle")
    ids = tok.encode(text)
    user, assistant, colon = (tok.token_to_id(t) for t in ("<|User|>", "<|Assistant|>", ":"))
    assert ids == [user, colon] + tok.encode("a red circle") + [assistant, colon]
    assert tok.decode(ids) == "<|User|> : a red circle <|Assistant|> :"
    # Special tokens are dropped on decode unless asked for.
    special = [tok.token_to_id("<bos>"), tok.token_to_id("<image_placeholder>")]
    assert tok.decode(special + ids[:1]) == "<|User|>"
    assert tok.decode(special, skip_special_tokens=False) == "<bos> <image_placeholder>"


def test_unknown_words_map_to_unk(tok):
    assert tok.encode("a red giraffe") == tok.encode("a red") + [tok.token_to_id("<unk>")]


def test_save_and_load_round_trip(tok, tmp_path):
    tok.save(str(tmp_path / "tokenizer.json"))
    back = load_text_tokenizer(str(tmp_path))
    text = chat_format.format_turn("two blue squares", "You are a helpful assistant.")
    assert back.encode(text) == tok.encode(text)
    assert shapes_vocab.shapes_token_ids(back) == shapes_vocab.shapes_token_ids(tok)


def test_token_ids_of_foreign_tokenizer_is_a_clear_error():
    from tokenizers import Tokenizer, models

    foreign = TextTokenizer(Tokenizer(models.WordLevel(vocab={"<unk>": 0, "hi": 1}, unk_token="<unk>")))
    with pytest.raises(ValueError, match="build_shapes_tokenizer"):
        shapes_vocab.shapes_token_ids(foreign)
