#!/usr/bin/env bash
# Everything a lent GPU machine should prove and measure, in one call of about 9 minutes:
#
#   bash bench/gpu_wheels.sh                                   # here, first: wheels the image lacks -> .whl/
#   run(command="bash bench/gpu_suite.sh", carry=[".whl"], timeout_s=600)    # the device tool
#
# 1. the test suite on CUDA (CUDA-only tests run; server and CLI tests put the model on the GPU);
# 2. bench/bench_gpu.py: graphed/compiled codes == eager, ms/frame against the reference (eager and static
#    cache + compile), first audio chunk, batch 1/4/16/64, codec streaming decode;
# 3. the server under 32 clients on a csm-1b size checkpoint, CUDA graphs on, then off.
# Logs and tables go to $OUT; the summary is printed last. SUITE_PHASES="tests bench server" picks phases.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-suite}
mkdir -p "$OUT"
phases=${SUITE_PHASES:-tests bench server}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 -c "import torch, transformers, csm; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')" | tee "$OUT/versions.txt"

if [[ " $phases " == *" tests "* ]]; then
  # xdist is in the image; the slow compile test runs too (it is the compiled path's proof on CUDA)
  timeout 210 python3 -m pytest -q -p no:cacheprovider -m "slow or not slow" -n 8 tests > "$OUT/tests.log" 2>&1
  echo "tests exit $?" >> "$OUT/tests.log"
  grep -E "passed|failed|error" "$OUT/tests.log" | tail -3
fi
if [[ " $phases " == *" bench "* ]]; then
  timeout 300 python3 bench/bench_gpu.py --out "$OUT" --budget 270 > "$OUT/bench.log" 2>&1
  echo "bench exit $?" >> "$OUT/bench.log"
fi
if [[ " $phases " == *" server "* ]]; then
  ckpt=/tmp/csm-1b-random
  timeout 60 python3 bench/bench_gpu.py --write-checkpoint $ckpt >> "$OUT/server.log" 2>&1
  for graph in 1 0; do
    echo "## CSM_CUDA_GRAPH=$graph" >> "$OUT/server.log"
    CSM_CUDA_GRAPH=$graph timeout 80 python3 bench/bench_soak.py --model $ckpt --requests 96 --clients 32 \
      --max-batch-size 32 --max-frames 50 --formats wav pcm >> "$OUT/server.log" 2>&1
  done
fi
echo; echo "===== summary ====="
cat "$OUT/versions.txt"
grep -E "passed|failed|error|exit" "$OUT/tests.log" 2>/dev/null | tail -3
grep -E "^FAILED|^ERROR" "$OUT/tests.log" 2>/dev/null | head -20
grep -E "^\| [0-9]|^## |failure:" "$OUT/server.log" 2>/dev/null
cat "$OUT/table.md" 2>/dev/null || tail -20 "$OUT/bench.log"
