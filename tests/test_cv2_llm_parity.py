"""CosyVoice 2 LM: our Qwen2 + speech-token LM against the reference's teacher-forced vectors.

The model comes from the parity directory through the model-directory loader (sizes from its
``cosyvoice2.yaml`` and ``CosyVoice-BlankEN/config.json``, ``llm.pt`` loaded strictly); the
vectors record every step of the reference generators (inputs, cache lengths, log-probs, tokens),
see the README there. Tests of the config parsing and of the key layout build the module
themselves, since that is what they check.
"""

from __future__ import annotations

import copy
import json
import threading
from pathlib import Path

import pytest
import torch

from tests.cv2_parity import metadata, parity_dir, parity_models, vectors
from tts_core.cosyvoice2 import hyperyaml
from tts_core.cosyvoice2.llm import CosyVoice2LM, DecodeStep, LMConfig
from tts_core.cosyvoice2.qwen2 import Qwen2Config, Qwen2Model
from tts_core.cosyvoice2.sampling import RasSampler

LOGP_ATOL = 1e-4  # README: suggested tolerance for an independent implementation
HIDDEN_ATOL = 1e-4


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


def build_config(path: Path) -> LMConfig:
    cfg = hyperyaml.load(path / "cosyvoice2.yaml")
    qwen = Qwen2Config.from_hf_config(
        json.loads((path / "CosyVoice-BlankEN" / "config.json").read_text()))
    return LMConfig.from_yaml(cfg["llm"], qwen)


@pytest.fixture(scope="module")
def paths() -> Path:
    torch.set_num_threads(1)
    return parity_dir()


@pytest.fixture(scope="module")
def state_dict(paths: Path) -> dict[str, torch.Tensor]:
    return torch.load(paths / "llm.pt", weights_only=True, map_location="cpu")


@pytest.fixture(scope="module")
def lm(paths: Path) -> CosyVoice2LM:
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
    logp = torch.stack([s.logp for s in steps])
    hidden = torch.stack([s.hidden for s in steps])
    torch.testing.assert_close(logp, v["logp"], atol=LOGP_ATOL, rtol=0)
    torch.testing.assert_close(hidden, v["hidden_last"], atol=HIDDEN_ATOL, rtol=0)


# --- weights and key layout ---------------------------------------------------------------------


def test_keys_and_shapes_equal_checkpoint(lm: CosyVoice2LM, state_dict) -> None:
    ours = {k: tuple(t.shape) for k, t in lm.state_dict().items()}
    theirs = {k: tuple(t.shape) for k, t in state_dict.items()}
    assert ours == theirs
    # Tied: one tensor behind the text embedding and the text head.
    assert lm.llm.model.lm_head.weight is lm.llm.model.model.embed_tokens.weight


