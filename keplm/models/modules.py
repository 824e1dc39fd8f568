"""Building blocks shared by keplm's models: the BERT trunk with a hook between layers, span pooling,
and the MLM + SOP objective (L_EX of SMedBERT eq. 22)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.bert.modeling_bert import BertModel, BertPreTrainingHeads


def run_bert(bert: BertModel, input_ids, attention_mask, token_type_ids,
             after_layer: int | None = None, hook: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """BERT's embeddings + encoder layers, calling ``hook(hidden)`` after layer ``after_layer`` (1-based)."""
    h = bert.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
    mask = create_bidirectional_mask(config=bert.config, inputs_embeds=h, attention_mask=attention_mask)
    for i, layer in enumerate(bert.encoder.layer, start=1):
        h = layer(h, mask)
        if hook is not None and i == after_layer:
            h = hook(h)
    return h


def span_lengths(spans: torch.Tensor, span_mask: torch.Tensor) -> torch.Tensor:
    """Token count of every span (B, M); 0 where masked out."""
    return (spans[..., 1] - spans[..., 0]).clamp(min=0) * span_mask


def span_width(spans: torch.Tensor, span_mask: torch.Tensor, lengths: torch.Tensor | None = None) -> int:
    """The longest span's token count (at least 1). Reading it is a host-device sync: models take it at the
    start of forward, while the device is idle, rather than between layers, where it would drain the queue."""
    lengths = span_lengths(spans, span_mask) if lengths is None else lengths
    return max(int(lengths.max()) if lengths.numel() else 0, 1)


def labelled_rows(labels: torch.Tensor | None) -> torch.Tensor | None:
    """Flat indices of the MLM targets (labels != -100), for :meth:`PreTrainingHeadsMixin.ex_loss`; a
    host-device sync, like span_width, best taken at the start of forward."""
    return None if labels is None else torch.nonzero(labels.reshape(-1) != -100).squeeze(-1)


def gather_spans(hidden: torch.Tensor, spans: torch.Tensor, span_mask: torch.Tensor,
                 width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (B, T, D), spans (B, M, 2) token [start, end) -> tokens (B, M, L, D) and their mask (B, M, L);
    L = ``width`` (default: span_width)."""
    lengths = span_lengths(spans, span_mask)
    width = width or span_width(spans, span_mask, lengths)
    offs = torch.arange(width, device=hidden.device)
    idx = spans[..., :1] + offs                                    # (B, M, L)
    tok_mask = (offs < lengths[..., None]) & span_mask[..., None]
    idx = torch.where(tok_mask, idx, torch.zeros_like(idx))
    b, m, ln = idx.shape
    gathered = torch.gather(hidden, 1, idx.reshape(b, m * ln, 1).expand(-1, -1, hidden.size(-1)))
    return gathered.reshape(b, m, ln, -1), tok_mask


class SelfAttentivePooling(nn.Module):
    """f_sp (Lin et al. 2017, one head): a = softmax(w2 · tanh(W1 h_i)) over the span, pooled = Σ a_i h_i."""

    def __init__(self, dim: int, attn_dim: int | None = None):
        super().__init__()
        self.proj = nn.Linear(dim, attn_dim or dim)
        self.score = nn.Linear(attn_dim or dim, 1, bias=False)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        s = self.score(torch.tanh(self.proj(tokens))).squeeze(-1)       # (B, M, L)
        s = s.masked_fill(~mask, torch.finfo(s.dtype).min)
        a = torch.softmax(s, dim=-1) * mask                              # all-masked spans pool to 0
        return torch.einsum("bml,bmld->bmd", a, tokens)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax over the unmasked entries; rows with nothing unmasked give all zeros (not NaN)."""
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=dim) * mask


