#!/usr/bin/env bash
# The GPU session's checklist (issue 8), in order, every result under one folder:
#   bash tools/gpu_check.sh OUT_DIR [STAGE...]      stages: env build tests bench train runs
# Run from the repository root on a GPU machine, with the CIFAR-10 sample archive copied into
# data/ (an ignored folder: name it in the device tool's `carry`). Each stage writes a log
# (and JSON where there is one) to OUT_DIR; `runs` resumes the real runs where a previous
# call stopped, so a long schedule can be split over several calls.
set -uo pipefail
out=${1:?usage: bash tools/gpu_check.sh OUT_DIR [env build tests bench train runs]}
shift
stages=${*:-env build tests bench train runs}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=:4096:8
log() { tee -a "$out/$1.log"; }

for stage in $stages; do
  echo "== $stage" | log summary
  case $stage in
    env)
      { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nvcc --version | tail -1
        python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
      } 2>&1 | log env ;;
    build)  # the CUDA kernel, built against this machine's torch
      pip install -q --no-build-isolation -e . 2>&1 | tail -20 | log build
      python -c "import rot_kernel; b = rot_kernel.backend(); print(b); assert 'cuda' in b, 'no CUDA kernel'" 2>&1 | log build ;;
    tests)  # CUDA tests included; a fallback to the reference is an error here
      ROT_REQUIRE_CUDA=1 python -m pytest -q -W error::RuntimeWarning 2>&1 | tail -40 | log tests ;;
    bench)
      python -m rot_kernel.bench --device cuda --json "$out/bench_cuda.json" 2>&1 | log bench ;;
    train)  # the training step: eager, then compiled; the AlexNet step at ImageNet's size (JSON lines)
      python rotnet.py --benchmark --device cuda 2>&1 | log train
      python rotnet.py --benchmark --device cuda --compile 2>&1 | log train
      python rotnet.py --benchmark --device cuda --arch alexnet --steps 30 2>&1 | log train ;;
    runs)   # the real runs on the sample, full width, resumed across calls
      python rotnet.py --data data --epochs 100 --out runs/gpu/rotnet --resume 2>&1 | log runs
      for t in 3 1 2; do python probe.py --table "$t" --data data --out runs/gpu/tables 2>&1 | log runs; done
      python semi_supervised.py --data data --per-class 20,100,400 --checkpoint runs/gpu/rotnet/model.pt \
        --out runs/gpu/semi 2>&1 | log runs
      cp runs/gpu/tables/table*.md runs/gpu/semi/semi_supervised.* "$out/" 2>/dev/null ;;
    *) echo "unknown stage $stage" | log summary ;;
  esac
done
