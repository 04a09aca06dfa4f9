#!/usr/bin/env bash
# jaxlm vs nanoGPT (PyTorch, CPU) on the baby-GPT recipe, side by side in one run.
#   tools/bench_nanogpt.sh TORCH_PYTHON [WORKDIR]
# TORCH_PYTHON: a Python with torch==2.13.0 and numpy (python3 -m venv V && V/bin/pip install
# torch==2.13.0 numpy). Prints each run's wall time and validation loss (also over the whole
# validation split, windowed the same way for both), then the ratio of wall times.
set -euo pipefail
torch_python=$(command -v "$1") || { echo "bench_nanogpt.sh: no Python at $1" >&2; exit 2; }
torch_python=$(realpath -s "$torch_python")  # absolute: run_baby.sh runs from nanoGPT's folder
work=${2:-$(mktemp -d)}
repo=$(cd "$(dirname "$0")/.." && pwd)
data=${JAXLM_DATA_DIR:-$repo/../shared/data}
bench=$repo/../shared/bench/nanogpt
python=${PYTHON:-python}
rm -rf "$work/jaxlm" "$work/nanogpt" && mkdir -p "$work"
start=$(date +%s.%N)
"$python" -m jaxlm.main --config="$repo/configs/gpt_shakespeare_char.py" --workdir="$work/jaxlm" \
  --config.data.data_dir="$work/tfds" >"$work/jaxlm.log" 2>&1
end=$(date +%s.%N)
jax_s=$("$python" -c "print(round($end - $start, 1))")
jax_val=$("$python" -c "import json; print(round([json.loads(l) for l in open('$work/jaxlm/metrics.jsonl') if 'eval/loss' in l][-1]['eval/loss'], 4))")
full_val=$("$python" -m jaxlm.evaluate --workdir="$work/jaxlm" 2>/dev/null | "$python" -c "import json,sys; print(round(json.load(sys.stdin)['eval/loss'], 4))")
echo "jaxlm:   wall_s=$jax_s val_loss=$jax_val (20 batches) val_loss_full_split=$full_val"
torch_line=$(bash "$bench/run_baby.sh" "$torch_python" "$data/tinyshakespeare/input.txt" "$work/nanogpt" | tail -n 1)
torch_full=$("$torch_python" "$repo/tools/nanogpt_val_loss.py" "$bench" "$work/nanogpt/out/ckpt.pt" \
  "$work/nanogpt/data/shakespeare_char/val.bin" | tail -n 1 | sed 's/.*=//')
echo "nanoGPT: $torch_line (20 random batches) val_loss_full_split=$torch_full"
torch_s=$(echo "$torch_line" | sed 's/.*wall_s=\([0-9.]*\).*/\1/')
echo "ratio jaxlm/nanoGPT wall time: $("$python" -c "print(round($jax_s / $torch_s, 2))")"
