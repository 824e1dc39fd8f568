"""PEPR (SMedBERT §3.2): the math against networkx, top-K ranking, and the Ray actor pool job."""

import networkx as nx
import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import DEMO, need_shared
from keplm.kg.graph import GraphConfig, adjacency_from_triples, build_graph, load_graph
from keplm.kg.pepr import (PEPRConfig, PEPRSolver, block_seeds, call_groups, compute_neighbours, initial_vector,
                           personalization, run_neighbours, top_k_neighbours)
from keplm.platform.config import load_config
from keplm.platform.errors import ConfigError


def random_kg(seed, n=80, m=260, isolated=4):
    rng = np.random.default_rng(seed)
    h, t = rng.integers(0, n - isolated, m), rng.integers(0, n - isolated, m)
    keep = h != t
    h, t = h[keep], t[keep]
    r = rng.integers(0, 4, len(h))
    return n, h, r, t


def networkx_pepr(n, h, t, seed, v0, alpha):
    g = nx.Graph()
    g.add_nodes_from(range(n))
    g.add_edges_from(zip(h.tolist(), t.tolist()))
    p = personalization(n, seed)
    x = nx.pagerank(g, alpha=1 - alpha, personalization=dict(enumerate(p)), nstart=dict(enumerate(v0)),
                    tol=1e-15, max_iter=100_000)
    return np.array([x[i] for i in range(n)])


def test_personalization_and_initial_vector_follow_eq1():
    p = personalization(4, 2)
    np.testing.assert_allclose(p, np.array([0.25, 0.25, 1.0, 0.25]) / 1.75)
    freq = np.array([3, 0, 1, 0])
    v = initial_vector(freq, num_samples=10, n=4)  # seen: t/T = 3/4, 1/4; unseen: 1/M = 1/10
    np.testing.assert_allclose(v, np.array([0.75, 0.1, 0.25, 0.1]) / 1.2)
    np.testing.assert_allclose(initial_vector(None, None, 4), 0.25)


@pytest.mark.parametrize("method", ["cg", "power"])
@pytest.mark.parametrize("graph_seed,alpha", [(0, 0.15), (1, 0.3), (2, 0.05)])
def test_scores_equal_networkx_pagerank(method, graph_seed, alpha):
    n, h, r, t = random_kg(graph_seed)
    a, er, ei, deg = adjacency_from_triples(n, h, r, t)
    assert (deg == 0).sum() >= 4  # dangling (isolated) entities are part of the check
    freq = np.random.default_rng(graph_seed).integers(0, 4, n)
    v0 = initial_vector(freq, 50, n)
    solver = PEPRSolver(a, deg, PEPRConfig(method=method, alpha=alpha, tol=1e-9), v0=v0)
    seeds = np.array([0, 5, 17, n - 1])  # n-1 is isolated
    x = solver.scores(seeds)
    for j, s in enumerate(seeds):
        ref = networkx_pepr(n, h, t, s, v0, alpha)
        assert np.abs(x[:, j] - ref).max() < 1e-6
        np.testing.assert_allclose(x[:, j].sum(), 1.0, atol=1e-9)
        # the top-K list: the direct neighbours ranked by networkx's scores (ties by id)
        table = top_k_neighbours(a, er, ei, np.array([s]), x[:, [j]], k_max=10).to_pydict()
        cand = a.indices[a.indptr[s]:a.indptr[s + 1]]
        expect = sorted(cand.tolist(), key=lambda e: (-round(ref[e], 9), e))[:10]
        assert table["neighbour"] == expect
        assert table["rank"] == list(range(len(expect)))


def test_tolerance_bounds_the_error():
    n, h, r, t = random_kg(3, n=200, m=900)
    a, _, _, deg = adjacency_from_triples(n, h, r, t)
    seeds = np.arange(0, 50, 7)
    exact = PEPRSolver(a, deg, PEPRConfig(tol=1e-12)).scores(seeds)
    for method in ("cg", "power"):
        for tol in (1e-3, 1e-5):
            solver = PEPRSolver(a, deg, PEPRConfig(method=method, tol=tol))
            assert np.abs(solver.scores(seeds) - exact).max() <= tol
    # CG needs fewer sparse products than the power iteration for the same bound
    cg, pw = PEPRSolver(a, deg, PEPRConfig(method="cg", tol=1e-8)), PEPRSolver(a, deg, PEPRConfig(method="power", tol=1e-8))
    cg.scores(seeds), pw.scores(seeds)
    assert cg.iterations[-1] < pw.iterations[-1]


def test_top_k_prefix_truncation_and_relation_choice():
    # a star: entity 0 joined to 1..40; 0-1 also by a second triple with another relation
    h = np.r_[np.zeros(40, int), 1]
    t = np.r_[np.arange(1, 41), 0]
    r = np.r_[np.zeros(40, int), 1]
    a, er, ei, deg = adjacency_from_triples(42, h, r, t)  # 41 is isolated
    solver = PEPRSolver(a, deg, PEPRConfig(tol=1e-10))
    seeds = np.array([0, 1, 41])
    x = solver.scores(seeds)
    full = top_k_neighbours(a, er, ei, seeds, x, k_max=30).to_pandas()
    k5 = top_k_neighbours(a, er, ei, seeds, x, k_max=5).to_pandas()
    star = full[full.entity == 0]
    assert len(star) == 30  # 40 candidates, truncated to k_max
    assert (star["score"].diff().dropna() <= 0).all()
    assert k5[k5.entity == 0].reset_index(drop=True).equals(star.head(5).reset_index(drop=True))
    assert (full.entity == 41).sum() == 0  # no neighbours: no rows
    one = full[full.entity == 1].iloc[0]
    assert (one.neighbour, one.relation, bool(one.inverse)) == (0, 0, True)  # first triple (0, r0, 1)


