#!/usr/bin/env bash
# One command for a lent GPU: the device, the test suite on the GPU, compute-sanitizer memcheck and
# racecheck over the kernel tests, then the full benchmark with --json and --plot.
#
#   bash scripts/gpu_check.sh            # from a checkout; nothing is installed
#
# Runs on the device image as it is (python3 with CuPy, PyTorch, pytest; no network), from the
# checkout with PYTHONPATH=. Writes under $OUT when set, else ./gpu_check_out/ (8 files:
# device.txt tests.log memcheck.log racecheck.log bench.log bench.json bench.png summary.txt).
# Every step has a time limit and the whole run stays within GPU_CHECK_BUDGET seconds (default
# 510, under 9 minutes); a step that fails or times out is recorded and the next one runs.
# The summary table is printed last. Exit status: 0 when no step failed.
set -u
cd "$(dirname "$0")/.."

OUTDIR=${OUT:-./gpu_check_out}
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-510}
mkdir -p "$OUTDIR"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
START=$(date +%s)

STEPS=() RESULTS=() SECONDS_TAKEN=() NOTES=()
record() {  # name status seconds note
    STEPS+=("$1") RESULTS+=("$2") SECONDS_TAKEN+=("$3") NOTES+=("$4")
    printf '== %-10s %-8s %4ss  %s\n' "$1" "$2" "$3" "$4"
}
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
limit() { local want=$1 l; l=$(( $(left) - ${2:-0} )); (( l < want )) && want=$l; echo $(( want > 0 ? want : 0 )); }

# run NAME LIMIT_S LOG CMD...: SIGINT at the limit (pytest and gpu-bench then report what they
# have), SIGKILL 15 s later. Sets RC and TOOK; with no time left, records the step as skipped and
# returns 1.
run() {
    local name=$1 lim=$2 log=$3; shift 3
    local t0; t0=$(date +%s)
    echo "== $name (limit ${lim}s): $*"
    if (( lim <= 0 )); then  # `timeout 0` would mean no limit at all
        echo "no time left in the budget (GPU_CHECK_BUDGET=$BUDGET)" | tee "$log"
        record "$name" SKIPPED 0 "no time left in the budget"
        return 1
    fi
    timeout -s INT -k 15 "$lim" "$@" >"$log" 2>&1
    RC=$?
    TOOK=$(( $(date +%s) - t0 ))
    tail -n 5 "$log"
}

# ---- 1. device ------------------------------------------------------------------------------
{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (modified)')"
    nvidia-smi || echo "nvidia-smi: not available"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv 2>/dev/null
    command -v nvcc >/dev/null && nvcc --version | tail -n 2
    "$PY" -c 'import sys, numpy; print("python", sys.version.split()[0], "numpy", numpy.__version__)'
    for mod in cupy torch hypothesis; do
        "$PY" -c "import $mod; print('$mod', $mod.__version__)" 2>/dev/null || echo "$mod: not importable"
    done
    "$PY" -m gpu
} >"$OUTDIR/device.txt" 2>&1
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
if [ -n "$GPU_NAME" ]; then record device ok 0 "$GPU_NAME"; else record device FAIL 0 "nvidia-smi found no GPU"; fi
cat "$OUTDIR/device.txt"

# ---- 2. test suite on the GPU -----------------------------------------------------------------
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rfE)
NOTE_HYP=""
if ! "$PY" -c "import hypothesis" 2>/dev/null; then
    # property-test modules cannot be collected: run every other test
    PYTEST+=(--continue-on-collection-errors)
    NOTE_HYP="hypothesis missing: property tests not run; "
fi
pytest_result() {  # name log: the status from the rc and pytest's last line
    local last; last=$(grep -E '(passed|failed|error|skipped|no tests ran)' "$2" | tail -n 1)
    case $RC in
        0) record "$1" ok "$TOOK" "$NOTE_HYP$last" ;;
        5) record "$1" SKIPPED "$TOOK" "no tests selected" ;;
        124|130|137) record "$1" TIMEOUT "$TOOK" "limit reached; $last" ;;
        *) record "$1" FAIL "$TOOK" "$NOTE_HYP${last:-rc $RC}" ;;
    esac
}
# limits: each step leaves room for the ones after it (the benchmark keeps at least ~180 s)
run tests "$(limit 150 300)" "$OUTDIR/tests.log" "${PYTEST[@]}" tests/ &&
    pytest_result tests "$OUTDIR/tests.log"

