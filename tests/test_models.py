"""SMedBERT and the baselines: the equations, the ablations, gradients, save/reload, overfitting one batch."""

import copy

import pytest
import torch
import torch.nn.functional as F

from keplm.models import KeplmBertConfig, KeplmBertForPreTraining, SMedBertConfig, SMedBertForPreTraining
from keplm.models.smedbert import HybridAttention, KGTensors

Z, R, TYPES, D2, V = 30, 3, 4, 8, 60
TINY = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64)


# the equations as the paper writes them, one relation at a time: references for the model's batched forms

def transr_compat_direct(h_mf, rel, proj, h_e, mu):
    """eq. 16 as written: cos(h_mf·M_r + h_r, h_e·M_r) · µ."""
    a = h_mf @ proj + rel
    b = h_e @ proj
    return (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1) * mu


def transr_compat_mp(h_mf, mp, h_e, mu):
    """eq. 19 without its log Q term: ([h_mf 1]·MP_r)·[h_e 0]ᵀ / (||[h_mf 1]·MP_r|| · ||h_e||) · µ.

    h_mf (..., d), mp (..., d+1, d+1) matching h_mf's leading dims, h_e (..., N, d) -> (..., N).
    """
    u = torch.einsum("...i,...ij->...j", torch.cat([h_mf, torch.ones_like(h_mf[..., :1])], -1), mp)[..., :-1]
    return torch.einsum("...d,...nd->...n", F.normalize(u, dim=-1), F.normalize(h_e, dim=-1)) * mu


def smedbert_config(**kw):
    return SMedBertConfig(**TINY, num_entities=Z, num_relations=R, num_entity_types=TYPES, kg_dim=D2, **kw)


def make_batch(seed=0, b=2, t=16, m=3, k=4, n=5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (b, t), generator=g)
    labels = torch.full((b, t), -100)
    labels[:, 3] = ids[:, 3]
    labels[:, 9] = ids[:, 9]
    labels[1, 10] = ids[1, 10]   # sample 1's second mention is masked whole (MMeM's masked mentions)
    ids[:, 3] = 4  # [MASK]
    ids[1, 10] = 4
    attn = torch.ones(b, t, dtype=torch.long)
    attn[1, -3:] = 0
    spans = torch.tensor([[[1, 3], [5, 8], [0, 0]], [[2, 4], [10, 11], [0, 0]]])
    mmask = torch.tensor([[True, True, False], [True, True, False]])
    nmask = torch.ones(b, m, k, dtype=torch.bool)
    nmask[0, 1, 2:] = False   # a mention with fewer neighbours
    nmask[1, 1] = False       # a mention with none
    nmask[:, 2] = False
    log_q = torch.log_softmax(torch.randn(Z, generator=g), 0)  # one Q over entities, as the collator's
    nb_ids, neg_ids = torch.randint(0, Z, (b, m, k), generator=g), torch.randint(0, Z, (b, m, k, n), generator=g)
    token_entity = torch.full((b, t), -1)
    token_entity[0, 1:3], token_entity[1, 2:4] = 7, 11
    return dict(
        input_ids=ids, attention_mask=attn, token_type_ids=torch.zeros(b, t, dtype=torch.long), labels=labels,
        sop_label=torch.tensor([0, 1]), mention_spans=spans, mention_mask=mmask,
        neighbour_ids=nb_ids, neighbour_relation=torch.randint(0, 2 * R, (b, m, k), generator=g),
        neighbour_type=torch.randint(0, TYPES, (b, m, k), generator=g), neighbour_mask=nmask,
        negative_ids=neg_ids, log_q_pos=log_q[nb_ids], log_q_neg=log_q[neg_ids],
        token_entity=token_entity,
    )


def kg_model(cfg, seed=0):
    torch.manual_seed(seed)
    model = SMedBertForPreTraining(cfg)
    g = torch.Generator().manual_seed(1)
    model.load_kg(torch.randn(Z, D2, generator=g), torch.randn(R, D2, generator=g), torch.randn(R, D2, D2, generator=g) / 3)
    return model


def test_eq17_fs_is_mu_exactly_when_the_transr_score_is_zero():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(D2, 6, generator=g)
    h, t = torch.randn(D2, generator=g), torch.randn(D2, generator=g)
    t = t / (t @ m).norm()                 # ||t·M_r|| = 1
    r = t @ m - h @ m                      # f_tr(h, r, t) = ||h·M_r + r − t·M_r|| = 0, ||h·M_r + r|| = 1
    assert torch.allclose(transr_compat_direct(h, r, m, t, mu=10.0), torch.tensor(10.0), atol=1e-5)
    off = transr_compat_direct(h, r + 0.3 * torch.randn(6, generator=g), m, t, mu=10.0)
    assert off < 10.0 - 1e-3               # any other relation vector scores below µ