def test_float32_needs_a_loose_tolerance():
    with pytest.raises(ConfigError, match="pepr"):
        from keplm.config import KeplmConfig

        load_config(KeplmConfig, None, ["pepr.dtype=float32", "pepr.tol=1e-8"])


def test_actor_pool_matches_in_process_solver(ray_local, tmp_path):
    build_graph(DEMO / "kg", tmp_path / "g", GraphConfig(), {})
    cfg = PEPRConfig(num_actors=2, batch_size=64, k_max=10, tol=1e-9, actor_num_cpus=0.5, solve="seeds")
    counts = run_neighbours(tmp_path / "g", tmp_path / "nb", cfg, {"pepr": cfg.model_dump()})
    got = pq.read_table(tmp_path / "nb" / "neighbours.parquet").to_pandas()
    g = load_graph(tmp_path / "g")
    seeds = np.arange(g.num_entities)
    ref = top_k_neighbours(g.adjacency, g.edge_relation, g.edge_inverse, seeds,
                           PEPRSolver(g.adjacency, g.degree, cfg).scores(seeds), cfg.k_max).to_pandas()
    assert got[["entity", "rank", "neighbour", "relation", "inverse"]].equals(ref[["entity", "rank", "neighbour", "relation", "inverse"]])
    # the actors bound only the scores they read (neighbours), the reference every one: both within tol
    np.testing.assert_allclose(got["score"], ref["score"], atol=2e-9)
    assert counts["seeds"] == g.num_entities and counts["blocks"] == 8
    assert counts["seeds_without_neighbours"] == int((g.degree == 0).sum()) > 0
    assert counts["rows"] == int(np.minimum(g.degree, 10).sum())
    assert (tmp_path / "nb" / "entities.parquet").is_file() and (tmp_path / "nb" / "relations.parquet").is_file()


@pytest.mark.slow
def test_an_actor_that_dies_mid_run_is_restarted_and_the_neighbours_stay_whole(ray_local, tmp_path):
    """An actor's process exits at its first call (as on a lost node): Ray restarts it, the restarted actor loads
    the graph from the call's refs and answers the retried call; the neighbours equal an undisturbed run's."""
    build_graph(DEMO / "kg", tmp_path / "g", GraphConfig(), {})
    g = load_graph(tmp_path / "g")
    base = dict(num_actors=2, batch_size=16, k_max=10, tol=1e-9, actor_num_cpus=0.5)   # the default cover solve
    calm, calm_counts = compute_neighbours(g, PEPRConfig(**base))
    hit, hit_counts = compute_neighbours(g, PEPRConfig(**base, fault_at_call=1))
    assert calm_counts["actor_restarts"] == 0 and hit_counts["actor_restarts"] == 1
    assert hit.equals(calm) and hit_counts["rows"] == calm_counts["rows"]
    # without restarts the dead actor's calls fail the stage: one clear error, never a partial table
    with pytest.raises(Exception, match="died|ActorDied|actor"):
        compute_neighbours(g, PEPRConfig(**base, fault_at_call=1, actor_restarts=0))


