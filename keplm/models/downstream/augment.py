"""MLM data augmentation for NER (seed 003 §3.1), with any keplm (or BERT) masked-LM checkpoint.

For each training sentence: segment it into words with jieba; a word is *eligible* when every one of its
characters is tagged ``O`` (entity characters are never masked — seed 003 gives them segment id −1) and
is a Chinese character the vocab has. A ``rate`` share of the eligible words (at least one) is chosen,
all their characters are replaced by [MASK], and the masked LM fills each masked position with its most
likely single Chinese character **other than the original** (so every generated sentence differs from
its source). One character in -> one character out, so the BIO labels carry over unchanged. The
augmented set is the original set followed by ``copies`` generated versions of each sentence
(D_aug = D ∪ D′). Sentences with no eligible word are counted and not duplicated.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import regex
import torch

from keplm.models.downstream.data import NerSet
from keplm.models.downstream.finetune import window_bounds

HAN = regex.compile(r"^\p{Han}$")


def _segment(chars: list[str]) -> list[tuple[int, int]]:
    import jieba

    jieba.setLogLevel(60)
    return [(s, e) for _, s, e in jieba.tokenize("".join(chars))]


def eligible_words(chars: list[str], tags: list[str], vocab: dict[str, int]) -> list[tuple[int, int]]:
    return [(s, e) for s, e in _segment(chars)
            if all(tags[i] == "O" and HAN.match(chars[i]) and chars[i] in vocab for i in range(s, e))]


@torch.no_grad()
def augment_ner(ds: NerSet, model_dir, rate: float = 0.15, copies: int = 1, seed: int = 0,
                max_seq_len: int = 256, batch_size: int = 32) -> NerSet:
    from keplm.models.downstream.heads import char_token_ids, load_pretrained

    model, tokenizer = load_pretrained(model_dir)
    model.eval()
    vocab = tokenizer.get_vocab()
    allowed = torch.zeros(len(vocab), dtype=torch.bool)   # replacement candidates: single Chinese characters
    for tok, i in vocab.items():
        if HAN.match(tok):
            allowed[i] = True
    width = min(max_seq_len, model.config.max_position_embeddings) - 2
    rng = random.Random(seed)
    out = NerSet([list(s) for s in ds.sentences], [list(t) for t in ds.labels], Counter(ds.counts))
    counts = Counter()
    jobs = []   # (sentence index, window start, token ids with masks, masked char positions in the window)
    for copy in range(copies):
        for si, (chars, tags) in enumerate(zip(ds.sentences, ds.labels)):
            words = eligible_words(chars, tags, vocab)
            if not words:
                if copy == 0:
                    counts["augment_no_eligible_word"] += 1
                continue
            chosen = rng.sample(words, max(1, round(rate * len(words))))
            masked = sorted(i for s, e in chosen for i in range(s, e))
            new = list(chars)
            jobs.append((si, new, masked))
    # run the MLM per window of each sentence that holds masked characters
    flat = []
    for ji, (si, new, masked) in enumerate(jobs):
        for s, e in window_bounds(new, width):
            pos = [i for i in masked if s <= i < e]
            if pos:
                ids = [tokenizer.cls_token_id, *char_token_ids(new[s:e], tokenizer), tokenizer.sep_token_id]
                for i in pos:
                    ids[i - s + 1] = tokenizer.mask_token_id
                flat.append((ji, s, ids, pos))
    for b in range(0, len(flat), batch_size):
        chunk = flat[b:b + batch_size]
        n = max(len(c[2]) for c in chunk)
        ids = torch.full((len(chunk), n), tokenizer.pad_token_id, dtype=torch.long)
        for r, c in enumerate(chunk):
            ids[r, :len(c[2])] = torch.tensor(c[2])
        hidden = model.bert(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long()).last_hidden_state
        for r, (ji, s, _, pos) in enumerate(chunk):
            new = jobs[ji][1]
            logits = model.cls.predictions(hidden[r, [i - s + 1 for i in pos]]).float()
            for i, row in zip(pos, logits):
                row = row.masked_fill(~allowed[:row.numel()], float("-inf"))
                row[vocab[new[i]]] = float("-inf")   # never put the original character back
                new[i] = tokenizer.convert_ids_to_tokens(int(row.argmax()))
                counts["augment_chars_replaced"] += 1
    for si, new, _ in jobs:
        out.sentences.append(new)
        out.labels.append(list(ds.labels[si]))
    counts["augment_generated"] = len(jobs)
    counts["augment_original"] = len(ds)
    out.counts.update(counts)
    out.counts["sentences"] = len(out)
    return out


def write_conll(ds: NerSet, path: str | Path) -> Path:
    """``char label`` lines, blank line between sentences (what :func:`read_conll` reads)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", encoding="utf-8") as f:
        for chars, tags in zip(ds.sentences, ds.labels):
            # a line break inside a sentence would end it on re-reading: write it as a space
            f.writelines(f"{' ' if c in chr(10) + chr(13) else c} {t}\n" for c, t in zip(chars, tags))
            f.write("\n")
    return p
