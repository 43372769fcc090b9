#!/usr/bin/env bash
# One command for a lent GPU, sized for a short loan: the device, every kernel module compiled in
# parallel, the GPU-marked kernel tests, compute-sanitizer memcheck over a short selection of them,
# NCCL on 2+ GPUs, the benchmark's headline shapes, then the proof that nothing compiled inside a
# timed step.
#
#   bash scripts/gpu_check.sh OUTDIR            # on the GPU; OUTDIR defaults to $OUT, else ./gpu_check_out
#   bash scripts/gpu_check.sh OUTDIR --dry-run  # the same flow on the CPU: emulated kernels, tiny shapes
#
# Runs on the device image as it is (python3 with CuPy, PyTorch, pytest; no network; $PYTHON to
# use another interpreter), from the checkout with PYTHONPATH=. Every step writes its log into
# OUTDIR as it runs (device.txt deps.txt compile.log tests.log memcheck.log nccl.log bench.log
# bench.jsonl bench.json modules.jsonl modules.log), and summary.txt is rewritten after every step, so a run
# killed at any moment leaves a summary of the steps done and every benchmark row finished
# (bench.jsonl: one JSON object a line). A dependency missing on the image (a Python module,
# pytest-xdist, g++, compute-sanitizer) makes its step SKIPPED with the name, never FAIL.
# The summary is printed at the end, also on INT/TERM. Exit status: 0 when no step failed or
# timed out, 2 for a bad command line.
#
# The budget: the whole run stays within GPU_CHECK_BUDGET seconds (default 240). A step's limit
# is min(its own, what is left minus what the steps after it reserve):
#   device + deps     ~10-20 s  nvidia-smi, `python -m gpu`, one interpreter importing the deps
#   compile           <= 25 s   reserve 195: every module (`python -m gpu.bench.precompile list`:
#                               32 now, 28 of them the library's), one process each, GPU_CHECK_JOBS
#                               at a time (default: the cores, 16 on the lent machine). NVRTC 12
#                               for sm_90 on a 2-core VM takes 2.0 s (softmax CE_PLAIN) to 10.7 s
#                               (softmax) a module; in parallel the step is the slowest module
#                               plus an import of CuPy: ~12 s
#   tests             <= 90 s   reserve 120: ~1,034 GPU-marked tests on 4 xdist workers, torch
#                               imported, every module loaded from CuPy's cache (none compiled)
#   memcheck          <= 45 s   reserve 75: serial, under compute-sanitizer
#   nccl              <= 45 s   reserve 75: vocabulary-parallel CE through gpu.torch over 2 GPUs
#                               (NCCL); SKIPPED at once with fewer GPUs (the lent machines have one)
#   bench             the rest  >= 67 s once the steps before took their limits (150 at most,
#                               8 s kept for the modules step); gpu-bench stops starting rows
#                               20 s before its limit
#   modules           ~2 s      the modules every step built (GPU_KERNEL_MODULE_LOG), each of
#                               which must be in the compile list: FAIL names any that is not
# With every step at its limit: 20 + 25 + 90 + 45 + 67 + 8 = 255 > 240, so a slow start or compile
# shortens the tests (their limit is what is left minus 120), never the steps after them.
# --dry-run resolves every listed module without compiling (the tests build what they use on the
# emulator), and its modules step proves the list covers every module its tests and benchmark built.
set -u

usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; }
DRY=0 OUTDIR=""
for arg in "$@"; do
    case $arg in
        --dry-run) DRY=1 ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "gpu_check: unknown option $arg" >&2; usage >&2; exit 2 ;;
        *) [ -z "$OUTDIR" ] || { echo "gpu_check: one output folder, got $OUTDIR and $arg" >&2; exit 2; }
           OUTDIR=$arg ;;
    esac
done
OUTDIR=${OUTDIR:-${OUT:-./gpu_check_out}}
mkdir -p "$OUTDIR" && OUTDIR=$(cd "$OUTDIR" && pwd) || { echo "gpu_check: cannot make $OUTDIR" >&2; exit 2; }
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-240}
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if (( DRY )); then export GPU_BACKEND=emulate; fi
START=$(date +%s)
rm -f "$OUTDIR"/{device.txt,deps.txt,compile.log,tests.log,memcheck.log,nccl.log,bench.log,bench.jsonl,bench.json,modules.jsonl,modules.log,summary.txt}
# every module any step builds (either backend) is appended here, one JSON line (gpu/_kernels.py)
export GPU_KERNEL_MODULE_LOG="$OUTDIR/modules.jsonl"

