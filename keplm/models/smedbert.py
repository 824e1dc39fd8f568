"""SMedBERT (Zhang et al., ACL 2021, ../shared/seeds/000_7fb5b7ab240cd2e1.txt §3) as a transformers model.

One file, config beside model. Notation follows the paper: d1 = ``hidden_size``, d2 = ``kg_dim``;
Γent / Γrel / M_r are the TransR tensors of ``keplm kg embed`` (``entity_emb``, ``relation_emb``,
``relation_proj``), σ is GELU.

- Mention-neighbour hybrid attention (§3.3) after encoder layer ``hybrid_layer`` (paper: 10 of 12;
  clipped to the model's depth): eq. 2 span representation, eq. 3 type attention (softmax over the types
  present among the mention's neighbours), eq. 4-5 node attention scaled by the neighbour's type weight,
  eq. 6-7 aggregation + FFN + LN, eq. 8-11 gated position infusion into the mention's own tokens only
  (footnote 4). Non-mention tokens, and mentions without neighbours, pass through bit-identical.
- Masked Neighbor Modeling (§3.4.1) on the encoder output: eq. 12 h_mf; the compatibility of eq. 19 via
  the per-relation MP_r = [M_r; h_r][M_r; h_r]ᵀ of eq. 18 (precomputed from the KG tensors each forward,
  one (d2+1)² matrix per relation), scaled by µ and corrected by −c·log Q(e). Eq. 19 as printed
  ("µ−µ logQ") gives c = µ, the default (``mnem_logq_scale`` unset). Note that this is exp(µs)/Q^µ, a
  stronger correction than the cited sampled softmax's exp(s)/Q (Jean et al. 2015; ``mnem_logq_scale=1``):
  a negative much rarer than the positive then puts a floor under the loss that no cosine can lift.
  Sampled softmax of eq. 15 with the K·E_Q[·] term estimated from the N sampled negatives.
  A neighbour whose triple is (neighbour, r, mention) uses the inverse relation (M_r, −h_r): TransR's
  h·M_r + r = t·M_r is the same as t·M_r − r = h·M_r.
- Masked Mention Modeling (§3.4.2): eq. 20 Y_m from the backbone's own input word embeddings Γp of the
  original (unmasked) tokens, through the same f_sp and W_sa as eq. 12, as a fixed target (no gradient).
  Readings taken (the printed eq. 21 is Σ_m ||h_mf − Y_m||² over "the set of mentions of sample s"):
  * **Reduction** (``mmem_reduction``): the text calls it a "Mean-Squared Error", and λ2 = 4 > λ1 = 2 only
    makes sense for a term of order one, so the default is ``mean``: the mean over the d2 dimensions and over
    the mentions it covers (every mention in the batch weighs the same). ``sum`` is the printed Σ over
    dimensions and mentions per sample, averaged over samples (at BERT-base it is hundreds of times MLM).
  * **Mentions** (``mmem_mentions``): the prose says MMeM "transfers the semantic information in
    neighboring entities back to **the masked mention**" and "gathering [it] back … to the masked target";
    reconstructing a mention the model can read is no task, so the default is ``masked``: the mentions whose
    every token the MLM chose (labels ≠ −100). ``all`` is eq. 21's M_s read as every linked mention.
  * **Normalisation**: both sides are compared after a LayerNorm *without* its affine weight and bias. With
    the shared trainable ``ln_sa`` on both sides (as eq. 12 and 20 print LN), shrinking its weight lowers the
    loss without learning anything; standardised vectors cannot cheat that way, and their mean squared
    distance is at most 4 (2 when unrelated). h_mf of MNeM keeps ``ln_sa`` (MNeM compares cosines).
- Loss (eq. 22): L_EX (MLM + SOP) + λ1·MNeM + λ2·MMeM, each term returned separately.
- Ablations (Table 4): ``use_type_attention=False`` (α_τ ≡ 1, no W_t/W_t'/W_a), ``use_hybrid_attention=False``
  (no §3.3 module at all), ``use_knowledge_loss=False`` (no MNeM/MMeM, no W_sa/f_sp of §3.4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig
from transformers.modeling_outputs import ModelOutput
from transformers.models.bert.modeling_bert import BertModel, BertPreTrainedModel

from keplm.models.embert import objectives_for
from keplm.models.modules import (PreTrainingHeadsMixin, SelfAttentivePooling, add_losses, copy_into, gather_spans,
                                  labelled_rows, span_width,
                                  make_heads, masked_softmax, run_bert)


class SMedBertConfig(BertConfig):
    model_type = "smedbert"

    def __init__(self, num_entities: int = 1, num_relations: int = 1, num_entity_types: int = 1, kg_dim: int = 200,
                 kg_relation_dim: int | None = None, hybrid_layer: int = 10, mu: float = 10.0,
                 lambda_mnem: float = 2.0, lambda_mmem: float = 4.0, use_type_attention: bool = True,
                 use_hybrid_attention: bool = True, use_knowledge_loss: bool = True, kg_trainable: bool = False,
                 mnem_logq_scale: float | None = None, mmem_reduction: str = "mean", mmem_mentions: str = "masked",
                 **kwargs):
        super().__init__(**kwargs)
        self.num_entities = num_entities
        self.num_relations = num_relations
        self.num_entity_types = num_entity_types
        self.kg_dim = kg_dim
        self.kg_relation_dim = kg_relation_dim or kg_dim
        self.hybrid_layer = hybrid_layer
        self.mu = mu
        self.lambda_mnem = lambda_mnem
        self.lambda_mmem = lambda_mmem
        self.use_type_attention = use_type_attention
        self.use_hybrid_attention = use_hybrid_attention
        self.use_knowledge_loss = use_knowledge_loss
        self.kg_trainable = kg_trainable
        self.mnem_logq_scale = mnem_logq_scale
        self.mmem_reduction = mmem_reduction
        self.mmem_mentions = mmem_mentions


@dataclass
class KnowledgePreTrainingOutput(ModelOutput):
    loss: torch.Tensor | None = None
    mlm_loss: torch.Tensor | None = None
    sop_loss: torch.Tensor | None = None
    mnem_loss: torch.Tensor | None = None
    mmem_loss: torch.Tensor | None = None
    ed_loss: torch.Tensor | None = None       # KeBioLM entity detection
    el_loss: torch.Tensor | None = None       # KeBioLM entity linking
    cecp_loss: torch.Tensor | None = None     # EMBERT context-entity consistency prediction
    est_loss: torch.Tensor | None = None      # EMBERT entity segmentation
    bem_loss: torch.Tensor | None = None      # EMBERT bidirectional entity masking
    mlm_logits: torch.Tensor | None = None
    sop_logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None


class KGTensors(nn.Module):
    """Γent, Γrel and M_r; frozen unless ``kg_trainable``. Filled by ``load_kg`` (ids = entities.parquet)."""

    def __init__(self, config: SMedBertConfig):
        super().__init__()
        d, dr = config.kg_dim, config.kg_relation_dim
        self.entity = nn.Parameter(torch.zeros(config.num_entities, d), requires_grad=config.kg_trainable)
        self.relation = nn.Parameter(torch.zeros(config.num_relations, dr), requires_grad=config.kg_trainable)
        self.proj = nn.Parameter(torch.zeros(config.num_relations, d, dr), requires_grad=config.kg_trainable)

    def mp(self) -> torch.Tensor:
        """MP_r of eq. 18 for r and its inverse (r + R): (2R, d+1, d+1)."""
        stacked = torch.cat([torch.cat([self.proj, self.relation[:, None, :]], dim=1),
                             torch.cat([self.proj, -self.relation[:, None, :]], dim=1)], dim=0)  # (2R, d+1, dr)
        return stacked @ stacked.transpose(1, 2)


class HybridAttention(nn.Module):
    """§3.3: type attention (eq. 3), node attention (eq. 4-5), aggregation (6-7), gated infusion (8-11)."""

    def __init__(self, config: SMedBertConfig):
        super().__init__()
        d1, d2 = config.hidden_size, config.kg_dim
        self.pool = SelfAttentivePooling(d1)
        self.w_be = nn.Linear(d1, d2, bias=False)
        self.ln_be = nn.LayerNorm(d2)
        self.use_type_attention = config.use_type_attention
        if config.use_type_attention:
            self.w_t = nn.Linear(d2, d2, bias=False)
            self.w_t2 = nn.Linear(d2, d2, bias=False)
            self.w_a = nn.Linear(d2, 1, bias=False)
        self.w_q = nn.Linear(d2, d2, bias=False)
        self.w_k = nn.Linear(d2, d2, bias=False)
        self.w_v = nn.Linear(d2, d2)
        self.w_l1 = nn.Linear(d2, 4 * d2)
        self.w_l2 = nn.Linear(4 * d2, d2, bias=False)
        self.ln_agg = nn.LayerNorm(d2)
        self.w_mf = nn.Linear(2 * d2, 2 * d2)
        self.w_bp = nn.Linear(2 * d2, d1)
        self.ln_bp = nn.LayerNorm(d1)
        self.w_ug = nn.Linear(2 * d1, d1)
        self.w_ex = nn.Linear(2 * d1, d1)
        self.num_types = config.num_entity_types
        self.last_type_weights: torch.Tensor | None = None
        self.last_node_weights: torch.Tensor | None = None

    def type_weights(self, h_m, h_nb, nb_type, nb_mask):
        """eq. 3: α_τ over the types present among each mention's neighbours -> (B, M, types)."""
        onehot = F.one_hot(nb_type.clamp(min=0), self.num_types).to(h_nb.dtype) * nb_mask[..., None]
        h_tau = torch.einsum("bmkt,bmkd->bmtd", onehot, h_nb)                  # Σ of Γent per type
        present = onehot.sum(2) > 0
        score = self.w_a(torch.tanh(self.w_t(h_m)[:, :, None] + self.w_t2(h_tau))).squeeze(-1)
        return masked_softmax(score, present)

    def forward(self, hidden, spans, span_mask, nb_emb, nb_type, nb_mask, width: int | None = None,
                plan: tuple[torch.Tensor, torch.Tensor] | None = None):
        """-> hidden with eq. 10-11 applied to the tokens of the mentions that have neighbours. ``plan``:
        :func:`infusion_plan` of the same spans and masks, taken by the caller before the encoder runs (it
        is a host-device sync); None computes it here."""
        h_k = self.knowledge(hidden, spans, span_mask, nb_emb, nb_type, nb_mask, width)
        if plan is None:
            plan = infusion_plan(spans, span_mask, nb_mask, hidden.size(1))
        return self.infuse(hidden, h_k, *plan)

    def knowledge(self, hidden, spans, span_mask, nb_emb, nb_type, nb_mask, width: int | None = None) -> torch.Tensor:
        """eq. 2-9: the knowledge vector h_k of every mention -> (B, M, d1)."""
        tokens, tok_mask = gather_spans(hidden, spans, span_mask, width)
        h_m = self.ln_be(F.gelu(self.w_be(self.pool(tokens, tok_mask))))                # eq. 2 (B, M, d2)
        scale = 1.0
        if self.use_type_attention:
            alpha = self.type_weights(h_m, nb_emb, nb_type, nb_mask)
            self.last_type_weights = alpha
            scale = torch.gather(alpha, 2, nb_type.clamp(min=0))                        # α_τ of each neighbour
        d2 = h_m.size(-1)
        logits = torch.einsum("bmd,bmkd->bmk", self.w_q(h_m), self.w_k(nb_emb)) / math.sqrt(d2) * scale  # eq. 4
        beta = masked_softmax(logits, nb_mask)                                          # eq. 5
        self.last_node_weights = beta
        agg = torch.einsum("bmk,bmkd->bmd", beta, self.w_v(nb_emb))                     # eq. 6
        agg = self.ln_agg(agg + self.w_l2(F.gelu(self.w_l1(agg))))                      # eq. 7
        h_mf = F.gelu(self.w_mf(torch.cat([agg, h_m], -1)))                             # eq. 8
        return self.ln_bp(self.w_bp(h_mf))                                              # eq. 9 (B, M, d1)

    def infuse(self, hidden, h_k, tokens: torch.Tensor, owners: torch.Tensor) -> torch.Tensor:
        """eq. 10-11 on the listed tokens only (flat b·T + t indices, each with its mention's flat b·M + m
        index); every other token is passed through as it is. Computing the gate and the infusion on those
        tokens alone, instead of on every token and keeping the mentions' with a where, spares the two
        (2·d1 → d1) projections on the ~70 % of tokens that no mention covers: ~2 % of a BERT-base step's
        FLOPs for nothing (SMedBERT's step 1.034× plain MLM's FLOPs before, 1.014× now)."""
        b, t, d1 = hidden.shape
        flat = hidden.reshape(b * t, d1)
        h_i = flat.index_select(0, tokens)                                              # (C, d1)
        h_tok = h_k.reshape(-1, d1).index_select(0, owners)                             # its mention's h_k
        g = torch.tanh(self.w_ug(torch.cat([h_i, h_tok], -1)))                          # eq. 10
        fused = F.gelu(self.w_ex(torch.cat([h_i, g * h_tok], -1))) + h_i                # eq. 11
        return flat.index_copy(0, tokens, fused.to(flat.dtype)).reshape(b, t, d1)


