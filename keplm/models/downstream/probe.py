"""Knowledge probing (KeBioLM §4.6): can a masked LM fill in a KG triple's missing entity, with no training?

**Queries** (§4.6.1). Each triple ``(s, r, o)`` gives two cloze queries through one Chinese template per
relation (:data:`TEMPLATES`, ``"{s}的{r}是{o}。"`` for any other relation, overridable from config):
Q1 ``s r [MASK]`` (predict the object) and Q2 ``[MASK] r o`` (predict the subject). Repeated queries are
merged: one Q1 per distinct (s, r) with *all* its objects as answers, one Q2 per distinct (r, o) with all
its subjects. Then at most ``max_queries_per_relation`` (the paper: 200) queries, Q1 and Q2 together, are
sampled per relation with ``seed``. Relations that mean "another name" (``kg.same_as_relations``, e.g. 别名)
are not probed: as everywhere in keplm they and ``aliases.tsv`` give aliases, and an answer also counts as
hit by any of its aliases (the paper's answers are CUIs, hit through any of their names).

**Types** (§4.6.4): Type 1 "answers within queries" — some accepted answer string (name or alias) occurs in
the query's own text (e.g. ``[MASK]可并发糖尿病肾病。`` with answer 糖尿病); Type 2 — none does. We read
"within queries" literally: the whole query sentence, template words included, without the [MASK].

**Decoding** (§4.6.2). For every answer length L = 1..``max_answer_tokens`` (10), L [MASK] tokens fill
the slot. Each step scores every hypothesis's undecoded masks given the input and the tokens it has decoded,
fills the most confident one (highest max probability, Jiang et al. 2020's confidence order; arbitrary,
not left-to-right) with its top B tokens, and keeps the B = ``beam_size`` (5) hypotheses with the highest
*accumulated* (summed) log probability; after L steps the B best remain. No refinement stage (as the paper).
Special tokens ([PAD] [UNK] [CLS] [SEP] [MASK]) are never predicted.

**Metric** (§4.6.3). The paper: a query is answered correctly "if any decoded tokens in any [MASK] length
hit any of the correct CUIs", so ``recall_at_5`` counts a hit when any of the B best decodings *of any
length* equals (spaces removed) an accepted answer. Decodings of different lengths are never ranked
against each other there, so no length normalisation is needed. ``recall_at_5_pooled`` is the stricter
reading: all lengths' candidates pooled, ranked by mean log probability per token, top 5 distinct strings.
Both are relation-level macro averages (mean over a relation's queries, then over relations); the Type 1 /
Type 2 scores are the same macro over the queries of that type (relations without such queries skipped).
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from keplm.platform.errors import KeplmError

TEMPLATES: dict[str, str] = {
    "症状": "{s}的症状是{o}。",
    "推荐食谱": "{s}的推荐食谱是{o}。",
    "检查": "{s}需要检查{o}。",
    "宜吃": "{s}患者宜吃{o}。",
    "忌吃": "{s}患者忌吃{o}。",
    "治疗方式": "{s}可以用{o}治疗。",
    "治疗药物": "{s}的治疗药物是{o}。",
    "常用药品": "{s}的常用药品是{o}。",
    "并发症": "{s}可并发{o}。",
    "所属科室": "{s}应到{o}就诊。",
}
FALLBACK_TEMPLATE = "{s}的{r}是{o}。"
_SLOT = "\x00"

# score_fn(input_ids (R, T), attention_mask (R, T), positions (R, L)) -> MLM logits at those positions (R, L, V)
ScoreFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Beam = list[tuple[tuple[int, ...], float]]   # (slot token ids, summed log probability), best first
Candidate = tuple[str, float, int]           # (decoded string without spaces, summed log probability, length)


def check_template(template: str) -> str:
    """A template needs exactly one ``{s}`` and one ``{o}``; ``{r}`` (the relation name) is optional."""
    if template.count("{s}") != 1 or template.count("{o}") != 1:
        raise ValueError(f"probe template {template!r} needs exactly one {{s}} and one {{o}}")
    try:
        template.format(s="", o="", r="")
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"probe template {template!r}: only {{s}}, {{o}}, {{r}} may be used ({exc})") from None
    return template


@dataclass
class ProbeQuery:
    relation: str
    direction: str                  # "Q1": object masked, "Q2": subject masked
    left: str                       # query text before the [MASK] slot
    right: str                      # ... and after it
    answers: tuple[str, ...]        # gold entity names
    accepted: tuple[str, ...]       # the answers and their aliases: any of them is a hit
    type: int = field(init=False)   # 1: an accepted answer occurs in the query text; 2: none does

    def __post_init__(self):
        context = self.left + self.right
        self.type = 1 if any(a in context for a in self.accepted) else 2

    @property
    def text(self) -> str:
        return f"{self.left}[MASK]{self.right}"


def build_queries(kg_dir: str | Path, templates: dict[str, str] | None = None, max_queries_per_relation: int = 200,
                  seed: int = 0) -> tuple[list[ProbeQuery], Counter]:
    """Deduplicated Q1/Q2 queries of a keplm KG directory, at most ``max_queries_per_relation`` per relation."""
    from keplm.kg.graph import GraphConfig
    from keplm.kg.reader import read_aliases, read_entities, read_triples

    counts: Counter = Counter()
    entities = read_entities(kg_dir, counts)
    aliases = read_aliases(kg_dir, entities, counts)
    triples = read_triples(kg_dir, entities, counts, tuple(GraphConfig().same_as_relations))
    names = entities.names
    other_names: dict[str, set[str]] = defaultdict(set)
    for alias, e in [*aliases, *triples.same_as]:
        other_names[names[e]].add(alias)
    tmpl = {**TEMPLATES, **(templates or {})}
    objects: dict[tuple[str, str], set[str]] = defaultdict(set)    # (r, s) -> objects
    subjects: dict[tuple[str, str], set[str]] = defaultdict(set)   # (r, o) -> subjects
    for h, r, t in zip(triples.heads, triples.relations, triples.tails):
        rel = triples.relation_names[r]
        objects[rel, names[h]].add(names[t])
        subjects[rel, names[t]].add(names[h])

    def query(rel: str, direction: str, known: str, answers: set[str]) -> ProbeQuery:
        t = check_template(tmpl.get(rel, FALLBACK_TEMPLATE))
        text = t.format(s=known, o=_SLOT, r=rel) if direction == "Q1" else t.format(s=_SLOT, o=known, r=rel)
        left, right = text.split(_SLOT)
        ans = tuple(sorted(answers))
        accepted = tuple(sorted({*ans, *(a for n in ans for a in other_names.get(n, ()))}))
        return ProbeQuery(rel, direction, left, right, ans, accepted)

    by_rel: dict[str, list[ProbeQuery]] = defaultdict(list)
    for (rel, s), objs in sorted(objects.items()):
        by_rel[rel].append(query(rel, "Q1", s, objs))
    for (rel, o), subs in sorted(subjects.items()):
        by_rel[rel].append(query(rel, "Q2", o, subs))
    rng = random.Random(seed)
    out: list[ProbeQuery] = []
    for rel in sorted(by_rel):
        qs = by_rel[rel]
        counts["probe_candidate_queries"] += len(qs)
        if len(qs) > max_queries_per_relation:
            keep = sorted(rng.sample(range(len(qs)), max_queries_per_relation))
            qs = [qs[i] for i in keep]
        out.extend(qs)
    counts["probe_relations"] = len(by_rel)
    counts["probe_relations_fallback_template"] = sum(r not in tmpl for r in by_rel)
    counts["probe_queries"] = len(out)
    counts["probe_queries_type1"] = sum(q.type == 1 for q in out)
    counts["probe_queries_type2"] = len(out) - counts["probe_queries_type1"]
    return out, counts


# ------------------------------------------------------------------ decoding

class SpecialIds(NamedTuple):
    cls: int
    sep: int
    pad: int
    mask: int


def mlm_scorer(model, device: torch.device | str = "cpu") -> ScoreFn:
    """A :data:`ScoreFn` over any model with a ``.bert`` trunk and ``.cls.predictions`` (what
    :func:`~keplm.models.downstream.heads.load_pretrained` returns; a transformers BertForMaskedLM too).
    Only the slot positions go through the vocabulary projection."""
    model.eval()

    @torch.no_grad()
    def score(input_ids, attention_mask, positions):
        h = model.bert(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).last_hidden_state
        sel = h.gather(1, positions.to(device)[..., None].expand(-1, -1, h.size(-1)))
        return model.cls.predictions(sel).float().cpu()

    return score


def decode_slots(score_fn: ScoreFn, contexts: list[tuple[list[int], list[int]]], length: int, special: SpecialIds,
                 beam_size: int = 5, banned: list[int] = (), batch_rows: int = 64) -> list[Beam]:
    """Fill ``length`` [MASK]s between each context's (left ids, right ids): confidence-ordered beam search.

    Returns per context up to ``beam_size`` (slot token ids, summed log probability), best first."""
    blank = (special.mask,) * length
    beams: list[Beam] = [[(blank, 0.0)] for _ in contexts]
    for _ in range(length):
        rows = [(q, slots, score) for q, beam in enumerate(beams) for slots, score in beam]
        cands: list[dict[tuple[int, ...], float]] = [{} for _ in contexts]
        for b in range(0, len(rows), batch_rows):
            chunk = rows[b:b + batch_rows]
            seqs = [[special.cls, *contexts[q][0], *slots, *contexts[q][1], special.sep] for q, slots, _ in chunk]
            ids = torch.full((len(seqs), max(map(len, seqs))), special.pad, dtype=torch.long)
            for r, s in enumerate(seqs):
                ids[r, :len(s)] = torch.tensor(s)
            starts = torch.tensor([1 + len(contexts[q][0]) for q, _, _ in chunk])
            positions = starts[:, None] + torch.arange(length)[None]
            logits = score_fn(ids, (ids != special.pad).long(), positions).float()
            if len(banned):
                logits[..., list(banned)] = float("-inf")
            logp = torch.log_softmax(logits, -1)                                   # (R, L, V)
            filled = torch.tensor([[t != special.mask for t in slots] for _, slots, _ in chunk])
            conf = logp.max(-1).values.masked_fill(filled, float("-inf"))
            pos = conf.argmax(-1)                                                   # most confident undecoded mask
            top = logp[torch.arange(len(chunk)), pos].topk(min(beam_size, logp.size(-1)))
            for r, (q, slots, score) in enumerate(chunk):
                p = int(pos[r])
                for lp, tok in zip(top.values[r].tolist(), top.indices[r].tolist()):
                    new = slots[:p] + (tok,) + slots[p + 1:]
                    total = score + lp
                    if total > cands[q].get(new, float("-inf")):
                        cands[q][new] = total   # the same filling reached in another order: keep the best
        beams = [sorted(c.items(), key=lambda kv: -kv[1])[:beam_size] for c in cands]
    return beams


def _canon(text: str) -> str:
    return "".join(text.split())


def probe_model(score_fn: ScoreFn, tokenizer, queries: list[ProbeQuery], beam_size: int = 5,
                max_answer_tokens: int = 10, max_len: int = 512, batch_rows: int = 64) -> list[list[Candidate]]:
    """Per query: every length's B best decodings as (string without spaces, summed log prob, length).
    A query whose longest input would exceed ``max_len`` tokens gets no candidates."""
    special = SpecialIds(tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id,
                         tokenizer.mask_token_id)
    banned = sorted({*special, tokenizer.unk_token_id})

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    enc = [(ids(q.left), ids(q.right)) for q in queries]
    out: list[list[Candidate]] = [[] for _ in queries]
    for length in range(1, max_answer_tokens + 1):
        todo = [i for i, (lft, rgt) in enumerate(enc) if len(lft) + len(rgt) + length + 2 <= max_len]
        beams = decode_slots(score_fn, [enc[i] for i in todo], length, special, beam_size, banned, batch_rows)
        for i, beam in zip(todo, beams):
            out[i].extend((_canon(tokenizer.decode(list(slots))), score, length) for slots, score in beam)
    return out


# ------------------------------------------------------------------ scoring

def query_hit(candidates: list[Candidate], accepted: set[str], pooled_k: int = 5) -> tuple[bool, bool, list[str]]:
    """(paper hit: any length's beam holds an accepted answer, pooled hit: the top ``pooled_k`` distinct
    strings by mean log prob per token hold one, those top strings)."""
    paper = any(s in accepted for s, _, _ in candidates)
    best: dict[str, float] = {}
    for s, score, n in candidates:
        best[s] = max(best.get(s, float("-inf")), score / n)
    top = sorted(best, key=lambda s: -best[s])[:pooled_k]
    return paper, any(s in accepted for s in top), top


def macro_recall(queries: list[ProbeQuery], hits: list[bool],
                 query_type: int | None = None) -> tuple[float | None, dict[str, float]]:
    """Relation-level macro recall: mean hit rate per relation, then mean over relations (None: no query)."""
    per: dict[str, list[bool]] = defaultdict(list)
    for q, h in zip(queries, hits):
        if query_type is None or q.type == query_type:
            per[q.relation].append(h)
    rel = {r: sum(v) / len(v) for r, v in sorted(per.items())}
    return (sum(rel.values()) / len(rel) if rel else None), rel


def score_probe(queries: list[ProbeQuery], candidates: list[list[Candidate]], tokenizer,
                max_answer_tokens: int = 10, examples_per_relation: int = 3) -> dict:
    """The result dict's metrics, per-relation values, counts and a few decoded examples."""
    counts: Counter = Counter()
    paper_hits, pooled_hits, examples = [], [], defaultdict(list)
    for q, cands in zip(queries, candidates):
        counts["probe_queries_too_long"] += not cands
        accepted = set()
        for a in q.accepted:   # an answer as the tokenizer writes it (lower case, no spaces)
            ids = tokenizer(a, add_special_tokens=False)["input_ids"]
            counts["probe_answers_unk"] += tokenizer.unk_token_id in ids
            counts["probe_answers_too_many_tokens"] += len(ids) > max_answer_tokens
            accepted.add(_canon(tokenizer.decode(ids)))
        paper, pooled, top = query_hit(cands, accepted)
        paper_hits.append(paper)
        pooled_hits.append(pooled)
        if len(examples[q.relation]) < examples_per_relation:
            examples[q.relation].append({"query": q.text, "type": q.type, "answers": list(q.answers)[:5],
                                         "top5": top, "hit": paper})
    recall, per_rel = macro_recall(queries, paper_hits)
    pooled, per_rel_pooled = macro_recall(queries, pooled_hits)
    n_rel = Counter(q.relation for q in queries)
    n_t1 = Counter(q.relation for q in queries if q.type == 1)
    return {
        "task": "probe",
        "recall_at_5": recall,
        "recall_at_5_type1": macro_recall(queries, paper_hits, 1)[0],
        "recall_at_5_type2": macro_recall(queries, paper_hits, 2)[0],
        "recall_at_5_pooled": pooled,
        "recall_at_5_micro": sum(paper_hits) / len(paper_hits) if paper_hits else None,
        **{f"recall_at_5.{r}": v for r, v in per_rel.items()},
        "per_relation": {r: {"recall_at_5": v, "recall_at_5_pooled": per_rel_pooled[r], "queries": n_rel[r],
                             "queries_type1": n_t1[r], "queries_type2": n_rel[r] - n_t1[r]}
                         for r, v in per_rel.items()},
        "examples": dict(examples),
        "counts": {**dict(counts), **{f"probe_queries.{r}": n for r, n in sorted(n_rel.items())}},
    }


def evaluate_probe(model_dir, kg_dir, seed: int = 0, max_queries_per_relation: int = 200, beam_size: int = 5,
                   max_answer_tokens: int = 10, templates: dict[str, str] | None = None, batch_rows: int = 64) -> dict:
    """Probe a checkpoint directory on a KG directory -> JSON-able result dict (``recall_at_5`` headline)."""
    from keplm.models.downstream.finetune import pick_device
    from keplm.models.downstream.heads import load_pretrained

    queries, counts = build_queries(kg_dir, templates, max_queries_per_relation, seed)
    if not queries:
        raise KeplmError(f"{kg_dir}: no probing query (no usable triple outside same-as relations)")
    model, tokenizer = load_pretrained(model_dir)
    device = pick_device("auto")
    model.to(device)
    cands = probe_model(mlm_scorer(model, device), tokenizer, queries, beam_size, max_answer_tokens,
                        model.config.max_position_embeddings, batch_rows)
    result = score_probe(queries, cands, tokenizer, max_answer_tokens)
    result["counts"] = {**dict(counts), **result["counts"]}
    return result
