"""`keplm kg embed`: TransR / TransE KG embeddings with PyKEEN's own pipeline, as a Ray task.

TransR (Lin et al. 2015; SMedBERT's Γent, Γrel and projection matrices M_r, d2 = 200) scores a triple
by ``-||h·M_r + r - t·M_r||``; TransE (KeBioLM: dim 100, L2) by ``-||h + r - t||``. The kept triples of
``kg build`` are split train/validation/test (PyKEEN's split keeps every entity in train); the test split
gives filtered MRR and Hits@1/3/10 (both sides, realistic ranks), logged to the manifest and to MLflow. The models
are PyKEEN's own with faster all-entity ranking and TransR training (keplm.kg.scoring); both batch sizes are set
(``batch_size``, ``eval_batch_size``), never left to PyKEEN's CPU fallbacks.

Output (schema version 1)::

    embeddings.safetensors   entity_emb (Z, d) float32 — row i is entity id i of entities.parquet
                             relation_emb (R, d_r) float32 — row j is relation id j of relations.parquet
                             relation_proj (R, d, d_r) float32 — TransR only: h·M_r is h @ relation_proj[j]
    entities.parquet, relations.parquet   copied from the graph (the id order above)
    manifest.json            counts: triples_train/valid/test, evaluated_test_triples, mrr, hits_at_1/3/10,
                             random_hits_at_10 (what a random ranking would score), epochs, seconds
                             (train_seconds, eval_seconds), eval_batch_size, device

Entities in no triple (isolated) keep their random initial embedding (counted: ``isolated_entities``).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from keplm.kg.graph import Graph, load_graph
from keplm.platform.config import Section
from keplm.platform.errors import KeplmError
from keplm.platform.manifest import hash_inputs, write_manifest
from keplm.platform.tracking import TrackingConfig, log_run

log = logging.getLogger(__name__)

EMBED_SCHEMA_VERSION = 1
DEFAULT_DIMS = {"transr": (200, 200), "transe": (100, 100)}


class EmbedConfig(Section):
    model: Literal["transr", "transe"] = Field("transr", description="TransR (SMedBERT) or TransE (KeBioLM, "
                                                                  "ERNIE); --model overrides")
    dim: int | None = Field(None, ge=1, description="entity dim; default 200 (TransR, SMedBERT d2) / 100 (TransE)")
    relation_dim: int | None = Field(None, ge=1, description="TransR relation space; default 200")
    norm: int = Field(2, ge=1, le=2, description="p of the distance (L2 as KeBioLM)")
    epochs: int = Field(30, ge=1, description="training epochs over the train split")
    batch_size: int = Field(2048, ge=1, description="triples per training batch")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    negatives_per_positive: int = Field(1, ge=1, description="corrupted triples drawn per training triple")
    split: tuple[float, float, float] = Field((0.8, 0.1, 0.1), description="train/validation/test shares of the "
                                              "triples (every entity stays in train)")
    eval_max_triples: int | None = Field(5000, ge=1, description="rank at most this many test triples")
    eval_batch_size: int | None = Field(None, ge=1, description="test triples ranked at once against every entity "
                                        "(PyKEEN's evaluator batch); unset: the most whose scores fit 256 MB "
                                        "(2^26 / entities, a power of two from 16 to 4,096: 2,048 for 25 K "
                                        "entities, 128 for 275 K) instead of PyKEEN's CPU fallback of 32")
    seed: int = Field(42, description="seed of the split, initialisation and negative sampling")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: a GPU when the cluster has one")


EVAL_SCORES_PER_BATCH = 2 ** 26   # float32 scores of one evaluation batch (batch x entities): 256 MB


def eval_batch_size(cfg: EmbedConfig, num_entities: int) -> int:
    """embed.eval_batch_size, or the largest power of two from 16 to 4,096 whose (batch x entities) scores stay
    within EVAL_SCORES_PER_BATCH: keplm's TransE / TransR rank a batch with one such matrix (keplm.kg.scoring)."""
    if cfg.eval_batch_size:
        return cfg.eval_batch_size
    fit = max(1, EVAL_SCORES_PER_BATCH // max(1, num_entities))
    return int(min(4096, max(16, 2 ** (fit.bit_length() - 1))))


def _dims(cfg: EmbedConfig) -> tuple[int, int]:
    d, dr = DEFAULT_DIMS[cfg.model]
    return cfg.dim or d, (cfg.relation_dim or cfg.dim or dr) if cfg.model == "transr" else (cfg.dim or d)


def model_kwargs(cfg: EmbedConfig) -> dict:
    """The PyKEEN model's own arguments: dims and the distance's p."""
    dim, rdim = _dims(cfg)
    kwargs = {"embedding_dim": dim, "scoring_fct_norm": cfg.norm}
    if cfg.model == "transr":
        kwargs["relation_dim"] = rdim
    return kwargs


def pipeline_kwargs(cfg: EmbedConfig, device: str, num_entities: int) -> dict:
    """Everything the stage hands PyKEEN's ``pipeline`` besides the triples (benchmarks/bench_kg_embed.py times the
    same call against ``pipeline``'s defaults)."""
    from keplm.kg.scoring import RankingTransE, RankingTransR

    return dict(
        # PyKEEN's TransR / TransE, ranking against all entities with a product per relation (keplm.kg.scoring)
        model=RankingTransR if cfg.model == "transr" else RankingTransE, model_kwargs=model_kwargs(cfg),
        optimizer="Adam", optimizer_kwargs={"lr": cfg.lr},
        negative_sampler="basic", negative_sampler_kwargs={"num_negs_per_pos": cfg.negatives_per_positive},
        # both batch sizes set: left unset, PyKEEN takes 256 (training) and 32 (evaluation) on CPU, and on a GPU
        # searches for the largest that fits, re-running the first batches
        training_kwargs={"num_epochs": cfg.epochs, "batch_size": cfg.batch_size, "use_tqdm": False},
        evaluation_kwargs={"use_tqdm": False, "batch_size": eval_batch_size(cfg, num_entities)},
        random_seed=cfg.seed, device=device, use_tqdm=False,
    )


def train_embeddings(mapped: np.ndarray, entity_names: list[str], relation_names: list[str], cfg: EmbedConfig) -> dict:
    """PyKEEN pipeline on id triples (N x 3, our ids) -> arrays + metrics. Runs where it is called."""
    import torch
    from pykeen.pipeline import pipeline
    from pykeen.triples import TriplesFactory

    device = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
    tf = TriplesFactory(
        # a copy: ``mapped`` comes read-only from Ray's object store, and torch.as_tensor would share it (and warn)
        mapped_triples=torch.tensor(mapped, dtype=torch.long),
        entity_to_id={n: i for i, n in enumerate(entity_names)},
        relation_to_id={n: i for i, n in enumerate(relation_names)},
        num_entities=len(entity_names), num_relations=len(relation_names),
    )
    train, valid, test = tf.split(list(cfg.split), random_state=cfg.seed)
    evaluated = test
    if cfg.eval_max_triples and test.num_triples > cfg.eval_max_triples:
        g = torch.Generator().manual_seed(cfg.seed)
        keep = torch.randperm(test.num_triples, generator=g)[: cfg.eval_max_triples]
        evaluated = test.clone_and_exchange_triples(test.mapped_triples[keep])
    t = time.perf_counter()
    result = pipeline(training=train, validation=valid, testing=evaluated,
                      **pipeline_kwargs(cfg, device, len(entity_names)))
    seconds = time.perf_counter() - t
    model = result.model.eval()
    with torch.no_grad():
        arrays = {
            "entity_emb": model.entity_representations[0](indices=None).detach().float().cpu().numpy(),
            "relation_emb": model.relation_representations[0](indices=None).detach().float().cpu().numpy(),
        }
        if cfg.model == "transr":
            arrays["relation_proj"] = model.relation_representations[1](indices=None).detach().float().cpu().numpy()
    mr = result.metric_results
    metrics = {
        "mrr": float(mr.get_metric("both.realistic.inverse_harmonic_mean_rank")),
        **{f"hits_at_{k}": float(mr.get_metric(f"both.realistic.hits_at_{k}")) for k in (1, 3, 10)},
    }
    counts = {
        "triples_train": train.num_triples, "triples_valid": valid.num_triples, "triples_test": test.num_triples,
        "evaluated_test_triples": evaluated.num_triples, "epochs": cfg.epochs, "seconds": round(seconds, 2),
        "train_seconds": round(result.train_seconds, 2), "eval_seconds": round(result.evaluate_seconds, 2),
        "eval_batch_size": eval_batch_size(cfg, len(entity_names)),
        "device": device, "final_loss": float(result.losses[-1]) if result.losses else None,
    }
    return {"arrays": arrays, "metrics": metrics, "counts": counts}


def save_embeddings(arrays: dict[str, np.ndarray], out_dir: Path) -> Path:
    from safetensors.numpy import save_file

    path = out_dir / "embeddings.safetensors"
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()}, str(path))
    return path


