"""keplm pretrain on Ray Train (2 CPU workers, gloo): the chain, MLflow, checkpoints, exact resume, bad config."""

import json
from collections import Counter

import pytest
from mlflow.tracking import MlflowClient

from keplm.platform.train_loop import (Prefetcher, bounded_batches, compile_blocks, ingest_data_config,
                                       iter_row_batches, shard_batches, shard_dataset, shuffle_seed, worker_rows)

from conftest import run_pretrain as pretrain


def last_json(r):
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def chain(demo_run):
    """The session's demo pretraining (conftest): every stage, then 12 steps on 2 workers."""
    return demo_run


STAGE_FLAGS = ("--prepared={}/prepare", "--neighbours={}/neighbours", "--embeddings={}/embed-transr")


def test_worker_shares_cover_every_row_once(demo_prepared):
    files = sorted(str(f) for f in (demo_prepared / "shards").glob("*.parquet"))
    shares = [worker_rows(files, 3, r) for r in range(3)]
    assert shares[0][0] == 0 and all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
    whole = [t for t in iter_row_batches(files, 1, 0, None)]
    parts = [t for lo, hi in shares for t in iter_row_batches(files, 1, lo, hi)]
    assert len(parts) == len(whole) and all(a.equals(b) for a, b in zip(parts, whole))


def _split_rows(files, world, batch_size, shuffle_rows=0, epoch=0):
    """Each worker's batches from the Ray Data split Ray Train hands the workers, read concurrently as the
    workers do (``shard_batches``, as the loop reads them), as lists of the rows' input_ids."""
    from concurrent.futures import ThreadPoolExecutor

    splits = ingest_data_config().configure({"train": shard_dataset(files, seed=42, read_cpus=0.0, read_concurrency=2)},
                                            world_size=world, worker_handles=None, worker_node_ids=None)

    def read(rank):
        batches = shard_batches(splits[rank]["train"], batch_size, shuffle_rows, shuffle_seed(42, epoch, rank))
        return [[tuple(ids) for ids in b.column("input_ids").to_pylist()] for b in batches]

    with ThreadPoolExecutor(world) as pool:
        return list(pool.map(read, range(world)))


