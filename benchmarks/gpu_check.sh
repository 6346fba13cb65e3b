#!/usr/bin/env bash
# The GPU check for a short loan: at most 8 minutes on one H100, one command. NOT YET RUN ON A
# GPU (written in a session without one; its pieces were dry-run on the CPU with TINY=1).
#
#   bash benchmarks/gpu_check.sh [DATA.npz] [DEVICE] [OUT_DIR]
#   TINY=1 bash benchmarks/gpu_check.sh /work/shared/data/cifar10_subset.npz cpu /tmp/check
#
# 1. the CUDA-capable tests (tests/test_evaluation_gpu_paths.py, the acceleration tests);
# 2. python -m benchmarks.run --device DEVICE on the small workload (every case but the two
#    protocol runs on the digits, cascade and verdict: step 4 measures the protocol);
# 3. PGD-AT throughput of deq_large_exact_8_7 and deq_large_unrolling, about a minute each,
#    with the acceleration options (channels-last, TF32, torch.compile) off and on;
# 4. verdict vs table mode on 200 images of DATA (the CIFAR-10 subset) with the exact-trained
#    model of step 3.
# Out: OUT_DIR/gpu_check.json (every step's exit code and wall seconds, the training rates,
# both modes' f evaluations, wall seconds and whether their per-sample verdicts agree) and
# OUT_DIR/gpu_check.md. TINY=1: a small conv DEQ, a few images and steps (a dry run of the
# script's pieces on any device, minutes on a CPU).
set -uo pipefail
DATA=${1:-/work/shared/data/cifar10_subset.npz}
DEVICE=${2:-cuda}
OUT=${3:-runs/gpu_check}
TINY=${TINY:-0}
mkdir -p "$OUT"
: >"$OUT/steps.jsonl"

step() {  # NAME LIMIT_S COMMAND...: run it, log to OUT/NAME.log, record exit code and seconds
  local name=$1 limit=$(($2 * SCALE))
  shift 2
  local start
  start=$(date +%s.%N)
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  local wall
  wall=$(python -c "import sys; print(round($(date +%s.%N) - $start, 1))")
  echo "{\"step\": \"$name\", \"rc\": $rc, \"wall_s\": $wall}" >>"$OUT/steps.jsonl"
  echo "$name: exit $rc, ${wall} s"
}

if [ "$TINY" = 1 ]; then  # the limits x5: a shared CPU, and torch's import alone takes seconds
  SCALE=5; N_TEST=8; N_DEV=8; LIMIT=64; TRAIN_S=65; BENCH=(--quick --cases verdict)
  MODEL=(--model small_conv_deq --width 4 --forward_threshold 3 --backward_threshold 2
         --batch_size 16 --eval_batch_size 16)
  EVAL_MODEL=(--model small_conv_deq --model_arg in_channels=3 --model_arg image_size=32
              --model_arg channels=4 --threshold 3)
  TESTS=(tests/test_evaluation_gpu_paths.py -k "not benchmark")
else
  # worst case 40 + 60 + 4 x 65 + 2 x 60 = 480 s; PGD-AT of DEQ-Large ran at about 50
  # samples/s on an H100 (docs/gpu_runs.md): 1,800 images are about 40 s of an epoch
  SCALE=1; N_TEST=200; N_DEV=50; LIMIT=1800; TRAIN_S=65
  BENCH=(--cases gradient_estimates,art_pgd,broyden_vs_torchdeq,solver_bookkeeping,defense_memory,training_step,through_solver,pgd_at_throughput,shared_runs,scaling)
  MODEL=()
  EVAL_MODEL=(--model deq_large --threshold 8)
  TESTS=(tests/test_evaluation_gpu_paths.py tests/test_training_acceleration.py)
fi

step tests 40 python -m pytest -q -x "${TESTS[@]}"
step benchmarks 60 python -m benchmarks.run --device "$DEVICE" --workload small \
  --repeats 1 --out-dir "$OUT/benchmarks" --docs "$OUT/benchmarks.md" "${BENCH[@]}"
for preset in deq_large_exact_8_7 deq_large_unrolling; do
  for accel in off on; do
    flags=()
    if [ "$accel" = on ] && [ "$DEVICE" = cuda ]; then
      flags=(--channels_last true --tf32 true --compile true)
    fi
    # one epoch of PGD-AT on LIMIT images (no clean pretraining): about a minute on an H100
    step "train_${preset}_${accel}" "$TRAIN_S" deq-attacks train --preset "$preset" \
      --data "$DATA" --dev_size "$N_DEV" --train_limit "$LIMIT" --pretrain_steps 0 --epochs 1 \
      --plots false --device "$DEVICE" --out_dir "$OUT/train_${preset}_${accel}" \
      "${MODEL[@]}" "${flags[@]}"
  done
done
CKPT="$OUT/train_deq_large_exact_8_7_off/best.safetensors"
for mode in verdict table; do
  step "evaluate_$mode" 60 deq-attacks evaluate "${EVAL_MODEL[@]}" --training_gradient exact \
    --checkpoint "$CKPT" --data "$DATA" --n_dev "$N_DEV" --n_test "$N_TEST" \
    --device "$DEVICE" --attacks pgd,square:queries=100 --long_steps 20 \
    --sweep adjoint.n=2,3 --sweep adjoint.beta=1.0 --sweep unrolled.n=1,3 \
    --sweep unrolled.k=1 --sweep unrolled.lam=1.0 --mode "$mode" --out_dir "$OUT/evaluate_$mode"
done

python - "$OUT" <<'PY'
import json, re, sys
from pathlib import Path

out = Path(sys.argv[1])
steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
record = {"steps": steps, "training": {}, "modes": {}}
for s in steps:
    if s["step"].startswith("train_"):
        rates = re.findall(r"([\d.]+) samples/s", (out / f"{s['step']}.log").read_text())
        record["training"][s["step"]] = float(rates[-1]) if rates else None
for mode in ("verdict", "table"):
    path = out / f"evaluate_{mode}" / "results.json"
    if path.is_file():
        r = json.loads(path.read_text())
        record["modes"][mode] = {
            "columns_f_evals": r["timings"]["columns"].get("f_evals"),
            "columns_wall_s": r["timings"]["columns"]["wall_s"],
            "verdict": r["verdict"],
            "audit": {d: {k: a[k] for k in ("size", "survivors", "escalated", "bound")}
                      for d, a in (r.get("audit") or {}).items()},
        }
modes = record["modes"]
if len(modes) == 2:
    record["same_verdict"] = modes["verdict"]["verdict"] == modes["table"]["verdict"]
(out / "gpu_check.json").write_text(json.dumps(record, indent=1))
lines = ["# GPU check", "", "| step | exit | wall s |", "|---|---|---|"]
lines += [f"| {s['step']} | {s['rc']} | {s['wall_s']} |" for s in steps]
lines += ["", "| training run | PGD-AT samples/s (last epoch) |", "|---|---|"]
lines += [f"| {k} | {v} |" for k, v in record["training"].items()]
if len(modes) == 2:
    v, t = modes["verdict"], modes["table"]
    ratio = (v["columns_f_evals"] or 0) / max(t["columns_f_evals"] or 1, 1)
    lines += ["", f"verdict / table column step: {ratio:.2f} in f evaluations, "
              f"{v['columns_wall_s']:.0f} s vs {t['columns_wall_s']:.0f} s; same per-sample "
              f"verdict: {record['same_verdict']}"]
(out / "gpu_check.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
