"""Write a complete, randomly initialised CosyVoice 2 model directory in the official layout.

The directory is what an operator gets from ModelScope ``iic/CosyVoice2-0.5B`` — same file names,
same ``cosyvoice2.yaml`` format (hyperpyyaml tags and all), same state-dict keys, ONNX models with
the official input/output names, dtypes and ranks — but every weight is a seeded random number, so
it speaks noise. It exists to test and benchmark the loader and the engine without downloading
2 GB of weights:

* ``tiny``: a few MB, every structural setting official, widths and depths reduced (fast tests);
* ``full``: the official sizes (Qwen2.5-0.5B backbone, 512-wide flow with a 12-mid-block U-Net,
  512-channel HiFT): the same compute per token as the released model, for benchmarks.

The ONNX models are tiny stand-ins with the official interfaces: ``campplus.onnx`` maps the
fbank ``[B, frames, 80]`` to ``[B, 192]`` (RMS over time, then a projection),
``speech_tokenizer_v2.onnx`` maps the Whisper log-mel ``[1, 128, T]`` and its length ``[1]`` to
``[1, T // 4]`` ids in 0…6560 (stacking 4 frames, a projection, argmax). Building them needs the
``onnx`` package (a test/dev dependency only).

Weights are scaled so the outputs behave like a model's: the LM's next-token distributions are
peaked and end-of-speech is likely enough that utterances end at plausible lengths; the vocoder's
f0 lies in a voice range and its waveform stays under the ±0.99 clamp.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import hyperyaml
from ..features import MelConfig
from ..flow import CausalFlow, FlowConfig
from ..hift import HiFTConfig, HiFTGenerator
from ..llm import CosyVoice2LM, LMConfig
from ..qwen2 import Qwen2Config

SPEECH_TOKENS = 6561
EMBEDDING_DIM = 192
N_MELS = 80
WHISPER_MELS = 128


@dataclass(frozen=True)
class Sizes:
    """Every width/depth the official yaml and config.json carry."""

    # Qwen2 backbone (CosyVoice-BlankEN/config.json)
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    # flow
    flow_width: int  # flow input_size = encoder input/output size (and look-ahead/up channels)
    encoder_heads: int
    encoder_linear_units: int
    encoder_blocks: int
    estimator_channels: int
    estimator_head_dim: int
    estimator_blocks: int
    estimator_mid_blocks: int
    estimator_heads: int
    # HiFT
    hift_channels: int
    f0_channels: int


PRESETS: dict[str, Sizes] = {
    "tiny": Sizes(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=4, num_kv_heads=2, flow_width=64, encoder_heads=4,
                  encoder_linear_units=128, encoder_blocks=1, estimator_channels=64,
                  estimator_head_dim=32, estimator_blocks=1, estimator_mid_blocks=2,
                  estimator_heads=4, hift_channels=64, f0_channels=64),
    "full": Sizes(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
                  num_heads=14, num_kv_heads=2, flow_width=512, encoder_heads=8,
                  encoder_linear_units=2048, encoder_blocks=6, estimator_channels=256,
                  estimator_head_dim=64, estimator_blocks=4, estimator_mid_blocks=12,
                  estimator_heads=8, hift_channels=512, f0_channels=512),
}

# A cosyvoice2.yaml with the keys and hyperpyyaml tags of the official file and the sizes as
# fields. Besides the model sections it carries entries of the kinds an official file also has
# (seeding calls with !apply:, function references with !name:, lists of !ref, plain training
# settings) so the loader meets them here too and must leave them alone.
_YAML = """\
# seeding calls: a safe reader must never run these
__set_seed1: !apply:random.seed [1986]
__set_seed2: !apply:numpy.random.seed [1986]
__set_seed3: !apply:torch.manual_seed [1986]
__set_seed4: !apply:torch.cuda.manual_seed_all [1986]

# global settings
sample_rate: 24000
llm_input_size: {hidden_size}
llm_output_size: {hidden_size}
spk_embed_dim: 192
qwen_pretrain_path: ''
token_frame_rate: 25
token_mel_ratio: 2

# streaming: chunk size in tokens; -1 = the flow decoder attends to every earlier chunk
chunk_size: 25
num_decoding_left_chunks: -1

# the three networks
llm: !new:cosyvoice.llm.llm.Qwen2LM
    llm_input_size: !ref <llm_input_size>
    llm_output_size: !ref <llm_output_size>
    speech_token_size: 6561
    length_normalized_loss: True
    lsm_weight: 0
    mix_ratio: [5, 15]
    llm: !new:cosyvoice.llm.llm.Qwen2Encoder
        pretrain_path: !ref <qwen_pretrain_path>
    sampling: !name:cosyvoice.utils.common.ras_sampling
        top_p: 0.8
        top_k: 25
        win_size: 10
        tau_r: 0.1

