#!/usr/bin/env bash
# GPU throughput check (<= 5 minutes on one GPU): flow matching and Glow on mnist5k, a fixed number of steps
# per configuration, with and without TF32 + fused Adam, bf16 autocast, channels_last and torch.compile;
# one line per configuration with images/s and peak memory, plus a 2-GPU DDP throughput ratio when two GPUs
# are present.
#
#   bash experiments/benchmarks/gpu_check.sh              # on a machine with an NVIDIA GPU
#   bash experiments/benchmarks/gpu_check.sh --dry-run    # CPU, 2 steps per configuration: checks the wiring
#                                                         # (torch.compile there only traces: backend eager)
#   STEPS=300 WARMUP=30 bash experiments/benchmarks/gpu_check.sh
#
# Needs the package and its dependencies importable (pip install -e . from the repository root).
set -euo pipefail

cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python}"
DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument '$arg' (use --dry-run or nothing)" >&2; exit 2 ;;
  esac
done

if [[ $DRY_RUN -eq 1 ]]; then
  STEPS="${STEPS:-2}"; WARMUP="${WARMUP:-1}"; ACCEL=(--trainer.accelerator cpu --trainer.devices 1)
  GPUS=0; COMPILE_BACKEND="${COMPILE_BACKEND:-eager}"  # inductor on a CPU compiles for minutes
  echo "gpu_check: dry run on the CPU, ${STEPS} timed step(s) per configuration (numbers are not GPU numbers)"
else
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu_check: nvidia-smi not found: no NVIDIA GPU here. Run with --dry-run to check the script on a CPU." >&2
    exit 1
  fi
  GPUS=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
  if [[ "$GPUS" -lt 1 ]]; then
    echo "gpu_check: nvidia-smi lists no GPU." >&2
    exit 1
  fi
  if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: torch cannot use the GPU (torch.cuda.is_available() is False)." >&2
    exit 1
  fi
  STEPS="${STEPS:-150}"; WARMUP="${WARMUP:-20}"; ACCEL=(--trainer.accelerator gpu --trainer.devices 1)
  COMPILE_BACKEND="${COMPILE_BACKEND:-inductor}"
  echo "gpu_check: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1);" \
       "${GPUS} GPU(s); ${STEPS} timed steps after ${WARMUP} warm-up steps per configuration"
fi
if ! "$PYTHON" -c "import lightning_flows, mlxtend, jsonargparse" 2>/dev/null; then
  echo "gpu_check: lightning_flows or its dependencies do not import; run 'pip install -e .' first." >&2
  exit 1
fi
"$PYTHON" -c "import torch, lightning; print(f'gpu_check: torch {torch.__version__}, lightning {lightning.__version__}')"

# name | extra CLI arguments. "plain": float32 without TF32 or fused Adam (a hand loop's default).
CONFIGS=(
  "plain|--performance.tf32 false --performance.fused_adam false"
  "tf32+fused|"
  "bf16|--trainer.precision bf16-mixed"
  "bf16+channels_last|--trainer.precision bf16-mixed --performance.channels_last true"
  "bf16+channels_last+compile|--trainer.precision bf16-mixed --performance.channels_last true --performance.compile true --performance.compile_backend $COMPILE_BACKEND"
)
MODELS=(flow_matching glow)
FAILED=0

run_one() {  # label config extra...
  local label="$1" config="$2"; shift 2
  local out
  if out=$("$PYTHON" experiments/benchmarks/throughput.py --label "$label" --config "$config" \
             --steps "$STEPS" --warmup "$WARMUP" -- "${ACCEL[@]}" "$@" 2>&1); then
    grep '^RESULT' <<<"$out" | sed 's/^RESULT /gpu_check: /' || { echo "gpu_check: $label: no RESULT line"; FAILED=1; }
  else
    echo "gpu_check: $label: FAILED (last lines below)"
    tail -n 15 <<<"$out" | sed 's/^/    /'
    FAILED=1
  fi
}

for model in "${MODELS[@]}"; do
  for entry in "${CONFIGS[@]}"; do
    name="${entry%%|*}"; extra="${entry#*|}"
    # shellcheck disable=SC2086  # the extra arguments are meant to split on spaces
    run_one "mnist5k/${model} ${name}" "experiments/mnist5k/${model}.yaml" $extra
  done
done

if [[ "$GPUS" -ge 2 ]]; then
  echo "gpu_check: DDP, 2 GPUs vs 1 (flow matching, bf16, per-GPU batch as configured)"
  one=$("$PYTHON" experiments/benchmarks/throughput.py --label ddp1 --config experiments/mnist5k/flow_matching.yaml \
          --steps "$STEPS" --warmup "$WARMUP" -- --trainer.accelerator gpu --trainer.devices 1 \
          --trainer.precision bf16-mixed 2>&1 | grep '^RESULT' || true)
  two=$("$PYTHON" experiments/benchmarks/throughput.py --label ddp2 --config experiments/mnist5k/flow_matching.yaml \
          --steps "$STEPS" --warmup "$WARMUP" -- --trainer.accelerator gpu --trainer.devices 2 \
          --trainer.strategy ddp --trainer.precision bf16-mixed 2>&1 | grep '^RESULT' || true)
  r1=$(sed -n 's/.*images\/s=\([0-9.]*\).*/\1/p' <<<"$one"); r2=$(sed -n 's/.*images\/s=\([0-9.]*\).*/\1/p' <<<"$two")
  if [[ -n "$r1" && -n "$r2" ]]; then
    echo "gpu_check: DDP 1 GPU ${r1} images/s, 2 GPUs ${r2} images/s, ratio $("$PYTHON" -c "print(f'{$r2 / $r1:.2f}')") (ideal 2.00)"
  else
    echo "gpu_check: DDP comparison FAILED"; FAILED=1
  fi
else
  echo "gpu_check: DDP ratio skipped (${GPUS} GPU(s); needs 2)"
fi

if [[ $FAILED -ne 0 ]]; then
  echo "gpu_check: some configurations failed" >&2
  exit 1
fi
echo "gpu_check: done"
