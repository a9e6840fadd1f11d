#!/usr/bin/env bash
# The prepared GPU check: the CUDA solver path and its speed, in one command of under 10 minutes.
#
#   bash bench/device_check.sh            # on a machine with a GPU, from the repository root
#
# Needs only torch and rich (no model packages, no assets, no network): the layers are synthetic.
# Each stage has its own time limit and writes its log to $OUT (default /tmp/optima-device-check),
# so a stage that runs long loses only itself (DEVICE=cpu runs the same stages here, to try the
# script; they then hit their limits):
#   1. the GPU and torch;
#   2. bench_solver.py on issue 10's two layers (Wanda mask: 1536x1536 and 1024x4096): OPTIMA /
#      SparseGPT per preconditioner, with bfloat16 matmuls too, and every update's gap to the
#      float64 optimum (the exactness check of the CUDA path);
#   3. bench_8b.py with the CUDA default ("hinv", compiled CG): the 8B block and its projected time;
#   4. bench_8b.py with "ldl", eager: whether "ldl" should become the CUDA default too.
set -u
out=${OUT:-/tmp/optima-device-check}
device=${DEVICE:-cuda}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

stage() {   # stage NAME SECONDS COMMAND...: run with a limit, log to $out/NAME.log, say how it ended
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit} s): $*"
  local start=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local status=$?
  tail -n 40 "$out/$name.log"
  echo "== $name: exit $status after $((SECONDS - start)) s"
}

stage gpu 60 sh -c "nvidia-smi; $python -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())'"
stage solver 210 "$python" bench/bench_solver.py --device "$device" --no-minilm --mask wanda \
  --synthetic 1536x1536,1024x4096 --no-memory --low-precision
stage 8b-hinv 180 "$python" bench/bench_8b.py --device "$device"
stage 8b-ldl 120 "$python" bench/bench_8b.py --device "$device" --preconditioner ldl --no-compile
