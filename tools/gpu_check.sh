#!/usr/bin/env bash
# The GPU session's checklist (issue 8), in order, every result under one folder.
#
# Here, on the CPU machine, once:   bash tools/gpu_check.sh --prepare [PY]
#   copies into .device/ (ignored: name it in the device tool's `carry`) the CIFAR-10 sample
#   (.device/data), the independent checker (../shared/tools/gpu_check.py) and the operator as it
#   was before the kernel restructure (commit $BEFORE, for the before/after table).
#   With PY, a Python with the device's stack (3.12, torch 2.11.0+cu130 from PyPI), it also
#   builds both operators for sm_90 (.device/op, .device/before), which saves the device
#   about 3 minutes of building (4 min here). Such a Python, from this machine's pyenv:
#     ~/.pyenv/versions/3.12.1/bin/python -m venv /tmp/venv-312
#     /tmp/venv-312/bin/pip install torch==2.11.0 numpy ninja setuptools
# There, from the repository root:  bash tools/gpu_check.sh OUT_DIR [STAGE...]
#   stages: env build quick tests check sanitize bench ncu before train torchrun runs collect
#   (default: all but build and quick; `build` builds anew, the others only when they must, and
#   the full `tests` includes `quick`)
# Each stage writes its whole output to OUT_DIR/STAGE.log (JSON too where there is one) and
# prints the log's last lines; summary.log says when each stage began and how it ended.
#
# A device machine goes back 30 s after a call, so plan on every call finding a bare one.
# A stage that needs the operator first makes sure it has the one of these sources: built
# on this machine, or carried in .device/op (by --prepare PY, or from an earlier call) if it
# loads there, or else built now (2 min).
# A call lasts at most 10 minutes and brings back at most 8 files of 16 MiB: run the script
# under a shorter timeout and bundle the folder in parts, so that a stage cut off still
# returns its log:
#   run(carry=[".device", "runs/gpu"], timeout_s=600, command="timeout 550 bash
#       tools/gpu_check.sh /tmp/gc STAGES; bash tools/gpu_check.sh /tmp/gc collect;
#       tar czf - -C /tmp/gc . | split -b 15m - $OUT/gc.tgz.part-")
# with, in order (the first call finds a broken kernel fast, and has the headline numbers):
#   1. env quick check bench train   2. tests sanitize ncu before torchrun   3. runs (4. runs)
# A session has 30 minutes of device time, counted from the machine's start (a minute or
# more) until it goes back: issue each call as soon as the one before returns, and read what
# that one brought back beside it (its files are here by then); a gap of over 30 s costs a
# new start.
# After each call, here:  bash tools/gpu_check.sh --unpack FILES_AT
#   puts the call's logs in runs/gpu-calls/N, the operator it built (if it did) in .device/op
#   (a change to rot_kernel/csrc changes the hash, and it is built again), and the real runs
#   it finished in runs/gpu: `collect` brings back all they wrote but the checkpoints, and
#   carrying runs/gpu out again lets `runs` go on from the finished ones in the next call, or
#   the next session (all six RotNets' model.pt take 40 MB).
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
  if [ -n "${2:-}" ]; then  # both operators built here, for sm_90, with the device's own stack
    export TORCH_CUDA_ARCH_LIST=9.0 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MAX_JOBS=2
    "$2" -c "import sys, torch; print(sys.version.split()[0], torch.__version__)"
    tmp=$(mktemp -d) && cp -r rot_kernel setup.py "$tmp"/ && rm -f "$tmp"/rot_kernel/_C*.so
    ( cd "$tmp" && "$2" setup.py -q build_ext --inplace ) > .device/prebuild.log 2>&1 \
      && mkdir -p .device/op && cp "$tmp"/rot_kernel/_C*.so .device/op/ && op_sources > .device/op/sources \
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

out=${1:?usage: bash tools/gpu_check.sh OUT_DIR [STAGE...]  (or --prepare, on the CPU machine)}
shift
stages=${*:-env tests check sanitize bench ncu before train torchrun runs collect}
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
# Stages report failures in their logs and the script goes on to the next one.
pytest_cuda() { ROT_REQUIRE_CUDA=1 "$PY" -m pytest -q -W error::RuntimeWarning -p no:cacheprovider "$@"; }
build() {  # the CUDA kernel, built against this machine's torch (MAX_JOBS: all cores); a copy
  # goes to OUT_DIR/op with the hash of its sources, for later calls to carry in .device/op
  MAX_JOBS=$(nproc) "$PY" -m pip install -q --no-build-isolation -e . 2>&1 | tail -20
  op_loads "$PY" && mkdir -p build "$out/op" && op_sources | tee build/op.sources > "$out/op/sources" \
    && cp rot_kernel/_C*.so "$out/op/" && { strip --strip-debug "$out"/op/_C*.so 2>/dev/null || true; }
}
ensure_op() {  # the operator of these sources: built on this machine, carried in, or built now
  local want; want=$(op_sources)
  if ls rot_kernel/_C*.so > /dev/null 2>&1 && [ "$(cat build/op.sources 2>/dev/null)" = "$want" ]; then
    return 0
  fi
  if [ "$(cat .device/op/sources 2>/dev/null)" = "$want" ] && cp .device/op/_C*.so rot_kernel/ 2>/dev/null; then
    if op_loads "$PY" > /dev/null 2>&1; then
      mkdir -p build && echo "$want" > build/op.sources
      echo "(the operator of these sources carried in .device/op)"
      return 0
    fi
    rm -f rot_kernel/_C*.so
    echo "(the operator carried in .device/op does not load here)"
  fi
  echo "(building the operator first)"
  build >> "$out/build.log" 2>&1
}

