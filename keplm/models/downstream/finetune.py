"""Fine-tuning and evaluation loops for the downstream tasks, one seed at a time, CPU or GPU.

Defaults are seed 003 Table 3 (lr 5e-5, batch 32, weight decay 0.01, 6 epochs, Adam(W)); the heads get
their own learning rate (``head_lr``) because a randomly initialised CRF learns its transitions too
slowly at 5e-5 — in feature-extraction mode the head is all that trains. Model selection: the dev
score is measured every ``eval_every`` steps (default: once per epoch) and the best state is the one
reported on test (seed 003 §4.2 evaluates on dev during training and keeps the best).

Long sentences (cEHRNER records run to 1,800 characters) are cut into windows of at most
``max_seq_len - 2`` characters, after sentence punctuation where there is one in the window's last
half; in training a cut never falls inside a gold entity. Predictions of the windows are concatenated,
so test scores are always computed against whole gold sentences.
"""

from __future__ import annotations

import math
import random
import time
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from keplm.models.downstream.data import NerSet, PairSet
from keplm.models.downstream.heads import NerTagger, PairClassifier, char_token_ids
from keplm.platform.config import Section
from keplm.platform.errors import KeplmError

CUT_AFTER = set("。；;！？!?，,、\n")


class FinetuneConfig(Section):
    head: Literal["fc", "crf", "lstm-crf", "bilstm-crf"] = Field("crf", description="NER tagging head on the "
                                                                           "encoder")
    mode: Literal["finetune", "feature"] = Field("finetune", description="feature = frozen encoder (seed 003 Table 6)")
    lr: float = Field(5e-5, gt=0, description="AdamW learning rate of the encoder")
    head_lr: float = Field(1e-3, gt=0, description="learning rate of the task head (a random CRF needs more)")
    batch_size: int = Field(32, ge=1, description="sentences (or pairs) per step")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    epochs: int = Field(6, ge=1, description="passes over the training set")
    max_steps: int | None = Field(None, ge=1, description="stop after this many steps (proxy mode)")
    warmup: float = Field(0.1, ge=0, lt=1, description="share of the steps with linear warm-up")
    lstm_hidden: int = Field(128, ge=1, description="LSTM hidden size of the lstm-crf / bilstm-crf heads")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout on the encoder output, before the head")
    max_seq_len: int = Field(256, ge=8, description="tokens per input; longer NER sentences are cut into windows")
    eval_every: int | None = Field(None, ge=1, description="steps between dev evaluations; unset: each epoch")
    train_subset: int | None = Field(None, ge=1, description="use the first N training examples")
    dev_subset: int | None = Field(None, ge=1, description="use the first N dev examples")
    grad_clip: float = Field(1.0, gt=0, description="gradient clipping norm")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when present")


def pick_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- NER

