"""Search spaces and the ``sweep`` / ``ablate`` config sections.

A space maps a config key (dotted, e.g. ``batches.k``) or one of the papers' knob names to one
distribution::

    sweep:
      space:
        K: {choice: [5, 10, 20, 30]}          # SMedBERT Fig. 4  -> batches.k
        lambda1: {uniform: [0.5, 4]}          # SMedBERT eq. 22  -> model.lambda_mnem
        lambda2: {uniform: [1, 8]}            #                  -> model.lambda_mmem
        corruption_rate: {uniform: [0.075, 0.25]}  # EMBERT Table 5 -> batches.mask_rate
        lr: {loguniform: [1.0e-5, 1.0e-3]}    #                  -> train.lr

Only keys a trial can change without rebuilding a stage are allowed (``model.*``, ``batches.*``,
``train.*``, ``finetune.*``); K is a prefix of the stored top-``pepr.k_max`` neighbours, so it must not
exceed ``pepr.k_max``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from keplm.platform.config import Section, deep_merge

KNOBS = {"K": "batches.k", "lambda1": "model.lambda_mnem", "lambda2": "model.lambda_mmem",
         "corruption_rate": "batches.mask_rate", "lr": "train.lr"}
TRIAL_SECTIONS = ("model.", "batches.", "train.", "finetune.")


class ParamSpec(Section):
    choice: list[Any] | None = Field(None, description="one of these values")
    uniform: tuple[float, float] | None = Field(None, description="a float drawn uniformly from lo..hi")
    loguniform: tuple[float, float] | None = Field(None, description="a float drawn log-uniformly from lo..hi")
    randint: tuple[int, int] | None = Field(None, description="integers lo..hi inclusive")

    @model_validator(mode="after")
    def _one(self):
        set_ = [k for k in ("choice", "uniform", "loguniform", "randint") if getattr(self, k) is not None]
        if len(set_) != 1:
            raise ValueError("give exactly one of choice, uniform, loguniform, randint")
        for k in ("uniform", "loguniform", "randint"):
            v = getattr(self, k)
            if v is not None and not v[0] < v[1]:
                raise ValueError(f"{k}: low must be below high")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError("loguniform: bounds must be positive")
        if self.choice is not None and not self.choice:
            raise ValueError("choice: empty")
        return self

    def to_tune(self):
        from ray import tune

        if self.choice is not None:
            return tune.choice(self.choice)
        if self.uniform is not None:
            return tune.uniform(*self.uniform)
        if self.loguniform is not None:
            return tune.loguniform(*self.loguniform)
        return tune.randint(self.randint[0], self.randint[1] + 1)


def config_key(name: str) -> str:
    return KNOBS.get(name, name)


class SweepConfig(Section):
    space: dict[str, ParamSpec] = Field(default_factory=dict, description="config key or paper knob -> its "
                                        "distribution")
    objective: Literal["val_mlm_loss", "proxy_f1"] = Field(
        "val_mlm_loss", description="val_mlm_loss: MLM loss on train.val_rows held-out rows; proxy_f1: dev F1 "
                                    "of a short NER fine-tuning of the trial's model (sweep.proxy_task)")
    mode: Literal["min", "max"] | None = Field(None, description="unset: min for a loss, max for F1")
    proxy_task: str | None = Field(None, description="name of an ner task in evaluate.tasks")
    proxy_steps: int = Field(300, ge=1, description="proxy_f1: fine-tuning steps on the proxy task")
    proxy_dev_subset: int | None = Field(200, ge=1, description="proxy_f1: dev sentences scored")
    points_to_evaluate: list[dict[str, Any]] = Field(default_factory=list, description="trials to run first, "
                                                     "e.g. the paper's defaults; keys as in space")
    num_samples: int = Field(8, ge=1, description="trials drawn")
    max_concurrent: int = Field(2, ge=1, description="trials running at once")
    seed: int = Field(0, description="seed of the TPE sampler")
    scheduler: Literal["asha", "sha", "hyperband", "fifo"] = Field(
        "asha", description="asha: asynchronous successive halving; sha: synchronous (trials wait at each rung for "
                            "the whole population, so the cut does not depend on arrival order); hyperband; fifo")
    grace_period: int = Field(1, ge=1, description="reports (checkpoints) before ASHA/SHA may stop a trial")
    reduction_factor: int = Field(2, ge=2, description="ASHA/SHA: 1 in this many trials goes on at each rung")
    trial_workers: int = Field(1, ge=1, description="Ray Train workers per trial")
    cpus_per_worker: float = Field(0.9, gt=0, description="CPUs per Ray Train worker of a trial")
    train_in_trial: bool = Field(
        True, description="a 1-worker trial (trial_workers: 1, checkpoints on a local path) trains in its Tune trial's "
        "own process, which then holds the worker's CPUs/GPUs: the same loop, data and checkpoints, without starting a "
        "Ray Train controller and worker process per trial and per halving rung. false: every trial runs Ray Train")
    gpus_per_worker: float = Field(1.0, gt=0, description="GPUs per Ray Train worker of a trial (with a GPU)")
    max_failures: int = Field(
        1, ge=0, description="times Tune reruns a trial that raised or lost its node (Tune's FailureConfig); the "
        "rerun reuses the trial's MLflow run and resumes from the trial's latest checkpoint. A trial that fails for "
        "its own reasons (a batch too big for the data) fails again each time, and counts as one failed trial")

    @model_validator(mode="after")
    def _keys(self):
        for name in self.space:
            key = config_key(name)
            if not key.startswith(TRIAL_SECTIONS):
                raise ValueError(f"sweep.space.{name}: only model.*, batches.*, train.*, finetune.* keys (or the knobs "
                                 f"{sorted(KNOBS)}) can vary per trial; {key} would need its stage rebuilt")
        for point in self.points_to_evaluate:
            if set(point) != set(self.space):
                raise ValueError(f"sweep.points_to_evaluate: {sorted(point)} must name exactly the space's keys {sorted(self.space)}")
        if self.objective == "proxy_f1" and not self.proxy_task:
            raise ValueError("sweep.objective=proxy_f1 needs sweep.proxy_task (an ner task of evaluate.tasks)")
        return self

    @property
    def metric_mode(self) -> str:
        return self.mode or ("min" if self.objective.endswith("loss") else "max")


class AblateConfig(Section):
    seeds: int = Field(3, ge=1, description="runs per variant, with seeds 0..n-1 (train.seed and batches.seed)")
    variants: list[str] | None = Field(None, description="subset of the model's grid (default: all of it)")
    objective: Literal["val_mlm_loss", "proxy_f1"] = Field("val_mlm_loss", description="what Tune records per trial")
    evaluate: list[str] = Field(default_factory=list, description="names of evaluate.tasks run on every trial's final "
                                "model (the trial's seed), logged to its run as <task>.<metric>")
    report_dir: str | None = Field(None, description="write keplm compare's report of the ablation here when it ends "
                                   "(table, plots, command, config, git SHA, wall times)")
    report_metrics: list[str] | None = Field(None, description="the report's columns (default: the known ones present)")


# The variant that is not pretrained at all: the backbone as pretraining would start it, fine-tuned directly.
NOT_PRETRAINED = "none"

# The papers' ablation grids: variant -> config overrides.
ABLATION_GRIDS: dict[str, dict[str, dict[str, Any]]] = {
    "smedbert": {   # SMedBERT Table 4, plus the baselines it is compared with
        "full": {},
        "-type_att": {"model.use_type_attention": False},
        "-hybrid_att": {"model.use_hybrid_attention": False},
        "-know_loss": {"model.use_knowledge_loss": False},
        "mlm": {"model.kind": "mlm"},
        "whole_entity": {"model.kind": "wem"},
        "ernie": {"model.kind": "ernie"},
        "+embert_heads": {"model.objectives": ["cecp", "est", "bem"]},   # composition: EMBERT's heads on SMedBERT
        NOT_PRETRAINED: {"model.kind": "mlm"},
    },
    "kebiolm": {    # KeBioLM Tables 3-4
        "full": {},
        "-wem": {"batches.whole_entity_masking": False},
        "+rand": {"model.entity_init": "random"},
        "+frz": {"model.freeze_entities": True},
        "l0=4,l1=8": {"model.text_layers": 4},
        "l0=12,l1=0": {"model.text_layers": 12},
    },
    "embert": {     # EMBERT Table 4 and the corruption rates of Table 5 (batches.mask_rate, 15 % in "full")
        "full": {},
        "-consistency": {"model.objectives": ["est", "bem"]},
        "-bidirectional_mask": {"model.objectives": ["cecp", "est"]},
        "-segmentation": {"model.objectives": ["cecp", "bem"]},
        "-all": {"model.objectives": []},
        "corruption=7.5%": {"batches.mask_rate": 0.075},
        "corruption=25%": {"batches.mask_rate": 0.25},
    },
}


def nest(flat: dict[str, Any]) -> dict:
    """{'a.b': 1} -> {'a': {'b': 1}} (for merging into a config dump)."""
    out: dict = {}
    for key, value in flat.items():
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


merge = deep_merge