flow: !new:cosyvoice.flow.flow.CausalMaskedDiffWithXvec
    input_size: {flow_width}
    output_size: 80
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: 6561
    input_frame_rate: !ref <token_frame_rate>
    only_mask_loss: True
    token_mel_ratio: !ref <token_mel_ratio>
    pre_lookahead_len: 3
    encoder: !new:cosyvoice.transformer.upsample_encoder.UpsampleConformerEncoder
        output_size: {flow_width}
        attention_heads: {encoder_heads}
        linear_units: {encoder_linear_units}
        num_blocks: {encoder_blocks}
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0.1
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        input_size: {flow_width}
        use_cnn_module: False
        macaron_style: False
        static_chunk_size: !ref <chunk_size>
    decoder: !new:cosyvoice.flow.flow_matching.CausalConditionalCFM
        in_channels: 240
        n_spks: 1
        spk_emb_dim: 80
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                solver: 'euler'
                t_scheduler: 'cosine'
                training_cfg_rate: 0.2
                inference_cfg_rate: 0.7
                reg_loss_type: 'l1'
        estimator: !new:cosyvoice.flow.decoder.CausalConditionalDecoder
            in_channels: 320
            out_channels: 80
            channels: [{estimator_channels}]
            dropout: 0.0
            attention_head_dim: {estimator_head_dim}
            n_blocks: {estimator_blocks}
            num_mid_blocks: {estimator_mid_blocks}
            num_heads: {estimator_heads}
            act_fn: 'gelu'
            static_chunk_size: !ref <chunk_size> * <token_mel_ratio>
            num_decoding_left_chunks: !ref <num_decoding_left_chunks>

hift: !new:cosyvoice.hifigan.generator.HiFTGenerator
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
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor
        num_class: 1
        in_channels: 80
        cond_channels: {f0_channels}

# front-end feature settings (read by the loader) and other entries it must ignore
feat_extractor: !name:matcha.utils.audio.mel_spectrogram
    n_fft: 1920
    num_mels: 80
    sampling_rate: !ref <sample_rate>
    hop_size: 480
    win_size: 1920
    fmin: 0
    fmax: 8000
    center: False
get_tokenizer: !name:cosyvoice.tokenizer.tokenizer.get_qwen_tokenizer
    token_path: !ref <qwen_pretrain_path>
    skip_special_tokens: True
compute_fbank: !name:cosyvoice.dataset.processor.compute_fbank
    feat_extractor: !ref <feat_extractor>
    num_frames: 960
hifigan: !new:cosyvoice.hifigan.hifigan.HiFiGan
    generator: !ref <hift>
    mel_spec_transform: [
        !ref <feat_extractor>
    ]
data_pipeline: [
    !ref <get_tokenizer>,
    !ref <compute_fbank>,
]
train_conf:
    optim: adam
    optim_conf:
        lr: 1e-5
    max_epoch: 200
