import random

import pytest

from vistune.data.tokenizer import bpe, build_word_tokenizer


def test_each_word_is_one_token_and_other_text_still_tokenizes():
    tokenizer = build_word_tokenizer(["red", "circle", "background", "on"], model_max_length=12)
    ids = tokenizer("red circle on background").input_ids
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens == ["<|startoftext|>", "red</w>", "circle</w>", "on</w>", "background</w>", "<|endoftext|>"]
    unknown = tokenizer("zebra").input_ids
    assert len(unknown) == 2 + len("zebra")  # byte-level fallback, one symbol per letter
    assert tokenizer.eos_token_id not in unknown[1:-1]
    padded = tokenizer("red", padding="max_length", max_length=12).input_ids
    assert len(padded) == 12


def test_words_sharing_pieces_still_become_one_token_each():
    # "and" makes "a n" an early merge; merged naively left to right, "orange" and "triangle" then came out as
    # or|an|g|e and tri|an|g|l|e, so three-shape captions overran the model's token limit
    words = ["a", "an", "and", "background", "orange", "triangle", "green", "gray", "star", "square", "on", "café"]
    tokenizer = build_word_tokenizer(words)
    for word in words:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, tokenizer.tokenize(word)
    caption = "an orange triangle and a green star on a gray background"
    assert len(tokenizer(caption).input_ids) == len(caption.split()) + 2

    rng = random.Random(0)  # many words over a tiny alphabet: the most shared pieces there can be
    words = sorted({"".join(rng.choice("abn") for _ in range(rng.randint(1, 7))) for _ in range(300)})
    tokenizer = build_word_tokenizer(words)
    assert all(len(tokenizer(w, add_special_tokens=False).input_ids) == 1 for w in words)


def test_bpe_merges_the_lowest_ranked_pair_first():
    assert bpe("rang", {("a", "n"): 0, ("r", "a"): 1, ("an", "g</w>"): 2}) == ["r", "ang</w>"]
    assert bpe("rang", {("r", "a"): 0, ("a", "n"): 1}) == ["ra", "n", "g</w>"]
    assert bpe("banana", {("a", "n"): 0}) == ["b", "an", "an", "a</w>"]  # every occurrence
    assert bpe("x", {}) == ["x</w>"]


def test_a_phrase_is_not_a_word():
    with pytest.raises(ValueError, match="not one word"):
        build_word_tokenizer(["light gray"])
