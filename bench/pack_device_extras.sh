#!/usr/bin/env bash
# Run HERE (a machine with pip and PyPI): wheels the GPU round may need on the GPU machine, which
# has Python 3.12 (/opt/torch/.venv) and no registry, into .device/extras/ (git-ignored), listed
# with their module in .device/extras/MODULES. bench/gpu_round.sh installs each one only where
# its module does not import there.
#
#   bench/pack_device_extras.sh        # ~1.8 MB; re-running keeps the wheels already there
#
# pytest and its needs: the image has none of pytest, pluggy, iniconfig (packaging likely, as a
# transformers dependency; pygments maybe). Wheels already in .device/rt/pytest_whl/
# are reused when present. What sparkinfer imports beside numpy (tokenizers, jinja2, tqdm, pyyaml
# for gguf) is in the image (its `pip list`: tokenizers, transformers, torch): not packed,
# to keep the carried tree small; the round names any module that is missing. The server's
# stack (fastapi, uvicorn, pydantic) is packed: the image lacks uvicorn.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
mkdir -p .device/extras  # .gitignore keeps /.device/ out of git

# import name = pip requirement (one version each: two of one package stop the install there)
wheels=(
  "pytest=pytest==9.2.0" "pluggy=pluggy==1.7.0" "iniconfig=iniconfig==2.3.1"
  "packaging=packaging==26.4" "pygments=pygments==2.21.0"
  # sparkinfer serve (bench/server_smoke.py): the image has no uvicorn (seen 2026-11-27)
  "uvicorn=uvicorn==0.54.0" "h11=h11==0.16.0" "click=click==8.5.1"
  "fastapi=fastapi==0.165.0" "starlette=starlette==1.10.0" "anyio=anyio==4.16.0" "idna=idna==3.20"
  "sniffio=sniffio==1.3.1" "annotated_doc=annotated-doc==0.0.7" "opentelemetry=opentelemetry-api==1.45.2"
  "pydantic=pydantic==2.13.4" "pydantic_core=pydantic_core==2.46.4" "annotated_types=annotated-types==0.7.0"
  "typing_inspection=typing-inspection==0.4.2"
)
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
: > .device/extras/MODULES
for entry in "${wheels[@]}"; do
  module=${entry%%=*} req=${entry#*=}
  dist=${req%%=*}
  pattern=$(echo "$dist" | tr '[:upper:]-' '[:lower:]_')
  have=$(ls .device/extras/ 2>/dev/null | grep -i "^${pattern}-.*\.whl$" | head -1 || true)
  if [ -z "$have" ]; then
    reuse=$(ls .device/rt/pytest_whl/ 2>/dev/null | grep -i "^${pattern}-.*\.whl$" | head -1 || true)
    if [ -n "$reuse" ]; then
      cp ".device/rt/pytest_whl/$reuse" .device/extras/
      have=$reuse
    else
      python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
          "${plat[@]}" -d .device/extras "$req" 2>&1 | grep -v "is ignored: it is neither" || true
      have=$(ls .device/extras/ | grep -i "^${pattern}-.*\.whl$" | head -1)
    fi
  fi
  echo "$module $have" >> .device/extras/MODULES
done
# Wheels packed before and no longer listed
for f in .device/extras/*.whl; do
  grep -q " $(basename "$f")$" .device/extras/MODULES || rm -f "$f"
done
cat .device/extras/MODULES
du -sh .device/extras
