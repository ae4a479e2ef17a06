#!/usr/bin/env bash
# The CUDA checks and figures in one run, for a GPU machine that is lent for minutes:
#
#     scripts/bench_cuda.sh [OUT_DIR] [MODEL_DIR]
#
# Needs a python3 (or $PYTHON) with a CUDA build of torch and the project's runtime packages,
# and ../shared as CI has it (or $SHARED_DIR: audio/ and the parity directories). In order, so that a broken CUDA path costs seconds, not minutes:
#   1. a smoke run of the concurrency benchmark on a tiny random directory (1 and 4 streams);
#   2. the full-size random directory made in MODEL_DIR (default /tmp/cv2-full) if missing;
#   3. the CUDA tests (flow parity of CosyVoice 2, token2wav parity of CosyVoice 3, their
#      errors printed with TF32 off and on; the decode step's CUDA graphs against the eager
#      per-request step);
#   4. scripts/bench_cv2_concurrency.py on it through the real gRPC server at 1, 4, 16 and 32
#      streams in the default CUDA precision (bfloat16), 100 forced tokens (4 s) per stream:
#      the wide scheduler and the wide scheduler with CUDA graphs (TTS_CUDA_GRAPHS=1) side by
#      side (NARROW=1 adds the scheduler as it runs on a CPU); FLOAT32=1 adds the wide one in
#      float32 at 1 and 32 streams.
# Every log goes to OUT_DIR (default /tmp/cuda-bench).
#
# On the lent H200 (2026-12, python3 3.12 with torch 2.11 + CUDA 13) the image lacked these,
# carried as cp312 manylinux wheels and installed with --target into PYTHONPATH: soundfile cffi
# pycparser soxr grpcio grpcio-health-checking grpcio-reflection grpcio-tools protobuf
# googleapis-common-protos python-multipart wetext kaldifst contractions textsearch anyascii
# pyahocorasick kaldi-native-fbank prometheus-client (versions as in .venv). av (PyAV) is only
# used by the compressed encoders: an empty `av` package stood in for it. The shared audio and
# parity vectors travelled in a carried folder (SHARED_DIR). The whole run took ~5 minutes.
set -u -o pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/cuda-bench}
model=${2:-/tmp/cv2-full}
py=${PYTHON:-python3}
threads=${THREADS:-4}
device=${DEVICE:-cuda}  # DEVICE=cpu tries this script out on a machine without a GPU
shared=${SHARED_DIR:-../shared}
export COSYVOICE2_PARITY_DIR=$shared/parity/cosyvoice2 COSYVOICE3_PARITY_DIR=$shared/parity/cosyvoice3
mkdir -p "$out"
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv \
    | tee "$out/gpu.txt"
grep -m1 "model name" /proc/cpuinfo | tee -a "$out/gpu.txt"
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" \
    | tee -a "$out/gpu.txt"

step() {  # step NAME SECONDS COMMAND...: runs COMMAND under a time limit, logs to OUT_DIR/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "=== $name: $*"
    local started=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - started)) s"
    return "$rc"
}

bench=(scripts/bench_cv2_concurrency.py --device "$device" --threads "$threads"
       --prompt "$shared/audio/zero_shot_prompt.wav")
step smoke 150 $py "${bench[@]}" --preset tiny --precision auto --streams 1,4 --tokens 20 \
    --rounds 1 || exit 1
if [ ! -f "$model/llm.pt" ]; then
    step make_model 180 $py -c "
import sys; from pathlib import Path
sys.path.insert(0, '.')
from tts_core.cosyvoice2.testing.make_model_dir import make_model_dir
make_model_dir(Path('$model'), 'full', seed=0)" || exit 1
fi
step cuda_tests 150 $py -m pytest -q -s -p no:cacheprovider \
    tests/test_cv2_flow_parity.py::test_cuda tests/test_cv3_token2wav_parity.py::test_cuda \
    tests/test_cv2_kv_slab.py::test_cuda_graph_replay_equals_each_request_alone
compare=(--compare-graphs)
[ "${NARROW:-0}" = 1 ] && compare+=(--compare-narrow)
step bench_auto 450 $py "${bench[@]}" --model-dir "$model" --precision auto \
    --streams 1,4,16,32 --tokens 100 --rounds 2 "${compare[@]}"
if [ "${FLOAT32:-0}" = 1 ]; then
    step bench_float32 200 $py "${bench[@]}" --model-dir "$model" --precision float32 \
        --streams 1,32 --tokens 100 --rounds 1
fi
exit 0
