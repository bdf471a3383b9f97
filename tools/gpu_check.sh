#!/usr/bin/env bash
# The GPU session's checklist (issue 8), in order, every result under one folder, each stage
# held to the time it is given.
#
# Here, on the CPU machine, once per session (ignored folders do not outlive a session's
# checkout):   bash tools/gpu_check.sh --prepare [PY]
#   copies into .device/ (ignored: name it in the device tool's `carry`) the CIFAR-10 sample
#   (.device/data), the independent checker (../shared/tools/gpu_check.py) and the operator as it
#   was before the kernel restructure (commit $BEFORE, for the before/after table, timed by
#   today's rot_kernel/bench.py so that both are timed alike).
#   With PY, a Python with the device's stack (3.12, torch 2.11.0+cu130 from PyPI), it also
#   builds both operators for sm_90 (.device/op, .device/before), which saves the device
#   about 3 minutes of building (2.5 min here). Such a Python, from this machine's pyenv
#   (2 min, on 2026-12-05):
#     ~/.pyenv/versions/3.12.1/bin/python -m venv /tmp/venv-312
#     /tmp/venv-312/bin/pip install torch==2.11.0 numpy ninja setuptools
# There, from the repository root:  bash tools/gpu_check.sh OUT_DIR [--seconds N] [STAGE...]
#   stages: env build quick tests check sanitize bench ncu before train torchrun
#           rotnet table3 table1 table2 semi collect   (`runs`: rotnet table3 table1 table2 semi)
#   (default: all but build and quick; `build` builds anew, the others only when they must, and
#   the full `tests` includes `quick`)
# Each stage writes its whole output to OUT_DIR/STAGE.log (JSON too where there is one) and
# prints the log's last lines; summary.log says when each stage began and how it ended.
#
# Time. A session has 15 minutes of device time, counted from the machine's start (a minute
# or more) until it goes back, and a call lasts at most 10 minutes. So every stage has a cap
# (CAP below: what it needs with a margin) and a floor (MIN: less is not worth starting), and
# --seconds N gives the call's stages N seconds in all: a stage runs under
# `timeout min(cap, what is left)`, one that would start with less than its floor is skipped
# and said so in summary.log, and the next smaller one may still fit. `collect` always runs,
# last. A stage cut off keeps its log (the sweep rewrites its JSON after every row), and a
# training run cut off keeps its checkpoint.pt, which `collect` brings back.
#
# A device machine goes back 30 s after a call, so plan on every call finding a bare one.
# A stage that needs the operator first makes sure it has the one of these sources: built
# on this machine, or carried in .device/op (by --prepare PY, or from an earlier call) if it
# loads there, or else built now (2 min).
# A call brings back at most 8 files of 16 MiB: bundle the folder in parts:
#   run(carry=[".device", "runs/gpu"], timeout_s=T, command="bash tools/gpu_check.sh /tmp/gcN
#       --seconds S STAGES collect; tar czf - -C /tmp/gcN . | split -b 15m - $OUT/gc.tgz.part-")
# with N the call's number (a warm machine keeps /tmp) and S about T - 40 (collect, bundle). In a session with 15 minutes, in order:
#   1. T=480, S=440: env quick check bench train torchrun rotnet   (the kernel correct on
#      the GPU, the operator's table, the training benchmark: the headline, first)
#   2. at once (within the 30 s the machine stays warm; call 1's bundle can be unpacked
#      after: call 2 needs nothing from it), T = budget_left_s (status, free) - 60, S = T - 40:
#      sanitize ncu before tests table3 table1
#   (the sanitizers and the counters first: nothing else gives them, where `quick` in call 1
#   ran the kernel's tests and `tests` runs the rest under xdist), then give_back.
#   compute-sanitizer and ncu work on the Firecracker machines (the H100s so far) and not on
#   the gVisor ones (the H200s; `env` prints the kernel: 4.4.0 is gVisor):
#   there `sanitize` and `ncu` end at once with exit 75, "its tool does not work on this
#   machine", which is no finding, and `before` gives its benchmark without its counters;
#   the time saved goes to `table1`, which is skipped where too little is left.
#   The tables and the semi-supervised sweep take more than what is left (about 2-6 minutes
#   each at full width): later sessions run the rest, `table1 table2` in one, `semi` in
#   another, each prepared anew (a checkout starts without runs/gpu).
#   Every call's reply says how long its stages took: shift stages between calls by it.
# After each call, here:  bash tools/gpu_check.sh --unpack FILES_AT
#   puts the call's logs in runs/gpu-calls/N, the operator it built (if it did) in .device/op
#   (a change to rot_kernel/csrc changes the hash, and it is built again), and the real runs
#   it brought back in runs/gpu: `collect` brings back what they wrote, the finished runs'
#   model.pt, and checkpoint.pt only of a run that was cut off; carrying runs/gpu out again
#   lets the runs go on from there in the next call.
set -uo pipefail
BEFORE=bf4c3e9  # the last commit with the staged kernel that did per-element 64-bit division
DATA=.device/data  # the CIFAR-10 sample (--prepare)

