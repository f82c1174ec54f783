from vistune.data.tokenizer import build_word_tokenizer


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
