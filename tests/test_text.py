from keplm.platform.text import CleanConfig, clean_text, segment_text, split_sentences


def test_removes_urls_html_and_emails():
    text = '见<a href="x">说明</a>http://example.org/a?b=1患者 联系 doc.li@hosp.cn 谢谢'
    out = clean_text(text)
    assert "http" not in out and "example" not in out
    assert "<" not in out and "href" not in out
    assert "@" not in out and "hosp" not in out
    assert out.startswith("见 说明") and "患者" in out and out.endswith("谢谢")


def test_url_stops_at_chinese_text():
    assert clean_text("www.xywy.com/abc咳嗽三天") == "咳嗽三天"


def test_fullwidth_is_normalised_and_space_collapsed():
    assert clean_text("ＣＴ检查１２３，　正常") == "CT检查123, 正常"


def test_html_entities_unescaped_then_kept_only_if_allowed():
    # '&lt;3' unescapes to '<3', which is no tag; '<' is one of the default extra symbols
    assert clean_text("A&amp;B &lt;3") == "A&B <3"
    assert clean_text("&lt;b&gt;粗体&lt;/b&gt;") == "粗体"


def test_drops_emoji_and_symbols_outside_the_rule():
    strict = CleanConfig(extra_chars="")
    assert clean_text("体温38℃😀，好", strict) == "体温38,好"
    assert clean_text("体温38℃😀，好") == "体温38℃,好"  # default keeps a few medical symbols


def test_keeps_letters_digits_punctuation_cjk_greek():
    assert clean_text("β受体阻滞剂(第2代)。") == "β受体阻滞剂(第2代)。"


def test_newlines_survive_as_single_breaks():
    assert clean_text("医生:你好 \n\n  患者:头痛") == "医生:你好\n患者:头痛"


def test_split_sentences_keeps_closing_quotes():
    assert split_sentences("他说“好。”然后走了！再见") == ["他说“好。”", "然后走了！", "再见"]


def test_segments_fit_and_cut_at_sentence_ends():
    text = "".join(f"第{i}句话比较长一些。" for i in range(50))
    segs = segment_text(text, 40)
    assert all(len(s) <= 40 for s in segs)
    assert all(s.endswith("。") for s in segs)
    assert "".join(segs) == text


def test_long_sentence_is_cut_at_soft_break_not_inside_latin_word():
    text = "患者" * 10 + "，" + "abcdefghij" * 2 + "结束"
    segs = segment_text(text, 25)
    assert all(len(s) <= 25 for s in segs)
    assert segs[0].endswith("，")
    assert "".join(segs) == text
    word = "x" + "pneumonoultramicroscopic" + "y"
    segs = segment_text("病" * 20 + " " + word, 30)
    assert any(word in s for s in segs)


def test_short_text_is_one_segment():
    assert segment_text("短句。", 10) == ["短句。"]
    assert segment_text("   ", 10) == []
