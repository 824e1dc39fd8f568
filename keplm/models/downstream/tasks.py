"""Evaluation tasks declared in config (``evaluate.tasks``) and the one function that runs one of them.

A task is ``kind: ner | pair | similarity | probe`` with its files. ``run_task(model_dir, spec, finetune_cfg,
seed)`` is plain Python (no Ray, no MLflow): ``keplm evaluate`` fans it out over tasks x seeds as Ray
tasks and logs the results, and the sweeps call it (or :func:`proxy_dev_f1`) as an objective.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from keplm.models.downstream.finetune import FinetuneConfig, finetune_ner, finetune_pairs
from keplm.platform.config import Section, resolve_path
from keplm.platform.errors import KeplmError


class TaskSpec(Section):
    kind: Literal["ner", "pair", "similarity", "probe"] = Field(
        description="ner / pair: fine-tuned and scored; similarity (synonym retrieval) and probe (KG cloze "
                    "knowledge probing, KeBioLM §4.6): the checkpoint as is, no training")
    train: str | None = Field(None, description="ner, pair: training file")
    dev: str | None = Field(None, description="ner, pair: dev file (model selection)")
    test: str | None = Field(None, description="ner, pair: test file; the best dev state is scored on it")
    augmented_train: str | None = Field(None, description="train on this (keplm augment output) instead of train")
    format: Literal["conll", "tsv", "spans"] | None = Field(None, description="NER file format; unset: from the suffix")
    kg: str | None = Field(None, description="similarity: KG directory with entities.tsv and aliases.tsv; "
                                             "probe: KG directory with entities.tsv and triples.tsv")
    max_queries: int | None = Field(None, ge=1, description="similarity: evaluate a random sample of queries")
    max_queries_per_relation: int = Field(200, ge=1, description="probe: at most this many cloze queries "
                                                                "(Q1 and Q2 together) sampled per relation")
    beam_size: int = Field(5, ge=1, description="probe: beam width B of the multi-[MASK] decoding")
    max_answer_tokens: int = Field(10, ge=1, description="probe: answer lengths 1..this many [MASK] tokens")
    templates: dict[str, str] = Field(default_factory=dict, description="probe: relation -> template with {s} "
                                      "and {o} (and optionally {r}), added to / replacing the built-in ones")
    finetune: dict = Field(default_factory=dict, description="per-task overrides of the finetune section")

    @field_validator("templates")
    @classmethod
    def _templates(cls, v: dict[str, str]) -> dict[str, str]:
        from keplm.models.downstream.probe import check_template

        return {r: check_template(t) for r, t in v.items()}

    @model_validator(mode="after")
    def _files(self):
        need = ("kg",) if self.kind in ("similarity", "probe") else ("train", "dev")
        missing = [k for k in need if not getattr(self, k)]
        if missing:
            raise ValueError(f"a {self.kind} task needs {', '.join(missing)}")
        FinetuneConfig(**self.finetune)   # unknown keys fail at load time
        return self


class EvaluateConfig(Section):
    tasks: dict[str, TaskSpec] = Field(default_factory=dict, description="the evaluation tasks by name")
    seeds: int = Field(1, ge=1, description="runs per task with seeds 0..n-1; mean ± std reported")
    cpus_per_run: float = Field(1.0, gt=0, description="CPUs of each (task, seed) Ray task (also its threads)")
    gpus_per_run: float = Field(0.0, ge=0, description="GPUs of each (task, seed) Ray task")


def task_config(spec: TaskSpec, base: FinetuneConfig) -> FinetuneConfig:
    return FinetuneConfig(**{**base.model_dump(), **spec.finetune})


def run_task(model_dir: str, spec: TaskSpec, cfg: FinetuneConfig, seed: int) -> dict:
    """One task, one seed -> a JSON-able result dict (metrics, counts, per-eval history)."""
    from keplm.models.downstream.data import read_ner, read_pairs

    def p(x):
        return resolve_path(x) if x else None

    if spec.kind == "similarity":
        from keplm.models.downstream.similarity import evaluate_similarity

        return evaluate_similarity(model_dir, p(spec.kg), seed=seed, max_queries=spec.max_queries)
    if spec.kind == "probe":
        from keplm.models.downstream.probe import evaluate_probe

        return evaluate_probe(model_dir, p(spec.kg), seed=seed, max_queries_per_relation=spec.max_queries_per_relation,
                              beam_size=spec.beam_size, max_answer_tokens=spec.max_answer_tokens,
                              templates=spec.templates)
    cfg = task_config(spec, cfg)
    train_path = p(spec.augmented_train or spec.train)
    if spec.kind == "ner":
        train = read_ner(train_path, "conll" if spec.augmented_train else spec.format)
        dev = read_ner(p(spec.dev), spec.format)
        test = read_ner(p(spec.test), spec.format) if spec.test else None
    else:
        train, dev = read_pairs(train_path), read_pairs(p(spec.dev))
        test = read_pairs(p(spec.test)) if spec.test else None
    for path, ds in ((train_path, train), (spec.dev, dev), (spec.test, test)):
        if ds is not None and not len(ds):
            raise KeplmError(f"{path}: no usable examples ({dict(ds.counts)})")
    fn = finetune_ner if spec.kind == "ner" else finetune_pairs
    result = fn(model_dir, train, dev, test, cfg, seed)
    result["counts"] = {f"{name}.{k}": v for name, ds in (("train", train), ("dev", dev), ("test", test))
                        if ds is not None for k, v in ds.counts.items()}
    return result