def test_eq18_rewrite_equals_the_direct_product():
    kg = KGTensors(smedbert_config())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        kg.relation.copy_(torch.randn(R, D2, generator=g))
        kg.proj.copy_(torch.randn(R, D2, D2, generator=g))
    mp = kg.mp()
    h, e = torch.randn(D2, generator=g), torch.randn(D2, generator=g)
    for r in range(R):
        m, rv = kg.proj[r], kg.relation[r]
        direct = (h @ m + rv) @ (e @ m)
        rewrite = torch.cat([h, torch.ones(1)]) @ mp[r] @ torch.cat([e, torch.zeros(1)])
        assert torch.allclose(direct, rewrite, rtol=1e-5, atol=1e-4)
        inverse = torch.cat([h, torch.ones(1)]) @ mp[r + R] @ torch.cat([e, torch.zeros(1)])
        assert torch.allclose((h @ m - rv) @ (e @ m), inverse, rtol=1e-5, atol=1e-4)
        # eq. 19's normalised form, as the model computes it
        u = torch.cat([h, torch.ones(1)]) @ mp[r]
        expect = direct / (u[:-1].norm() * e.norm()) * 10.0
        assert torch.allclose(transr_compat_mp(h, mp[r], e[None], 10.0)[0], expect, rtol=1e-4)


