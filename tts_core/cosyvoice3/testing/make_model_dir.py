"""Write a complete, randomly initialised CosyVoice 3 model directory in the official layout.

The CosyVoice 3 counterpart of :mod:`tts_core.cosyvoice2.testing.make_model_dir` (whose helpers —
random weights, LM and vocoder calibration, ONNX stand-ins, synthetic voices, presets — it
uses): the file names, ``cosyvoice3.yaml`` format, state-dict keys and ONNX interfaces of the
released ``Fun-CosyVoice3-0.5B-2512``, with seeded random weights.

* ``tiny``: a few MB, every structural setting official, widths and depths reduced (tests);
* ``full``: the official sizes (Qwen2.5-0.5B backbone, 22-block 1024-wide DiT, 512-channel
  causal HiFT); its state-dict keys and shapes equal the reference's
  (``full_size_state_dict_keys.json`` of the parity set). For benchmarks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ...cosyvoice2 import hyperyaml
from ...cosyvoice2.features import MelConfig, mel_spectrogram_24k
from ...cosyvoice2.qwen2 import Qwen2Config
from ...cosyvoice2.testing.make_model_dir import (
    EMBEDDING_DIM,
    SPEECH_TOKENS,
    _calibrate_hift,
    _calibrate_lm,
    _onnx_campplus,
    _onnx_speech_tokenizer,
    _spk2info,
    qwen_config_json,
    randomize,
    synthetic_voice,
)
from ...cosyvoice2.tokenizer import ENDOFPROMPT, write_tiny_tokenizer
from ..flow import CausalFlowDiT, FlowConfig
from ..hift import CausalHiFTConfig, CausalHiFTGenerator
from ..llm import OFFICIAL_END_OF_PROMPT_ID, CosyVoice3LM, CosyVoice3LMConfig
from ..model_dir import SPEECH_TOKENIZER
from ..tokenizer import COSYVOICE3_SPECIAL_TOKENS, CosyVoice3Tokenizer


@dataclass(frozen=True)
class Sizes:
    """Every width/depth ``cosyvoice3.yaml`` and ``config.json`` carry."""

    # Qwen2 backbone (CosyVoice-BlankEN/config.json); names as the CosyVoice 2 generator's
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    # flow
    lookahead_channels: int
    dit_dim: int
    dit_depth: int
    dit_heads: int
    dit_dim_head: int
    dit_ff_mult: int
    # HiFT
    hift_channels: int
    f0_channels: int


PRESETS: dict[str, Sizes] = {
    "tiny": Sizes(vocab_size=1024, hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=4, num_kv_heads=2, lookahead_channels=64, dit_dim=64, dit_depth=2,
                  dit_heads=4, dit_dim_head=16, dit_ff_mult=2, hift_channels=64,
                  f0_channels=64),
    "full": Sizes(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
                  num_heads=14, num_kv_heads=2, lookahead_channels=1024, dit_dim=1024,
                  dit_depth=22, dit_heads=16, dit_dim_head=64, dit_ff_mult=2,
                  hift_channels=512, f0_channels=512),
}

# Our own compact template with the keys and hyperpyyaml tag kinds of the official file, including
# entries a loader must leave alone (a seeding call, function references).
_YAML = """\
__set_seed: !apply:torch.manual_seed [{seed}]

sample_rate: 24000
llm_input_size: {hidden_size}
llm_output_size: {hidden_size}
spk_embed_dim: 192
qwen_pretrain_path: ''
token_frame_rate: 25
token_mel_ratio: 2
chunk_size: 25
num_decoding_left_chunks: -1

llm: !new:cosyvoice.llm.llm.CosyVoice3LM
    llm_input_size: !ref <llm_input_size>
    llm_output_size: !ref <llm_output_size>
    speech_token_size: 6561
    mix_ratio: [5, 15]
    llm: !new:cosyvoice.llm.llm.Qwen2Encoder
        pretrain_path: !ref <qwen_pretrain_path>
    sampling: !name:cosyvoice.utils.common.ras_sampling
        top_p: 0.8
        top_k: 25
        win_size: 10
        tau_r: 0.1

flow: !new:cosyvoice.flow.flow.CausalMaskedDiffWithDiT
    input_size: 80
    output_size: 80
    spk_embed_dim: !ref <spk_embed_dim>
    vocab_size: 6561
    token_mel_ratio: !ref <token_mel_ratio>
    pre_lookahead_len: 3
    pre_lookahead_layer: !new:cosyvoice.transformer.upsample_encoder.PreLookaheadLayer
        in_channels: 80
        channels: {lookahead_channels}
        pre_lookahead_len: 3
    decoder: !new:cosyvoice.flow.flow_matching.CausalConditionalCFM
        in_channels: 240
        n_spks: 1
        spk_emb_dim: 80
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                solver: 'euler'
                t_scheduler: 'cosine'
                inference_cfg_rate: 0.7
        estimator: !new:cosyvoice.flow.DiT.dit.DiT
            dim: {dit_dim}
            depth: {dit_depth}
            heads: {dit_heads}
            dim_head: {dit_dim_head}
            ff_mult: {dit_ff_mult}
            mel_dim: 80
            mu_dim: 80
            spk_dim: 80
            out_channels: 80
            static_chunk_size: !ref <chunk_size> * <token_mel_ratio>
            num_decoding_left_chunks: !ref <num_decoding_left_chunks>

