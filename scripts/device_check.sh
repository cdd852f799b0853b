#!/usr/bin/env bash
# One prepared check on a lent GPU (H100/H200), run from the repository root in one device call of
# at most 8 minutes, from a clean tree with only the wheels it carries:
#
#     bash scripts/device_wheels.sh           # here, once: optuna and what it needs into .whl/
#     bash scripts/device_check.sh            # on the device (carry .whl); everything goes to $OUT
#     DRY=1 PYTHON=.venv/bin/python bash scripts/device_check.sh   # tiny CPU dry run
#
# Stages (each under `timeout`, a failed stage is recorded and the next one runs; the stage
# timeouts are clipped to what is left of BUDGET seconds, default 450):
#   1. install the carried wheels from .whl/ into /tmp/site when optuna is not importable;
#      PYTHONPATH=/tmp/site:$PWD (the package is not installed)
#   2. nvidia-smi
#   3. on the GPU: the padded-equals-unpadded tests, and the loss tests (the queue loss under TF32)
#   4. the 100-trial study of configs/default.yaml's search space on a 100,000-row synthetic set at
#      COCO dims (1152/4096), n_jobs 3 warm runners on the one card (padding auto: the space's
#      largest widths on a GPU), while nvidia-smi samples GPU utilisation and per-process memory
#      every second; BATCH_TRIALS=K (default 1) trains K trials per program
#   5. results.md (scripts/device_results.py): the card, the study's wall, trials, programs
#      compiled, useful fraction, GPU utilisation and each runner's peak memory against the memory
#      plan (plan.json; the plan on a 24 GB card is its own stage before the study), rows for
#      benchmarks/RESULTS.md
#   6. scripts/bench.py --coco in float32 (epoch times), if the budget has room (last: clipped first)
# Outputs under $OUT (packed into all.tgz at the end, beside the summaries): stages.tsv (stage, rc,
# seconds), one log per stage, results.md, gpu_mem_summary.txt, bench_fp32.json, study/.

set -u
set -o pipefail

DRY="${DRY:-0}"
PY="${PYTHON:-python3}"
BUDGET="${BUDGET:-450}"
START=$(date +%s)
if [ -z "${OUT:-}" ]; then
    OUT=$(mktemp -d /tmp/device_check_out.XXXXXX)
    echo "OUT not set; writing to $OUT"
fi
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/device_check_work.XXXXXX)
STAGES="$OUT/stages.tsv"
printf 'stage\trc\tseconds\n' > "$STAGES"

note() { echo "[device_check $(date +%H:%M:%S) +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/device_check.log"; }

# run_stage NAME TIMEOUT CMD...: runs CMD with its output in $OUT/NAME.log, under a timeout that is
# clipped to the remaining budget; records rc and seconds; never stops the script.
run_stage() {
    local name="$1" limit="$2"
    shift 2
    local left=$(( BUDGET - ($(date +%s) - START) - 5 ))
    if [ "$left" -lt 10 ]; then
        note "SKIP $name: only ${left}s of the ${BUDGET}s budget left"
        printf '%s\tskipped\t0\n' "$name" >> "$STAGES"
        return 0
    fi
    if [ "$limit" -gt "$left" ]; then limit="$left"; fi
    note "START $name (timeout ${limit}s)"
    local t0 rc
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >> "$STAGES"
    if [ "$rc" -eq 0 ]; then note "OK    $name ($(( $(date +%s) - t0 ))s)"; else
        note "FAIL  $name rc=$rc ($(( $(date +%s) - t0 ))s); tail of $name.log:"
        tail -n 15 "$OUT/$name.log" | tee -a "$OUT/device_check.log"
    fi
    return 0
}

# ------------------------------------------------------------------ 1. environment
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if "$PY" -c "import optuna, plotly, pytest" 2>/dev/null; then
    note "optuna, plotly and pytest already importable: no wheels to install"
