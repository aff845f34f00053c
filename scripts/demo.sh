#!/usr/bin/env bash
# The tiny R1-Zero demonstration, offline on CPU: GRPO on the shipped tiny base model
# (models/tiny-base) over synthetic Chinese arithmetic problems, with held-out greedy accuracy
# before and after, and the training curves.
#   1. builds the release binary (the first time takes a few minutes),
#   2. writes the problems (data/tiny, the same as the base model's fine-tuning data),
#   3. evaluates the base model on the 500 held-out problems,
#   4. trains with configs/tiny.toml, once per training seed given (default: the config's seed
#      42, into runs/tiny; any other seed N goes to runs/tiny-seed-N),
#   5. evaluates each trained model, and renders its curves.svg and timings.svg.
# Usage: scripts/demo.sh [SEED ...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cargo build --release --locked --quiet
grpo=target/release/grpo
config=configs/tiny.toml

"$grpo" data synth --out data/tiny --train 20000 --test 500 --seed 1 --max-answer 20
"$grpo" eval --config "$config" --set output_dir=runs/tiny-base
accuracy() { sed -n 's/.*"accuracy": *\([0-9.]*\).*/\1/p' "$1" | head -1; }
base=$(accuracy runs/tiny-base/eval/test-base.json)

summary=()
for seed in "${@:-42}"; do
  out=runs/tiny
  if [ "$seed" != 42 ]; then out=runs/tiny-seed-$seed; fi
  started=$(date +%s)
  "$grpo" train --config "$config" --set seed="$seed" --set output_dir="$out"
  elapsed=$(($(date +%s) - started))
  "$grpo" eval --config "$config" --set output_dir="$out" --checkpoint "$out"
  "$grpo" plot "$out"
  "$grpo" plot --timings "$out"
  summary+=("seed $seed: held-out greedy accuracy $base -> $(accuracy "$out/eval/test-final.json") (training took ${elapsed} s; curves: $out/curves.svg)")
done
echo
printf '%s\n' "${summary[@]}"
