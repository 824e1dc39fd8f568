"""Unsupervised semantic similarity (SMedBERT §4.3, App. C): can the encoder tell an entity's synonym
from look-alike entities of the same type, with no training at all?

* Positives: the KG's alias/synonym pairs, made undirected and de-duplicated. Each pair gives two
  queries: head -> tail and tail -> head (App. C: "we use head and tail as query respectively").
* Negatives: 19 entities of the ground truth's type, drawn at random among those whose Jaro-Winkler
  similarity with the ground truth is > 0.6 (rapidfuzz computes it). When fewer qualify, the rest are
  drawn at random from the same type (``similarity_fallback_queries`` counts such queries); a query
  whose type has no other entity at all is skipped (``similarity_no_negatives``).
* Representation: mean of the last layer's token states, without [CLS] and [SEP] (App. C); score:
  cosine similarity. Acc@1 = share of queries whose ground truth scores strictly above every negative.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class SimilarityQuery:
    query: str
    truth: str
    negatives: list[str]


def build_queries(kg_dir: str | Path, n_neg: int = 19, min_jw: float = 0.6, seed: int = 0,
                  max_queries: int | None = None) -> tuple[list[SimilarityQuery], Counter]:
    from rapidfuzz.distance import JaroWinkler
    from rapidfuzz.process import cdist

    from keplm.kg.reader import read_aliases, read_entities

    counts: Counter = Counter()
    entities = read_entities(kg_dir, counts)
    aliases = read_aliases(kg_dir, entities, counts)
    pairs = sorted({tuple(sorted((a, entities.names[e]))) for a, e in aliases if a != entities.names[e]})
    counts["similarity_pairs"] = len(pairs)
    by_type: dict[str, list[str]] = {}
    for name, etype in zip(entities.names, entities.types):
        by_type.setdefault(etype, []).append(name)
    type_of = dict(zip(entities.names, entities.types))
    rng = random.Random(seed)
    queries: list[SimilarityQuery] = []
    for a, b in pairs:
        etype = type_of.get(a) or type_of.get(b)   # an alias that is not itself an entity takes its entity's type
        pool_all = by_type.get(etype, [])
        for query, truth in ((a, b), (b, a)):
            pool = [n for n in pool_all if n not in (query, truth)]
            if not pool:
                counts["similarity_no_negatives"] += 1
                continue
            jw = cdist([truth], pool, scorer=JaroWinkler.similarity)[0]
            close = [n for n, s in zip(pool, jw) if s > min_jw]
            negs = rng.sample(close, min(n_neg, len(close)))
            if len(negs) < n_neg:
                counts["similarity_fallback_queries"] += 1
                rest = [n for n in pool if n not in set(negs)]
                negs += rng.sample(rest, min(n_neg - len(negs), len(rest)))
            queries.append(SimilarityQuery(query, truth, negs))
    if max_queries is not None and len(queries) > max_queries:
        queries = rng.sample(queries, max_queries)
    counts["similarity_queries"] = len(queries)
    return queries, counts


@torch.no_grad()
def mean_pooled(encoder, tokenizer, texts: list[str], batch_size: int = 128, max_len: int = 32) -> np.ndarray:
    """Mean of the last-layer states of each text's tokens, [CLS]/[SEP]/padding excluded."""
    encoder.eval()
    out = []
    for b in range(0, len(texts), batch_size):
        enc = tokenizer(texts[b:b + batch_size], padding=True, truncation=True, max_length=max_len,
                        return_tensors="pt", return_special_tokens_mask=True)
        special = enc.pop("special_tokens_mask").bool()
        h = encoder(**{k: v for k, v in enc.items()}).last_hidden_state.float()
        keep = (enc["attention_mask"].bool() & ~special).unsqueeze(-1)
        out.append(((h * keep).sum(1) / keep.sum(1).clamp(min=1)).numpy())
    return np.concatenate(out) if out else np.zeros((0, encoder.config.hidden_size), np.float32)


def accuracy_at_1(queries: list[SimilarityQuery], vectors: dict[str, np.ndarray]) -> float:
    def unit(v):
        return v / max(np.linalg.norm(v), 1e-12)

    hits = 0
    for q in queries:
        qv = unit(vectors[q.query])
        truth = float(qv @ unit(vectors[q.truth]))
        best_neg = max(float(qv @ unit(vectors[n])) for n in q.negatives)
        hits += truth > best_neg
    return hits / len(queries) if queries else 0.0


def evaluate_similarity(model_dir, kg_dir, n_neg: int = 19, min_jw: float = 0.6, seed: int = 0,
                        max_queries: int | None = None) -> dict:
    from keplm.models.downstream.heads import load_pretrained

    queries, counts = build_queries(kg_dir, n_neg, min_jw, seed, max_queries)
    model, tokenizer = load_pretrained(model_dir)
    texts = sorted({t for q in queries for t in (q.query, q.truth, *q.negatives)})
    vecs = dict(zip(texts, mean_pooled(model.bert, tokenizer, texts)))
    return {"task": "similarity", "acc_at_1": accuracy_at_1(queries, vecs), "counts": dict(counts)}