def test_full_size_key_layout(paths: Path) -> None:
    """At the official sizes (Qwen2.5-0.5B backbone) our keys/shapes equal the reference's."""
    full = json.loads((paths / "full_size_state_dict_keys.json").read_text())["llm"]["keys"]
    official_qwen = {  # Qwen2.5-0.5B config.json values (CosyVoice-BlankEN)
        "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896,
        "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "tie_word_embeddings": True, "hidden_act": "silu"}
    cfg = hyperyaml.load(paths / "cosyvoice2.yaml")
    node = copy.deepcopy(cfg["llm"])
    node.args.update(llm_input_size=896, llm_output_size=896)
    with torch.device("meta"):
        model = CosyVoice2LM(LMConfig.from_yaml(node, Qwen2Config.from_hf_config(official_qwen)))
    ours = {k: list(t.shape) for k, t in model.state_dict().items()}
    assert ours == full


@pytest.mark.parametrize("damage", ["missing", "unexpected", "shape"])
def test_strict_loading_names_the_bad_key(paths: Path, state_dict, damage: str) -> None:
    model = CosyVoice2LM(build_config(paths))
    broken = dict(state_dict)
    if damage == "missing":
        key = "llm.model.model.layers.0.mlp.up_proj.weight"  # a set may have a single layer
        del broken[key]
    elif damage == "unexpected":
        key = "llm.model.model.layers.0.self_attn.o_proj.bias"
        broken[key] = torch.zeros(broken["llm.model.model.norm.weight"].shape)
    else:
        key = "speech_embedding.weight"
        broken[key] = broken[key][:-1]
    with pytest.raises(RuntimeError) as info:
        model.load_state_dict(broken, strict=True)
    assert key in str(info.value)


def test_untied_checkpoint_rejected_when_config_ties(paths: Path, state_dict) -> None:
    model = CosyVoice2LM(build_config(paths))
    broken = dict(state_dict)
    head = "llm.model.lm_head.weight"
    broken[head] = broken[head].clone() + 1.0
    with pytest.raises(ValueError, match="lm_head"):
        model.load_state_dict(broken, strict=True)


def test_config_from_yaml_reads_sizes_and_rejects_other_models(paths: Path) -> None:
    config = build_config(paths)
    cfg = hyperyaml.load(paths / "cosyvoice2.yaml")
    qwen = json.loads((paths / "CosyVoice-BlankEN" / "config.json").read_text())
    assert config.speech_token_size == cfg["llm"].args["speech_token_size"]
    assert config.num_speech_rows == config.speech_token_size + 3
    assert config.qwen.hidden_size == qwen["hidden_size"]
    assert config.qwen.head_dim == qwen.get("head_dim", qwen["hidden_size"]
                                              // qwen["num_attention_heads"])
    assert config.mix_ratio == tuple(cfg["llm"].args["mix_ratio"])
    assert config.sampling.top_k == cfg["llm"].args["sampling"].args["top_k"]
    other = hyperyaml.Tagged("new", "cosyvoice.llm.llm.TransformerLM", dict(cfg["llm"].args))
    with pytest.raises(ValueError, match="Qwen2LM"):
        LMConfig.from_yaml(other, config.qwen)
    wrong = hyperyaml.Tagged("new", cfg["llm"].target,
                             {**cfg["llm"].args, "llm_input_size": config.qwen.hidden_size + 1})
    with pytest.raises(ValueError, match="llm_input_size"):
        LMConfig.from_yaml(wrong, config.qwen)


# --- the recorded reference runs ----------------------------------------------------------------


def test_teacher_forced_matches_reference(lm: CosyVoice2LM) -> None:
    v = vectors("llm_teacher_forced")
    meta = metadata("llm_teacher_forced")
    sampler = ForcedSampler(ids(v["forced_speech_token"]), lm.config.eos_token)
    steps: list[DecodeStep] = []
    out = list(lm.inference(ids(v["text"]), ids(v["prompt_text"]),
                            ids(v["prompt_speech_token"]), sampler, on_step=steps.append))
    assert out == ids(v["forced_speech_token"])  # the end-of-speech id is not yielded
    torch.testing.assert_close(steps[0].inputs, v["lm_input"], atol=0, rtol=0)
    check_steps(steps, v)
    assert sum(v["step_ignore_eos"].tolist()) == int(meta["min_len"])
    assert all(s.from_sampler for s in steps)


def test_bistream_teacher_forced_matches_reference(lm: CosyVoice2LM) -> None:
    v = vectors("llm_bistream_teacher_forced")
    sampler = ForcedSampler(ids(v["forced_speech_token"]), lm.config.eos_token)
    steps: list[DecodeStep] = []
    chunks = ([t] for t in ids(v["text"]))  # one text id per yield, as recorded
    out = list(lm.inference_bistream(chunks, ids(v["prompt_text"]),
                                     ids(v["prompt_speech_token"]), sampler,
                                     on_step=steps.append))
    assert out == ids(v["yielded"])
    assert [s.from_sampler for s in steps] == v["step_from_sampler"].tolist()
    fed = torch.cat([s.inputs for s in steps], dim=1)
    torch.testing.assert_close(fed, v["fed_embeddings"], atol=0, rtol=0)
    check_steps(steps, v)
    # The fill token is never yielded nor fed; the sampler is not asked on fill steps.
    assert lm.config.fill_token not in out
    assert sampler.calls == sum(v["step_from_sampler"].tolist())


def test_bistream_chunked_text_matches_one_id_per_chunk(lm: CosyVoice2LM) -> None:
    """Text arriving two ids at a time still follows the fill schedule: fills are inserted
    (not sampled) at the first free slot of the prompt's segment and every 16 tokens after."""
    v = vectors("llm_bistream_teacher_forced")
    text = ids(v["text"])
    sampler = ForcedSampler(ids(v["forced_speech_token"]), lm.config.eos_token)
    steps: list[DecodeStep] = []
    out = list(lm.inference_bistream([text[i:i + 2] for i in range(0, len(text), 2)],
                                     ids(v["prompt_text"]), ids(v["prompt_speech_token"]),
                                     sampler, on_step=steps.append))
    fills = [s.index for s in steps if s.token == lm.config.fill_token]
    # A set whose prompt speech outlasts the text phase decodes nothing before the text ends,
    # hence has no fill at all; the recorded run says which case this is.
    assert bool(fills) or lm.config.fill_token not in ids(v["step_token"])
    assert all(not steps[i].from_sampler for i in fills)
    # Fill positions in `decoded` follow the 15-speech-token segment rule.
    n_speech = lm.config.mix_ratio[1]
    prompt = len(ids(v["prompt_speech_token"]))
    first = (prompt // n_speech + 1) * n_speech - prompt
    if fills:
        assert fills[0] == first
    assert all(b - a == n_speech + 1 for a, b in zip(fills, fills[1:], strict=False))
    assert out == [s.token for s in steps if s.token < lm.config.speech_token_size]


# --- cache, masks, control ----------------------------------------------------------------------


def test_chunked_cache_equals_single_pass(lm: CosyVoice2LM) -> None:
    """Multi-row steps on a non-empty cache need the offset causal mask; compare with one pass."""
    backbone: Qwen2Model = lm.llm.model.model
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 23, backbone.config.hidden_size, generator=g)
    with torch.inference_mode():
        whole = backbone(x)
        cache = backbone.new_cache()
        parts, start = [], 0
        for size in (7, 5, 1, 1, 9):
            parts.append(backbone(x[:, start:start + size], cache))
            start += size
        assert len(cache) == 23
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, atol=1e-5, rtol=0)


def test_cache_grows_past_initial_capacity(lm: CosyVoice2LM) -> None:
    backbone: Qwen2Model = lm.llm.model.model
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 150, backbone.config.hidden_size, generator=g)
    with torch.inference_mode():
        whole = backbone(x)
        cache = backbone.new_cache()
        rows = [backbone(x[:, :60], cache)] + [backbone(x[:, i:i + 1], cache)
                                                for i in range(60, 150)]
    torch.testing.assert_close(torch.cat(rows, dim=1), whole, atol=1e-5, rtol=0)