"""


def yaml_text(sizes: Sizes) -> str:
    """The ``cosyvoice2.yaml`` of a model with these sizes."""
    values = {k: getattr(sizes, k) for k in Sizes.__dataclass_fields__}
    return _YAML.format(**values)


def qwen_config_json(sizes: Sizes) -> dict:
    """``CosyVoice-BlankEN/config.json`` (a Hugging Face Qwen2 config) for these sizes."""
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "torch_dtype": "float32",
        "vocab_size": sizes.vocab_size, "hidden_size": sizes.hidden_size,
        "intermediate_size": sizes.intermediate_size, "num_hidden_layers": sizes.num_layers,
        "num_attention_heads": sizes.num_heads, "num_key_value_heads": sizes.num_kv_heads,
        "hidden_act": "silu", "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
        "max_position_embeddings": 32768, "tie_word_embeddings": True,
        "use_sliding_window": False, "sliding_window": 32768, "max_window_layers": 21,
        "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643,
        "initializer_range": 0.02, "use_cache": True,
    }


def build_modules(sizes: Sizes) -> tuple[CosyVoice2LM, CausalFlow, HiFTGenerator]:
    """The three modules at these sizes (default init; on the current default device)."""
    cfg = hyperyaml.loads(yaml_text(sizes))
    qwen = Qwen2Config.from_hf_config(qwen_config_json(sizes))
    lm = CosyVoice2LM(LMConfig.from_yaml(cfg["llm"], qwen))
    flow = CausalFlow(FlowConfig.from_yaml(cfg["flow"]))
    hift = HiFTGenerator(HiFTConfig.from_yaml(cfg["hift"]))
    return lm, flow, hift


# ----------------------------------------------------------------------------- random weights


def _normal(shape: tuple[int, ...], std: float, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen) * std


def _fan_in(module: nn.Module, weight: torch.Tensor) -> int:
    if isinstance(module, nn.ConvTranspose1d):
        # each output sample sums in_channels · kernel / stride inputs
        return max(1, weight.shape[0] * weight.shape[2] // module.stride[0])
    return max(1, weight[0].numel())


def _set_weight(module: nn.Module, value: torch.Tensor) -> None:
    """Set a (possibly weight-normalised) weight so that the effective weight is ``value``."""
    parametrizations = getattr(module, "parametrizations", None)
    if parametrizations is not None and "weight" in parametrizations:
        dims = tuple(range(1, value.dim()))
        p = parametrizations.weight
        p.original1.copy_(value)
        p.original0.copy_(value.norm(dim=dims, keepdim=True))
    else:
        module.weight.copy_(value)


@torch.no_grad()
def randomize(model: nn.Module, gen: torch.Generator, gain: float = 1.0) -> None:
    """Redraw every parameter: matrices N(0, gain²/fan_in), norm scales 1 + N(0, 0.1²), biases
    N(0, 0.02²), embeddings N(0, 1), Snake α uniform in [0.6, 1.4]."""
    done: set[int] = set()
    for module in model.modules():
        params = dict(module.named_parameters(recurse=False))
        if hasattr(module, "parametrizations"):
            params.update({"weight": module.weight})
        if isinstance(module, nn.Embedding):
            module.weight.copy_(_normal(module.weight.shape, 1.0, gen))
        elif isinstance(module, nn.LayerNorm) or type(module).__name__ == "RMSNorm":
            if module.weight is not None:
                module.weight.copy_(1 + _normal(module.weight.shape, 0.1, gen))
            if getattr(module, "bias", None) is not None:
                module.bias.copy_(_normal(module.bias.shape, 0.02, gen))
        elif isinstance(module, nn.Linear | nn.Conv1d | nn.ConvTranspose1d):
            weight = module.weight
            std = gain / math.sqrt(_fan_in(module, weight))
            _set_weight(module, _normal(tuple(weight.shape), std, gen))
            if module.bias is not None:
                module.bias.copy_(_normal(module.bias.shape, 0.02, gen))
        elif type(module).__name__ == "Snake":
            module.alpha.copy_(0.6 + 0.8 * torch.rand(module.alpha.shape, generator=gen))
        else:
            for param in params.values():
                param.copy_(_normal(param.shape, 0.1, gen))
        for param in module.parameters(recurse=False):
            done.add(id(param))
        if hasattr(module, "parametrizations"):
            for param in module.parametrizations.parameters():
                done.add(id(param))
    leftover = [n for n, p in model.named_parameters() if id(p) not in done]
    if leftover:  # pragma: no cover - every module type above is handled
        raise RuntimeError(f"parameters not initialised: {leftover[:5]}")


def synthetic_voice(seconds: float, f0: float, sample_rate: int, seed: int) -> np.ndarray:
    """A voice-like test signal: a harmonic tone with vibrato and syllable-like envelope."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    pitch = f0 * (1 + 0.05 * np.sin(2 * np.pi * 5.0 * t) + 0.1 * np.sin(2 * np.pi * 0.7 * t))
    phase = 2 * np.pi * np.cumsum(pitch) / sample_rate
    wave = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t) ** 2
    signal = 0.25 * wave * envelope + 0.01 * rng.standard_normal(len(t))
    return (signal / np.abs(signal).max() * 0.6).astype(np.float32)


