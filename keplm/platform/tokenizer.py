"""Fast WordPiece tokenizers: load a local vocab / tokenizer directory, or train a vocab.

Training uses `tokenizers`' BertWordPieceTokenizer with Chinese characters split one per token (as
bert-base-chinese does) and Latin words split into ## word pieces. Nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from pydantic import Field

from keplm.platform.config import Section
from keplm.platform.errors import KeplmError

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


class VocabConfig(Section):
    vocab_size: int = Field(8000, ge=6, description="size of the trained WordPiece vocab, special tokens included")
    min_frequency: int = Field(2, ge=0, description="a piece is merged into the vocab only if seen this many times")
    lowercase: bool = Field(True, description="lowercase text before training (and in the trained tokenizer)")
    limit_alphabet: int = Field(6000, ge=1, description="at most this many distinct initial characters (CJK "
                                                  "characters included) kept in the alphabet")


def read_vocab(path: str | Path) -> dict[str, int]:
    vocab: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            token = line.rstrip("\n")
            if token and token not in vocab:
                vocab[token] = len(vocab)
    missing = [t for t in ("[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]") if t not in vocab]
    if missing:
        raise KeplmError(f"{path}: vocab lacks special tokens {missing}")
    return vocab


def load_tokenizer(path: str | Path, lowercase: bool = True):
    """A fast HF tokenizer from a tokenizer directory or a bare WordPiece vocab.txt."""
    from transformers import AutoTokenizer, BertTokenizer

    p = Path(path)
    if p.is_dir():
        try:
            tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise KeplmError(f"{p}: cannot load a tokenizer from this directory ({exc.__class__.__name__})") from None
    elif p.is_file():
        tok = BertTokenizer(vocab=read_vocab(p), do_lower_case=lowercase)
    else:
        raise KeplmError(f"tokenizer not found: {p}")
    if not getattr(tok, "is_fast", False):
        raise KeplmError(f"{p}: not a fast tokenizer (offset mapping is required)")
    return tok


def train_wordpiece(texts: Iterable[str], out_dir: str | Path, cfg: VocabConfig | None = None):
    """Train a WordPiece vocab on `texts`, save a loadable tokenizer directory, return the tokenizer."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizer

    cfg = cfg or VocabConfig()
    trainer = BertWordPieceTokenizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=cfg.lowercase
    )
    trainer.train_from_iterator(
        texts,
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        limit_alphabet=cfg.limit_alphabet,
        special_tokens=SPECIAL_TOKENS,
        wordpieces_prefix="##",
        show_progress=False,   # its bars are blank lines on stdout when that is not a terminal; the stage has its lines
    )
    vocab = trainer.get_vocab()
    ordered = sorted(vocab, key=vocab.get)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = BertTokenizer(vocab={t: i for i, t in enumerate(ordered)}, do_lower_case=cfg.lowercase)
    tok.save_pretrained(str(out))
    (out / "vocab.txt").write_text("\n".join(ordered) + "\n", encoding="utf-8")
    return tok


def align_spans(offsets, spans) -> list[tuple[int, int] | None]:
    """Map end-exclusive char spans to end-exclusive token spans using a fast tokenizer's offsets.

    A token belongs to a span when their character ranges overlap, so a span boundary inside a word
    piece widens the token span to that piece. Special tokens (empty offsets) never belong to a span.
    A span that no token covers (only whitespace, or cut off by truncation) maps to None.
    """
    import numpy as np

    if not spans:
        return []
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    real = np.nonzero(off[:, 1] > off[:, 0])[0]
    starts, ends = off[real, 0], off[real, 1]
    sp = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    lo = np.searchsorted(ends, sp[:, 0], side="right")   # first token ending after the span starts
    hi = np.searchsorted(starts, sp[:, 1], side="left")  # tokens starting before the span ends
    out: list[tuple[int, int] | None] = []
    for a, b in zip(lo.tolist(), hi.tolist()):
        out.append((int(real[a]), int(real[b - 1]) + 1) if a < b else None)
    return out
