#!/usr/bin/env bash
# Soak check of the multi-process code, kept out of CI (it takes about 20 minutes on 2 cores): the
# README's torchrun example and the multi-process tests, each many times in a row. A failure that
# shows once in ten runs (a rank aborting at exit, a hang) shows here; every run must exit 0.
#
#   bash bench/soak_distributed.sh                 # the example 30 times, tests/test_distributed.py 20 times
#   bash bench/soak_distributed.sh 5 2             # fewer: EXAMPLE_RUNS TEST_RUNS
#
# The log of each failed run is kept in a folder it names; the last lines are the counts.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

example_runs=${1:-30}
test_runs=${2:-20}
python=${PYTHON:-python}
logs=$(mktemp -d /tmp/metalearn-fast-soak.XXXXXX)

run_many() {  # name runs command...: counts the runs that exit 0, keeps the logs of the others
  local name=$1 runs=$2 passed=0 i
  shift 2
  for ((i = 1; i <= runs; i++)); do
    if timeout 600 "$@" >"$logs/$name-$i.log" 2>&1; then
      passed=$((passed + 1))
      rm -f "$logs/$name-$i.log"
    else
      echo "soak: $name run $i failed with status $? (log: $logs/$name-$i.log)" >&2
    fi
  done
  echo "$passed"
}

example_passed=$(run_many example "$example_runs" "$python" -m torch.distributed.run --nproc_per_node 2 \
  examples/distributed_sine.py)
tests_passed=$(run_many tests "$test_runs" "$python" -m pytest -q -p no:cacheprovider tests/test_distributed.py)

echo "soak: torchrun --nproc_per_node 2 examples/distributed_sine.py: $example_passed/$example_runs runs exited 0"
echo "soak: pytest tests/test_distributed.py: $tests_passed/$test_runs runs passed"
[ "$example_passed" -eq "$example_runs" ] && [ "$tests_passed" -eq "$test_runs" ] && rmdir "$logs" 2>/dev/null
[ "$example_passed" -eq "$example_runs" ] && [ "$tests_passed" -eq "$test_runs" ]
