"""KG embeddings: training and evaluation triples/s of the `kg embed` stage against PyKEEN's own ``pipeline()`` at
its defaults, on the same triples, for TransR and TransE at the papers' dims. Prints one JSON line.

Graphs: the real KG (../shared/data/kg, built by ``kg build``; skipped when absent) and a synthetic power-law graph
of the SMedBERT KG's size (275 K entities, 4.4 M triples, 20 relations: bench_pepr.synthetic_graph). Rates, not
full training: each run trains one epoch on ``--train-triples`` triples of the graph (all entities in the model)
and ranks ``--eval-triples`` others against every entity, both sides, filtered by the training triples. PyKEEN's
defaults rank fewer (``--pykeen-eval``, ``--synthetic-pykeen-eval``): their TransR evaluation runs at a few
triples a second. The job's evaluation rate includes projecting every entity once per relation, a fixed cost
that the stage's 5,000 test triples amortise better than these few hundred.

* ``job``: ``pipeline(**keplm.kg.embed.pipeline_kwargs(cfg))``, what the stage runs, at the default ``embed``
  config (TransR d = d_r = 200 as SMedBERT, TransE d = 100 as KeBioLM; batch 2,048; the evaluation batch of
  ``eval_batch_size``; keplm.kg.scoring's ranking models) with ``epochs=1``;
* ``pykeen``: ``pipeline(model="TransR"|"TransE", model_kwargs=<the same dims>, training_kwargs={"num_epochs": 1})``,
  all else PyKEEN's defaults but its progress bars (training batch 256 and evaluation batch 32 on CPU; on a GPU,
  searched).

Each pair runs ``--rounds`` times, interleaved, in one thread (``--threads``; the stage is a Ray task of one CPU,
which Ray gives one OpenMP thread); figures are medians with the rounds' range. On the synthetic graph PyKEEN's
TransR evaluation holds batch x 275 K x 200 floats several times over (a batch of 32: 7 GB each), so it ranks
only ``--synthetic-pykeen-eval`` triples (a smaller batch, the same work per triple); each pair runs
``--synthetic-rounds`` times there. With a GPU the same runs
are repeated on it (``gpu_...``).

    python benchmarks/bench_kg_embed.py [--models transr,transe] [--graphs real,synthetic] [--rounds 2]
        [--train-triples 20000] [--eval-triples 1024] [--pykeen-eval 64] [--synthetic-rounds 1]
        [--synthetic-train-triples 4096] [--synthetic-eval-triples 256] [--synthetic-pykeen-eval 8]
        [--threads 1] [--skip-gpu]
    python benchmarks/bench_kg_embed.py --quality [--quality-epochs 30] [--quality-eval-triples 5000]

``--quality``: instead of rates, the stage's own training and evaluation on the real KG (its 80/10/10 split, 30
epochs by default: KeBioLM's TransE settings, Adam 1e-3, batch 2,048, L2, used for SMedBERT's TransR too, whose
paper gives only d2 = 200), TransR and TransE side by side: filtered MRR and Hits@1/3/10 on 5,000 test triples.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED_KG = ROOT.parent / "shared" / "data" / "kg"


def real_graph():
    from keplm.kg.graph import GraphConfig, build_graph, load_graph

    with tempfile.TemporaryDirectory() as tmp:
        build_graph(SHARED_KG, Path(tmp) / "g", GraphConfig(), {})
        g = load_graph(Path(tmp) / "g")
        mapped = np.stack([g.triples.column(c).to_numpy() for c in ("head", "relation", "tail")], axis=1)
        return mapped, g.num_entities, g.relations.num_rows


def synthetic_graph():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_pepr import synthetic_graph as power_law

    h, r, t = power_law(275_000, 4_400_000, 20)
    return np.stack([h, r, t], axis=1), 275_000, 20


def factories(mapped: np.ndarray, n: int, r: int, n_train: int, n_eval: int, seed: int = 0):
    """``n_train`` + ``n_eval`` distinct triples drawn at random: a training and an evaluation factory over all
    ``n`` entities (the model holds every entity whether or not the drawn triples touch it)."""
    import torch
    from pykeen.triples import TriplesFactory

    rng = np.random.default_rng(seed)
    pick = mapped[rng.choice(len(mapped), n_train + n_eval, replace=False)]

    def make(rows):
        return TriplesFactory(mapped_triples=torch.tensor(rows, dtype=torch.long),
                              entity_to_id={str(i): i for i in range(n)}, relation_to_id={str(i): i for i in range(r)},
                              num_entities=n, num_relations=r)

    return make(pick[:n_train]), make(pick[n_train:])


def run(kind: str, model: str, train, test, device: str) -> dict:
    """One epoch on ``train``, then the filtered ranking of ``test``: the stage's pipeline call or PyKEEN's defaults."""
    from pykeen.pipeline import pipeline

    from keplm import config
    from keplm.kg.embed import eval_batch_size, model_kwargs, pipeline_kwargs

    cfg = config.load(None, [f"embed.model={model}", "embed.epochs=1"]).embed
    if kind == "job":
        kwargs = pipeline_kwargs(cfg, device, train.num_entities)
        batch = (cfg.batch_size, eval_batch_size(cfg, train.num_entities))
    else:
        kwargs = dict(model="TransR" if model == "transr" else "TransE", model_kwargs=model_kwargs(cfg),
                      training_kwargs={"num_epochs": 1, "use_tqdm": False}, evaluation_kwargs={"use_tqdm": False},
                      device=device, random_seed=cfg.seed, use_tqdm=False)
        batch = (256, 32) if device == "cpu" else ("searched", "searched")
    t = time.perf_counter()
    result = pipeline(training=train, testing=test, **kwargs)
    return {"train_triples_per_s": train.num_triples / result.train_seconds,
            "eval_triples_per_s": test.num_triples / result.evaluate_seconds,
            "train_s": result.train_seconds, "eval_s": result.evaluate_seconds, "wall_s": time.perf_counter() - t,
            "batch": batch, "mrr": float(result.metric_results.get_metric("both.realistic.inverse_harmonic_mean_rank"))}


def compare(tag: str, model: str, graph, n_train: int, n_eval: int, n_eval_pykeen: int, rounds: int,
            device: str) -> dict:
    mapped, n, r = graph
    train, test = factories(mapped, n, r, n_train, n_eval)
    test_pk = test if n_eval_pykeen >= n_eval else test.clone_and_exchange_triples(test.mapped_triples[:n_eval_pykeen])
    runs: dict[str, list[dict]] = {"job": [], "pykeen": []}
    for i in range(rounds):
        for kind in (("job", "pykeen") if i % 2 == 0 else ("pykeen", "job")):   # interleaved, alternating order
            runs[kind].append(run(kind, model, train, test if kind == "job" else test_pk, device))
            print(f"[bench_kg_embed] {tag} {model} {kind} round {i}: "
                  f"{ {k: v for k, v in runs[kind][-1].items() if k != 'batch'} }", file=sys.stderr, flush=True)
    p = f"{tag}_{model}"
    out: dict = {f"{p}_train_triples": n_train, f"{p}_eval_triples": n_eval,
                 f"{p}_pykeen_eval_triples": len(test_pk.mapped_triples)}
    for kind, rs in runs.items():
        out[f"{p}_{kind}_batch_train_eval"] = rs[0]["batch"]
        for key in ("train_triples_per_s", "eval_triples_per_s"):
            v = [x[key] for x in rs]
            out[f"{p}_{kind}_{key}"] = round(statistics.median(v), 1)
            out[f"{p}_{kind}_{key}_range"] = [round(min(v), 1), round(max(v), 1)]
    for key in ("train_triples_per_s", "eval_triples_per_s"):
        ratios = [j[key] / b[key] for j, b in zip(runs["job"], runs["pykeen"])]
        out[f"{p}_{key.split('_')[0]}_speedup"] = round(statistics.median(ratios), 2)
    return out


def quality(models: list[str], epochs: int | None, eval_triples: int) -> dict:
    """The stage's training and evaluation on the real KG (its split, all training triples, ``epochs`` or the
    config's 30) for each model at the papers' dims: filtered MRR and Hits@1/3/10 on ``eval_triples`` test triples."""
    from keplm import config
    from keplm.kg.embed import train_embeddings
    from keplm.kg.graph import GraphConfig, build_graph, load_graph

    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        build_graph(SHARED_KG, Path(tmp) / "g", GraphConfig(), {})
        g = load_graph(Path(tmp) / "g")
    mapped = np.stack([g.triples.column(c).to_numpy() for c in ("head", "relation", "tail")], axis=1)
    names, rels = g.entities.column("name").to_pylist(), g.relations.column("name").to_pylist()
    out["quality_random_hits_at_10"] = round(10 / g.num_entities, 5)
    for model in models:
        over = [f"embed.model={model}", f"embed.eval_max_triples={eval_triples}"]
        cfg = config.load(None, over + ([f"embed.epochs={epochs}"] if epochs else [])).embed
        res = train_embeddings(mapped, names, rels, cfg)
        c, m = res["counts"], res["metrics"]
        out[f"quality_{model}"] = {
            "entity_dim": res["arrays"]["entity_emb"].shape[1], "relation_dim": res["arrays"]["relation_emb"].shape[1],
            "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr,
            **{k: round(v, 4) for k, v in m.items()}, "train_s": c["train_seconds"], "eval_s": c["eval_seconds"],
            "eval_batch_size": c["eval_batch_size"], "evaluated_test_triples": c["evaluated_test_triples"],
            "triples_train": c["triples_train"], "final_loss": round(c["final_loss"], 4)}
        print(f"[bench_kg_embed] quality {model}: {out[f'quality_{model}']}", file=sys.stderr, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="transr,transe")
    ap.add_argument("--graphs", default="real,synthetic")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved runs of each pair on the real KG")
    ap.add_argument("--train-triples", type=int, default=20_000)
    ap.add_argument("--eval-triples", type=int, default=1024)
    ap.add_argument("--pykeen-eval", type=int, default=64, help="triples PyKEEN's defaults rank on the real KG "
                    "(TransR: about 3 a second)")
    ap.add_argument("--synthetic-rounds", type=int, default=1)
    ap.add_argument("--synthetic-train-triples", type=int, default=4096)
    ap.add_argument("--synthetic-eval-triples", type=int, default=256)
    ap.add_argument("--synthetic-pykeen-eval", type=int, default=8,
                    help="triples PyKEEN's defaults rank on the synthetic graph (its TransR batch of 32 needs ~20 GB)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the stage's Ray task has one)")
    ap.add_argument("--skip-gpu", action="store_true")
    ap.add_argument("--quality", action="store_true",
                    help="instead: link-prediction quality of the stage on the real KG, TransR and TransE side by side")
    ap.add_argument("--quality-epochs", type=int, default=None,
                    help="with --quality: epochs (default: the config's 30)")
    ap.add_argument("--quality-eval-triples", type=int, default=5000)
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(args.threads)
    out: dict = {"bench": "kg_embed", "threads": args.threads}
    if args.quality:
        out.update(quality(args.models.split(","), args.quality_epochs, args.quality_eval_triples))
        print(json.dumps(out))
        return
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and not args.skip_gpu else [])
    graphs = args.graphs.split(",")
    for name in graphs:
        if name == "real" and not (SHARED_KG / "triples.tsv.gz").is_file():
            out["real"] = f"skipped: {SHARED_KG} is absent"
            continue
        t = time.perf_counter()
        graph = real_graph() if name == "real" else synthetic_graph()
        out[f"{name}_entities"], out[f"{name}_triples"] = graph[1], len(graph[0])
        out[f"{name}_load_s"] = round(time.perf_counter() - t, 1)
        sizes = ((args.train_triples, args.eval_triples, args.pykeen_eval, args.rounds) if name == "real" else
                 (args.synthetic_train_triples, args.synthetic_eval_triples, args.synthetic_pykeen_eval,
                  args.synthetic_rounds))
        for device in devices:
            tag = name if device == "cpu" else f"gpu_{name}"
            for model in args.models.split(","):
                out.update(compare(tag, model, graph, *sizes, device))
    if "cuda" in devices:
        out["gpu"] = torch.cuda.get_device_name(0)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
