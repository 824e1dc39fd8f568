"""Model cards: the ``README.md`` of every keplm checkpoint, full (``DIR/model``) or exported (``DIR/model-bert``).

The Hugging Face model-card format: a YAML header (language, license, library_name, tags, pipeline_tag for an
export), then what the checkpoint is — the model kind and its objectives with their λ, the backbone's size, the
corpus and KG it was pretrained on (paths, counts and the stage manifests' hashes), the steps and tokens seen,
the final losses, downstream / probe scores when a ``keplm evaluate`` output of it lies beside it, the MLflow run
and the command that reproduces it.

Two steps, so the rendering is testable on plain dicts: :func:`checkpoint_facts` reads the checkpoint, the
``keplm pretrain`` manifest beside it, the stage manifests it names and any evaluation into one JSON-able dict;
:func:`render_card` turns such a dict into the card's text.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import yaml

from keplm.models.export import MODULE_NAMES, export_bert, read_config, tensor_shapes, weight_files
from keplm.platform.manifest import MANIFEST, sha256_file

CARD = "README.md"
CONFIG_FILE = "pretrain-config.yaml"
KIND_TITLES = {
    "smedbert": "SMedBERT (Zhang et al., ACL 2021)",
    "kebiolm": "KeBioLM (Yuan et al., BioNLP 2021)",
    "embert": "EMBERT (Cai et al.): BERT with entity-level objectives",
    "ernie": "ERNIE-style entity fusion baseline",
    "mlm": "BERT baseline: continual pretraining with MLM + SOP",
    "wem": "BERT baseline with whole-entity masking (MC-BERT style)",
}
OBJECTIVES = {  # name, what, the config key of its λ (None: weight 1)
    "mlm": ("MLM", "masked language modelling", None),
    "sop": ("SOP", "sentence-order prediction", None),
    "mnem": ("MNeM", "masked neighbour modelling (SMedBERT §3.4.1)", "lambda_mnem"),
    "mmem": ("MMeM", "masked mention modelling (SMedBERT §3.4.2)", "lambda_mmem"),
    "ed": ("ED", "entity detection (KeBioLM eq. 9)", "lambda_ed"),
    "el": ("EL", "entity linking (KeBioLM eq. 10)", "lambda_el"),
    "cecp": ("CECP", "context-entity consistency prediction (EMBERT)", "lambda_cecp"),
    "est": ("EST", "entity segmentation (EMBERT)", "lambda_est"),
    "bem": ("BEM", "bidirectional entity masking (EMBERT)", "lambda_bem"),
}
STAGE_DIRS = {"prepare": ("prepare",), "graph": ("graph",), "neighbours": ("neighbours",),
              "embed": ("embed-transr", "embed-transe")}
EVAL_METRICS = ("test_f1", "dev_f1", "test_accuracy", "acc_at_1", "recall_at_5", "recall_at_5_type1",
                "recall_at_5_type2")


# ------------------------------------------------------------------------------------------------ reading

def kind_of(config: dict, pretrain_config: dict | None = None) -> str:
    """The keplm model kind: the pretraining config's ``model.kind``, else read from the model config."""
    if pretrain_config and pretrain_config.get("model", {}).get("kind"):
        return pretrain_config["model"]["kind"]
    model_type = config.get("model_type")
    if model_type == "keplm_bert":
        return "ernie" if config.get("entity_fusion") else ("embert" if config.get("entity_objectives") else "mlm")
    return model_type or "unknown"


def objectives_of(config: dict, sop: bool = True) -> list[dict]:
    """The pretraining objectives of a keplm model config, each with its weight λ in the total loss."""
    names = ["mlm"] + (["sop"] if sop else [])
    model_type = config.get("model_type")
    if model_type == "smedbert" and config.get("use_knowledge_loss", True):
        names += ["mnem", "mmem"]
    if model_type == "kebiolm":
        names += ["ed", "el"]
    names += [n for n in config.get("entity_objectives") or [] if n in OBJECTIVES]
    rows = []
    for n in names:
        label, what, key = OBJECTIVES[n]
        rows.append({"name": label, "what": what, "lambda": float(config.get(key, 1.0)) if key else 1.0})
    return rows