class PreTrainingHeadsMixin:
    """MLM (tied to the word embeddings) + SOP on the pooled [CLS]; L_EX = MLM + SOP.

    For a BertPreTrainedModel with ``self.bert`` and ``self.cls = make_heads(config)``."""

    _tied_weights_keys = {
        "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
        "cls.predictions.decoder.bias": "cls.predictions.bias",
    }

    def get_output_embeddings(self):
        return self.cls.predictions.decoder

    def loss_weights(self) -> dict[str, float]:
        """The weight of each loss term in ``loss``, by output key (the λ of the papers' total losses): what
        the training loop's loss-balance diagnostics scale each term's gradient by."""
        weights = {"mlm_loss": 1.0, "sop_loss": 1.0}
        for term in ("mnem", "mmem", "ed", "el", "cecp", "est", "bem"):
            value = getattr(self.config, f"lambda_{term}", None)
            if value is not None:
                weights[f"{term}_loss"] = float(value)
        return weights

    def shared_parameters(self) -> list[nn.Parameter]:
        """The encoder layers every objective trains through (for the loss-balance diagnostics)."""
        return [p for p in self.bert.encoder.parameters() if p.requires_grad]

    def set_output_embeddings(self, new_embeddings):
        self.cls.predictions.decoder = new_embeddings
        self.cls.predictions.bias = new_embeddings.bias

    def heads_and_objectives(self, sequence: torch.Tensor, labels: torch.Tensor | None, sop_label: torch.Tensor | None,
                             rows: torch.Tensor | None, batch: dict):
        """:meth:`ex_loss` and the entity objectives (``apply_objectives``) on the encoder output ->
        (mlm_logits, sop_logits, mlm, sop, weighted entity terms, {name_loss: value}).

        In training, the states EMBERT's BEM scores against the word embeddings (eq. 8, no bias) join the
        MLM targets' rows in the decoder's GEMM, the decoder being those embeddings (tied). Each row's
        logits are what they were; a product of their own reads the (V, d) table once more and adds a third
        dense (V, d) gradient to it (with the MLM decoder's and the input lookup's): for the 24 BEM rows of
        a BERT-base 4 x 128 batch, ~100 ms on one CPU core on their own against ~20 ms inside the decoder's
        GEMM, of a ~2.6 s step."""
        from keplm.models.embert import apply_objectives

        heads = getattr(self, "entity_objectives", None)
        decoder = self.cls.predictions.decoder
        fuse = (heads is not None and self.training and labels is not None
                and decoder.weight is self.bert.embeddings.word_embeddings.weight)
        bem = heads.bem_inputs(sequence, batch) if fuse else None
        if bem is None:
            return (*self.ex_loss(sequence, labels, sop_label, rows), *apply_objectives(self, sequence, batch))
        mlm_logits, sop_logits, mlm, sop, bem_logits = self.ex_loss(sequence, labels, sop_label, rows, vocab_rows=bem[0])
        return (mlm_logits, sop_logits, mlm, sop, *apply_objectives(self, sequence, batch, (bem_logits, bem[1])))

    def ex_loss(self, sequence: torch.Tensor, labels: torch.Tensor | None, sop_label: torch.Tensor | None,
                rows: torch.Tensor | None = None, vocab_rows: torch.Tensor | None = None):
        """MLM + SOP. In training with labels only the labelled positions (``rows``, from labelled_rows)
        go through the MLM head and ``mlm_logits`` is None: the vocabulary projection over every token
        (and its fp32 copy for the loss) would be ~15 % of a BERT-base step's FLOPs and most of its
        activation memory, for 15 % of the tokens. The loss is the same either way; eval and inference
        return the full logits. ``vocab_rows`` (training with labels only): more states to score against the
        decoder's weight without its bias, in the same GEMM; their logits come back as a fifth value."""
        if vocab_rows is not None and (labels is None or not self.training):
            raise ValueError("ex_loss: vocab_rows share the training MLM decoder's GEMM; they need labels and train mode")
        sop_logits = self.cls.seq_relationship(self.bert.pooler(sequence))
        mlm = sop = mlm_logits = None
        if labels is not None and self.training:
            rows = labelled_rows(labels) if rows is None else rows
            if vocab_rows is not None:
                head = self.cls.predictions
                h = head.transform(sequence.reshape(-1, sequence.size(-1)).index_select(0, rows))
                both = F.linear(torch.cat([h, vocab_rows.to(h.dtype)]), head.decoder.weight)
                logits, extra = both[:h.size(0)], both[h.size(0):]
                if rows.numel():
                    logits = logits + head.decoder.bias.to(logits.dtype)
                    mlm = F.cross_entropy(logits.float(), labels.reshape(-1).index_select(0, rows))
            elif rows.numel():
                logits = self.cls.predictions(sequence.reshape(-1, sequence.size(-1)).index_select(0, rows))
                mlm = F.cross_entropy(logits.float(), labels.reshape(-1).index_select(0, rows))
        else:
            mlm_logits = self.cls.predictions(sequence)
            if labels is not None and (labels != -100).any():
                mlm = F.cross_entropy(mlm_logits.reshape(-1, mlm_logits.size(-1)).float(), labels.reshape(-1),
                                      ignore_index=-100)
        if sop_label is not None and (sop_label != -100).any():
            sop = F.cross_entropy(sop_logits.float(), sop_label, ignore_index=-100)
        if vocab_rows is not None:
            return mlm_logits, sop_logits, mlm, sop, extra
        return mlm_logits, sop_logits, mlm, sop


def make_heads(config) -> BertPreTrainingHeads:
    return BertPreTrainingHeads(config)


def add_losses(*terms: tuple[float, torch.Tensor | None]) -> torch.Tensor | None:
    total = None
    for weight, value in terms:
        if value is not None and weight:
            total = weight * value if total is None else total + weight * value
    return total


@torch.no_grad()
def copy_into(param: torch.Tensor, value, what: str) -> None:
    """Load KG tensors (numpy or torch) into a parameter of the same shape, or say which shapes differ."""
    # a copy of an array (KG arrays come read-only from Ray's object store: torch.as_tensor would share, and warn)
    value = value.to(param.dtype) if torch.is_tensor(value) else torch.tensor(value, dtype=param.dtype)
    if tuple(value.shape) != tuple(param.shape):
        raise ValueError(f"{what} shape {tuple(value.shape)} != model's {tuple(param.shape)}")
    param.copy_(value)