# The kernel test files; the GPU-marked tests among them skip without a GPU.
KERNEL_TESTS=(tests/test_batch_norm_kernels.py tests/test_softmax_kernels.py tests/test_gpu_paths.py
              tests/test_batch_norm.py tests/test_softmax.py tests/test_numerics_batch_norm.py
              tests/test_numerics_softmax.py tests/test_ce_zloss_softcap.py tests/test_linear_cross_entropy.py
              tests/test_cuda_graph.py tests/test_emulator.py tests/test_torch_interop.py tests/test_torch_flce.py
              tests/test_batch_norm_epilogue.py tests/test_batch_norm_epilogue_kernels.py)
# memcheck: every batch-norm path in float32, and every softmax/CE and batch-norm path forced at
# small sizes (GPU_PATHS_SMALL=1), on the GPU (serial)
MEMCHECK_K="test_paths_float32 or test_softmax_and_cross_entropy_paths or test_batch_norm_paths"
MEMCHECK_TESTS=(tests/test_batch_norm_kernels.py tests/test_gpu_paths.py)
# --dry-run: the same files' kernel tests on the emulator, a selection that takes seconds
DRY_K="test_paths_float32 or test_ce_paths or test_row_softmax or test_block_sum or test_batch_stats"

STEPS=() RESULTS=() SECONDS_TAKEN=() NOTES=()
CURRENT="" CHILD="" RC=0 TOOK=0 GPU_NAME="" STEP_T0=$START

# ---- the summary: rewritten after every step; the benchmark's headline from bench.jsonl ----------
write_summary() {
    {
        echo "gpu_check summary ($(date -u +%Y-%m-%dT%H:%M:%SZ), $(( $(date +%s) - START )) s of" \
             "${BUDGET} s, ${GPU_NAME:-no GPU}$( (( DRY )) && echo ', dry run on the CPU'))"
        printf '%-9s %-11s %6s  %s\n' step status seconds note
        for i in "${!STEPS[@]}"; do
            printf '%-9s %-11s %6s  %s\n' "${STEPS[$i]}" "${RESULTS[$i]}" "${SECONDS_TAKEN[$i]}" "${NOTES[$i]:0:140}"
        done
        [ -n "$CURRENT" ] && echo "(running: $CURRENT)"
        if [ -s "$OUTDIR/bench.jsonl" ]; then
            "$PY" - "$OUTDIR/bench.jsonl" <<'EOF' 2>&1
import json, sys
run, rows, end = None, [], None
for line in open(sys.argv[1]):
    try:
        rec = json.loads(line)
    except ValueError:      # the last line of a run killed while writing it
        continue
    kind = rec.get("record")
    run = rec if kind == "run" else run
    end = rec if kind == "end" else end
    if kind == "row":
        rows.append(rec)
d = run["device"] if run else {}
print(f"\nheadline: {d.get('name', '?')}, copy {d.get('copy_gbps') or 0:.0f} GB/s measured, "
      f"spec {d.get('spec_gbps') or '-'} GB/s")
print(f"{'op':<28} {'largest case':<26} {'ours GB/s':>9} {'%copy':>6} {'vs best':>8}")
for op in dict.fromkeys(x["op"] for x in rows):
    ours = [x for x in rows if x["op"] == op and x["peer"] == "ours" and x["dtype"] == "float32"]
    if not ours:
        continue
    big = max(ours, key=lambda x: x["bytes"])
    case = " ".join(filter(None, ("x".join(map(str, big["shape"])), big["layout"])))
    if big["status"] != "ok":
        print(f"{op:<28} {case:<26} {big['status']}: {big['detail'][:60]}")
        continue
    vs = f"{big['speedup']:.2f}x" if big["speedup"] else "-"
    print(f"{op:<28} {case:<26} {big['gbps']:>9.0f} {big['pct_copy'] or 0:>6.0f} {vs:>8}")
count = lambda s: sum(x["status"] == s for x in rows)
state = "the run was cut off" if end is None else "interrupted" if end["interrupted"] else "complete"
print(f"{len(rows)} rows, {count('ok')} ok, {count('WRONG')} WRONG, {count('error')} error, "
      f"{count('skipped')} skipped ({state})")
EOF
        fi
    } >"$OUTDIR/summary.txt.new" && mv -f "$OUTDIR/summary.txt.new" "$OUTDIR/summary.txt"
}