def knowledge_modules_of(config: dict) -> list[str]:
    """Where a model's knowledge modules act on the trunk (the hooks of ``run_bert``)."""
    layers = int(config.get("num_hidden_layers", 0))
    model_type, out = config.get("model_type"), []
    if model_type == "smedbert" and config.get("use_hybrid_attention", True):
        out.append(f"hybrid knowledge attention on the linked mentions after encoder layer "
                   f"{min(int(config.get('hybrid_layer', 10)), layers)} of {layers}")
    if model_type == "kebiolm":
        l0 = int(config.get("text_layers", 8))
        out.append(f"entity detection, linking and fusion after encoder layer {l0} of {layers}; the {layers - l0} "
                   "layers after it are KeBioLM's text-entity fusion layers, ordinary encoder layers of the trunk")
    if config.get("entity_fusion"):
        out.append(f"ERNIE-style entity fusion on the linked mentions after encoder layer "
                   f"{min(int(config.get('fusion_layer', 10)), layers)} of {layers}")
    return out


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def pretrain_manifest_of(model_dir: str | Path) -> dict | None:
    """The ``keplm pretrain`` manifest whose model is ``model_dir`` (DIR/manifest.json for DIR/model)."""
    model_dir = Path(model_dir).resolve()
    doc = _read_json(model_dir.parent / MANIFEST)
    if not doc or doc.get("job") != "pretrain":
        return None
    named = (doc.get("counts") or {}).get("model_dir")
    if named:   # as the job wrote it: relative to the directory it ran in
        named = Path(named) if Path(named).is_absolute() else Path(doc.get("cwd") or ".") / named
        if named.resolve() != model_dir:
            return None
    return doc


def stage_facts(pretrain: dict, base: Path) -> list[dict]:
    """Each stage the training read (the manifest's lineage): its path, manifest hash, job, config and counts.
    A stage directory whose manifest no longer has the lineage's hash is reported as changed."""
    paths = pretrain.get("stages") or {}
    rows = []
    for key, value in (pretrain.get("inputs") or {}).items():
        if not key.startswith("lineage.") or not str(value).startswith("manifest:"):
            continue
        name, want = key.removeprefix("lineage."), str(value).removeprefix("manifest:")
        candidates = [Path(paths[name])] if paths.get(name) else [base / d for d in STAGE_DIRS.get(name, (name,))]
        row: dict[str, Any] = {"name": name, "manifest_sha256": want, "path": None, "status": "not found"}
        for c in candidates:
            if not (c / MANIFEST).is_file():
                continue
            doc = _read_json(c / MANIFEST) or {}
            row.update(path=str(c), job=doc.get("job"), counts=doc.get("counts") or {}, config=doc.get("config") or {},
                       inputs=doc.get("inputs") or {})
            if sha256_file(c / MANIFEST) == want:
                row["status"] = "verified"
                break
            row["status"] = "changed since training"
        rows.append(row)
    return rows


def _weights_sha(model_dir: Path) -> str | None:
    try:
        return sha256_file(weight_files(model_dir)[0])
    except Exception:  # noqa: BLE001 - no weights: nothing to match
        return None


