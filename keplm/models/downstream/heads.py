"""Downstream models over any keplm checkpoint (or a plain BERT one): NER taggers and pair classifiers.

NER heads follow seed 003 §3.2 / Table 7: FC, CRF, LSTM-CRF, BiLSTM-CRF (LSTM hidden size 128), the
CRF from ``pytorch-crf``. The head sits on the last encoder layer of the checkpoint's ``bert`` trunk;
SMedBERT's hybrid knowledge attention is a pretraining-time module and is not run downstream (it needs
linked mentions and their neighbours at inference). **Feature extraction** freezes the encoder and runs
it without dropout or gradients; **fine-tuning** trains it with the head (seed 003 Fig. 3).
Head weights are Xavier-initialised with zero biases, as seed 003 §4.2 states.

Input layout: ``[CLS] c_1 … c_n [SEP]``, one token per character (character-level BIO), so tag i is
the state at position i + 1.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torchcrf import CRF

from keplm.platform.errors import KeplmError

NER_HEADS = ("fc", "crf", "lstm-crf", "bilstm-crf")


def load_pretrained(path: str | Path):
    """(model with ``.bert`` and ``.cls.predictions``, tokenizer) from a local checkpoint directory.

    keplm's SMedBERT / keplm_bert models and plain ``bert`` checkpoints all load through
    ``AutoModelForPreTraining`` (keplm registers its model types on import). Nothing is downloaded."""
    import keplm.models  # noqa: F401 - registers smedbert / keplm_bert with the Auto classes
    from transformers import AutoModelForPreTraining

    from keplm.platform.tokenizer import load_tokenizer

    p = Path(path)
    if not (p / "config.json").is_file():
        raise KeplmError(f"{p}: not a model directory (no config.json); pass a keplm pretrain output's model/")
    model = AutoModelForPreTraining.from_pretrained(str(p), local_files_only=True)
    if not hasattr(model, "bert"):
        raise KeplmError(f"{p}: model type {model.config.model_type!r} has no BERT trunk")
    return model, load_tokenizer(p)


def char_token_ids(chars: list[str], tokenizer) -> list[int]:
    """One vocab id per character (lower-cased as the tokenizer does); unknown and blank chars -> [UNK]."""
    vocab = tokenizer.get_vocab()
    unk = tokenizer.unk_token_id
    lower = getattr(tokenizer, "do_lower_case", True)
    return [vocab.get(c.lower() if lower else c, unk) if c.strip() else unk for c in chars]


def _xavier(module: nn.Module) -> None:
    for name, p in module.named_parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)
        elif "bias" in name:
            nn.init.zeros_(p)


class NerTagger(nn.Module):
    def __init__(self, encoder: nn.Module, num_labels: int, head: str = "crf", lstm_hidden: int = 128,
                 dropout: float = 0.1, freeze_encoder: bool = False):
        super().__init__()
        if head not in NER_HEADS:
            raise KeplmError(f"unknown NER head {head!r}; expected one of {NER_HEADS}")
        self.encoder, self.head, self.freeze_encoder = encoder, head, freeze_encoder
        if freeze_encoder:
            encoder.requires_grad_(False)
        d = encoder.config.hidden_size
        self.dropout = nn.Dropout(dropout)
        self.lstm = None
        if head in ("lstm-crf", "bilstm-crf"):
            bi = head == "bilstm-crf"
            self.lstm = nn.LSTM(d, lstm_hidden, batch_first=True, bidirectional=bi)
            d = lstm_hidden * (2 if bi else 1)
        self.classifier = nn.Linear(d, num_labels)
        self.crf = CRF(num_labels, batch_first=True) if head != "fc" else None
        for m in (self.lstm, self.classifier):
            if m is not None:
                _xavier(m)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()  # a frozen feature extractor never uses dropout
        return self

    def head_parameters(self):
        return [p for n, p in self.named_parameters() if not n.startswith("encoder.")]

    def emissions(self, input_ids, attention_mask, lengths) -> torch.Tensor:
        """(B, n_max, num_labels) scores of the character positions 1..n."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoder):
            h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        n_max = int(lengths.max())
        h = self.dropout(h[:, 1:n_max + 1])
        if self.lstm is not None:
            packed = pack_padded_sequence(h, lengths.cpu(), batch_first=True, enforce_sorted=False)
            h, _ = pad_packed_sequence(self.lstm(packed)[0], batch_first=True, total_length=n_max)
        return self.classifier(h)

    def forward(self, input_ids, attention_mask, lengths, labels) -> torch.Tensor:
        """Mean loss per sentence: CRF negative log-likelihood, or token cross-entropy for FC."""
        em = self.emissions(input_ids, attention_mask, lengths)
        mask = torch.arange(em.size(1), device=em.device)[None] < lengths[:, None]
        labels = labels[:, :em.size(1)]
        if self.crf is None:
            return nn.functional.cross_entropy(em[mask].float(), labels[mask])
        return -self.crf(em.float(), labels, mask=mask, reduction="mean")

    @torch.no_grad()
    def decode(self, input_ids, attention_mask, lengths) -> list[list[int]]:
        em = self.emissions(input_ids, attention_mask, lengths).float()
        if self.crf is None:
            best = em.argmax(-1).tolist()
            return [row[:n] for row, n in zip(best, lengths.tolist())]
        mask = torch.arange(em.size(1), device=em.device)[None] < lengths[:, None]
        return self.crf.decode(em, mask=mask)


class PairClassifier(nn.Module):
    """Sentence-pair classification (question matching / NLI) from the pooled [CLS] state."""

    def __init__(self, encoder: nn.Module, num_labels: int = 2, dropout: float = 0.1, freeze_encoder: bool = False):
        super().__init__()
        self.encoder, self.freeze_encoder = encoder, freeze_encoder
        if freeze_encoder:
            encoder.requires_grad_(False)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)
        _xavier(self.classifier)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()
        return self

    def head_parameters(self):
        return [p for n, p in self.named_parameters() if not n.startswith("encoder.")]

    def logits(self, input_ids, attention_mask, token_type_ids) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoder):
            out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        pooled = out.pooler_output if out.pooler_output is not None else out.last_hidden_state[:, 0]
        return self.classifier(self.dropout(pooled))

    def forward(self, input_ids, attention_mask, token_type_ids, labels) -> torch.Tensor:
        return nn.functional.cross_entropy(self.logits(input_ids, attention_mask, token_type_ids).float(), labels)

    @torch.no_grad()
    def predict(self, input_ids, attention_mask, token_type_ids) -> list[int]:
        return self.logits(input_ids, attention_mask, token_type_ids).argmax(-1).tolist()
