"""Build a CLIP BPE tokenizer whose vocabulary is a given word list (no hub download).

Every listed word becomes a single token; any other text still tokenizes, byte by byte, because the 512
byte-level symbols (with and without the end-of-word marker) are in the vocabulary too.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Iterable

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest to code points from 256."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    symbols = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """The pieces CLIP's BPE makes of one word: the lowest-ranked mergeable pair is merged (every occurrence),
    again, until no pair has a merge. The last piece carries the end-of-word marker ``</w>``."""
    parts = [*word[:-1], word[-1] + "</w>"]
    while len(parts) > 1:
        candidates = [pair for pair in zip(parts, parts[1:]) if pair in ranks]
        if not candidates:
            break
        first, second = min(candidates, key=ranks.__getitem__)
        merged, i = [], 0
        while i < len(parts):
            if i + 1 < len(parts) and parts[i] == first and parts[i + 1] == second:
                merged.append(first + second)
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def write_word_tokenizer(words: Iterable[str], directory: str | Path, model_max_length: int = 77) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` of a CLIP tokenizer to ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    vocab: dict[str, int] = {}
    for token in [*symbols, *(s + "</w>" for s in symbols)]:
        vocab.setdefault(token, len(vocab))
    ranks: dict[tuple[str, str], int] = {}
    for text in sorted({w.strip().lower() for w in words if w.strip()}):
        if any(c.isspace() for c in text):
            raise ValueError(f"{text!r} is not one word: the tokenizer splits text at whitespace first")
        word = "".join(symbols[b] for b in text.encode("utf-8"))  # what CLIP's BPE sees: byte-level symbols
        # Merge what BPE makes of the word with the merges so far, left to right, until it is one piece. A new
        # merge ranks after every earlier one, so it never changes how an earlier word tokenizes (BPE prefers
        # the earlier merge wherever one applies, and an earlier word always has one until it is whole).
        parts = bpe(word, ranks)
        while len(parts) > 1:
            ranks[(parts[0], parts[1])] = len(ranks)
            vocab.setdefault(parts[0] + parts[1], len(vocab))
            parts = bpe(word, ranks)
    for special in (BOS, EOS):
        vocab.setdefault(special, len(vocab))
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in ranks))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return directory


def build_word_tokenizer(words: Iterable[str], model_max_length: int = 77):
    """A ``transformers.CLIPTokenizer`` with one token per word of ``words`` (built in a temp folder)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_word_tokenizer(words, tmp, model_max_length=model_max_length)
        return CLIPTokenizer.from_pretrained(tmp)
