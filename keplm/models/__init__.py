"""keplm's models, registered with transformers' Auto classes on import (model types ``smedbert``,
``keplm_bert``, ``kebiolm``), so ``AutoConfig`` / ``AutoModel.from_pretrained(local_dir)`` reload them."""

from transformers import AutoConfig, AutoModel, AutoModelForPreTraining

from keplm.models.baselines import KeplmBertConfig, KeplmBertForPreTraining
from keplm.models.kebiolm import KeBioLMConfig, KeBioLMForPreTraining
from keplm.models.smedbert import SMedBertConfig, SMedBertForPreTraining

for _config, _model in ((SMedBertConfig, SMedBertForPreTraining), (KeplmBertConfig, KeplmBertForPreTraining),
                        (KeBioLMConfig, KeBioLMForPreTraining)):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)
    AutoModelForPreTraining.register(_config, _model, exist_ok=True)

__all__ = ["KeBioLMConfig", "KeBioLMForPreTraining", "KeplmBertConfig", "KeplmBertForPreTraining", "SMedBertConfig", "SMedBertForPreTraining"]