record() {  # name status seconds note
    STEPS+=("$1") RESULTS+=("$2") SECONDS_TAKEN+=("$3") NOTES+=("$4")
    CURRENT=""
    printf '== %-9s %-11s %4ss  %s\n' "$1" "$2" "$3" "$4"
    write_summary
}
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
limit() { local want=$1 l; l=$(( $(left) - ${2:-0} )); (( l < want )) && want=$l; echo $(( want > 0 ? want : 0 )); }

on_signal() {  # INT/TERM: stop the step (SIGINT, so pytest and gpu-bench report what they have)
    echo "gpu_check: got SIG$1; stopping ${CURRENT:-the run}" >&2
    trap '' INT TERM
    if [ -n "$CHILD" ]; then
        kill -INT "$CHILD" 2>/dev/null
        for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$CHILD" 2>/dev/null || break; sleep 1; done
        kill -KILL "$CHILD" 2>/dev/null
    fi
    [ -n "$CURRENT" ] && record "$CURRENT" INTERRUPTED $(( $(date +%s) - STEP_T0 )) "gpu_check got SIG$1"
    if [ "$1" = INT ]; then exit 130; else exit 143; fi
}
finish() { write_summary; echo; cat "$OUTDIR/summary.txt"; }
trap 'on_signal INT' INT
trap 'on_signal TERM' TERM
trap finish EXIT

# run NAME LIMIT_S LOG CMD...: SIGINT at the limit, SIGKILL 10 s later; the log is written as the
# step runs. In the background, so that a signal to this script is handled at once. Sets RC and
# TOOK; with no time left, records the step as SKIPPED and returns 1.
run() {
    local name=$1 lim=$2 log=$3; shift 3
    STEP_T0=$(date +%s) CURRENT=$name
    echo "== $name (limit ${lim}s): $*"
    if (( lim <= 0 )); then  # `timeout 0` would mean no limit at all
        echo "no time left in the budget (GPU_CHECK_BUDGET=$BUDGET)" >"$log"
        record "$name" SKIPPED 0 "no time left in the budget"
        return 1
    fi
    write_summary
    echo "\$ $*" >"$log"
    timeout -s INT -k 10 "$lim" "$@" >>"$log" 2>&1 &
    CHILD=$!
    wait "$CHILD"
    RC=$? CHILD=""
    TOOK=$(( $(date +%s) - STEP_T0 ))
    tail -n 3 "$log"
}
skip() {  # name log reason: a step that cannot run here
    CURRENT=$1
    echo "$3" >"$2"
    record "$1" SKIPPED 0 "$3"
}
timed_out() { case $RC in 124|130|137) return 0 ;; *) return 1 ;; esac; }

# ---- 1. device ---------------------------------------------------------------------------------
CURRENT=device
{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (modified)')"
    if (( DRY )); then echo "dry run: GPU_BACKEND=emulate, no GPU used"; fi
    timeout 20 nvidia-smi || echo "nvidia-smi: not available"
    timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv 2>/dev/null
    command -v nvcc >/dev/null && nvcc --version | tail -n 2
    "$PY" -c 'import sys, numpy; print("python", sys.version.split()[0], "numpy", numpy.__version__)'
    timeout 60 "$PY" -m gpu
} >"$OUTDIR/device.txt" 2>&1
if (( DRY )); then
    record device ok $(( $(date +%s) - START )) "dry run: emulated kernels on the CPU"
