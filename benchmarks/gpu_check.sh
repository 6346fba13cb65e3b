#!/usr/bin/env bash
# One command for a short GPU loan (at most 8 minutes on one H100; NOT YET RUN ON A GPU):
#   bash benchmarks/gpu_check.sh [DATA.npz] [DEVICE] [OUT_DIR]
# 1. the CUDA-capable tests; 2. python -m benchmarks.run on the small workload;
# 3. PGD-AT throughput of deq_large_exact_8_7 and deq_large_unrolling, about a minute each,
#    acceleration options on and off; 4. verdict vs table mode on 200 CIFAR-10 subset images.
# Out: OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md. DEVICE cpu with TINY=1 dry-tests it.
set -uo pipefail
DATA=${1:-/work/shared/data/cifar10_subset.npz}
DEVICE=${2:-cuda}
OUT=${3:-runs/gpu_check}
TINY=${TINY:-0}
mkdir -p "$OUT"
N=200; EPOCHS=1; LIMIT=2000; SECS=60
if [ "$TINY" = 1 ]; then N=4; LIMIT=24; SECS=5; fi
declare -A RESULT
step() {  # name, timeout seconds, command...
  local name=$1 limit=$2; shift 2
  local start=$(date +%s)
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; local rc=$?
  RESULT[$name]="{\"rc\": $rc, \"wall_s\": $(( $(date +%s) - start ))}"
}
if [ "$TINY" = 1 ]; then
  step tests 120 python -m pytest -q -x tests/test_evaluation_gpu_paths.py -k "not benchmark"
else
  step tests 90 python -m pytest -q tests/test_evaluation_gpu_paths.py tests/test_training_acceleration.py
fi
step benchmarks 90 python -m benchmarks.run --device "$DEVICE" --quick
for preset in deq_large_exact_8_7 deq_large_unrolling; do
  for accel in off on; do
    flags=(); [ "$accel" = on ] && flags=(--channels_last true --tf32 true --compile true)
    [ "$TINY" = 1 ] && flags=()
    step "train_${preset}_${accel}" $((SECS + 30)) deq-attacks train --preset "$preset" \
      --data "$DATA" --dev_size 50 --train_limit "$LIMIT" --pretrain_steps 1 --epochs "$EPOCHS" \
      --device "$DEVICE" --plots false --out_dir "$OUT/train_${preset}_${accel}" "${flags[@]}"
  done
done
CKPT="$OUT/train_deq_large_exact_8_7_off/best.safetensors"
for mode in verdict table; do
  step "evaluate_$mode" 120 deq-attacks evaluate --model deq_large --threshold 8 \
    --training_gradient exact --checkpoint "$CKPT" --data "$DATA" --n_dev 50 --n_test "$N" \
    --device "$DEVICE" --attacks pgd,square --square_queries 100 --long_steps 20 \
    --sweep adjoint.n=4,8 --sweep adjoint.beta=1.0 --sweep unrolled.n=1,8 --sweep unrolled.k=1 \
    --sweep unrolled.lam=1.0 --mode "$mode" --out_dir "$OUT/evaluate_$mode"
done
python - "$OUT" "${!RESULT[@]}" <<'PY' "${RESULT[@]}"
import json, sys
out, rest = sys.argv[1], sys.argv[2:]
names, values = rest[: len(rest) // 2], rest[len(rest) // 2 :]
record = {n: json.loads(v) for n, v in zip(names, values)}
for mode in ("verdict", "table"):
    try:
        r = json.load(open(f"{out}/evaluate_{mode}/results.json"))
        record[f"evaluate_{mode}"].update(verdict=r["verdict"], timings=r["timings"])
    except (OSError, KeyError, ValueError):
        pass
json.dump(record, open(f"{out}/gpu_check.json", "w"), indent=1)
lines = ["| step | rc | wall s |", "|---|---|---|"]
lines += [f"| {n} | {v['rc']} | {v['wall_s']} |" for n, v in sorted(record.items())]
v, t = record.get("evaluate_verdict", {}), record.get("evaluate_table", {})
if "verdict" in v and "verdict" in t:
    lines.append(f"\nsame per-sample verdict: {v['verdict'] == t['verdict']}")
open(f"{out}/gpu_check.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
