"""kg embed: TransE / TransR with PyKEEN on the bundled UMLS set, the export's id order, the real KG."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import job_in_process, need_shared
from keplm.kg.embed import eval_batch_size, load_embeddings, run_embed, train_embeddings
from keplm.kg.graph import GraphConfig, build_graph, load_graph


@pytest.fixture(scope="module")
def umls_graph(tmp_path_factory):
    """PyKEEN's UMLS (shipped inside the pykeen package: no download) as a keplm KG directory, built."""
    from pykeen.datasets import UMLS

    ds = UMLS()
    triples = [tuple(x) for tf in (ds.training, ds.validation, ds.testing) for x in tf.triples.tolist()]
    kg = tmp_path_factory.mktemp("umls_kg")
    # entities in reverse name order, so keplm's ids differ from PyKEEN's own label order
    names = sorted({h for h, _, _ in triples} | {t for _, _, t in triples}, reverse=True)
    (kg / "entities.tsv").write_text("name\ttype\n" + "".join(f"{n}\tconcept\n" for n in names))
    (kg / "triples.tsv").write_text("head\trelation\ttail\n" + "".join("\t".join(t) + "\n" for t in triples))
    out = tmp_path_factory.mktemp("umls_graph")
    build_graph(kg, out, GraphConfig(), {})
    return out


def rank_hits_at_10(arrays, heads, rels, tails, model):
    """Tail-side Hits@10 computed from the exported arrays alone, entity rows taken by keplm id."""
    e, r = arrays["entity_emb"], arrays["relation_emb"]
    hits = 0
    for h, rel, t in zip(heads, rels, tails):
        if model == "transr":
            m = arrays["relation_proj"][rel]
            d = np.linalg.norm(e[h] @ m + r[rel] - e @ m, axis=1)
        else:
            d = np.linalg.norm(e[h] + r[rel] - e, axis=1)
        hits += int((d < d[t]).sum() < 10)
    return hits / len(heads)


@pytest.mark.slow   # 15-20 epochs of training each
@pytest.mark.parametrize("model,extra", [
    ("transe", ["embed.dim=50", "embed.epochs=20", "embed.lr=0.01", "embed.batch_size=256"]),
    ("transr", ["embed.dim=24", "embed.relation_dim=16", "embed.epochs=15", "embed.lr=0.01", "embed.batch_size=256"]),
])
def test_embeddings_beat_random_and_export_by_id(ray_local, umls_graph, tmp_path, model, extra):
    from keplm import config

    cfg = config.load(None, [f"embed.model={model}", *extra])
    c = run_embed(umls_graph, tmp_path, cfg.embed, {"embed": cfg.embed.model_dump()})
    assert c["random_hits_at_10"] == pytest.approx(10 / 135)
    assert c["hits_at_10"] > 5 * c["random_hits_at_10"] and c["mrr"] > 0.2
    arrays = load_embeddings(tmp_path)
    g = load_graph(umls_graph)
    assert arrays["entity_emb"].shape == (135, cfg.embed.dim)
    assert arrays["relation_emb"].shape[0] == g.relations.num_rows
    if model == "transr":
        assert arrays["relation_proj"].shape == (g.relations.num_rows, 24, 16)
    else:
        assert "relation_proj" not in arrays
    # rows follow entities.parquet ids: scoring training triples by those ids ranks tails far above
    # chance, and the same arrays with a shuffled id order do not
    tr = g.triples.to_pydict()
    idx = np.random.default_rng(0).choice(len(tr["head"]), 300, replace=False)
    h, r, t = (np.asarray(tr[k])[idx] for k in ("head", "relation", "tail"))
    assert rank_hits_at_10(arrays, h, r, t, model) > 0.5
    perm = np.random.default_rng(1).permutation(135)
    shuffled = dict(arrays, entity_emb=arrays["entity_emb"][perm])
    assert rank_hits_at_10(shuffled, h, r, t, model) < 0.3
    names = pq.read_table(tmp_path / "entities.parquet").column("name").to_pylist()
    assert names == g.entities.column("name").to_pylist()


@pytest.fixture(scope="module")
def umls_ids():
    """UMLS as keplm's train_embeddings takes it: id triples, entity and relation names."""
    from pykeen.datasets import UMLS

    ds = UMLS()
    mapped = np.concatenate([tf.mapped_triples.numpy() for tf in (ds.training, ds.validation, ds.testing)])
    ents = sorted(ds.training.entity_to_id, key=ds.training.entity_to_id.get)
    rels = sorted(ds.training.relation_to_id, key=ds.training.relation_to_id.get)
    return mapped, ents, rels


