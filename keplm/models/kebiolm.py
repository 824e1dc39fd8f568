"""KeBioLM (Yuan et al., BioNLP 2021; seed 002 §3) on transformers' BERT blocks.

The encoder's layers are split in two groups: ``text_layers`` (l0) layers of text-only encoding, then the
remaining l1 layers of text-entity fusion.

- **Entity detection** (eq. 1-2, 9): a linear BIO classifier on the l0-th layer's states; targets come from
  the linked mentions of the batch (B at a mention's first token, I inside, O elsewhere; padding ignored).
- **Mention encoding**: ``h_m = [h_s; h_t]`` (first and last token of the mention), ``h'_m = W_m h_m + b_m``
  into the entity space. The training mentions are the linker's (the gold spans of the corpus), as
  KeBioLM trains on ScispaCy's annotations (§3.3).
- **Entity retrieval** (eq. 3): the ``top_k`` entities with the largest ``h'_m · e_j`` (k = 100 in the
  paper), ``a_j = softmax`` over those k, ``e'_m = Σ a_j e_j``.
- **Fusion** (eq. 4): every token of the mention gets ``h*_i = h_i + W_e e'_m + b_e``; the l1 fusion layers
  follow (with l1 = 0 the sum goes straight to the MLM head).
- **Entity linking** (eq. 10): cross-entropy of ``h'_m · e`` over the whole entity set, or — with
  ``el_negatives`` set, for large KGs — a sampled softmax over the gold entity and ``el_negatives``
  entities drawn uniformly without replacement (shared by the batch; a drawn gold entity is masked out of
  its own negatives). Uniform sampling needs no log-Q correction: every negative has the same
  probability, which shifts all logits of a row by the same constant. With all other entities drawn, the
  sampled loss *is* the exact one (tested).
- Loss (eq. 6): ``L = L_MLM + λ_ED·L_ED + λ_EL·L_EL`` (λ = 1 in the paper); SOP too when the batches
  carry it (the paper has none: set ``batches.sop=false``). Whole-entity masking 12 % [MASK] + 1.5 % random
  (§3.2) is the collator's whole-entity masking at 15 % with 80/10/10.

Reductions (docs/loss-reductions.md): eq. 8-10 print MLM, ED and EL alike as bare sums; the released code
takes each as a cross-entropy mean, and so does keplm, whose MLM is BERT's mean over masked tokens — so no
switch: summing ED and EL alone would not be the printed objective either, it would outweigh the mean MLM.

- **ED**: the mean over the batch's non-padding tokens (every one has a B/I/O target, [CLS]/[SEP] O).
- **EL**: the mean over the batch's linked mentions (exact or sampled softmax alike).

Entity embeddings are initialised from TransE (``load_kg``), trainable unless ``entity_trainable=False``
(the paper's +frz); +rand skips ``load_kg``; −wem turns whole-entity masking off in the batches.
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

BIO_O, BIO_B, BIO_I = 0, 1, 2


class KeBioLMConfig(BertConfig):
    model_type = "kebiolm"

    def __init__(self, num_entities: int = 1, entity_dim: int = 100, text_layers: int = 8, entity_top_k: int = 100,
                 el_negatives: int | None = None, entity_trainable: bool = True, lambda_ed: float = 1.0,
                 lambda_el: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        if not 1 <= text_layers <= self.num_hidden_layers:
            raise ValueError(f"text_layers (l0) must be in 1..{self.num_hidden_layers}, got {text_layers}")
        self.num_entities = num_entities
        self.entity_dim = entity_dim
        self.text_layers = text_layers
        self.entity_top_k = entity_top_k
        self.el_negatives = el_negatives
        self.entity_trainable = entity_trainable
        self.lambda_ed = lambda_ed
        self.lambda_el = lambda_el


def bio_targets(spans: torch.Tensor, span_mask: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) BIO ids from mention token spans [start, end); -100 on padding."""
    b, t = attention_mask.shape
    pos = torch.arange(t, device=spans.device)[None, None, :]
    start, end = spans[..., :1], spans[..., 1:2]
    valid = span_mask[..., None]
    inside = ((pos >= start) & (pos < end) & valid).any(1)
    first = ((pos == start) & (end > start) & valid).any(1)
    out = torch.full((b, t), BIO_O, dtype=torch.long, device=spans.device)
    out[inside] = BIO_I
    out[first] = BIO_B
    return out.masked_fill(attention_mask == 0, -100)


