"""keplm export: a plain BERT checkpoint that stock transformers loads without keplm, and the model cards.

Tiny models of every kind are built in-process and saved with a tiny tokenizer, as ``keplm pretrain`` leaves
``DIR/model``; the slow test of ``keplm pretrain`` writing ``DIR/model-bert`` is in test_pretrain.py."""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from keplm.models import (KeBioLMConfig, KeBioLMForPreTraining, KeplmBertConfig, KeplmBertForPreTraining,
                          SMedBertConfig, SMedBertForPreTraining)
from keplm.models.downstream.data import NerSet
from keplm.models.export import ExportConfig, export_bert
from keplm.models.model_card import (CARD, CONFIG_FILE, checkpoint_facts, finish_pretrained, render_card,
                                     write_card)
from keplm.platform.errors import KeplmError
from keplm.platform.manifest import sha256_file, write_manifest

SENTENCES = [
    ("感冒引起鼻塞和发热需要多喝水休息", [(0, 2, "disease"), (4, 6, "symptom"), (7, 9, "symptom")]),
    ("糖尿病患者应该控制饮食并且定期检查血糖", [(0, 3, "disease"), (17, 19, "test")]),
    ("高血压病人每天按时服用降压药", [(0, 3, "disease"), (11, 14, "drug")]),
    ("咳嗽很厉害的时候可以去医院看看呼吸内科", [(0, 2, "symptom"), (15, 19, "department")]),
    ("头痛发热可能是感冒也可能是高血压", [(0, 2, "symptom"), (2, 4, "symptom"), (7, 9, "disease"), (13, 16, "disease")]),
    ("糖尿病人要检查血糖和血压", [(0, 3, "disease"), (7, 9, "test"), (10, 12, "test")]),
]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(dict.fromkeys(c for s, _ in SENTENCES for c in s))
Z, R, TYPES = 20, 3, 4
KINDS = ("mlm", "wem", "ernie", "embert", "smedbert", "kebiolm")


def tiny(**kw):
    return dict(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=64, **kw)


