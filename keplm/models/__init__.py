"""keplm's models, registered with transformers' Auto classes on import (model types ``smedbert``,
``keplm_bert``), so ``AutoConfig`` / ``AutoModel.from_pretrained(local_dir)`` reload them."""

from transformers import AutoConfig, AutoModel, AutoModelForPreTraining

from keplm.models.baselines import KeplmBertConfig, KeplmBertForPreTraining
from keplm.models.smedbert import SMedBertConfig, SMedBertForPreTraining

for _config, _model in ((SMedBertConfig, SMedBertForPreTraining), (KeplmBertConfig, KeplmBertForPreTraining)):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)
    AutoModelForPreTraining.register(_config, _model, exist_ok=True)

__all__ = ["KeplmBertConfig", "KeplmBertForPreTraining", "SMedBertConfig", "SMedBertForPreTraining"]
