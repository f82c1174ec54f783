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


def write_word_tokenizer(words: Iterable[str], directory: str | Path, model_max_length: int = 77) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` of a CLIP tokenizer to ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    vocab: dict[str, int] = {}
    for token in [*symbols, *(s + "</w>" for s in symbols)]:
        vocab.setdefault(token, len(vocab))
    merges: list[str] = []
    for word in sorted({w.strip().lower() for w in words if w.strip()}):
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:  # merge left to right; every intermediate piece becomes a token
            merge = f"{parts[0]} {parts[1]}"
            if merge not in merges:
                merges.append(merge)
            parts = [parts[0] + parts[1], *parts[2:]]
            vocab.setdefault(parts[0], len(vocab))
    for special in (BOS, EOS):
        vocab.setdefault(special, len(vocab))
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))
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
