"""A CLIP byte-pair tokenizer built offline from the toy captions' vocabulary.

CLIP's tokenizer splits each word into characters and applies ranked merges. The merges here
are grown until every caption word becomes one token, so the vocabulary stays tiny and no file
has to be downloaded. Words outside the vocabulary still tokenize, into characters.
"""

import json
from pathlib import Path

from transformers import CLIPTokenizer

from .architecture import MAX_CAPTION_TOKENS
from .scene import caption_vocabulary

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
END_OF_WORD = "</w>"


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Merge the lowest-ranked adjacent pair until none is left, as CLIP's tokenizer does."""
    while len(symbols) > 1:
        adjacent = zip(symbols, symbols[1:], strict=False)
        pairs = [(ranks.get(pair, 1 << 30), i) for i, pair in enumerate(adjacent)]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2 :]
    return symbols


def build_merges(words: list[str]) -> list[tuple[str, str]]:
    """Grow a merge list under which each word becomes a single token."""
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        while True:
            symbols = _apply_merges([*word[:-1], word[-1] + END_OF_WORD], ranks)
            if len(symbols) == 1:
                break

            # A merge appended last never changes words that already end as one token,
            # because at every step they had a lower-ranked pair to merge.
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
    return merges


def save_tokenizer(folder: str | Path, words: list[str] | None = None) -> CLIPTokenizer:
    """Write vocab.json and merges.txt for the caption words and return the loaded tokenizer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    words = sorted(set(words if words is not None else caption_vocabulary()))
    merges = build_merges(words)

    characters = sorted({c for w in words for c in w} | set("abcdefghijklmnopqrstuvwxyz,.'"))
    tokens = characters + [c + END_OF_WORD for c in characters]
    tokens += [a + b for a, b in merges]
    vocabulary = {}
    for token in [*tokens, BOS, EOS]:
        vocabulary.setdefault(token, len(vocabulary))

    (folder / "vocab.json").write_text(json.dumps(vocabulary, indent=0))
    with open(folder / "merges.txt", "w") as handle:
        handle.write("#version: 0.2\n")
        handle.writelines(f"{a} {b}\n" for a, b in merges)
    tokenizer = CLIPTokenizer(
        str(folder / "vocab.json"),
        str(folder / "merges.txt"),
        model_max_length=MAX_CAPTION_TOKENS,
        pad_token=EOS,
    )
    tokenizer.save_pretrained(folder)
    return tokenizer
