#!/usr/bin/env bash
# The GPU training benchmark as one command for a lent GPU machine (docs/training.md).
#
#   bench/gpu_bench.sh wheels   # here, once: the packages the GPU machine lacks, as wheels in .whl/
#   bench/gpu_bench.sh run      # there (device tool: carry .whl): install them, then bench_train
#
# The GPU machine has its own torch and no network; what the pipeline needs beyond its image
# travels as wheels, at the versions of this checkout's .venv. Ray's wheel (79 MB) is repacked
# without its Java jar and the dashboard's web client, which no job here uses, so that the
# wheels and the working tree fit the tool's 64 MiB (49 MB of wheels). boto3 stays behind:
# tensorboardX only tries it, for its own S3 writer. Results go to $OUT (or ./gpu_bench_out).
# Device time: about 6 minutes for the two ViT-B/32 runs with the machine's start (estimated,
# not yet measured); add "b16" for ViT-B/16.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(ray open_clip_torch ftfy wcwidth tensorboardX colorful
        jsonschema jsonschema-specifications referencing rpds-py rfc3339-validator jsonpointer
        pydantic pydantic_core annotated-types typing-inspection)

case "${1:-}" in
wheels)
    grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
    mkdir -p .whl
    pins=()
    for name in "${WHEELS[@]}"; do
        pins+=("$(.venv/bin/pip freeze 2>/dev/null | grep -i "^${name//[-_]/[-_]}==" )")
    done
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux_2_24_x86_64 -d .whl "${pins[@]}"
    python3 - <<'PY'
import glob, zipfile, os
DROP = ("ray/jars/", "ray/dashboard/client/build/")
for path in glob.glob(".whl/ray-*.whl"):
    src = zipfile.ZipFile(path)
    out = path + ".tmp"
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if info.filename.startswith(DROP):
                continue
            data = src.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                data = b"\n".join(l for l in data.split(b"\n")
                                  if not l.decode().startswith(DROP))
            dst.writestr(info, data)
    os.replace(out, path)
PY
    du -sh .whl
    ;;
run)
    OUT="${OUT:-gpu_bench_out}"
    mkdir -p "$OUT"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD:$PWD/bench" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
    python3 -c "import torch, ray, open_clip; print('torch', torch.__version__, 'ray', ray.__version__, 'open_clip', open_clip.__version__)" | tee -a "$OUT/gpu.txt"
    # ViT-B/32 at 224 px from 256-px JPEGs, batch 256: eager, then compiled with a profile.
    export BENCH_TRAIN_GPU=1 BENCH_TRAIN_MODEL=ViT-B-32 BENCH_TRAIN_BATCH=256 \
        BENCH_TRAIN_IMAGE=256 BENCH_TRAIN_REPEATS=1
    python3 bench/bench_train.py 2>&1 | grep -v "^(\|WARNING" | tee "$OUT/vit_b32.txt"
    BENCH_TRAIN_COMPILE=1 BENCH_TRAIN_PROFILE="$OUT/vit_b32_profile" \
        python3 bench/bench_train.py 2>&1 | grep -v "^(\|WARNING" | tee "$OUT/vit_b32_compile.txt"
    if [ "${2:-}" = "b16" ]; then
        BENCH_TRAIN_MODEL=ViT-B-16 python3 bench/bench_train.py 2>&1 | grep -v "^(\|WARNING" \
            | tee "$OUT/vit_b16.txt"
    fi
    ;;
*)
    echo "usage: $0 wheels|run [b16]" >&2
    exit 2
    ;;
esac