def load_embeddings(embed_dir: str | Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    path = Path(embed_dir) / "embeddings.safetensors"
    if not path.is_file():
        raise KeplmError(f"{embed_dir}: no embeddings.safetensors (run keplm kg embed)")
    return load_file(str(path))


def run_embed(graph_dir: str | Path, out_dir: str | Path, cfg: EmbedConfig, config_dump: dict,
              tracking: TrackingConfig | None = None) -> dict:
    """Train on a Ray task (a GPU one when the cluster has GPUs and device allows); Ray must be connected."""
    import ray

    graph: Graph = load_graph(graph_dir)
    if graph.triples.num_rows < 10:
        raise KeplmError(f"{graph_dir}: {graph.triples.num_rows} triples are too few to split and train on")
    mapped = np.stack([graph.triples.column(c).to_numpy() for c in ("head", "relation", "tail")], axis=1)
    names = graph.entities.column("name").to_pylist()
    rel_names = graph.relations.column("name").to_pylist()
    gpus = 1 if cfg.device != "cpu" and ray.cluster_resources().get("GPU", 0) >= 1 else 0
    if cfg.device == "cuda" and not gpus:
        raise KeplmError("embed.device=cuda but the Ray cluster has no GPU")
    task = ray.remote(num_cpus=1, num_gpus=gpus)(train_embeddings)
    result = ray.get(task.remote(mapped, names, rel_names, cfg))

    from keplm.platform.outputs import staged

    dim, rdim = _dims(cfg)
    counts = {
        **result["counts"], **result["metrics"],
        "random_hits_at_10": min(1.0, 10 / graph.num_entities),
        "entities": graph.num_entities, "relations": graph.relations.num_rows,
        "isolated_entities": int((graph.degree == 0).sum()), "dim": dim, "relation_dim": rdim,
    }
    with staged(out_dir, "kg_embed") as out:   # published into out_dir, manifest last, on success
        save_embeddings(result["arrays"], out)
        for name in ("entities.parquet", "relations.parquet"):
            shutil.copy(Path(graph_dir) / name, out / name)
        write_manifest(out, "kg_embed", EMBED_SCHEMA_VERSION, config_dump, hash_inputs([str(graph_dir)]), counts)
    if tracking is not None:
        log_run(tracking, f"kg-embed-{cfg.model}", config_dump,
                {f"kg_embed.{k}": v for k, v in result["metrics"].items()}, tags={"keplm.job": "kg_embed"})
    return counts