def evaluation_facts(model_dirs: list[Path], explicit: list[Path] = ()) -> list[dict]:
    """``keplm evaluate`` outputs of any of ``model_dirs`` (matched by the weights' sha256 in their manifest's
    inputs): the ones given, and those beside the checkpoints (siblings with an evaluate manifest)."""
    shas: dict[str, Path] | None = None   # hashed once, and only when an evaluate output is found
    seen, out = set(), []
    candidates = list(explicit) + [c for d in model_dirs if d.resolve().parent.is_dir()
                                   for c in sorted(d.resolve().parent.iterdir()) if c.is_dir()]
    for c in candidates:
        if c.resolve() in seen or not (c / MANIFEST).is_file():
            continue
        seen.add(c.resolve())
        doc = _read_json(c / MANIFEST) or {}
        if doc.get("job") != "evaluate":
            continue
        if shas is None:
            shas = {sha: d for d in model_dirs if (sha := _weights_sha(d))}
        which = next((shas[v] for k, v in (doc.get("inputs") or {}).items()
                      if k.endswith(".safetensors") and v in shas), None)
        if which is None:
            if c in explicit:
                from keplm.platform.errors import KeplmError

                raise KeplmError(f"{c}: evaluated other weights than {', '.join(map(str, model_dirs))}")
            continue
        summary = doc.get("summary") or _read_json(c / "summary.json") or {}
        tasks = ((doc.get("config") or {}).get("evaluate") or {}).get("tasks") or {}
        rows = []
        for task, row in summary.items():
            metrics = {m: [row[f"{m}_mean"], row.get(f"{m}_std", 0.0)] for m in EVAL_METRICS if f"{m}_mean" in row}
            rows.append({"task": task, "kind": (tasks.get(task) or {}).get("kind"), "runs": row.get("runs"),
                         "metrics": metrics})
        out.append({"path": str(c), "checkpoint": str(which), "tasks": rows,
                    "mlflow_parent_run": doc.get("pretrain_run")})
    return out


