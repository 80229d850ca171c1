#!/usr/bin/env bash
# GPU checks for a session lent a device machine (one H100/H200; 15 min of device time in all, 10 min a call):
# build with CUDA, run the CUDA/Triton tests, take the GPU benchmarks. Files land in $OUT and come back.
#
#   here, once:  bash scripts/gpu_wheels.sh            # open_clip, ftfy, wcwidth, torchattacks for the device's Python
#   device:      run(command="bash scripts/gpu_check.sh build tests ops klgrad", carry=[".whl"], timeout_s=590)
#   then:        mkdir -p .gpubuild && cp <files_at>/_C*.so .gpubuild/   (the extensions built there come back in $OUT)
#                run(command="bash scripts/gpu_check.sh build steps", carry=[".whl", ".gpubuild"], timeout_s=...)
#
# Seen on an H200 (2026-11-27): a start took ~35 s, the build 86-91 s, the test files below ~580 tests on 12 xdist
# workers more than 140 s, the ops benchmarks 80 s at URDA_FAST_BENCH_SECONDS=0.5, one eager HPT step of the B-32/B-16
# pair 2 s. A machine goes back 30 s after a call, so a second call starts bare: `build` then installs the carried
# .gpubuild/ extensions (built against the device's own torch by the first call) instead of compiling again, if they
# import. Every phase has its own time limit (pytest is interrupted, not killed, so pytest-benchmark still writes the
# JSON of what finished): build.log, tests.log, bench_*.json / .log, report_*.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 MAX_JOBS="${MAX_JOBS:-16}" URDA_FAST_BUILD_CUDA=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" URDA_FAST_BENCH_SECONDS="${URDA_FAST_BENCH_SECONDS:-0.5}"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

bench() {  # bench NAME SECONDS FILES...
  local name=$1 seconds=$2
  shift 2
  timeout -s INT -k 30 "$seconds" python3 -m pytest "$@" -q -p no:cacheprovider --bench-size large \
    --benchmark-json="$OUT/bench_$name.json" >"$OUT/bench_$name.log" 2>&1
  echo "bench $name rc=$?" | tee -a "$OUT/bench_$name.log"
  grep "^|" "$OUT/bench_$name.log"
  if [ -s "$OUT/bench_$name.json" ]; then
    python3 bench/report.py report "$OUT/bench_$name.json" --out "/tmp/report_$name" >/dev/null 2>&1 \
      && cp "/tmp/report_$name/report.md" "$OUT/report_$name.md"
  fi
}

for phase in "$@"; do
  echo "== $phase $(date +%T)"
  case "$phase" in
    build)
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
      if [ -d .gpubuild ]; then cp .gpubuild/_C*.so urda_fast/; fi
      if ! python3 -c "import urda_fast._C, urda_fast._C_cuda" 2>/dev/null; then
        rm -f urda_fast/_C*.so
        start=$SECONDS
        timeout "${BUILD_SECONDS:-240}" python3 -m pip install -v -e . --no-build-isolation --no-deps >"$OUT/build.log" 2>&1
        echo "build rc=$? in $((SECONDS - start)) s" | tee -a "$OUT/build.log"
        grep -iE "error|warning: " "$OUT/build.log" | head -20
        cp urda_fast/_C*.so "$OUT/" 2>/dev/null
      fi
      python3 -c "import torch, urda_fast.ops as o; print(torch.__version__, o.available_backends())" \
        | tee -a "$OUT/device.txt" ;;
    tests)
      # every test file with a CUDA or Triton-on-GPU parameter, plus the step tests; xdist where the image has it
      timeout -s INT -k 30 "${TEST_SECONDS:-240}" python3 -m pytest -q -p no:cacheprovider -rfE --tb=short \
        -n "${TEST_WORKERS:-12}" ${TEST_FILES:-tests/test_kd_kl.py tests/test_pgd_step.py tests/test_feature_losses.py \
        tests/test_backends.py tests/test_max_pool.py tests/test_conv_input_grad.py tests/test_fast_conv.py \
        tests/test_attention_choice.py tests/test_attention.py tests/test_batch_norm.py tests/test_dart_step.py \
        tests/test_attacks.py tests/test_optim.py} >"$OUT/tests.log" 2>&1
      echo "tests rc=$?" | tee -a "$OUT/tests.log"
      grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -40
      tail -3 "$OUT/tests.log" ;;
    ops) bench ops "${OPS_SECONDS:-200}" bench/bench_kd_kl.py bench/bench_pgd_step.py bench/bench_feature_losses.py ;;
    # the CUDA KL with its gradients written in the forward (off by default until tests/test_kd_kl.py's
    # test_kd_kl_cuda_* pass on a GPU); compare its kd_kl full rows with the ops phase's
    klgrad) URDA_FAST_CUDA_KL_WITH_GRAD=1 bench klgrad "${KLGRAD_SECONDS:-90}" bench/bench_kd_kl.py -k full ;;
    # STEP_ARGS narrows it where time is short, e.g. STEP_ARGS='-k "resnet50 or b32 or 224"' for the paper-scale shapes;
    # add 'and not compile' to leave out ours_compile, whose ViT-B towers compile for minutes before the first round
    steps) eval bench steps "${STEP_SECONDS:-540}" bench/bench_dart_step.py bench/bench_hpt_step.py bench/bench_attacks.py \
             ${STEP_ARGS:-} ;;
    *) echo "unknown phase $phase (build, tests, ops, klgrad, steps)" >&2; exit 2 ;;
  esac
done
echo "== done $(date +%T)"
