"""Text normalisation, segmentation and language tags of the CosyVoice 2 front end."""

from __future__ import annotations

import re

import pytest

from tts_core.cosyvoice2.text_frontend import (
    TextFrontend,
    detect_language,
    language_tag,
    split_markers,
    to_half_width,
)


def count_units(text: str) -> int:
    """A stand-in token counter: one per CJK character, one per Latin word, one per marker."""
    total = 0
    for piece in split_markers(text):
        if piece.marker:
            total += 1
            continue
        total += sum(1 for char in piece.text if 0x3400 <= ord(char) <= 0x9FFF)
        total += len(re.findall(r"[A-Za-z0-9']+", piece.text))
    return total


@pytest.fixture(scope="module")
def frontend() -> TextFrontend:
    return TextFrontend(count_units)


@pytest.mark.parametrize("text, spoken", [
    ("今天是2024年3月5日。", "今天是二零二四年三月五日。"),
    ("气温-3.5℃", "气温负三点五摄氏度"),
    ("降水概率35%。", "降水概率百分之三十五。"),
    ("我的电话是13812345678。", "我的电话是幺三八幺二三四五六七八。"),
    ("他跑了10km，重65kg。", "他跑了十公里，重六十五千克。"),
    ("时间是14:30。", "时间是十四点三十分。"),
    ("价格是$100。", "价格是一百美元。"),
    ("共有1,234,567人", "共有一百二十三万四千五百六十七人"),
    ("面积100m²", "面积一百平方米"),
    ("１２３个ＡＢＣ", "一百二十三个ABC"),
    ("第一句——第二句", "第一句，第二句"),
    ("（注释）【重点】内容", "注释重点内容"),
    ("你好 世界", "你好世界"),
    ("标题\n正文", "标题。正文"),
    ("好的，", "好的。"),
])
def test_chinese_normalisation(frontend: TextFrontend, text: str, spoken: str) -> None:
    assert frontend.normalize(text, "zh") == spoken


@pytest.mark.parametrize("text, spoken", [
    ("I have 3 apples.", "I have three apples."),
    ("It weighs 3.5 kg.", "It weighs three point five kilograms."),
    ("It was -4 degrees.", "It was negative four degrees."),
    ("50% off", "fifty percent off"),
    ("It costs $12.50 today.", "It costs twelve dollars fifty cents today."),
    ("Pay $1.00 now", "Pay one dollar now"),
    ("Call 555-123-4567 now.", "Call five five five, one two three, four five six seven now."),
    ("My number is 13812345678.",
     "My number is one three eight one two three four five six seven eight."),
    ("Room 1000000", "Room one million"),  # seven digits in one run are still a number
    ("Meet me at 3:30 pm.", "Meet me at three thirty PM."),
    ("I ran 10 km.", "I ran ten kilometers."),
    ("ＡＢＣ！", "ABC!"),
    ("He said \u201chi\u201d \u2014 twice", 'He said "hi", twice'),
    ("He left -- quickly", "He left, quickly"),
    ("Title\nBody", "Title. Body"),
])
def test_english_normalisation(frontend: TextFrontend, text: str, spoken: str) -> None:
    assert frontend.normalize(text, "en") == spoken


def test_language_is_detected_when_not_given(frontend: TextFrontend) -> None:
    assert frontend.normalize("共3个") == "共三个"
    assert frontend.normalize("3 cats") == "three cats"


def test_markers_pass_through_untouched(frontend: TextFrontend) -> None:
    assert frontend.normalize("他笑了[laughter]然后说<strong>3</strong>个字", "zh") == (
        "他笑了[laughter]然后说<strong>三</strong>个字")
    assert frontend.normalize("[breath] I have 2 cats [quick_breath] ok", "en") == (
        "[breath] I have two cats [quick_breath] ok")
    # Brackets are removed from plain text, but a marker's brackets are part of the marker.
    assert frontend.normalize("[sigh]（轻声）好", "zh") == "[sigh]轻声好"
    assert frontend.normalize("<|en|>Hello 2 you", "en") == "<|en|>Hello two you"
    assert frontend.normalize("说这句话<|endofprompt|>", "zh") == "说这句话<|endofprompt|>"


def test_unknown_language_is_refused(frontend: TextFrontend) -> None:
    with pytest.raises(ValueError, match="unknown language 'fr'"):
        frontend.normalize("bonjour", "fr")
    with pytest.raises(ValueError, match="unknown language"):
        language_tag("xx")


def test_half_width_folding() -> None:
    assert to_half_width("ＡＢＣ　１２３，。", keep_cjk_punctuation=True) == "ABC 123，。"
    assert to_half_width("你好，世界！“引号”", keep_cjk_punctuation=False) == '你好,世界!"引号"'


