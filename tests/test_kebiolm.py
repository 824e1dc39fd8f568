"""KeBioLM (seed 002 §3): BIO targets, top-k retrieval (eq. 3), fusion (eq. 4), linking loss (eq. 10)
exact vs sampled, the loss sum (eq. 6), frozen/trainable entities, save and reload."""

import pytest
import torch
import torch.nn.functional as F

from keplm.models.kebiolm import (BIO_B, BIO_I, BIO_O, KeBioLMConfig, KeBioLMForPreTraining, bio_targets,
                                  linking_loss, retrieve)


def tiny(**kw):
    base = dict(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
                max_position_embeddings=32, num_entities=12, entity_dim=8, text_layers=2, entity_top_k=4)
    base.update(kw)
    torch.manual_seed(0)
    return KeBioLMForPreTraining(KeBioLMConfig(**base)).eval()


def batch():
    ids = torch.randint(5, 50, (2, 10))
    att = torch.ones_like(ids)
    att[1, 8:] = 0
    spans = torch.tensor([[[1, 3], [5, 6]], [[2, 5], [0, 0]]])
    mask = torch.tensor([[True, True], [True, False]])
    ent = torch.tensor([[3, 7], [11, -1]])
    labels = torch.full_like(ids, -100)
    labels[0, 4] = ids[0, 4]
    return dict(input_ids=ids, attention_mask=att, labels=labels, mention_spans=spans, mention_mask=mask,
                mention_entity=ent)


def test_bio_targets_from_spans():
    b = batch()
    t = bio_targets(b["mention_spans"], b["mention_mask"], b["attention_mask"])
    assert t[0].tolist() == [BIO_O, BIO_B, BIO_I, BIO_O, BIO_O, BIO_B, BIO_O, BIO_O, BIO_O, BIO_O]
    assert t[1].tolist() == [BIO_O, BIO_O, BIO_B, BIO_I, BIO_I, BIO_O, BIO_O, BIO_O, -100, -100]


def test_retrieve_is_the_softmax_over_the_top_k():
    torch.manual_seed(1)
    h, e = torch.randn(3, 5), torch.randn(9, 5)
    got, scores = retrieve(h, e, 4)
    for n in range(3):
        s = h[n] @ e.T
        idx = s.argsort(descending=True)[:4]
        want = (torch.softmax(s[idx], 0)[:, None] * e[idx]).sum(0)
        assert torch.allclose(got[n], want, atol=1e-6)
    full, _ = retrieve(h, e, 9)        # k = Z: attention over every entity
    assert torch.allclose(full, torch.softmax(h @ e.T, -1) @ e, atol=1e-6)


def retrieve_reference(h, e, k):
    """eq. 3 differentiated as written: the scores over every entity, their top k, softmax, weighted sum."""
    top, idx = (h @ e.T).topk(k, dim=-1)
    return torch.einsum("nk,nkd->nd", torch.softmax(top, -1), e[idx])


@pytest.mark.parametrize("keep_scores", [True, False])
def test_retrieve_has_the_value_and_gradients_of_eq3_differentiated_through_all_scores(keep_scores):
    """retrieve picks the top k without a graph and recomputes their scores: the same e'_m and the same
    gradients, on the mentions and on the entity table, as eq. 3 through the full (N, Z) scores (fp32, 1e-5)."""
    torch.manual_seed(3)
    h, e = torch.randn(7, 8, requires_grad=True), torch.randn(50, 8, requires_grad=True)
    w = torch.randn(7, 8)
    got, scores = retrieve(h, e, 5, keep_scores=keep_scores)
    assert scores.requires_grad == keep_scores
    (got * w).sum().backward()
    got_grads = h.grad.clone(), e.grad.clone()
    h.grad = e.grad = None
    want = retrieve_reference(h, e, 5)
    (want * w).sum().backward()
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(got_grads[0], h.grad, atol=1e-5) and torch.allclose(got_grads[1], e.grad, atol=1e-5)


@pytest.mark.parametrize("negatives", [None, 6])
def test_forward_and_gradients_equal_the_straightforward_kebiolm(negatives):
    """The whole model against KeBioLM written out plainly (ED on every token, eq. 3 through the full scores,
    eq. 4 added token by token, eq. 10 exact or sampled): same losses and gradients in fp32 to 1e-5."""
    from keplm.models.modules import add_losses, run_bert

    m = tiny(el_negatives=negatives, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).train()
    b = batch()
    torch.manual_seed(5)
    out = m(**b)
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()

    cfg, extra = m.config, {}
    torch.manual_seed(5)

    def hook(h):
        target = bio_targets(b["mention_spans"], b["mention_mask"], b["attention_mask"])
        extra["ed"] = F.cross_entropy(m.detect(h).reshape(-1, 3), target.reshape(-1), ignore_index=-100)
        out = h.clone()
        h_proj, gold = [], []
        for i, j in zip(*b["mention_mask"].nonzero(as_tuple=True)):
            s, e = b["mention_spans"][i, j].tolist()
            hp = m.mention_proj(torch.cat([h[i, s], h[i, e - 1]]))
            add = m.entity_out(retrieve_reference(hp[None], m.entity_emb, cfg.entity_top_k)[0])
            for t in range(s, e):
                out[i, t] = out[i, t] + add
            h_proj.append(hp)
            gold.append(b["mention_entity"][i, j])
        h_proj, gold = torch.stack(h_proj), torch.stack(gold)
        ok = gold >= 0
        extra["el"] = linking_loss(h_proj[ok], m.entity_emb, gold[ok], m._negatives(h.device))
        return out

    seq = run_bert(m.bert, b["input_ids"], b["attention_mask"], None, after_layer=cfg.text_layers, hook=hook)
    _, _, mlm, sop = m.ex_loss(seq, b["labels"], None)
    want = add_losses((1.0, mlm), (1.0, sop), (cfg.lambda_ed, extra["ed"]), (cfg.lambda_el, extra["el"]))
    want.backward()
    assert torch.allclose(out.loss, want, atol=1e-5) and torch.allclose(out.el_loss, extra["el"], atol=1e-5)
    for n, p in m.named_parameters():
        if p.grad is not None or n in got:
            assert torch.allclose(got[n], p.grad, atol=1e-5), n