def build(kind: str, seed: int = 0):
    """A random-init keplm model of ``kind`` (its knowledge tensors filled), knowledge acting after layer 1."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    if kind == "smedbert":
        model = SMedBertForPreTraining(SMedBertConfig(**tiny(), num_entities=Z, num_relations=R, num_entity_types=TYPES,
                                                      kg_dim=8, hybrid_layer=1))
        model.load_kg(torch.randn(Z, 8, generator=g), torch.randn(R, 8, generator=g), torch.randn(R, 8, 8, generator=g) / 3)
    elif kind == "kebiolm":
        model = KeBioLMForPreTraining(KeBioLMConfig(**tiny(), num_entities=Z, entity_dim=8, text_layers=1, entity_top_k=5))
    elif kind == "ernie":
        model = KeplmBertForPreTraining(KeplmBertConfig(**tiny(), entity_fusion=True, fusion_layer=1, num_entities=Z,
                                                        entity_dim=8))
        model.load_kg(torch.randn(Z, 8, generator=g))
    else:
        objectives = ["cecp", "est", "bem"] if kind == "embert" else []
        model = KeplmBertForPreTraining(KeplmBertConfig(**tiny(), entity_objectives=objectives))
    return model.eval()


def save_checkpoint(model, out: Path) -> Path:
    """``model`` + a WordPiece tokenizer over VOCAB, as keplm pretrain leaves DIR/model."""
    from transformers import BertTokenizer

    model.save_pretrained(str(out))
    BertTokenizer(vocab={t: i for i, t in enumerate(VOCAB)}, do_lower_case=True).save_pretrained(str(out))
    return out


def batch(texts=("感冒引起鼻塞", "高血压病人每天按时服用降压药")):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(_tok_dir()))(list(texts), padding=True, return_tensors="pt")


_TOK: list[Path] = []


def _tok_dir() -> Path:
    if not _TOK:
        import tempfile

        from transformers import BertTokenizer

        d = Path(tempfile.mkdtemp(prefix="keplm_tok_"))
        BertTokenizer(vocab={t: i for i, t in enumerate(VOCAB)}, do_lower_case=True).save_pretrained(str(d))
        _TOK.append(d)
    return _TOK[0]


def no_knowledge(kind: str, enc) -> dict:
    """The knowledge inputs of a batch without a linked mention (the tensors present, every mask off)."""
    b, t = enc["input_ids"].shape
    if kind in ("smedbert", "kebiolm"):
        extra = dict(mention_spans=torch.zeros(b, 2, 2, dtype=torch.long), mention_mask=torch.zeros(b, 2, dtype=torch.bool))
        if kind == "smedbert":
            extra.update(neighbour_ids=torch.zeros(b, 2, 3, dtype=torch.long), neighbour_type=torch.zeros(b, 2, 3, dtype=torch.long),
                         neighbour_relation=torch.zeros(b, 2, 3, dtype=torch.long),
                         neighbour_mask=torch.zeros(b, 2, 3, dtype=torch.bool))
        return extra
    if kind == "ernie":
        return {"token_entity": torch.full((b, t), -1)}
    return {}


# ---------------------------------------------------------------------------------------------- the export

@pytest.mark.parametrize("kind", KINDS)
def test_the_export_computes_the_full_models_mlm_logits_when_no_knowledge_acts(kind, tmp_path):
    from transformers import BertForMaskedLM

    full = build(kind)
    info = export_bert(save_checkpoint(full, tmp_path / "model"), tmp_path / "bert")
    assert info["architecture"] == "BertForMaskedLM" and info["parameters"] > 0
    config = json.loads((tmp_path / "bert" / "config.json").read_text())
    assert config["model_type"] == "bert" and config["architectures"] == ["BertForMaskedLM"]
    assert (tmp_path / "bert" / "model.safetensors").is_file() and (tmp_path / "bert" / "tokenizer.json").is_file()
    dropped = set(info["dropped"])
    assert {"bert.pooler", "cls.seq_relationship"} <= dropped
    assert {"kg", "hybrid"} <= dropped if kind == "smedbert" else True
    assert {"entity_emb", "detect", "mention_proj", "entity_out"} <= dropped if kind == "kebiolm" else True
    assert {"fusion", "entity_emb"} <= dropped if kind == "ernie" else True
    assert "entity_objectives" in dropped if kind == "embert" else True

    bert = BertForMaskedLM.from_pretrained(str(tmp_path / "bert")).eval()
    enc = batch()
    real = enc["attention_mask"].bool()
    with torch.no_grad():
        want = full(**enc, **no_knowledge(kind, enc)).mlm_logits
        plain = full(**enc).mlm_logits
        got = bert(**enc).logits
    assert torch.allclose(got[real], want[real], atol=1e-5), (got[real] - want[real]).abs().max()
    assert torch.allclose(plain[real], want[real], atol=1e-6)


def test_where_smedberts_hybrid_attention_acts_the_export_differs_after_that_layer(tmp_path):
    """The caveat the card states: with a linked mention that has neighbours the hook changes the mention's
    hidden states from layer hybrid_layer on; the export never runs it."""
    from transformers import BertForMaskedLM

    full = build("smedbert")
    export_bert(save_checkpoint(full, tmp_path / "model"), tmp_path / "bert")
    bert = BertForMaskedLM.from_pretrained(str(tmp_path / "bert")).eval()
    enc = batch()
    knowledge = no_knowledge("smedbert", enc)
    knowledge["mention_spans"][0, 0] = torch.tensor([1, 3])     # 感冒
    knowledge["mention_mask"][0, 0] = True
    knowledge["neighbour_ids"][0, 0] = torch.tensor([3, 4, 5])
    knowledge["neighbour_mask"][0, 0] = True
    with torch.no_grad():
        fused = full(**enc, **knowledge).mlm_logits
        got = bert(**enc).logits
    assert not torch.allclose(got[0, 1:3], fused[0, 1:3], atol=1e-4)   # the mention's tokens
    assert torch.allclose(got[1], fused[1], atol=1e-5)                 # the row without a mention


def test_the_encoder_format_is_the_trunk_alone(tmp_path):
    from transformers import BertModel

    full = build("smedbert")
    info = export_bert(save_checkpoint(full, tmp_path / "model"), tmp_path / "enc", fmt="bert-encoder")
    config = json.loads((tmp_path / "enc" / "config.json").read_text())
    assert config["architectures"] == ["BertModel"] and "cls.predictions" in info["dropped"]
    enc = batch()
    model = BertModel.from_pretrained(str(tmp_path / "enc")).eval()
    with torch.no_grad():
        want = full(**enc).last_hidden_state
        got = model(**enc).last_hidden_state
    real = enc["attention_mask"].bool()
    assert torch.allclose(got[real], want[real], atol=1e-5)


def test_export_errors_name_the_problem(tmp_path):
    full = build("mlm")
    full.save_pretrained(str(tmp_path / "model"))          # no tokenizer
    with pytest.raises(KeplmError, match="no tokenizer files"):
        export_bert(tmp_path / "model", tmp_path / "bert")
    export_bert(tmp_path / "model", tmp_path / "bert", tokenizer_dir=_tok_dir())
    assert (tmp_path / "bert" / "tokenizer.json").is_file()
    with pytest.raises(KeplmError, match="cannot overwrite"):
        export_bert(tmp_path / "bert", tmp_path / "bert")
    with pytest.raises(KeplmError, match="no config.json"):
        export_bert(tmp_path / "nothing", tmp_path / "x")


# ------------------------------------------------------------------------- stock transformers, keplm blocked

STOCK_SCRIPT = textwrap.dedent(r"""
    import json, logging, re, sys
    sys.modules["keplm"] = None                     # `import keplm` raises ImportError from here on
    try:
        import keplm  # noqa: F401
        raise SystemExit("keplm is importable")
    except ImportError:
        pass
    import torch
    import transformers
    from transformers import (AutoModel, AutoModelForMaskedLM, AutoModelForTokenClassification, AutoTokenizer,
                              BertConfig, BertForMaskedLM, pipeline)

    messages = []

    class Capture(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    transformers.logging.get_logger("transformers").addHandler(Capture())
    ansi = re.compile(r"\x1b\[[0-9;]*m")

    def report(load):
        messages.clear()
        obj = load()
        keys = {"UNEXPECTED": [], "MISSING": []}
        for m in messages:
            for line in ansi.sub("", m).splitlines():
                hit = re.match(r"\s*([\w.{}, -]+?)\s*\|\s*(UNEXPECTED|MISSING)\b", line)
                if hit:
                    keys[hit.group(2)].append(hit.group(1))
        text = "\n".join(messages)
        return obj, {"unexpected": sorted(keys["UNEXPECTED"]), "missing": sorted(keys["MISSING"]),
                     "says_unexpected": "unexpected" in text.lower()}

    path, reference = sys.argv[1], sys.argv[2]
    # a stock BertForMaskedLM of the same shape, saved by transformers itself: what any BERT MLM checkpoint gives
    BertForMaskedLM(BertConfig.from_pretrained(path)).save_pretrained(reference)
    out = {}
    for name, cls in (("AutoModel", AutoModel), ("AutoModelForMaskedLM", AutoModelForMaskedLM),
                      ("AutoModelForTokenClassification", AutoModelForTokenClassification)):
        kw = {"num_labels": 5} if "Token" in name else {}
        model, out[name] = report(lambda: cls.from_pretrained(path, **kw))
        out[name]["class"] = type(model).__name__
        out[name + "@reference"] = report(lambda: cls.from_pretrained(reference, **kw))[1]
    fill, out["pipeline"] = report(lambda: pipeline("fill-mask", model=path))
    out["pipeline"]["top"] = fill("感[MASK]引起鼻塞")[0]["token_str"]
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(["感冒引起鼻塞", "高血压病人每天按时服用降压药"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = AutoModelForMaskedLM.from_pretrained(path).eval()(**enc).logits
    torch.save(logits, sys.argv[3])
    print(json.dumps(out))
""")


def run_stock(path: Path, tmp_path: Path) -> tuple[dict, torch.Tensor]:
    """Load ``path`` with stock transformers in a Python where keplm cannot be imported."""
    script = tmp_path / "stock.py"
    script.write_text(STOCK_SCRIPT, encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    r = subprocess.run([sys.executable, str(script), str(path), str(tmp_path / "reference"), str(tmp_path / "logits.pt")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1]), torch.load(tmp_path / "logits.pt")


MLM_HEAD = sorted(["cls.predictions.bias", "cls.predictions.transform.LayerNorm.bias",
                   "cls.predictions.transform.LayerNorm.weight", "cls.predictions.transform.dense.bias",
                   "cls.predictions.transform.dense.weight"])


@pytest.mark.slow   # a fresh Python process per case, importing transformers
@pytest.mark.parametrize("kind", ["smedbert", "kebiolm"])
def test_stock_transformers_without_keplm_loads_the_export_like_any_bert_mlm_checkpoint(kind, tmp_path):
    full = build(kind)
    export_bert(save_checkpoint(full, tmp_path / "model"), tmp_path / "bert")
    out, logits = run_stock(tmp_path / "bert", tmp_path)

    # masked LM and fill-mask: a clean load, nothing unexpected and nothing missing
    for name in ("AutoModelForMaskedLM", "pipeline"):
        assert out[name]["unexpected"] == [] and out[name]["missing"] == [] and not out[name]["says_unexpected"], out
    assert out["AutoModelForMaskedLM"]["class"] == "BertForMaskedLM" and out["pipeline"]["top"]
    # AutoModel / token classification: none of the 44+ knowledge keys; only BERT's own MLM head is unused, as for
    # a BertForMaskedLM saved by transformers itself, and only the new head (or the pooler) is initialised
    for name, missing in (("AutoModel", ["pooler.dense.bias", "pooler.dense.weight"]),
                          ("AutoModelForTokenClassification", ["classifier.bias", "classifier.weight"])):
        assert out[name]["unexpected"] == MLM_HEAD and out[name]["missing"] == missing, out[name]
        assert {k: out[name][k] for k in ("unexpected", "missing")} == \
               {k: out[name + "@reference"][k] for k in ("unexpected", "missing")}
    assert out["AutoModel"]["class"] == "BertModel"
    assert out["AutoModelForTokenClassification"]["class"] == "BertForTokenClassification"

    # stock transformers computes the full keplm model's logits (no mention in the batch: no hook acts)
    enc = batch()
    with torch.no_grad():
        want = full(**enc, **no_knowledge(kind, enc)).mlm_logits
    real = enc["attention_mask"].bool()
    assert torch.allclose(logits[real], want[real], atol=1e-5)


@pytest.mark.slow   # a fresh Python process, importing transformers
def test_stock_transformers_loads_the_encoder_export_with_nothing_unexpected(tmp_path):
    export_bert(save_checkpoint(build("ernie"), tmp_path / "model"), tmp_path / "enc", fmt="bert-encoder")
    script = tmp_path / "enc.py"
    script.write_text(textwrap.dedent(r"""
        import json, logging, sys
        sys.modules["keplm"] = None
        import transformers
        from transformers import AutoModel, AutoModelForSequenceClassification, AutoModelForTokenClassification
        messages = []
        class Capture(logging.Handler):
            def emit(self, record):
                messages.append(record.getMessage())
        transformers.logging.get_logger("transformers").addHandler(Capture())
        for cls in (AutoModel, AutoModelForTokenClassification, AutoModelForSequenceClassification):
            cls.from_pretrained(sys.argv[1], num_labels=3)
        print(json.dumps(messages))
    """), encoding="utf-8")
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "enc")], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    messages = json.loads(r.stdout.strip().splitlines()[-1])
    assert messages and not any("UNEXPECTED" in m for m in messages), messages


# --------------------------------------------------------------------- fine-tuning: keplm vs a plain HF loop

def toy_ner() -> NerSet:
    ds = NerSet()
    for text, spans in SENTENCES:
        tags = ["O"] * len(text)
        for s, e, t in spans:
            tags[s:e] = ["B-" + t] + ["I-" + t] * (e - s - 1)
        ds.sentences.append(list(text))
        ds.labels.append(tags)
    return ds


def plain_hf_ner(path: Path, train: NerSet, dev: NerSet, *, seed: int, epochs: int, batch_size: int, lr: float,
                 head_lr: float, weight_decay: float, warmup: float, dropout: float, grad_clip: float) -> dict:
    """Token classification with stock transformers and torch only (no keplm code): AutoModel + dropout + a
    linear layer over the characters (keplm's ``fc`` head: Xavier weights, zero bias, dropout on the character
    positions only — AutoModelForTokenClassification's head is the same layer with another init and its dropout
    over every position, so it would not be the same run), AdamW with a head learning rate, linear warm-up and
    decay, clipping, a dev F1 (seqeval) after every epoch."""
    import math
    import random

    import numpy as np
    from seqeval.metrics import f1_score
    from transformers import AutoModel, AutoTokenizer, get_linear_schedule_with_warmup

    def seed_all():
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    seed_all()
    tok = AutoTokenizer.from_pretrained(str(path))
    encoder = AutoModel.from_pretrained(str(path))
    seed_all()                                   # what from_pretrained initialised (the pooler) drew from the RNG
    types = sorted({t[2:] for seq in train.labels for t in seq if t != "O"})
    labels = ["O"] + [f"{p}-{t}" for t in types for p in "BI"]
    drop = torch.nn.Dropout(dropout)
    classifier = torch.nn.Linear(encoder.config.hidden_size, len(labels))
    torch.nn.init.xavier_uniform_(classifier.weight)
    torch.nn.init.zeros_(classifier.bias)
    vocab = tok.get_vocab()

    def encode(ds):
        return [([tok.cls_token_id] + [vocab.get(c.lower(), tok.unk_token_id) for c in chars] + [tok.sep_token_id],
                 [labels.index(t) if t in labels else 0 for t in tags]) for chars, tags in zip(ds.sentences, ds.labels)]

    def collate(items):
        n = max(len(ids) for ids, _ in items)
        ids = torch.full((len(items), n), tok.pad_token_id)
        y = torch.zeros((len(items), n - 2), dtype=torch.long)
        for i, (a, b) in enumerate(items):
            ids[i, :len(a)], y[i, :len(b)] = torch.tensor(a), torch.tensor(b)
        att = (ids != tok.pad_token_id).long()
        att[:, 0] = 1
        return ids, att, torch.tensor([len(b) for _, b in items]), y

    def emissions(ids, att, lengths):
        h = encoder(input_ids=ids, attention_mask=att).last_hidden_state
        return classifier(drop(h[:, 1:int(lengths.max()) + 1]))

    def dev_f1():
        encoder.eval(), drop.eval()
        items, pred = encode(dev), []
        with torch.no_grad():
            for b in range(0, len(items), batch_size):
                ids, att, lengths, _ = collate(items[b:b + batch_size])
                best = emissions(ids, att, lengths).float().argmax(-1).tolist()
                pred += [[labels[j] for j in row[:n]] for row, n in zip(best, lengths.tolist())]
        return float(f1_score(dev.labels, pred, zero_division=0))

    items = encode(train)
    steps_per_epoch = math.ceil(len(items) / batch_size)
    total = steps_per_epoch * epochs
    no_decay = ("bias", "LayerNorm.weight", "LayerNorm.bias")
    named = list(encoder.named_parameters())
    opt = torch.optim.AdamW([
        {"params": list(classifier.parameters()), "lr": head_lr},
        {"params": [p for n, p in named if not n.endswith(no_decay)], "lr": lr, "weight_decay": weight_decay},
        {"params": [p for n, p in named if n.endswith(no_decay)], "lr": lr, "weight_decay": 0.0}], weight_decay=weight_decay)
    sched = get_linear_schedule_with_warmup(opt, int(warmup * total), total)
    params = list(encoder.parameters()) + list(classifier.parameters())
    rng, step, history = random.Random(seed), 0, []
    while step < total:
        order = list(range(len(items)))
        rng.shuffle(order)
        for b in range(0, len(order), batch_size):
            encoder.train(), drop.train()
            ids, att, lengths, y = collate([items[i] for i in order[b:b + batch_size]])
            em = emissions(ids, att, lengths)
            mask = torch.arange(em.size(1))[None] < lengths[:, None]
            loss = torch.nn.functional.cross_entropy(em[mask].float(), y[:, :em.size(1)][mask])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            sched.step()
            step += 1
            if step % steps_per_epoch == 0 or step == total:
                history.append({"step": step, "loss": float(loss.detach()), "dev": dev_f1()})
            if step >= total:
                break
    return {"dev_f1": max(h["dev"] for h in history), "history": history}


def test_fine_tuning_the_export_in_keplm_and_in_a_plain_hf_loop_gives_the_same_dev_f1(tmp_path):
    from keplm.models.downstream.finetune import FinetuneConfig, finetune_ner

    torch.set_num_threads(1)
    full = save_checkpoint(build("smedbert"), tmp_path / "model")
    export_bert(full, tmp_path / "bert")
    train = dev = toy_ner()
    cfg = FinetuneConfig(head="fc", epochs=8, batch_size=4, lr=3e-3, head_lr=3e-2, device="cpu")
    keplm_run = finetune_ner(tmp_path / "bert", train, dev, None, cfg, seed=3)
    plain = plain_hf_ner(tmp_path / "bert", train, dev, seed=3, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                         head_lr=cfg.head_lr, weight_decay=cfg.weight_decay, warmup=cfg.warmup, dropout=cfg.dropout,
                         grad_clip=cfg.grad_clip)
    assert [(h["step"], h["dev"]) for h in keplm_run["history"]] == [(h["step"], h["dev"]) for h in plain["history"]]
    assert [h["loss"] for h in keplm_run["history"]] == pytest.approx([h["loss"] for h in plain["history"]], rel=1e-5)
    assert keplm_run["dev_f1"] == plain["dev_f1"] > 0.5
    assert any(0.0 < h["dev"] < keplm_run["dev_f1"] for h in plain["history"])   # a learning curve, not a constant
    # and the full keplm checkpoint fine-tunes exactly as its export: downstream reads the trunk alone
    from_full = finetune_ner(full, train, dev, None, cfg, seed=3)
    assert [(h["step"], h["dev"]) for h in from_full["history"]] == [(h["step"], h["dev"]) for h in keplm_run["history"]]


# ----------------------------------------------------------------------------------------------- the cards

def card_header(text: str) -> dict:
    assert text.startswith("---\n")
    head, _, _ = text[4:].partition("\n---\n")
    return yaml.safe_load(head)


FACTS = {
    "language": "zh", "license": "other", "kind": "smedbert", "model_type": "smedbert", "source": "runs/x/model",
    "architectures": ["SMedBertForPreTraining"],
    "objectives": [{"name": "MLM", "what": "masked language modelling", "lambda": 1.0},
                   {"name": "SOP", "what": "sentence-order prediction", "lambda": 1.0},
                   {"name": "MNeM", "what": "masked neighbour modelling", "lambda": 2.0},
                   {"name": "MMeM", "what": "masked mention modelling", "lambda": 4.0}],
    "whole_entity_masking": None, "knowledge_modules": ["hybrid knowledge attention after encoder layer 10 of 12"],
    "backbone": {"layers": 12, "hidden": 768, "heads": 12, "intermediate": 3072, "vocab": 21128, "max_positions": 512,
                 "params": 112_000_000},
    "init": None, "exported_with": None,
    "export": {"format": "bert-mlm", "architecture": "BertForMaskedLM", "source": "runs/x/model", "parameters": 102_000_000,
               "dropped": {"kg": 5_000_000, "hybrid": 4_000_000, "bert.pooler": 590_592, "cls.seq_relationship": 1538}},
    "stages": [{"name": "prepare", "manifest_sha256": "a" * 64, "path": "runs/x/prepare", "status": "verified",
                "config": {"prepare": {"corpus": ["../shared/data/corpus"], "kg": "../shared/data/kg"}},
                "inputs": {"../shared/data/corpus/a.jsonl.gz": "c" * 64},
                "counts": {"documents_kept": 18491, "segments": 145512, "tokens": 13771324, "mentions": 472057}},
               {"name": "graph", "manifest_sha256": "b" * 64, "path": "runs/x/graph", "status": "verified",
                "counts": {"entities": 24874, "relations": 9, "triples_kept": 275621}}],
    "training": {"steps": 1000, "final": True, "workers": 8, "batch_size": 32, "grad_accum": 1, "effective_batch": 256,
                 "seq_len": 512, "samples": None, "tokens_seen": 131_072_000, "tokens_seen_how": "upper bound",
                 "lr": 5e-5, "final_losses": {"loss": 3.2, "mlm_loss": 2.1, "mnem_loss": 0.3}},
    "mlflow": {"run_id": "0123abcd", "tracking_uri": "sqlite:///runs/x/mlflow.db"},
    "command": "keplm pretrain --config configs/smedbert-base.yaml --output runs/x", "cwd": "/home/user/keplm",
    "evaluations": [],
}


def test_the_card_header_is_hugging_face_yaml_and_the_body_says_what_the_checkpoint_is():
    text = render_card(FACTS)
    header = card_header(text)
    assert header["language"] == "zh" and header["license"] == "other" and header["library_name"] == "transformers"
    assert header["pipeline_tag"] == "fill-mask" and {"keplm", "smedbert", "keplm-export"} <= set(header["tags"])
    for needle in ("| MNeM | 2 |", "| MMeM | 4 |", "| layers / hidden / heads | 12 / 768 / 12 |", "102,000,000",
                   "112,000,000", "`../shared/data/corpus`", "aaaaaaaaaaaaaaaa", "| verified |", "documents_kept 18,491",
                   "entities 24,874", "| steps | 1,000 |", "≤ 131,072,000 (upper bound", "| final mlm_loss | 2.1 |",
                   "`0123abcd`", "Not evaluated", "keplm pretrain --config configs/smedbert-base.yaml --output runs/x",
                   "cd /home/user/keplm", "hybrid knowledge attention after encoder layer 10", "SMedBERT KG tensors"):
        assert needle in text, needle
    full = render_card({**FACTS, "export": None})
    header = card_header(full)
    assert "pipeline_tag" not in header and "keplm-full-checkpoint" in header["tags"]
    assert "import keplm.models" in full and "What the export keeps" not in full
    counted = render_card({**FACTS, "training": {**FACTS["training"], "tokens_seen_how": "counted", "tokens_seen": 99}})
    assert "| tokens seen | 99 (counted" in counted
    bare = render_card({**FACTS, "stages": [], "training": None, "mlflow": None, "command": None, "export": None})
    assert bare.count("Not recorded") == 3 and card_header(bare)["library_name"] == "transformers"


def fake_pretrain(tmp_path: Path, kind: str = "smedbert") -> tuple[Path, dict]:
    """DIR/model of a tiny model and the manifests keplm pretrain leaves beside it (stages and its own)."""
    from keplm import config as keplm_config

    out = tmp_path / "run"
    save_checkpoint(build(kind), out / "model")
    write_manifest(out / "prepare", "prepare", 1, {"prepare": {"corpus": ["keplm://data/demo/corpus"], "kg": "keplm://data/demo/kg"}},
                   {"keplm/data/demo/corpus/demo_corpus.jsonl": "d" * 64},
                   {"documents_kept": 700, "segments": 4000, "tokens": 90000, "mentions": 5000, "kg": {"entities": 487}})
    write_manifest(out / "graph", "kg_build", 1, {}, {}, {"entities": 487, "relations": 9, "triples_kept": 727})
    cfg = keplm_config.load(None, [f"model.kind={kind}", "train.num_workers=2", "train.batch_size=4", "batches.max_seq_len=128"])
    manifest = {"job": "pretrain", "config": keplm_config.dump(cfg),
                "inputs": {"lineage.prepare": "manifest:" + sha256_file(out / "prepare" / "manifest.json"),
                           "lineage.graph": "manifest:" + sha256_file(out / "graph" / "manifest.json")},
                "counts": {"step": 12, "final": True, "loss": 7.5, "mlm_loss": 6.25, "mnem_loss": 0.5, "grad_norm/mlm_loss": 0.1,
                           "mlflow_run_id": "feedface", "tracking_uri": "sqlite:///x.db",
                           "model_dir": str(out / "model")},
                "stages": {"prepare": str(out / "prepare"), "graph": str(out / "graph")},
                "command": "keplm pretrain --config configs/demo.yaml --output run train.max_steps=12", "cwd": "/somewhere"}
    return out, manifest


def test_finish_pretrained_writes_both_checkpoints_with_cards_and_the_resolved_config(tmp_path):
    from keplm import config as keplm_config

    out, manifest = fake_pretrain(tmp_path)
    (out / "model-bert").mkdir()
    (out / "model-bert" / "stale").write_text("from an earlier model")
    bert = finish_pretrained(out, manifest, ExportConfig())
    assert bert == out / "model-bert" and not (bert / "stale").exists()
    for d, export in ((out / "model", False), (bert, True)):
        text = (d / CARD).read_text(encoding="utf-8")
        header = card_header(text)
        assert header["library_name"] == "transformers" and "smedbert" in header["tags"]
        assert ("pipeline_tag" in header) == export
        for needle in ("feedface", "keplm pretrain --config configs/demo.yaml", "| verified |", "`keplm://data/demo/corpus`",
                       "≤ 6,144 (upper bound", "| final mlm_loss | 6.25 |", "Not evaluated", "| MNeM | 2 |",
                       f"`{sha256_file(out / 'prepare' / 'manifest.json')}`"):
            assert needle in text, (d, needle)
        assert "grad_norm" not in text
        # the resolved config beside the card loads as a keplm config with the run's values
        cfg = keplm_config.load(d / CONFIG_FILE)
        assert cfg.model.kind == "smedbert" and cfg.train.batch_size == 4
    assert json.loads((bert / "config.json").read_text())["model_type"] == "bert"
    # a stage changed after the training: the card says so
    write_manifest(out / "graph", "kg_build", 1, {}, {}, {"entities": 488})
    assert "changed since training" in render_card(checkpoint_facts(out / "model", pretrain=manifest))
    # export.after_pretrain=false: only DIR/model, and no stale export beside it
    assert finish_pretrained(out, manifest, ExportConfig(after_pretrain=False)) is None and not bert.exists()
    assert (out / "model" / CARD).is_file()


def test_an_evaluation_beside_the_checkpoint_goes_into_the_card(tmp_path):
    out, manifest = fake_pretrain(tmp_path, "mlm")
    info = export_bert(out / "model", out / "model-bert")
    summary = {"cmeee": {"runs": 3, "test_f1_mean": 0.61234, "test_f1_std": 0.01, "dev_f1_mean": 0.6, "dev_f1_std": 0.02},
               "probe": {"runs": 1, "acc_at_1_mean": 0.25, "acc_at_1_std": 0.0}}
    weights = out / "model" / "model.safetensors"
    write_manifest(out / "eval", "evaluate", 1, {"evaluate": {"tasks": {"cmeee": {"kind": "ner"}, "probe": {"kind": "probe"}}}},
                   {str(weights): sha256_file(weights), str(out / "model" / "config.json"): "x"}, {"runs": 4}, summary=summary)
    write_manifest(out / "eval-other", "evaluate", 1, {}, {"elsewhere/model.safetensors": "0" * 64}, {"runs": 1},
                   summary={"other": {"runs": 1, "test_f1_mean": 0.99}})
    text = render_card(checkpoint_facts(out / "model", export=info, pretrain=manifest))
    assert "| cmeee | ner | 3 | 0.6123 ± 0.0100 |" in text and "| probe | probe | 1 |" in text and "0.2500 ± 0.0000" in text
    assert "0.99" not in text and "Not evaluated" not in text
    with pytest.raises(KeplmError, match="evaluated other weights"):
        checkpoint_facts(out / "model", pretrain=manifest, evaluations=[out / "eval-other"])


@pytest.mark.slow
def test_keplm_export_job_writes_the_export_and_its_card(tmp_path):
    out, manifest = fake_pretrain(tmp_path)
    # as a run with a relative --output leaves it: model_dir relative to the directory the job ran in
    manifest = {**manifest, "cwd": str(tmp_path), "counts": {**manifest["counts"], "model_dir": "run/model"}}
    (out / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "keplm.jobs.export", "--checkpoint", str(out / "model"), "--output",
                        str(tmp_path / "exported"), "--update-card", "export.license=apache-2.0"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["job"] == "export" and res["architecture"] == "BertForMaskedLM" and "kg" in res["dropped"]
    card = (tmp_path / "exported" / CARD).read_text(encoding="utf-8")
    assert card_header(card)["license"] == "apache-2.0" and "feedface" in card and "Exported with `keplm export" in card
    assert card_header((out / "model" / CARD).read_text(encoding="utf-8"))["license"] == "apache-2.0"
    bad = subprocess.run([sys.executable, "-m", "keplm.jobs.export", "--checkpoint", str(tmp_path / "none"), "--output",
                          str(tmp_path / "y")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "keplm export: error:" in bad.stderr and "no config.json" in bad.stderr
    # the export replaces its own earlier export, but never a directory keplm did not write, nor its checkpoint
    from keplm.jobs.export import main as export_main

    assert export_main(["--checkpoint", str(out / "model"), "--output", str(tmp_path / "exported")]) == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me", encoding="utf-8")
    assert export_main(["--checkpoint", str(out / "model"), "--output", str(mine)]) == 2
    assert (mine / "notes.txt").read_text(encoding="utf-8") == "keep me" and not (mine / "config.json").exists()
    assert export_main(["--checkpoint", str(out / "model"), "--output", str(out / "model")]) == 2
    assert (out / "model" / "config.json").is_file()


def test_write_card_without_a_pretrain_manifest_says_not_recorded(tmp_path):
    save_checkpoint(build("kebiolm"), tmp_path / "model")
    path = write_card(tmp_path / "model", checkpoint_facts(tmp_path / "model"))
    text = path.read_text(encoding="utf-8")
    assert card_header(text)["tags"][:2] == ["keplm", "kebiolm"] and "| ED | 1 |" in text and "| EL | 1 |" in text
    assert "entity detection, linking and fusion after encoder layer 1 of 3" in text
    assert re.search(r"\| parameters \| [\d,]+ \|", text)
