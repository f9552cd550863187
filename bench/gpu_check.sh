#!/usr/bin/env bash
# GPU check, on a machine with an NVIDIA GPU and a CUDA build of torch already installed (no network
# needed): build metalearn_fast in place with its CUDA kernels, run the tests (they add CUDA cases
# when a GPU is visible), run the benchmark suites with --device cuda, and print the report last.
#
#   bash bench/gpu_check.sh            # the full suites
#   bash bench/gpu_check.sh --quick    # small workloads, fewer rounds; other pytest options pass through too
#
# Logs and results go to $OUT when it is set (else a new folder under /tmp): build.log, info.txt,
# tests.log, bench.log, gpu.json (pytest-benchmark's JSON) and report.md. The exit status is the
# first failing step's; the report is printed whenever the benchmarks wrote results.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

python=${PYTHON:-python}
out=${OUT:-$(mktemp -d /tmp/metalearn-fast-gpu-check.XXXXXX)}
mkdir -p "$out"
echo "gpu_check: logs in $out"

if ! "$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: torch sees no GPU here ($("$python" -c 'import torch; print(torch.__version__)' 2>&1)); nothing to check" >&2
  exit 1
fi
"$python" -c "import torch; print('gpu_check:', torch.cuda.get_device_name(0), 'torch', torch.__version__)"

status=0
fail() {  # remember the first failing step
  echo "gpu_check: $1 failed (see $out/$2)" >&2
  [ "$status" -ne 0 ] || status=$3
}

echo "gpu_check: building in place with the CUDA kernels (build.log)"
if ! METALEARN_FAST_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    "$python" -m pip install --no-build-isolation --no-deps -e . >"$out/build.log" 2>&1; then
  tail -n 40 "$out/build.log" >&2
  fail "the build" build.log 1
  exit "$status"
fi
# the CUDA kernels must be compiled and in use, or the numbers below would be the fallback's
if ! METALEARN_FAST_BACKEND=extension "$python" -c "
import metalearn_fast
info = metalearn_fast.backend_info()
for key, value in info.items():
    print(f'{key}: {value}')
assert info['compiled_cuda'], 'the CUDA kernels were not compiled'
" >"$out/info.txt" 2>&1; then
  cat "$out/info.txt" >&2
  fail "the backend check" info.txt 1
  exit "$status"
fi

echo "gpu_check: tests with CUDA (tests.log)"
METALEARN_FAST_BACKEND=extension "$python" -m pytest tests -x -q >"$out/tests.log" 2>&1 || fail "the tests" tests.log 1
tail -n 3 "$out/tests.log"

echo "gpu_check: benchmarks on the GPU (bench.log)"
rm -f "$out/gpu.json"
METALEARN_FAST_BACKEND=extension "$python" -m pytest bench/ --benchmark-only --device cuda \
  --benchmark-group-by=group --benchmark-quiet --benchmark-json="$out/gpu.json" -q -rs "$@" \
  >"$out/bench.log" 2>&1 || fail "the benchmarks" bench.log 1
tail -n 5 "$out/bench.log"

if [ -s "$out/gpu.json" ]; then
  if "$python" bench/report.py "$out/gpu.json" >"$out/report.md" 2>&1; then
    echo
    cat "$out/report.md"
  else
    cat "$out/report.md" >&2
    fail "the report" report.md 1
  fi
fi
exit "$status"