# ---- 3. compute-sanitizer over the kernel tests (marker gpu) ----------------------------------
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
for tool in memcheck racecheck; do
    log="$OUTDIR/$tool.log"
    if [ "$tool" = memcheck ]; then lim=$(limit 90 250); else lim=$(limit 75 200); fi
    if [ -z "$SAN" ]; then
        echo "compute-sanitizer not found" >"$log"
        record "$tool" SKIPPED 0 "compute-sanitizer not found"
        continue
    fi
    # API errors are off: CuPy and PyTorch probe the driver with calls that may fail by design.
    run "$tool" "$lim" "$log" "$SAN" --tool "$tool" --report-api-errors no --error-exitcode 3 \
        "${PYTEST[@]}" -x -m gpu tests/ || continue
    summary=$(grep -E '(ERROR|RACECHECK) SUMMARY' "$log" | tail -n 1 | sed 's/^=* *//')
    if [ "$RC" = 124 ] || [ "$RC" = 130 ] || [ "$RC" = 137 ]; then
        record "$tool" TIMEOUT "$TOOK" "limit reached (${summary:-no summary})"
    elif [ -z "$summary" ] && [ "$RC" != 0 ] && [ "$RC" != 5 ]; then
        # the sanitizer never reached the end of the program: it could not start on this device
        record "$tool" SKIPPED "$TOOK" "did not run: $(grep -m 1 -iE 'error|not supported' "$log" | cut -c1-100)"
    elif [ "$RC" = 5 ]; then
        record "$tool" SKIPPED "$TOOK" "no gpu-marked tests"
    elif [ "$RC" = 0 ]; then
        record "$tool" ok "$TOOK" "$summary"
    elif [ "$RC" = 3 ]; then
        record "$tool" FAIL "$TOOK" "$summary"
    else
        record "$tool" FAIL "$TOOK" "tests failed under the sanitizer; $summary"
    fi
done

# ---- 4. the full benchmark --------------------------------------------------------------------
BENCH_LIMIT=$(limit 600 20)
# gpu-bench skips the rows that would start after --time-limit; the step limit is the backstop
if run bench "$BENCH_LIMIT" "$OUTDIR/bench.log" "$PY" -m gpu.bench --device gpu \
    --time-limit $(( BENCH_LIMIT > 60 ? BENCH_LIMIT - 45 : BENCH_LIMIT / 2 )) \
    --json "$OUTDIR/bench.json" --plot "$OUTDIR/bench.png"; then
    last=$(tail -n 1 "$OUTDIR/bench.log")
    case $RC in
        0) record bench ok "$TOOK" "$last" ;;
        124|130|137) record bench TIMEOUT "$TOOK" "$last" ;;
        *) record bench FAIL "$TOOK" "rc $RC: $last" ;;
    esac
fi

# ---- summary ----------------------------------------------------------------------------------
{
    echo
    echo "gpu_check summary ($(date -u +%Y-%m-%dT%H:%M:%SZ), $(( $(date +%s) - START )) s, ${GPU_NAME:-no GPU})"
    printf '%-10s %-8s %6s  %s\n' step status seconds note
    for i in "${!STEPS[@]}"; do
        printf '%-10s %-8s %6s  %s\n' "${STEPS[$i]}" "${RESULTS[$i]}" "${SECONDS_TAKEN[$i]}" "${NOTES[$i]:0:110}"
    done
    if [ -s "$OUTDIR/bench.json" ]; then
        "$PY" - "$OUTDIR/bench.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
d = r["device"]
print(f"\nheadline: {d['name']}, copy {d['copy_gbps'] or 0:.0f} GB/s measured, spec {d['spec_gbps'] or '-'} GB/s")
print(f"{'op':<28} {'largest case':<26} {'ours GB/s':>9} {'%copy':>6} {'vs best':>8}")
for op in dict.fromkeys(x["op"] for x in r["rows"]):
    ours = [x for x in r["rows"] if x["op"] == op and x["peer"] == "ours" and x["dtype"] == "float32"]
    if not ours:
        continue
    big = max(ours, key=lambda x: x["bytes"])
    case = " ".join(filter(None, ("x".join(map(str, big["shape"])), big["layout"])))
    if big["status"] != "ok":
        print(f"{op:<28} {case:<26} {big['status']}: {big['detail'][:60]}")
        continue
    vs = f"{big['speedup']:.2f}x" if big["speedup"] else "-"
    print(f"{op:<28} {case:<26} {big['gbps']:>9.0f} {big['pct_copy']:>6.0f} {vs:>8}")
bad = [x for x in r["rows"] if x["status"] in ("WRONG", "error")]
print(f"{len(r['rows'])} rows, {sum(x['status'] == 'ok' for x in r['rows'])} ok, "
      f"{sum(x['status'] == 'WRONG' for x in r['rows'])} WRONG, {sum(x['status'] == 'error' for x in r['rows'])} error, "
      f"{sum(x['status'] == 'skipped' for x in r['rows'])} skipped" + (" (interrupted)" if r["interrupted"] else ""))
EOF
    fi
} | tee "$OUTDIR/summary.txt"

for s in "${RESULTS[@]}"; do
    case $s in FAIL|TIMEOUT) exit 1 ;; esac
done
exit 0