def test_block_size_fits_the_cache_budget(ray_local, tmp_path):
    # six dense n x B arrays per block: 1 MiB over 6 * 1000 entities * 8 bytes = 21 float64 seeds, 43 float32
    assert block_seeds(PEPRConfig(block_mib=1), 1000) == 21
    assert block_seeds(PEPRConfig(block_mib=1, dtype="float32", tol=1e-5), 1000) == 43
    assert block_seeds(PEPRConfig(block_mib=1, batch_size=10), 1000) == 10       # batch_size still caps it
    assert block_seeds(PEPRConfig(block_mib=1), 10**7) == 16                     # never below block_min_seeds
    assert block_seeds(PEPRConfig(block_mib=1, block_min_seeds=1), 10**7) == 1   # nor below one seed
    assert block_seeds(PEPRConfig(block_mib=1, batch_size=8), 10**7) == 8
    # a budget that cuts the demo's blocks changes the blocking, not the neighbours
    build_graph(DEMO / "kg", tmp_path / "g", GraphConfig(), {})
    g = load_graph(tmp_path / "g")
    base = dict(num_actors=1, batch_size=64, k_max=10, tol=1e-9, actor_num_cpus=0.5)
    wide, wc = compute_neighbours(g, PEPRConfig(**base))
    cut = PEPRConfig(**base, block_mib=6 * g.num_entities * 8 * 5 / 2**20, block_min_seeds=1)  # room for 5 seeds
    narrow, nc = compute_neighbours(g, cut)
    assert wc["block_seeds"] == 64 and nc["block_seeds"] == 5
    assert nc["blocks"] == -(-nc["solves"] // 5) > wc["blocks"]
    assert narrow.drop_columns(["score"]).equals(wide.drop_columns(["score"]))
    np.testing.assert_allclose(narrow.column("score").to_numpy(), wide.column("score").to_numpy(), atol=2e-9)


def test_call_groups_carry_whole_blocks_and_keep_every_actor_queued():
    items = np.arange(1000)
    calls = call_groups(items, 10, PEPRConfig(num_actors=2, call_blocks=4))   # 100 blocks: 4 per call
    assert [len(c) for c in calls] == [40] * 25 and np.array_equal(np.concatenate(calls), items)
    # 20 blocks on 2 actors: 4 blocks per call would leave 5 calls, fewer than 4 queued per actor
    assert [len(c) for c in call_groups(items[:200], 10, PEPRConfig(num_actors=2, call_blocks=4))] == [20] * 10
    assert [len(c) for c in call_groups(items[:25], 10, PEPRConfig(num_actors=2))] == [10, 10, 5]
    assert call_groups(items[:0], 10, PEPRConfig()) == []


# the per-seed solve's 244 calls are the slow tier's; the cover's run the same grouping in the quick tier
@pytest.mark.parametrize("solve", ["cover", pytest.param("seeds", marks=pytest.mark.slow)])
def test_several_blocks_per_call_give_the_same_neighbours(ray_local, tmp_path, solve):
    build_graph(DEMO / "kg", tmp_path / "g", GraphConfig(), {})
    g = load_graph(tmp_path / "g")
    # 2-seed blocks: enough of them (28 for the cover, 244 per seed) that 3 go into one call and 4 still queue
    # on each actor
    base = dict(num_actors=2, k_max=10, tol=1e-9, actor_num_cpus=0.5, solve=solve, block_min_seeds=1,
                block_mib=6 * g.num_entities * 8 * 2 / 2**20)
    single, sc = compute_neighbours(g, PEPRConfig(**base, call_blocks=1))
    grouped, gc = compute_neighbours(g, PEPRConfig(**base, call_blocks=3))
    assert sc["block_seeds"] == gc["block_seeds"] == 2
    assert sc["calls"] == sc["blocks"] == gc["blocks"] == -(-gc["solves"] // 2) >= 24
    assert gc["calls"] == -(-gc["blocks"] // 3)
    assert gc["iterations_total"] == sc["iterations_total"] and gc["iterations_max"] == sc["iterations_max"]
    assert grouped.equals(single)   # the same blocks, solved the same way: equal to the last bit


def test_linked_seeds_and_frequency_start(ray_local, tmp_path, demo_prepared):
    build_graph(DEMO / "kg", tmp_path / "g", GraphConfig(), {}, corpus_dir=demo_prepared)
    g = load_graph(tmp_path / "g")
    cfg = PEPRConfig(num_actors=1, method="power", tol=1e-8, actor_num_cpus=0.5)
    table, counts = compute_neighbours(g, cfg, num_samples=100)
    linked = set(np.flatnonzero(g.freq > 0).tolist())
    assert counts["seeds"] == len(linked) and set(table.column("entity").to_pylist()) <= linked


# the random graphs are the slow tier's: the demo case runs the same code in the quick tier
@pytest.mark.parametrize("graph", ["demo", pytest.param("random", marks=pytest.mark.slow),
                                   pytest.param("random-subset", marks=pytest.mark.slow)])
def test_cover_solves_fewer_and_gives_the_per_seed_scores(ray_local, tmp_path, graph):
    """R[t,m] = d_t/d_m R[m,t]: solving a vertex cover of the seeds' edges gives every score the
    per-seed solves give (to the tolerance), with fewer solves."""
    from types import SimpleNamespace

    if graph == "demo":
        build_graph(DEMO / "kg", tmp_path / "g", GraphConfig(), {})
        g = load_graph(tmp_path / "g")
        seeds = np.arange(g.num_entities)
    else:
        n, h, r, t = random_kg(5, n=300, m=900)
        a, rel, inv, deg = adjacency_from_triples(n, h, r, t)
        g = SimpleNamespace(adjacency=a, edge_relation=rel, edge_inverse=inv, degree=deg, freq=None, num_entities=n)
        seeds = np.arange(n) if graph == "random" else np.random.default_rng(1).choice(n, 120, replace=False)
    k = int(g.degree.max())                                              # no truncation: compare whole lists
    base = dict(num_actors=2, batch_size=32, k_max=k, tol=1e-10, actor_num_cpus=0.5)
    cover, c_counts = compute_neighbours(g, PEPRConfig(**base, solve="cover"), seeds=seeds)
    per_seed, s_counts = compute_neighbours(g, PEPRConfig(**base, solve="seeds"), seeds=seeds)
    assert s_counts["solves"] == len(seeds)
    if graph == "random-subset":   # a cover of a few seeds' edges is no smaller than the seeds: they are used
        assert c_counts["solves"] <= len(seeds)
    else:
        assert c_counts["solves"] < len(seeds)
    a, b = cover.to_pandas(), per_seed.to_pandas()
    assert len(a) == len(b) == int(g.degree[seeds].sum())
    pair = a.merge(b, on=["entity", "neighbour"], suffixes=("_c", "_s"))
    assert len(pair) == len(a) and (pair["relation_c"] == pair["relation_s"]).all()
    assert np.abs(pair["score_c"] - pair["score_s"]).max() <= 2e-10
    np.testing.assert_allclose(a["score"], b["score"], atol=2e-10)      # same scores rank by rank


@pytest.mark.slow
def test_real_kg_neighbours(ray_local, tmp_path):
    kg = need_shared("kg")
    build_graph(kg, tmp_path / "g", GraphConfig(), {})
    g = load_graph(tmp_path / "g")
    seeds = np.random.default_rng(0).choice(g.num_entities, 512, replace=False)
    cfg = PEPRConfig(num_actors=2, batch_size=128, k_max=30, dtype="float32", tol=1e-5, actor_num_cpus=0.5)
    table, counts = compute_neighbours(g, cfg, seeds=seeds)
    exact = PEPRSolver(g.adjacency, g.degree, PEPRConfig(tol=1e-9)).scores(seeds[:16])
    ref = top_k_neighbours(g.adjacency, g.edge_relation, g.edge_inverse, seeds[:16], exact, 30).to_pandas()
    got = table.to_pandas().set_index(["entity", "rank"])
    merged = ref.join(got, on=["entity", "rank"], rsuffix="_got")
    assert np.abs(merged["score"] - merged["score_got"]).max() <= 1e-5
    assert counts["rows"] == int(np.minimum(g.degree[seeds], 30).sum())


@pytest.mark.slow
def test_demo_chain_on_the_command_line(ray_local, tmp_path, demo_prepared):
    """kg build (KG from the config) -> kg neighbours joining the running Ray with --address."""
    import json
    import subprocess
    import sys

    address = ray_local.get_runtime_context().gcs_address
    base = [sys.executable, "-m", "keplm.jobs.kg"]
    r = subprocess.run(base + ["build", "--config", "configs/demo.yaml", "--corpus", str(demo_prepared),
                               "--output", str(tmp_path / "g")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    built = json.loads(r.stdout.strip().splitlines()[-1])["counts"]
    assert built["entities_linked_in_corpus"] > 100
    r = subprocess.run(base + ["neighbours", "--config", "configs/demo.yaml", "--graph", str(tmp_path / "g"),
                               "--output", str(tmp_path / "nb"), "--address", address, "pepr.actor_num_cpus=0.3"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    counts = json.loads(r.stdout.strip().splitlines()[-1])["counts"]
    assert counts["seeds"] == built["entities_linked_in_corpus"]  # seeds=auto: the linked entities
    nb = pq.read_table(tmp_path / "nb" / "neighbours.parquet")
    assert nb.num_rows == counts["rows"] and max(nb.column("rank").to_pylist()) < 30


def hubs_and_leaves(seed, hubs=3, leaves=400, extra=60):
    """Hubs joined to each other and to many degree-1 leaves, plus a few random edges between leaves."""
    rng = np.random.default_rng(seed)
    n = hubs + leaves
    h = [i for i in range(hubs) for j in range(i + 1, hubs)]
    t = [j for i in range(hubs) for j in range(i + 1, hubs)]
    h += (np.arange(hubs, n) % hubs).tolist()
    t += list(range(hubs, n))
    x, y = rng.integers(hubs, n, extra), rng.integers(hubs, n, extra)
    keep = x != y
    h, t = np.r_[h, x[keep]], np.r_[t, y[keep]]
    return n, h, rng.integers(0, 3, len(h)), t


@pytest.mark.parametrize("tol", [1e-3, 1e-4])
def test_cover_scores_meet_the_tolerance_where_the_transpose_amplifies_errors(ray_local, tol):
    """A hub in the cover serves each leaf's score at the hub as d_hub / d_leaf · (R e_hub)[leaf]: its solve
    must bound that read, not just the hub's own values. Every score is within pepr.tol of the exact one."""
    from types import SimpleNamespace

    n, h, r, t = hubs_and_leaves(4)
    a, rel, inv, deg = adjacency_from_triples(n, h, r, t)
    assert deg[:3].min() > 100 and (deg == 1).sum() > 200
    g = SimpleNamespace(adjacency=a, edge_relation=rel, edge_inverse=inv, degree=deg, freq=None, num_entities=n)
    seeds = np.arange(n)
    got, counts = compute_neighbours(g, PEPRConfig(num_actors=2, batch_size=32, k_max=int(deg.max()), tol=tol,
                                                   actor_num_cpus=0.5), seeds=seeds)
    assert counts["solves"] < n / 2            # the hubs and a few leaves cover every edge
    # each actor's solve time lies inside the window from the first call to the last result
    assert 0 < counts["solve_seconds"] <= 2 * counts["solve_wall_seconds"] + 0.002
    exact = PEPRSolver(a, deg, PEPRConfig(tol=1e-13)).scores(seeds)
    got = got.to_pandas()
    err = np.abs(got["score"].to_numpy() - exact[got["neighbour"].to_numpy(), got["entity"].to_numpy()])
    assert len(got) == a.nnz and err.max() <= tol


def test_reverse_positions_pair_each_entry_with_its_transpose():
    import scipy.sparse as sp

    from keplm.kg.pepr import reverse_positions

    rng = np.random.default_rng(1)
    n = 200
    h, t = rng.integers(0, n, 900), rng.integers(0, n, 900)
    a, _, _, _ = adjacency_from_triples(n, h[h != t], np.zeros((h != t).sum(), int), t[h != t])
    rows = np.repeat(np.arange(n), np.diff(a.indptr))
    assert a.has_canonical_format
    rev = reverse_positions(a)
    assert (rows[rev] == a.indices).all() and (a.indices[rev] == rows).all() and (rev[rev] == np.arange(a.nnz)).all()
    # the same pattern with each row's entries stored in reverse order: not canonical, the sorting path
    flipped = np.concatenate([np.arange(a.indptr[i + 1] - 1, a.indptr[i] - 1, -1) for i in range(n)]).astype(np.int64)
    b = sp.csr_matrix((a.data[flipped], a.indices[flipped], a.indptr), shape=a.shape)
    assert not b.has_canonical_format
    rev_b = reverse_positions(b)
    assert (rows[rev_b] == b.indices).all() and (b.indices[rev_b] == rows).all()


def test_cover_covers_every_needed_entry_and_takes_low_degree_entities_out_first():
    from keplm.kg.pepr import greedy_cover, reverse_positions

    # a path 0-1-2-3-4: the ends (degree 1) leave first, then 2 — the minimum cover {1, 3}
    a, _, _, deg = adjacency_from_triples(5, np.arange(4), np.zeros(4, int), np.arange(1, 5))
    assert np.flatnonzero(greedy_cover(a, deg, np.ones(a.nnz, bool), reverse_positions(a))).tolist() == [1, 3]
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(5, 300))
        h, t = rng.integers(0, n, 3 * n), rng.integers(0, n, 3 * n)
        a, _, _, deg = adjacency_from_triples(n, h[h != t], np.zeros((h != t).sum(), int), t[h != t])
        rows = np.repeat(np.arange(n), np.diff(a.indptr))
        rev = reverse_positions(a)
        seeds = rng.random(n) < (1.0 if trial % 2 else 0.2)
        needed = seeds[rows]
        cover = greedy_cover(a, deg, needed, rev)
        # every needed entry (m, t) has m or t solved; nothing outside the needed entries' ends is solved
        assert (cover[rows] | cover[a.indices])[needed].all()
        assert not (cover & ~np.isin(np.arange(n), np.concatenate([rows[needed], a.indices[needed]]))).any()
        assert cover.sum() <= seeds[deg > 0].sum()


def test_cover_read_scales_bound_what_each_solve_serves():
    """Star 0 - {1..5} and 4 - 5, all seeds: the cover is {0, 5} (1-4 join the independent set: the leaves
    by degree, 4 before 5 by id). Solve v serves seed v at each neighbour t
    (weight 1) and a seed t outside the cover at v through the transpose (weight d_v / d_t); its scale is
    the largest sqrt(d_t) · weight."""
    from keplm.kg.pepr import cover_read_scales, greedy_cover, reverse_positions

    h, t = np.array([0, 0, 0, 0, 0, 4]), np.array([1, 2, 3, 4, 5, 5])
    a, _, _, deg = adjacency_from_triples(6, h, t * 0, t)
    rows = np.repeat(np.arange(6), np.diff(a.indptr))
    rev = reverse_positions(a)
    needed = np.ones(a.nnz, bool)
    cover = greedy_cover(a, deg, needed, rev)
    assert np.flatnonzero(cover).tolist() == [0, 5]
    # 0: leaves 1-3 read through it at weight d_0/d_t = 5 with sqrt(1); 4 at 5/2 with sqrt(2); its own 1 with sqrt(2)
    # 5: its own values at 0 (sqrt 5) and 4 (sqrt 2); seed 4 through it at d_5/d_4 = 1
    np.testing.assert_allclose(cover_read_scales(a, deg, needed, rev, cover), [5, 0, 0, 0, 0, np.sqrt(5)])
    needed = rows == 1                     # seed 1 alone: it is its own cover and reads its value at 0
    cover = greedy_cover(a, deg, needed, rev)
    assert np.flatnonzero(cover).tolist() == [1]
    np.testing.assert_allclose(cover_read_scales(a, deg, needed, rev, cover), [0, np.sqrt(5), 0, 0, 0, 0])


def components_kg(seed):
    """A random component of 600 entities (Lanczos floor), a 5-path and a pair (dense floors), 3 isolated."""
    rng = np.random.default_rng(seed)
    h, t = rng.integers(0, 600, 2400), rng.integers(0, 600, 2400)
    keep = h != t
    h, t = np.r_[h[keep], 600, 601, 602, 603, 605], np.r_[t[keep], 601, 602, 603, 604, 606]
    return 610, h, np.zeros(len(h), np.int64), t


@pytest.mark.parametrize("alpha", [0.15, 0.5])
def test_spectral_floors_bound_each_components_spectrum_from_below(alpha):
    """The floor of M = I - (1-α)S on each component's complement of u = sqrt(d) is 1 - (1-α)λ2(S_c): never
    above it (the CG bound would be unsound), and within the Lanczos margin of it."""
    from scipy.sparse.csgraph import connected_components

    from keplm.kg.pepr import SPECTRAL_MARGIN, CGSolver

    n, h, r, t = components_kg(5)
    a, _, _, deg = adjacency_from_triples(n, h, r, t)
    cg = CGSolver(a, deg, alpha)
    ncomp, comp = connected_components(a, directed=False)
    assert len(cg.floors) == ncomp
    checked = set()
    for c in range(ncomp):
        members = np.flatnonzero(comp == c)
        floor = cg.floors[cg.component[cg.position[members[0]]]]
        assert (cg.component[cg.position[members]] == cg.component[cg.position[members[0]]]).all()
        if deg[members[0]] == 0:
            assert floor == 1.0
            checked.add("isolated")
            continue
        d = deg[members].astype(float)
        s = (a[members][:, members].toarray() > 0) / np.sqrt(np.outer(d, d))
        lam = np.linalg.eigvalsh(s)
        assert lam[-1] == pytest.approx(1.0)      # u = sqrt(d) is S's top eigenvector on the component
        true_floor = 1 - (1 - alpha) * lam[-2]
        assert floor <= true_floor + 1e-9
        assert floor >= true_floor - (1 - alpha) * (SPECTRAL_MARGIN + 1e-3)
        checked.add("lanczos" if len(members) > 256 else f"dense{len(members)}")
    assert checked == {"lanczos", "dense5", "dense2", "isolated"}
    big = cg.floors[cg.component[cg.position[0]]]
    assert big > 2 * alpha if alpha < 0.3 else big > alpha   # the gap is what deflation gains


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_deflated_cg_meets_the_tolerance_in_fewer_iterations(dtype):
    """R e_m and R·1 against the dense inverse, with and without deflation, on a graph of several components
    and isolated entities: every entry within tol, and the deflated solve stops sooner."""
    from keplm.kg.pepr import CGSolver

    n, h, r, t = components_kg(6)
    a, _, _, deg = adjacency_from_triples(n, h, r, t)
    alpha, tol = 0.15, (1e-4 if dtype == np.float32 else 1e-8)
    exact = np.linalg.inv(np.eye(n) - (1 - alpha) * a.toarray())
    seeds = np.array([0, 17, 333, 599, 600, 602, 605, 606, 607, 609])   # big, path, pair, isolated
    iters = {}
    for deflate in (False, True):
        cg = CGSolver(a, deg, alpha, dtype, deflate=deflate)
        y, iters[deflate] = cg.solve_units(seeds, tol, 1000)
        assert np.abs(y - exact[:, seeds]).max() <= tol
        g, _ = cg.solve(np.ones((n, 1)), tol, 1000)
        assert np.abs(g[:, 0] - exact.sum(axis=1)).max() <= tol
    assert iters[True] < iters[False]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("work", [0.02, 1e9])
def test_sparse_start_takes_the_dense_iterates_and_meets_the_tolerance(monkeypatch, dtype, work):
    """CG's first iterations on sparse ``s + c·u`` vectors are the dense path's iterates: the same solution (to
    round-off) and iteration count, every entry within tol of the dense inverse. work=1e9 runs whole solves
    sparse, so the pair's and the path's columns fold c·u into s and converge there."""
    import keplm.kg.pepr as pepr

    n, h, r, t = components_kg(6)
    a, _, _, deg = adjacency_from_triples(n, h, r, t)
    alpha, tol = 0.15, (1e-4 if dtype == np.float32 else 1e-10)
    exact = np.linalg.inv(np.eye(n) - (1 - alpha) * a.toarray())
    seeds = np.array([0, 17, 333, 599, 600, 602, 605, 606, 607, 609, 3])   # big, path, pair, isolated
    cg = pepr.CGSolver(a, deg, alpha, dtype)
    monkeypatch.setattr(pepr, "SPARSE_START_MIN_NNZ", 0)   # a test-sized graph takes the large graphs' route
    monkeypatch.setattr(pepr, "SPARSE_START_WORK", 0.0)
    y_dense, it_dense = cg.solve_units(seeds, tol, 1000)
    sparse_iterations = []
    start = pepr.CGSolver._sparse_start

    def spy(self, *args):
        state = start(self, *args)
        sparse_iterations.append(state[-1])
        assert all(v.flags.c_contiguous for v in state[:3])   # the dense loop's products want row-major blocks
        return state

    monkeypatch.setattr(pepr.CGSolver, "_sparse_start", spy)
    monkeypatch.setattr(pepr, "SPARSE_START_WORK", work)
    y, it = cg.solve_units(seeds, tol, 1000)
    assert sparse_iterations[0] >= (1 if work < 1 else it)
    assert it == it_dense
    assert np.abs(y - exact[:, seeds]).max() <= tol
    assert np.abs(y - y_dense).max() <= (1e-6 if dtype == np.float32 else 1e-12)


def renumbered_dense(cg):
    """M = I - (1-α)S and the projection P off every component's u, dense, in the solver's numbering."""
    m = np.eye(cg.n) - cg.beta * cg.s.toarray()
    eig = cg.eigvec.toarray()
    return m, np.eye(cg.n) - eig.T @ eig


@pytest.mark.parametrize("alpha", [0.15, 0.5])
def test_entrywise_error_bound_holds_for_every_residual_shape(alpha):
    """max_t |(P M^{-1} r)_t| <= error_bound(||r||², floor, ||r||_∞, off_u) <= ||r||_2 / floor, for residuals that
    stress each term: M times the big component's slowest mode (needs the c·||r|| term), M times a localised
    vector (needs ||r||_∞), one on the pair (λ = -1 only: c = β/(1+β), not 1/floor - 1 < 0), one on the 5-path,
    and random ones over every component with parts along the u's (off_u). Floors: the column's component's, or
    the least, as solve_units and solve use them."""
    from keplm.kg.pepr import CGSolver

    n, h, r, t = components_kg(7)
    a, _, _, deg = adjacency_from_triples(n, h, r, t)
    cg = CGSolver(a, deg, alpha)
    m, proj = renumbered_dense(cg)
    comp = cg.component
    big, pair, path = (comp[cg.position[e]] for e in (0, 605, 600))
    cols, floors = [], []

    def add(v, c):   # a residual and the floor the solver would bound it with
        cols.append(v)
        floors.append(cg.floors[c] if c is not None else cg.floors.min())

    members = np.flatnonzero(comp == big)
    lam, vec = np.linalg.eigh(cg.s.toarray()[np.ix_(members, members)])
    for k in (-2, 0):                        # λ2's and the most negative eigenvalue's modes
        v = np.zeros(n)
        v[members] = vec[:, k]
        add(m @ v, big)
    local = np.zeros(n)
    local[cg.position[3]] = 1.0
    add(m @ proj @ local, big)
    for c in (pair, path):
        v = np.zeros(n)
        v[comp == c] = np.random.default_rng(c).normal(size=(comp == c).sum())
        add(proj @ v, c)
    rng = np.random.default_rng(0)
    for _ in range(4):
        add(rng.normal(size=n) * rng.random(n) ** 3, None)   # u parts left in: off_u carries them
    res = np.array(cols).T.copy()
    floors = np.array(floors)
    err = np.abs(proj @ np.linalg.solve(m, res)).max(axis=0)
    rs = np.einsum("ij,ij->j", res, res)
    r_max, off_u = cg.dense_extremes(res, np.arange(res.shape[1]))
    np.testing.assert_allclose(r_max, np.abs(res).max(axis=0))
    np.testing.assert_allclose(off_u, np.abs(res - proj @ res).max(axis=0), atol=1e-12)
    bound = cg.error_bound(rs, floors, r_max, off_u)
    assert (err <= bound * (1 + 1e-9)).all()
    assert (bound <= np.sqrt(rs) / floors * (1 + 1e-12)).all()
    # and it is the entrywise term that binds where the residual is spread: the slow mode's bound is below the
    # 2-norm one, and both terms are needed (without ||r||_∞ the localised column, without c the slow mode break)
    assert bound[0] < 0.75 * np.sqrt(rs[0]) / floors[0]
    c = np.maximum(cg.beta / (1 + cg.beta), 1 / floors - 1)
    assert err[0] > r_max[0] + off_u[0]
    # c is ||βS M^{-1}||_2 on each component's complement of u: equal where the floor is exact (the pair, whose
    # only other eigenvalue is -1, and the path), above it on the big component (Lanczos' λ2 plus the margin)
    for e, exact_floor in ((605, True), (600, True), (0, False)):
        members = np.flatnonzero(comp == comp[cg.position[e]])
        lam = np.linalg.eigvalsh(cg.s.toarray()[np.ix_(members, members)])[:-1]
        norm = np.abs(cg.beta * lam / (1 - cg.beta * lam)).max()
        c_e = cg.error_bound(np.ones(1), cg.floors[comp[cg.position[e]]:][:1], 0.0, 0.0)[0]
        assert c_e == pytest.approx(norm, rel=1e-7) if exact_floor else norm <= c_e <= norm + 0.1
    if alpha == 0.5:   # (at 0.15 the big component's c exceeds 1, and c·||r|| alone covers a unit spike)
        assert err[2] > c[2] * np.sqrt(rs[2]) + off_u[2]


def test_entrywise_error_bound_counts_the_residuals_part_along_u():
    """A residual with a part along u (round-off puts one there) is projected off before the error: on a star at
    α = 0.9, r = e_centre - u/u_centre is zero at the centre, yet the error there is 0.45, more than ||r||_∞ + c·||r||
    (0.34); off_u = u_centre·|uᵀr| makes up the difference."""
    from keplm.kg.pepr import CGSolver

    k = 16
    a, _, _, deg = adjacency_from_triples(k + 1, np.zeros(k, np.int64), np.zeros(k, np.int64), np.arange(1, k + 1))
    cg = CGSolver(a, deg, 0.9)
    m, proj = renumbered_dense(cg)
    centre = cg.position[0]
    res = np.zeros((k + 1, 1))
    res[centre] = 1.0
    res[:, 0] -= cg.u_all / cg.u_all[centre]
    err = np.abs(proj @ np.linalg.solve(m, res)).max()
    r_max, off_u = cg.dense_extremes(res, np.array([0]))
    rs = (res ** 2).sum(axis=0)
    floor = cg.floors[cg.component[centre]:cg.component[centre] + 1]
    c = max(cg.beta / (1 + cg.beta), 1 / floor[0] - 1)
    assert err > r_max[0] + c * np.sqrt(rs[0])
    assert err <= cg.error_bound(rs, floor, r_max, off_u)[0]


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-8), (np.float32, 1e-4)])
def test_entrywise_bound_stops_power_law_columns_sooner_within_tol(monkeypatch, dtype, tol):
    """On a power-law graph (hubs, floor 0.67) the entrywise bound stops CG no later than the 2-norm one for every
    seed, sooner for most, and every entry is still within tol of the dense inverse."""
    import keplm.kg.pepr as pepr

    n = 2000
    rng = np.random.default_rng(0)
    w = 1.0 / np.arange(1, n + 1) ** 0.75
    w /= w.sum()
    h, t = rng.choice(n, 30000, p=w), rng.choice(n, 30000, p=rng.permutation(w))
    keep = h != t
    a, _, _, deg = adjacency_from_triples(n, h[keep], np.zeros(keep.sum(), np.int64), t[keep])
    alpha = 0.15
    exact = np.linalg.inv(np.eye(n) - (1 - alpha) * a.toarray())
    seeds = rng.choice(np.flatnonzero(deg > 0), 12, replace=False)
    cg = pepr.CGSolver(a, deg, alpha, dtype)
    iters = {}
    entrywise = pepr.CGSolver.error_bound
    for bound in ("entrywise", "2-norm"):
        if bound == "2-norm":   # ||r||_inf never given: the bound is ||r||_2 / floor
            monkeypatch.setattr(pepr.CGSolver, "error_bound",
                                lambda self, rs, floor, r_max=None, off_u=None: entrywise(self, rs, floor))
        iters[bound] = []
        for s in seeds:
            y, it = cg.solve_units(np.array([s]), tol, 1000)
            assert np.abs(y[:, 0] - exact[:, s]).max() <= tol
            iters[bound].append(it)
    assert all(e <= q for e, q in zip(iters["entrywise"], iters["2-norm"]))
    assert sum(iters["entrywise"]) <= sum(iters["2-norm"]) - len(seeds) // 2


def test_sparse_residual_max_matches_the_dense_vector():
    """``sparse_abs_max`` of s + c·u (the sparse start's vectors) equals the dense vector's max-abs per row, whether
    the support misses the component's largest u entries, holds a prefix of them, or the whole component."""
    import scipy.sparse as sp

    from keplm.kg.pepr import CGSolver

    n, h, r, t = components_kg(7)
    a, _, _, deg = adjacency_from_triples(n, h, r, t)
    cg = CGSolver(a, deg, 0.15)
    comp = cg.component
    big = np.flatnonzero(comp == comp[cg.position[0]])            # increasing ids: decreasing u
    path = np.flatnonzero(comp == comp[cg.position[600]])
    rng = np.random.default_rng(1)
    supports = [big[-40:], big[:25], np.r_[big[:3], big[5:30]], big, path[1:], path]
    rows = [(np.full(len(s), i), s) for i, s in enumerate(supports)]
    s = sp.csr_matrix((rng.normal(size=sum(len(x) for x in supports)) * 1e-4,   # small: u's part outside shows
                       (np.concatenate([q for q, _ in rows]), np.concatenate([x for _, x in rows]))),
                      shape=(len(supports), n))
    cols = np.array([x[0] for x in supports])
    c = np.array([-0.3, 0.2, 0.5, -0.1, 0.4, 0.0])
    dense = cg._densify(s, c, cols)
    np.testing.assert_allclose(cg.sparse_abs_max(s, c, cols), np.abs(dense).max(axis=0), rtol=1e-12)


def test_pipelined_calls_run_every_item_once_and_feed_the_faster_actor_more(ray_local):
    import time

    from keplm.platform.ray_session import pipelined_calls

    @ray_local.remote(num_cpus=0.25)
    class Worker:
        def __init__(self, name, pause):
            self.name, self.pause = name, pause

        def work(self, item):
            time.sleep(self.pause)
            return item, self.name

    actors = [Worker.remote("slow", 0.08), Worker.remote("fast", 0.005)]
    done = list(pipelined_calls(actors, lambda actor, item: actor.work.remote(item), range(60), depth=3))
    assert sorted(item for item, _ in done) == list(range(60))
    by = {name: sum(who == name for _, who in done) for name in ("slow", "fast")}
    assert by["fast"] > 3 * by["slow"] >= 3
    assert list(pipelined_calls(actors, lambda actor, item: actor.work.remote(item), [])) == []


def test_per_seed_solves_bound_the_scores_read_at_neighbours():
    """pepr.solve=seeds reads a seed's scores only at its neighbours: the solve stops on their largest
    sqrt(d_t) instead of sqrt(d_max), in fewer iterations, and those scores still meet pepr.tol."""
    from keplm.kg.pepr import neighbour_read_scales

    n0, h, r, t = hubs_and_leaves(7)                           # hubs of degree > 100 set d_max
    rng = np.random.default_rng(7)
    x, y = rng.integers(n0, n0 + 300, 700), rng.integers(n0, n0 + 300, 700)   # and a sparse component
    keep = x != y
    n, h, t = n0 + 301, np.r_[h, x[keep]], np.r_[t, y[keep]]                   # the last entity isolated
    a, _, _, deg = adjacency_from_triples(n, h, np.zeros(len(h), np.int64), t)
    seeds = np.array([n0 + 5, n0 + 77, n0 + 150, 0, 50])
    scale = neighbour_read_scales(a, deg, seeds)
    for j, m in enumerate(seeds):
        assert scale[j] == np.sqrt(deg[a.indices[a.indptr[m]:a.indptr[m + 1]]].max())
    assert (neighbour_read_scales(a, deg, np.array([n - 1])) == 1).all()
    sparse = seeds[:3]
    assert scale[:3].max() < np.sqrt(deg.max()) / 3
    exact = PEPRSolver(a, deg, PEPRConfig(tol=1e-13)).scores(seeds)
    for tol in (1e-3, 1e-6):
        full, read = PEPRSolver(a, deg, PEPRConfig(tol=tol)), PEPRSolver(a, deg, PEPRConfig(tol=tol))
        assert np.abs(full.scores(seeds) - exact).max() <= tol
        got = read.scores(seeds, scale)
        for j, m in enumerate(seeds):
            nb = a.indices[a.indptr[m]:a.indptr[m + 1]]
            assert np.abs(got[nb, j] - exact[nb, j]).max() <= tol
        read.scores(sparse, scale[:3]), full.scores(sparse)
        assert read.iterations[-1] < full.iterations[-1]


def test_a_solve_that_does_not_converge_is_one_clear_error(ray_local, tmp_path):
    """The driver's g solve fails before any actor works: the error is PEPR's own, naming the keys to change."""
    from keplm.kg.pepr import PEPRNoConvergence

    build_graph(DEMO / "kg", tmp_path / "g", GraphConfig(), {})
    g = load_graph(tmp_path / "g")
    with pytest.raises(PEPRNoConvergence, match="raise pepr.max_iter or pepr.tol"):
        compute_neighbours(g, PEPRConfig(num_actors=2, max_iter=1, tol=1e-9, actor_num_cpus=0.5))
