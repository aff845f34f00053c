#!/usr/bin/env bash
# The tiny R1-Zero demonstration, offline on CPU: GRPO on the shipped tiny base model
# (models/tiny-base) over synthetic Chinese arithmetic problems, with held-out greedy accuracy
# before and after, and the training curves.
#   1. builds the release binary (the first time takes a few minutes),
#   2. writes the problems (data/tiny, the same as the base model's fine-tuning data),
#   3. evaluates the base model on the 500 held-out problems,
#   4. trains with configs/tiny.toml into runs/tiny,
#   5. evaluates the trained model, and renders runs/tiny/curves.svg.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cargo build --release --locked --quiet
grpo=target/release/grpo
config=configs/tiny.toml

"$grpo" data synth --out data/tiny --train 20000 --test 500 --seed 1 --max-answer 20
"$grpo" eval --config "$config"
started=$(date +%s)
"$grpo" train --config "$config"
elapsed=$(($(date +%s) - started))
"$grpo" eval --config "$config" --checkpoint runs/tiny
"$grpo" plot runs/tiny

accuracy() { sed -n 's/.*"accuracy": *\([0-9.]*\).*/\1/p' "$1" | head -1; }
echo
echo "held-out greedy accuracy: base $(accuracy runs/tiny/eval/test-base.json)" \
  "-> after GRPO $(accuracy runs/tiny/eval/test-final.json) (training took ${elapsed} s);" \
  "curves: runs/tiny/curves.svg"