@pytest.mark.slow   # three Ray Data reads and splits
def test_ray_data_split_gives_each_worker_equal_disjoint_rows_the_same_on_every_run(demo_prepared):
    files = sorted(str(f) for f in (demo_prepared / "shards").glob("*.parquet"))
    assert len(files) >= 2, "the split must spread several files"
    all_rows = [tuple(ids) for t in iter_row_batches(files, 1, 0, None) for ids in t.column("input_ids").to_pylist()]
    batch = 4
    first = _split_rows(files, 2, batch)
    # what the loop trains on: the smallest share's whole batches on every worker
    steps = (len(all_rows) // 2) // batch
    assert [len(w) for w in first] == [steps, steps]
    seen = [row for w in first for b in w for row in b]
    assert all(len(b) == batch for w in first for b in w)
    assert len(seen) >= len(all_rows) - 2 * batch
    # each row goes to one worker only (rows can repeat in the corpus: compare counts, not sets)
    from collections import Counter

    assert not Counter(seen) - Counter(all_rows)
    assert _split_rows(files, 2, batch) == first
    # the same split after an earlier stage in the process set a small block size (as prepare's did)
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = ctx.target_max_block_size
    ctx.target_max_block_size = 4096
    try:
        assert _split_rows(files, 2, batch) == first
    finally:
        ctx.target_max_block_size = saved


@pytest.mark.slow   # four Ray Data reads and splits
def test_local_shuffle_reorders_each_workers_rows_per_epoch_the_same_on_every_run(demo_prepared):
    from collections import Counter

    files = sorted(str(f) for f in (demo_prepared / "shards").glob("*.parquet"))
    batch = 4
    plain = _split_rows(files, 2, 1)            # every row each worker gets, in read order
    epoch0 = _split_rows(files, 2, batch, shuffle_rows=64)
    assert _split_rows(files, 2, batch, shuffle_rows=64) == epoch0
    epoch1 = _split_rows(files, 2, batch, shuffle_rows=64, epoch=1)
    for rank in range(2):
        mine = [row for b in plain[rank] for row in b]
        for shuffled in (epoch0[rank], epoch1[rank]):
            rows = [row for b in shuffled for row in b]
            # the same number of whole batches as unshuffled, drawn from this worker's rows only
            assert len(shuffled) == len(mine) // batch and all(len(b) == batch for b in shuffled)
            assert not Counter(rows) - Counter(mine)
            assert rows != mine[:len(rows)]
        assert epoch0[rank] != epoch1[rank]
    assert shuffle_seed(42, 0, 0) != shuffle_seed(42, 0, 1) != shuffle_seed(42, 1, 1) != shuffle_seed(43, 1, 1)


def test_bounded_batches_yields_the_window_and_reads_the_rest():
    read = []

    def source():
        for i in range(10):
            read.append(i)
            yield f"b{i}"

    assert list(bounded_batches(source(), 3, 6)) == [(3, "b3"), (4, "b4"), (5, "b5")]
    assert read == list(range(10))


class _DrawingCollate:
    """A collator that draws from its RNG, like KnowledgeCollator's masking, and counts what it sees."""

    def __init__(self, seed):
        from collections import Counter

        import numpy as np

        self.rng = np.random.default_rng(seed)
        self.stats = Counter()

    def __call__(self, rows):
        import torch

        self.stats["rows"] += len(rows)
        self.stats["odd_rows"] += sum(r["v"] % 2 for r in rows)
        return {"x": torch.tensor([r["v"] for r in rows]), "noise": torch.tensor(self.rng.random(len(rows)))}


def _tables(n):
    import pyarrow as pa

    return [(i, pa.table({"v": [i, i + 100]})) for i in range(n)]


def test_prefetcher_yields_what_inline_collation_gives_with_the_rng_state_after_each_batch():
    import torch

    inline = list(Prefetcher(_tables(6), _DrawingCollate(5), depth=0))
    ahead_collate = _DrawingCollate(5)
    ahead = Prefetcher(_tables(6), ahead_collate, depth=3)
    got = list(ahead)
    ahead.close()
    assert [i for i, *_ in got] == list(range(6))
    for (i, a, sa, ca), (j, b, sb, cb) in zip(inline, got):
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["noise"], b["noise"]) and sa == sb and ca == cb
    # the state attached to batch 2 is where a resumed run must restart the RNG: batch 3 comes out the same
    resumed = _DrawingCollate(0)
    resumed.rng.bit_generator.state = got[2][2]
    assert torch.equal(resumed([{"v": 3}, {"v": 103}])["noise"], got[3][1]["noise"])
    # and its counts are those of batches 0-2 only, though the thread had collated further by then
    assert got[2][3] == {"rows": 6, "odd_rows": 2} and ahead_collate.stats["rows"] == 12
    assert got[2][3] is not got[3][3]                                   # copies, not the live counter


def test_a_collator_without_stats_gets_none_and_restoring_counts_replaces_them():
    from keplm.platform.train_loop import collate_stats, set_collate_stats

    plain = lambda rows: {}                                              # noqa: E731
    assert collate_stats(plain) is None
    set_collate_stats(plain, {"rows": 3})                                # no counts to restore: nothing happens
    c = _DrawingCollate(0)
    c([{"v": 1}])
    set_collate_stats(c, {"rows": 10})
    assert c.stats == {"rows": 10}


def test_prefetcher_raises_the_threads_error_and_stops_when_closed_early():
    def broken():
        yield from _tables(2)
        raise ValueError("bad shard")

    feed = Prefetcher(broken(), _DrawingCollate(0), depth=2)
    with pytest.raises(ValueError, match="bad shard"):
        list(feed)
    endless = Prefetcher(((i, t) for i in range(10**9) for _, t in _tables(1)), _DrawingCollate(0), depth=2)
    next(iter(endless))
    endless.close()                      # returns: the thread saw the stop while blocked on a full queue
    assert not endless._thread.is_alive()


def _two_rank_means(rank: int, init: str, dest: str) -> None:
    import torch
    import torch.distributed as dist

    from keplm.models.smedbert import KnowledgePreTrainingOutput
    from keplm.platform.train_loop import loss_names, mean_over_ranks

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    # rank 1's batch had no entity mention: no mention terms in its output
    out = KnowledgePreTrainingOutput(loss=torch.tensor(2.0 + rank), mlm_loss=torch.tensor(1.0 + rank),
                                     mnem_loss=torch.tensor(4.0) if rank == 0 else None)
    sums = {k: v for k, v in out.items() if k.endswith("loss") and v is not None}
    means = mean_over_ranks(sums, loss_names(out), torch.device("cpu"))
    torch.save(means, f"{dest}.{rank}")
    dist.destroy_process_group()