def test_sampled_linking_loss_equals_the_exact_one_when_every_entity_is_drawn():
    torch.manual_seed(2)
    h, e = torch.randn(6, 5), torch.randn(20, 5)
    gold = torch.randint(0, 20, (6,))
    exact = linking_loss(h, e, gold, None)
    assert torch.allclose(exact, F.cross_entropy(h @ e.T, gold))
    sampled = linking_loss(h, e, gold, torch.randperm(20))   # gold masked out of its own negatives
    assert torch.allclose(sampled, exact, atol=1e-6)
    few = linking_loss(h, e, gold, torch.randperm(20)[:5])
    assert few < exact + 1e-6       # fewer competitors: a lower bound of the exact loss (per row, same logits)


def test_fusion_adds_the_projected_entity_to_mention_tokens_only():
    m = tiny(text_layers=3)         # l1 = 0: the fused states are the encoder output
    b = batch()
    with torch.no_grad():
        fused = m(**b).last_hidden_state
        plain = m(**{**b, "mention_mask": torch.zeros_like(b["mention_mask"])}).last_hidden_state
        diff = fused - plain
        # recompute e'_m for the first mention of sample 0 from the text-only states
        from keplm.models.modules import run_bert

        h = run_bert(m.bert, b["input_ids"], b["attention_mask"], None)
        h_m = torch.cat([h[0, 1], h[0, 2]])
        e_prime, _ = retrieve(m.mention_proj(h_m)[None], m.entity_emb, m.config.entity_top_k)
        want = m.entity_out(e_prime)[0]
    assert torch.allclose(diff[0, 1], want, atol=1e-5) and torch.allclose(diff[0, 2], want, atol=1e-5)
    outside = [0, 3, 4, 6, 7, 8, 9]
    assert diff[0, outside].abs().max() == 0 and diff[1, [0, 1, 5, 6, 7]].abs().max() == 0


def test_loss_is_mlm_plus_weighted_detection_and_linking():
    m = tiny(lambda_ed=0.5, lambda_el=2.0)
    out = m(**batch())
    assert out.ed_loss is not None and out.el_loss is not None and out.mlm_loss is not None
    assert torch.allclose(out.loss, out.mlm_loss + 0.5 * out.ed_loss + 2.0 * out.el_loss)


def test_frozen_entities_get_no_gradient_and_trainable_ones_do():
    for trainable in (True, False):
        m = tiny(entity_trainable=trainable).train()
        m(**batch()).loss.backward()
        assert (m.entity_emb.grad is not None) == trainable
        assert m.mention_proj.weight.grad is not None and m.detect.weight.grad is not None


def test_config_rejects_an_impossible_layer_split():
    with pytest.raises(ValueError, match="text_layers"):
        KeBioLMConfig(num_hidden_layers=4, text_layers=5)


def test_save_and_reload_with_auto_classes(tmp_path):
    from transformers import AutoModelForPreTraining

    import keplm.models  # noqa: F401  (registers kebiolm)

    m = tiny()
    m.save_pretrained(tmp_path)
    back = AutoModelForPreTraining.from_pretrained(tmp_path)
    assert isinstance(back, KeBioLMForPreTraining) and back.config.text_layers == 2
    b = batch()
    with torch.no_grad():
        assert torch.allclose(m(**b).loss, back.eval()(**b).loss, atol=1e-6)


@pytest.mark.slow
def test_kebiolm_pretrains_on_the_demo_and_logs_its_losses(tmp_path, demo_run):
    import json
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    r = subprocess.run([sys.executable, "-m", "keplm.jobs.pretrain", "--config", "configs/demo.yaml", "--output",
                        str(tmp_path), f"--prepared={demo_run[0] / 'prepare'}", "model.kind=kebiolm", "model.top_k_entities=16", "batches.sop=false",
                        "train.max_steps=8", "train.num_workers=1", "train.runner=in_process", "train.batch_size=8", "train.lr=0.003",
                        "train.warmup_ratio=0.0", "train.checkpoint_every=8"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert (tmp_path / "embed-transe" / "embeddings.safetensors").is_file()    # the TransE stage it needs
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(res["mlflow_run_id"])
    assert {"mlm_loss", "ed_loss", "el_loss"} <= set(run.data.metrics) and "sop_loss" not in run.data.metrics
    ed = [m.value for m in client.get_metric_history(run.info.run_id, "ed_loss")]
    assert ed[-1] < ed[0]     # entity detection learns the linked spans
