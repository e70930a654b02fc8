#!/usr/bin/env bash
# Everything in dulearn that needs a GPU, in one call that fits in ~8 minutes on one H100/H200:
#   bash tests/gpu/check.sh OUT_DIR
# Parts, each under `timeout`, in this order: install the carried wheels, device info, the
# CUDA tests (tests/test_cuda.py), the step benchmark at the paper's settings (B=16, T=5,
# 256x256: fp32 baseline vs bf16 and bf16 + channels_last), the propagation and metrics
# benchmarks, a time-boxed training run on the carried real-video shards and the evaluation
# of the trained vs the random-init network on the carried DAVIS sequences, and last, in
# what is left of the budget, the step benchmark of bf16 + channels_last + torch.compile.
# A missing or failing part is reported in OUT_DIR/summary.md, never fatal. OUT_DIR gets four
# files: summary.md, check.log (every part's output), real_video.png, real_video.json.
# Prepare the carried folders (.whl/gpu, .gpu-data) first with tests/gpu/prepare.sh.
# CPU dry run at tiny sizes: DULEARN_GPU_CHECK_DEVICE=cpu bash tests/gpu/check.sh /tmp/out
set -uo pipefail

OUT=$(realpath -m "${1:?usage: bash tests/gpu/check.sh OUT_DIR}")
cd "$(dirname "$0")/../.."
DEVICE=${DULEARN_GPU_CHECK_DEVICE:-cuda}
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-480}  # seconds for all parts together; a part never runs past it
BUNDLE=$PWD/.gpu-data
WORK=$(mktemp -d /tmp/dulearn-gpu-check.XXXXXX)
SUMMARY=$OUT/summary.md
LOG=$OUT/check.log
mkdir -p "$OUT" && : >"$LOG"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled DULEARN_SHARED=$BUNDLE/shared

if [ "$DEVICE" = cpu ]; then  # dry run: every part end to end, at sizes a 2-core CPU finishes
    STEP_ARGS=(--batch 1 --frames 5 --crop 64 --steps 2 --warmup 1 --threads 2)
    STEP_VARIANTS=bf16+cl
    COMPILE_VARIANTS=  # torch.compile on 2 CPU cores takes longer than the whole check
    TRAIN_ARGS=(train.cpu=true train.batch_size=2 data.crop=64 "data.short_side=[64,80]" data.num_workers=1
                schedule.total_steps=1000 log.every=2)
    TRAIN_S=75
    PROP_ARGS=(--frames 4 --ref-frames 2)
    EVAL_ARGS=(--input-size 64 --sequences car-shadow)
    export OMP_NUM_THREADS=2
else  # the paper's batch and crop, bf16 + channels_last; stopped by SIGUSR1 after TRAIN_S
    STEP_ARGS=(--batch 16 --frames 5 --crop 256 --steps 30 --warmup 5)
    STEP_VARIANTS=bf16,bf16+cl
    COMPILE_VARIANTS=bf16+cl+compile
    TRAIN_ARGS=(train.batch_size=16 data.crop=256 data.num_workers=12 train.mixed_precision=bf16
                model.channels_last=true schedule.total_steps=100000 log.every=20)
    TRAIN_S=${GPU_CHECK_TRAIN_S:-100}
    PROP_ARGS=()
    EVAL_ARGS=()
fi

ROWS=()
DEADLINE=$((SECONDS + BUDGET))

# limit CAP: seconds a part may take, CAP or what is left of the budget if less.
limit() { local left=$((DEADLINE - SECONDS)); echo $((left < $1 ? left : $1)); }