def test_cancel_stops_generation(lm: CosyVoice2LM) -> None:
    v = vectors("llm_teacher_forced")
    cancel = threading.Event()
    sampler = ForcedSampler(ids(v["forced_speech_token"]), lm.config.eos_token)
    got = []
    for token in lm.inference(ids(v["text"]), ids(v["prompt_text"]),
                              ids(v["prompt_speech_token"]), sampler, cancel=cancel):
        got.append(token)
        if len(got) == 3:
            cancel.set()
    assert got == ids(v["forced_speech_token"])[:3]
    assert sampler.calls == 3  # no step ran after the cancel


def test_max_len_and_min_len(lm: CosyVoice2LM) -> None:
    v = vectors("llm_teacher_forced")
    meta = metadata("llm_teacher_forced")
    text = ids(v["text"])
    min_len, max_len = int(meta["min_len"]), int(meta["max_len"])  # the reference's, for `text`
    never_stops = ForcedSampler([7] * 10_000, lm.config.eos_token)
    out = list(lm.inference(text, [], [], never_stops))
    assert len(out) == max_len
    assert never_stops.ignore_eos_flags == [i < min_len for i in range(max_len)]
    # an explicit ratio overrides the configured one
    ratio = max(1, min_len // len(text) + 1)
    never_stops = ForcedSampler([7] * 10_000, lm.config.eos_token)
    out = list(lm.inference(text, [], [], never_stops, max_token_text_ratio=ratio))
    assert len(out) == ratio * len(text)
    flags = never_stops.ignore_eos_flags
    assert flags == [i < min_len for i in range(ratio * len(text))]


def test_any_stop_id_ends_inference(lm: CosyVoice2LM) -> None:
    v = vectors("llm_teacher_forced")
    for stop in (lm.config.speech_token_size, lm.config.speech_token_size + 1,
                 lm.config.fill_token):
        out = list(lm.inference(ids(v["text"]), [], [], ForcedSampler([5, 6, stop, 8], 0)))
        assert out == [5, 6]


def test_bistream_final_phase_is_bounded(lm: CosyVoice2LM) -> None:
    v = vectors("llm_bistream_teacher_forced")
    text = ids(v["text"])
    never_stops = ForcedSampler([11] * 10_000, lm.config.eos_token)
    out = list(lm.inference_bistream(([t] for t in text), ids(v["prompt_text"]),
                                     ids(v["prompt_speech_token"]), never_stops,
                                     max_token_text_ratio=4))
    assert len(out) == 4 * len(text)


def test_bad_inputs_are_rejected(lm: CosyVoice2LM) -> None:
    vocab = lm.config.qwen.vocab_size
    sampler = ForcedSampler([], lm.config.eos_token)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        list(lm.inference([1, vocab], [], [], sampler))
    with pytest.raises(ValueError, match="speech token ids"):
        list(lm.inference([1, 2], [], [lm.config.speech_token_size], sampler))
    with pytest.raises(ValueError, match="empty"):
        list(lm.inference([], [3], [], sampler))
    with pytest.raises(ValueError, match="sampler returned"):
        list(lm.inference([1, 2], [], [], ForcedSampler([lm.config.num_speech_rows], 0)))


def test_ras_sampling_is_reproducible(lm: CosyVoice2LM) -> None:
    v = vectors("llm_teacher_forced")
    text, prompt_text, prompt = ids(v["text"]), ids(v["prompt_text"]), ids(v["prompt_speech_token"])

    def run(seed: int) -> list[int]:
        sampler = RasSampler.seeded(lm.config.sampling, lm.config.speech_token_size, seed)
        return list(lm.inference(text, prompt_text, prompt, sampler, max_token_text_ratio=4))

    first = run(1234)
    assert len(first) >= int(metadata("llm_teacher_forced")["min_len"])  # eos refused before
    assert all(0 <= t < lm.config.speech_token_size for t in first)
    assert run(1234) == first
    assert run(4321) != first


def test_bfloat16_backbone_follows_float32(lm: CosyVoice2LM) -> None:
    """Reduced-precision path: stack in bfloat16, speech head in float32 (same code as CUDA)."""
    model = copy.deepcopy(lm)  # the loaded LM is shared with the other tests
    model.set_backbone_dtype(torch.bfloat16)
    assert lm.llm.model.model.embed_tokens.weight.dtype == torch.float32
    assert model.llm.model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.llm_decoder.weight.dtype == torch.float32
    v = vectors("llm_teacher_forced")
    steps: list[DecodeStep] = []
    sampler = ForcedSampler(ids(v["forced_speech_token"]), model.config.eos_token)
    list(model.inference(ids(v["text"]), ids(v["prompt_text"]), ids(v["prompt_speech_token"]),
                         sampler, on_step=steps.append))
    assert [s.token for s in steps] == ids(v["step_token"])
    logp = torch.stack([s.logp for s in steps])
    assert logp.dtype == torch.float32
    # bfloat16 keeps ~3 significant digits; the distributions must still agree closely.
    probs, ref = logp.exp(), v["logp"].exp()
    assert (probs - ref).abs().sum(-1).max() < 0.1  # measured 0.03 on the shared set
    assert (logp.argmax(-1) == v["logp"].argmax(-1)).float().mean() >= 0.9


def test_bistream_without_prompt(lm: CosyVoice2LM) -> None:
    """Cross-lingual / preset-speaker streaming: no prompt text or speech. Decoding waits for 5
    text ids, the first fill comes after 15 speech tokens, the short tail goes to the end phase."""
    cfg = lm.config
    sampler = RasSampler.seeded(cfg.sampling, cfg.speech_token_size, 99)
    steps: list[DecodeStep] = []
    # more than one text segment, fewer than two; ids valid in any set's vocabulary
    generator = torch.Generator().manual_seed(5)
    text = torch.randint(0, cfg.qwen.vocab_size, (cfg.mix_ratio[0] + 2,),
                         generator=generator).tolist()
    out = list(lm.inference_bistream(([t] for t in text), [], [], sampler, on_step=steps.append))
    assert steps[0].inputs.shape[1] == 1 + cfg.mix_ratio[0]  # sos + the first 5 text rows
    assert steps[0].cache_len == 0
    fills = [s.index for s in steps if s.token == cfg.fill_token]
    assert fills[0] == cfg.mix_ratio[1]
    assert len(out) >= cfg.mix_ratio[1]
    assert all(0 <= t < cfg.speech_token_size for t in out)
    tail = steps[fills[-1] + 1]  # end phase: last speech row again + 2 text rows + task id
    assert tail.inputs.shape[1] == 1 + (len(text) - cfg.mix_ratio[0]) + 1
    assert len(out) <= cfg.max_token_text_ratio * len(text)
