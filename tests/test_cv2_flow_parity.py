"""CosyVoice 2 flow (tokens -> mel): parity with the reference vectors, stage by stage.

The model comes from the parity directory through the model-directory loader (FlowConfig from its
cosyvoice2.yaml, flow.pt loaded strictly). Tests of the config parsing, the key layout and of
other sizes build modules themselves. Tolerances follow the parity README (flow mel atol 1e-4;
run-to-run thread changes move it by ~2e-6).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from tests.cv2_parity import (
    metadata,
    parity_dir,
    parity_models,
    reference_stream_schedule,
    tf32,
    vectors,
)
from tts_core.cosyvoice2 import hyperyaml
from tts_core.cosyvoice2.flow import CausalFlow, FlowConfig
from tts_core.cosyvoice2.flow_decoder import FlowDecoderConfig
from tts_core.cosyvoice2.flow_encoder import FlowEncoderConfig, chunk_attention_mask
from tts_core.cosyvoice2.flow_matching import CFMConfig, fixed_noise, time_grid
from tts_core.cosyvoice2.hyperyaml import Tagged
from tts_core.cosyvoice2.model_dir import load_model_dir

ATOL = 1e-4

torch.set_num_threads(1)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module")
def flow_yaml() -> Tagged:
    return hyperyaml.load(parity_dir() / "cosyvoice2.yaml")["flow"]


@pytest.fixture(scope="module")
def flow() -> CausalFlow:
    """The flow as the model-directory loader builds it (shared: do not modify)."""
    return parity_models().flow


@pytest.fixture(scope="module")
def nonstream() -> dict[str, torch.Tensor]:
    return vectors("flow_nonstream")


@pytest.fixture(scope="module")
def stream() -> dict[str, torch.Tensor]:
    return vectors("flow_stream")


# --- configuration and checkpoint layout ---------------------------------------------------


def test_config_read_from_yaml(flow_yaml: Tagged) -> None:
    config = FlowConfig.from_yaml(flow_yaml)
    meta = metadata("flow_nonstream")
    enc, est = flow_yaml.args["encoder"].args, flow_yaml.args["decoder"].args["estimator"].args
    assert config.input_size == flow_yaml.args["input_size"]
    assert config.encoder.output_size == enc["output_size"]
    assert config.encoder.attention_heads == enc["attention_heads"]
    assert config.encoder.num_blocks == enc["num_blocks"]
    assert config.encoder.static_chunk_size == enc["static_chunk_size"]
    assert config.estimator.channels == tuple(est["channels"])
    assert config.estimator.static_chunk_size == est["static_chunk_size"]
    assert config.estimator.num_decoding_left_chunks == est["num_decoding_left_chunks"]
    cfm = flow_yaml.args["decoder"].args["cfm_params"]
    cfm = cfm.args.get("content", cfm.args) if isinstance(cfm, Tagged) else cfm
    assert config.cfm.inference_cfg_rate == pytest.approx(cfm["inference_cfg_rate"])
    assert config.cfm.t_scheduler == cfm["t_scheduler"]
    # what the reference ran with (the step count is fixed in its code, not in the yaml)
    assert config.cfm.inference_cfg_rate == pytest.approx(float(meta["inference_cfg_rate"]))
    assert config.cfm.t_scheduler == meta["t_scheduler"]
    assert config.cfm.n_timesteps == int(meta["n_timesteps"])
    assert config.encoder.static_chunk_size == int(meta["encoder_static_chunk_size"])
    assert config.estimator.static_chunk_size == int(meta["decoder_static_chunk_size"])
    assert config.token_mel_ratio == int(meta["token_mel_ratio"])


def test_state_dict_keys_equal_checkpoint(flow: CausalFlow) -> None:
    state = torch.load(parity_dir() / "flow.pt", weights_only=True)
    ours = flow.state_dict()
    assert set(ours) == set(state)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape)
                                                             for k, v in state.items()}


def test_official_size_keys_and_shapes() -> None:
    listed = json.loads((parity_dir() / "full_size_state_dict_keys.json").read_text())["flow"]
    with torch.device("meta"):
        model = CausalFlow(FlowConfig())  # the defaults are the official sizes
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == listed["keys"]
    assert sum(v.numel() for v in model.state_dict().values()) == listed["num_elements"]


def test_unsupported_yaml_is_refused(flow_yaml: Tagged) -> None:
    other = Tagged(flow_yaml.kind, "cosyvoice.flow.flow.CausalMaskedDiffWithDiT", flow_yaml.args)
    with pytest.raises(ValueError, match="CausalMaskedDiffWithXvec"):
        FlowConfig.from_yaml(other)
    enc = flow_yaml.args["encoder"]
    macaron = Tagged(enc.kind, enc.target, {**enc.args, "macaron_style": True})
    with pytest.raises(ValueError, match="macaron_style"):
        FlowConfig.from_yaml(Tagged(flow_yaml.kind, flow_yaml.target,
                                    {**flow_yaml.args, "encoder": macaron}))


# --- fixed noise and time grid ---------------------------------------------------------------


def test_fixed_noise_matches_global_rule_without_touching_global_rng(
        flow: CausalFlow, nonstream: dict[str, torch.Tensor]) -> None:
    bins = flow.config.output_size
    before = torch.get_rng_state()
    ours = fixed_noise(bins)
    assert torch.equal(torch.get_rng_state(), before)
    with torch.random.fork_rng(devices=[]):  # the README's rule
        torch.manual_seed(0)
        rule = torch.randn(1, bins, 15000)
    assert torch.equal(ours, rule)
    frames = nonstream["cfm_noise"].shape[-1]
    assert torch.equal(flow.decoder.initial_noise(frames), nonstream["cfm_noise"])


def test_time_grid(flow: CausalFlow, nonstream: dict[str, torch.Tensor]) -> None:
    steps = nonstream["t_span"].numel()  # the start time of every Euler step
    assert flow.config.cfm.n_timesteps == steps
    grid = time_grid(steps, flow.config.cfm.t_scheduler, torch.device("cpu"), torch.float32)
    assert grid[0] == 0 and grid[-1] == pytest.approx(1.0)
    assert max_err(grid[:-1], nonstream["t_span"]) < 1e-7


# --- flow_nonstream, stage by stage ---------------------------------------------------------


def test_speaker_projection(flow: CausalFlow, nonstream: dict[str, torch.Tensor]) -> None:
    with torch.inference_mode():
        assert max_err(flow.project_speaker(nonstream["embedding"]), nonstream["spk_proj"]) < 1e-5


def test_encoder_and_mu(flow: CausalFlow, nonstream: dict[str, torch.Tensor]) -> None:
    tokens = torch.cat([nonstream["prompt_token"], nonstream["token"]], dim=1)
    with torch.inference_mode():
        h = flow.encode(tokens, streaming=False, finalize=True)
        assert max_err(h, nonstream["encoder_out"]) < 1e-5
        assert max_err(flow.encoder_proj(h), nonstream["mu"]) < 1e-5
        h_chunked = flow.encode(tokens, streaming=True, finalize=True)
        assert max_err(flow.encoder_proj(h_chunked), nonstream["chunkmask_mu"]) < 1e-5
    # chunk masks change the result, so the comparison above does check them (given more than
    # one chunk: a set whose whole sequence fits in one chunk has nothing to mask)
    if tokens.shape[1] > flow.config.encoder.static_chunk_size:
        assert max_err(nonstream["mu"], nonstream["chunkmask_mu"]) > 1e-2


def test_first_estimator_call(flow: CausalFlow, nonstream: dict[str, torch.Tensor]) -> None:
    v = nonstream
    with torch.inference_mode():
        out = flow.decoder.estimator(v["est0_x"], v["est0_mask"], v["est0_mu"], v["est0_t"],
                                     v["est0_spks"], v["est0_cond"], streaming=False)
    assert max_err(out, v["est0_out"]) < ATOL


def test_estimator_inputs_rebuilt_from_stages(nonstream: dict[str, torch.Tensor]) -> None:
    """cond and the CFG batch are what CausalFlow.inference builds (prompt frames, then 0)."""
    v = nonstream
    prompt_frames = v["prompt_feat"].shape[1]
    cond = torch.zeros_like(v["cond"])
    cond[:, :, :prompt_frames] = v["prompt_feat"].transpose(1, 2)
    assert torch.equal(cond, v["cond"])
    assert torch.equal(v["est0_cond"][0], v["cond"][0]) and not v["est0_cond"][1].any()
    assert torch.equal(v["est0_mu"][0], v["mu"][0].T) and not v["est0_mu"][1].any()
    assert torch.equal(v["est0_spks"][0], v["spk_proj"][0]) and not v["est0_spks"][1].any()
    assert torch.equal(v["est0_x"][0], v["cfm_noise"][0])


@pytest.mark.parametrize("streaming, key", [(False, "mel"), (True, "chunkmask_mel")])
def test_full_mel(flow: CausalFlow, nonstream: dict[str, torch.Tensor], streaming: bool,
                  key: str) -> None:
    v = nonstream
    mel = flow.inference(v["token"], v["prompt_token"], v["prompt_feat"], v["embedding"],
                         streaming=streaming, finalize=True)
    assert mel.dtype == torch.float32
    assert max_err(mel, v[key]) < ATOL


def test_bfloat16_estimator_with_float32_solver(flow: CausalFlow,
                                                nonstream: dict[str, torch.Tensor]) -> None:
    """The CUDA default runs the flow in bfloat16; the Euler state (x, t, dt) stays float32,
    so the mel keeps close to the float32 one (a bfloat16 solver was ~5x further off)."""
    v = nonstream
    inputs = (v["token"], v["prompt_token"], v["prompt_feat"], v["embedding"])
    reduced = copy.deepcopy(flow).to(torch.bfloat16)  # the loaded flow is shared: copy
    mel = reduced.inference(*inputs, streaming=False, finalize=True)
    reference = flow.inference(*inputs, streaming=False, finalize=True)
    assert mel.dtype == torch.float32
    # measured on the shared set: 0.038 (0.20 with the solver in bfloat16)
    assert max_err(mel, reference) < 0.1 * reference.pow(2).mean().sqrt().item()


# --- flow_stream: every call of the recorded streaming schedule ---------------------------------


def test_recorded_schedule_follows_the_readme_rule(flow: CausalFlow,
                                                  stream: dict[str, torch.Tensor]) -> None:
    s, meta = stream, metadata("flow_stream")
    assert int(meta["pre_lookahead_len"]) == flow.config.pre_lookahead_len
    expected = reference_stream_schedule(
        s["prompt_token"].shape[1], s["token"].shape[1], int(meta["token_hop_len"]),
        int(meta["token_max_hop_len"]), int(meta["stream_scale_factor"]),
        flow.config.pre_lookahead_len)
    recorded = list(zip(s["chunk_token_len"].tolist(), s["chunk_token_offset"].tolist(),
                        s["chunk_stream_flag"].tolist(), s["chunk_finalize"].tolist(),
                        strict=True))
    assert recorded == expected
    assert len(recorded) == int(meta["num_chunks"])


def test_streaming_schedule(flow: CausalFlow, stream: dict[str, torch.Tensor]) -> None:
    s = stream
    prompt_tokens = s["prompt_token"].shape[1]
    ratio, lookahead = flow.config.token_mel_ratio, flow.config.pre_lookahead_len
    for i in range(len(s["chunk_token_len"])):
        n = int(s["chunk_token_len"][i])
        finalize = bool(s["chunk_finalize"][i])
        mel = flow.inference(s["token"][:, :n], s["prompt_token"], s["prompt_feat"],
                             s["embedding"], streaming=bool(s["chunk_stream_flag"][i]),
                             finalize=finalize)
        frames = ratio * (prompt_tokens + n - (0 if finalize else lookahead)) \
            - s["prompt_feat"].shape[1]
        assert mel.shape == (1, flow.config.output_size, frames)
        assert max_err(mel, s[f"chunk{i}_mel"]) < ATOL, f"chunk {i}"


def test_calls_are_stateless(flow: CausalFlow, stream: dict[str, torch.Tensor]) -> None:
    s = stream
    n = int(s["chunk_token_len"][0])  # the first call of the recorded schedule
    args = (s["token"][:, :n], s["prompt_token"], s["prompt_feat"], s["embedding"])
    first = flow.inference(*args, streaming=True, finalize=False)
    flow.inference(s["token"], s["prompt_token"], s["prompt_feat"], s["embedding"])
    assert torch.equal(flow.inference(*args, streaming=True, finalize=False), first)


def test_bad_inputs_get_clear_errors(flow: CausalFlow, stream: dict[str, torch.Tensor]) -> None:
    s = stream
    config = flow.config
    with pytest.raises(ValueError, match="speech token ids"):
        flow.inference(s["token"] + config.vocab_size, s["prompt_token"], s["prompt_feat"],
                       s["embedding"])
    with pytest.raises(ValueError, match="prompt_feat"):
        flow.inference(s["token"], s["prompt_token"],
                       s["prompt_feat"][:, :, :config.output_size // 2], s["embedding"])
    with pytest.raises(ValueError, match="embedding"):
        flow.inference(s["token"], s["prompt_token"], s["prompt_feat"], s["embedding"][:, :10])
    with pytest.raises(ValueError, match="look-ahead"):
        empty = s["prompt_token"][:, :0]
        only_lookahead = s["token"][:, :config.pre_lookahead_len]  # no token left to output
        flow.inference(only_lookahead, empty, s["prompt_feat"][:, :0], s["embedding"],
                       streaming=True, finalize=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda(nonstream: dict[str, torch.Tensor]) -> None:
    """float32 on a GPU, TF32 off: within 1e-3 (other kernels, other summation orders; 7.0e-6
    measured on an H200). With TF32 matmuls and convolutions: 10-bit products through 10
    solver steps, 3.8e-3 measured there, so 1e-2. float16: within the reduced-precision bound."""
    v = nonstream
    model = load_model_dir(parity_dir(), device="cuda", require_frontend=False).flow
    assert not torch.backends.cudnn.allow_tf32  # the loader turns it off (model_dir.py)
    errors = {}
    for enabled in (False, True):
        with tf32(enabled):
            mel = model.inference(v["token"], v["prompt_token"], v["prompt_feat"], v["embedding"])
        assert mel.device.type == "cuda"
        errors[enabled] = max_err(mel.cpu(), v["mel"])
    print(f"\nCUDA flow mel max abs error: float32 {errors[False]:.2e}, TF32 {errors[True]:.2e}")
    assert errors[False] < 1e-3
    assert errors[True] < 1e-2
    model = load_model_dir(parity_dir(), device="cuda", dtype=torch.float16,
                           require_frontend=False).flow
    mel16 = model.inference(v["token"], v["prompt_token"], v["prompt_feat"], v["embedding"])
    assert mel16.dtype == torch.float32 and torch.isfinite(mel16).all()
    assert max_err(mel16.cpu(), v["mel"]) < 0.25


# --- other sizes (random weights): the engine must not depend on the reduced sizes ------------


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Seeded weights with non-trivial norms and biases (default init leaves biases at 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            is_norm = "norm" in name or ".block.2." in name or "embed.out.1." in name
            if p.dim() > 1:
                p.copy_(noise / (p[0].numel() ** 0.5))
            elif is_norm and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)


def _small_config(channels: tuple[int, ...], cfg_rate: float) -> FlowConfig:
    return FlowConfig(
        input_size=48, output_size=32, spk_embed_dim=24, vocab_size=97, token_mel_ratio=3,
        pre_lookahead_len=2, spk_proj_dim=32,
        encoder=FlowEncoderConfig(input_size=48, output_size=48, attention_heads=3,
                                  linear_units=80, num_blocks=2, num_up_blocks=2, lookahead=2,
                                  upsample_stride=3, static_chunk_size=5),
        estimator=FlowDecoderConfig(in_channels=128, out_channels=32, channels=channels,
                                    attention_head_dim=8, n_blocks=2, num_mid_blocks=1,
                                    num_heads=2, static_chunk_size=15,
                                    num_decoding_left_chunks=-1),
        cfm=CFMConfig(n_feats=32, inference_cfg_rate=cfg_rate, n_timesteps=3),
    )


@pytest.mark.parametrize("channels, cfg_rate", [((40,), 0.5), ((24, 40), 0.7), ((40,), 0.0)])
def test_other_sizes_run_end_to_end(channels: tuple[int, ...], cfg_rate: float) -> None:
    config = _small_config(channels, cfg_rate)
    model = CausalFlow(config).eval()
    _randomize(model, seed=1)
    reloaded = CausalFlow(config).eval()
    reloaded.load_state_dict(model.state_dict(), strict=True)
    generator = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, 97, (1, 7), generator=generator)
    tokens = torch.randint(0, 97, (1, 23), generator=generator)
    prompt_feat = torch.randn(1, 21, 32, generator=generator)
    embedding = torch.randn(1, 24, generator=generator)
    for streaming in (False, True):
        for finalize in (True, False):
            mel = reloaded.inference(tokens, prompt, prompt_feat, embedding, streaming, finalize)
            expected = 3 * (7 + 23 - (0 if finalize else 2)) - 21
            assert mel.shape == (1, 32, expected)
            assert torch.isfinite(mel).all() and mel.std() > 0
    # no prompt at all (cross-lingual style calls still pass an empty prompt)
    mel = reloaded.inference(tokens, prompt[:, :0], prompt_feat[:, :0], embedding)
    assert mel.shape == (1, 32, 3 * 23)


def test_streaming_prefix_does_not_depend_on_later_tokens() -> None:
    """With chunk masks, frames of complete chunks only see their chunk, earlier ones and the
    look-ahead: a longer call must reproduce them. Full attention must not (control)."""
    config = _small_config((40,), 0.7)
    model = CausalFlow(config).eval()
    _randomize(model, seed=3)
    generator = torch.Generator().manual_seed(4)
    prompt = torch.randint(0, 97, (1, 7), generator=generator)
    tokens = torch.randint(0, 97, (1, 31), generator=generator)
    prompt_feat = torch.randn(1, 21, 32, generator=generator)
    embedding = torch.randn(1, 24, generator=generator)

    def run(n: int, streaming: bool) -> torch.Tensor:
        return model.inference(tokens[:, :n], prompt, prompt_feat, embedding, streaming,
                               finalize=False)

    # 7 + 22 - 2 = 27 tokens produce frames; the first 25 (5 chunks of 5) are complete
    complete = 3 * 25 - 21
    short, long = run(22, True), run(31, True)
    assert short.shape[-1] == 3 * 27 - 21
    assert max_err(short[:, :, :complete], long[:, :, :complete]) < 1e-4
    assert max_err(short, long[:, :, :short.shape[-1]]) > 1e-3  # the open chunk does change
    full_short, full_long = run(22, False), run(31, False)
    assert max_err(full_short[:, :, :complete], full_long[:, :, :complete]) > 1e-3


def test_chunk_attention_mask() -> None:
    mask = chunk_attention_mask(5, 2)
    assert mask.tolist() == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0],
                             [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    limited = chunk_attention_mask(6, 2, left_chunks=1)
    assert limited[5].tolist() == [0, 0, 1, 1, 1, 1]
    assert limited[1].tolist() == [1, 1, 0, 0, 0, 0]