def infusion_plan(spans: torch.Tensor, span_mask: torch.Tensor, nb_mask: torch.Tensor, seq_len: int):
    """The tokens eq. 10-11 infuse, those of the mentions that have neighbours (footnote 4: a mention's own
    tokens only): (flat b·T + t indices, the flat b·M + m index of the mention that covers each). Mentions
    do not overlap (the linker makes none); where they would, the first covering mention wins. Reading
    the count is a host-device sync: the model takes it before the encoder runs."""
    active = span_mask & nb_mask.any(-1)
    pos = torch.arange(seq_len, device=spans.device)
    inside = (pos[None, None] >= spans[..., :1]) & (pos[None, None] < spans[..., 1:]) & active[..., None]  # (B, M, T)
    covered = inside.any(1)                                                             # (B, T)
    owner = inside.float().argmax(1)                                                    # (B, T)
    rows, cols = covered.nonzero(as_tuple=True)
    m = spans.size(1)
    return rows * seq_len + cols, rows * m + owner[rows, cols]


class SMedBertForPreTraining(PreTrainingHeadsMixin, BertPreTrainedModel):
    config_class = SMedBertConfig

    def __init__(self, config: SMedBertConfig):
        super().__init__(config)
        self.bert = BertModel(config)
        self.cls = make_heads(config)
        self.kg = KGTensors(config)
        self.hybrid = HybridAttention(config) if config.use_hybrid_attention else None
        if config.use_knowledge_loss:
            self.ctx_pool = SelfAttentivePooling(config.hidden_size)      # f_sp of eq. 12 / 20
            self.w_sa = nn.Linear(config.hidden_size, config.kg_dim, bias=False)
            self.ln_sa = nn.LayerNorm(config.kg_dim)
        self.entity_objectives = objectives_for(config)
        self.post_init()

    @torch.no_grad()
    def load_kg(self, entity_emb, relation_emb, relation_proj) -> None:
        """Copy the TransR tensors of ``keplm kg embed`` (row i = entity/relation id i)."""
        for param, value in ((self.kg.entity, entity_emb), (self.kg.relation, relation_emb), (self.kg.proj, relation_proj)):
            copy_into(param, value, "KG tensor")

    def _mention_features(self, hidden, spans, span_mask, width: int | None = None):
        """eq. 12 / eq. 20 before their LN: σ(f_sp(span tokens)·W_sa) -> (B, M, d2)."""
        tokens, tok_mask = gather_spans(hidden, spans, span_mask, width)
        return F.gelu(self.w_sa(self.ctx_pool(tokens, tok_mask)))

    def mmem_loss(self, features, labels, input_ids, spans, span_mask, width: int | None = None):
        """eq. 20-21 (readings in the module docstring): MSE between the standardised mention features of the
        encoder output and those of the original tokens' input embeddings; None when no mention is covered."""
        cfg = self.config
        covered = span_mask
        if cfg.mmem_mentions == "masked":
            if labels is None:
                return None
            chosen, tok_mask = gather_spans((labels >= 0).unsqueeze(-1).to(features.dtype), spans, span_mask, width)
            covered = span_mask & ((chosen.squeeze(-1) > 0) | ~tok_mask).all(-1)
        if not bool(covered.any()):
            return None
        original = torch.where(labels >= 0, labels, input_ids) if labels is not None else input_ids
        with torch.no_grad():   # Y_m: a fixed target
            target = self._mention_features(self.bert.embeddings.word_embeddings(original), spans, span_mask, width)
        d2 = features.size(-1)
        sq = (F.layer_norm(features, (d2,)) - F.layer_norm(target, (d2,))) ** 2          # (B, M, d2)
        weights = covered.to(sq.dtype)
        if cfg.mmem_reduction == "sum":   # the printed Σ_m ||·||² per sample, averaged over samples
            return (sq.sum(-1) * weights).sum(1).mean()
        return (sq.mean(-1) * weights).sum() / weights.sum()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, sop_label=None,
                mention_spans=None, mention_mask=None, neighbour_ids=None, neighbour_relation=None,
                neighbour_type=None, neighbour_mask=None, negative_ids=None, log_q_pos=None, log_q_neg=None,
                **batch) -> KnowledgePreTrainingOutput:
        cfg = self.config
        # every host-device sync up front, while the device is idle, none between layers
        has_mentions = mention_spans is not None and mention_mask is not None and bool(mention_mask.any())
        width = span_width(mention_spans, mention_mask) if has_mentions else None
        has_neighbours = neighbour_mask is not None and bool(neighbour_mask.any())
        rows = labelled_rows(labels) if self.training else None
        hook = None
        if self.hybrid is not None and has_mentions:
            nb_emb = self.kg.entity[neighbour_ids.clamp(min=0)] * neighbour_mask[..., None]
            plan = infusion_plan(mention_spans, mention_mask, neighbour_mask, input_ids.size(1))

            def hook(h):
                return self.hybrid(h, mention_spans, mention_mask, nb_emb, neighbour_type, neighbour_mask, width, plan)

        seq = run_bert(self.bert, input_ids, attention_mask, token_type_ids,
                       after_layer=min(cfg.hybrid_layer, cfg.num_hidden_layers), hook=hook)
        mlm_logits, sop_logits, mlm, sop, terms, entity_losses = self.heads_and_objectives(
            seq, labels, sop_label, rows, batch)

        mnem = mmem = None
        if cfg.use_knowledge_loss and has_mentions:
            features = self._mention_features(seq, mention_spans, mention_mask, width)  # (B, M, d2)
            if has_neighbours and negative_ids is not None:
                mnem = self.mnem_loss(self.ln_sa(features), neighbour_ids, neighbour_relation, neighbour_mask,
                                      negative_ids, log_q_pos, log_q_neg)                # h_mf of eq. 12
            mmem = self.mmem_loss(features, labels, input_ids, mention_spans, mention_mask, width)

        loss = add_losses((1.0, mlm), (1.0, sop), (cfg.lambda_mnem, mnem), (cfg.lambda_mmem, mmem), *terms)
        return KnowledgePreTrainingOutput(loss=loss, mlm_loss=mlm, sop_loss=sop, mnem_loss=mnem, mmem_loss=mmem,
                                          **entity_losses, mlm_logits=mlm_logits, sop_logits=sop_logits, last_hidden_state=seq)

    def mnem_loss(self, h_mf, nb_ids, nb_rel, nb_mask, neg_ids, log_q_pos, log_q_neg):
        """eq. 15 with eq. 19's logits: −log(e^{f(θ)} / (e^{f(θ)} + K·mean_n e^{f(θ'_n)})), mean over positives."""
        mu = self.config.mu
        # eq. 19's compatibility (without log Q) for every (mention, neighbour) pair, with [h_mf 1]·MP_r taken once per mention and
        # relation (one GEMM over the 2R relations) and then picked per neighbour: indexing MP_r per
        # neighbour first would materialise a (B, M, K, d+1, d+1) tensor, ~1 GB at BERT-base batch 32
        h1 = torch.cat([h_mf, torch.ones_like(h_mf[..., :1])], -1)                      # (B, M, d+1)
        u_all = torch.einsum("bmi,rij->bmrj", h1, self.kg.mp())[..., :-1]                # (B, M, 2R, d)
        rel = nb_rel.clamp(min=0)[..., None].expand(-1, -1, -1, u_all.size(-1))
        u = F.normalize(torch.gather(u_all, 2, rel), dim=-1)                            # (B, M, K, d)
        pos = (u * F.normalize(self.kg.entity[nb_ids.clamp(min=0)], dim=-1)).sum(-1) * mu
        neg = torch.einsum("bmkd,bmknd->bmkn", u, F.normalize(self.kg.entity[neg_ids.clamp(min=0)], dim=-1)) * mu
        c = mu if self.config.mnem_logq_scale is None else self.config.mnem_logq_scale
        pos = pos - c * log_q_pos
        neg = neg - c * log_q_neg
        k = nb_mask.sum(-1, keepdim=True).clamp(min=1).to(pos.dtype)                    # K per mention
        log_denominator = torch.logaddexp(pos, torch.logsumexp(neg, -1) + torch.log(k / neg.size(-1)))
        nll = (log_denominator - pos) * nb_mask
        return nll.sum() / nb_mask.sum().clamp(min=1)
