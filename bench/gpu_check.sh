#!/usr/bin/env bash
# The one command for a bare GPU machine (Python 3.12 with torch, no network, no Megatron-Core):
# install the carried wheels that bench/gpu_wheels.sh downloaded, then run bench/gpu_check.py, whose
# JSON, markdown and logs land in $OUT (bench/results when unset). Arguments go to gpu_check.py.
#
#   bash bench/gpu_check.sh            # part 1: engine vs bare Megatron-Core, MFU, memory (about 4-5 minutes)
#                                      # part 2: every tiny-recipe stage on the GPU (bench/gpu_stages.py, ~2 min)
#   bash bench/gpu_check.sh --fp8      # also Transformer Engine bf16 vs FP8, if TE is importable
#   PARTS=2 bash bench/gpu_check.sh    # only part 2 (PARTS=1: only part 1)
#
# The engine declares Python <3.12, so it is not pip-installed there: the checkout comes first on
# PYTHONPATH and the engine wheel in .gpu_wheels only contributes its entry points (the built-in
# plugins). A Transformer Engine assembled earlier on the same machine is picked up from $TE_SITE.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
PY=${PYTHON:-python3}
SITE=/tmp/gpu_check_site
began=$(date +%s)
mkdir -p "$OUT"
$PY -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
    --ignore-requires-python --upgrade --target "$SITE" .gpu_wheels/*.whl || exit 1
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -d "${TE_SITE:-/root/te_site}" ]; then export PYTHONPATH="${TE_SITE:-/root/te_site}:$PYTHONPATH"; fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv || true
rc=0
if [ "${PARTS:-12}" != 2 ]; then
    $PY bench/gpu_check.py --out "$OUT" --keep-logs --timeout "${RUN_TIMEOUT:-210}" "$@" || rc=$?
    echo "[gpu_check.sh] part 1 exit $rc after $(( $(date +%s) - began )) s"
fi
if [ "${PARTS:-12}" != 1 ]; then
    $PY bench/gpu_stages.py --out "$OUT" --keep-logs --timeout "${STAGE_TIMEOUT:-100}" || rc=$((rc | $?))
    echo "[gpu_check.sh] part 2 done after $(( $(date +%s) - began )) s"
fi
echo "[gpu_check.sh] exit $rc after $(( $(date +%s) - began )) s"
exit $rc
