#!/usr/bin/env bash
# A short run of every method's GPU preset on a CUDA machine (bf16 autocast, compiled), then one table:
# examples/s, MFU against the device's matmul peak (train.py's probe), peak GPU memory, and the loss at the first
# and the last log line. Each method has a time limit (100, 100, 130 and 130 s: 460 s, and at most 10 s more each
# to stop, so 500 s at worst, plus a few seconds to find the device); any failure stops the check with the
# method named and a non-zero exit status.
#   scripts/gpu_check.sh [--out DIR] [--overwrite] [--methods a,b] [--dry-run]
# --out: where the runs go (default runs/gpu_check; one folder per method, the puzzles cached in DIR/data);
# a folder that already holds a check is refused unless --overwrite. --dry-run prints the train.py commands.
# Throughput and MFU are taken over the window between the last two log lines, without the step the FLOP counter
# ran (it slows that step); each run's warm-up ends by a quarter of its steps, so the loss can fall.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
out=runs/gpu_check overwrite=0 dry_run=0 methods=recurrent_depth,lit,ltm,lvr
while (($#)); do
    case $1 in
        --out) out=${2:?--out needs a folder}; shift ;;
        --overwrite) overwrite=1 ;;
        --methods) methods=${2:?--methods needs a list}; shift ;;
        --dry-run) dry_run=1 ;;
        -h | --help) sed -n '2,11p' "$0" | cut -c3-; exit 0 ;;
        *) echo "gpu_check: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

# Per method: seconds allowed (start-up, data, compilation, training and the short evaluation together) and the
# flags that shorten its preset: enough steps that the last log window is past compilation and warm-up.
declare -A limit flags
limit[recurrent_depth]=100
flags[recurrent_depth]="--steps 200 --warmup-steps 50 --log-every 50 --base-size 256 --eval-size 64 --eval-steps 1,8"
limit[lit]=100
flags[lit]="--steps 200 --warmup-steps 50 --log-every 50 --base-size 256 --eval-size 64 --eval-steps 1,16"
# ltm: 1,024-character windows, 16 posterior steps per sequence (17 passes a step)
limit[ltm]=130
flags[ltm]="--steps 60 --warmup-steps 15 --log-every 20 --eval-size 8 --eval-subset 4 --eval-steps 0,4"
# lvr: stage 0 (alignment) for 20 steps, then stage 1: every counted step (40, 80, ...) is a stage-1 step
limit[lvr]=130
flags[lvr]="--steps 160 --warmup-steps 40 --align-steps 20 --log-every 40 --eval-size 32 --eval-steps 0,2"
flags[lvr]+=" --validation-size 8"

IFS=, read -ra chosen <<< "$methods"
for method in "${chosen[@]}"; do
    if [[ -z ${limit[$method]:-} ]]; then
        echo "gpu_check: unknown method $method (choose from recurrent_depth,lit,ltm,lvr)" >&2
        exit 2
    fi
done

command_for() {  # the train.py command of one method, as an array in $command
    local method=$1
    command=("$PYTHON" train.py --method "$method" --preset gpu --device cuda --dtype bfloat16 --compile
             ${flags[$method]} --save-every 100000 --out "$out/$method" --data-dir "$out/data")
    ((overwrite)) && command+=(--overwrite)
    return 0
}

if ((dry_run)); then
    for method in "${chosen[@]}"; do
        command_for "$method"
        printf '%q ' "${command[@]}" | sed 's/ $//'
        echo
    done
    exit 0
fi

device=$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")')
if [[ -z $device ]]; then
    echo "gpu_check: no CUDA device is visible (torch.cuda.is_available() is False); this check needs one" >&2
    exit 1
fi
if ((!overwrite)); then
    for method in "${chosen[@]}"; do
        if [[ -e $out/$method ]]; then
            echo "gpu_check: $out/$method already holds a run; give --overwrite to replace it, or another --out" >&2
            exit 1
        fi
    done
fi
mkdir -p "$out"
echo "gpu_check on $device: ${chosen[*]}; runs in $out"
began=$SECONDS
for method in "${chosen[@]}"; do
    command_for "$method"
    echo "=== $method (at most ${limit[$method]} s): ${command[*]}"
    status=0
    timeout --kill-after=10 "${limit[$method]}" "${command[@]}" 2>&1 | tee "$out/$method.log" || status=$?
    if ((status == 124 || status == 137)); then
        echo "gpu_check: $method ran past its ${limit[$method]} s (see $out/$method.log)" >&2
        exit 1
    elif ((status)); then
        echo "gpu_check: $method failed with exit status $status (see $out/$method.log)" >&2
        exit 1
    fi
done

"$PYTHON" - "$out" "${chosen[@]}" <<'EOF'
import json, sys
from pathlib import Path
out, methods = Path(sys.argv[1]), sys.argv[2:]
print(f"\n{'method':<16} {'steps':>6} {'examples/s':>11} {'MFU':>7} {'peak TFLOP/s':>13} {'peak GiB':>9} "
      f"{'first loss':>10} {'last loss':>10}  rates over")
for method in methods:
    results = json.loads((out / method / "results.json").read_text())
    lines = [json.loads(line) for line in (out / method / "log.jsonl").read_text().splitlines()]
    first, last = lines[-2], lines[-1]
    batch, cost = results["config"]["batch_size"], results["cost"]
    # a line's rates are over the steps since the start that the FLOP counter did not run: timed_steps in seconds
    steps, seconds = last["timed_steps"] - first["timed_steps"], last["seconds"] - first["seconds"]
    mfu = last["flops_per_step"] * steps / seconds / cost["peak_flops_per_s"]  # FLOPs: the mean of the counted steps
    memory = f"{cost['peak_memory_bytes'] / 2**30:.2f}" if "peak_memory_bytes" in cost else "n/a"  # (CUDA only)
    print(f"{method:<16} {last['step']:>6} {steps * batch / seconds:>11.1f} {mfu:>7.1%} "
          f"{cost['peak_flops_per_s'] / 1e12:>13.3g} {memory:>9} {lines[0]['loss']:>10.4f} {last['loss']:>10.4f}  "
          f"steps {first['step']}-{last['step']}")
EOF
echo "gpu_check: done in $((SECONDS - began)) s"
