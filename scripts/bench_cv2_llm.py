"""Speed of the CosyVoice 2 LM (Qwen2 backbone + speech head) with random weights.

Prints the prefill time of a zero-shot-sized prompt and the time per generated speech token.
Official sizes by default (Qwen2.5-0.5B backbone); weights are random, so this measures speed
only. Example:

    .venv/bin/python scripts/bench_cv2_llm.py --threads 2 --steps 50
    .venv/bin/python scripts/bench_cv2_llm.py --device cuda --dtype bfloat16 --steps 200
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tts_core.cosyvoice2.llm import CosyVoice2LM, LMConfig  # noqa: E402
from tts_core.cosyvoice2.qwen2 import Qwen2Config  # noqa: E402
from tts_core.cosyvoice2.sampling import RasSampler  # noqa: E402

OFFICIAL_QWEN = {  # Qwen2.5-0.5B, the CosyVoice 2 backbone
    "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
    "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": True}


def build(device: str, dtype: torch.dtype) -> CosyVoice2LM:
    qwen = Qwen2Config.from_hf_config(OFFICIAL_QWEN)
    cfg = LMConfig(qwen=qwen, llm_input_size=qwen.hidden_size, llm_output_size=qwen.hidden_size)
    with torch.device("meta"):
        model = CosyVoice2LM(cfg)
    model = model.to_empty(device=device)
    model.llm.model.lm_head.weight = model.llm.model.model.embed_tokens.weight
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    model.eval()
    if dtype != torch.float32:
        model.set_backbone_dtype(dtype)
    return model


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=40, help="speech tokens to generate")
    ap.add_argument("--text-len", type=int, default=40, help="text ids (prompt + target)")
    ap.add_argument("--prompt-speech", type=int, default=150, help="prompt speech tokens")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model = build(args.device, dtype)
    text = [int(i) for i in torch.randint(0, 150_000, (args.text_len,))]
    prompt = [int(i) for i in torch.randint(0, 6561, (args.prompt_speech,))]
    sampler = RasSampler.seeded(model.config.sampling, model.config.speech_token_size, 0)
    ratio = args.steps / args.text_len + 1  # enough room for --steps tokens

    times: list[float] = []
    start = time.perf_counter()

    def on_step(_step) -> None:
        sync(args.device)
        times.append(time.perf_counter())

    tokens = 0
    for _ in model.inference(text, [], prompt, sampler, min_token_text_ratio=ratio,
                             max_token_text_ratio=ratio, on_step=on_step):
        tokens += 1
        if tokens >= args.steps:
            break
    prefill = times[0] - start
    per_step = (times[-1] - times[0]) / max(len(times) - 1, 1)
    print(f"device={args.device} dtype={args.dtype} threads={args.threads} "
          f"context={1 + args.text_len + 1 + args.prompt_speech}")
    print(f"prefill: {prefill * 1e3:.1f} ms (incl. first token)")
    print(f"decode : {per_step * 1e3:.2f} ms/token over {len(times) - 1} tokens "
          f"= {1 / per_step:.1f} tokens/s (speech runs at 25 tokens/s)")


if __name__ == "__main__":
    main()
