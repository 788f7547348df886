#!/usr/bin/env bash
# Everything a lent GPU machine should prove and measure, in one call of at most 8 minutes:
#
#   bash bench/gpu_wheels.sh                                   # here, first: wheels the image lacks -> .whl/
#   run(command="bash bench/gpu_suite.sh", carry=[".whl"], timeout_s=560)    # the device tool
#
# 1. tests (<= 90 s): the CUDA-only tests but the slow compile one (`pytest -m "gpu and not slow"`: graphs ==
#    eager in generate and in continuous batching, bucket capture at a server's start, the graph helper's
#    refusals); `-m gpu` adds compiled + graphed == eager on the tiny model (a cold compile);
# 2. bench (<= 240 s): bench/bench_gpu.py: graphed == eager (fp32 codes, bf16 logits within a tolerance),
#    compiled + graphed == eager, CUDA kernels per frame, ms/frame against the reference, int8, first audio
#    chunk, batch 1/4/16/64, compiled throughput, codec streaming decode; writes figures.json;
# 3. server (<= 150 s: writing the checkpoint, then 90): `csm serve` (graphs on, the default) on a csm-1b size checkpoint under 32 clients:
#    seconds from launch to healthy, its start-up line (load, compile, capture), 64 requests.
# Logs, table.md and figures.json go to $OUT (figures.json also as gpu-YYYY-MM-DD.json, to commit under
# bench/results/); the summary is printed last. SUITE_PHASES picks phases ("tests bench server" by default;
# "compile-server" starts the server twice with CSM_COMPILE=1, cold then warm inductor cache: minutes).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-suite}
mkdir -p "$OUT"
phases=${SUITE_PHASES:-tests bench server}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/csm-inductor}  # shared by every phase
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 -c "import torch, transformers, csm; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')" | tee "$OUT/versions.txt"
start=$SECONDS

if [[ " $phases " == *" tests "* ]]; then
  timeout 90 python3 -m pytest -q -p no:cacheprovider -m "gpu and not slow" -n 3 tests > "$OUT/tests.log" 2>&1
  echo "tests exit $? after $((SECONDS - start)) s" >> "$OUT/tests.log"
  tail -2 "$OUT/tests.log"
fi
if [[ " $phases " == *" bench "* ]]; then
  timeout 240 python3 bench/bench_gpu.py --out "$OUT" --budget 210 > "$OUT/bench.log" 2>&1
  echo "bench exit $? after $((SECONDS - start)) s" >> "$OUT/bench.log"
  [ -f "$OUT/figures.json" ] && cp "$OUT/figures.json" "$OUT/gpu-$(date -u +%F).json"
fi
ckpt=/tmp/csm-1b-random
if [[ " $phases " == *" server "* || " $phases " == *" compile-server "* ]]; then
  [ -d $ckpt ] || timeout 60 python3 bench/bench_gpu.py --write-checkpoint $ckpt >> "$OUT/server.log" 2>&1
fi
if [[ " $phases " == *" server "* ]]; then
  echo "## graphs on (the default)" >> "$OUT/server.log"
  timeout 90 python3 bench/bench_soak.py --model $ckpt --requests 64 --clients 32 \
    --max-batch-size 32 --max-frames 50 --formats wav pcm >> "$OUT/server.log" 2>&1
  echo "server exit $? after $((SECONDS - start)) s" >> "$OUT/server.log"
fi
if [[ " $phases " == *" compile-server "* ]]; then
  for start_kind in cold warm; do
    echo "## CSM_COMPILE=1, $start_kind inductor cache" >> "$OUT/server.log"
    CSM_COMPILE=1 timeout 400 python3 bench/bench_soak.py --model $ckpt --requests 16 --clients 16 \
      --max-batch-size 16 --max-frames 50 --formats pcm --start-timeout 380 >> "$OUT/server.log" 2>&1
  done
fi
echo; echo "===== summary ($((SECONDS - start)) s) ====="
cat "$OUT/versions.txt"
grep -E "passed|failed|error|exit" "$OUT/tests.log" 2>/dev/null | tail -3
grep -E "^FAILED|^ERROR" "$OUT/tests.log" 2>/dev/null | head -20
grep -E "^\| [0-9]|^## |failure:|healthy|ready to generate|exit" "$OUT/server.log" 2>/dev/null
cat "$OUT/table.md" 2>/dev/null || tail -20 "$OUT/bench.log"