@torch.no_grad()
def _calibrate_lm(lm: CosyVoice2LM, gen: torch.Generator, eos_prob: float) -> None:
    """Peaked next-token distributions (logits with std ~3), and an end-of-speech logit that gets
    about ``eos_prob`` of the mass on typical hidden states, so utterances end.

    With a bias (CosyVoice 2) the end-of-speech bias is tuned and the other stop ids get a very
    low one; without (CosyVoice 3) the length of the end-of-speech row is tuned and the other
    stop rows are zero (logit 0: negligible next to the peaked speech logits).
    """
    decoder = lm.llm_decoder
    dim = decoder.in_features
    decoder.weight.copy_(_normal(tuple(decoder.weight.shape), 3.0 / math.sqrt(dim), gen))
    hidden = torch.randn(256, dim, generator=gen) * lm.llm.model.model.norm.weight
    stop, eos = lm.config.speech_token_size, lm.config.eos_token
    has_bias = decoder.bias is not None
    if not has_bias:
        decoder.weight[stop:] = 0.0
    logits = hidden @ decoder.weight.T + (decoder.bias if has_bias else 0.0)
    direction = decoder.weight[eos].clone() if has_bias else _normal((dim,), 1 / math.sqrt(dim),
                                                                     gen)
    low, high = (-20.0, 40.0) if has_bias else (0.0, 40.0)
    for _ in range(40):  # bisection on the bias (or the scale) of the end-of-speech row
        mid = (low + high) / 2
        logits[:, eos] = hidden @ direction + mid if has_bias else hidden @ (mid * direction)
        if float(logits.softmax(-1)[:, eos].mean()) < eos_prob:
            low = mid
        else:
            high = mid
    if has_bias:
        decoder.bias[eos] = (low + high) / 2
        # the other stop ids (unused, fill) are never wanted from the sampler
        decoder.bias[eos + 1:] = -20.0
    else:
        decoder.weight[eos] = (low + high) / 2 * direction


