"""The server's --max-batch default follows the engine and where it runs (service/options.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from service import limits
from service.options import ServerOptions, parse_server_options


def test_max_batch_default_follows_the_engine_and_the_device() -> None:
    model = Path("/models/CosyVoice2-0.5B")
    assert parse_server_options([]).max_batch is None  # left to resolved_max_batch
    assert parse_server_options([]).resolved_max_batch() == limits.DEFAULT_MAX_BATCH  # embedded
    gpu = ServerOptions(model_dir=model, device="cuda")
    assert gpu.resolved_max_batch() == limits.GPU_MAX_BATCH > 1
    assert ServerOptions(model_dir=model, device="cuda:1", engine="cosyvoice3"
                         ).resolved_max_batch() == limits.GPU_MAX_BATCH
    # a CosyVoice engine on a CPU batches too; the embedded engine never (it has no scheduler)
    cpu = ServerOptions(model_dir=model, device="cpu")
    assert cpu.resolved_max_batch() == limits.CPU_MAX_BATCH > 1
    assert ServerOptions(engine="cosyvoice2", device="cpu").resolved_max_batch() \
        == limits.CPU_MAX_BATCH
    assert ServerOptions(engine="embedded", device="cuda").resolved_max_batch() == 1
    assert ServerOptions(engine="embedded", device="cpu").resolved_max_batch() == 1
    auto = ServerOptions(model_dir=model)  # device auto: a GPU if torch sees one
    assert auto.resolved_max_batch() == (limits.GPU_MAX_BATCH if torch.cuda.is_available()
                                         else limits.CPU_MAX_BATCH)
    # an explicit value always wins, and the command line round-trips without a default
    explicit = parse_server_options(["--model-dir", str(model), "--device", "cuda",
                                     "--max-batch", "4"])
    assert explicit.resolved_max_batch() == 4
    assert "--max-batch" not in gpu.argv()
    assert parse_server_options(gpu.argv()).resolved_max_batch() == limits.GPU_MAX_BATCH
    assert parse_server_options(["--model-dir", str(model), "--device", "cpu", "--max-batch",
                                 "1"]).resolved_max_batch() == 1  # threads per request


def test_warm_up_option() -> None:
    assert parse_server_options([]).warm_up == "on"
    off = parse_server_options(["--warm-up", "off"])
    assert off.warm_up == "off" and parse_server_options(off.argv()).warm_up == "off"
