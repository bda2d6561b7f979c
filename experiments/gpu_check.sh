#!/usr/bin/env bash
# The GPU rows on one lent GPU (H100/H200), as one table.
#
# Run:  bash experiments/gpu_check.sh                      (from the repo root, ~8 min on one GPU)
#       GPU_CHECK_SMOKE=1 bash experiments/gpu_check.sh    (every row shrunk: a check on a CPU)
#       GPU_CHECK_ROWS=train_bf16,eval bash experiments/gpu_check.sh   (a subset of the rows:
#       train_bf16 train_bf16_512 train_f32 eval dispatch sprites_job dit meanflow fsdp)
# Through the device tool: run(command="bash experiments/gpu_check.sh", carry=[".whl"]).
# The machine's image has jax (CUDA), flax, optax and orbax but not ml-collections or
# tensorboardX: carry them as wheels in .whl/ (git-ignored), made here once with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_17_x86_64 -d .whl \
#     ml-collections==1.1.0 tensorboardX==2.6.5
# Produces: one markdown table on stdout and in $DIR/table.md (DIR: $GPU_CHECK_DIR, else $OUT
# where the device tool sets it, else a new /tmp/gpu_check.*), each row's log beside it: the
# benchmark rows (experiments/benchmark.py: analytic FLOPs, utilisation of PEAK_TFLOPS, default
# 989 = H100/H200 dense bf16), the issue's earlier H200 figures and targets, and the default
# sprites job's wall time. A failing or overlong row stops the script: its log's tail, exit 1.
set -euo pipefail
cd "$(dirname "$0")/.."