else
    GPU_NAME=$(timeout 20 nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
    if [ -n "$GPU_NAME" ]; then record device ok $(( $(date +%s) - START )) "$GPU_NAME"
    else record device FAIL $(( $(date +%s) - START )) "nvidia-smi found no GPU"; fi
fi

# ---- 2. what the image has: missing optional pieces are named here and skipped later ------------
CURRENT=deps STEP_T0=$(date +%s)
MISSING=()
{
    # one interpreter imports them all: "name: version", or "name: not importable (why)"
    mods=$(timeout 40 "$PY" - numpy pytest xdist cupy torch hypothesis tqdm sklearn mlxtend ml_dtypes matplotlib <<'EOF'
import importlib, sys
for name in sys.argv[1:]:
    try:
        print(f"{name}: {getattr(importlib.import_module(name), '__version__', 'present')}")
    except Exception as e:
        print(f"{name}: not importable ({type(e).__name__}: {e})")
EOF
)
    echo "$mods"
    for mod in numpy pytest xdist cupy torch hypothesis tqdm sklearn mlxtend ml_dtypes matplotlib; do
        grep -q "^$mod: not importable" <<<"$mods" && MISSING+=("$mod")
        grep -q "^$mod: " <<<"$mods" || MISSING+=("$mod")
    done
    SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
    for cmd in g++ nvcc compute-sanitizer; do
        path=$(command -v "$cmd"); [ "$cmd" = compute-sanitizer ] && path=$SAN
        if [ -n "$path" ]; then echo "$cmd: $path"; else echo "$cmd: not found"; MISSING+=("$cmd"); fi
    done
} >"$OUTDIR/deps.txt" 2>&1
record deps ok 0 "${MISSING:+missing (skipped where needed): ${MISSING[*]}}"
missing() { [[ " ${MISSING[*]} " == *" $1 "* ]]; }

# ---- 3. every module compiled ahead, one process each (CuPy's kernel cache); dry: resolved only ---
LOG="$OUTDIR/compile.log"
JOBS=${GPU_CHECK_JOBS:-$(nproc 2>/dev/null || echo 4)}
if (( DRY )); then
    COMPILE=("$PY" -m gpu.bench.precompile build --all --dry-run)
else
    COMPILE=("$PY" -m gpu.bench.precompile build --all --jobs "$JOBS")
fi
if (( ! DRY )) && missing cupy; then
    skip compile "$LOG" "cupy not importable: nothing to compile into"
elif run compile "$(limit 25 195)" "$LOG" "${COMPILE[@]}"; then
    last=$(tail -n 1 "$LOG")
    if timed_out; then record compile TIMEOUT "$TOOK" "limit reached; $(grep -c ': compiled' "$LOG") compiled"
    elif [ "$RC" = 0 ]; then record compile ok "$TOOK" "$last"
    else record compile FAIL "$TOOK" "rc $RC: $last"
    fi
fi

# ---- 4. the kernel tests: GPU-marked on the GPU; in a dry run, the same files' kernel tests -------
PYTEST=("$PY" -m pytest -q -x -p no:cacheprovider -rfE)
NOTE_XDIST=""
if missing xdist; then NOTE_XDIST="pytest-xdist missing: serial; "; XDIST=(); fi
if (( DRY )); then
    missing xdist || XDIST=(-n 2)
    TEST_ARGS=(-m kernel -k "$DRY_K" "${KERNEL_TESTS[@]}")
else
    missing xdist || XDIST=(-n 4)
    TEST_ARGS=(-m gpu "${KERNEL_TESTS[@]}")
fi
# pytest_result NAME LOG: the status from the rc and pytest's last line; a module missing on the
# image that stops collection is SKIPPED by name
pytest_result() {
    local last gone
    last=$(grep -E '(passed|failed|error|skipped|no tests ran)' "$2" | tail -n 1 | sed 's/=//g; s/^ *//')
    gone=$(grep -oE "No module named '[A-Za-z0-9_.]+'" "$2" | head -n 1 | cut -d"'" -f2)
    if timed_out; then record "$1" TIMEOUT "$TOOK" "limit reached; $last"
    elif [ "$RC" = 0 ] && [[ "$last" != *passed* ]]; then record "$1" SKIPPED "$TOOK" "nothing ran: $last"
    elif [ "$RC" = 0 ]; then record "$1" ok "$TOOK" "$NOTE_XDIST$last"
    elif [ "$RC" = 5 ]; then record "$1" SKIPPED "$TOOK" "no tests selected"
    elif [ -n "$gone" ] && [ "$RC" != 1 ]; then record "$1" SKIPPED "$TOOK" "module $gone missing on this image"
    else record "$1" FAIL "$TOOK" "$NOTE_XDIST${last:-rc $RC}${gone:+ (module $gone missing)}"
    fi
}
if missing pytest; then
    skip tests "$OUTDIR/tests.log" "pytest not importable"
elif (( DRY )) && missing g++; then
    skip tests "$OUTDIR/tests.log" "g++ not found: the emulator builds the kernels with it"
elif run tests "$(limit 90 120)" "$OUTDIR/tests.log" "${PYTEST[@]}" "${XDIST[@]}" "${TEST_ARGS[@]}"; then
    pytest_result tests "$OUTDIR/tests.log"
fi

# ---- 5. compute-sanitizer memcheck over a short selection (serial, on the GPU) -----------------
LOG="$OUTDIR/memcheck.log"
if [ -z "$SAN" ]; then
    skip memcheck "$LOG" "compute-sanitizer not found"
elif (( DRY )); then
    skip memcheck "$LOG" "dry run: compute-sanitizer needs a GPU"
elif missing pytest; then
    skip memcheck "$LOG" "pytest not importable"
# API errors are off: CuPy and PyTorch probe the driver with calls that may fail by design.
elif export GPU_PATHS_SMALL=1 && run memcheck "$(limit 45 75)" "$LOG" "$SAN" --tool memcheck --report-api-errors no --error-exitcode 3 \
        "${PYTEST[@]}" -m gpu -k "$MEMCHECK_K" "${MEMCHECK_TESTS[@]}"; then
    summary=$(grep -E 'ERROR SUMMARY' "$LOG" | tail -n 1 | sed 's/^=* *//')
    last=$(grep -E '(passed|failed|error|skipped)' "$LOG" | grep -v 'ERROR SUMMARY' | tail -n 1 | sed 's/=//g; s/^ *//')
    if timed_out; then
        record memcheck TIMEOUT "$TOOK" "limit reached (${summary:-no summary}); $last"
    elif [ -z "$summary" ] && [ "$RC" != 0 ] && [ "$RC" != 5 ]; then
        # the sanitizer never reached the end of the program: it could not start on this device
        record memcheck SKIPPED "$TOOK" "did not run: $(grep -m 1 -iE 'error|not supported' "$LOG" | cut -c1-100)"
    elif [ "$RC" = 5 ]; then record memcheck SKIPPED "$TOOK" "no gpu-marked tests selected"
    elif [ "$RC" = 0 ]; then record memcheck ok "$TOOK" "$summary; $last"
    elif [ "$RC" = 3 ]; then record memcheck FAIL "$TOOK" "$summary"
    else record memcheck FAIL "$TOOK" "tests failed under the sanitizer; $summary; $last"
    fi
fi

# ---- 5b. NCCL: vocabulary-parallel cross-entropy over 2 GPUs (a machine with 2 or more) ---------
LOG="$OUTDIR/nccl.log"
NGPU=$( (( DRY )) || timeout 20 nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
if (( DRY )); then
    skip nccl "$LOG" "dry run: NCCL needs 2 GPUs"
elif (( ${NGPU:-0} < 2 )); then
    skip nccl "$LOG" "needs 2 GPUs, found ${NGPU:-0}"
elif missing pytest || missing torch || missing cupy; then
    skip nccl "$LOG" "needs pytest, torch and cupy"
elif run nccl "$(limit 45 75)" "$LOG" "${PYTEST[@]}" -m gpu -k test_nccl_two_gpus tests/test_torch_vocab_parallel.py; then
    pytest_result nccl "$LOG"
fi

# ---- 6. the benchmark's headline shapes, every row appended to bench.jsonl as it is done ---------
if (( DRY )); then
    BENCH=(--device cpu --quick --op batch_norm_train,softmax_cross_entropy_train --peer ours
           --repeat 2 --warmup 0 --budget 0.05)
    BENCH_LIMIT=$(limit 60 8)
else
    # float32, no torch.compile (its compile time alone would take the budget)
    BENCH=(--device gpu --headline --dtype float32 --peer ours,cupy,torch-cudnn,torch)
    BENCH_LIMIT=$(limit 150 8)
fi
# gpu-bench skips the rows that would start after --time-limit; the step limit is the backstop
if run bench "$BENCH_LIMIT" "$OUTDIR/bench.log" "$PY" -m gpu.bench "${BENCH[@]}" \
        --time-limit $(( BENCH_LIMIT > 40 ? BENCH_LIMIT - 20 : BENCH_LIMIT / 2 )) \
        --jsonl "$OUTDIR/bench.jsonl" --json "$OUTDIR/bench.json"; then
    last=$(tail -n 1 "$OUTDIR/bench.log")
    if timed_out; then record bench TIMEOUT "$TOOK" "$last"
    elif [ "$RC" = 0 ]; then record bench ok "$TOOK" "$last"
    else record bench FAIL "$TOOK" "rc $RC: $last"
    fi
fi

# ---- 7. every module a step built was compiled ahead (on the emulator in a dry run) -------------
LOG="$OUTDIR/modules.log"
touch "$GPU_KERNEL_MODULE_LOG"
if run modules "$(limit 30 0)" "$LOG" "$PY" -m gpu.bench.precompile check "$GPU_KERNEL_MODULE_LOG"; then
    last=$(tail -n 1 "$LOG")
    if timed_out; then record modules TIMEOUT "$TOOK" "$last"
    elif [ "$RC" = 0 ]; then record modules ok "$TOOK" "$last"
    else record modules FAIL "$TOOK" "$last"
    fi
fi

for s in "${RESULTS[@]}"; do
    case $s in FAIL|TIMEOUT|INTERRUPTED) exit 1 ;; esac
done
exit 0
