from keplm.platform.text import clean_text
from keplm.platform.tokenizer import align_spans, load_tokenizer, train_wordpiece

CORPUS = ["患者服用阿司匹林 aspirin tablets 后头痛缓解。", "HbA1c 升高提示糖尿病控制不佳。"] * 40


def tokenizer(tmp_path):
    return train_wordpiece(CORPUS, tmp_path / "tok")


def test_trained_tokenizer_splits_cjk_per_char_and_latin_into_wordpieces(tmp_path):
    tok = tokenizer(tmp_path)
    assert tok.tokenize("头痛") == ["头", "痛"]
    pieces = tok.tokenize("aspirins")
    assert pieces[0] == "aspirin" and all(p.startswith("##") for p in pieces[1:])
    again = load_tokenizer(tmp_path / "tok")
    assert again.tokenize("患者 aspirin") == tok.tokenize("患者 aspirin")
    assert load_tokenizer(tmp_path / "tok" / "vocab.txt").tokenize("患者 aspirin") == tok.tokenize("患者 aspirin")


def test_char_spans_map_to_token_spans(tmp_path):
    tok = tokenizer(tmp_path)
    text = "患者服用aspirins后头痛"
    enc = tok(text, return_offsets_mapping=True)
    toks = tok.convert_ids_to_tokens(enc["input_ids"])
    spans = align_spans(enc["offset_mapping"], [(0, 2), (4, 12), (13, 15)])
    assert toks[spans[0][0]:spans[0][1]] == ["患", "者"]
    latin = toks[spans[1][0]:spans[1][1]]
    assert latin[0] == "aspirin" and len(latin) >= 2  # the word and its ## pieces, nothing else
    assert toks[spans[2][0]:spans[2][1]] == ["头", "痛"]


def test_span_inside_a_wordpiece_widens_to_the_piece(tmp_path):
    tok = tokenizer(tmp_path)
    enc = tok("aspirin", return_offsets_mapping=True)
    assert align_spans(enc["offset_mapping"], [(2, 4)]) == [(1, 2)]


def test_fullwidth_text_after_cleaning_aligns(tmp_path):
    tok = tokenizer(tmp_path)
    text = clean_text("ＨｂＡ１ｃ升高")
    assert text == "HbA1c升高"
    enc = tok(text, return_offsets_mapping=True)
    (ts, te), = align_spans(enc["offset_mapping"], [(0, 5)])
    assert tok.convert_tokens_to_string(tok.convert_ids_to_tokens(enc["input_ids"][ts:te])).replace(" ", "") == "hba1c"


def test_uncovered_and_truncated_spans_are_none(tmp_path):
    tok = tokenizer(tmp_path)
    enc = tok("头痛 头痛 头痛", return_offsets_mapping=True, truncation=True, max_length=4)
    assert align_spans(enc["offset_mapping"], [(2, 3), (6, 8), (0, 2)]) == [None, None, (1, 3)]
