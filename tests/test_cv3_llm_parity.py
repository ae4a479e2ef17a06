"""CosyVoice 3 LM against the reference's teacher-forced vectors (both layouts, both modes).

The vectors record every step of the reference generators (inputs, cache lengths, raw
log-probabilities, tokens), see the README of the parity directory. Sizes come from its
``cosyvoice3.yaml`` and ``CosyVoice-BlankEN/config.json``; ``llm.pt`` is loaded strictly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.cv3_parity import metadata, parity_dir, parity_models, vectors
from tts_core.cosyvoice2 import hyperyaml
from tts_core.cosyvoice2.llm import DecodeStep
from tts_core.cosyvoice2.qwen2 import Qwen2Config
from tts_core.cosyvoice2.sampling import RasSampler
from tts_core.cosyvoice3.llm import (
    SILENT_TOKENS,
    CosyVoice3LM,
    CosyVoice3LMConfig,
    drop_long_silences,
)

LOGP_ATOL = 1e-4  # README: suggested tolerance for an independent implementation
HIDDEN_ATOL = 1e-4
TEACHER_FORCED = ("llm_teacher_forced", "llm_teacher_forced_crosslingual")
BISTREAM = ("llm_bistream_teacher_forced", "llm_bistream_no_prompt_speech")


class ForcedSampler:
    """Teacher forcing: returns the recorded tokens in order, then end of speech."""

    def __init__(self, tokens: list[int], eos: int) -> None:
        self.tokens, self.eos, self.calls = list(tokens), eos, 0
        self.ignore_eos_flags: list[bool] = []

    def __call__(self, logp: torch.Tensor, decoded: list[int], ignore_eos: bool) -> int:
        assert logp.dtype == torch.float32 and logp.dim() == 1
        self.ignore_eos_flags.append(ignore_eos)
        self.calls += 1
        return self.tokens[self.calls - 1] if self.calls <= len(self.tokens) else self.eos


def build_config(path: Path) -> CosyVoice3LMConfig:
    cfg = hyperyaml.load(path / "cosyvoice3.yaml")
    qwen = Qwen2Config.from_hf_config(
        json.loads((path / "CosyVoice-BlankEN" / "config.json").read_text()))
    return CosyVoice3LMConfig.from_yaml(cfg["llm"], qwen)


@pytest.fixture(scope="module")
def paths() -> Path:
    torch.set_num_threads(1)
    return parity_dir()


@pytest.fixture(scope="module")
def state_dict(paths: Path) -> dict[str, torch.Tensor]:
    return torch.load(paths / "llm.pt", weights_only=True, map_location="cpu")


@pytest.fixture(scope="module")
def lm(paths: Path) -> CosyVoice3LM:
    """The LM as the model-directory loader builds it (shared: do not modify)."""
    return parity_models().lm


def ids(t: torch.Tensor) -> list[int]:
    return t.reshape(-1).tolist()


def check_steps(steps: list[DecodeStep], v: dict[str, torch.Tensor]) -> None:
    assert len(steps) == v["logp"].shape[0]
    assert [s.inputs.shape[1] for s in steps] == ids(v["step_input_len"])
    assert [s.cache_len for s in steps] == ids(v["step_cache_len"])
    assert [s.token for s in steps] == ids(v["step_token"])
    assert [s.ignore_eos for s in steps] == v["step_ignore_eos"].tolist()
    assert [s.from_sampler for s in steps] == v["step_from_sampler"].tolist()
    logp = torch.stack([s.logp for s in steps])
    hidden = torch.stack([s.hidden for s in steps])
    torch.testing.assert_close(logp, v["logp"], atol=LOGP_ATOL, rtol=0)
    torch.testing.assert_close(hidden, v["hidden_last"], atol=HIDDEN_ATOL, rtol=0)


# --- weights and key layout ---------------------------------------------------------------------


def test_cv3_parity_llm_keys_and_shapes_equal_checkpoint(lm: CosyVoice3LM, state_dict) -> None:
    ours = {k: tuple(t.shape) for k, t in lm.state_dict().items()}
    assert ours == {k: tuple(t.shape) for k, t in state_dict.items()}
    assert "llm_embedding.weight" not in ours and "llm_decoder.bias" not in ours
    assert lm.llm.model.lm_head.weight is lm.llm.model.model.embed_tokens.weight


def test_cv3_parity_llm_full_size_key_layout(paths: Path) -> None:
    """At the official sizes (Qwen2.5-0.5B backbone) our keys/shapes equal the reference's."""
    full = json.loads((paths / "full_size_state_dict_keys.json").read_text())["llm"]["keys"]
    official_qwen = {  # Qwen2.5-0.5B config.json values (CosyVoice-BlankEN)
        "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896,
        "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "tie_word_embeddings": True, "hidden_act": "silu"}
    node = hyperyaml.load(paths / "cosyvoice3.yaml")["llm"]
    node = hyperyaml.Tagged(node.kind, node.target,
                            {**node.args, "llm_input_size": 896, "llm_output_size": 896})
    with torch.device("meta"):
        model = CosyVoice3LM(CosyVoice3LMConfig.from_yaml(
            node, Qwen2Config.from_hf_config(official_qwen)))
    assert {k: list(t.shape) for k, t in model.state_dict().items()} == full


def test_cv3_parity_llm_config_reads_yaml_and_rejects_cv2(paths: Path) -> None:
    config = build_config(paths)
    assert config.speech_token_size == 6561 and config.num_speech_rows == 6761
    assert (config.sos_token, config.eos_token, config.task_token, config.fill_token) == (
        6561, 6562, 6563, 6564)
    node = hyperyaml.load(paths / "cosyvoice3.yaml")["llm"]
    cv2 = hyperyaml.Tagged("new", "cosyvoice.llm.llm.Qwen2LM", dict(node.args))
    with pytest.raises(ValueError, match="CosyVoice3LM"):
        CosyVoice3LMConfig.from_yaml(cv2, config.qwen)
    with pytest.raises(ValueError, match="end_of_prompt_id"):
        CosyVoice3LMConfig.from_yaml(node, config.qwen, end_of_prompt_id=config.qwen.vocab_size)


# --- the recorded reference runs ----------------------------------------------------------------


@pytest.mark.parametrize("name", TEACHER_FORCED)
def test_cv3_parity_llm_teacher_forced(lm: CosyVoice3LM, name: str) -> None:
    v, meta = vectors(name), metadata(name)
    assert int(meta["endofprompt_id"]) == lm.config.end_of_prompt_id
    sampler = ForcedSampler(ids(v["forced_speech_token"]), lm.config.eos_token)
    steps: list[DecodeStep] = []
    out = list(lm.inference(ids(v["text"]), ids(v["prompt_text"]),
                            ids(v["prompt_speech_token"]), sampler, on_step=steps.append))
    assert out == ids(v["yielded"]) == ids(v["forced_speech_token"])
    torch.testing.assert_close(steps[0].inputs, v["lm_input"], atol=0, rtol=0)
    check_steps(steps, v)
    assert sum(v["step_ignore_eos"].tolist()) == int(meta["min_len"])
    # The reference driver thins silent runs before the vocoder; so do we.
    assert list(drop_long_silences(out)) == ids(v["driver_tokens"])


@pytest.mark.parametrize("name", BISTREAM)
def test_cv3_parity_llm_bistream(lm: CosyVoice3LM, name: str) -> None:
    v, meta = vectors(name), metadata(name)
    sampler = ForcedSampler(ids(v["forced_speech_token"]), lm.config.eos_token)
    steps: list[DecodeStep] = []
    chunks = ([t] for t in ids(v["text"]))  # one text id per yield, as recorded
    out = list(lm.inference_bistream(chunks, ids(v["prompt_text"]),
                                     ids(v["prompt_speech_token"]), sampler,
                                     on_step=steps.append))
    assert out == ids(v["yielded"])
    fed = torch.cat([s.inputs for s in steps], dim=1)
    torch.testing.assert_close(fed, v["fed_embeddings"], atol=0, rtol=0)
    check_steps(steps, v)
    assert [s.index for s in steps if s.token == lm.config.fill_token] == json.loads(
        meta["fill_steps"])
    assert lm.config.fill_token not in out
    assert sampler.calls == sum(v["step_from_sampler"].tolist())
    assert list(drop_long_silences(out)) == ids(v["driver_tokens"])


# --- rules of our own (documented choices) ------------------------------------------------------


def test_cv3_parity_llm_min_len_refuses_every_stop_id(lm: CosyVoice3LM) -> None:
    """Known reference defect not copied: before min_len the reference masks only 6561 (the start
    row), so its sampler may still return 6562 and stop early. Our sampler refuses all stop ids."""
    v = vectors("llm_teacher_forced")
    cfg = lm.config
    logp = v["logp"][0].clone()
    logp[:] = -1e4
    logp[cfg.eos_token] = 0.0  # a model that only wants to stop
    logp[17] = -5.0
    sampler = RasSampler.seeded(cfg.sampling, cfg.speech_token_size, 7)
    assert sampler(logp.log_softmax(-1), [], ignore_eos=True) == 17
    assert sampler(logp.log_softmax(-1), [], ignore_eos=False) == cfg.eos_token
    # end to end: the reference's min_len steps never stop
    text, prompt_text = ids(v["text"]), ids(v["prompt_text"])
    prompt = ids(v["prompt_speech_token"])
    for seed in range(3):
        sampler = RasSampler.seeded(cfg.sampling, cfg.speech_token_size, seed)
        out = list(lm.inference(text, prompt_text, prompt, sampler, max_token_text_ratio=4))
        assert len(out) >= int(metadata("llm_teacher_forced")["min_len"])
        assert all(0 <= t < cfg.speech_token_size for t in out)


def test_cv3_parity_llm_any_extra_id_ends_speech(lm: CosyVoice3LM) -> None:
    v = vectors("llm_teacher_forced_crosslingual")
    cfg = lm.config
    for stop in (cfg.sos_token, cfg.eos_token, cfg.fill_token, cfg.num_speech_rows - 1):
        out = list(lm.inference(ids(v["text"]), [], [], ForcedSampler([5, 6, stop, 8], 0),
                                min_token_text_ratio=0))
        assert out == [5, 6]
    with pytest.raises(ValueError, match="sampler returned"):
        list(lm.inference(ids(v["text"]), [], [], ForcedSampler([cfg.num_speech_rows], 0)))


def test_cv3_parity_llm_requires_end_of_prompt(lm: CosyVoice3LM) -> None:
    v = vectors("llm_teacher_forced")
    marker = lm.config.end_of_prompt_id
    prompt_text = [t for t in ids(v["prompt_text"]) if t != marker]
    sampler = ForcedSampler([], lm.config.eos_token)
    with pytest.raises(ValueError, match="endofprompt"):
        list(lm.inference(ids(v["text"]), prompt_text, ids(v["prompt_speech_token"]), sampler))
    with pytest.raises(ValueError, match="endofprompt"):
        list(lm.inference_bistream(([t] for t in ids(v["text"])), prompt_text, [], sampler))
    # the marker in the text itself (cross-lingual layout) is enough for whole-text decoding,
    # but bistream needs it in the prompt text
    text = [marker, *ids(v["text"])]
    assert list(lm.inference(text, [], [], ForcedSampler([3], lm.config.eos_token),
                             min_token_text_ratio=0)) == [3]
    with pytest.raises(ValueError, match="endofprompt"):
        list(lm.inference_bistream([text], [], [], sampler))


def test_cv3_parity_llm_special_rows_come_from_speech_embedding(lm: CosyVoice3LM) -> None:
    table = lm.speech_embedding.weight
    v = vectors("llm_teacher_forced_crosslingual")
    lm_input = v["lm_input"][0]
    torch.testing.assert_close(lm_input[0], table[lm.config.sos_token], atol=0, rtol=0)
    torch.testing.assert_close(lm_input[-1], table[lm.config.task_token], atol=0, rtol=0)


def test_drop_long_silences_rule() -> None:
    s = sorted(SILENT_TOKENS)
    tokens = [9, *[s[0]] * 7, 10, s[1], s[2], s[1], s[2], s[1], s[2], 11, *[s[3]] * 5]
    kept = list(drop_long_silences(tokens))
    assert kept == [9, *[s[0]] * 5, 10, s[1], s[2], s[1], s[2], s[1], 11, *[s[3]] * 5]
    assert list(drop_long_silences([])) == []
