#!/usr/bin/env bash
# The GPU session's checklist (issue 8), in order, every result under one folder.
#
# Here, on the CPU machine, once:   bash tools/gpu_check.sh --prepare
#   copies the CIFAR-10 sample into data/, the independent checker (../shared/tools/gpu_check.py)
#   and the operator as it was before the kernel restructure (commit $BEFORE, for the before/after
#   table) into .device/; both folders are ignored: name them in the device tool's `carry`.
# There, from the repository root:  bash tools/gpu_check.sh OUT_DIR [STAGE...]
#   stages: env build quick tests check sanitize bench ncu before train torchrun runs
#   (default: all but quick, which the full `tests` includes)
# Each stage appends to OUT_DIR/STAGE.log (and writes JSON where there is one); `runs` resumes
# the real runs where a previous call stopped, so a long schedule can be split over calls.
# Device calls last at most 10 minutes, so, in order (the first finds a broken kernel fast):
#   1. env build quick check bench     2. tests sanitize ncu before     3. train torchrun runs
set -uo pipefail
BEFORE=bf4c3e9  # the last commit with the staged kernel that did per-element 64-bit division

if [ "${1:-}" = "--prepare" ]; then
  shared=${SHARED:-../shared}
  mkdir -p data .device
  cp "$shared"/data/cifar-10-sample-python.tar.gz data/
  cp "$shared"/tools/gpu_check.py .device/
  rm -rf .device/before && mkdir -p .device/before
  git archive "$BEFORE" rot_kernel setup.py | tar -x -C .device/before
  du -sh data .device
  exit 0
fi

out=${1:?usage: bash tools/gpu_check.sh OUT_DIR [STAGE...]  (or --prepare, on the CPU machine)}
shift
stages=${*:-env build tests check sanitize bench ncu before train torchrun runs}
mkdir -p "$out"
out=$(cd "$out" && pwd)
export PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=:4096:8
log() { tee -a "$out/$1.log"; }
# Nsight Compute: leave the clocks alone; where the time goes (issue vs DRAM), bank conflicts.
NCU_METRICS=gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,\
smsp__issue_active.avg.pct_of_peak_sustained_active,sm__inst_executed.sum,\
l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum,launch__registers_per_thread,\
sm__warps_active.avg.pct_of_peak_sustained_active
ncu_run() { ncu --clock-control none -k regex:'staged|tiled' --metrics "$NCU_METRICS" --csv "$@"; }

for stage in $stages; do
  echo "== $stage $(date +%T)" | log summary
  case $stage in
    env)
      { nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
        nvcc --version | tail -1; nproc
        python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
      } 2>&1 | log env ;;
    build)  # the CUDA kernel, built against this machine's torch (MAX_JOBS: all cores)
      MAX_JOBS=$(nproc) pip install -q --no-build-isolation -e . 2>&1 | tail -20 | log build
      python -c "import rot_kernel; b = rot_kernel.backend(); print(b); assert 'cuda' in b, 'no CUDA kernel'" 2>&1 | log build ;;
    quick)  # first: the kernel's tests (CUDA and emulated) and the streamed split on CUDA
      ROT_REQUIRE_CUDA=1 python -m pytest -q -W error::RuntimeWarning -p no:cacheprovider \
        tests/test_cuda_kernel.py tests/test_data.py -k "cuda" 2>&1 | tail -40 | log quick ;;
    tests)  # CUDA tests included; a fallback to the reference is an error here
      ROT_REQUIRE_CUDA=1 python -m pytest -q -W error::RuntimeWarning -p no:cacheprovider 2>&1 \
        | tail -40 | log tests ;;
    check)  # the independent checker: every path against the CPU kernel, then kernel times
      python .device/gpu_check.py 2>&1 | tail -60 | log check
      python .device/gpu_check.py --perf 2>&1 | tail -60 | log check ;;
    sanitize)  # memcheck without the caching allocator (it hides overruns), racecheck, synccheck
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --print-limit 20 \
        python .device/gpu_check.py --quick 2>&1 | tail -30 | log sanitize
      for tool in racecheck synccheck; do
        compute-sanitizer --tool "$tool" --print-limit 20 python .device/gpu_check.py --quick 2>&1 | tail -15 | log sanitize
      done ;;
    bench)
      python -m rot_kernel.bench --device cuda --json "$out/bench_cuda.json" 2>&1 | log bench ;;
    ncu)    # the benchmark cases once each, kernel by kernel
      ncu_run python .device/gpu_check.py --ncu > "$out/ncu_after.csv" 2> "$out/ncu_after.err"
      tail -5 "$out/ncu_after.err" | log ncu ;;
    before) # the pre-restructure operator: its benchmark and counters, for the before/after table
      ( cd .device/before && MAX_JOBS=$(nproc) python setup.py -q build_ext --inplace > "$out/before_build.log" 2>&1 \
        && python -m rot_kernel.bench --device cuda --json "$out/bench_cuda_before.json" 2>&1 | log before \
        && PYTHONPATH=$PWD ncu_run python ../gpu_check.py --ncu > "$out/ncu_before.csv" 2> "$out/ncu_before.err" ) ;;
    train)  # the training step: every variant and the DataLoader baseline in one table; AlexNet
      python rotnet.py --benchmark --sweep --device cuda --json "$out/train_sweep.json" 2>&1 | log train
      python rotnet.py --benchmark --device cuda --arch alexnet --steps 30 2>&1 | log train ;;
    torchrun)  # one process through torchrun on CUDA (NCCL); several GPUs cannot be tried here
      torchrun --standalone --nproc_per_node=1 rotnet.py --data data --epochs 1 --width 0.25 \
        --out runs/gpu/torchrun 2>&1 | tail -5 | log torchrun ;;
    runs)   # the real runs on the sample, full width, resumed across calls
      python rotnet.py --data data --epochs 100 --out runs/gpu/rotnet --resume 2>&1 | tail -5 | log runs
      for t in 3 1 2; do python probe.py --table "$t" --data data --out runs/gpu/tables 2>&1 | tail -20 | log runs; done
      python semi_supervised.py --data data --per-class 20,100,400 --checkpoint runs/gpu/rotnet/model.pt \
        --out runs/gpu/semi 2>&1 | tail -10 | log runs
      cp runs/gpu/rotnet/metrics.jsonl "$out/rotnet_metrics.jsonl" 2>/dev/null
      cp runs/gpu/tables/table*.md runs/gpu/semi/semi_supervised.* "$out/" 2>/dev/null ;;
    *) echo "unknown stage $stage" | log summary ;;
  esac
done
echo "== done $(date +%T)" | log summary