hift: !new:cosyvoice.hifigan.generator.CausalHiFTGenerator
    in_channels: 80
    base_channels: {hift_channels}
    nb_harmonics: 8
    sampling_rate: !ref <sample_rate>
    nsf_alpha: 0.1
    nsf_sigma: 0.003
    nsf_voiced_threshold: 10
    upsample_rates: [8, 5, 3]
    upsample_kernel_sizes: [16, 11, 7]
    istft_params:
        n_fft: 16
        hop_len: 4
    resblock_kernel_sizes: [3, 7, 11]
    resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    source_resblock_kernel_sizes: [7, 7, 11]
    source_resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    lrelu_slope: 0.1
    audio_limit: 0.99
    conv_pre_look_right: 4
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.CausalConvRNNF0Predictor
        num_class: 1
        in_channels: 80
        cond_channels: {f0_channels}

feat_extractor: !name:matcha.utils.audio.mel_spectrogram
    n_fft: 1920
    num_mels: 80
    sampling_rate: !ref <sample_rate>
    hop_size: 480
    win_size: 1920
    fmin: 0
    fmax: null
    center: False
get_tokenizer: !name:cosyvoice.tokenizer.tokenizer.get_qwen_tokenizer
    token_path: !ref <qwen_pretrain_path>
    skip_special_tokens: True
    version: cosyvoice3
allowed_special: 'all'
"""


def yaml_text(sizes: Sizes, seed: int = 0) -> str:
    """The ``cosyvoice3.yaml`` of a model with these sizes."""
    values = {k: getattr(sizes, k) for k in Sizes.__dataclass_fields__}
    return _YAML.format(seed=seed, **values)


def build_modules(sizes: Sizes, end_of_prompt_id: int = OFFICIAL_END_OF_PROMPT_ID
                  ) -> tuple[CosyVoice3LM, CausalFlowDiT, CausalHiFTGenerator]:
    """The three modules at these sizes (default init; on the current default device).
    ``end_of_prompt_id``: that of the directory's tokenizer (a small vocabulary has it lower)."""
    cfg = hyperyaml.loads(yaml_text(sizes))
    qwen = Qwen2Config.from_hf_config(qwen_config_json(sizes))
    lm = CosyVoice3LM(CosyVoice3LMConfig.from_yaml(cfg["llm"], qwen, end_of_prompt_id))
    flow = CausalFlowDiT(FlowConfig.from_yaml(cfg["flow"]))
    hift = CausalHiFTGenerator(CausalHiFTConfig.from_yaml(cfg["hift"]))
    return lm, flow, hift


@torch.no_grad()
def _log_mel_like_output(flow: CausalFlowDiT) -> None:
    """A falling spectral tilt around -5 in the DiT's output bias, so the flow's mel resembles a
    log-mel (the vocoder calibration and the engine tests then see plausible values)."""
    proj = flow.decoder.estimator.proj_out
    bins = proj.bias.shape[0]
    proj.bias.copy_(torch.linspace(-3.0, -7.0, bins))


def make_model_dir(out: Path, preset: str = "tiny", seed: int = 0, spk2info: bool = False,
                   sizes: Sizes | None = None) -> Path:
    """Write a complete random CosyVoice 3 model directory to ``out``; return it."""
    if sizes is None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        sizes = PRESETS[preset]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)

    (out / "cosyvoice3.yaml").write_text(yaml_text(sizes, seed), encoding="utf-8")
    blank = out / "CosyVoice-BlankEN"
    blank.mkdir(exist_ok=True)
    (blank / "config.json").write_text(json.dumps(qwen_config_json(sizes), indent=2),
                                       encoding="utf-8")
    write_tiny_tokenizer(blank, min(sizes.vocab_size, 2048),
                         special_tokens=COSYVOICE3_SPECIAL_TOKENS)
    tokenizer = CosyVoice3Tokenizer.from_dir(blank)

    _onnx_campplus(out / "campplus.onnx", gen)
    _onnx_speech_tokenizer(out / SPEECH_TOKENIZER, gen)

    lm, flow, hift = build_modules(sizes, tokenizer.special_token_ids[ENDOFPROMPT])
    for module in (lm, flow, hift):
        module.eval()
    randomize(lm, gen)
    _calibrate_lm(lm, gen, eos_prob=0.08)
    torch.save(lm.state_dict(), out / "llm.pt")
    del lm

    randomize(flow, gen)
    _log_mel_like_output(flow)
    randomize(hift, gen)
    mel_config = MelConfig(fmax=None)
    voice = torch.from_numpy(synthetic_voice(1.0, 150.0, 24000, 7))[None]
    prompt_mel = mel_spectrogram_24k(voice, mel_config)
    prompt_tokens = torch.randint(0, SPEECH_TOKENS, (1, prompt_mel.shape[2] // 2), generator=gen)
    tokens = torch.randint(0, SPEECH_TOKENS, (1, 25), generator=gen)
    embedding = torch.randn(1, EMBEDDING_DIM, generator=gen)
    mel = flow.inference(tokens, prompt_tokens,
                         prompt_mel[:, :, :2 * prompt_tokens.shape[1]].transpose(1, 2), embedding)
    _calibrate_hift(hift, torch.cat([prompt_mel, mel], dim=2),
                    vocode=lambda m: hift.inference(m)[0])
    torch.save(flow.state_dict(), out / "flow.pt")
    torch.save(hift.state_dict(), out / "hift.pt")

    if spk2info:
        torch.save(_spk2info(out, 2, SPEECH_TOKENIZER, mel_config), out / "spk2info.pt")
    return out


def scaled(preset: str, **changes: int) -> Sizes:
    """A preset with some sizes changed (for tests of size handling)."""
    return replace(PRESETS[preset], **changes)