# run_part NAME CAP CMD...: run CMD under `timeout` (at most CAP s), output to check.log and
# $WORK/NAME.log, one row in the summary table. Returns CMD's exit status.
run_part() {
    local name=$1 cap; cap=$(limit "$2"); shift 2
    if [ "$cap" -lt 10 ]; then skip_part "$name" "no time left in the ${BUDGET} s budget"; return 1; fi
    local start=$SECONDS rc status
    echo "== $name (limit ${cap} s): $*" | tee -a "$LOG"
    timeout -k 10 "$cap" "$@" 2>&1 | tee "$WORK/$name.log" >>"$LOG"
    rc=${PIPESTATUS[0]}
    case $rc in 0) status=ok ;; 124 | 137) status="timeout after ${cap} s" ;; *) status="failed (exit $rc)" ;; esac
    echo "== $name: $status, $((SECONDS - start)) s" | tee -a "$LOG"
    ROWS+=("| $name | $status | $((SECONDS - start)) |")
    return "$rc"
}

skip_part() { echo "== $1: skipped, $2" | tee -a "$LOG"; ROWS+=("| $1 | skipped: $2 | 0 |"); }

# excerpt NAME CMD...: a summary section with CMD's view of $WORK/NAME.log, if the part ran.
excerpt() {
    local name=$1; shift
    [ -f "$WORK/$name.log" ] || return 0
    printf '\n## %s\n\n```\n%s\n```\n' "$name" "$("$@" "$WORK/$name.log")" >>"$SUMMARY"
}

# --- 1. wheels the GPU image lacks (webdataset, braceexpand, submitit) --------------------
if compgen -G ".whl/gpu/*.whl" >/dev/null; then
    run_part wheels 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" .whl/gpu/*.whl
else
    skip_part wheels ".whl/gpu/*.whl absent (run tests/gpu/prepare.sh and carry .whl/gpu)"
fi
export PYTHONPATH=$WORK/site:$PWD

# --- 2. device info ------------------------------------------------------------------------
run_part info 30 bash -c "nvidia-smi --format=csv --query-gpu=name,driver_version,memory.total,clocks.max.sm \
    2>/dev/null || echo 'no nvidia-smi'; df -h /dev/shm; \"\$0\" tests/gpu/info.py" "$PY"

# --- 3. CUDA tests -------------------------------------------------------------------------
run_part cuda-tests 120 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py

# --- 4. step benchmark (the baseline fp32 runs first, in the same invocation) ---------------
# torch.compile comes last (part 7), in what is left of the budget.
run_part step-benchmark 120 "$PY" tests/benchmarks/step.py --device "$DEVICE" "${STEP_ARGS[@]}" \
    --variants "$STEP_VARIANTS"

# --- 5. propagation and metrics benchmarks ----------------------------------------------
# The benchmark reads ../shared/data beside the checkout; where there is none (the GPU
# machine), that is the carried bundle. Its `evaluate` part is part 6's random-init evaluation.
[ -e ../shared ] || ln -s "$BUNDLE/shared" ../shared 2>/dev/null
PROP=(tests/benchmarks/propagation.py --device "$DEVICE" "${PROP_ARGS[@]}")
if [ -f tests/benchmarks/propagation.py ]; then
    run_part propagation-benchmark 90 "$PY" "${PROP[@]}" --part prop
    run_part metrics-benchmark 60 "$PY" "${PROP[@]}" --part metrics --metric-sequences car-shadow,libby
else
    skip_part propagation-benchmark "tests/benchmarks/propagation.py does not exist"
fi

# --- 6. real video: time-boxed training, then trained vs random init on DAVIS ----------------
DAVIS=$DULEARN_SHARED/data/davis-mini
RUN=$WORK/run
# SIGUSR1 (to the main process only) makes the loop checkpoint at the next step and return; it
# comes after TRAIN_S, or earlier where the budget must keep ~150 s for start-up and evaluation.
TRAIN_FOR=$(($(limit $((TRAIN_S + 150))) - 150))
# DataLoader workers hand batches over in /dev/shm: a small one (containers) takes fewer workers.
SHM_MB=$(df -Pm /dev/shm 2>/dev/null | awk 'NR == 2 {print $4}')
[ "${SHM_MB:-0}" -lt 1024 ] && [ "$DEVICE" != cpu ] && TRAIN_ARGS+=(data.num_workers=2)
if [ ! -f dulearn/train.py ] || [ ! -f "$BUNDLE/shards/index.json" ]; then
    skip_part train "dulearn/train.py or $BUNDLE/shards/index.json absent"