def retrieve(h_proj: torch.Tensor, entity_emb: torch.Tensor, k: int,
             keep_scores: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """eq. 3: (N, d) projected mentions -> (e'_m (N, d), the scores over all entities (N, Z)).

    Which k entities win is a choice, not a function to differentiate: the scores over all Z entities are
    taken without a graph, and the k winners' scores are recomputed from their embeddings, which carries
    the same gradient (topk's backward puts it on those k entries only) without the backward of the
    (N, Z) product: two more N·Z·d GEMMs (as many FLOPs as the forward's, twice) and an (N, Z) gradient
    that is zero but for the k entries per row.
    ``keep_scores``: return the scores with their graph (the exact linking loss of eq. 10 needs them);
    otherwise they come back detached."""
    with torch.set_grad_enabled(keep_scores and torch.is_grad_enabled()):
        scores = h_proj @ entity_emb.T
    idx = scores.detach().topk(min(k, scores.size(-1)), dim=-1).indices
    chosen = entity_emb[idx]                                                    # (N, k, d)
    top = torch.einsum("nd,nkd->nk", h_proj, chosen)
    a = torch.softmax(top.float(), dim=-1).to(entity_emb.dtype)
    return torch.einsum("nk,nkd->nd", a, chosen), scores


def linking_loss(h_proj: torch.Tensor, entity_emb: torch.Tensor, gold: torch.Tensor, negatives: torch.Tensor | None,
                 scores: torch.Tensor | None = None) -> torch.Tensor:
    """eq. 10, exact (negatives None) or sampled over ``gold`` + shared uniform ``negatives``."""
    if negatives is None:
        s = scores if scores is not None else h_proj @ entity_emb.T
        return F.cross_entropy(s.float(), gold)
    pos = (h_proj * entity_emb[gold]).sum(-1, keepdim=True)
    neg = h_proj @ entity_emb[negatives].T
    neg = neg.masked_fill(negatives[None, :] == gold[:, None], torch.finfo(neg.dtype).min)
    logits = torch.cat([pos, neg], dim=-1).float()
    return F.cross_entropy(logits, torch.zeros_like(gold))


class KeBioLMForPreTraining(PreTrainingHeadsMixin, BertPreTrainedModel):
    config_class = KeBioLMConfig

    def __init__(self, config: KeBioLMConfig):
        super().__init__(config)
        self.bert = BertModel(config)
        self.cls = make_heads(config)
        d, h = config.entity_dim, config.hidden_size
        self.entity_emb = nn.Parameter(torch.randn(config.num_entities, d) * 0.02,
                                       requires_grad=config.entity_trainable)
        self.detect = nn.Linear(h, 3)                  # W_l, b_l
        self.mention_proj = nn.Linear(2 * h, d)        # W_m, b_m
        self.entity_out = nn.Linear(d, h)              # W_e, b_e
        self.entity_objectives = objectives_for(config)
        self.post_init()

    def load_kg(self, entity_emb, *_) -> None:
        copy_into(self.entity_emb, entity_emb, "entity embedding")

    def _negatives(self, device) -> torch.Tensor | None:
        n = self.config.el_negatives
        if n is None:
            return None
        return torch.randperm(self.config.num_entities, device=device)[:min(n, self.config.num_entities)]

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, sop_label=None,
                mention_spans=None, mention_mask=None, mention_entity=None, **batch) -> KnowledgePreTrainingOutput:
        cfg = self.config
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        extra: dict[str, torch.Tensor | None] = {"ed": None, "el": None}
        have = mention_spans is not None and mention_mask is not None and bool(mention_mask.any())
        rows = labelled_rows(labels) if self.training else None   # the MLM targets' sync, before the layers run

        # every host-device sync up front, while the device is idle, none between layers
        target = bio_targets(mention_spans, mention_mask, attention_mask) if mention_spans is not None and \
            mention_mask is not None else None
        if have:
            sel = mention_mask.nonzero(as_tuple=True)                         # (b, j) of every real mention
            spans, owner_rows = mention_spans[sel], sel[0]
            t = input_ids.size(1)
            pos = torch.arange(t, device=input_ids.device)[None, :]
            n, tok = ((pos >= spans[:, :1]) & (pos < spans[:, 1:2])).nonzero(as_tuple=True)  # mention n covers tok
            tokens = owner_rows[n] * t + tok
            gold = mention_entity[sel] if mention_entity is not None else None
            linked = (gold >= 0).nonzero().squeeze(-1) if gold is not None else None     # the mentions EL trains on
            linked = linked if linked is not None and linked.numel() else None
        exact = cfg.el_negatives is None

        def hook(h):
            logits = self.detect(h)
            if target is not None:
                extra["ed"] = F.cross_entropy(logits.reshape(-1, 3).float(), target.reshape(-1), ignore_index=-100)
            if not have:
                return h
            h_m = torch.cat([h[owner_rows, spans[:, 0]], h[owner_rows, spans[:, 1] - 1]], dim=-1)
            h_proj = self.mention_proj(h_m)
            e_prime, scores = retrieve(h_proj, self.entity_emb, cfg.entity_top_k, keep_scores=exact and linked is not None)
            if linked is not None:
                extra["el"] = linking_loss(h_proj[linked], self.entity_emb, gold[linked], self._negatives(h.device),
                                           scores[linked] if exact else None)
            # eq. 4: add W_e e'_m + b_e to every token of its mention
            add = self.entity_out(e_prime).to(h.dtype)
            b, _, d = h.shape
            return h.reshape(-1, d).index_add(0, tokens, add.index_select(0, n)).reshape(b, -1, d)

        seq = run_bert(self.bert, input_ids, attention_mask, token_type_ids, after_layer=cfg.text_layers, hook=hook)
        mlm_logits, sop_logits, mlm, sop, terms, entity_losses = self.heads_and_objectives(
            seq, labels, sop_label, rows, batch)
        loss = add_losses((1.0, mlm), (1.0, sop), (cfg.lambda_ed, extra["ed"]), (cfg.lambda_el, extra["el"]), *terms)
        return KnowledgePreTrainingOutput(loss=loss, mlm_loss=mlm, sop_loss=sop, ed_loss=extra["ed"],
                                          el_loss=extra["el"], **entity_losses, mlm_logits=mlm_logits, sop_logits=sop_logits,
                                          last_hidden_state=seq)
