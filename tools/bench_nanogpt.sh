#!/usr/bin/env bash
# jaxlm vs nanoGPT (PyTorch, CPU) on the baby-GPT recipe, side by side in one run.
#   tools/bench_nanogpt.sh TORCH_PYTHON [WORKDIR [ROUNDS]]
# TORCH_PYTHON: a Python with torch==2.13.0 and numpy (python3 -m venv V && V/bin/pip install
# torch==2.13.0 numpy). ROUNDS (default 1) alternates the two whole runs (jaxlm first in odd
# rounds, nanoGPT first in even ones) so that a noisy stretch of the machine hits both; jaxlm
# compiles only what its persistent cache (train.compilation_cache) does not hold yet from an
# earlier run or round. Prints each run's wall time and validation loss (also over the
# whole validation split, windowed the same way for both), then the ratio of median wall times.
set -euo pipefail
torch_python=$(command -v "$1") || { echo "bench_nanogpt.sh: no Python at $1" >&2; exit 2; }
torch_python=$(realpath -s "$torch_python")  # absolute: run_baby.sh runs from nanoGPT's folder
work=${2:-$(mktemp -d)}
rounds=${3:-1}
repo=$(cd "$(dirname "$0")/.." && pwd)
data=${JAXLM_DATA_DIR:-$repo/../shared/data}
bench=$repo/../shared/bench/nanogpt
python=${PYTHON:-python}
mkdir -p "$work"
jax_times=() torch_times=()

run_jaxlm() {
  rm -rf "$work/jaxlm"
  local start end
  start=$(date +%s.%N)
  "$python" -m jaxlm.main --config="$repo/configs/gpt_shakespeare_char.py" --workdir="$work/jaxlm" \
    --config.data.data_dir="$work/tfds" >"$work/jaxlm.log" 2>&1
  end=$(date +%s.%N)
  jax_times+=("$("$python" -c "print(round($end - $start, 1))")")
  local val full
  val=$("$python" -c "import json; print(round([json.loads(l) for l in open('$work/jaxlm/metrics.jsonl') if 'eval/loss' in l][-1]['eval/loss'], 4))")
  full=$("$python" -m jaxlm.evaluate --workdir="$work/jaxlm" 2>/dev/null | "$python" -c "import json,sys; print(round(json.load(sys.stdin)['eval/loss'], 4))")
  echo "jaxlm:   wall_s=${jax_times[-1]} val_loss=$val (20 batches) val_loss_full_split=$full"
}

run_nanogpt() {
  rm -rf "$work/nanogpt"
  local line full
  line=$(bash "$bench/run_baby.sh" "$torch_python" "$data/tinyshakespeare/input.txt" "$work/nanogpt" | tail -n 1)
  full=$("$torch_python" "$repo/tools/nanogpt_val_loss.py" "$bench" "$work/nanogpt/out/ckpt.pt" \
    "$work/nanogpt/data/shakespeare_char/val.bin" | tail -n 1 | sed 's/.*=//')
  torch_times+=("$(echo "$line" | sed 's/.*wall_s=\([0-9.]*\).*/\1/')")
  echo "nanoGPT: $line (20 random batches) val_loss_full_split=$full"
}

for round in $(seq 1 "$rounds"); do
  echo "round $round of $rounds"
  if (( round % 2 )); then run_jaxlm; run_nanogpt; else run_nanogpt; run_jaxlm; fi
done
"$python" - "${jax_times[*]}" "${torch_times[*]}" <<'PY'
import statistics, sys
jax, torch = ([float(t) for t in arg.split()] for arg in sys.argv[1:])
print("rounds jaxlm/nanoGPT:", " ".join(f"{j / t:.2f}" for j, t in zip(jax, torch)))
print(f"ratio jaxlm/nanoGPT wall time: {statistics.median(jax) / statistics.median(torch):.2f} "
      f"(medians {statistics.median(jax):.1f} s / {statistics.median(torch):.1f} s)")
PY