def test_terms_only_some_ranks_have_are_averaged_over_those_ranks(tmp_path):
    """A term one rank's batch lacks (no mention in it) leaves every rank's reduced vector the same length:
    before, the shorter vector made gloo abort the run; the term's mean is over the ranks that had it."""
    import torch
    import torch.multiprocessing as mp

    # forked, not spawned: the children inherit this process's imports (a spawned child spends 3 s importing torch)
    mp.start_processes(_two_rank_means, args=(f"file://{tmp_path / 'rdzv'}", str(tmp_path / "means")), nprocs=2,
                       start_method="fork")
    for rank in (0, 1):
        means = torch.load(tmp_path / f"means.{rank}")
        assert means == pytest.approx({"loss": 2.5, "mlm_loss": 1.5, "mnem_loss": 4.0})


def test_compile_blocks_compiles_each_encoder_layer_and_keeps_the_state_dict():
    from keplm.models import KeplmBertConfig, KeplmBertForPreTraining

    model = KeplmBertForPreTraining(KeplmBertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3,
                                                    num_attention_heads=2, intermediate_size=32))
    keys = list(model.state_dict())
    assert compile_blocks(model) == 3
    assert all(layer._compiled_call_impl is not None for layer in model.bert.encoder.layer)
    assert model.bert.embeddings._compiled_call_impl is None and list(model.state_dict()) == keys


def test_validation_split_holds_out_exactly_the_last_rows(demo_prepared, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from keplm.platform.train_loop import split_validation

    files = sorted(str(f) for f in (demo_prepared / "shards").glob("*.parquet"))
    whole = pa.concat_tables([pq.read_table(f) for f in files])
    for n in (1, 37, pq.read_metadata(files[-1]).num_rows + 5):
        train, val = split_validation(files, n, tmp_path / str(n))
        t = pa.concat_tables([pq.read_table(f) for f in train])
        v = pa.concat_tables([pq.read_table(f) for f in val])
        assert v.num_rows == n and t.num_rows == whole.num_rows - n
        assert pa.concat_tables([t, v]).equals(whole)          # nothing lost, nothing duplicated, order kept
    with pytest.raises(ValueError, match="leaves no training rows"):
        split_validation(files, whole.num_rows, tmp_path / "all")
    assert split_validation(files, 0, tmp_path / "none") == (files, [])


@pytest.mark.slow
def test_two_worker_run_trains_logs_and_checkpoints(chain):
    out, r = chain
    res = last_json(r)
    assert res["counts"]["step"] == 12 and res["counts"]["final"] is True
    for stage in ("prepare", "graph", "neighbours", "embed-transr"):
        assert (out / stage / "manifest.json").is_file() and (out / stage / "stage_key.json").is_file()
    from transformers import AutoModelForPreTraining

    import keplm.models  # noqa: F401  (registers the model types)

    model = AutoModelForPreTraining.from_pretrained(out / "model")
    assert model.config.model_type == "smedbert" and (out / "model" / "tokenizer.json").is_file()
    client = MlflowClient(res["counts"].get("tracking_uri") or f"sqlite:///{out / 'mlflow.db'}")
    run = client.get_run(res["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["model.kind"] == "smedbert"
    assert run.data.tags["lineage.prepare"].startswith("manifest:") and "lineage.embed" in run.data.tags
    for key in ("loss", "mlm_loss", "sop_loss", "mnem_loss", "mmem_loss", "lr", "tokens_per_s", "samples_per_s",
                "mfu", "peak_memory_mb"):
        assert key in run.data.metrics, key
    hist = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in hist] == list(range(1, 13))
    # loss-balance diagnostics at the first step and every checkpoint (4, 8, 12), one peak for MFU on all ranks
    for term in ("mlm_loss", "sop_loss", "mnem_loss", "mmem_loss"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, f"grad_norm/{term}")]
        assert steps == [1, 4, 8, 12], term
    assert all(0 < m.value <= 1 for m in client.get_metric_history(run.info.run_id, "mfu"))
    # length-grouped batches (train.length_group_batches): random batches of 4 would pad ~26 % of the demo
    padding = [m.value for m in client.get_metric_history(run.info.run_id, "padding_fraction")]
    assert len(padding) == 12 and sum(padding) / 12 < 0.05
    # where the workers ran (one local node here) and how many each step had
    nodes = json.loads(run.data.tags["keplm.worker_nodes"])
    assert len(nodes) == 2 and len(set(nodes)) == 1 and "train: 2 workers on 1 node" in r.stdout
    assert {m.value for m in client.get_metric_history(run.info.run_id, "workers")} == {2}
    log = (out / "logs" / "keplm.log").read_text(encoding="utf-8")   # Ray's and the workers' lines, off the console
    assert "Reporting training result" in log
    assert "mfu': 1." not in log and "mfu': 2." not in log   # no rank's report claims over 100 %
    # the model learns: MLM falls (the total is dominated by MNeM, which swings with each batch's mentions)
    mlm = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "mlm_loss"), key=lambda m: m.step)]
    assert len(mlm) == 12 and mlm[-1] < mlm[0] - 0.05
    # the collators' counts, summed over both workers, at each checkpoint: rows trained on, not rows the
    # prefetch thread collated ahead (12 steps x batch 4 x 2 workers)
    samples = client.get_metric_history(run.info.run_id, "data.samples")
    assert [(m.step, m.value) for m in samples] == [(4, 32), (8, 64), (12, 96)]
    assert res["counts"]["data.samples"] == 96 and "data.tokens_cut_by_length" in res["counts"]
    assert client.list_artifacts(run.info.run_id, "model")
    # the local Ray has no dashboard, so no state API: Ray Train's placement-group cleaner, which polls it
    # every second, stays quiet instead of warning once a second through the whole run
    assert "Failed to query Ray Train Controller actor state" not in log