elif [ "$TRAIN_FOR" -lt 20 ]; then
    skip_part train "no time left in the ${BUDGET} s budget"
else
    # Every 2nd source frame is stored, so frame_gap=1 is the paper's gap 2.
    run_part train $((TRAIN_FOR + 90)) timeout --foreground --preserve-status -s USR1 -k 60 "$TRAIN_FOR" \
        "$PY" -m dulearn.train --config configs/ytvos.yaml --run-dir "$RUN" --resume none \
        "data.train=[$BUNDLE/shards/index.json]" data.frame_gap=1 data.videos_per_epoch=30 \
        schedule.lr_step=0 train.checkpoint_every=100000 log.progress=false log.image_every=0 log.wandb=false \
        eval.davis_root=null "${TRAIN_ARGS[@]}"
fi
CKPT=$(ls "$RUN"/checkpoints/step_*.pt 2>/dev/null | sort | tail -n 1)
if [ ! -f dulearn/evaluate.py ] || [ ! -d "$DAVIS" ]; then
    skip_part evaluate "dulearn/evaluate.py or $DAVIS absent"
else
    EVAL=(-m dulearn.evaluate --davis "$DAVIS" --device "$DEVICE" --video none --no-progress "${EVAL_ARGS[@]}")
    if [ -n "$CKPT" ]; then
        run_part eval-trained 90 "$PY" "${EVAL[@]}" --checkpoint "$CKPT" --out "$WORK/eval-trained"
    else
        skip_part eval-trained "no training checkpoint"
    fi
    run_part eval-random 90 "$PY" "${EVAL[@]}" --seed 0 --out "$WORK/eval-random"
fi
run_part real-video-report 60 "$PY" tests/gpu/summarize.py --run-dir "$RUN" --trained "$WORK/eval-trained" \
    --random "$WORK/eval-random" --out "$OUT"

# --- 7. step benchmark with torch.compile (again after its own fp32 baseline) ----------------
if [ -n "$COMPILE_VARIANTS" ]; then
    run_part step-benchmark-compile 240 "$PY" tests/benchmarks/step.py --device "$DEVICE" "${STEP_ARGS[@]}" \
        --variants "$COMPILE_VARIANTS"
else
    skip_part step-benchmark-compile "not in the CPU dry run"
fi

# --- summary -------------------------------------------------------------------------------
{
    echo "# dulearn GPU check ($DEVICE)"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)," \
        "budget ${BUDGET} s, used ${SECONDS} s. Full output: check.log; figures: real_video.png / .json."
    echo
    echo "| part | status | seconds |"
    echo "| --- | --- | --- |"
    printf '%s\n' "${ROWS[@]}"
} >"$SUMMARY"
excerpt info cat
excerpt cuda-tests tail -n 25
excerpt step-benchmark grep -A 8 '^device='
excerpt step-benchmark-compile grep -A 8 '^device='
[ "$DEVICE" = cpu ] || echo "Targets (issue 2, one H100, B=16 T=5 256x256): >= 20 steps/s, <= 8192 MB peak." >>"$SUMMARY"
excerpt propagation-benchmark tail -n 8
excerpt metrics-benchmark tail -n 6
excerpt train tail -n 6
excerpt eval-trained tail -n 8
excerpt eval-random tail -n 8
[ -f "$WORK/real-video-report.log" ] && { echo; cat "$WORK/real-video-report.log"; } >>"$SUMMARY"
echo
cat "$SUMMARY"
rm -rf "$WORK"
exit 0