@torch.no_grad()
def _calibrate_hift(hift: HiFTGenerator, mel: torch.Tensor,
                    vocode: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    """f0 median ~140 Hz and waveform peak ~0.5 on ``mel`` (``vocode``: mel -> waveform, by
    default the CosyVoice 2 vocoder without random excitation)."""
    if vocode is None:
        def vocode(m: torch.Tensor) -> torch.Tensor:
            return hift.inference(m, deterministic=True)[0]

    f0 = hift.predict_f0(mel)
    median = float(f0.median())
    if median > 0:
        classifier = hift.f0_predictor.classifier
        classifier.weight.mul_(140.0 / median)
        classifier.bias.mul_(140.0 / median)
    post = hift.conv_post
    bins = hift.config.istft_n_fft // 2 + 1
    for _ in range(30):
        wav = vocode(mel)
        peak = float(wav.abs().max())
        if 0.3 <= peak <= 0.7:
            break
        # the magnitude is exp(channels 0..bins-1): shift their bias to scale the waveform
        post.bias[:bins] += math.log(0.5 / max(peak, 1e-6)) if peak < 0.98 else -1.0


# ----------------------------------------------------------------------------- ONNX stand-ins


def _onnx_campplus(path: Path, gen: torch.Generator) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = _normal((N_MELS, EMBEDDING_DIM), 1.0 / math.sqrt(N_MELS), gen).numpy()
    bias = _normal((EMBEDDING_DIM,), 0.1, gen).numpy()
    graph = helper.make_graph(
        [helper.make_node("Mul", ["feature", "feature"], ["squared"]),
         helper.make_node("ReduceMean", ["squared"], ["power"], axes=[1], keepdims=0),
         helper.make_node("Sqrt", ["power"], ["rms"]),
         helper.make_node("MatMul", ["rms", "weight"], ["projected"]),
         helper.make_node("Add", ["projected", "bias"], ["embedding"])],
        "campplus_stand_in",
        [helper.make_tensor_value_info("feature", TensorProto.FLOAT,
                                       ["batch_size", "frame_num", N_MELS])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT,
                                       ["batch_size", EMBEDDING_DIM])],
        [numpy_helper.from_array(weight.astype(np.float32), "weight"),
         numpy_helper.from_array(bias.astype(np.float32), "bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="cosyvoice2-testing")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _onnx_speech_tokenizer(path: Path, gen: torch.Generator) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rank = 16
    down = _normal((4 * WHISPER_MELS, rank), 1.0 / math.sqrt(4 * WHISPER_MELS), gen).numpy()
    up = _normal((rank, SPEECH_TOKENS), 1.0, gen).numpy()
    consts = {"four": np.array([4], np.int64), "zero": np.array([0], np.int64),
              "axis2": np.array([2], np.int64),
              "stacked_shape": np.array([1, -1, 4 * WHISPER_MELS], np.int64)}
    nodes = [
        # keep the first 4·⌊length/4⌋ frames, stack 4 frames per token, project, argmax
        helper.make_node("Cast", ["feats_length"], ["length"], to=TensorProto.INT64),
        helper.make_node("Div", ["length", "four"], ["groups"]),
        helper.make_node("Mul", ["groups", "four"], ["usable"]),
        helper.make_node("Slice", ["feats", "zero", "usable", "axis2"], ["cut"]),
        helper.make_node("Transpose", ["cut"], ["frames"], perm=[0, 2, 1]),
        helper.make_node("Reshape", ["frames", "stacked_shape"], ["stacked"]),
        helper.make_node("MatMul", ["stacked", "down"], ["low"]),
        helper.make_node("MatMul", ["low", "up"], ["logits"]),
        helper.make_node("ArgMax", ["logits"], ["indices"], axis=2, keepdims=0),
    ]
    initializers = [numpy_helper.from_array(down.astype(np.float32), "down"),
                    numpy_helper.from_array(up.astype(np.float32), "up")]
    initializers += [numpy_helper.from_array(v, k) for k, v in consts.items()]
    graph = helper.make_graph(
        nodes, "speech_tokenizer_v2_stand_in",
        [helper.make_tensor_value_info("feats", TensorProto.FLOAT, [1, WHISPER_MELS, "T"]),
         helper.make_tensor_value_info("feats_length", TensorProto.INT32, [1])],
        [helper.make_tensor_value_info("indices", TensorProto.INT64, [1, "T_token"])],
        initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="cosyvoice2-testing")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


# ----------------------------------------------------------------------------- the directory


def _spk2info(out: Path, ratio: int,
              speech_tokenizer: str = "speech_tokenizer_v2.onnx",
              mel_config: MelConfig | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Two preset speakers in the released ``spk2info.pt`` format (embedding, speech tokens,
    speech feat), computed with the directory's own front end from synthetic voices."""
    from ..onnx_frontend import OnnxFrontend, PromptEncoder

    encoder = PromptEncoder(OnnxFrontend(out / "campplus.onnx", out / speech_tokenizer),
                            mel_config or MelConfig(), ratio)
    presets = {}
    for index, (name, f0) in enumerate((("中文女", 220.0), ("英文男", 110.0))):
        features = encoder.encode(synthetic_voice(3.0, f0, 24000, seed=index), 24000)
        presets[name] = {"embedding": features.embedding,
                         "speech_token": features.speech_tokens,
                         "speech_feat": features.speech_feat}
    return presets


def make_model_dir(out: Path, preset: str = "tiny", seed: int = 0, spk2info: bool = False,
                   sizes: Sizes | None = None) -> Path:
    """Write a complete random model directory to ``out`` (created if needed); return it."""
    from ..tokenizer import write_tiny_tokenizer

    if sizes is None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        sizes = PRESETS[preset]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)

    (out / "cosyvoice2.yaml").write_text(yaml_text(sizes), encoding="utf-8")
    blank = out / "CosyVoice-BlankEN"
    blank.mkdir(exist_ok=True)
    (blank / "config.json").write_text(json.dumps(qwen_config_json(sizes), indent=2),
                                       encoding="utf-8")
    # A full-size vocabulary cannot be trained from a paragraph; the BPE stays small, while
    # the embedding table keeps all vocab_size rows.
    write_tiny_tokenizer(blank, min(sizes.vocab_size, 2048))

    _onnx_campplus(out / "campplus.onnx", gen)
    _onnx_speech_tokenizer(out / "speech_tokenizer_v2.onnx", gen)

    lm, flow, hift = build_modules(sizes)
    for module in (lm, flow, hift):
        module.eval()
    randomize(lm, gen)
    _calibrate_lm(lm, gen, eos_prob=0.08)
    torch.save(lm.state_dict(), out / "llm.pt")
    del lm

    randomize(flow, gen)
    randomize(hift, gen)
    # Calibrate the vocoder on what the flow makes of a voice-like prompt.
    from ..features import mel_spectrogram_24k

    prompt_mel = mel_spectrogram_24k(torch.from_numpy(synthetic_voice(1.0, 150.0, 24000, 7))[None],
                                     MelConfig())
    prompt_tokens = torch.randint(0, SPEECH_TOKENS, (1, prompt_mel.shape[2] // 2), generator=gen)
    tokens = torch.randint(0, SPEECH_TOKENS, (1, 25), generator=gen)
    embedding = torch.randn(1, EMBEDDING_DIM, generator=gen)
    mel = flow.inference(tokens, prompt_tokens, prompt_mel[:, :, :2 * prompt_tokens.shape[1]]
                         .transpose(1, 2), embedding)
    _calibrate_hift(hift, torch.cat([prompt_mel, mel], dim=2))
    torch.save(flow.state_dict(), out / "flow.pt")
    torch.save(hift.state_dict(), out / "hift.pt")

    if spk2info:
        torch.save(_spk2info(out, 2), out / "spk2info.pt")
    return out


def scaled(preset: str, **changes: int) -> Sizes:
    """A preset with some sizes changed (for tests of size handling)."""
    return replace(PRESETS[preset], **changes)