@pytest.mark.slow
def test_pretrain_writes_a_plain_bert_export_and_a_model_card_in_both(chain):
    import yaml

    out, r = chain
    res = last_json(r)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["bert_model_dir"] == str(out / "model-bert")
    assert manifest["command"].startswith("keplm pretrain --config configs/demo.yaml --output ")
    assert set(manifest["stages"]) == {"prepare", "graph", "neighbours", "embed"}
    bert = json.loads((out / "model-bert" / "config.json").read_text())
    assert bert["model_type"] == "bert" and bert["architectures"] == ["BertForMaskedLM"]
    assert (out / "model-bert" / "model.safetensors").is_file() and (out / "model-bert" / "tokenizer.json").is_file()
    for d, tag in ((out / "model", "keplm-full-checkpoint"), (out / "model-bert", "keplm-export")):
        text = (d / "README.md").read_text(encoding="utf-8")
        header = yaml.safe_load(text.split("---\n")[1])
        assert header["library_name"] == "transformers" and header["language"] == "zh"
        assert {"keplm", "smedbert", tag} <= set(header["tags"])
        assert header.get("pipeline_tag") == ("fill-mask" if tag == "keplm-export" else None)
        assert res["mlflow_run_id"] in text and manifest["command"] in text and "Not evaluated" in text
        assert text.count("| verified |") == 4 and "| MNeM | 2 |" in text
        # data.tokens: the tokens trained on were counted (12 steps x 8 rows, each under 128 tokens)
        assert f"| tokens seen | {res['counts']['data.tokens']:,} (counted" in text
        assert 96 * 8 < res["counts"]["data.tokens"] <= 96 * 128
        assert (d / "pretrain-config.yaml").is_file()
    client = MlflowClient(res["counts"].get("tracking_uri") or f"sqlite:///{out / 'mlflow.db'}")
    assert {a.path for a in client.list_artifacts(res["mlflow_run_id"], "model-bert")} >= {"model-bert/README.md",
                                                                                           "model-bert/config.json"}


@pytest.mark.slow
def test_rerun_reuses_stages_and_verbose_shows_the_library_lines(chain):
    out, full = chain
    # the same command again, with -v: every stage reused, training already finished -> same final loss, and
    # the lines the quiet console keeps in the log file (Ray's, the workers') are on the console again
    again = pretrain(out, "-v")
    assert "reusing stage prepare" in again.stderr and last_json(again)["counts"]["loss"] == last_json(full)["counts"]["loss"]
    assert "Started a local Ray instance" in again.stdout and "(RayTrainWorker pid=" in again.stdout
    assert "\x1b[" not in again.stdout and last_json(again)["counts"]["step"] == 12
    # the same command again changed nothing: counted, no tag
    tags = MlflowClient(f"sqlite:///{out / 'mlflow.db'}").get_run(last_json(full)["mlflow_run_id"]).data.tags
    assert tags["keplm.invocations"] == "2" and "keplm.invocation.2" not in tags


