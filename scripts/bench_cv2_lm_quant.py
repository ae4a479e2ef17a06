"""Speed and error of the CosyVoice 2 LM's quantisation schemes, side by side in one run.

Loads only the LM of a model directory (e.g. the full-size generated one), records float32's
log-probabilities under teacher forcing on a zero-shot-sized input, then for every scheme:
the same log-probabilities (errors against float32: max top-25 log-prob error, top-1
agreement, max total-variation distance, the figures the README's tolerances bound) and its
speed: prefill of the prompt rows and decode steps, measured round-robin (every scheme once per
round, medians over rounds) so that load on a shared machine hits all schemes alike.

    PYTHONPATH=$PWD .venv/bin/python scripts/bench_cv2_lm_quant.py \
        --model-dir /work/models/cv2-full --threads 2 --rounds 5

On a machine shared with other busy processes, wall-clock figures mostly measure the others;
``--clock cpu`` times with the process's CPU time instead (CPU-seconds per step: with
``--threads 1`` the compute time of the step, much less sensitive to load; the decode column
is then tokens per CPU-second).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tts_core.cosyvoice2.checkpoint import load_strict  # noqa: E402
from tts_core.cosyvoice2.llm import CosyVoice2LM, LMConfig  # noqa: E402
from tts_core.cosyvoice2.model_dir import ModelDirError  # noqa: E402
from tts_core.cosyvoice2.model_dir import _node as yaml_node  # noqa: E402
from tts_core.cosyvoice2.model_dir import _read_qwen_config as read_qwen_config  # noqa: E402
from tts_core.cosyvoice2.model_dir import _read_state_dict as read_state_dict  # noqa: E402
from tts_core.cosyvoice2.model_dir import _read_yaml as read_yaml  # noqa: E402
from tts_core.cosyvoice2.weight_quant import (  # noqa: E402
    ATTENTION_LINEARS,
    MLP_LINEARS,
    WeightOnlyLinear,  # noqa: E402
)

TOP = 25
LINEARS = ATTENTION_LINEARS + MLP_LINEARS


def load_lm(root: Path) -> CosyVoice2LM:
    yaml_path, cfg = read_yaml(root)
    qwen = read_qwen_config(root)
    lm = CosyVoice2LM(LMConfig.from_yaml(yaml_node(cfg, "llm", yaml_path), qwen))
    load_strict(lm, read_state_dict(root / "llm.pt"), "llm.pt", ModelDirError)
    return lm.eval()


def dynamic_int8(linear: nn.Linear) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
        return quantize_dynamic(nn.Sequential(linear), {nn.Linear: per_channel_dynamic_qconfig},
                                inplace=False)[0]


def scheme_modules(lm: CosyVoice2LM, spec: dict[str, str]) -> list[dict[str, nn.Module]]:
    """Per layer, the module for each Linear name: spec maps name -> "f32" | "dyn8" | "w8" |
    "w4gN"."""
    out = []
    for layer in lm.llm.model.model.layers:
        modules = {}
        for name in LINEARS:
            linear = layer.get_submodule(name)
            kind = spec.get(name, "f32")
            if kind == "f32":
                modules[name] = linear
            elif kind == "dyn8":
                modules[name] = dynamic_int8(linear)
            elif kind == "w8":
                modules[name] = WeightOnlyLinear.from_linear(linear, 8)
            elif kind == "w8p":  # prefills through dynamic int8
                modules[name] = WeightOnlyLinear.from_linear(linear, 8)
                modules[name].prefill = dynamic_int8(linear)
            else:
                modules[name] = WeightOnlyLinear.from_linear(linear, 4, int(kind[3:]))
        out.append(modules)
    return out


def install(lm: CosyVoice2LM, modules: list[dict[str, nn.Module]]) -> None:
    for layer, table in zip(lm.llm.model.model.layers, modules, strict=True):
        for name, module in table.items():
            parent, _, child = name.rpartition(".")
            setattr(layer.get_submodule(parent), child, module)


def every(kind: str) -> dict[str, str]:
    return dict.fromkeys(LINEARS, kind)


def mixed(attn: str, mlp: str) -> dict[str, str]:
    return {**dict.fromkeys(ATTENTION_LINEARS, attn), **dict.fromkeys(MLP_LINEARS, mlp)}


SCHEMES = {
    "float32": every("f32"),
    "dyn-int8": every("dyn8"),
    "w8": every("w8"),
    "w8+dyn8-prefill": every("w8p"),
    "w4g32": every("w4g32"),
    "w4g128": every("w4g128"),
    "attn-w8/mlp-w4g32": mixed("w8", "w4g32"),
    "attn-f32/mlp-dyn8": mixed("f32", "dyn8"),
    "gate,up-dyn8/rest-w8": {**every("w8"), "mlp.gate_proj": "dyn8", "mlp.up_proj": "dyn8"},
}


class Forced:
    """Sampler replaying ``tokens`` (teacher forcing); records nothing itself."""

    def __init__(self, tokens: list[int]) -> None:
        self.tokens = tokens

    def __call__(self, logp: torch.Tensor, decoded: list[int], ignore_eos: bool) -> int:
        return self.tokens[len(decoded)]


class Drawn:
    """Float32 run: draw from the top-25 of each step (never a stop id), seeded."""

    def __init__(self, speech_size: int, seed: int) -> None:
        self.size, self.gen = speech_size, torch.Generator().manual_seed(seed)

    def __call__(self, logp: torch.Tensor, decoded: list[int], ignore_eos: bool) -> int:
        top = logp[:self.size].topk(TOP)
        pick = torch.multinomial(top.values.softmax(-1), 1, generator=self.gen)
        return int(top.indices[pick])


CLOCK = time.perf_counter


def run(lm: CosyVoice2LM, text: list[int], prompt: list[int], sampler, n: int
        ) -> tuple[list[torch.Tensor], list[int], list[float]]:
    """(logp per step, tokens, step end times) with the clock started before prefill."""
    logps: list[torch.Tensor] = []
    stamps = [CLOCK()]
    ratio = n / len(text) + 1
    tokens = []
    for token in lm.inference(text, [], prompt, sampler, min_token_text_ratio=ratio,
                              max_token_text_ratio=ratio,
                              on_step=lambda s: (logps.append(s.logp),
                                                 stamps.append(CLOCK()))):
        tokens.append(token)
        if len(tokens) >= n:
            break
    return logps, tokens, stamps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=40, help="teacher-forced steps for errors")
    ap.add_argument("--speed-steps", type=int, default=12, help="decode steps per speed round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--text-len", type=int, default=40)
    ap.add_argument("--prompt-speech", type=int, default=70)
    ap.add_argument("--schemes", nargs="*", default=list(SCHEMES), choices=list(SCHEMES))
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    policy = os.environ.get("OMP_WAIT_POLICY", "-")
    print(f"threads={args.threads} clock={args.clock} OMP_WAIT_POLICY={policy} "
          f"load={os.getloadavg()}", flush=True)
    lm = load_lm(args.model_dir)
    g = torch.Generator().manual_seed(0)
    vocab = lm.config.qwen.vocab_size
    text = torch.randint(0, min(vocab, 150_000), (args.text_len,), generator=g).tolist()
    prompt = torch.randint(0, lm.config.speech_token_size, (args.prompt_speech,),
                           generator=g).tolist()
    names = ["float32"] + [s for s in args.schemes if s != "float32"]
    built = {name: scheme_modules(lm, SCHEMES[name]) for name in names}
    with torch.inference_mode():
        install(lm, built["float32"])
        ref, tokens, _ = run(lm, text, prompt, Drawn(lm.config.speech_token_size, 1), args.tokens)
        ref_logp = torch.stack(ref)
        top = ref_logp.topk(TOP, dim=-1).indices
        errors = {}
        for name in names:
            install(lm, built[name])
            own = torch.stack(run(lm, text, prompt, Forced(tokens), args.tokens)[0])
            errors[name] = (
                float((own.gather(1, top) - ref_logp.gather(1, top)).abs().max()),
                float((own.argmax(-1) == ref_logp.argmax(-1)).float().mean()),
                float((own.exp() - ref_logp.exp()).abs().sum(-1).max() / 2))
            print(f"{name}: err/top1/tv {errors[name]}", flush=True)
        prefill: dict[str, list[float]] = {n: [] for n in names}
        decode: dict[str, list[float]] = {n: [] for n in names}
        for _ in range(args.rounds):
            for name in names:
                install(lm, built[name])
                _, _, stamps = run(lm, text, prompt, Forced(tokens), args.speed_steps)
                prefill[name].append(stamps[1] - stamps[0])
                steps = [b - a for a, b in zip(stamps[1:], stamps[2:], strict=False)]
                decode[name].append(statistics.median(steps))
    rows = 1 + args.text_len + 1 + args.prompt_speech
    print(f"\nLM only, {rows}-row prompt, {args.rounds} rounds round-robin, medians; "
          f"errors vs float32 over {args.tokens} teacher-forced steps; load {os.getloadavg()}")
    print(f"{'scheme':24s} {'prefill ms':>10s} {'decode tok/s':>12s} {'x f32':>6s} "
          f"{'logp err':>8s} {'top1':>5s} {'TV':>6s}  within tolerance")
    base = statistics.median(decode["float32"])
    for name in names:
        d = statistics.median(decode[name])
        err, top1, tv = errors[name]
        ok = tv <= 0.1 and err <= 0.5 and top1 >= 0.8
        print(f"{name:24s} {statistics.median(prefill[name]) * 1e3:10.0f} {1 / d:12.1f} "
              f"{base / d:6.2f} {err:8.3f} {top1:5.2f} {tv:6.3f}  {'yes' if ok else 'NO'}")


if __name__ == "__main__":
    main()
