#!/usr/bin/env bash
# Rebuilds models/tiny-base, the shipped base model of the tiny R1-Zero demo, from nothing:
#   1. the demo's synthetic problems (data/tiny),
#   2. a random Qwen2 shaped like configs/tiny-model.json, with the small Qwen2-style BPE
#      tokenizer of the test fixtures (runs/tiny-init),
#   3. `grpo sft` with configs/tiny-sft.toml (runs/tiny-sft, 1000 steps, about 15 minutes on 2
#      cores),
#   4. the model files of its checkpoint-400 copied into models/tiny-base: an early checkpoint,
#      because the demo needs a base that answers some but not most problems correctly (later
#      checkpoints get more of them right).
# CPU arithmetic differs slightly between machines, so a rebuilt model is close to, not bit for
# bit, the shipped one.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cargo build --release --locked --quiet
grpo=target/release/grpo

"$grpo" data synth --out data/tiny --train 20000 --test 500 --seed 1 --max-answer 20
rm -rf runs/tiny-init runs/tiny-sft
"$grpo" init-model --like configs/tiny-model.json --tokenizer-from tests/fixtures/golden \
  --seed 1 --out runs/tiny-init
"$grpo" sft --config configs/tiny-sft.toml
mkdir -p models/tiny-base
cp runs/tiny-sft/checkpoint-400/{config.json,generation_config.json,model.safetensors,tokenizer.json,tokenizer_config.json} \
  models/tiny-base/
echo "models/tiny-base rebuilt"