def training_facts(pretrain: dict, config: dict) -> dict:
    cfg, counts = pretrain.get("config") or {}, pretrain.get("counts") or {}
    train, batches = cfg.get("train") or {}, cfg.get("batches") or {}
    steps = counts.get("step")
    workers, batch, accum = train.get("num_workers"), train.get("batch_size"), train.get("grad_accum", 1)
    effective = workers * batch * accum if None not in (workers, batch, accum) else None
    max_pos = config.get("max_position_embeddings")
    seq = min(x for x in (batches.get("max_seq_len"), max_pos) if x) if (batches.get("max_seq_len") or max_pos) else None
    if isinstance(counts.get("data.tokens"), (int, float)):
        tokens, how = int(counts["data.tokens"]), "counted"
    elif None not in (steps, effective, seq):
        tokens, how = int(steps * effective * seq), "upper bound"
    else:
        tokens, how = None, None
    losses = {k: float(v) for k, v in counts.items() if k.endswith("loss") and "/" not in k   # not grad_norm/<term>
              and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    return {"steps": steps, "final": counts.get("final"), "workers": workers, "batch_size": batch,
            "grad_accum": accum, "effective_batch": effective, "seq_len": seq, "samples": counts.get("data.samples"),
            "tokens_seen": tokens, "tokens_seen_how": how, "lr": train.get("lr"), "final_losses": losses,
            "mlflow_run_id": counts.get("mlflow_run_id"), "tracking_uri": counts.get("tracking_uri"),
            "finished": pretrain.get("created")}


def checkpoint_facts(model_dir: str | Path, *, export: dict | None = None, pretrain: dict | None = None,
                     evaluations: list[str | Path] = (), language: str = "zh", license: str = "other",
                     exported_with: str | None = None, bert_export: str | Path | None = None) -> dict:
    """Everything the card of ``model_dir`` (a full keplm checkpoint) says, as plain data. ``export``: the result
    of :func:`keplm.models.export.export_bert` when the card is the export's; ``bert_export``: where the full
    checkpoint's export is. ``pretrain``: the pretrain manifest (default: the one beside ``model_dir``)."""
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    shapes = tensor_shapes(model_dir)
    pretrain = pretrain if pretrain is not None else pretrain_manifest_of(model_dir)
    cfg = (pretrain or {}).get("config") or {}
    sop = (cfg.get("batches") or {}).get("sop", True)
    facts: dict[str, Any] = {
        "language": language, "license": license,
        "kind": kind_of(config, cfg), "model_type": config.get("model_type"), "source": str(model_dir),
        "architectures": config.get("architectures") or [],
        "objectives": objectives_of(config, sop),
        "whole_entity_masking": (cfg.get("batches") or {}).get("whole_entity_masking"),
        "knowledge_modules": knowledge_modules_of(config),
        "backbone": {"layers": config.get("num_hidden_layers"), "hidden": config.get("hidden_size"),
                     "heads": config.get("num_attention_heads"), "intermediate": config.get("intermediate_size"),
                     "vocab": config.get("vocab_size"), "max_positions": config.get("max_position_embeddings"),
                     "params": sum(math.prod(s) for s in shapes.values())},
        "init": (cfg.get("model") or {}).get("init"),
        "export": export, "exported_with": exported_with, "bert_export": str(bert_export) if bert_export else None,
        "stages": [], "training": None, "mlflow": None, "command": None, "cwd": None,
    }
    if pretrain:
        base = model_dir.resolve().parent
        facts["stages"] = stage_facts(pretrain, base)
        facts["training"] = training_facts(pretrain, config)
        counts = pretrain.get("counts") or {}
        facts["mlflow"] = {"run_id": counts.get("mlflow_run_id"), "tracking_uri": counts.get("tracking_uri")}
        facts["command"], facts["cwd"] = pretrain.get("command"), pretrain.get("cwd")
        facts["output"] = str(base)
    dirs = [model_dir] + ([Path(export["output"])] if export else [])
    facts["evaluations"] = evaluation_facts(dirs, [Path(e) for e in evaluations])
    return facts


def write_card(directory: str | Path, facts: dict, config_dump: dict | None = None) -> Path:
    """README.md (and, with ``config_dump``, the resolved pretraining config it cites) into ``directory``."""
    d = Path(directory)
    if config_dump is not None:
        (d / CONFIG_FILE).write_text(yaml.safe_dump(config_dump, allow_unicode=True, sort_keys=False), encoding="utf-8")
        facts = {**facts, "config_file": CONFIG_FILE}
    path = d / CARD
    path.write_text(render_card(facts), encoding="utf-8")
    return path


def finish_pretrained(out: str | Path, manifest: dict, settings) -> Path | None:
    """After ``keplm pretrain`` wrote ``DIR/model``: its card and, with ``settings.after_pretrain`` (the export
    section), the plain BERT export ``DIR/model-bert`` with its own card. ``manifest``: the pretrain manifest's
    content (config, inputs, counts, stages, command, cwd). An earlier ``model-bert`` is removed first, so none
    is left beside a model it was not exported from. -> the export's directory, or None."""
    out = Path(out)
    model, bert = out / "model", out / "model-bert"
    shutil.rmtree(bert, ignore_errors=True)
    card = {"pretrain": manifest, "language": settings.language, "license": settings.license}
    config = manifest.get("config")
    if settings.after_pretrain:
        info = export_bert(model, bert, settings.format)
        write_card(bert, checkpoint_facts(model, export=info, exported_with="keplm pretrain (export.after_pretrain)",
                                          **card), config)
    write_card(model, checkpoint_facts(model, bert_export=bert if settings.after_pretrain else None, **card), config)
    return bert if settings.after_pretrain else None


# ------------------------------------------------------------------------------------------------ rendering

def _n(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def _code(text) -> str:
    return f"`{text}`" if text not in (None, "") else "—"


def card_header(facts: dict) -> dict:
    """The card's YAML header (Hugging Face model-card metadata)."""
    export = facts.get("export")
    tags = ["keplm", facts.get("kind") or "unknown", "bert", "medical", "knowledge-enhanced"]
    header: dict[str, Any] = {"language": facts.get("language") or "zh", "license": facts.get("license") or "other",
                              "library_name": "transformers"}
    if export:
        header["pipeline_tag"] = "fill-mask" if export["format"] == "bert-mlm" else "feature-extraction"
        tags.append("keplm-export")
    else:
        tags.append("keplm-full-checkpoint")
    header["tags"] = list(dict.fromkeys(tags))
    return header


def render_card(facts: dict) -> str:
    """The model card (Markdown with a YAML header) from :func:`checkpoint_facts`' dict."""
    export, kind = facts.get("export"), facts.get("kind") or "unknown"
    title = KIND_TITLES.get(kind, kind)
    lines = ["---", yaml.safe_dump(card_header(facts), allow_unicode=True, sort_keys=False).rstrip(), "---", ""]
    if export:
        lines += [f"# keplm {kind}: plain BERT export ({export['architecture']})", "",
                  f"{title}, pretrained with keplm and exported as a plain `bert` checkpoint "
                  f"(`{export['architecture']}`) that stock Hugging Face transformers loads without keplm. "
                  f"The full keplm checkpoint it comes from is `{export['source']}`.", ""]
    else:
        bert = facts.get("bert_export")
        lines += [f"# keplm {kind}: full checkpoint (model_type `{facts.get('model_type')}`)", "",
                  f"{title}, pretrained with keplm: the BERT trunk, its MLM and SOP heads and the knowledge modules. "
                  "Loading it needs keplm (it registers the model type with transformers' Auto classes). "
                  + (f"Its plain BERT export, for stock transformers without keplm, is `{bert}`." if bert else
                     "`keplm export` writes a plain BERT copy that stock transformers loads without keplm."), ""]
    lines += _usage(facts) + _export_section(facts) + _model_section(facts) + _data_section(facts)
    lines += _training_section(facts) + _evaluation_section(facts) + _reproduce_section(facts)
    return "\n".join(lines).rstrip() + "\n"


def _usage(facts: dict) -> list[str]:
    export = facts.get("export")
    out = ["## Use", "", "```python"]
    if export and export["format"] == "bert-mlm":
        out += ["from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline", "",
                'fill = pipeline("fill-mask", model="PATH/TO/THIS/DIR")',
                'model = AutoModelForMaskedLM.from_pretrained("PATH/TO/THIS/DIR")']
    elif export:
        out += ["from transformers import AutoModel, AutoTokenizer", "",
                'model = AutoModel.from_pretrained("PATH/TO/THIS/DIR")']
    else:
        out += ["import keplm.models  # registers smedbert / keplm_bert / kebiolm with the Auto classes",
                "from transformers import AutoModelForPreTraining", "",
                'model = AutoModelForPreTraining.from_pretrained("PATH/TO/THIS/DIR")']
    out += ['tokenizer = AutoTokenizer.from_pretrained("PATH/TO/THIS/DIR")' if export else
            'model.bert  # the BERT trunk; keplm finetune / evaluate fine-tune it', "```", ""]
    if export:
        out += ["For a downstream task, `AutoModelForTokenClassification` / `AutoModelForSequenceClassification` "
                "start from this trunk with a new head"
                + (" (they report the MLM head as unused, as for any BERT masked-LM checkpoint; "
                   "`keplm export --as bert-encoder` writes the trunk alone)." if export["format"] == "bert-mlm" else ".")
                + " `keplm finetune --checkpoint PATH/TO/THIS/DIR` takes it as well.", ""]
    return out


def _export_section(facts: dict) -> list[str]:
    export = facts.get("export")
    if not export:
        return []
    kept = "the BERT trunk (`bert.*`: embeddings and every encoder layer)"
    if export["format"] == "bert-mlm":
        kept += " and the MLM head (`cls.predictions.*`, tied to the word embeddings)"
    out = ["## What the export keeps and drops", "", f"Kept: {kept}, {_n(export.get('parameters'))} parameters.", ""]
    dropped = export.get("dropped") or {}
    if dropped:
        out += ["| dropped | parameters |", "| --- | --- |"]
        out += [f"| {MODULE_NAMES.get(m, m)} (`{m}`) | {_n(n)} |" for m, n in sorted(dropped.items())]
        out.append("")
    modules = facts.get("knowledge_modules") or []
    if modules:
        out += ["The full model inserts computation between encoder layers: " + "; ".join(modules) + ". "
                "This export runs the same layers without it. It reads text exactly as the full model's trunk does, "
                "and where no knowledge module acts (no linked mention in the input: every downstream use, which "
                "runs the trunk alone) its hidden states and MLM logits are the full model's. Where a module acted "
                "during pretraining, the full model's hidden states after that layer differ from this export's.", ""]
    else:
        out += ["This model kind inserts nothing between encoder layers: the export computes what the full model's "
                "trunk and MLM head compute.", ""]
    if facts.get("exported_with"):
        out += [f"Exported with `{facts['exported_with']}`.", ""]
    return out


def _model_section(facts: dict) -> list[str]:
    b, export = facts.get("backbone") or {}, facts.get("export")
    out = ["## Model", "", "| | |", "| --- | --- |",
           f"| kind | `{facts.get('kind')}`: {KIND_TITLES.get(facts.get('kind'), facts.get('kind'))} |",
           f"| architecture | {export['architecture'] + ' (model_type `bert`)' if export else ', '.join(facts.get('architectures') or []) + ' (model_type `' + str(facts.get('model_type')) + '`)'} |",
           f"| layers / hidden / heads | {_n(b.get('layers'))} / {_n(b.get('hidden'))} / {_n(b.get('heads'))} |",
           f"| feed-forward size | {_n(b.get('intermediate'))} |",
           f"| vocabulary | {_n(b.get('vocab'))} |",
           f"| max positions | {_n(b.get('max_positions'))} |"]
    if export:
        out.append(f"| parameters | {_n(export.get('parameters'))} (the full keplm checkpoint: {_n(b.get('params'))}) |")
    else:
        out.append(f"| parameters | {_n(b.get('params'))} |")
    out.append(f"| backbone init | {_code(facts.get('init')) if facts.get('init') else 'random'} |")
    if facts.get("whole_entity_masking") is not None:
        out.append(f"| whole-entity masking | {_n(facts['whole_entity_masking'])} |")
    out += ["", "Pretraining objectives (total loss = Σ λ · loss):", "", "| objective | λ | what |", "| --- | --- | --- |"]
    out += [f"| {o['name']} | {_n(o['lambda'])} | {o['what']} |" for o in facts.get("objectives") or []]
    out.append("")
    if facts.get("knowledge_modules") and not export:
        out += ["Knowledge modules: " + "; ".join(facts["knowledge_modules"]) + ".", ""]
    return out


def _stage_line(row: dict) -> str:
    counts = row.get("counts") or {}
    keys = {"prepare": ("documents_kept", "segments", "tokens", "mentions", "entities_linked"),
            "graph": ("entities", "relations", "edges", "triples_kept", "aliases"),
            "neighbours": ("seeds", "rows"),
            "embed": ("entities", "relations", "dim", "epochs", "final_loss", "mrr", "hits_at_10")}.get(row["name"], ())
    shown = ", ".join(f"{k} {_n(counts[k])}" for k in keys if isinstance(counts.get(k), (int, float)))
    return (f"| {row['name']} | {_code(row.get('path'))} | `{row['manifest_sha256']}` | {row['status']} | "
            f"{shown or '—'} |")


def _data_section(facts: dict) -> list[str]:
    stages = facts.get("stages") or []
    out = ["## Pretraining data", ""]
    if not stages:
        return out + ["Not recorded: no `keplm pretrain` manifest beside the checkpoint.", ""]
    by = {r["name"]: r for r in stages}
    prep = by.get("prepare") or {}
    pcfg = (prep.get("config") or {}).get("prepare") or {}
    inputs = prep.get("inputs") or {}
    corpus = pcfg.get("corpus") or []
    out += ["Corpus: " + (", ".join(f"`{c}`" for c in corpus) or "—") + f"; KG: {_code(pcfg.get('kg'))}.", ""]
    if inputs:
        out += ["| input file | sha256 |", "| --- | --- |"]
        items = sorted(inputs.items())
        out += [f"| `{k}` | `{v}` |" for k, v in items[:20]]
        if len(items) > 20:
            out.append(f"| … {len(items) - 20} more | |")
        out.append("")
    kg = {k: v for k, v in ((prep.get("counts") or {}).get("kg") or {}).items()
          if k in ("entities", "aliases", "linker_surfaces") and isinstance(v, (int, float))}
    if kg:
        out += ["KG as the linker read it: " + ", ".join(f"{k} {_n(v)}" for k, v in kg.items()) + ".", ""]
    out += ["Stages (their `manifest.json`, hashed; `verified`: the directory still holds what the training read):", "",
            "| stage | path | manifest sha256 | status | counts |", "| --- | --- | --- | --- | --- |"]
    out += [_stage_line(r) for r in stages]
    out.append("")
    return out


def _training_section(facts: dict) -> list[str]:
    t, mlflow = facts.get("training"), facts.get("mlflow") or {}
    out = ["## Training", ""]
    if not t:
        return out + ["Not recorded: no `keplm pretrain` manifest beside the checkpoint.", ""]
    batch = (f"{_n(t['effective_batch'])} sequences ({_n(t['workers'])} workers × {_n(t['batch_size'])} × "
             f"{_n(t['grad_accum'])} accumulation)" if t.get("effective_batch") else "—")
    if t.get("tokens_seen_how") == "counted":
        tokens = f"{_n(t['tokens_seen'])} (counted: the non-padding tokens of the batches trained on)"
    elif t.get("tokens_seen_how") == "upper bound":
        tokens = (f"≤ {_n(t['tokens_seen'])} (upper bound: steps × batch × sequence length; the run did not count "
                  "its tokens)")
    else:
        tokens = "—"
    out += ["| | |", "| --- | --- |", f"| steps | {_n(t.get('steps'))}{'' if t.get('final') is not False else ' (not finished)'} |",
            f"| batch | {batch} |", f"| sequence length | ≤ {_n(t.get('seq_len'))} tokens |",
            f"| sequences seen | {_n(t.get('samples'))} |", f"| tokens seen | {tokens} |",
            f"| peak learning rate | {_n(t.get('lr'))} |"]
    for k, v in sorted((t.get("final_losses") or {}).items()):
        out.append(f"| final {k} | {_n(v)} |")
    out.append(f"| MLflow run | {_code(mlflow.get('run_id'))} in {_code(mlflow.get('tracking_uri'))} |")
    out.append("")
    return out


def _evaluation_section(facts: dict) -> list[str]:
    evals = facts.get("evaluations") or []
    out = ["## Evaluation", ""]
    if not evals:
        return out + ["Not evaluated: no `keplm evaluate` output of this checkpoint beside it. After "
                      "`keplm evaluate --checkpoint DIR/model --output DIR/eval`, `keplm export --checkpoint DIR/model "
                      "--output DIR/model-bert --update-card` writes the scores into both cards.", ""]
    for e in evals:
        out += [f"`{e['path']}` (weights of `{e['checkpoint']}`; mean ± std over seeds):", "",
                "| task | kind | runs | " + " | ".join(EVAL_METRICS) + " |", "| --- " * (3 + len(EVAL_METRICS)) + "|"]
        for r in e["tasks"]:
            cells = [f"{m[0]:.4f} ± {m[1]:.4f}" if (m := r["metrics"].get(k)) else "" for k in EVAL_METRICS]
            out.append(f"| {r['task']} | {r.get('kind') or ''} | {_n(r.get('runs'))} | " + " | ".join(cells) + " |")
        out.append("")
    if facts.get("export"):
        out += ["NER, similarity and probe runs read the trunk and the MLM head, which this export holds unchanged; "
                "sentence-pair classifiers read the pooler, which it drops.", ""]
    return out


def _reproduce_section(facts: dict) -> list[str]:
    out = ["## Reproduce", ""]
    if not facts.get("command") and not facts.get("config_file"):
        return out + ["Not recorded.", ""]
    out += ["```bash"]
    if facts.get("cwd"):
        out.append(f"cd {facts['cwd']}")
    if facts.get("command"):
        out.append(facts["command"])
    out += ["```", ""]
    if facts.get("config_file"):
        out += [f"`{facts['config_file']}` beside this card is the run's resolved configuration, every key: "
                f"`--config {facts['config_file']}` in place of the command's `--config` and overrides reruns it "
                "with the same values whatever keplm's defaults become.", ""]
    return out