@pytest.mark.slow   # three trainings and evaluations
def test_eval_batch_size_reaches_pykeen_and_leaves_the_metrics_as_they_are(umls_ids, monkeypatch):
    from pykeen.evaluation import RankBasedEvaluator

    from keplm import config

    seen = []
    evaluate = RankBasedEvaluator.evaluate

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("batch_size"))
        return evaluate(self, *args, **kwargs)

    monkeypatch.setattr(RankBasedEvaluator, "evaluate", spy)
    common = ["embed.model=transr", "embed.dim=16", "embed.relation_dim=8", "embed.epochs=2", "embed.batch_size=256",
              "embed.lr=0.01", "embed.eval_max_triples=200"]
    metrics = {}
    for bs in (7, 500):
        cfg = config.load(None, [*common, f"embed.eval_batch_size={bs}"]).embed
        res = train_embeddings(*umls_ids, cfg)
        assert seen[-1] == bs and res["counts"]["eval_batch_size"] == bs
        metrics[bs] = res["metrics"]
    assert metrics[7] == pytest.approx(metrics[500], abs=1e-9) and metrics[7]["mrr"] > 0.1
    # unset: sized to the entities (2^26 scores a batch), never PyKEEN's CPU fallback of 32
    cfg = config.load(None, common).embed
    assert [eval_batch_size(cfg, n) for n in (135, 24_874, 275_000, 10_000_000)] == [4096, 2048, 128, 16]
    train_embeddings(*umls_ids, cfg.model_copy(update={"epochs": 1}))
    assert seen[-1] == 4096


@pytest.mark.parametrize("name", ["transe", "transr", pytest.param("transr_l1", marks=pytest.mark.slow)])
def test_ranking_models_score_as_pykeens_own(name):
    """keplm.kg.scoring's all-entity and per-triple scores, gradients and filtered metrics are PyKEEN's."""
    import torch
    from pykeen.datasets import UMLS
    from pykeen.evaluation import RankBasedEvaluator
    from pykeen.models import TransE, TransR
    from pykeen.training import SLCWATrainingLoop

    from keplm.kg.scoring import RankingTransE, RankingTransR

    ds = UMLS()
    stock, fast, kw = {
        "transe": (TransE, RankingTransE, dict(embedding_dim=20, scoring_fct_norm=2)),
        "transr": (TransR, RankingTransR, dict(embedding_dim=16, relation_dim=8, scoring_fct_norm=2)),
        "transr_l1": (TransR, RankingTransR,
                      dict(embedding_dim=16, relation_dim=8, scoring_fct_norm=1, power_norm=True)),
    }[name]
    model = fast(triples_factory=ds.training, random_seed=1, **kw)
    SLCWATrainingLoop(model=model, triples_factory=ds.training, optimizer=torch.optim.Adam(model.parameters(), lr=0.01)
                      ).train(triples_factory=ds.training, num_epochs=3, batch_size=256, use_tqdm=False)
    ref = stock(triples_factory=ds.training, random_seed=1, **kw)
    ref.load_state_dict(model.state_dict())
    hrt = ds.testing.mapped_triples[:200]
    a, b = model.score_hrt(hrt), ref.score_hrt(hrt)
    assert a.shape == b.shape == (200, 1) and torch.allclose(a, b, atol=1e-5)
    a.sum().backward()
    b.sum().backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5)
    model.eval()
    ref.eval()
    with torch.no_grad():
        assert torch.allclose(model.score_t(hrt[:, :2]), ref.score_t(hrt[:, :2]), atol=1e-5)
        assert torch.allclose(model.score_h(hrt[:, 1:]), ref.score_h(hrt[:, 1:]), atol=1e-5)
        # a subset of tails and slicing stay PyKEEN's own path
        some = torch.arange(7)
        assert torch.allclose(model.score_t(hrt[:5, :2], tails=some), ref.score_t(hrt[:5, :2], tails=some))
    filt = [ds.training.mapped_triples, ds.validation.mapped_triples]
    got, want = (RankBasedEvaluator().evaluate(m, ds.testing.mapped_triples, batch_size=64, use_tqdm=False,
                                               additional_filter_triples=filt) for m in (model, ref))
    for key in ("both.realistic.inverse_harmonic_mean_rank", "both.realistic.hits_at_10"):
        # L1 distances tie more often: float rounding may split a tie the other way
        assert got.get_metric(key) == pytest.approx(want.get_metric(key), abs=1e-6 if name != "transr_l1" else 2e-3)


def test_embed_cli_errors_in_one_line(tmp_path, capsys):
    rc, err = job_in_process("kg", ["embed", "--graph", tmp_path / "none", "--output", tmp_path / "o", "embed.epochs=0"],
                             capsys)
    assert rc == 2 and "Traceback" not in err
    assert "embed.epochs" in err.strip().splitlines()[-1]


@pytest.mark.slow
def test_real_kg_trains_a_few_epochs(ray_local, tmp_path):
    kg = need_shared("kg")
    build_graph(kg, tmp_path / "g", GraphConfig(), {})
    from keplm import config

    cfg = config.load(None, ["embed.model=transe", "embed.epochs=2", "embed.eval_max_triples=500"])
    c = run_embed(tmp_path / "g", tmp_path / "e", cfg.embed, {})
    assert c["hits_at_10"] > c["random_hits_at_10"]
    assert load_embeddings(tmp_path / "e")["entity_emb"].shape == (c["entities"], 100)
    assert json.loads((tmp_path / "e" / "manifest.json").read_text())["counts"]["triples_train"] > 200_000
