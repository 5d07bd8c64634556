#!/usr/bin/env bash
# Run HERE, before a device session: puts what bench/gpu_run.sh needs into .gpu/ (ignored by git),
# because the device machine has no network:
#   .gpu/whl   wheels for its Python 3.12 (it has torch 2.11 + CUDA, transformers 5.17, huggingface_hub 1.33):
#              our pins of transformers and tokenizers, and the store codec blosc2 with the two
#              dependencies it lacks (ndindex, numexpr); everything else is already there
#   .gpu/data  the COCO photos and the POPE subset: those of a data folder you name with
#              SMOLATTN_DATA (images/coco_val2014 + pope/pope_subset.jsonl), else the 3 shipped in samples/ (2 MB)
# Then, with the device tool:  run(command="bash bench/gpu_run.sh", carry=[".gpu"], timeout_s=480)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DATA=${SMOLATTN_DATA:-}
if [ -n "$DATA" ] && [ -d "$DATA/images/coco_val2014" ]; then IMAGES=$DATA/images/coco_val2014 POPE=$DATA/pope/pope_subset.jsonl
else IMAGES=samples/coco_val2014 POPE=samples/pope/pope_subset.jsonl; echo "note: no SMOLATTN_DATA folder: using the photos in samples/"; fi
PYVER=${GPU_PYTHON_VERSION:-3.12}
WHL=${GPU_WHEELS:-.gpu/whl}
mkdir -p "$WHL" .gpu/data/pope
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version "$PYVER" \
  --implementation cp "${platforms[@]}" -d "$WHL" \
  transformers==5.24.0 tokenizers==0.23.3 blosc2==4.14.1 ndindex==1.10.1 numexpr==2.14.2
mkdir -p .gpu/data/images/coco_val2014 && cp "$IMAGES"/*.jpg .gpu/data/images/coco_val2014/
cp "$POPE" .gpu/data/pope/pope_subset.jsonl
ls "$WHL"
du -sh .gpu
