"""The toy world's tokenizer: a real Hugging Face ``BertTokenizerFast`` over a small WordPiece vocabulary.

The vocabulary (``vlat/world/vocab/vocab.txt``) holds BERT's special tokens, every word the templates produce,
and the 26 letters with their ``##`` continuations, so any lower-case word a user types still
tokenizes into WordPiece pieces instead of collapsing into ``[UNK]``. :func:`build_vocab` regenerates
it; a test keeps the file and the templates in step.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from vlat.world.captions import all_words

VOCAB_DIR = Path(__file__).with_name("vocab")
VOCAB_FILE = VOCAB_DIR / "vocab.txt"
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
MAX_TEXT_LEN = 32  # tokens including [CLS] and [SEP]; every template fits in 16


def build_vocab() -> list[str]:
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    words = [w for w in all_words() if w not in letters]
    return list(SPECIAL_TOKENS) + words + letters + ["##" + c for c in letters]


@lru_cache(maxsize=None)
def _load(vocab_dir: str):
    from transformers import BertTokenizerFast

    # from_pretrained on a local folder holding vocab.txt works the same in transformers 4.x and 5.x
    # (their constructors disagree on the vocab argument's name); nothing is downloaded.
    return BertTokenizerFast.from_pretrained(vocab_dir, do_lower_case=True, model_max_length=MAX_TEXT_LEN)


def load_tokenizer(vocab_dir: str | Path = VOCAB_DIR):
    """Return the world's BERT WordPiece tokenizer (cached; treat it as read-only)."""
    return _load(str(vocab_dir))


def write_vocab(path: str | Path = VOCAB_FILE) -> None:
    Path(path).write_text("\n".join(build_vocab()) + "\n")


if __name__ == "__main__":  # python -m vlat.world.tokenizer regenerates vocab/vocab.txt
    write_vocab()
    print(f"wrote {VOCAB_FILE} ({len(build_vocab())} tokens)")
