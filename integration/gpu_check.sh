#!/usr/bin/env bash
# One prepared GPU run (device machine): the device-parametrised tests on CUDA and the
# benchmark with --device cuda. Pure-Python wheels the image lacks travel in .whl/
# (git-excluded; fetch them with the `pip download` line in README, "Performance", and
# pass carry: [".whl"] to the device tool). Outputs go to $OUT (or ./results/gpu).
set -uo pipefail
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the package from this checkout
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
export PYTHONUNBUFFERED=1
export KFOC_BACKPACK_SKIP_VERSION_CHECK=1  # the image has torch 2.11, outside the tested range
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, backpack, laplace; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"
timeout 150 python3 -m pytest tests -q -k "cuda" -p no:cacheprovider 2>&1 | tail -n 15 | tee "$OUT/tests.txt"
timeout 200 python3 integration/benchmark.py --device cuda --repeats 5 --out "$OUT" 2>&1 | grep -v Warning | tail -n 40 | tee "$OUT/benchmark.txt"