op_sources() { cat rot_kernel/csrc/* setup.py | sha256sum | cut -c1-16; }
# Whether python $1, here, imports the built operator with its CUDA kernel registered.
op_loads() { "$1" -c "import rot_kernel as k; b = k.backend(); print(b); assert b == 'cpu+cuda (prebuilt)', b"; }

if [ "${1:-}" = "--prepare" ]; then
  shared=${SHARED:-../shared}
  rm -rf .device/data && mkdir -p .device/data  # the archive alone: the runs unpack it there
  cp "$shared"/data/cifar-10-sample-python.tar.gz .device/data/
  cp "$shared"/tools/gpu_check.py .device/
  rm -rf .device/before .device/op && mkdir -p .device/before
  git archive "$BEFORE" rot_kernel setup.py | tar -x -C .device/before
  cp rot_kernel/bench.py .device/before/rot_kernel/bench.py  # (its op takes the same arguments)
  if [ -n "${2:-}" ]; then  # both operators built here, for sm_90, with the device's own stack
    export TORCH_CUDA_ARCH_LIST=9.0 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MAX_JOBS=2
    "$2" -c "import sys, torch; print(sys.version.split()[0], torch.__version__)"
    tmp=$(mktemp -d) && cp -r rot_kernel setup.py "$tmp"/ && rm -f "$tmp"/rot_kernel/_C.*
    ( cd "$tmp" && "$2" setup.py -q build_ext --inplace ) > .device/prebuild.log 2>&1 \
      && mkdir -p .device/op && cp "$tmp"/rot_kernel/_C.* .device/op/ && op_sources > .device/op/sources \
      && ( cd .device/before && "$2" setup.py -q build_ext --inplace ) >> .device/prebuild.log 2>&1 \
      || { echo "a build failed: see .device/prebuild.log"; exit 1; }
    strip --strip-debug .device/op/_C*.so .device/before/rot_kernel/_C*.so  # 9 MB -> 2: carried
    for dir in "$tmp" .device/before; do
      ( cd "$dir" && op_loads "$2" ) || { echo "the operator in $dir does not import with its CUDA kernel"; exit 1; }
    done
    rm -rf "$tmp" .device/before/build
  fi
  du -sh .device  # with the working tree, at most 64 MiB travel
  exit 0
fi

if [ "${1:-}" = "--unpack" ]; then  # here, after each call: what it brought back, into place
  from=${2:?usage: bash tools/gpu_check.sh --unpack FILES_AT  (the folder the device tool named)}
  n=1; while [ -e "runs/gpu-calls/$n" ]; do n=$((n + 1)); done
  dest=runs/gpu-calls/$n && mkdir -p "$dest"
  cat "$from"/gc.tgz.part-* | tar xzf - -C "$dest" || exit 1
  if [ -f "$dest/op/sources" ]; then  # the operator that call built: later calls carry it
    rm -rf .device/op && cp -r "$dest/op" .device/op
  fi
  [ -f "$dest/runs_results.tgz" ] && tar xzf "$dest/runs_results.tgz"  # merged into runs/gpu
  cat "$dest/summary.log"
  echo "unpacked into $dest; the next call carries .device and runs/gpu (with the tree, <= 64 MiB):"
  du -shc .device runs/gpu 2>/dev/null | tail -1
  exit 0
fi

usage="usage: bash tools/gpu_check.sh OUT_DIR [--seconds N] [STAGE...]  (or --prepare, on the CPU machine)"
one=""  # --stage: run one stage's body in this process (the loop below runs each so, under timeout)
if [ "${1:-}" = "--stage" ]; then one=${2:?$usage}; shift 2; fi
out=${1:?$usage}
shift
seconds=""
if [ "${1:-}" = "--seconds" ]; then
  seconds=${2:-}; shift 2 || true
  [[ $seconds =~ ^[0-9]+$ ]] || { echo "--seconds: a whole number of seconds, got '$seconds'"; exit 2; }
fi
stages=""
for s in ${*:-env tests check sanitize bench ncu before train torchrun runs collect}; do
  [ "$s" = runs ] && s="rotnet table3 table1 table2 semi"
  stages="$stages $s"
done
mkdir -p "$out"
out=$(cd "$out" && pwd)
# The device image's python3 holds torch; a plain `python` may not exist there.
PY=$(command -v python3 || command -v python)
export PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=:4096:8
# The repository's rot_kernel for every script (.device/gpu_check.py too) even where no
# install was made, as on a bare machine that was carried the operator built before.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Nsight Compute: leave the clocks alone; where the time goes (issue vs DRAM), bank conflicts.
NCU_METRICS=gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,\
smsp__issue_active.avg.pct_of_peak_sustained_active,sm__inst_executed.sum,\
l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum,launch__registers_per_thread,\
sm__warps_active.avg.pct_of_peak_sustained_active
ncu_run() { ncu --clock-control none -k regex:'staged|tiled' --metrics "$NCU_METRICS" --csv "$@"; }
# Whether a profiler or sanitizer works on this machine at all, tried once a machine on a
# small CUDA program (the answer kept in build/works.TOOL). On the gVisor machines (KINDS.md
# names the H200) both fail whatever the program: compute-sanitizer says "Device not
# supported", ncu "LibraryNotLoaded". A stage that finds its tool failing says so and exits
# UNAVAILABLE, not 1: that is no finding about the kernels.
UNAVAILABLE=75
tool_works() {
  local name=$1; shift
  mkdir -p build
  if [ ! -f "build/works.$name" ]; then
    local said rc
    said=$("$@" "$PY" -c "import torch; torch.ones(8, device='cuda').add_(1); torch.cuda.synchronize()" 2>&1)
    rc=$?
    if [ "$rc" = 0 ] && ! grep -q "==ERROR==" <<< "$said"; then
      echo yes > "build/works.$name"
    else
      echo no > "build/works.$name"
      echo "$name fails on a small CUDA program here (exit $rc; kernel $(uname -r)):"; head -n 5 <<< "$said"
    fi
  fi
  [ "$(cat "build/works.$name")" = yes ] || { echo "$name does not work on this machine: skipped"; return 1; }
}
ncu_works() { tool_works ncu ncu --clock-control none; }
sanitizer_works() { tool_works compute-sanitizer compute-sanitizer --tool memcheck --error-exitcode 1; }
# Stages report failures in their logs and the script goes on to the next one.
# pytest-xdist's processes where the machine has it (the device image does; the suite passes
# under it, checked on the CPU): `-n N`, else nothing.
xdist() { "$PY" -c "import xdist" 2>/dev/null && echo "-n $1"; }
# faulthandler_timeout: a test stuck for 2 minutes (a hung kernel) has its stack printed, so a
# stage cut off at its limit still names it; 2 CPU threads a process, as 8 share 16 cores.
pytest_cuda() { ROT_REQUIRE_CUDA=1 OMP_NUM_THREADS=2 "$PY" -m pytest -q -W error::RuntimeWarning -p no:cacheprovider \
  -o faulthandler_timeout=120 "$@"; }
build() {  # the CUDA kernel, built against this machine's torch (MAX_JOBS: all cores); a copy
  # goes to OUT_DIR/op with the hash of its sources, for later calls to carry in .device/op
  MAX_JOBS=$(nproc) "$PY" -m pip install -q --no-build-isolation -e . 2>&1 | tail -20
  op_loads "$PY" || return 1
  rm -f build/op.failed
  mkdir -p build "$out/op" && op_sources | tee build/op.sources > "$out/op/sources" \
    && cp rot_kernel/_C.* "$out/op/" && { strip --strip-debug "$out"/op/_C*.so 2>/dev/null || true; }
}
ensure_op() {  # the operator of these sources: built on this machine, carried in, or built now
  local want; want=$(op_sources)
  if ls rot_kernel/_C*.so > /dev/null 2>&1 && [ "$(cat build/op.sources 2>/dev/null)" = "$want" ]; then
    return 0
  fi
  if [ "$(cat .device/op/sources 2>/dev/null)" = "$want" ] && cp .device/op/_C.* rot_kernel/ 2>/dev/null; then
    if op_loads "$PY" > /dev/null 2>&1; then
      mkdir -p build && echo "$want" > build/op.sources
      echo "(the operator of these sources carried in .device/op)"
      return 0
    fi
    rm -f rot_kernel/_C.*
    echo "(the operator carried in .device/op does not load here)"
  fi
  if [ "$(cat build/op.failed 2>/dev/null)" = "$want" ]; then  # tried once a machine: a build takes minutes
    echo "(the operator of these sources failed to build or load here already: see build.log)"
    return 1
  fi
  echo "(building the operator first)"
  build >> "$out/build.log" 2>&1 || { mkdir -p build && echo "$want" > build/op.failed; return 1; }
}

stage_body() {
  case $1 in
    env)  # fails where torch sees no GPU: every stage after it would say less clearly why
      echo "python: $PY"
      nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
      nvcc --version | tail -1; nproc; uname -r
      df -h /dev/shm | tail -1  # the DataLoader baseline's workers hand batches over through it
      "$PY" -m pip list 2>/dev/null | grep -iE "^(torch|numpy|pytest|pytest-xdist|tqdm|matplotlib|pillow|ninja) "
      "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" ;;
    build) build ;;
    quick)  # first: the kernel's tests (CUDA and emulated), the streamed split on CUDA, and
      # that training and testing wait for the GPU once an epoch, not every step
      pytest_cuda $(xdist 4) tests/test_cuda_kernel.py tests/test_data.py tests/test_rotnet.py -k "cuda or gpu" ;;
    tests)  # CUDA tests included; a fallback to the reference is an error here
      pytest_cuda $(xdist 8) ;;
    check)  # the independent checker: every path against the CPU kernel, then kernel times
      rc=0  # (a stage of several commands fails if any one does, not only the last)
      "$PY" .device/gpu_check.py || rc=1
      "$PY" .device/gpu_check.py --perf || rc=1
      return $rc ;;
    sanitize)  # memcheck without the caching allocator (it hides overruns), racecheck, synccheck;
      # --error-exitcode: a hazard fails the stage (by default the tool exits as the program did);
      # --kernel-name kns=: only the operator's kernels are instrumented (a substring of their
      # names, mangled or not: the namespace; one filter, as the option's repetition is not
      # documented to add), so torch's own kernels run at full speed and the stage fits in minutes
      sanitizer_works || return $UNAVAILABLE
      rc=0
      local san=(compute-sanitizer --error-exitcode 1 --print-limit 20 --kernel-name kns=rot_kernel)
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 "${san[@]}" --tool memcheck "$PY" .device/gpu_check.py --quick || rc=1
      for tool in racecheck synccheck; do
        "${san[@]}" --tool "$tool" "$PY" .device/gpu_check.py --quick || rc=1
      done
      return $rc ;;
    bench)
      "$PY" -m rot_kernel.bench --device cuda --json "$out/bench_cuda.json" ;;
    ncu)    # the benchmark cases once each, kernel by kernel
      ncu_works || return $UNAVAILABLE
      ncu_run "$PY" .device/gpu_check.py --ncu > "$out/ncu_after.csv" ;;
    before) # the pre-restructure operator: its benchmark and counters, for the before/after table
      # (built here unless --prepare built it on the CPU machine); one that does not load with
      # its CUDA kernel is no "before" (its fallback would time the plain-torch reference)
      ( cd .device/before && { ls rot_kernel/_C*.so > /dev/null 2>&1 \
          || MAX_JOBS=$(nproc) "$PY" setup.py -q build_ext --inplace 2>&1 | tail -20; } \
        && { op_loads "$PY" || { echo "the operator before ($BEFORE) does not load with its CUDA kernel"; false; }; } \
        && "$PY" -m rot_kernel.bench --device cuda --json "$out/bench_cuda_before.json" ) || return 1
      ncu_works || return $UNAVAILABLE
      ( cd .device/before && PYTHONPATH=$PWD ncu_run "$PY" ../gpu_check.py --ncu > "$out/ncu_before.csv" ) ;;
    train)  # the AlexNet step (short); then every variant and the DataLoader baseline in one
      # table, the slowest to compile last (the JSON is rewritten after each row)
      rc=0
      "$PY" rotnet.py --benchmark --device cuda --arch alexnet --steps 30 || rc=1
      "$PY" rotnet.py --benchmark --sweep --device cuda --json "$out/train_sweep.json" || rc=1
      return $rc ;;
    torchrun)  # one process through torchrun on CUDA (NCCL); several GPUs cannot be tried here
      rm -rf runs/gpu/torchrun  # a fresh run each time (a run refuses an --out that holds one)
      "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 rotnet.py --data "$DATA" --epochs 1 \
        --width 0.25 --device cuda --out runs/gpu/torchrun ;;
    # The real runs on the sample, full width, the paper's schedules. By the FLOPs (about
    # 1.5 GFLOP per rotated image, forward and backward), at 150 TFLOP/s: the RotNet 0.5 min,
    # Table 3 2, Table 1 3, Table 2 3, the semi-supervised sweep 6 (its epochs are 50,000
    # images whatever the labels: 45 M images through 128-image steps, likely bound by
    # launches rather than FLOPs, so plan it a call of its own, resumed if cut off). A finished
    # run (its model.pt or results.json) is not run again; one that was cut off resumes from
    # its checkpoint.pt, here or in a later call.
    rotnet)
      [ -f runs/gpu/rotnet/model.pt ] || "$PY" rotnet.py --data "$DATA" --epochs 100 --out runs/gpu/rotnet --resume ;;
    table[123])
      "$PY" probe.py --table "${1#table}" --data "$DATA" --out runs/gpu/tables ;;
    semi)
      "$PY" semi_supervised.py --data "$DATA" --per-class 20,100,400 --out runs/gpu/semi ;;
    collect)  # what the runs have written so far, the finished RotNets' model.pt, and the
      # checkpoint.pt of a run cut off; a finished run's checkpoints stay (large, not needed)
      if [ -d runs/gpu ]; then
        find runs/gpu -name 'checkpoint*.pt' | while read -r f; do
          { [ -e "$(dirname "$f")/model.pt" ] || [ -e "$(dirname "$f")/results.json" ]; } && echo "$f"
        done > "$out/finished_checkpoints.txt"
        tar czf "$out/runs_results.tgz" --exclude='*.tmp' --no-wildcards \
          --exclude-from="$out/finished_checkpoints.txt" runs/gpu
        echo "runs/gpu: $(tar tzf "$out/runs_results.tgz" | grep -c 'checkpoint.*\.pt$') checkpoints of unfinished runs kept"
      fi
      ls -la "$out" ;;
    *) echo "unknown stage $1"; return 2 ;;
  esac
}

# Each stage's cap and floor, in seconds (see the header): guesses from the FLOPs and the
# CPU machine's times until a GPU run says better; the reply's summary.log gives the real ones.
declare -A CAP=([env]=60 [build]=420 [quick]=240 [tests]=420 [check]=180 [sanitize]=300 [bench]=150
  [ncu]=180 [before]=240 [train]=300 [torchrun]=120 [rotnet]=420 [table3]=600 [table1]=600
  [table2]=600 [semi]=600 [collect]=120)
declare -A MIN=([env]=5 [build]=120 [quick]=60 [tests]=120 [check]=45 [sanitize]=60 [bench]=45
  [ncu]=45 [before]=60 [train]=90 [torchrun]=30 [rotnet]=60 [table3]=90 [table1]=90
  [table2]=90 [semi]=90 [collect]=0)
ALL="env build quick tests check sanitize bench ncu before train torchrun rotnet table3 table1 table2 semi collect"
needs_op=" quick tests check sanitize bench ncu train torchrun rotnet table3 table1 table2 semi "

if [ -n "$one" ]; then  # one stage's body, as the loop below calls it
  [ -n "${CAP[$one]:-}" ] || { echo "unknown stage $one (stages: $ALL)"; exit 2; }
  stage_body "$one"
  exit $?
fi

for stage in $stages; do
  [ -n "${CAP[$stage]:-}" ] || echo "== unknown stage $stage (stages: $ALL)" | tee -a "$out/summary.log"
done
ends=""
[ -n "$seconds" ] && ends=$(( $(date +%s) + seconds ))
# Seconds this call has left for stages (a large number without --seconds).
left() { if [ -n "$ends" ]; then echo $(( ends - $(date +%s) )); else echo 86400; fi; }
for stage in $stages; do
  [ -n "${CAP[$stage]:-}" ] || continue
  budgeted=$([ -n "$ends" ] && [ "$stage" != collect ] && echo yes)
  if [ -n "$budgeted" ] && [ "$(left)" -lt "${MIN[$stage]}" ]; then
    echo "== $stage skipped: $(left) s left of --seconds $seconds, it needs ${MIN[$stage]}" | tee -a "$out/summary.log"
    continue
  fi
  start=$(date +%s)
  echo "== $stage $(date +%T)" | tee -a "$out/summary.log"
  # (a build, if one is needed, comes out of the stage's time)
  [[ $needs_op == *" $stage "* ]] && ensure_op | tee -a "$out/summary.log"
  limit=${CAP[$stage]}
  [ -n "$budgeted" ] && [ "$(left)" -lt "$limit" ] && limit=$(left)
  if [ "$limit" -lt "${MIN[$stage]}" ]; then
    echo "== $stage skipped after the build: $limit s left, it needs ${MIN[$stage]}" | tee -a "$out/summary.log"
    continue
  fi
  # timeout signals the stage's whole process group: torchrun's workers, pytest's too
  timeout -k 10 "$limit" bash "$0" --stage "$stage" "$out" >> "$out/$stage.log" 2>&1
  rc=$?
  tail -n 15 "$out/$stage.log"
  # a failure may lie above the last lines (the checker's before its --perf table)
  [ "$rc" = 0 ] || grep -E "FAIL|ERROR|Error|error:" "$out/$stage.log" | head -n 20
  how="exit $rc"; { [ "$rc" = 124 ] || [ "$rc" = 137 ]; } && how="stopped at its limit, $limit s (exit $rc)"
  [ "$rc" = "$UNAVAILABLE" ] && how="exit $rc: its tool does not work on this machine (no finding; see $stage.log)"
  echo "== $stage $how after $(( $(date +%s) - start )) s" | tee -a "$out/summary.log"
done
echo "== done $(date +%T)" | tee -a "$out/summary.log"
