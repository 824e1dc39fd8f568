"""A keplm checkpoint as a plain BERT checkpoint that stock transformers loads without keplm installed.

Every keplm model keeps the same BERT trunk under ``bert.*`` (embeddings and all encoder layers) and BERT's MLM
head under ``cls.predictions.*`` (tied to the word embeddings). What the kinds add around them is dropped:

- SMedBERT: the KG tensors (``kg.*``), the hybrid attention (``hybrid.*``) and the MNeM / MMeM pooling
  (``ctx_pool``, ``w_sa``, ``ln_sa``);
- KeBioLM: the entity table (``entity_emb``), detection, mention projection and ``entity_out`` — its l1
  fusion layers are ordinary encoder layers of the trunk and are kept;
- ERNIE baseline: the fusion layer (``fusion.*``) and the entity table;
- EMBERT's objectives (``entity_objectives.*``), on any kind;
- the SOP head (``cls.seq_relationship``) and the pooler (``bert.pooler``) it reads, which BertForMaskedLM has not.

The knowledge modules act *between* encoder layers (``run_bert(..., after_layer=, hook=)``): the exported BERT
runs the same layers without the hook. It reads text the same way, and on a batch where no hook acts (no linked
mention: all downstream use) its hidden states and MLM logits are the full model's; where a hook acted during
pretraining-style inputs they differ from the layer after the hook on.

Formats (``--as``): ``bert-mlm`` (default) is ``BertForMaskedLM`` — AutoModelForMaskedLM and the fill-mask
pipeline load it cleanly; AutoModel / AutoModelForTokenClassification report its MLM head as unused, as they do
for any BERT masked-LM checkpoint. ``bert-encoder`` is the trunk alone (``BertModel`` without pooler): AutoModel,
AutoModelForTokenClassification and AutoModelForSequenceClassification load it with nothing unused, only their
new heads (and the pooler) initialised.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal

from pydantic import Field

from keplm.platform.config import Section
from keplm.platform.errors import KeplmError
from keplm.platform.outputs import mark, remove_owned

FORMATS = {"bert-mlm": "BertForMaskedLM", "bert-encoder": "BertModel"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "added_tokens.json")
# what each keplm model type adds around the trunk, by the top-level name of its parameters (for the card)
MODULE_NAMES = {
    "kg": "SMedBERT KG tensors (Γent, Γrel, M_r)", "hybrid": "SMedBERT hybrid attention (§3.3)",
    "ctx_pool": "SMedBERT MNeM/MMeM span pooling f_sp", "w_sa": "SMedBERT W_sa", "ln_sa": "SMedBERT LN_sa",
    "entity_emb": "entity embeddings", "fusion": "ERNIE-style fusion layer", "detect": "KeBioLM entity detection",
    "mention_proj": "KeBioLM mention projection", "entity_out": "KeBioLM entity fusion W_e",
    "entity_objectives": "EMBERT heads (CECP, EST, BEM)", "cls.seq_relationship": "SOP head",
    "cls.predictions": "MLM head",
    "bert.pooler": "pooler (read by the SOP head)",
}
TIED = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")


class ExportConfig(Section):
    after_pretrain: bool = Field(True, description="keplm pretrain also writes DIR/model-bert, the plain BERT "
                                                   "export of DIR/model (format export.format); false: DIR/model only")
    format: Literal["bert-mlm", "bert-encoder"] = Field(
        "bert-mlm", description="bert-mlm: BertForMaskedLM (trunk + MLM head; fill-mask); bert-encoder: BertModel, "
                                "the trunk alone (no MLM head: nothing unused when loaded for a downstream task)")
    language: str = Field("zh", description="the model card's language (ISO 639-1)")
    license: str = Field("other", description="the model card's license (a Hugging Face license id, or other)")


def read_config(model_dir: str | Path) -> dict:
    p = Path(model_dir) / "config.json"
    if not p.is_file():
        raise KeplmError(f"{model_dir}: not a model directory (no config.json)")
    return json.loads(p.read_text(encoding="utf-8"))


def weight_files(model_dir: str | Path) -> list[Path]:
    d = Path(model_dir)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [d / n for n in names]
    if (d / "model.safetensors").is_file():
        return [d / "model.safetensors"]
    raise KeplmError(f"{d}: no model.safetensors (keplm checkpoints are safetensors)")


def tensor_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Every stored tensor's shape, from the safetensors headers (nothing loaded)."""
    from safetensors import safe_open

    out: dict[str, tuple[int, ...]] = {}
    for f in weight_files(model_dir):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                out[k] = tuple(sf.get_slice(k).get_shape())
    return out