def test_mnem_loss_is_eq15_over_eq19_per_neighbour():
    """mnem_loss (one GEMM over all relations, then picked per neighbour) against eq. 15 written out per
    neighbour with transr_compat_mp on that neighbour's own MP_r, in float64."""
    model = kg_model(smedbert_config()).double()
    batch = make_batch()
    h_mf = torch.randn(2, 3, D2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    keys = ("neighbour_ids", "neighbour_relation", "neighbour_mask", "negative_ids", "log_q_pos", "log_q_neg")
    nb_ids, nb_rel, nb_mask, neg_ids, lq_pos, lq_neg = (batch[k] for k in keys)
    got = model.mnem_loss(h_mf, nb_ids, nb_rel, nb_mask, neg_ids, lq_pos.double(), lq_neg.double())
    mp, ent, mu = model.kg.mp(), model.kg.entity, model.config.mu
    terms = []
    for b, m, k in zip(*torch.nonzero(nb_mask, as_tuple=True)):
        r = nb_rel[b, m, k]
        pos = transr_compat_mp(h_mf[b, m], mp[r], ent[nb_ids[b, m, k]][None], mu)[0] - mu * lq_pos[b, m, k]
        neg = transr_compat_mp(h_mf[b, m], mp[r], ent[neg_ids[b, m, k]], mu) - mu * lq_neg[b, m, k]
        big_k = nb_mask[b, m].sum()
        terms.append(-torch.log(pos.exp() / (pos.exp() + big_k * neg.exp().mean())))
    assert len(terms) == int(nb_mask.sum()) > 0
    assert torch.allclose(got, torch.stack(terms).mean(), rtol=1e-7)  # the direct exp form loses digits near 1


@pytest.mark.parametrize("kind", ["smedbert", "mlm"])
def test_training_mlm_loss_on_labelled_positions_only_equals_the_full_logits_loss(kind):
    cfg = smedbert_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0) if kind == "smedbert" else \
        KeplmBertConfig(**TINY, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = kg_model(cfg) if kind == "smedbert" else KeplmBertForPreTraining(cfg)
    batch = make_batch()
    full = model.eval()(**batch)
    sparse = model.train()(**batch)
    assert full.mlm_logits.shape == (2, 16, V) and sparse.mlm_logits is None
    by_hand = torch.nn.functional.cross_entropy(full.mlm_logits.reshape(-1, V), batch["labels"].reshape(-1), ignore_index=-100)
    assert torch.allclose(sparse.mlm_loss, full.mlm_loss, atol=1e-6) and torch.allclose(full.mlm_loss, by_hand, atol=1e-6)
    sparse.loss.backward()               # the head still trains
    assert model.cls.predictions.transform.dense.weight.grad.abs().sum() > 0


def test_attention_weights_sum_to_one_and_respect_padding():
    model = kg_model(smedbert_config()).eval()
    batch = make_batch()
    model(**batch)
    beta = model.hybrid.last_node_weights            # (B, M, K)
    alpha = model.hybrid.last_type_weights           # (B, M, TYPES)
    nmask = batch["neighbour_mask"]
    has = nmask.any(-1) & batch["mention_mask"]
    assert torch.allclose(beta.sum(-1)[has], torch.ones(int(has.sum())), atol=1e-6)
    assert (beta[~nmask] == 0).all() and (beta.sum(-1)[~has] == 0).all()
    present = torch.zeros_like(alpha, dtype=torch.bool)
    for i, j, k in zip(*torch.nonzero(nmask, as_tuple=True)):
        present[i, j, batch["neighbour_type"][i, j, k]] = True
    assert torch.allclose(alpha.sum(-1)[has], torch.ones(int(has.sum())), atol=1e-6)
    assert (alpha[~present] == 0).all()              # softmax only over the types present


def test_gated_infusion_leaves_non_mention_tokens_bit_identical():
    cfg = smedbert_config()
    torch.manual_seed(0)
    hybrid = HybridAttention(cfg)
    batch = make_batch()
    hidden = torch.randn(2, 16, cfg.hidden_size)
    nb = torch.randn(2, 3, 4, D2) * batch["neighbour_mask"][..., None]
    out = hybrid(hidden, batch["mention_spans"], batch["mention_mask"], nb, batch["neighbour_type"], batch["neighbour_mask"])
    touched = torch.zeros(2, 16, dtype=torch.bool)
    touched[0, 1:3] = touched[0, 5:8] = touched[1, 2:4] = True  # sample 1's 2nd mention has no neighbours
    assert torch.equal(out[~touched], hidden[~touched])
    assert (out[touched] != hidden[touched]).any(-1).all()


def infuse_reference(hybrid, hidden, h_k, spans, span_mask, nb_mask):
    """eq. 10-11 as written, one token at a time: a token of a mention that has neighbours gets
    h_i + GELU(W_ex [h_i; tanh(W_ug [h_i; h_k] + b_ug) ⊙ h_k] + b_ex); every other token is left as it is."""
    out = hidden.clone()
    for b in range(hidden.size(0)):
        for m in range(spans.size(1)):
            if not (span_mask[b, m] and nb_mask[b, m].any()):
                continue
            for i in range(int(spans[b, m, 0]), int(spans[b, m, 1])):
                h_i, k = hidden[b, i], h_k[b, m]
                g = torch.tanh(hybrid.w_ug(torch.cat([h_i, k])))
                out[b, i] = F.gelu(hybrid.w_ex(torch.cat([h_i, g * k]))) + h_i
    return out


def test_gated_infusion_on_the_mention_tokens_only_equals_eq10_11_token_by_token():
    """The hybrid module infuses the covered tokens alone (index_select / index_copy): its output and every
    gradient equal eq. 10-11 written out per token, in fp32 to 1e-5."""
    cfg = smedbert_config()
    torch.manual_seed(0)
    hybrid = HybridAttention(cfg)
    batch = make_batch()
    spans, smask, nmask = batch["mention_spans"], batch["mention_mask"], batch["neighbour_mask"]
    nb = torch.randn(2, 3, 4, D2) * nmask[..., None]
    hidden = torch.randn(2, 16, cfg.hidden_size, requires_grad=True)
    weight = torch.randn(2, 16, cfg.hidden_size)

    def grads(out):
        hybrid.zero_grad()
        hidden.grad = None
        (out * weight).sum().backward()
        return [hidden.grad.clone()] + [p.grad.clone() for p in (hybrid.w_ug.weight, hybrid.w_ex.weight, hybrid.w_bp.weight)]

    got = hybrid(hidden, spans, smask, nb, batch["neighbour_type"], nmask)
    got_grads = grads(got)
    h_k = hybrid.knowledge(hidden, spans, smask, nb, batch["neighbour_type"], nmask)
    want = infuse_reference(hybrid, hidden, h_k, spans, smask, nmask)
    want_grads = grads(want)
    assert torch.allclose(got, want, atol=1e-5)
    for a, b in zip(got_grads, want_grads):
        assert torch.allclose(a, b, atol=1e-5)


def param_names(model):
    return {n for n, _ in model.named_parameters()}


def test_each_ablation_removes_exactly_its_parameters_and_losses():
    full = kg_model(smedbert_config())
    batch = make_batch()
    out = full(**batch)
    assert all(x is not None for x in (out.mlm_loss, out.sop_loss, out.mnem_loss, out.mmem_loss))
    no_type = kg_model(smedbert_config(use_type_attention=False))
    assert param_names(full) - param_names(no_type) == {f"hybrid.{w}.weight" for w in ("w_t", "w_t2", "w_a")}
    assert no_type.hybrid.last_type_weights is None and no_type(**batch).mnem_loss is not None
    no_hybrid = kg_model(smedbert_config(use_hybrid_attention=False))
    removed = param_names(full) - param_names(no_hybrid)
    assert removed == {n for n in param_names(full) if n.startswith("hybrid.")}
    no_loss = kg_model(smedbert_config(use_knowledge_loss=False))
    assert param_names(full) - param_names(no_loss) == {n for n in param_names(full) if n.split(".")[0] in ("ctx_pool", "w_sa", "ln_sa")}
    o = no_loss(**batch)
    assert o.mnem_loss is None and o.mmem_loss is None
    assert torch.allclose(o.loss, o.mlm_loss + o.sop_loss)
    # the full loss is eq. 22 with the configured λ
    assert torch.allclose(out.loss, out.mlm_loss + out.sop_loss + 2.0 * out.mnem_loss + 4.0 * out.mmem_loss)


@pytest.mark.parametrize("kind", ["smedbert", "ernie"])
def test_gradients_reach_every_new_parameter(kind):
    batch = make_batch()
    if kind == "smedbert":
        model = kg_model(smedbert_config(kg_trainable=True))
        new = ("hybrid.", "ctx_pool.", "w_sa.", "ln_sa.", "kg.")
    else:
        model = KeplmBertForPreTraining(KeplmBertConfig(**TINY, entity_fusion=True, fusion_layer=1, num_entities=Z, entity_dim=D2))
        with torch.no_grad():
            model.entity_emb.normal_()
        new = ("fusion.",)
    model(**batch).loss.backward()
    for name, p in model.named_parameters():
        if name.startswith(new):
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_frozen_kg_gets_no_gradient():
    model = kg_model(smedbert_config())
    model(**make_batch()).loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.kg.parameters())


