#!/usr/bin/env bash
# The GPU checks of issue 19 in one command: the `gpu` tests, then `onfh sim bench --only gpu`; one JSON
# (sim/bench/gpu_check.py says what is in it).
#
#   scripts/gpu_check.sh wheels          where pip can reach PyPI: download the two wheels the lent GPU
#                                        machines lack (MONAI, SimpleITK; for Python 3.12, x86-64) into
#                                        .whl/, which git ignores (.git/info/exclude)
#   scripts/gpu_check.sh [OUT] [ARGS]    on the GPU machine, from a checkout: install .whl/*.whl into
#                                        /tmp/site when present, then python3 -m sim.bench.gpu_check --out OUT ARGS
#                                        (OUT defaults to $OUT, else runs/gpu-check; ARGS e.g. --quick)
#
# With the device tool: run `scripts/gpu_check.sh wheels` here, then run with carry [".whl"] and the
# command `bash scripts/gpu_check.sh` and a timeout of about 540 s; gpu_check.json comes back in $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [[ "${1:-}" == wheels ]]; then
  exclude=$(git rev-parse --git-path info/exclude)
  grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
  "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl monai==1.6.1 SimpleITK==2.5.7
  exit 0
fi
out=${1:-${OUT:-runs/gpu-check}}
shift || true
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
exec "$PYTHON" -m sim.bench.gpu_check --out "$out" "$@"
