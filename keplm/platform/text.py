"""Text cleaning and segmenting (SMedBERT App. A.1.1; EMBERT §4.1).

Cleaning, in order:
1. HTML entities are unescaped (``&amp;`` -> ``&``), then full-width forms (U+FF01-FF5E, U+3000) are
   mapped to their half-width ASCII forms, so ``ＡＢＣ１２３，`` becomes ``ABC123,``;
2. HTML/XML tags and comments, URLs and e-mail addresses are removed;
3. every character that is not a letter (CJK ideographs are letters, category Lo), a digit/number
   (N*), punctuation (P*) or whitespace is removed; ``CleanConfig.extra_chars`` lists symbols kept
   beyond the paper's rule (default: a few medical ones such as ``℃ % + ~``); set it to "" for the
   paper's rule exactly;
4. whitespace runs collapse to one space, or to one newline when they contain a line break.

The same :func:`clean_text` normalises KG entity names for linking, so names and text always agree.

Segmenting: a cleaned document longer than ``max_chars`` is split at sentence-ending punctuation
(。！？!?；; and line breaks, keeping closing quotes with their sentence) and sentences are packed
greedily into segments of at most ``max_chars`` characters. Every token of a BERT WordPiece tokenizer
covers at least one character, so ``max_chars = max_seq_len - 2`` guarantees that a segment fits
``max_seq_len`` tokens with [CLS] and [SEP]. A single sentence longer than that is cut at the last
secondary break (，、：, space) in the window, else between two characters that are not both
Latin letters/digits, so no word or number is split unless it is itself longer than the window.
"""

from __future__ import annotations

import html

import regex
from pydantic import Field

from keplm.platform.config import Section

FULLWIDTH_TO_HALFWIDTH = {cp: cp - 0xFEE0 for cp in range(0xFF01, 0xFF5F)}
FULLWIDTH_TO_HALFWIDTH[0x3000] = 0x20

_TAG = regex.compile(r"<!--.*?-->|</?[A-Za-z][A-Za-z0-9]*(?:\s[^<>]*)?/?>", regex.S)
# URLs stop at whitespace, CJK and quotes/brackets: Chinese text often runs straight on after a URL.
_URL = regex.compile(r"(?:(?:https?|ftp)://|www\.)[^\s\p{Han}<>\"'，。；！？（）]+", regex.I)
_EMAIL = regex.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
_SPACE_WITH_NEWLINE = regex.compile(r"[^\S\n]*\n\s*")
_SPACE = regex.compile(r"[^\S\n]+")
_SENTENCE = regex.compile(r".*?(?:[。！？!?；;…\n]+[”’」』）)\"']*|$)", regex.S)
_SOFT_BREAK = regex.compile(r"[，,、：:\s]")
_WORD_CHAR = regex.compile(r"[A-Za-z0-9]")


class CleanConfig(Section):
    extra_chars: str = Field("%+-~℃°×/<>=.±", description="symbols kept besides letters, digits, punctuation "
                                                        "and whitespace; \"\" applies the paper's rule exactly")
    lowercase: bool = Field(False, description="lowercase the cleaned text")


def _disallowed(extra: str) -> regex.Pattern:
    return regex.compile(r"[^\p{L}\p{N}\p{P}\s" + regex.escape(extra) + r"]+")


_DISALLOWED_CACHE: dict[str, regex.Pattern] = {}


def clean_text(text: str, cfg: CleanConfig | None = None) -> str:
    cfg = cfg or CleanConfig()
    pattern = _DISALLOWED_CACHE.get(cfg.extra_chars)
    if pattern is None:
        pattern = _DISALLOWED_CACHE[cfg.extra_chars] = _disallowed(cfg.extra_chars)
    if "&" in text:
        text = html.unescape(text)
    text = text.translate(FULLWIDTH_TO_HALFWIDTH)
    if "<" in text:
        text = _TAG.sub(" ", text)
    text = _URL.sub(" ", text)
    if "@" in text:
        text = _EMAIL.sub(" ", text)
    text = pattern.sub("", text)
    text = _SPACE_WITH_NEWLINE.sub("\n", text)
    text = _SPACE.sub(" ", text).strip()
    if cfg.lowercase:
        text = text.lower()
    return text


def split_sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE.findall(text) if s]


def _hard_split(sentence: str, max_chars: int) -> list[str]:
    pieces = []
    rest = sentence
    while len(rest) > max_chars:
        window = rest[:max_chars]
        cut = 0
        for m in _SOFT_BREAK.finditer(window):
            cut = m.end()
        if cut < max_chars // 2:  # no useful soft break: avoid splitting a Latin word or number
            cut = max_chars
            while cut > max_chars // 2 and _WORD_CHAR.match(rest[cut - 1]) and _WORD_CHAR.match(rest[cut]):
                cut -= 1
            if cut <= max_chars // 2:
                cut = max_chars
        pieces.append(rest[:cut])
        rest = rest[cut:]
    if rest:
        pieces.append(rest)
    return pieces


def segment_text(text: str, max_chars: int) -> list[str]:
    """Split a cleaned document into segments of at most `max_chars` characters (see module doc)."""
    if max_chars < 1:
        raise ValueError("max_chars must be >= 1")
    if len(text) <= max_chars:
        return [text] if text.strip() else []
    segments: list[str] = []
    current = ""
    for sentence in split_sentences(text):
        parts = _hard_split(sentence, max_chars) if len(sentence) > max_chars else [sentence]
        for part in parts:
            if len(current) + len(part) <= max_chars:
                current += part
            else:
                if current.strip():
                    segments.append(current.strip())
                current = part
    if current.strip():
        segments.append(current.strip())
    return segments
