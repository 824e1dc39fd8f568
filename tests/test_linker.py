import pytest

from keplm.kg.linker import EntityLinker, LinkConfig
from keplm.kg.reader import Entities


def linker(names, aliases=(), **cfg):
    return EntityLinker(Entities(list(names), ["T"] * len(names)), list(aliases), LinkConfig(**cfg))


def spans(lk, text):
    return [(text[s:e], eid) for s, e, eid in lk.link(text)]


def test_longest_match_wins_over_contained_names():
    lk = linker(["糖尿病", "2型糖尿病", "尿病"])
    assert spans(lk, "他有2型糖尿病。") == [("2型糖尿病", 1)]


def test_longest_match_wins_over_partial_overlap():
    lk = linker(["高血压", "血压升高明显"])
    assert spans(lk, "高血压升高明显") == [("血压升高明显", 1)]


def test_non_overlapping_and_sorted():
    lk = linker(["头痛", "发热", "头痛发热"])
    got = lk.link("头痛发热，发热头痛")
    assert [(s, e) for s, e, _ in got] == [(0, 4), (5, 7), (7, 9)]


def test_alias_links_to_its_entity_and_name_beats_alias():
    lk = linker(["心肌梗死", "心梗"], aliases=[("心梗", 0), ("急性心梗", 0)])
    assert spans(lk, "急性心梗和心梗") == [("急性心梗", 0), ("心梗", 1)]
    assert lk.counts["aliases_shadowed_by_name"] == 1


def test_ambiguous_alias_is_not_linked_and_counted():
    lk = linker(["甲病", "乙病"], aliases=[("同名病", 0), ("同名病", 1)])
    assert spans(lk, "同名病") == []
    assert lk.counts["aliases_ambiguous"] == 1


def test_short_names_excluded():
    lk = linker(["痛", "头痛"])
    assert spans(lk, "痛得厉害，头痛") == [("头痛", 1)]
    assert lk.counts["names_too_short"] == 1


def test_fullwidth_names_match_cleaned_text():
    lk = linker(["ＣＯＰＤ"])
    assert spans(lk, "慢阻肺即COPD。") == [("COPD", 0)]


def test_jieba_breaks_equal_length_ties_by_word_boundaries():
    # "结肠炎症" can be read as 结肠 + 炎症 or with the entity 肠炎 in the middle; both names have the
    # same length and overlap, so jieba (with both as user words) decides: 结肠|炎症 agree with it.
    lk = linker(["结肠", "肠炎", "炎症"])
    assert spans(lk, "结肠炎症") == [("结肠", 0), ("炎症", 2)]
    assert lk.jieba_calls == 1


def test_equal_length_tie_leftmost_when_jieba_agrees_with_both():
    lk = linker(["ABCD", "CDEF"])
    # Latin run: jieba keeps "ABCDEF" as one word, so neither candidate agrees on both ends: leftmost wins
    assert spans(lk, "ABCDEF") == [("ABCD", 0)]


def test_jieba_not_called_without_a_tie():
    lk = linker(["糖尿病", "2型糖尿病"])
    lk.link("2型糖尿病")
    assert lk.jieba_calls == 0


def test_linker_is_picklable_and_rebuilds_jieba():
    import pickle

    lk = linker(["结肠", "肠炎", "炎症"])
    lk.link("结肠炎症")
    copy = pickle.loads(pickle.dumps(lk))
    assert copy.link("结肠炎症") == lk.link("结肠炎症")


@pytest.mark.parametrize("text", ["", "无实体的句子"])
def test_no_match(text):
    assert linker(["糖尿病"]).link(text) == []