stage_body() {
  case $1 in
    env)
      echo "python: $PY"
      nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
      nvcc --version | tail -1; nproc; uname -r
      df -h /dev/shm | tail -1  # the DataLoader baseline's workers hand batches over through it
      "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
      "$PY" -m pip list 2>/dev/null | grep -iE "^(torch|numpy|pytest|tqdm|matplotlib|pillow|ninja) " ;;
    build) build ;;
    quick)  # first: the kernel's tests (CUDA and emulated) and the streamed split on CUDA
      pytest_cuda tests/test_cuda_kernel.py tests/test_data.py -k "cuda" ;;
    tests)  # CUDA tests included; a fallback to the reference is an error here. The suite passes
      # under pytest-xdist (checked on the CPU), which the device image has: 8 processes.
      if "$PY" -c "import xdist" 2>/dev/null; then pytest_cuda -n 8; else pytest_cuda; fi ;;
    check)  # the independent checker: every path against the CPU kernel, then kernel times
      "$PY" .device/gpu_check.py
      "$PY" .device/gpu_check.py --perf ;;
    sanitize)  # memcheck without the caching allocator (it hides overruns), racecheck, synccheck
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --print-limit 20 \
        "$PY" .device/gpu_check.py --quick
      for tool in racecheck synccheck; do
        compute-sanitizer --tool "$tool" --print-limit 20 "$PY" .device/gpu_check.py --quick
      done ;;
    bench)
      "$PY" -m rot_kernel.bench --device cuda --json "$out/bench_cuda.json" ;;
    ncu)    # the benchmark cases once each, kernel by kernel
      ncu_run "$PY" .device/gpu_check.py --ncu > "$out/ncu_after.csv" ;;
    before) # the pre-restructure operator: its benchmark and counters, for the before/after table
      # (built here unless --prepare built it on the CPU machine)
      ( cd .device/before && { ls rot_kernel/_C*.so > /dev/null 2>&1 \
          || MAX_JOBS=$(nproc) "$PY" setup.py -q build_ext --inplace 2>&1 | tail -20; } \
        && "$PY" -m rot_kernel.bench --device cuda --json "$out/bench_cuda_before.json" \
        && PYTHONPATH=$PWD ncu_run "$PY" ../gpu_check.py --ncu > "$out/ncu_before.csv" ) ;;
    train)  # the AlexNet step (short); then every variant and the DataLoader baseline in one
      # table, the slowest to compile last (the JSON is rewritten after each row)
      "$PY" rotnet.py --benchmark --device cuda --arch alexnet --steps 30
      "$PY" rotnet.py --benchmark --sweep --device cuda --json "$out/train_sweep.json" ;;
    torchrun)  # one process through torchrun on CUDA (NCCL); several GPUs cannot be tried here
      rm -rf runs/gpu/torchrun  # a fresh run each time (a run refuses an --out that holds one)
      "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 rotnet.py --data "$DATA" --epochs 1 \
        --width 0.25 --out runs/gpu/torchrun ;;
    runs)   # the real runs on the sample, full width, the paper's schedules. By the FLOPs
      # (about 1.5 GFLOP per rotated image, forward and backward), at 150 TFLOP/s: the RotNet
      # 0.5 min, Table 3 2, Table 1 3, Table 2 3, the semi-supervised sweep 6 (its epochs are
      # 50,000 images whatever the labels): more than one call holds. Every finished run (its
      # model.pt or results.json) comes back and goes out again with runs/gpu, so the runs
      # go on across calls and sessions; a run that was cut off starts again.
      [ -f runs/gpu/rotnet/model.pt ] || "$PY" rotnet.py --data "$DATA" --epochs 100 --out runs/gpu/rotnet --resume
      for t in 3 1 2; do "$PY" probe.py --table "$t" --data "$DATA" --out runs/gpu/tables; done
      "$PY" semi_supervised.py --data "$DATA" --per-class 20,100,400 --checkpoint runs/gpu/rotnet/model.pt \
        --out runs/gpu/semi ;;
    collect)  # what `runs` has written so far but the checkpoints (too big, and not needed
      # to go on): tables, each run's results, metrics and settings, the RotNets' model.pt
      [ -d runs/gpu ] && tar czf "$out/runs_results.tgz" --exclude='checkpoint*.pt' --exclude='*.tmp' runs/gpu
      ls -la "$out" ;;
    *) echo "unknown stage $1"; return 2 ;;
  esac
}

needs_op=" quick tests check sanitize bench ncu train torchrun runs "
for stage in $stages; do
  start=$(date +%s)
  echo "== $stage $(date +%T)" | tee -a "$out/summary.log"
  [[ $needs_op == *" $stage "* ]] && ensure_op | tee -a "$out/summary.log"
  stage_body "$stage" >> "$out/$stage.log" 2>&1
  rc=$?
  tail -n 15 "$out/$stage.log"
  echo "== $stage exit $rc after $(( $(date +%s) - start )) s" | tee -a "$out/summary.log"
done
echo "== done $(date +%T)" | tee -a "$out/summary.log"
