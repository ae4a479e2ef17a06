"""The embedded engine's evaluation sentences, in two sets that must stay apart.

TUNING: what voices, voice mixes and front-end changes were chosen on
(scripts/bench_embedded_asr.py --set tuning). HELD_OUT: what the tests score and what the README's
speaker table reports (tests/test_embedded_engine.py, scripts/bench_embedded_asr.py --set
held-out); nothing was tuned on it. Both sets were written for this project. A sentence must
never be in both (a test checks).

Keys are sets: a language code, or "mix" (Mandarin with English words, read by the Mandarin
speakers). The "yue" sentences are standard written Chinese read in Cantonese: the recognizer
(Whisper base, see tests/asr.py) has no Cantonese of its own and writes what it hears in standard
written Chinese, so colloquial Cantonese words (嘅, 哋, 咗) would count as errors that are not
the engine's.
"""

from __future__ import annotations

TUNING: dict[str, list[str]] = {
    "zh": [
        "今天天气很好，我们一起去公园散步吧。",
        "请在下午三点以前把文件发给我。",
        "这家饭馆的菜又便宜又好吃。",
        "火车站离这里不远，走路十分钟就到了。",
        "我明天要去北京参加一个重要的会议。",
        "春天来了，花园里开满了红色和黄色的花。",
        "你好，很高兴认识你。",
        "我的手机没电了，能借我充电器吗？",
        "这个问题比我想象的要复杂得多。",
        "孩子们在操场上踢足球。",
        "超市里的水果和蔬菜都很新鲜。",
        "他说话的声音很小，我听不清楚。",
        "我们下个月二十号出发去上海旅游。",
        "语音合成技术可以把文字实时地转换成自然的声音。",
        "这家公司第三季度的收入比去年增长了百分之十五。",
    ],
    "mix": [
        "我们用Python写了一个语音合成服务。",
        "请把这份报告用email发给我。",
        "这个App的界面非常简单。",
        "他每天早上都会看一下Google新闻。",
    ],
    "ja": [
        "こんにちは、今日はいい天気ですね。",
        "駅まで歩いて十分ぐらいかかります。",
        "明日の会議は午後三時から始まります。",
        "この本はとても面白かったです。",
    ],
    "ko": [
        "안녕하세요. 오늘 날씨가 좋네요.",
        "저는 매일 아침 커피를 마셔요.",
        "지하철역은 여기서 멀지 않아요.",
        "내일 친구와 같이 영화를 볼 거예요.",
        "이 식당은 김치찌개가 정말 맛있어요.",
        "주말에 가족과 함께 공원에 갔어요.",
        "컴퓨터가 갑자기 꺼져서 깜짝 놀랐어요.",
        "택시를 타고 공항으로 가 주세요.",
    ],
    "yue": [  # standard written Chinese, read in Cantonese: Whisper writes what it hears
        "今日天氣好熱，我哋去飲茶。",
        "地鐵站離這裏不遠，步行五分鐘就到。",
        "請在下午三點之前把文件交給我。",
        "這間餐廳的點心非常好吃。",
        "明天早上八點在公司門口集合。",
        "圖書館星期日休息。",
    ],
    "en": [
        "The weather is nice today, so we will walk to the park after lunch.",
        "Please call me back when you get this message.",
        "The train leaves at seven thirty in the morning.",
        "She bought three apples and a loaf of bread.",
        "Our library stays open late on Thursdays and closes early on Sundays.",
        "The software reads the document aloud and highlights each word as it goes.",
        "Turn left at the second light, then follow the signs to the museum.",
        "Fresh water is scarce in the desert, so travellers carry plenty of it.",
        "Speech synthesis turns written text into sound in real time.",
        "The quarterly results will be published on the twenty-first of March.",
        "Scientists measured the temperature of the ocean at several depths.",
        "If the printer jams again, please unplug it and wait a minute.",
        "Our new headphones cancel most of the noise on a crowded train.",
    ],
}

HELD_OUT: dict[str, list[str]] = {
    "en": [
        "Written notes are easier to share than long voice messages.",
        "The bakery on the corner sells warm bread every morning.",
        "Our team will review the budget before the end of the month.",
        "Heavy rain is expected across the north on Wednesday night.",
        "He parked the car near the station and walked home.",
        "Could you send me a copy of the report by Friday?",
        "Engineers tested the bridge with heavy trucks before it opened.",
        "Most children learn to ride a bicycle before they turn eight.",
        "The museum's new exhibit explains how volcanoes form.",
    ],
    "zh": [
        "我每天早上七点起床，然后去跑步。",
        "这本书讲的是一个小女孩的故事。",
        "请大家安静一下，会议马上开始。",
        "周末我打算在家里打扫房间。",
        "他的中文说得越来越好了。",
        "明天可能会下雨，记得带伞。",
        "图书馆的新书已经放在二楼的书架上了。",
        "医生建议他每天多喝水，少吃甜食。",
        "这座桥是去年秋天才建好的。",
    ],
    "ja": [
        "毎朝コーヒーを一杯飲みます。",
        "この電車は次の駅に止まります。",
        "週末は家族と海へ行きました。",
        "図書館で新しい本を借りました。",
        "駅の前に大きな公園があります。",
    ],
    "ko": [
        "저는 주말마다 도서관에 가요.",
        "내일 아침에 비가 올 것 같아요.",
        "이 버스는 시청 앞에서 멈춰요.",
        "우리 가족은 바다를 좋아해요.",
        "점심으로 비빔밥을 먹었어요.",
    ],
    "yue": [
        "今晚的電影八點開始。",
        "我們下星期一起去海邊。",
        "這本書我已經看完了。",
        "請你明天早一點來。",
        "公園裏有很多小朋友。",
    ],
}