@pytest.mark.parametrize("kind", ["smedbert", "mlm", "ernie"])
def test_save_pretrained_then_from_pretrained_gives_identical_outputs(tmp_path, kind):
    from transformers import AutoConfig, AutoModelForPreTraining

    if kind == "smedbert":
        model = kg_model(smedbert_config())
    else:
        model = KeplmBertForPreTraining(KeplmBertConfig(**TINY, entity_fusion=kind == "ernie", fusion_layer=1,
                                                        num_entities=Z, entity_dim=D2))
        if kind == "ernie":
            model.load_kg(torch.randn(Z, D2))
    model.eval()
    batch = make_batch()
    with torch.no_grad():
        before = model(**batch)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert AutoConfig.from_pretrained(tmp_path).model_type == model.config.model_type
    again = AutoModelForPreTraining.from_pretrained(tmp_path).eval()
    assert type(again) is type(model)
    with torch.no_grad():
        after = again(**batch)
    for key in ("loss", "mlm_logits", "sop_logits", "last_hidden_state"):
        assert torch.equal(before[key], after[key]), key


@pytest.mark.parametrize("kind", ["smedbert", "mlm", "wem", "ernie"])
def test_one_batch_overfits(kind):
    torch.manual_seed(0)
    batch = make_batch()
    if kind == "wem":  # the same network fed whole-entity-masked batches from the collator
        from keplm.models.data import KnowledgeCollator

        rows = [{"input_ids": [1, *range(10, 30), 2], "mentions": [{"token_start": 2, "token_end": 5, "entity": 3}]},
                {"input_ids": [1, *range(30, 50), 2], "mentions": [{"token_start": 6, "token_end": 8, "entity": 4}]}]
        batch = KnowledgeCollator(1, 2, 4, 0, V, whole_entity_masking=True, mask_rate=0.2, seed=0)(rows)
        assert (batch["labels"][0, 2:5] >= 0).all()
    if kind == "smedbert":
        # trainable KG: with a frozen random KG one mention vector cannot fit all its neighbours; and a
        # uniform Q: with eq. 19's −µ·log Q as printed, a negative much rarer than its positive puts a floor
        # under MNeM that no model can fit below (see the model docstring)
        model = kg_model(smedbert_config(kg_trainable=True))
        batch["log_q_pos"] = torch.full_like(batch["log_q_pos"], -3.0)
        batch["log_q_neg"] = torch.full_like(batch["log_q_neg"], -3.0)
    else:
        model = KeplmBertForPreTraining(KeplmBertConfig(**TINY, entity_fusion=kind == "ernie", fusion_layer=1,
                                                        num_entities=Z, entity_dim=D2))
        if kind == "ernie":
            model.load_kg(torch.randn(Z, D2))
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
    model.train()
    for mod in model.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    first = None
    for _ in range(200):
        out = model(**batch)
        first = first if first is not None else out
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert out.loss.item() < 0.1 * first.loss.item(), (kind, first.loss.item(), out.loss.item())
    if kind == "smedbert":
        for term in ("mlm_loss", "mnem_loss", "mmem_loss"):
            assert out[term].item() < 0.1 * first[term].item(), term


