"""The baselines of the seed papers, on the same BERT backbone and the same batches as SMedBERT.

``KeplmBertForPreTraining`` with ``entity_fusion=False`` is plain continual pretraining with MLM + SOP
(the papers' BERT / BioBERT-zh baselines). Whole-entity masking (MC-BERT style) is the same model fed by
the collator with ``whole_entity_masking=True`` — the difference is the data, not the network.

``entity_fusion=True`` adds one ERNIE-THU-style fusion layer after encoder layer ``fusion_layer``: for
every token inside a linked mention, ``h_i ← LN(h_i + W_o·GELU(W_t·h_i + W_e·e_m + b))`` with ``e_m`` the
mention entity's TransE embedding (frozen unless ``kg_trainable``); other tokens pass through unchanged.
What differs from ERNIE-THU (Zhang et al. 2019): ERNIE aligns an entity to the mention's first token only
and stacks several K-encoder layers, each with a multi-head self-attention over the entity sequence; it
also trains a denoising entity auto-encoder (dEA) objective. keplm fuses into every token of the mention,
uses one fusion layer, and trains with L_EX (MLM + SOP) only.

Reductions (docs/loss-reductions.md): MLM is the mean over the batch's masked tokens and SOP the mean over
its sentence pairs (BERT's, shared by every keplm model); no dEA term, so nothing else to reduce. EMBERT's
heads, when listed, reduce as in :mod:`keplm.models.embert`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertModel, BertPreTrainedModel

from keplm.models.embert import objectives_for
from keplm.models.modules import PreTrainingHeadsMixin, add_losses, copy_into, labelled_rows, make_heads, run_bert
from keplm.models.smedbert import KnowledgePreTrainingOutput


class KeplmBertConfig(BertConfig):
    model_type = "keplm_bert"

    def __init__(self, entity_fusion: bool = False, fusion_layer: int = 10, num_entities: int = 1,
                 entity_dim: int = 100, kg_trainable: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.entity_fusion = entity_fusion
        self.fusion_layer = fusion_layer
        self.num_entities = num_entities
        self.entity_dim = entity_dim
        self.kg_trainable = kg_trainable


class EntityFusion(nn.Module):
    def __init__(self, config: KeplmBertConfig):
        super().__init__()
        self.w_t = nn.Linear(config.hidden_size, config.hidden_size)
        self.w_e = nn.Linear(config.entity_dim, config.hidden_size, bias=False)
        self.w_o = nn.Linear(config.hidden_size, config.hidden_size)
        self.ln = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden, token_entity_emb, token_has_entity):
        fused = self.ln(hidden + self.w_o(F.gelu(self.w_t(hidden) + self.w_e(token_entity_emb))))
        return torch.where(token_has_entity[..., None], fused, hidden)


class KeplmBertForPreTraining(PreTrainingHeadsMixin, BertPreTrainedModel):
    config_class = KeplmBertConfig

    def __init__(self, config: KeplmBertConfig):
        super().__init__(config)
        self.bert = BertModel(config)
        self.cls = make_heads(config)
        if config.entity_fusion:
            self.entity_emb = nn.Parameter(torch.zeros(config.num_entities, config.entity_dim),
                                           requires_grad=config.kg_trainable)
            self.fusion = EntityFusion(config)
        self.entity_objectives = objectives_for(config)
        self.post_init()

    def load_kg(self, entity_emb, *_) -> None:
        copy_into(self.entity_emb, entity_emb, "entity embedding")

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, sop_label=None,
                token_entity=None, **batch) -> KnowledgePreTrainingOutput:
        cfg = self.config
        rows = labelled_rows(labels) if self.training else None   # the MLM targets' sync, before the layers run
        hook = None
        if cfg.entity_fusion and token_entity is not None and bool((token_entity >= 0).any()):
            has = token_entity >= 0
            emb = self.entity_emb[token_entity.clamp(min=0)]

            def hook(h):
                return self.fusion(h, emb, has)

        seq = run_bert(self.bert, input_ids, attention_mask, token_type_ids,
                       after_layer=min(cfg.fusion_layer, cfg.num_hidden_layers), hook=hook)
        mlm_logits, sop_logits, mlm, sop, terms, entity_losses = self.heads_and_objectives(
            seq, labels, sop_label, rows, batch)
        return KnowledgePreTrainingOutput(loss=add_losses((1.0, mlm), (1.0, sop), *terms), mlm_loss=mlm, sop_loss=sop,
                                          **entity_losses, mlm_logits=mlm_logits, sop_logits=sop_logits, last_hidden_state=seq)
