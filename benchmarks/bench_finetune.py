"""NER fine-tuning and inference throughput (sentences/s) of the FC head vs the CRF head, same run.
Prints one JSON line.

The encoder is a random-init BERT saved to a temp dir (``--shape tiny``: 2 layers, d=128; ``base``:
BERT-base), with the real 21 K Chinese vocab when ../shared/data has it, else a vocab of the data's
characters. Data: cMedQANER train/test from ../shared/data when present, else the toy sentences
repeated. Both heads see the same sentences, batch size and max length; fine-tuning = forward + backward
+ AdamW step over ``--train`` sentences (one epoch; counted in windows of <= max-len characters, and most
cMedQANER sentences are one window); inference = decode of the whole test set, counted in sentences
(long ones are several windows, so the two rates are not comparable with each other — compare heads).
The CRF's extra cost is the forward algorithm / Viterbi over the label lattice; the baseline is FC.

    python benchmarks/bench_finetune.py [--shape tiny] [--train 512] [--batch 32] [--max-len 128]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT / "tests"))

SHAPES = {"tiny": dict(hidden=128, layers=2), "base": dict(hidden=768, layers=12)}


def main() -> None:
    from test_downstream import make_tiny_bert, toy_set

    from keplm.models.downstream.data import read_ner
    from keplm.models.downstream.finetune import FinetuneConfig, finetune_ner

    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=SHAPES, default="tiny")
    ap.add_argument("--train", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    real = (SHARED / "ner" / "cmedqaner" / "train.txt.gz").is_file()
    if real:
        train = read_ner(SHARED / "ner" / "cmedqaner" / "train.txt.gz")
        test = read_ner(SHARED / "ner" / "cmedqaner" / "test.txt.gz")
        vocab = (SHARED / "vocab" / "bert-base-chinese-vocab.txt").read_text(encoding="utf-8").split("\n")[5:]
    else:
        train, test = toy_set(200), toy_set(50)
        vocab = sorted({c for s in train.sentences for c in s})
    shape = SHAPES[args.shape]
    out = {"bench": "finetune", "data": "cmedqaner" if real else "toy", "shape": args.shape,
           "batch": args.batch, "max_len": args.max_len, "train_sentences": min(args.train, len(train)),
           "test_sentences": len(test), "threads": args.threads}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny_bert(Path(tmp) / "m", vocab, hidden=shape["hidden"], layers=shape["layers"])
        for head in ("fc", "crf"):
            cfg = FinetuneConfig(head=head, epochs=1, batch_size=args.batch, max_seq_len=args.max_len,
                                 train_subset=args.train, dev_subset=8, eval_every=10**9)
            t0 = time.perf_counter()
            r = finetune_ner(model_dir, train, train.subset(8), test, cfg, seed=0)
            out[f"{head}_train_sentences_per_s"] = round(r["train_examples_per_s"], 1)
            out[f"{head}_infer_sentences_per_s"] = round(r["test_sentences_per_s"], 1)
            out[f"{head}_wall_s"] = round(time.perf_counter() - t0, 2)
    out["crf_vs_fc_train"] = round(out["crf_train_sentences_per_s"] / out["fc_train_sentences_per_s"], 3)
    out["crf_vs_fc_infer"] = round(out["crf_infer_sentences_per_s"] / out["fc_infer_sentences_per_s"], 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