elif ls .whl/*.whl > /dev/null 2>&1; then
    run_stage install 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
else
    note "optuna/plotly/pytest missing and no .whl/ wheels carried: the study and tests will fail"
fi
XLA_PYTHON_CLIENT_PREALLOCATE=false "$PY" - > "$OUT/environment.txt" 2>&1 <<'EOF'
import importlib, platform, sys
print("python", sys.version.split()[0], platform.platform())
for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "chex", "numpy", "optuna", "sqlalchemy",
             "alembic", "plotly", "pytest", "xclip_jax"):
    try:
        m = importlib.import_module(name)
        print(f"{name:18s} {getattr(m, '__version__', '?'):12s} {getattr(m, '__file__', '')}")
    except Exception as e:  # noqa: BLE001
        print(f"{name:18s} MISSING ({type(e).__name__}: {e})")
import jax
print("devices", jax.devices(), "backend", jax.default_backend())
EOF
cat "$OUT/environment.txt"

# ------------------------------------------------------------------ 2. the card
if [ "$DRY" = "1" ]; then
    note "DRY=1: skipping nvidia-smi"
else
    nvidia-smi > "$OUT/nvidia_smi.txt" 2>&1 || note "nvidia-smi failed"
    cat "$OUT/nvidia_smi.txt"
fi

# ------------------------------------------------------------------ 3. tests
if [ "$DRY" = "1" ]; then
    TESTS=(tests/test_padding.py -k "buckets or linear-queue")
else
    TESTS=(tests/test_padding.py tests/test_losses.py)
fi
run_stage tests 120 "$PY" -m pytest -q -x -p no:cacheprovider "${TESTS[@]}"

# ------------------------------------------------------------------ 4. the default study, 100 trials on one card
if [ "$DRY" = "1" ]; then
    STUDY_SIZES="images=600 image_dim=64 text_dim=128 val=200 test=200 n_trials=2 n_jobs=2 max_epochs=2 timeout=20 dry=1 batch_trials=${BATCH_TRIALS:-1}"
    STUDY_LIMIT=90
else
    STUDY_SIZES="images=20000 image_dim=1152 text_dim=4096 val=1000 test=1000 n_trials=100 n_jobs=3 max_epochs=8 timeout=270 batch_trials=${BATCH_TRIALS:-1}"
    STUDY_LIMIT=300
fi
# shellcheck disable=SC2086  # STUDY_SIZES is word-split on purpose (key=value arguments)
"$PY" - "$WORK/study.yaml" "$WORK" $STUDY_SIZES <<'EOF'
import sys
import yaml
path, work = sys.argv[1], sys.argv[2]
kv = dict(a.split("=", 1) for a in sys.argv[3:])
with open("configs/default.yaml") as fh:
    cfg = yaml.safe_load(fh)
cfg.pop("base_data_dir", None)
cfg["data"] = {"synthetic": {"images": int(kv["images"]), "captions": 5, "image_dim": int(kv["image_dim"]),
                             "text_dim": int(kv["text_dim"]), "val_images": int(kv["val"]),
                             "test_images": int(kv["test"])}}
cfg.update(study_name="device_check_coco", n_trials=int(kv["n_trials"]), n_jobs=int(kv["n_jobs"]),
           max_epochs=int(kv["max_epochs"]), timeout=float(kv["timeout"]), storage=f"sqlite:///{work}/study.db",
           output_dir=f"{work}/study_out", checkpoint_dir=f"{work}/study_out/checkpoints",
           batch_trials=int(kv.get("batch_trials", 1)))
if kv.get("dry") == "1":  # tiny CPU dry run: small batches and widths, same parameters otherwise
    space = cfg["search_space"]
    space["batch_size"]["choices"] = [256, 512]
    space["output_dim"]["choices"] = [64, 128]
    space["hidden_dim"]["choices"] = [128, 256]
    space["queue_size"]["choices"] = [256, 512]
with open(path, "w") as fh:
    yaml.safe_dump(cfg, fh, sort_keys=False)

EOF
cp "$WORK/study.yaml" "$OUT/study_config.yaml" 2>/dev/null

SAMPLER_PID=""
if [ "$DRY" != "1" ] && command -v nvidia-smi > /dev/null; then
    (
        echo "time,pid,used_memory"
        while :; do
            ts=$(date +%s.%N | cut -c1-14)
            nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits 2>/dev/null \
                | sed "s/^/$ts,/"
            sleep 1
        done
    ) > "$OUT/gpu_mem_samples.csv" 2>&1 &
    SAMPLER_PID=$!
    (
        while :; do
            nvidia-smi --query-gpu=timestamp,memory.used,memory.total,utilization.gpu --format=csv,noheader
            sleep 1
        done
    ) > "$OUT/nvidia_smi_gpu_samples.csv" 2>&1 &
    SAMPLER2_PID=$!
fi
export XCLIP_JAX_CACHE="$WORK/jax_cache"  # a fresh persistent compilation cache shared by the trials
# The memory plan on the original's 24 GB card first (printed, refused in one line or not), then the
# card's own, which the study runs under (its plan.json lands in study/ beside the summary).
run_stage plan_24gb 60 "$PY" -m xclip_jax.tune "$WORK/study.yaml" --plan --device-memory-gb 24 --output-dir "$WORK/plan_24gb"
run_stage study "$STUDY_LIMIT" "$PY" -m xclip_jax.tune "$WORK/study.yaml" --no-progress
if [ -n "$SAMPLER_PID" ]; then
    kill "$SAMPLER_PID" "$SAMPLER2_PID" 2>/dev/null
    wait "$SAMPLER_PID" "$SAMPLER2_PID" 2>/dev/null
fi
mkdir -p "$OUT/study"
for f in study_summary.json best_results.json best_config.yaml importances.json tune_config.yaml; do
    cp "$WORK/study_out/$f" "$OUT/study/" 2>/dev/null
done
cp -r "$WORK/study_out/logs" "$OUT/study/" 2>/dev/null

"$PY" - "$OUT" > "$OUT/gpu_mem_summary.txt" 2>&1 <<'EOF'
import collections, json, sys
from pathlib import Path
out = Path(sys.argv[1])
samples = out / "gpu_mem_samples.csv"
if samples.exists():
    per_time, per_pid = collections.defaultdict(dict), collections.defaultdict(int)
    for line in samples.read_text().splitlines()[1:]:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 3 or not parts[1].isdigit():
            continue
        ts, pid, mem = parts
        mem = int(mem.split()[0]) if mem.split()[0].isdigit() else 0
        per_time[ts][pid] = mem
        per_pid[pid] = max(per_pid[pid], mem)
    most = max((len(v) for v in per_time.values()), default=0)
    total = max((sum(v.values()) for v in per_time.values()), default=0)
    print(f"{len(per_time)} samples; at most {most} processes on the card at once; "
          f"peak total {total} MiB; peak per process (MiB): {dict(per_pid)}")
else:
    print("no nvidia-smi samples (DRY run or no nvidia-smi)")
summary = out / "study" / "study_summary.json"
if summary.exists():
    s = json.loads(summary.read_text())
    states = collections.Counter(t["state"] for t in s["trials"])
    print("trials:", dict(states), "best:", s.get("best_value"))
    print("throughput:", json.dumps(s.get("throughput")))
    for t in s["trials"]:
        ua = t.get("user_attrs", {})
        print(f"  trial {t['number']:3d} {t['state']:9s} value={t.get('value')} dur={t.get('duration_seconds')} "
              f"startup={ua.get('startup_seconds')} compile={ua.get('compile_seconds')} "
              f"train={ua.get('train_seconds')} prealloc={ua.get('xla_preallocate')} "
              f"head={t['params'].get('head_type')} loss={t['params'].get('loss_type')} "
              f"batch={t['params'].get('batch_size')} fail={ua.get('fail_reason', '')[:120]}")
else:
    print("no study_summary.json")
util = out / "nvidia_smi_gpu_samples.csv"
if util.exists():
    values = [int(line.split(",")[3].split()[0]) for line in util.read_text().splitlines()
              if line.count(",") == 3 and line.split(",")[3].split()[0].isdigit()]
    busy = [v for v in values if v > 0]
    if values:
        print(f"GPU utilisation: mean {sum(values) / len(values):.0f} % over {len(values)} samples; "
              f"mean {sum(busy) / max(len(busy), 1):.0f} % over the {len(busy)} samples with any work")
EOF
cat "$OUT/gpu_mem_summary.txt"

# ------------------------------------------------------------------ 5. results.md
"$PY" scripts/device_results.py "$OUT" > "$OUT/results.md" 2>&1
cat "$OUT/results.md"

# ------------------------------------------------------------------ 6. epoch times, if there is room
if [ "$DRY" = "1" ]; then
    BENCH_ARGS=(--rows 4096 --batches 1024 --repeats 1 --peak-n 512 --combos clip+softmax_infonce mlp+queue_infonce)
else
    BENCH_ARGS=(--repeats 3)
fi
# --random-data: the same shapes drawn on the GPU, without the single-threaded host generation of the
# synthetic set, which is slow at COCO dims (the figure is in benchmarks/RESULTS.md).
run_stage bench_fp32 90 "$PY" scripts/bench.py --coco --skip-study --random-data --skip-startup --skip-metrics \
    "${BENCH_ARGS[@]}" --out "$OUT/bench_fp32.json"

if [ "$DRY" != "1" ]; then nvidia-smi > "$OUT/nvidia_smi_end.txt" 2>&1; fi
rm -rf "$WORK"
note "done in $(( $(date +%s) - START ))s; stages:"
column -t "$STAGES" 2>/dev/null || cat "$STAGES"
# The device returns at most 8 files from $OUT: pack everything into one archive and keep the
# few summaries beside it.
if [ "$DRY" != "1" ]; then
    tar czf /tmp/device_check_all.tgz -C "$OUT" . && find "$OUT" -mindepth 1 -maxdepth 1 \
        ! -name stages.tsv ! -name bench_fp32.json ! -name results.md ! -name gpu_mem_summary.txt \
        ! -name device_check.log ! -name environment.txt -exec rm -rf {} + && mv /tmp/device_check_all.tgz "$OUT/all.tgz"
fi
exit 0