def test_copy_of_config_keeps_defaults_of_the_paper():
    cfg = copy.deepcopy(SMedBertConfig())
    assert (cfg.kg_dim, cfg.mu, cfg.lambda_mnem, cfg.lambda_mmem, cfg.hybrid_layer) == (200, 10.0, 2.0, 4.0, 10)


def test_mmem_is_the_mean_squared_error_of_standardised_features_over_masked_mentions():
    model = kg_model(smedbert_config()).eval()
    batch = make_batch()
    out = model(**batch)
    seq = out.last_hidden_state
    feats = model._mention_features(seq, batch["mention_spans"], batch["mention_mask"])
    original = torch.where(batch["labels"] >= 0, batch["labels"], batch["input_ids"])
    target = model._mention_features(model.bert.embeddings.word_embeddings(original), batch["mention_spans"],
                                     batch["mention_mask"])
    # the only mention whose every token the MLM chose: sample 1's second one, span [10, 11)
    by_hand = ((F.layer_norm(feats[1, 1], (D2,)) - F.layer_norm(target[1, 1], (D2,))) ** 2).mean()
    assert torch.allclose(out.mmem_loss, by_hand, atol=1e-6)
    assert 0 < out.mmem_loss.item() <= 4.0          # two standardised vectors: mean squared distance <= 4
    every = kg_model(smedbert_config(mmem_mentions="all")).eval()(**batch)
    covered = [(0, 0), (0, 1), (1, 0), (1, 1)]
    expected = torch.stack([((F.layer_norm(feats[i, j], (D2,)) - F.layer_norm(target[i, j], (D2,))) ** 2).mean()
                            for i, j in covered]).mean()
    assert torch.allclose(every.mmem_loss, expected, atol=1e-6)


def test_mmem_has_no_term_without_a_masked_mention():
    batch = make_batch()
    batch["labels"][1, 10] = -100
    out = kg_model(smedbert_config()).eval()(**batch)
    assert out.mmem_loss is None and out.mnem_loss is not None


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mmem_reduction_under_duplicated_mentions(reduction):
    """Mean: every mention of a sample given twice leaves the loss unchanged; sum (eq. 21 as printed): doubles it."""
    model = kg_model(smedbert_config(mmem_mentions="all", mmem_reduction=reduction, use_hybrid_attention=False)).eval()
    batch = {k: v[:1] for k, v in make_batch().items()}
    twice = dict(batch)
    for key in ("mention_spans", "mention_mask", "neighbour_ids", "neighbour_relation", "neighbour_type",
                "neighbour_mask", "negative_ids", "log_q_pos", "log_q_neg"):
        twice[key] = torch.cat([batch[key][:, :2], batch[key][:, :2]], 1)
    once, doubled = model(**batch).mmem_loss, model(**twice).mmem_loss
    assert torch.allclose(doubled, once * (2 if reduction == "sum" else 1), atol=1e-6)
    if reduction == "sum":
        assert once.item() > D2 * 0.1          # summed over dimensions and mentions


def test_mmem_cannot_be_lowered_by_shrinking_the_shared_layer_norm():
    model = kg_model(smedbert_config(mmem_mentions="all")).eval()
    batch = make_batch()
    before = model(**batch)
    with torch.no_grad():
        model.ln_sa.weight.mul_(0.1)
    after = model(**batch)
    assert torch.allclose(before.mmem_loss, after.mmem_loss, atol=1e-6)
    assert model.ln_sa.weight.grad is None
    after.mmem_loss.backward()
    assert model.ln_sa.weight.grad is None or model.ln_sa.weight.grad.abs().sum() == 0