@pytest.mark.parametrize("text, language", [
    ("今天天气很好", "zh"),
    ("佢哋喺度食緊飯", "yue"),
    ("こんにちは、今日は", "ja"),
    ("東京タワー", "ja"),
    ("안녕하세요 여러분", "ko"),
    ("Hello there", "en"),
    ("12345", "en"),
    ("Hello 你好", "zh"),
    ("[laughter] 好", "zh"),
])
def test_detect_language(text: str, language: str) -> None:
    assert detect_language(text) == language


def test_language_tags(frontend: TextFrontend) -> None:
    assert language_tag("yue") == "<|yue|>"
    assert frontend.tag_language("Hello there") == "<|en|>Hello there"
    assert frontend.tag_language("你好") == "<|zh|>你好"
    assert frontend.tag_language("你好", "yue") == "<|yue|>你好"
    assert frontend.tag_language("<|ja|>こんにちは", "zh") == "<|ja|>こんにちは"


def test_segments_respect_the_limit_at_sentence_ends() -> None:
    small = TextFrontend(count_units, max_tokens=10, min_tokens=6, merge_tokens=3)
    text = "第一句话很长很长。第二句。第三句话也挺长的吧！第四句？好。"
    segments = small.split(text)
    assert segments == ["第一句话很长很长。", "第二句。", "第三句话也挺长的吧！", "第四句？好。"]
    assert "".join(segments) == text
    assert all(count_units(s) <= 10 for s in segments)


def test_long_sentence_is_cut_at_clauses_then_words() -> None:
    small = TextFrontend(count_units, max_tokens=10, min_tokens=6, merge_tokens=3)
    text = "One two three four five, six seven eight nine ten eleven twelve thirteen fourteen."
    segments = small.split(text)
    assert segments == ["One two three four five,",
                        "six seven eight nine ten eleven twelve thirteen fourteen."]
    assert all(count_units(s) <= 10 for s in segments)
    assert " ".join(segments) == text

    no_punctuation = "这是一个非常非常长的句子没有任何标点符号一直说下去"
    pieces = small.split(no_punctuation)
    assert "".join(pieces) == no_punctuation
    assert [count_units(p) for p in pieces] == [10, 10, 5]


def test_english_periods_that_do_not_end_sentences() -> None:
    small = TextFrontend(count_units, max_tokens=6, min_tokens=4, merge_tokens=2)
    segments = small.split("Mr. Smith paid 3.5 dollars. Then he left the shop quickly.")
    assert segments == ["Mr. Smith paid 3.5 dollars.", "Then he left the shop quickly."]


def test_segments_never_cut_markers_or_spans() -> None:
    small = TextFrontend(count_units, max_tokens=8, min_tokens=4, merge_tokens=2)
    text = "我们<strong>非常非常，非常非常</strong>喜欢[laughter]这个故事，真的。"
    segments = small.split(text)
    assert "<strong>非常非常，非常非常</strong>" in segments
    for segment in segments:
        assert segment.count("<strong>") == segment.count("</strong>")
        assert "[laughter" not in segment or "[laughter]" in segment
    assert "".join(segments) == text


def test_quotes_stay_with_their_sentence_and_short_tail_merges() -> None:
    small = TextFrontend(count_units, max_tokens=8, min_tokens=4, merge_tokens=3)
    assert small.split("他说：“你好。”然后走了。") == ["他说：“你好。”然后走了。"]
    tight = TextFrontend(count_units, max_tokens=5, min_tokens=3, merge_tokens=2)
    assert tight.split("他说：“你好。”然后走了。") == ["他说：“你好。”", "然后走了。"]
    # "好。" alone (1 token < merge 2) joins the previous segment.
    assert tight.split("第一二三四。好。") == ["第一二三四。好。"]


def test_punctuation_only_segments_are_dropped(frontend: TextFrontend) -> None:
    assert frontend.split("。。。！！") == []
    assert frontend.segments("") == []
    assert frontend.segments("[breath]") == ["[breath]"]


def test_full_pipeline_with_default_limits(frontend: TextFrontend) -> None:
    sentence = "我们今天学习了第3课，内容非常有趣。"
    segments = frontend.segments(sentence * 12, "zh")
    assert len(segments) > 1
    assert all(count_units(s) <= 80 for s in segments)
    assert "".join(segments) == frontend.normalize(sentence * 12, "zh")
    assert all(s.endswith("。") for s in segments)


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError):
        TextFrontend(count_units, max_tokens=10, min_tokens=20)


def test_japanese_and_korean(frontend: TextFrontend) -> None:
    assert frontend.normalize("今日は3月5日です。") == "今日は三月五日です。"
    # Korean keeps its spaces between words (and its digits: there is no Korean grammar).
    assert frontend.normalize("안녕하세요, 여러분! 오늘은 좋은 날입니다.") == (
        "안녕하세요, 여러분! 오늘은 좋은 날입니다.")
    assert frontend.normalize("佢哋食咗3碗飯") == "佢哋食咗三碗飯"
