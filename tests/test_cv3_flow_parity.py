"""CosyVoice 3 flow (tokens -> mel, DiT estimator): parity with the reference vectors.

The flow is built from the parity directory (FlowConfig from its cosyvoice3.yaml, flow.pt loaded
strictly). Every stage of ``flow_nonstream`` is checked, then every call the streaming driver
makes (``flow_stream``). The README suggests atol 1e-4 for the flow mel and measured no change at
all with 2 threads instead of 1; this implementation follows the reference's float32 operation
order, so the tolerance here is 1e-5 (observed: 0).
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch

from tests.cv2_parity import reference_stream_schedule
from tests.cv3_acoustic import checkpoint, parity_flow, parity_yaml
from tests.cv3_parity import metadata, parity_dir, vectors
from tts_core.cosyvoice2.flow_encoder import chunk_attention_mask
from tts_core.cosyvoice2.hyperyaml import Tagged
from tts_core.cosyvoice3.dit import apply_rotary
from tts_core.cosyvoice3.flow import CausalFlowDiT, FlowConfig, build_flow

ATOL = 1e-5


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module", autouse=True)
def _threads() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def flow_yaml() -> Tagged:
    return parity_yaml()["flow"]


@pytest.fixture(scope="module")
def flow() -> CausalFlowDiT:
    return parity_flow()


@pytest.fixture(scope="module")
def nonstream() -> dict[str, torch.Tensor]:
    return vectors("flow_nonstream")


@pytest.fixture(scope="module")
def stream() -> dict[str, torch.Tensor]:
    return vectors("flow_stream")


# --- configuration and checkpoint layout ----------------------------------------------------


def test_config_read_from_yaml(flow_yaml: Tagged) -> None:
    config = FlowConfig.from_yaml(flow_yaml)
    state = checkpoint("flow")
    meta = metadata("flow_nonstream")
    assert (config.vocab_size, config.input_size) == tuple(state["input_embedding.weight"].shape)
    assert config.lookahead_channels == state["pre_lookahead_layer.conv1.weight"].shape[0]
    assert config.pre_lookahead_len + 1 == state["pre_lookahead_layer.conv1.weight"].shape[2]
    est = config.estimator
    prefix = "decoder.estimator."
    assert est.dim == state[prefix + "proj_out.weight"].shape[1]
    assert est.depth == len({k.split(".")[3] for k in state if ".transformer_blocks." in k})
    assert est.dim_head == 2 * state[prefix + "rotary_embed.inv_freq"].numel()
    assert est.inner_dim == state[prefix + "transformer_blocks.0.attn.to_q.weight"].shape[0]
    assert est.static_chunk_size == int(meta["static_chunk_size"])
    assert config.cfm.n_timesteps == int(meta["n_timesteps"])
    assert config.cfm.inference_cfg_rate == float(meta["inference_cfg_rate"])
    assert config.cfm.t_scheduler == meta["t_scheduler"]


def test_state_dict_equals_checkpoint(flow: CausalFlowDiT) -> None:
    state = checkpoint("flow")
    own = flow.state_dict()
    assert {k: tuple(v.shape) for k, v in own.items()} == {k: tuple(v.shape)
                                                           for k, v in state.items()}
    assert all(torch.equal(own[k], v) for k, v in state.items())


def test_stored_rotary_frequencies_are_the_standard_ones(flow: CausalFlowDiT) -> None:
    fresh = CausalFlowDiT(flow.config).decoder.estimator.rotary_embed.inv_freq
    assert torch.equal(fresh, checkpoint("flow")["decoder.estimator.rotary_embed.inv_freq"])


def test_official_size_keys_and_shapes() -> None:
    full = json.loads((parity_dir() / "full_size_state_dict_keys.json").read_text())["flow"]
    with torch.device("meta"):
        model = CausalFlowDiT(FlowConfig())
    own = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert own == full["keys"]
    assert sum(v.numel() for v in model.state_dict().values()) == full["num_elements"]


def test_unsupported_yaml_is_refused(flow_yaml: Tagged) -> None:
    decoder = flow_yaml.args["decoder"]
    estimator = decoder.args["estimator"]

    def with_estimator(**changes: object) -> Tagged:
        new_est = replace(estimator, args={**estimator.args, **changes})
        new_dec = replace(decoder, args={**decoder.args, "estimator": new_est})
        return replace(flow_yaml, args={**flow_yaml.args, "decoder": new_dec})

    with pytest.raises(ValueError, match="only CausalMaskedDiffWithDiT"):
        FlowConfig.from_yaml(replace(flow_yaml, target="flow.CausalMaskedDiffWithXvec"))
    with pytest.raises(ValueError, match="long_skip_connection"):
        FlowConfig.from_yaml(with_estimator(long_skip_connection=True))
    with pytest.raises(ValueError, match="unknown parameters"):
        FlowConfig.from_yaml(with_estimator(bogus=1))
    with pytest.raises(ValueError, match="mu_dim"):
        FlowConfig.from_yaml(with_estimator(mu_dim=estimator.args["mu_dim"] + 16))


def test_bad_checkpoint_names_the_key(flow_yaml: Tagged) -> None:
    state = checkpoint("flow")
    del state["decoder.estimator.rotary_embed.inv_freq"]
    state["decoder.estimator.proj_out.bias"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"rotary_embed\.inv_freq.*proj_out\.bias"):
        build_flow(flow_yaml, state)


# --- flow_nonstream, stage by stage ---------------------------------------------------------


def test_noise_and_speaker(flow: CausalFlowDiT, nonstream: dict[str, torch.Tensor]) -> None:
    v = nonstream
    assert torch.equal(flow.decoder.initial_noise(v["cfm_noise"].shape[-1]), v["cfm_noise"])
    with torch.inference_mode():
        assert max_err(flow.project_speaker(v["embedding"]), v["spk_proj"]) <= ATOL


def test_token_embedding_lookahead_and_mu(flow: CausalFlowDiT,
                                          nonstream: dict[str, torch.Tensor]) -> None:
    v = nonstream
    tokens = torch.cat([v["prompt_token"], v["token"]], dim=1)
    with torch.inference_mode():
        embedded = flow.input_embedding(tokens.long())
        assert max_err(embedded, v["token_embedding"]) == 0
        assert max_err(flow.pre_lookahead_layer(embedded, None), v["lookahead_out"]) <= ATOL
        assert max_err(flow.token_features(tokens, finalize=True), v["mu"]) <= ATOL
        mu, mask, spks, cond = flow.conditions(v["token"], v["prompt_token"], v["prompt_feat"],
                                               v["embedding"], finalize=True)
    assert max_err(mu.transpose(1, 2), v["mu"]) <= ATOL
    assert max_err(cond, v["cond"]) == 0
    assert torch.equal(mask, v["est0_mask"][:1])


def _first_call_inputs(v: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    mu = v["mu"].transpose(1, 2)
    return (torch.cat([v["cfm_noise"]] * 2), v["est0_mask"], torch.cat([mu, torch.zeros_like(mu)]),
            v["est0_t"], v["est0_spks"], torch.cat([v["cond"], torch.zeros_like(v["cond"])]))


def test_dit_internals_of_the_first_call(flow: CausalFlowDiT,
                                         nonstream: dict[str, torch.Tensor]) -> None:
    v = nonstream
    dit = flow.decoder.estimator
    x, mask, mu, t, spks, cond = _first_call_inputs(v)
    with torch.inference_mode():
        t_emb = dit.time_embed(t)
        assert max_err(t_emb, v["est0_time_embed"]) <= ATOL
        h, _, _ = dit.input_embed(x.transpose(1, 2), cond.transpose(1, 2), mu.transpose(1, 2),
                                  spks)
        assert max_err(h, v["est0_input_embed"]) <= ATOL
        rope = dit.rotary_embed(torch.arange(h.shape[1]))
        h, _, _ = dit.transformer_blocks[0](v["est0_input_embed"], v["est0_time_embed"], rope)
        assert max_err(h, v["est0_block0_out"]) <= ATOL
        out = dit(x, mask, mu, t, spks, cond, streaming=False)
    assert max_err(out, v["est0_out"]) <= ATOL


def test_norm_out_of_the_first_call(flow: CausalFlowDiT,
                                    nonstream: dict[str, torch.Tensor]) -> None:
    v = nonstream
    dit = flow.decoder.estimator
    captured: list[torch.Tensor] = []
    handle = dit.norm_out.register_forward_hook(lambda m, args, out: captured.append(out))
    try:
        with torch.inference_mode():
            dit(*_first_call_inputs(v), streaming=False)
    finally:
        handle.remove()
    assert max_err(captured[0], v["est0_norm_out"]) <= ATOL


def test_rotary_reaches_only_the_first_head(flow: CausalFlowDiT) -> None:
    dit = flow.decoder.estimator
    d = dit.config.dim_head
    cos, sin = dit.rotary_embed(torch.arange(7))
    x = torch.randn(1, 7, dit.config.inner_dim)
    y = apply_rotary(x, cos, sin)
    assert torch.equal(y[..., d:], x[..., d:])
    a, b = x[..., 0:d:2], x[..., 1:d:2]
    assert torch.allclose(y[..., 0:d:2], a * cos[:, 0::2] - b * sin[:, 0::2], atol=1e-6)
    assert torch.allclose(y[..., 1:d:2], b * cos[:, 0::2] + a * sin[:, 0::2], atol=1e-6)
    assert not torch.equal(y[:, 1:, :d], x[:, 1:, :d])


def test_estimator_calls_times_and_cfg_batch(flow: CausalFlowDiT,
                                             nonstream: dict[str, torch.Tensor]) -> None:
    """Hook the real solver: 10 calls at the recorded times, first call's inputs as recorded."""
    v = nonstream
    calls: list[tuple[torch.Tensor, ...]] = []
    dit = flow.decoder.estimator
    handle = dit.register_forward_hook(lambda m, args, out: calls.append(args))
    try:
        flow.inference(v["token"], v["prompt_token"], v["prompt_feat"], v["embedding"])
    finally:
        handle.remove()
    assert torch.equal(torch.stack([args[3][0] for args in calls]), v["est_t"])
    x, mask, mu, t, spks, cond = calls[0][:6]
    expected = _first_call_inputs(v)
    for name, ours, ref in zip(("x", "mask", "mu", "t", "spks", "cond"), (x, mask, mu, t, spks,
                                                                            cond), expected,
                               strict=True):
        assert max_err(ours, ref) <= ATOL, name
    assert max_err(spks, v["est0_spks"]) <= ATOL