def window_bounds(chars: list[str], width: int, tags: list[str] | None = None) -> list[tuple[int, int]]:
    """[start, end) windows of at most ``width`` characters covering the sentence (module docstring rule)."""
    out, start, n = [], 0, len(chars)
    while n - start > width:
        end = start + width
        ok = range(end, start + width // 2, -1)
        # a cut at `end` is inside a gold entity when the tag at `end` continues one
        allowed = [e for e in ok if tags is None or not tags[e].startswith("I-")]
        punct = [e for e in allowed if chars[e - 1] in CUT_AFTER]
        end = punct[0] if punct else (allowed[0] if allowed else end)
        out.append((start, end))
        start = end
    out.append((start, n))
    return out


def encode_ner(ds: NerSet, tokenizer, label_ids: dict[str, int], max_seq_len: int, training: bool):
    """-> list of (sentence index, window start, token ids, label ids); unknown labels count as ``O``."""
    width = max_seq_len - 2
    items = []
    for si, (chars, tags) in enumerate(zip(ds.sentences, ds.labels)):
        for s, e in window_bounds(chars, width, tags if training else None):
            ids = [tokenizer.cls_token_id, *char_token_ids(chars[s:e], tokenizer), tokenizer.sep_token_id]
            items.append((si, s, ids, [label_ids.get(t, 0) for t in tags[s:e]]))
    return items


def collate_ner(items, pad_id: int, device):
    n = max(len(it[2]) for it in items)
    ids = torch.full((len(items), n), pad_id, dtype=torch.long)
    labels = torch.zeros((len(items), n - 2), dtype=torch.long)
    lengths = torch.tensor([len(it[3]) for it in items])
    for i, it in enumerate(items):
        ids[i, :len(it[2])] = torch.tensor(it[2])
        labels[i, :len(it[3])] = torch.tensor(it[3])
    att = (ids != pad_id).long()
    att[:, 0] = 1
    return ids.to(device), att.to(device), lengths.to(device), labels.to(device)


def ner_scores(gold: list[list[str]], pred: list[list[str]]) -> dict[str, float]:
    """Entity-level micro precision / recall / F1 (seqeval, CoNLL-style chunking)."""
    from seqeval.metrics import f1_score, precision_score, recall_score

    return {"precision": float(precision_score(gold, pred, zero_division=0)),
            "recall": float(recall_score(gold, pred, zero_division=0)),
            "f1": float(f1_score(gold, pred, zero_division=0))}


def predict_ner(model: NerTagger, ds: NerSet, tokenizer, labels: list[str], max_seq_len: int, batch_size: int,
                device) -> list[list[str]]:
    model.eval()
    items = encode_ner(ds, tokenizer, {t: i for i, t in enumerate(labels)}, max_seq_len, training=False)
    pred = [["O"] * len(s) for s in ds.sentences]
    for b in range(0, len(items), batch_size):
        chunk = items[b:b + batch_size]
        ids, att, lengths, _ = collate_ner(chunk, tokenizer.pad_token_id, device)
        for (si, start, _, _), path in zip(chunk, model.decode(ids, att, lengths)):
            pred[si][start:start + len(path)] = [labels[j] for j in path]
    return pred


def _optimizer(model, cfg: FinetuneConfig, total_steps: int):
    from transformers import get_linear_schedule_with_warmup

    head = set(map(id, model.head_parameters()))
    groups = [{"params": [p for p in model.head_parameters() if p.requires_grad], "lr": cfg.head_lr}]
    if cfg.mode == "finetune":
        enc = [(n, p) for n, p in model.named_parameters() if id(p) not in head and p.requires_grad]
        no_decay = ("bias", "LayerNorm.weight", "LayerNorm.bias")
        groups += [{"params": [p for n, p in enc if not n.endswith(no_decay)], "lr": cfg.lr, "weight_decay": cfg.weight_decay},
                   {"params": [p for n, p in enc if n.endswith(no_decay)], "lr": cfg.lr, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    sched = get_linear_schedule_with_warmup(opt, int(cfg.warmup * total_steps), total_steps)
    return opt, sched


def _trainable_state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _fit(model, items, collate, evaluate, cfg: FinetuneConfig, seed: int, device) -> dict:
    """The shared loop: shuffled batches, AdamW + linear warm-up/decay, clipping, dev-based selection."""
    if not items:
        raise KeplmError("no training examples")
    steps_per_epoch = math.ceil(len(items) / cfg.batch_size)
    total = min(cfg.max_steps or steps_per_epoch * cfg.epochs, steps_per_epoch * cfg.epochs)
    eval_every = cfg.eval_every or steps_per_epoch
    opt, sched = _optimizer(model, cfg, total)
    rng = random.Random(seed)
    best = {"dev": -1.0, "step": 0, "state": None}
    step, seen, t0 = 0, 0, time.perf_counter()
    train_time = 0.0
    history = []
    while step < total:
        order = list(range(len(items)))
        rng.shuffle(order)
        for b in range(0, len(order), cfg.batch_size):
            tb = time.perf_counter()
            model.train()
            batch = collate([items[i] for i in order[b:b + cfg.batch_size]])
            loss = model(*batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
            opt.step()
            sched.step()
            step += 1
            seen += min(cfg.batch_size, len(order) - b)
            train_time += time.perf_counter() - tb
            if step % eval_every == 0 or step == total:
                dev = evaluate()
                history.append({"step": step, "loss": float(loss.detach()), "dev": dev})
                if dev > best["dev"]:
                    best = {"dev": dev, "step": step, "state": _trainable_state(model)}
            if step >= total:
                break
    model.load_state_dict(best["state"])
    return {"steps": step, "best_step": best["step"], "dev_score": best["dev"], "history": history,
            "train_examples_per_s": seen / train_time if train_time else 0.0,
            "wall_s": time.perf_counter() - t0}


def finetune_ner(model_dir, train: NerSet, dev: NerSet, test: NerSet | None, cfg: FinetuneConfig, seed: int = 0) -> dict:
    """Train a tagger on ``train``, select on ``dev`` F1, report P/R/F1 on ``test`` (and dev)."""
    from keplm.models.downstream.heads import load_pretrained

    seed_everything(seed)
    device = pick_device(cfg.device)
    pretrained, tokenizer = load_pretrained(model_dir)
    # again after loading: what from_pretrained initialised (a pooler or SOP head the checkpoint lacks, as an
    # export's) drew from the RNG, and the head and dropout must not depend on it (full checkpoint == its export)
    seed_everything(seed)
    train, dev = train.subset(cfg.train_subset), dev.subset(cfg.dev_subset)
    labels = train.label_set()
    label_ids = {t: i for i, t in enumerate(labels)}
    cfg = cfg.model_copy(update={"max_seq_len": min(cfg.max_seq_len, pretrained.config.max_position_embeddings)})
    model = NerTagger(pretrained.bert, len(labels), cfg.head, cfg.lstm_hidden, cfg.dropout,
                      freeze_encoder=cfg.mode == "feature").to(device)
    del pretrained
    items = encode_ner(train, tokenizer, label_ids, cfg.max_seq_len, training=True)

    def dev_f1() -> float:
        return ner_scores(dev.labels, predict_ner(model, dev, tokenizer, labels, cfg.max_seq_len, cfg.batch_size, device))["f1"]

    fit = _fit(model, items, lambda b: collate_ner(b, tokenizer.pad_token_id, device), dev_f1, cfg, seed, device)
    result = {"task": "ner", "seed": seed, "labels": len(labels), "train_sentences": len(train),
              "train_windows": len(items), **{k: v for k, v in fit.items() if k != "history"},
              "dev_f1": fit["dev_score"], "history": fit["history"]}
    if test is not None:
        t0 = time.perf_counter()
        pred = predict_ner(model, test, tokenizer, labels, cfg.max_seq_len, cfg.batch_size, device)
        result["test_sentences_per_s"] = len(test) / (time.perf_counter() - t0)
        result.update({f"test_{k}": v for k, v in ner_scores(test.labels, pred).items()})
    return result


def proxy_dev_f1(model_dir, train: NerSet, dev: NerSet, steps: int = 300, dev_subset: int | None = 200,
                 cfg: FinetuneConfig | None = None, seed: int = 0) -> float:
    """The sweep objective: a few hundred fine-tuning steps, scored on (a subset of) dev — dev F1."""
    cfg = (cfg or FinetuneConfig()).model_copy(update={"max_steps": steps, "dev_subset": dev_subset,
                                                       "eval_every": max(steps // 3, 1)})
    return finetune_ner(model_dir, train, dev, None, cfg, seed)["dev_f1"]


# ---------------------------------------------------------------- sentence pairs

def encode_pairs(ds: PairSet, tokenizer, max_seq_len: int):
    enc = tokenizer(ds.first, ds.second, truncation=True, max_length=max_seq_len)
    return [(enc["input_ids"][i], enc["token_type_ids"][i], ds.labels[i]) for i in range(len(ds))]


def collate_pairs(items, pad_id: int, device):
    n = max(len(it[0]) for it in items)
    ids = torch.full((len(items), n), pad_id, dtype=torch.long)
    tt = torch.zeros((len(items), n), dtype=torch.long)
    att = torch.zeros((len(items), n), dtype=torch.long)
    for i, (a, t, _) in enumerate(items):
        ids[i, :len(a)], tt[i, :len(t)], att[i, :len(a)] = torch.tensor(a), torch.tensor(t), 1
    labels = torch.tensor([it[2] for it in items])
    return ids.to(device), att.to(device), tt.to(device), labels.to(device)


def pair_scores(gold: list[int], pred: list[int]) -> dict[str, float]:
    """F1 of the positive class (matching / entailment), plus accuracy."""
    from sklearn.metrics import accuracy_score, f1_score

    return {"f1": float(f1_score(gold, pred, zero_division=0)), "accuracy": float(accuracy_score(gold, pred))}


def predict_pairs(model: PairClassifier, items, pad_id: int, batch_size: int, device) -> list[int]:
    model.eval()
    out: list[int] = []
    for b in range(0, len(items), batch_size):
        ids, att, tt, _ = collate_pairs(items[b:b + batch_size], pad_id, device)
        out += model.predict(ids, att, tt)
    return out


def finetune_pairs(model_dir, train: PairSet, dev: PairSet, test: PairSet | None, cfg: FinetuneConfig, seed: int = 0) -> dict:
    from keplm.models.downstream.heads import load_pretrained

    seed_everything(seed)
    device = pick_device(cfg.device)
    pretrained, tokenizer = load_pretrained(model_dir)
    seed_everything(seed)   # as in finetune_ner: the head's init does not depend on what the checkpoint lacked
    train, dev = train.subset(cfg.train_subset), dev.subset(cfg.dev_subset)
    model = PairClassifier(pretrained.bert, 2, cfg.dropout, freeze_encoder=cfg.mode == "feature").to(device)
    del pretrained
    max_len = min(cfg.max_seq_len, model.encoder.config.max_position_embeddings)
    items, dev_items = encode_pairs(train, tokenizer, max_len), encode_pairs(dev, tokenizer, max_len)
    pad = tokenizer.pad_token_id

    def dev_f1() -> float:
        return pair_scores(dev.labels, predict_pairs(model, dev_items, pad, cfg.batch_size, device))["f1"]

    fit = _fit(model, items, lambda b: collate_pairs(b, pad, device), dev_f1, cfg, seed, device)
    result = {"task": "pair", "seed": seed, "train_pairs": len(train),
              **{k: v for k, v in fit.items() if k != "history"}, "dev_f1": fit["dev_score"], "history": fit["history"]}
    if test is not None:
        pred = predict_pairs(model, encode_pairs(test, tokenizer, max_len), pad, cfg.batch_size, device)
        result.update({f"test_{k}": v for k, v in pair_scores(test.labels, pred).items()})
    return result


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single run)."""
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