def keeps(key: str, fmt: str) -> bool:
    """Is ``key`` of a keplm checkpoint part of the export ``fmt``?"""
    if key.startswith("bert.") and not key.startswith("bert.pooler."):
        return True
    return fmt == "bert-mlm" and key.startswith("cls.predictions.") and key not in TIED


def module_of(key: str) -> str:
    for name in MODULE_NAMES:
        if key == name or key.startswith(name + "."):
            return name
    return key.split(".")[0]


def split_parameters(shapes: dict[str, tuple[int, ...]], fmt: str) -> tuple[int, dict[str, int]]:
    """-> (parameters kept, {dropped module: parameters}) for a checkpoint's tensor shapes."""
    import math

    kept, dropped = 0, {}
    for k, shape in shapes.items():
        n = math.prod(shape)
        if keeps(k, fmt):
            kept += n
        elif k not in TIED:
            dropped[module_of(k)] = dropped.get(module_of(k), 0) + n
    return kept, dropped


def bert_config(source: dict, fmt: str):
    """The BertConfig of the export: the source config's BERT keys, model_type bert, one architecture."""
    from transformers import BertConfig

    allowed = set(BertConfig().to_dict()) - {"architectures", "model_type", "transformers_version", "dtype",
                                             "torch_dtype", "_name_or_path"}
    config = BertConfig(**{k: v for k, v in source.items() if k in allowed})
    config.architectures = [FORMATS[fmt]]
    return config


def _load_trunk(model_dir: Path, fmt: str) -> dict:
    from safetensors.torch import load_file

    state: dict = {}
    for f in weight_files(model_dir):
        state.update({k: v for k, v in load_file(str(f)).items() if keeps(k, fmt)})
    if not any(k.startswith("bert.encoder.") for k in state):
        raise KeplmError(f"{model_dir}: no BERT trunk (bert.encoder.*) in the weights")
    if fmt == "bert-mlm" and not any(k.startswith("cls.predictions.") for k in state):
        raise KeplmError(f"{model_dir}: no MLM head (cls.predictions.*): export it --as bert-encoder")
    return state


def export_bert(checkpoint: str | Path, output: str | Path, fmt: str = "bert-mlm",
                tokenizer_dir: str | Path | None = None) -> dict:
    """Write the plain BERT export of ``checkpoint`` to ``output`` (replaced if present): weights (safetensors),
    config.json (model_type bert) and the tokenizer files (the checkpoint's, or ``tokenizer_dir``'s).
    -> what was kept and dropped (for the card)."""
    import torch
    from transformers import BertForMaskedLM, BertModel

    src, out = Path(checkpoint), Path(output)
    if fmt not in FORMATS:
        raise KeplmError(f"unknown export format {fmt!r}; expected one of {sorted(FORMATS)}")
    if out.resolve() == src.resolve():
        raise KeplmError(f"{out}: the export cannot overwrite its checkpoint")
    source = read_config(src)
    tok_src = Path(tokenizer_dir) if tokenizer_dir else src
    tokenizer = [n for n in TOKENIZER_FILES if (tok_src / n).is_file()]
    if not tokenizer:
        raise KeplmError(f"{tok_src}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); pass the tokenizer "
                         "directory (a keplm prepare output's tokenizer/)")
    state = _load_trunk(src, fmt)
    if fmt == "bert-encoder":
        state = {k.removeprefix("bert."): v for k, v in state.items()}
    config = bert_config(source, fmt)
    with torch.random.fork_rng(devices=[]):   # the random init is overwritten; leave the caller's RNG as it was
        model = BertForMaskedLM(config) if fmt == "bert-mlm" else BertModel(config, add_pooling_layer=False)
    dtype = next(iter(state.values())).dtype
    model.to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in TIED]
    if missing or unexpected:
        raise KeplmError(f"{src}: its trunk does not fit a BERT of its config (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    if fmt == "bert-mlm" and model.cls.predictions.decoder.weight.data_ptr() != \
            model.bert.embeddings.word_embeddings.weight.data_ptr():
        raise KeplmError("BertForMaskedLM did not tie its decoder to the word embeddings")
    # written beside OUT, then swapped in: a failed export leaves the previous one whole; only an export keplm
    # made (its marker) or an entry of a keplm output directory is ever replaced, never a user's directory
    tmp = out.with_name(out.name + ".partial")
    remove_owned(tmp)
    mark(tmp, "export")
    model.save_pretrained(str(tmp))
    for name in tokenizer:
        shutil.copy2(tok_src / name, tmp / name)
    remove_owned(out)
    tmp.rename(out)
    kept, dropped = split_parameters(tensor_shapes(src), fmt)
    return {"format": fmt, "architecture": FORMATS[fmt], "source": str(src), "output": str(out),
            "parameters": kept, "dropped": dropped, "source_model_type": source.get("model_type"),
            "tokenizer_files": tokenizer}
