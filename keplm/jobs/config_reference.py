"""The configuration reference as Markdown, generated from the pydantic sections of :mod:`keplm.config`.

The docs build (``docs/hooks.py``) puts :func:`config_reference_markdown` into the Configuration page, so the
reference lists what the code declares: per section, every key (dotted), its type, default, bounds (the
``ge``/``gt``/``le``/``lt`` of the field) and description. Nested sections (``prepare.vocab``) and sections
keyed by a name (``evaluate.tasks.<name>``, ``sweep.space.<key>``) get tables of their own.
"""

from __future__ import annotations

import json
import types
from collections.abc import Iterator
from typing import Any, Literal, NamedTuple, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from keplm.config import KeplmConfig
from keplm.platform.config import Section

# What each top-level section configures and which jobs read it. A section missing here is an error, so a
# new section cannot reach the docs without a sentence about it.
SECTION_INTROS: dict[str, str] = {
    "ray": "How a job reaches Ray: a cluster address, or the local Ray it starts. Every job that uses Ray reads it.",
    "tracking": "Where MLflow runs go. Read by pretrain, kg embed, evaluate, finetune, sweep, ablate and compare.",
    "prepare": "Corpus and KG inputs, cleaning, linking, tokenisation and sharding: `keplm prepare` and "
               "`keplm vocab`.",
    "graph": "How `keplm kg build` turns the KG directory into a graph.",
    "pepr": "PEPR scores and the top-K neighbours of each entity: `keplm kg neighbours`.",
    "embed": "TransR / TransE training with PyKEEN: `keplm kg embed`.",
    "model": "The pretrained model: its kind, the backbone's shape and each paper's knobs.",
    "batches": "The pretraining batches: masking, SOP pairs, mentions, neighbours and negatives.",
    "train": "Ray Train pretraining: workers, optimiser, schedule, checkpoints, data reading and run control.",
    "finetune": "Downstream fine-tuning: `keplm finetune`, `keplm evaluate` and the sweeps' proxy objective.",
    "evaluate": "`keplm evaluate`: the tasks, the seeds and the resources of each run.",
    "sweep": "`keplm sweep`: search space, objective, scheduler and trial resources (also used by `keplm ablate`).",
    "ablate": "`keplm ablate`: seeds, variants, the evaluation of each trial and the report.",
    "export": "The plain BERT export and the model cards: `keplm export`, and the `model-bert` `keplm pretrain` "
              "writes beside its model.",
}

_BOUNDS = (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"))


class FieldRow(NamedTuple):
    key: str
    type: str
    default: str
    bounds: str
    description: str


class SectionDoc(NamedTuple):
    key: str                     # dotted path; "<name>" stands for a user-chosen name
    description: str
    rows: list[FieldRow]


def type_name(ann: Any) -> str:
    """A type annotation as users read it: ``int | None``, ``"cg" | "power"``, ``list[str]``."""
    if ann is type(None):
        return "None"
    if ann is Any:
        return "Any"
    origin, args = get_origin(ann), get_args(ann)
    if origin is Literal:
        return " | ".join(json.dumps(a, ensure_ascii=False) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(type_name(a) for a in args)}]" if args else name
    return getattr(ann, "__name__", str(ann))


def _value(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, BaseModel):
        return "…"
    if isinstance(value, tuple):
        value = list(value)
    return f"`{json.dumps(value, ensure_ascii=False)}`"


def default_text(field: FieldInfo) -> str:
    if field.default_factory is not None:
        return _value(field.default_factory())
    if field.default is PydanticUndefined:
        return "required"
    return _value(field.default)


def bounds_text(field: FieldInfo) -> str:
    out = []
    for meta in field.metadata:
        for attr, sign in _BOUNDS:
            value = getattr(meta, attr, None)
            if value is not None:
                out.append(f"{sign} {value}")
    return ", ".join(out)


def _section_of(ann: Any) -> tuple[type[Section], str] | None:
    """(section class, key suffix) for a field holding a section, or a dict of sections keyed by a name."""
    if isinstance(ann, type) and issubclass(ann, Section):
        return ann, ""
    if get_origin(ann) is dict:
        value = get_args(ann)[1]
        if isinstance(value, type) and issubclass(value, Section):
            return value, ".<name>"
    return None


def section_docs(model: type[BaseModel] = KeplmConfig, prefix: str = "",
                 description: str = "") -> Iterator[SectionDoc]:
    """Each section (depth first, the parent before its nested sections) with its rows of plain keys."""
    rows: list[FieldRow] = []
    nested: list[tuple[str, type[Section], str]] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        sub = _section_of(field.annotation)
        if sub is not None:
            nested.append((key + sub[1], sub[0], field.description or (sub[0].__doc__ or "").strip()))
            if sub[1]:   # a dict of sections is also a key of its own
                rows.append(FieldRow(key, type_name(field.annotation), default_text(field), bounds_text(field),
                                     field.description or ""))
            continue
        rows.append(FieldRow(key, type_name(field.annotation), default_text(field), bounds_text(field),
                             field.description or ""))
    if prefix:
        yield SectionDoc(prefix.rstrip("."), description, rows)
    for key, cls, desc in nested:
        yield from section_docs(cls, key + ".", desc)


def top_level_sections() -> list[str]:
    return list(KeplmConfig.model_fields)


def _cell(text: str) -> str:
    """Description text safe in a Markdown table cell (no HTML, emphasis or links by accident)."""
    for ch in ("\\", "*", "_", "[", "]", "`"):
        text = text.replace(ch, "\\" + ch)
    return text.replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|").replace("\n", " ")


def _code(text: str) -> str:
    return f"`{text}`" if text else ""


def _anchor(key: str) -> str:
    return key.replace(".<name>", "-name").replace(".", "-")


def config_reference_markdown() -> str:
    """Markdown tables of every config section: key, type, default, bounds, description."""
    missing = [s for s in top_level_sections() if s not in SECTION_INTROS]
    if missing:
        raise ValueError(f"config_reference: no SECTION_INTROS entry for section(s) {', '.join(missing)}")
    lines: list[str] = []
    for doc in section_docs():
        top = "." not in doc.key
        heading = "##" if top else "###"
        intro = SECTION_INTROS[doc.key] if top else _cell(doc.description[:1].upper() + doc.description[1:])
        lines += [f"{heading} `{doc.key}` {{#{_anchor(doc.key)}}}", ""]
        if intro:
            lines += [intro, ""]
        if not doc.rows:
            continue
        lines += ["| key | type | default | bounds | description |", "| --- | --- | --- | --- | --- |"]
        for row in doc.rows:
            lines.append(f"| {_code(row.key)} | {_code(row.type)} | {row.default} | {row.bounds} | "
                         f"{_cell(row.description)} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    print(config_reference_markdown())


if __name__ == "__main__":
    main()