@pytest.mark.slow
def test_stop_then_resume_through_a_lost_worker_is_exact(chain, tmp_path):
    """A run stopped after step 5 (a checkpoint there) is resumed by the same command; in the resumed run the
    last worker's process dies after step 6 (FailureConfig): Ray Train restarts the group from the step-5
    checkpoint, and the run ends where the uninterrupted run ended, in one MLflow run."""
    out, full = chain
    stages = [flag.format(out) for flag in STAGE_FLAGS]
    part = pretrain(tmp_path / "r", *stages, "train.stop_after_steps=5")
    assert last_json(part)["counts"]["step"] == 5
    resumed = pretrain(tmp_path / "r", *stages, "train.fault_at_step=6")
    assert (tmp_path / "r" / "train" / "fault_injected").read_text() == "6"   # the fault did happen
    # resumed from step 5 by the command, and again from step 5 by the restarted group (not from step 0)
    assert resumed.stdout.count("resuming from the checkpoint of step 5") == 2, resumed.stdout[-3000:]
    a, b = last_json(resumed)["counts"], last_json(full)["counts"]
    assert a["step"] == b["step"] == 12
    assert abs(a["loss"] - b["loss"]) < 1e-6 * max(1.0, abs(b["loss"]))
    # the collators' counts went on from the checkpoint's: the same as the uninterrupted run's
    assert {k: v for k, v in a.items() if k.startswith("data.")} == {k: v for k, v in b.items() if k.startswith("data.")}
    # one MLflow run; its params keep the first invocation's values, the second's are in a tag
    run_id = last_json(part)["mlflow_run_id"]
    assert last_json(resumed)["mlflow_run_id"] == run_id and "keeps its first invocation's params" in resumed.stderr
    client = MlflowClient(f"sqlite:///{tmp_path / 'r' / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.data.params["train.stop_after_steps"] == "5" and run.data.tags["keplm.invocations"] == "2"
    assert json.loads(run.data.tags["keplm.invocation.2"]) == {"train.stop_after_steps": "", "train.fault_at_step": "6"}
    hist = client.get_metric_history(run_id, "step")
    assert sorted({int(m.value) for m in hist}) == list(range(1, 13))
    # step 6 ran twice: the restarted group logged it again; the failed attempt's log of it may still have been in
    # MLflow's asynchronous queue when Ray stopped rank 0
    logged = Counter(int(m.value) for m in hist)
    assert 1 <= logged[6] <= 2 and all(logged[s] == 1 for s in (1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12)), logged


def test_the_training_key_follows_what_is_computed_not_how_it_runs():
    from keplm import config as keplm_config
    from keplm.models.pipeline import changed_keys, training_key

    lineage = {"lineage.prepare": "manifest:a"}
    base = training_key(keplm_config.load("configs/demo.yaml"), lineage)
    for override in ("train.lr=0.003", "batches.k=5", "model.hidden_size=32", "train.max_steps=7", "train.num_workers=1"):
        changed = training_key(keplm_config.load("configs/demo.yaml", [override]), lineage)
        assert changed != base and changed_keys(base, changed) == [override.split("=")[0]]
    for override in ("train.stop_after_steps=5", "train.compile=true", "train.cpus_per_worker=2", "train.log_every=1",
                     "train.fault_at_step=3", "train.resources_timeout_s=30", "pepr.k_max=20", "tracking.experiment=x"):
        assert training_key(keplm_config.load("configs/demo.yaml", [override]), lineage) == base, override
    # a rerun stage reaches the key through its manifest hash
    other = training_key(keplm_config.load("configs/demo.yaml"), {**lineage, "lineage.neighbours": "manifest:b"})
    assert changed_keys(base, other) == ["stages.neighbours"]
    # the warning's text: nothing without a marker or with the same key, else the changed keys
    from keplm.models.pipeline import key_change

    assert key_change({}, "k1", other) is None and key_change({"key": "k1", "key_parts": base}, "k1", other) is None
    assert key_change({"key": "k0", "key_parts": base}, "k1", other) == "stages.neighbours"


@pytest.mark.slow
def test_a_changed_k_reruns_the_neighbours_and_trains_anew_then_resumes_that(chain, tmp_path):
    out, _ = chain
    # in the job's process (train.runner=in_process): what is tested here is the job's stages and keys
    base = [f"--prepared={out / 'prepare'}", "train.max_steps=2", "train.checkpoint_every=2", "train.num_workers=1",
            "train.runner=in_process", "embed.epochs=2"]
    first = pretrain(tmp_path / "k", *base)
    second = pretrain(tmp_path / "k", *base, "pepr.k_max=20")
    err = second.stderr
    assert "running stage neighbours" in err and "running stage graph" not in err
    assert "reusing" in err and "embed-transr" in err and "running stage embed" not in err
    anew = next(line for line in err.splitlines() if "training anew" in line)
    assert "stages.neighbours" in anew
    import pyarrow.parquet as pq

    assert max(pq.read_table(tmp_path / "k" / "neighbours" / "neighbours.parquet").column("rank").to_pylist()) == 19
    client = MlflowClient(f"sqlite:///{tmp_path / 'k' / 'mlflow.db'}")
    runs = (last_json(first)["mlflow_run_id"], last_json(second)["mlflow_run_id"])
    assert runs[0] != runs[1]
    assert [m.step for m in client.get_metric_history(runs[1], "loss")] == [1, 2]   # from step 0, not resumed
    assert client.get_run(runs[0]).info.status == client.get_run(runs[1]).info.status == "FINISHED"
    # the same training again, logged to another store: resumed (finished), in a new run there, and the log says why
    fourth = pretrain(tmp_path / "k", *base, "pepr.k_max=20", f"tracking.uri=sqlite:///{tmp_path / 'other.db'}")
    assert "training anew" not in fourth.stderr and "resuming from the checkpoint of step 2" in fourth.stderr
    moved = next(line for line in fourth.stderr.splitlines() if "logging to a new run" in line)
    assert runs[1] in moved and str(tmp_path / "other.db") in moved
    assert MlflowClient(f"sqlite:///{tmp_path / 'other.db'}").get_run(last_json(fourth)["mlflow_run_id"]).info.status == "FINISHED"


def test_a_resumed_run_counts_its_invocations_and_tags_the_values_its_params_cannot_take(tmp_path):
    from keplm import config as keplm_config
    from keplm.models.pipeline import record_invocation, start_run

    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    first = keplm_config.load("configs/demo.yaml", ["train.stop_after_steps=5", "tracking.experiment=e"])
    run_id = start_run(client, first, "r", {})
    assert record_invocation(client, run_id, first) == (2, {})
    second = keplm_config.load("configs/demo.yaml", ["train.stop_after_steps=9", "train.log_every=3", "tracking.experiment=e"])
    n, changed = record_invocation(client, run_id, second)
    assert n == 3 and changed == {"train.log_every": "3", "train.stop_after_steps": "9"}
    run = client.get_run(run_id)
    assert run.data.params["train.stop_after_steps"] == "5" and run.data.tags["keplm.invocations"] == "3"
    assert "keplm.invocation.2" not in run.data.tags and json.loads(run.data.tags["keplm.invocation.3"]) == changed


def pretrain_in_process(capsys, out, *args) -> tuple[int, str]:
    """The pretrain job's ``main`` in this process (what the command line runs) -> (exit code, last stderr line)."""
    from conftest import REPO, job_in_process

    rc, err = job_in_process("pretrain", ["--config", REPO / "configs" / "demo.yaml", "--output", out, *args], capsys)
    assert "Traceback" not in err, err[-2000:]
    return rc, err.strip().splitlines()[-1]


def test_bad_config_fails_before_any_worker_with_one_line(tmp_path, capsys):
    for override, msg in (("model.kind=gpt", "model.kind"), ("train.lr=-1", "train.lr"),
                          ("tracking.uri=http://127.0.0.1:9", "cannot reach the MLflow")):
        rc, last = pretrain_in_process(capsys, tmp_path / "bad", override)
        assert rc == 2 and msg in last and last.startswith("keplm pretrain: error:"), last


def test_missing_shards_and_foreign_kg_artifacts_fail_early(tmp_path, demo_prepared, capsys):
    rc, last = pretrain_in_process(capsys, tmp_path / "o", f"--prepared={tmp_path / 'none'}")
    assert rc == 2 and "no manifest.json" in last
    # a neighbours output built from another KG: refused before training
    from keplm.kg.graph import GraphConfig, build_graph

    kg = tmp_path / "kg"
    kg.mkdir()
    (kg / "entities.tsv").write_text("name\ttype\n感冒\tDisease\n发热\tSymptom\n", encoding="utf-8")
    (kg / "triples.tsv").write_text("head\trelation\ttail\n感冒\t症状\t发热\n", encoding="utf-8")
    build_graph(kg, tmp_path / "g", GraphConfig(), {})
    rc, last = pretrain_in_process(capsys, tmp_path / "o2", f"--prepared={demo_prepared}",
                                   f"--neighbours={tmp_path / 'g'}", f"--embeddings={tmp_path / 'g'}")
    assert rc == 2 and "entity ids differ" in last