@pytest.mark.parametrize("streaming", [False, True])
def test_full_mel(flow: CausalFlowDiT, nonstream: dict[str, torch.Tensor],
                  streaming: bool) -> None:
    v = nonstream
    mel = flow.inference(v["token"], v["prompt_token"], v["prompt_feat"], v["embedding"],
                         streaming=streaming, finalize=True)
    expected = v["chunkmask_mel"] if streaming else v["mel"]
    err = max_err(mel, expected)
    assert err <= ATOL
    print(f"mel (streaming={streaming}) max abs err {err:.2e}")


def test_chunk_mask_first_call(flow: CausalFlowDiT, nonstream: dict[str, torch.Tensor]) -> None:
    v = nonstream
    with torch.inference_mode():
        out = flow.decoder.estimator(*_first_call_inputs(v), streaming=True)
    assert max_err(out, v["chunkmask_est0_out"]) <= ATOL
    # chunk masking is not a no-op on this set (more than one 50-frame chunk)
    assert max_err(v["chunkmask_est0_out"], v["est0_out"]) > 1e-3


def one_pass_masked(dit, x, mu, t, spks, cond) -> torch.Tensor:
    """The reference's formulation of chunk-masked attention: one pass, boolean chunk mask."""
    frames = x.shape[2]
    chunk = dit.config.static_chunk_size
    i = torch.arange(frames)
    mask = (i[None, :] < ((i[:, None] // chunk) + 1) * chunk)[None, None]  # README's rule
    assert torch.equal(mask[0, 0], chunk_attention_mask(frames, chunk))
    t_emb = dit.time_embed(t)
    h, _, _ = dit.input_embed(x.transpose(1, 2), cond.transpose(1, 2), mu.transpose(1, 2), spks)
    rope = dit.rotary_embed(i)
    for block in dit.transformer_blocks:
        h, _, _ = block(h, t_emb, rope, mask)
    return dit.proj_out(dit.norm_out(h, t_emb)).transpose(1, 2)


def test_chunk_by_chunk_equals_one_masked_pass(flow: CausalFlowDiT,
                                               nonstream: dict[str, torch.Tensor]) -> None:
    dit = flow.decoder.estimator
    x, _, mu, t, spks, cond = _first_call_inputs(nonstream)
    with torch.inference_mode():
        chunked = dit(x, None, mu, t, spks, cond, streaming=True)
        masked = one_pass_masked(dit, x, mu, t, spks, cond)
    err = max_err(chunked, masked)
    assert err <= ATOL
    print(f"chunk by chunk vs one masked pass: {err:.2e}")


# --- flow_stream: every call of the streaming driver ----------------------------------------


def test_recorded_schedule_follows_the_readme_rule(flow: CausalFlowDiT,
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


def test_every_streaming_call(flow: CausalFlowDiT, stream: dict[str, torch.Tensor]) -> None:
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
        err = max_err(mel, s[f"chunk{i}_mel"])
        assert err <= ATOL, f"chunk {i}: {err}"
        print(f"chunk {i} max abs err {err:.2e}")


def test_calls_are_stateless(flow: CausalFlowDiT, stream: dict[str, torch.Tensor]) -> None:
    s = stream
    n = int(s["chunk_token_len"][0])
    args = (s["token"][:, :n], s["prompt_token"], s["prompt_feat"], s["embedding"])
    first = flow.inference(*args, streaming=True, finalize=False)
    flow.inference(s["token"], s["prompt_token"], s["prompt_feat"], s["embedding"])
    assert torch.equal(flow.inference(*args, streaming=True, finalize=False), first)


def test_bad_inputs_get_clear_errors(flow: CausalFlowDiT, stream: dict[str, torch.Tensor]) -> None:
    s = stream
    config = flow.config
    with pytest.raises(ValueError, match="speech token ids"):
        flow.inference(s["token"] + config.vocab_size, s["prompt_token"], s["prompt_feat"],
                       s["embedding"])
    with pytest.raises(ValueError, match="integer tensor"):
        flow.inference(s["token"].float(), s["prompt_token"], s["prompt_feat"], s["embedding"])
    with pytest.raises(ValueError, match="prompt_feat"):
        flow.inference(s["token"], s["prompt_token"],
                       s["prompt_feat"][:, :, :config.output_size // 2], s["embedding"])
    with pytest.raises(ValueError, match="prompt_feat has"):
        flow.inference(s["token"][:, :1], s["prompt_token"][:, :1], s["prompt_feat"],
                       s["embedding"])
    with pytest.raises(ValueError, match="embedding"):
        flow.inference(s["token"], s["prompt_token"], s["prompt_feat"], s["embedding"][:, :10])
    with pytest.raises(ValueError, match="look-ahead"):
        flow.inference(s["token"][:, :config.pre_lookahead_len], s["prompt_token"][:, :0],
                       s["prompt_feat"][:, :0], s["embedding"], streaming=True, finalize=False)


def test_streaming_prefix_does_not_depend_on_later_tokens(flow: CausalFlowDiT,
                                                          stream: dict[str, torch.Tensor]) -> None:
    """With chunk masks, frames of complete chunks only see the past and the look-ahead: changing
    tokens after the look-ahead window leaves them unchanged."""
    s = stream
    model = copy.deepcopy(flow)
    chunk_tokens = model.config.estimator.static_chunk_size // model.config.token_mel_ratio
    n = 2 * chunk_tokens + model.config.pre_lookahead_len
    token = s["token"][:, :n + 10].clone()
    base = model.inference(token, s["prompt_token"][:, :0], s["prompt_feat"][:, :0],
                           s["embedding"], streaming=True, finalize=False)
    token[:, n:] = (token[:, n:] + 1) % model.config.vocab_size
    changed = model.inference(token, s["prompt_token"][:, :0], s["prompt_feat"][:, :0],
                              s["embedding"], streaming=True, finalize=False)
    frames = 2 * chunk_tokens * model.config.token_mel_ratio
    assert torch.equal(base[:, :, :frames], changed[:, :, :frames])
    assert not torch.equal(base, changed)


# --- the streaming DiT cache ------------------------------------------------------------------


def _frames_seen_by_dit(dit) -> tuple[list[int], object]:
    seen: list[int] = []
    handle = dit.transformer_blocks[0].register_forward_hook(
        lambda m, args, out: seen.append(args[0].shape[1]))
    return seen, handle


def test_stream_cache_is_bit_identical_and_skips_complete_chunks(
        flow: CausalFlowDiT, stream: dict[str, torch.Tensor]) -> None:
    s = stream
    cache = flow.new_stream_cache()
    chunk = flow.config.estimator.static_chunk_size
    steps = flow.config.cfm.n_timesteps
    dit = flow.decoder.estimator
    for i in range(len(s["chunk_token_len"])):
        n = int(s["chunk_token_len"][i])
        if not bool(s["chunk_stream_flag"][i]):
            continue  # the final call attends over everything: nothing to reuse
        finalize = bool(s["chunk_finalize"][i])
        args = (s["token"][:, :n], s["prompt_token"], s["prompt_feat"], s["embedding"])
        uncached = flow.inference(*args, streaming=True, finalize=finalize)
        before = cache.frames
        seen, handle = _frames_seen_by_dit(dit)
        try:
            cached = flow.inference(*args, streaming=True, finalize=finalize, cache=cache)
        finally:
            handle.remove()
        assert torch.equal(cached, uncached), f"call {i}"
        total = uncached.shape[2] + s["prompt_feat"].shape[1]
        assert sum(seen) == steps * (total - before)  # only frames from the cache's end on
        assert cache.frames == total // chunk * chunk
        assert all(step.frames == cache.frames for step in cache.steps)
        assert max_err(cached, s[f"chunk{i}_mel"]) <= ATOL
    assert cache.frames > 0


def test_stream_cache_refuses_other_tokens(flow: CausalFlowDiT,
                                          stream: dict[str, torch.Tensor]) -> None:
    s = stream
    cache = flow.new_stream_cache()
    n = int(s["chunk_token_len"][0])
    args = (s["prompt_token"], s["prompt_feat"], s["embedding"])
    flow.inference(s["token"][:, :n], *args, streaming=True, finalize=False, cache=cache)
    assert cache.frames > 0
    other = s["token"][:, :n + 10].clone()
    other[0, 0] = (other[0, 0] + 1) % flow.config.vocab_size
    with pytest.raises(ValueError, match="belongs to other tokens"):
        flow.inference(other, *args, streaming=True, finalize=False, cache=cache)
    with pytest.raises(ValueError, match="only applies to chunk-masked"):
        flow.inference(s["token"], *args, streaming=False, cache=cache)


def test_stream_cache_over_many_chunks(flow: CausalFlowDiT,
                                       stream: dict[str, torch.Tensor]) -> None:
    """A longer stream in uneven steps: every call equals the uncached one, bit for bit."""
    s = stream
    token = torch.cat([s["token"]] * 3, dim=1)
    cache = flow.new_stream_cache()
    args = (s["prompt_token"], s["prompt_feat"], s["embedding"])
    for n in (20, 31, 57, 58, 90, 140, 200, token.shape[1]):
        cached = flow.inference(token[:, :n], *args, streaming=True, finalize=False, cache=cache)
        uncached = flow.inference(token[:, :n], *args, streaming=True, finalize=False)
        assert torch.equal(cached, uncached), n


def test_blocked_token_features_are_length_independent(flow: CausalFlowDiT,
                                                       stream: dict[str, torch.Tensor]) -> None:
    """Streaming computes the look-ahead convolutions per DiT chunk of tokens: a token's
    features then do not depend on how many tokens follow its block (a convolution over the
    whole sequence picks its algorithm by length, which moves float32 results by ~1e-7)."""
    s = stream
    block = flow.config.estimator.static_chunk_size // flow.config.token_mel_ratio
    tokens = torch.cat([s["prompt_token"]] + [s["token"]] * 3, dim=1)
    with torch.inference_mode():
        longest = flow.token_features(tokens, finalize=False, block=block)
        for n in range(block, tokens.shape[1], 17):
            mu = flow.token_features(tokens[:, :n], finalize=False, block=block)
            complete = (n - flow.config.pre_lookahead_len) // block * block
            frames = complete * flow.config.token_mel_ratio
            assert torch.equal(mu[:, :frames], longest[:, :frames]), n
        for finalize in (False, True):
            whole = flow.token_features(tokens, finalize)
            assert max_err(flow.token_features(tokens, finalize, block), whole) <= ATOL


# --- other sizes (random weights): nothing may depend on the reduced sizes --------------------


def _randomize(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(noise / (p[0].numel() ** 0.5) if p.dim() > 1 else 0.1 * noise)


@pytest.mark.parametrize("chunk, ratio, cfg_rate", [(15, 3, 0.7), (8, 2, 0.0), (40, 4, 0.5)])
def test_other_sizes_stream_and_cache(chunk: int, ratio: int, cfg_rate: float) -> None:
    from tts_core.cosyvoice2.flow_matching import CFMConfig
    from tts_core.cosyvoice3.dit import DiTConfig

    config = FlowConfig(input_size=32, output_size=32, spk_embed_dim=24, vocab_size=97,
                        token_mel_ratio=ratio, pre_lookahead_len=2, lookahead_channels=40,
                        estimator=DiTConfig(dim=32, depth=2, heads=2, dim_head=8, ff_mult=3,
                                            mel_dim=32, mu_dim=32, spk_dim=32,
                                            static_chunk_size=chunk),
                        cfm=CFMConfig(n_feats=32, inference_cfg_rate=cfg_rate, n_timesteps=3))
    model = CausalFlowDiT(config).eval()
    _randomize(model, chunk)
    generator = torch.Generator().manual_seed(1)
    token = torch.randint(0, 97, (1, 60), generator=generator)
    prompt = torch.randint(0, 97, (1, 7), generator=generator)
    prompt_feat = torch.randn(1, 7 * ratio, 32, generator=generator)
    embedding = torch.randn(1, 24, generator=generator)
    args = (prompt, prompt_feat, embedding)
    full = model.inference(token, *args)
    assert full.shape == (1, 32, 60 * ratio) and torch.isfinite(full).all()
    cache = model.new_stream_cache()
    for n in (5, 9, 23, 24, 41, 60):
        cached = model.inference(token[:, :n], *args, streaming=True, finalize=False, cache=cache)
        plain = model.inference(token[:, :n], *args, streaming=True, finalize=False)
        assert cached.shape == (1, 32, (n - 2) * ratio)
        assert torch.equal(cached, plain), n
        assert cache.frames % chunk == 0
    streamed = model.inference(token, *args, streaming=True, finalize=True)
    dit = model.decoder.estimator
    with torch.inference_mode():
        mu, _, spks, cond = model.conditions(token, *args, finalize=True)
        x = model.decoder.initial_noise(mu.shape[2])
        t = torch.full((1,), 0.3)
        masked = one_pass_masked(dit, x, mu, t, spks, cond)
        chunked = dit(x, None, mu, t, spks, cond, streaming=True)
    assert max_err(chunked, masked) <= ATOL
    assert streamed.shape == full.shape and torch.isfinite(streamed).all()
