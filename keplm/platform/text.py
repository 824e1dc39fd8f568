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

Every pattern runs in time linear in the document's length, whatever the document (a 1 MB run of one letter
before an ``@``, a million unclosed ``<!--``): an e-mail match may only start where a run of local-part characters
starts and takes that run without backtracking (``(?<![…])[…]++@``), so a long run is scanned once, not once
per position; a ``<!--`` that no ``-->`` closes is masked while tags and comments are removed, so no opening
scans to the end of the document in vain; horizontal whitespace runs are collapsed before line breaks are. The
output is exactly what the plain patterns give. Segmenting cuts at offsets (no copy of the rest per segment) and finds each cut with one
backwards search.

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
# noncharacters: one absent from the document marks the comment openings no "-->" closes (see _strip_markup)
_SENTINELS = [chr(c) for c in range(0xFDD0, 0xFDF0)]
# URLs stop at whitespace, CJK and quotes/brackets: Chinese text often runs straight on after a URL.
_URL = regex.compile(r"(?:(?:https?|ftp)://|www\.)[^\s\p{Han}<>\"'，。；！？（）]+", regex.I)
# the local part starts where its run of characters starts (or where the previous match ended, \G: what the
# unanchored pattern matched) and is taken whole (possessive: it holds no '@', so backtracking into it could
# never succeed): one scan per run instead of one per position in it (quadratic)
_EMAIL = regex.compile(r"(?:(?<![A-Za-z0-9._%+-])|\G)[A-Za-z0-9._%+-]++@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
                       r"\.[A-Za-z]{2,}")
_SPACE_WITH_NEWLINE = regex.compile(r" ?\n\s*")   # after _SPACE: a horizontal run is one space by then
_SPACE = regex.compile(r"[^\S\n]+")
_SENTENCE = regex.compile(r".*?(?:[。！？!?；;…\n]+[”’」』）)\"']*|$)", regex.S)
_LAST_SOFT_BREAK = regex.compile(r"[，,、：:\s]", regex.REVERSE)
_LAST_NON_WORD_CHAR = regex.compile(r"[^A-Za-z0-9]", regex.REVERSE)


class CleanConfig(Section):
    extra_chars: str = Field("%+-~℃°×/<>=.±", description="symbols kept besides letters, digits, punctuation "
                                                        "and whitespace; \"\" applies the paper's rule exactly")
    lowercase: bool = Field(False, description="lowercase the cleaned text")


def _disallowed(extra: str) -> regex.Pattern:
    return regex.compile(r"[^\p{L}\p{N}\p{P}\s" + regex.escape(extra) + r"]+")


_DISALLOWED_CACHE: dict[str, regex.Pattern] = {}


def _strip_markup(text: str) -> str:
    """``_TAG.sub(" ", text)`` in linear time. A comment opening that no later ``-->`` closes (one that starts
    fewer than 4 characters before the start of the last ``-->``, or after it) would make the lazy comment
    pattern scan to the end of the document, once per such opening: those openings are masked (``<!`` ->
    ``<`` + a noncharacter absent from the text, which no tag starts with and which ends no tag) for the pass
    and restored after it, so the result is exactly the plain substitution's."""
    if "<!--" not in text:
        return _TAG.sub(" ", text)
    mark = next((c for c in _SENTINELS if c not in text), None)
    if mark is None:   # a text holding all 32 noncharacters: the openings that cannot close lose their "!"
        mark = ""
    cut = max(text.rfind("-->") - 3, 0)   # every opening at or after ``cut`` is unclosed
    text = _TAG.sub(" ", text[:cut] + text[cut:].replace("<!--", "<" + mark + "--"))
    return text.replace("<" + mark + "--", "<!--") if mark else text


def clean_text(text: str, cfg: CleanConfig | None = None) -> str:
    cfg = cfg or CleanConfig()
    pattern = _DISALLOWED_CACHE.get(cfg.extra_chars)
    if pattern is None:
        pattern = _DISALLOWED_CACHE[cfg.extra_chars] = _disallowed(cfg.extra_chars)
    if "&" in text:
        text = html.unescape(text)
    text = text.translate(FULLWIDTH_TO_HALFWIDTH)
    if "<" in text:
        text = _strip_markup(text)
    text = _URL.sub(" ", text)
    if "@" in text:
        text = _EMAIL.sub(" ", text)
    text = pattern.sub("", text)
    text = _SPACE.sub(" ", text)
    text = _SPACE_WITH_NEWLINE.sub("\n", text).strip()
    if cfg.lowercase:
        text = text.lower()
    return text


def split_sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE.findall(text) if s]


def _hard_split(sentence: str, max_chars: int) -> list[str]:
    pieces = []
    start, n, half = 0, len(sentence), max_chars // 2
    while n - start > max_chars:
        end = start + max_chars
        soft = _LAST_SOFT_BREAK.search(sentence, start, end)   # the last soft break in the window
        cut = soft.end() - start if soft else 0
        if cut < max(half, 1):  # no useful soft break: avoid splitting a Latin word or number
            # the largest cut in (half, max_chars] whose two sides are not both Latin letters/digits: just after
            # the last other character at or after half, or at max_chars when the character there is one
            other = _LAST_NON_WORD_CHAR.search(sentence, start + half, end + 1)
            cut = max_chars if other is None else min(other.start() - start + 1, max_chars)
        pieces.append(sentence[start:start + cut])
        start += cut
    if start < n:
        pieces.append(sentence[start:])
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
