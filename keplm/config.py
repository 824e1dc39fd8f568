"""The root config tree: one section per job/layer, each declared by the layer that owns it.

Loaded with :func:`load` from YAML plus ``section.key=value`` overrides; unknown keys and bad values
fail at load time with one line naming the dotted key. Every job reads its own section(s).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from keplm.kg.embed import EmbedConfig
from keplm.kg.graph import GraphConfig
from keplm.kg.pepr import PEPRConfig
from keplm.kg.prepare import PrepareConfig
from keplm.models.export import ExportConfig
from keplm.models.downstream.finetune import FinetuneConfig
from keplm.models.downstream.tasks import EvaluateConfig
from keplm.models.setup import BatchConfig, ModelConfig
from keplm.platform.config import Section, dump_config, load_config
from keplm.platform.ray_session import RayConfig
from keplm.platform.train_loop import TrainConfig
from keplm.platform.tracking import TrackingConfig
from keplm.tuning.space import AblateConfig, SweepConfig


class KeplmConfig(Section):
    ray: RayConfig = Field(default_factory=RayConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    graph: GraphConfig = Field(default_factory=GraphConfig)
    pepr: PEPRConfig = Field(default_factory=PEPRConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    batches: BatchConfig = Field(default_factory=BatchConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    ablate: AblateConfig = Field(default_factory=AblateConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> KeplmConfig:
    return load_config(KeplmConfig, path, overrides)


def dump(cfg: KeplmConfig) -> dict:
    return dump_config(cfg)