SMOKE=${GPU_CHECK_SMOKE:-0}
ROWS=${GPU_CHECK_ROWS:-train_bf16,train_bf16_512,train_f32,eval,dispatch,sprites_job,dit,meanflow,fsdp}
DIR=${GPU_CHECK_DIR:-${OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}}
mkdir -p "$DIR"
PY=${PYTHON:-}
if [[ -z $PY ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONUNBUFFERED=1

die() {
  echo "gpu_check: FAILED: $*" >&2
  exit 1
}

# ---- packages and device -----------------------------------------------------------------------
NEED="import jax, flax, optax, orbax.checkpoint, ml_collections, tensorboardX, PIL, scipy, tqdm"
if ! "$PY" -c "$NEED" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$DIR/site" .whl/*.whl || die "pip could not install .whl/*.whl"
    export PYTHONPATH=$DIR/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  "$PY" -c "$NEED" || die "missing packages (above): carry ml-collections and tensorboardX as" \
    "wheels in .whl/ (see this script's header)"
fi
"$PY" - "$SMOKE" <<'EOF' || die "JAX sees no GPU (GPU_CHECK_SMOKE=1 runs the tiny rows on a CPU)"
import sys, jax
print(f"gpu_check: jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].device_kind} "
      f"({jax.default_backend()})", flush=True)
sys.exit(0 if sys.argv[1] == "1" or jax.default_backend() == "gpu" else 1)
EOF

# ---- settings ----------------------------------------------------------------------------------
if [[ $SMOKE == 1 ]]; then # the tiny config, tiny batches, one short timing window per row
  NET=configs/tiny.py
  SPRITES=(configs/tiny.py --config.train.num_steps=4)
  DIT=configs/sprites.py:dit XL=configs/sprites.py:dit
  B=8 B_BIG=16 B_EVAL=8 B_SPRITES=8 K=2 LIMIT=600 PEAK=${PEAK_TFLOPS:-1}
  SAMPLE=(--sample_steps 2)
  EVAL=(--eval_sampler ddim --eval_steps 2 --features feature_net)
  TIMING=(--repeats 1 --min_seconds 0.05 --warmup_seconds 0)
else
  NET=configs/cifar10.py
  SPRITES=(configs/sprites.py)
  DIT=configs/cifar10.py:dit XL=configs/imagenet.py:dit_xl2
  B=128 B_BIG=512 B_EVAL=500 B_SPRITES=64 K=10 LIMIT=240 PEAK=${PEAK_TFLOPS:-989}
  SAMPLE=(--sample_steps 10)
  EVAL=(--eval_sampler dpm_solver++ --eval_steps 20 --features inception)
  TIMING=(--repeats 3 --min_seconds 2 --warmup_seconds 2)
  # A fresh cache outside $DIR (nothing of it comes back from the device): cold compile times.
  export DIFFUSION_COMPILE_CACHE=$(mktemp -d /tmp/gpu_check_cache.XXXXXX)
fi
BENCH=("$PY" experiments/benchmark.py "${TIMING[@]}" --peak_tflops "$PEAK")

want() { [[ ",$ROWS," == *",$1,"* ]]; }

# run NAME CMD...: CMD's output to $DIR/NAME.log, its wall time (ms) to $DIR/NAME.wall; stops the
# script if CMD fails or runs longer than $LIMIT seconds.
run() {
  local name=$1 start
  shift
  echo "gpu_check: $name: $*" >&2
  start=$(date +%s%N)
  if ! timeout "$LIMIT" "$@" >"$DIR/$name.log" 2>&1; then
    tail -n 30 "$DIR/$name.log" >&2
    die "row $name (exit or timeout after ${LIMIT} s; log: $DIR/$name.log)"
  fi
  echo "$((($(date +%s%N) - start) / 1000000))" >"$DIR/$name.wall"
  echo "gpu_check: $name done in $(($(cat "$DIR/$name.wall") / 1000)) s" >&2
}

# ---- rows --------------------------------------------------------------------------------------
bf16=(--config "$NET" --config_overrides model.dtype=bfloat16)
if want train_bf16; then # training, forward and DDIM sampling at batch 128 in one process
  run train_bf16 "${BENCH[@]}" "${bf16[@]}" --batch "$B" --what train,fwd,sample \
    --sampler ddim "${SAMPLE[@]}"
fi
if want train_bf16_512; then
  run train_bf16_512 "${BENCH[@]}" "${bf16[@]}" --batch "$B_BIG" --what train
fi
if want train_f32; then
  run train_f32 "${BENCH[@]}" --config "$NET" --batch "$B" --what train
fi
if want eval; then # the fid50k pipeline: sampling + Inception features
  run eval "${BENCH[@]}" "${bf16[@]}" --batch "$B_EVAL" --what eval "${EVAL[@]}"
fi
if want dispatch; then # small steps are dispatch-bound: the sprites network, 1 and K steps/call
  for k in 1 "$K"; do
    run "dispatch_$k" "${BENCH[@]}" --config "${SPRITES[0]}" --batch "$B_SPRITES" --what train \
      --steps_per_call "$k"
  done
fi
if want dit; then # DiT-B/2 in pixel space (cifar10.py:dit), bf16, cuDNN attention
  run dit "${BENCH[@]}" --config "$DIT" --config_overrides model.dtype=bfloat16 --batch "$B" \
    --what train,fwd
fi
if want meanflow; then # a MeanFlow step (JVP target) beside a flow-matching step, same network
  run meanflow "${BENCH[@]}" "${bf16[@]}" --batch "$B" --what meanflow
fi
if want fsdp; then # DiT-XL/2's state and step peak per device, compiled only (one GPU: fsdp 1)
  run fsdp "${BENCH[@]}" --config "$XL" --config_overrides model.dtype=bfloat16 --batch "$B" \
    --what memory --fsdp 1
fi
if want sprites_job; then # the default job as users run it
  run sprites_job "$PY" launch.py --config "${SPRITES[@]}" --workdir "$DIR/sprites_job"
fi

# ---- the table ---------------------------------------------------------------------------------
"$PY" - "$DIR" "$SMOKE" "$K" <<'EOF' | tee "$DIR/table.md"
import json, os, sys

folder, smoke, k = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
names = ["train_bf16", "train_bf16_512", "train_f32", "eval", "dispatch_1", f"dispatch_{k}",
         "dit", "meanflow", "fsdp"]
# Issue 17's figures on one H200 before this work (jax 0.11.2, cifar10 network), and its targets.
before = {("train_bf16", "train"): 6519, ("train_bf16_512", "train"): 8761,
          ("train_f32", "train"): 3838, ("train_bf16", "sample:ddim"): 21939,
          ("train_bf16", "forward"): "~22000"}
target = {("train_bf16", "train"): 9000, ("train_bf16", "sample:ddim"): 30000}
torch_compile = 2578  # images/s: the same step under torch.compile on that H200
print("\n| row | what | batch | dtype | steps/call | img/s (sample: NFE/s) | GFLOP/img | util | "
      "compile s | peak MB | before (H200) | target / note |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
device = "?"
for name in names:
  path = os.path.join(folder, f"{name}.log")
  if not os.path.exists(path):
    continue
  for line in open(path):
    if not line.startswith("{"):
      continue
    r = json.loads(line)
    if "meanflow_step_over_flow_matching_step" in r:
      ratio = r["meanflow_step_over_flow_matching_step"]
      print(f"| {name} | MeanFlow step / flow-matching step | | | | | | | | | | {ratio}x |")
      continue
    if r.get("what") == "memory":
      print(f"| {name} | memory, fsdp {r['fsdp']} (compiled only) | {r['batch']} | | | | | | "
            f"{r['compile_s']} | {r['step_peak_mb_per_device']} | | state "
            f"{r['state_mb_per_device']} MB per device |")
      continue
    key, rate, device = (name, r["what"]), r["images_per_s"], r["device"]
    notes = []
    if key in target and not smoke:
      notes.append(f">= {target[key]}: {'met' if rate >= target[key] else 'MISSED'}")
    if key == ("train_bf16", "train") and not smoke:
      notes.append(f"{rate / torch_compile:.2f}x torch.compile's H200 figure (target 2.5x)")
    if "fid50k_minutes" in r:
      notes.append(f"FID-50k {r['fid50k_minutes']} min")
    if "steps_per_s" in r:
      notes.append(f"{r['steps_per_s']} steps/s")
    print(f"| {name} | {r['what']} | {r['batch']} | {r['dtype']} | {r.get('steps_per_call', '')}"
          f" | {rate:,.0f} | {r['gflops_per_image']} | {r.get('utilisation', '')} | "
          f"{r['compile_s']} | {r['peak_memory_mb']} | {before.get(key, '')} | "
          f"{'; '.join(notes)} |")
wall = os.path.join(folder, "sprites_job.wall")
if os.path.exists(wall):
  seconds = int(open(wall).read()) / 1000
  print("| sprites_job | launch.py, the default sprites job (compiles, sample grids and "
        f"checkpoints included) | | | | | | | | | 90 s | wall {seconds:.1f} s |")
print(f"\n{'SMOKE (tiny settings, not GPU figures); ' if smoke else ''}device: {device}; "
      f"util = analytic FLOPs / PEAK_TFLOPS; logs in {folder}")
EOF
