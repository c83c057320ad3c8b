#!/usr/bin/env bash
# The device check, for when a GPU is at hand (under 8 minutes on one H100 or H200):
#   1. the head's cost: ArcFace / plain normalised softmax at C = 85 742 (target ≤ 1.05), and
#      the margin family's (target ≤ 1.15; sub-center against a K·C plain softmax too);
#   2. the class-chunked loss at C = 2 M: memory and time against the whole (B, C) block;
#   3. the IResNet-50 112×112 train step in bfloat16: images/s, TFLOP/s and MFU.
# Each writes its table; all of them go to one file as well.
#
#   pip install -r requirements.txt "jax[cuda12]==0.10.2"   # on the GPU machine
#   bash benchmarks/device_check.sh [--smoke] [--peak-tflops 989] [OUT_FILE]
#
# OUT_FILE defaults to benchmarks/device_check.txt. --peak-tflops is one device's dense
# bfloat16 peak (989 for the H100 SXM and the H200). --smoke runs the same three scripts at
# tiny sizes, on any machine (CI runs it on the CPU).
set -euo pipefail
cd "$(dirname "$0")/.."

smoke=0
peak=989
out=benchmarks/device_check.txt
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) smoke=1 ;;
    --peak-tflops) peak="$2"; shift ;;
    -*) echo "device_check.sh: unknown option $1" >&2; exit 2 ;;
    *) out="$1" ;;
  esac
  shift
done

if [ "$smoke" = 1 ]; then
  head_args=(--smoke)
  large_args=(--smoke)
  step_args=(--smoke)
else
  head_args=(--classes 85742 --repeats 21)
  large_args=(--classes 2000000 --repeats 3)
  step_args=(--models iresnet50 --dtypes bfloat16 --batch-per-device 128 --peak-tflops "$peak")
fi

{
  echo "# device check, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
    || echo "no nvidia-smi: $(python -c 'import jax; print(jax.devices())')"
  echo
  echo "## 1. head: ArcFace / plain (python -m benchmarks.head ${head_args[*]})"
  python -m benchmarks.head "${head_args[@]}"
  echo
  echo "## 2. chunked loss (python -m benchmarks.large_classes ${large_args[*]})"
  python -m benchmarks.large_classes "${large_args[@]}"
  echo
  echo "## 3. train step (python -m benchmarks.train_step ${step_args[*]})"
  python -m benchmarks.train_step "${step_args[@]}"
} 2>&1 | tee "$out"
echo "figures written to $out"
