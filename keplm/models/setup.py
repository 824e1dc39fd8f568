"""Assemble a pretraining setup — model + collator — from config and the stage outputs.

``model.kind``: ``smedbert`` (needs ``neighbours`` from ``kg neighbours`` and TransR ``embeddings`` from
``kg embed``), ``mlm`` (plain MLM + SOP), ``wem`` (the same network, whole-entity masking), ``ernie``
(entity fusion; needs entity ``embeddings``, TransE in the papers), ``kebiolm`` (KeBioLM: entity detection,
linking and fusion; TransE ``embeddings``), ``embert`` (EMBERT: the plain backbone with its three entity
objectives; needs the ``graph`` for the synonym thesaurus). The backbone starts from random
init, or from a local BERT checkpoint directory (``model.init``; never a hub name).

Composition: ``model.objectives`` puts EMBERT's objectives (``cecp``, ``est``, ``bem``) on any kind — e.g.
``kind: smedbert`` + ``objectives: [cecp, est, bem]`` + whole-entity masking trains SMedBERT's hybrid
attention, MNeM and MMeM together with EMBERT's heads on one backbone; each loss is reported on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field

from keplm.kg.segment import SegmentConfig
from keplm.models.baselines import KeplmBertConfig, KeplmBertForPreTraining
from keplm.models.data import KnowledgeCollator, KnowledgeIndex
from keplm.models.embert import EntityTasks
from keplm.models.kebiolm import KeBioLMConfig, KeBioLMForPreTraining
from keplm.models.smedbert import SMedBertConfig, SMedBertForPreTraining
from keplm.platform.config import Section, resolve_path
from keplm.platform.errors import KeplmError
from keplm.platform.tokenizer import load_tokenizer


class ModelConfig(Section):
    kind: Literal["smedbert", "mlm", "wem", "ernie", "kebiolm", "embert"] = Field(
        "smedbert", description="the model pretrained: SMedBERT, KeBioLM, EMBERT or a baseline (mlm, wem, ernie)")
    init: str | None = Field(None, description="local BERT checkpoint dir for the backbone; unset: random init")
    hidden_size: int = Field(768, description="BERT hidden size (ignored with init)")
    num_hidden_layers: int = Field(12, description="BERT encoder layers (ignored with init)")
    num_attention_heads: int = Field(12, description="attention heads per layer (ignored with init)")
    intermediate_size: int = Field(3072, description="feed-forward size (ignored with init)")
    max_position_embeddings: int = Field(512, description="longest sequence the model takes (ignored with init)")
    attn_implementation: Literal["sdpa", "eager"] = Field("sdpa", description="transformers attention kernel")
    hybrid_layer: int = Field(10, ge=1, description="SMedBERT: hybrid attention after this encoder layer")
    fusion_layer: int = Field(10, ge=1, description="ERNIE baseline: fusion after this encoder layer")
    mu: float = Field(10.0, description="SMedBERT µ: scale of the MNeM scores (eq. 19)")
    lambda_mnem: float = Field(2.0, description="SMedBERT λ1: weight of MNeM in the loss (eq. 22)")
    lambda_mmem: float = Field(4.0, description="SMedBERT λ2: weight of MMeM in the loss (eq. 22)")
    mnem_logq_scale: float | None = Field(None, description="c of −c·log Q in eq. 19; unset: µ (as printed)")
    mmem_reduction: Literal["mean", "sum"] = Field(
        "mean", description="SMedBERT eq. 21: mean = the mean squared error over dimensions and covered mentions "
                            "(the text's 'Mean-Squared Error'); sum = the printed Σ over dimensions and mentions")
    mmem_mentions: Literal["masked", "all"] = Field(
        "masked", description="SMedBERT MMeM on the mentions the MLM masked (the prose's 'the masked mention') "
                              "or on every linked mention (eq. 21's M_s)")
    use_type_attention: bool = Field(True, description="SMedBERT: type attention (eq. 3); false = Table 4's "
                                                       "-type_att")
    use_hybrid_attention: bool = Field(True, description="SMedBERT: hybrid knowledge attention; false = "
                                                         "-hybrid_att")
    use_knowledge_loss: bool = Field(True, description="SMedBERT: MNeM and MMeM losses; false = -know_loss")
    kg_trainable: bool = Field(False, description="SMedBERT: train the TransR entity/relation tensors too")
    text_layers: int = Field(8, ge=1, description="KeBioLM l0: text-only layers before detection/linking/fusion")
    top_k_entities: int = Field(100, ge=1, description="KeBioLM: entities in e'_m (eq. 3)")
    el_negatives: int | None = Field(None, ge=1, description="KeBioLM: sampled-softmax negatives for L_EL; "
                                                            "unset: exact softmax over all entities")
    entity_init: Literal["transe", "random"] = Field("transe", description="KeBioLM: random = the paper's +rand")
    freeze_entities: bool = Field(False, description="KeBioLM: the paper's +frz")
    lambda_ed: float = Field(1.0, ge=0, description="KeBioLM λ_ED: weight of entity detection (eq. 6)")
    lambda_el: float = Field(1.0, ge=0, description="KeBioLM λ_EL: weight of entity linking (eq. 6)")
    objectives: list[Literal["cecp", "est", "bem"]] | None = Field(
        None, description="EMBERT objectives on this backbone; unset: all three for embert, none for the others")
    lambda_cecp: float = Field(2.0, ge=0, description="EMBERT λ1")
    lambda_est: float = Field(2.0, ge=0, description="EMBERT λ2")
    lambda_bem: float = Field(0.5, ge=0, description="EMBERT λ3")
    bem_position_dim: int = Field(200, ge=1, description="EMBERT: relative position embeddings of the BEM head")
    bem_max_relative: int = Field(32, ge=1, description="EMBERT: relative positions beyond this are clipped")
    est_reduction: Literal["mean", "sum"] = Field(
        "mean", description="EMBERT L_est: mean over the batch's labelled entity tokens (the text's 'similar to "
                            "token-level MLM'); sum = eq. 5 as printed, summed per sentence, averaged over sentences")
    bem_reduction: Literal["mean", "sum"] = Field(
        "mean", description="EMBERT L_bem: mean over the batch's masked entity tokens ('similar to MLM'); "
                            "sum = eq. 8-9 as printed, summed per sentence, averaged over sentences")

    @property
    def entity_objectives(self) -> list[str]:
        if self.objectives is not None:
            return list(self.objectives)
        return ["cecp", "est", "bem"] if self.kind == "embert" else []


class BatchConfig(Section):
    k: int = Field(10, ge=1, description="neighbours per mention (a prefix of pepr.k_max)")
    mask_rate: float = Field(0.15, gt=0, lt=1, description="share of tokens the MLM corrupts (80/10/10)")
    whole_entity_masking: bool | None = Field(None, description="mask linked mentions whole first; unset: on "
                                                                "for smedbert, wem and kebiolm")
    max_mentions: int = Field(32, ge=1, description="mentions kept per row (extra ones counted)")
    num_negatives: int = Field(10, ge=1, description="SMedBERT: negatives per neighbour, drawn from Q(e) within its type")
    max_seq_len: int = Field(512, ge=8, description="tokens per row (capped by max_position_embeddings)")
    sop: bool = Field(True, description="sentence-order prediction pairs")
    seed: int = Field(0, description="seed of the collator's draws: masking, SOP swaps, negatives, replacements")
    cecp_rate: float = Field(0.3, ge=0, le=1, description="EMBERT: share of mentions replaced by a synonym or a "
                                                          "random entity for consistency prediction (not given in the paper)")
    bem_rate: float = Field(0.5, ge=0, le=1, description="EMBERT: share of long mentions with one term masked")
    segment: SegmentConfig = Field(default_factory=SegmentConfig, description="EMBERT's entity segmentation rules")


@dataclass
class PretrainingSetup:
    model: SMedBertForPreTraining | KeplmBertForPreTraining | KeBioLMForPreTraining
    collator: KnowledgeCollator
    tokenizer: object
    knowledge: KnowledgeIndex | None


def _backbone_kwargs(cfg: ModelConfig, vocab_size: int) -> dict:
    kw = dict(vocab_size=vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
              num_attention_heads=cfg.num_attention_heads, intermediate_size=cfg.intermediate_size,
              max_position_embeddings=cfg.max_position_embeddings)
    objective_kw = dict(entity_objectives=cfg.entity_objectives, lambda_cecp=cfg.lambda_cecp, lambda_est=cfg.lambda_est,
                        lambda_bem=cfg.lambda_bem, bem_position_dim=cfg.bem_position_dim,
                        bem_max_relative=cfg.bem_max_relative, est_reduction=cfg.est_reduction,
                        bem_reduction=cfg.bem_reduction)
    if cfg.init:
        from transformers import BertConfig

        base = BertConfig.from_pretrained(str(resolve_path(cfg.init)), local_files_only=True).to_dict()
        kw.update({k: base[k] for k in kw if k in base})
        if base.get("vocab_size") != vocab_size:
            raise KeplmError(f"model.init {cfg.init} has vocab_size {base.get('vocab_size')}, the corpus tokenizer "
                             f"{vocab_size}; prepare with that checkpoint's vocab (prepare.tokenizer)")
    return {**kw, **objective_kw}


def needs_graph(cfg: ModelConfig) -> bool:
    """EMBERT's consistency prediction draws synonyms from the graph stage's aliases; segmentation its names."""
    return bool(cfg.entity_objectives)


def build_pretraining_setup(cfg: ModelConfig, batches: BatchConfig, prepare_dir: str | Path,
                            neighbours_dir: str | Path | None = None, embed_dir: str | Path | None = None,
                            arrays: dict | None = None, knowledge: KnowledgeIndex | None = None,
                            graph_dir: str | Path | None = None, entity_tasks: EntityTasks | None = None) -> PretrainingSetup:
    """``arrays`` / ``knowledge`` / ``entity_tasks``: already loaded KG tensors / neighbour index / EMBERT
    thesaurus (Ray workers get them from the object store, once per node) instead of reading
    ``embed_dir`` / ``neighbours_dir`` / ``graph_dir``."""
    from keplm.kg.embed import load_embeddings

    def embeddings():
        return arrays if arrays is not None else load_embeddings(embed_dir)

    tok = load_tokenizer(str(Path(prepare_dir) / "tokenizer"))
    vocab = len(tok)
    kw = _backbone_kwargs(cfg, vocab)
    if cfg.kind == "smedbert":
        if (neighbours_dir is None and knowledge is None) or (embed_dir is None and arrays is None):
            raise KeplmError("model.kind=smedbert needs --neighbours (kg neighbours) and --embeddings (kg embed, TransR)")
        knowledge = knowledge or KnowledgeIndex.load(neighbours_dir)
        arrays = embeddings()
        if "relation_proj" not in arrays:
            raise KeplmError(f"{embed_dir}: SMedBERT needs TransR embeddings (relation_proj); got TransE")
        ent, rel, proj = arrays["entity_emb"], arrays["relation_emb"], arrays["relation_proj"]
        if ent.shape[0] != knowledge.num_entities or rel.shape[0] != knowledge.num_relations:
            raise KeplmError(f"{embed_dir} ({ent.shape[0]} entities, {rel.shape[0]} relations) and {neighbours_dir} "
                             f"({knowledge.num_entities}, {knowledge.num_relations}) come from different graphs")
        config = SMedBertConfig(**kw, num_entities=ent.shape[0], num_relations=rel.shape[0],
                                num_entity_types=len(knowledge.type_names), kg_dim=ent.shape[1], kg_relation_dim=rel.shape[1],
                                hybrid_layer=cfg.hybrid_layer, mu=cfg.mu, lambda_mnem=cfg.lambda_mnem,
                                lambda_mmem=cfg.lambda_mmem, mnem_logq_scale=cfg.mnem_logq_scale,
                                mmem_reduction=cfg.mmem_reduction, mmem_mentions=cfg.mmem_mentions,
                                use_type_attention=cfg.use_type_attention, use_hybrid_attention=cfg.use_hybrid_attention,
                                use_knowledge_loss=cfg.use_knowledge_loss, kg_trainable=cfg.kg_trainable)
        config._attn_implementation = cfg.attn_implementation
        model = SMedBertForPreTraining(config)
        model.load_kg(ent, rel, proj)
    elif cfg.kind == "kebiolm":
        knowledge = None
        if embed_dir is None and arrays is None:
            raise KeplmError("model.kind=kebiolm needs --embeddings (kg embed, TransE: entity_emb)")
        ent = embeddings()["entity_emb"]
        config = KeBioLMConfig(**kw, num_entities=ent.shape[0], entity_dim=ent.shape[1],
                               text_layers=min(cfg.text_layers, kw["num_hidden_layers"]), entity_top_k=cfg.top_k_entities,
                               el_negatives=cfg.el_negatives, entity_trainable=not cfg.freeze_entities,
                               lambda_ed=cfg.lambda_ed, lambda_el=cfg.lambda_el)
        config._attn_implementation = cfg.attn_implementation
        model = KeBioLMForPreTraining(config)
        if cfg.entity_init == "transe":
            model.load_kg(ent)
    else:
        knowledge = None
        fusion = cfg.kind == "ernie"
        ent = None
        if fusion:
            if embed_dir is None and arrays is None:
                raise KeplmError("model.kind=ernie needs --embeddings (kg embed: entity_emb)")
            ent = embeddings()["entity_emb"]
        config = KeplmBertConfig(**kw, entity_fusion=fusion, fusion_layer=cfg.fusion_layer,
                                 num_entities=ent.shape[0] if fusion else 1, entity_dim=ent.shape[1] if fusion else 1,
                                 kg_trainable=cfg.kg_trainable)
        config._attn_implementation = cfg.attn_implementation
        model = KeplmBertForPreTraining(config)
        if fusion:
            model.load_kg(ent)
    if cfg.init:
        from transformers import BertModel

        backbone = BertModel.from_pretrained(str(resolve_path(cfg.init)), local_files_only=True)
        missing, unexpected = model.bert.load_state_dict(backbone.state_dict(), strict=False)
        if unexpected or [m for m in missing if not m.startswith("pooler")]:
            raise KeplmError(f"model.init {cfg.init}: weights do not fit (missing {missing[:3]}, unexpected {unexpected[:3]})")
    objectives = cfg.entity_objectives
    if objectives and entity_tasks is None:
        if graph_dir is None:
            raise KeplmError(f"model objectives {objectives} need the graph stage (kg build: names and aliases)")
        entity_tasks = EntityTasks.build(graph_dir, tok, batches.segment)
    wem = batches.whole_entity_masking if batches.whole_entity_masking is not None else cfg.kind in ("smedbert", "wem", "kebiolm")
    collator = KnowledgeCollator(
        tok.cls_token_id, tok.sep_token_id, tok.mask_token_id, tok.pad_token_id, vocab, knowledge=knowledge,
        mask_rate=batches.mask_rate, whole_entity_masking=wem, k=batches.k, max_mentions=batches.max_mentions,
        num_negatives=batches.num_negatives, max_seq_len=min(batches.max_seq_len, kw["max_position_embeddings"]),
        sop=batches.sop, special_ids=tuple(tok.all_special_ids), seed=batches.seed,
        entity_tasks=entity_tasks if objectives else None,
        cecp_rate=batches.cecp_rate if "cecp" in objectives else 0.0,
        bem_rate=batches.bem_rate if "bem" in objectives else 0.0)
    return PretrainingSetup(model, collator, tok, knowledge)


def build_for_worker(context: dict):
    """The ``build`` of keplm.platform.train_loop: model + collator on a Ray Train worker."""
    import ray

    arrays = ray.get(context["arrays"]) if context.get("arrays") is not None else None
    knowledge = ray.get(context["knowledge"]) if context.get("knowledge") is not None else None
    tasks = ray.get(context["entity_tasks"]) if context.get("entity_tasks") is not None else None
    setup = build_pretraining_setup(ModelConfig(**context["model"]), BatchConfig(**context["batches"]),
                                    context["prepare_dir"], arrays=arrays, knowledge=knowledge, entity_tasks=tasks)
    return setup.model, setup.collator
