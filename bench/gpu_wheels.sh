#!/usr/bin/env bash
# Download the cp312 wheels the engine's pretrain worker needs on a GPU machine that has Python 3.12
# and torch (with numpy, PyYAML, psutil, tqdm, rich, packaging, setuptools) but no network, no
# Megatron-Core and no pydantic/omegaconf. The folder is copied to that machine with the checkout, and
# bench/gpu_check.sh installs it with `pip install --no-index`. Versions are this repo's .venv pins;
# about 5.6 MB in all.
#
#   bash bench/gpu_wheels.sh [DEST]        # DEST defaults to .gpu_wheels (ignored by git)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.gpu_wheels}
PIP=${PIP:-.venv/bin/python -m pip}
mkdir -p "$DEST" && rm -f "$DEST"/*.whl  # one version of each: two stop the install
# pip matches each manylinux tag exactly, so name every one a wheel might carry.
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux1_x86_64)
args=(download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12
      --implementation cp --abi cp312 --abi abi3 --abi none -d "$DEST")
for p in "${PLATFORMS[@]}"; do args+=(--platform "$p"); done
$PIP "${args[@]}" \
    megatron-core==0.16.1 \
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    typing-extensions==4.16.0 \
    omegaconf==2.4.0 \
    tokenizers==0.23.3 webdataset==1.0.2 braceexpand==0.1.7   # the data stage of part 2 (gpu_stages.py)
# The engine itself, for its entry points (the built-in data sources and rewards): the device runs
# the checkout's code first on PYTHONPATH, so only this metadata has to match the tree.
had_build=$([ -e build ] && echo 1 || true)
PYTHONWARNINGS=ignore $PIP wheel --quiet --disable-pip-version-check --no-deps --no-build-isolation -w "$DEST" .
[ -n "$had_build" ] || rm -rf build  # setuptools' scratch folder, when this script made it
ls -l "$DEST"
du -ch "$DEST"/*.whl | tail -1
