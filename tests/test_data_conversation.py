"""Per-task examples: the token layout of chat_format, next-token shift, loss on the right tokens."""
import numpy as np
import pytest

from unimm_jax.data import chat_format, conversation, shapes_vocab
from unimm_jax.data.batch import TASKS

N_UND = 5


@pytest.fixture(scope="module")
def tok():
    return shapes_vocab.build_shapes_tokenizer()


@pytest.fixture(scope="module")
def ids(tok):
    return shapes_vocab.shapes_token_ids(tok)


def _check_shift(ex, seq, is_image):
    """Reference next-token view of the full sequence `seq`."""
    seq = np.asarray(seq)
    np.testing.assert_array_equal(ex["input_ids"], seq[:-1])
    np.testing.assert_array_equal(ex["target_ids"], seq[1:])
    np.testing.assert_array_equal(ex["input_is_image"], is_image[:-1])
    np.testing.assert_array_equal(ex["target_is_image"], is_image[1:])
    assert ex["input_ids"].dtype == np.int32 and ex["target_ids"].dtype == np.int32
    assert ex["input_is_image"].dtype == np.bool_ and ex["loss_mask"].dtype == np.float32


@pytest.mark.parametrize("system_prompt", ["", "You are a helpful assistant."])
def test_understanding_example(tok, ids, system_prompt):
    ex = conversation.understanding_example(tok, ids, "What color is the circle?", "red", N_UND,
                                            system_prompt=system_prompt)
    prompt = chat_format.understanding_prompt_ids(tok, "What color is the circle?", ids, N_UND,
                                                  system_prompt=system_prompt)
    reply = tok.encode("red") + [ids["eos_token_id"]]
    _check_shift(ex, prompt + reply, np.zeros(len(prompt) + len(reply), bool))
    assert ex["n_images"] == 1 and TASKS[ex["task_id"]] == "understanding"
    assert (ex["input_ids"] == ids["image_token_id"]).sum() == N_UND
    # Loss exactly on the answer and EOS.
    trained = ex["target_ids"][ex["loss_mask"] > 0]
    assert tok.decode(trained, skip_special_tokens=False) == "red <eos>"
    assert ex["loss_mask"].sum() == len(reply) and ex["loss_mask"][-len(reply):].all()
    assert tok.decode(ex["input_ids"]).startswith(("<|User|>", "you are")), tok.decode(ex["input_ids"])


def test_dialogue_example_is_the_single_turn_example_then_followup_turns(tok, ids):
    turns = [("What color is the circle?", "red"), ("How many shapes are there?", "two"),
             ("Is there a blue square?", "no")]
    ex = conversation.understanding_dialogue_example(tok, ids, turns, N_UND)
    first = conversation.understanding_example(tok, ids, *turns[0], N_UND)
    n = len(first["input_ids"])
    for k in ("input_ids", "target_ids", "loss_mask", "input_is_image", "target_is_image"):
        np.testing.assert_array_equal(ex[k][:n], first[k])  # turn 1 is the sampling layout
    seq = (chat_format.understanding_prompt_ids(tok, turns[0][0], ids, N_UND, system_prompt="")
           + chat_format.answer_ids(tok, "red", ids))
    for q, a in turns[1:]:
        seq += tok.encode(f"<|User|>: {q}\n\n<|Assistant|>:") + chat_format.answer_ids(tok, a, ids)
    _check_shift(ex, seq, np.zeros(len(seq), bool))
    trained = ex["target_ids"][ex["loss_mask"] > 0]
    assert tok.decode(trained, skip_special_tokens=False) == "red <eos> two <eos> no <eos>"
    assert (ex["input_ids"] == ids["image_token_id"]).sum() == N_UND and ex["n_images"] == 1
    assert (ex["input_ids"] == ids["bos_token_id"]).sum() == 1
    with pytest.raises(ValueError, match="at least one"):
        conversation.understanding_dialogue_example(tok, ids, [], N_UND)
    with pytest.raises(ValueError, match="answer must be a non-empty str"):
        conversation.understanding_dialogue_example(tok, ids, [turns[0], ("How many shapes are there?", " ")], N_UND)


def test_text_example(tok, ids):
    ex = conversation.text_example(tok, ids, "a red circle above a blue square")
    seq = [ids["bos_token_id"]] + tok.encode("a red circle above a blue square") + [ids["eos_token_id"]]
    _check_shift(ex, seq, np.zeros(len(seq), bool))
    assert ex["loss_mask"].tolist() == [1.0] * (len(seq) - 1)
    assert ex["n_images"] == 0 and TASKS[ex["task_id"]] == "text"
    assert tok.decode(ex["target_ids"], skip_special_tokens=False) == "a red circle above a blue square <eos>"


@pytest.mark.parametrize("cfg_drop", [False, True])
def test_generation_example(tok, ids, cfg_drop):
    codes = np.array([7, 0, 63, 5, 5, 1], np.int32)
    ex = conversation.generation_example(tok, ids, "two green triangles", codes, cfg_drop=cfg_drop)
    prompt = chat_format.generation_prompt_ids(tok, "two green triangles", ids)
    if cfg_drop:
        prompt = chat_format.unconditional_ids(prompt, ids)
        assert set(prompt) == {ids["bos_token_id"], ids["boi_token_id"], ids["pad_token_id"]}
    is_code = np.r_[np.zeros(len(prompt), bool), np.ones(len(codes), bool)]
    _check_shift(ex, prompt + codes.tolist(), is_code)
    # As Janus.image_logits: the prompt ending in <boi>, then codes[:-1] as inputs; N code targets.
    np.testing.assert_array_equal(ex["input_ids"][len(prompt):], codes[:-1])
    assert ex["input_ids"][len(prompt) - 1] == ids["boi_token_id"]
    np.testing.assert_array_equal(ex["target_ids"][ex["loss_mask"] > 0], codes)
    np.testing.assert_array_equal(ex["loss_mask"] > 0, ex["target_is_image"])
    assert ex["n_images"] == 0 and TASKS[ex["task_id"]] == "generation"


def test_bad_inputs_are_clear_errors(tok, ids):
    with pytest.raises(ValueError, match="codes must be a 1-D integer"):
        conversation.generation_example(tok, ids, "a red circle", np.zeros((2, 3), np.int32))
    with pytest.raises(ValueError, match="codes must be a 1-D integer"):
        conversation.generation_example(tok, ids, "a red circle", np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="non-negative"):
        conversation.generation_example(tok, ids, "a red circle", np.array([1, -1]))
    with pytest.raises(ValueError, match="caption must be a non-empty str"):
        conversation.text_example(tok, ids, "  ")
    with pytest.raises(ValueError, match="answer must be a non-empty str"):
        conversation.understanding_example(tok, ids, "How many shapes are there?", "", N_UND)
    with pytest.raises(ValueError, match="num_image_tokens"):
        conversation.understanding_example(tok, ids, "How many shapes are there?", "two", 0)
    partial = {k: v for k, v in ids.items() if k != "eos_token_id"}
    with pytest.raises(ValueError, match="eos_token_id"):
        conversation.text_example(tok, partial, "a red circle")
