#!/usr/bin/env bash
# One command on a machine with an NVIDIA GPU and grpo's CUDA binary (built elsewhere with
# scripts/build-cuda.sh; no Rust toolchain or network needed here). Within about 10 minutes on
# an H100/H200 it runs:
#   a. `grpo check --golden` on CUDA in f32 and bf16 (logits, log-probs, entropies, losses and
#      every parameter's gradient against tests/fixtures/golden, tolerances of docs/PRECISION.md);
#   b. the seed recipe's step (configs/qwen05b.toml: G = 16, 200-token completions, beta 0.04,
#      bf16, 4 micro-steps per optimizer step) on a Qwen2.5-0.5B-shaped random model from
#      `grpo init-model`, for --steps optimizer steps: s/step, generation tokens/s, phase times,
#      peak GPU memory;
#   c. TRL's GRPOTrainer (transformers generate, bf16, no vLLM) on the same weights, prompts and
#      settings (benches/vs_trl/compare.py --device cuda --shapes seed);
#   d. a Markdown table for docs/BENCHMARKS.md, printed and written to OUT/gpu-check.md.
# First it checks everything it needs (the binary, its CUDA libraries, the driver, Python with
# transformers, torch, pyarrow, TRL and datasets or their wheels, the golden folder) and lists every
# problem at once, exiting 1 before any work. --preflight stops after those checks.
#
# Usage: scripts/gpu-check.sh [--grpo PATH] [--out DIR] [--steps N] [--python PY] [--wheels DIR]
#                             [--cuda-libs DIR] [--golden DIR] [--side-timeout S] [--skip-trl]
#                             [--preflight]
#   --grpo PATH    the CUDA grpo binary, or it compressed (.xz or .gz, unpacked into OUT/bin:
#                  stripped it is ~73 MB, xz'd ~10 MB) (default: $GRPO_BIN, else ./grpo, else
#                  target-cuda/release/grpo)
#   --out DIR      results and work files (default target/gpu-check)
#   --steps N      optimizer steps per side (default 3; the first is left out of the medians)
#   --python PY    Python with torch and transformers (default python3)
#   --wheels DIR   wheels of trl, datasets and what they need, installed offline into a venv
#                  (with the system's packages) when trl or datasets is not importable
#                  (default wheels/ in the repository)
#   --cuda-libs DIR  a folder of CUDA 13 libraries the binary needs and the machine lacks (e.g.
#                  libcurand.so.10, which torch's wheels may not bring), each maybe .gz or .xz
#   --golden DIR   golden folder (default tests/fixtures/golden)
#   --side-timeout S  seconds each benchmark side may take before it is killed (default 240, so
#                  the whole run stays within about 10 minutes)
#   --skip-trl     run a. and b. only (Python needs transformers and pyarrow only)
#   --preflight    check what is needed, run nothing
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
grpo=${GRPO_BIN:-}
out=$repo/target/gpu-check
steps=3
python=python3
wheels=$repo/wheels
golden=$repo/tests/fixtures/golden
skip_trl=false
preflight_only=false
side_timeout=240
cuda_libs=

die() {
  echo "gpu-check: $*" >&2
  exit 2
}

while [ $# -gt 0 ]; do
  case $1 in
    --grpo) grpo=${2:?--grpo needs a path}; shift 2 ;;
    --out) out=${2:?--out needs a folder}; shift 2 ;;
    --steps) steps=${2:?--steps needs a number}; shift 2 ;;
    --python) python=${2:?--python needs an interpreter}; shift 2 ;;
    --wheels) wheels=${2:?--wheels needs a folder}; shift 2 ;;
    --golden) golden=${2:?--golden needs a folder}; shift 2 ;;
    --cuda-libs) cuda_libs=${2:?--cuda-libs needs a folder}; shift 2 ;;
    --side-timeout) side_timeout=${2:?--side-timeout needs seconds}; shift 2 ;;
    --skip-trl) skip_trl=true; shift ;;
    --preflight) preflight_only=true; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
case $steps in
  '' | *[!0-9]*) die "--steps wants a whole number of at least 2, got $steps" ;;
esac
[ "$steps" -ge 2 ] || die "--steps wants at least 2 (the first step is left out of the medians)"
case $side_timeout in
  '' | *[!0-9]*) die "--side-timeout wants whole seconds, got $side_timeout" ;;
esac

if [ -z "$grpo" ]; then
  for candidate in "$repo/grpo" "$repo/target-cuda/release/grpo"; do
    if [ -e "$candidate" ]; then grpo=$candidate; break; fi
  done
  grpo=${grpo:-$repo/grpo}
fi

problems=()
problem() { problems+=("$*"); }

# Unpacks FILE (.gz or .xz) to TARGET; says why not otherwise.
unpack() {
  case $1 in
    *.gz) gzip -dc "$1" >"$2" 2>/dev/null ;;
    *.xz) xz -dc "$1" >"$2" 2>/dev/null ;;
    *) return 1 ;;
  esac || { rm -f "$2"; problem "$1 could not be unpacked (is it really ${1##*.}-compressed?)"; return 1; }
}

# A compressed binary (small enough to carry) is unpacked first.
grpo_unpacked=true
if [[ $grpo == *.gz || $grpo == *.xz ]] && [ -f "$grpo" ]; then
  mkdir -p "$out/bin"
  if unpack "$grpo" "$out/bin/grpo"; then
    chmod +x "$out/bin/grpo"
    grpo=$out/bin/grpo
  else
    grpo_unpacked=false
  fi
fi

# The CUDA 13 libraries the binary links (cuBLAS, cuRAND, the runtime) beside the driver's
# libcuda: from --cuda-libs (compressed ones unpacked into OUT/lib), else from the NVIDIA wheels
# that torch brings.
if [ -n "$cuda_libs" ]; then
  if [ ! -d "$cuda_libs" ]; then
    problem "--cuda-libs $cuda_libs is not a folder"
  else
    for packed in "$cuda_libs"/*.so*.gz "$cuda_libs"/*.so*.xz; do
      [ -f "$packed" ] || continue
      mkdir -p "$out/lib"
      name=${packed##*/}
      unpack "$packed" "$out/lib/${name%.*}" || true
    done
    export LD_LIBRARY_PATH=$out/lib:$cuda_libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  fi
fi
python_found=false
if command -v "$python" >/dev/null 2>&1; then
  python_found=true
  if wheel_libs=$("$python" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "lib"))' 2>/dev/null) &&
    [ -d "$wheel_libs" ]; then
    export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$wheel_libs
  fi
fi

# 1. The binary: present, its libraries found, built with CUDA.
if ! $grpo_unpacked; then
  : # said above
elif [ ! -f "$grpo" ]; then
  problem "no grpo binary at $grpo: build it on a build machine with scripts/build-cuda.sh, carry target-cuda/release/grpo here, and pass --grpo PATH (or set GRPO_BIN)"
elif [ ! -x "$grpo" ]; then
  problem "$grpo is not executable (chmod +x it)"
else
  missing=$(ldd "$grpo" 2>/dev/null | awk '/not found/ { print $1 }') || missing=
  driver_lib=$(echo "$missing" | grep '^libcuda\.so' || true)
  toolkit_libs=$(echo "$missing" | grep -v '^libcuda\.so' | tr '\n' ' ' || true)
  [ -z "$driver_lib" ] || problem "the NVIDIA driver's $driver_lib is not found (is the driver installed?)"
  [ -z "${toolkit_libs// /}" ] || problem "the grpo binary needs ${toolkit_libs}which the loader does not find: carry them (from scripts/build-cuda.sh's cache, ~/.cache/grpo-cuda13/tk/nvidia/cu13/lib, each xz- or gzip-compressed if you like) in a folder and pass --cuda-libs DIR, or install the CUDA 13 wheels (nvidia-cublas, nvidia-curand, nvidia-cuda-runtime) for $python"
  if [ -z "$missing" ]; then
    if ! version=$("$grpo" --version 2>&1); then
      problem "$grpo --version failed: $version"
    elif [[ $version != *"(cuda)"* ]]; then
      problem "$grpo was built without CUDA ($version): build it with scripts/build-cuda.sh"
    fi
  fi
fi

# 2. The driver and a GPU.
gpu=
if ! command -v nvidia-smi >/dev/null 2>&1; then
  problem "no NVIDIA driver: nvidia-smi is not on PATH (is this a GPU machine, is the driver installed?)"
elif ! gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1) ||
  [ -z "$gpu" ] || [[ $gpu == *"failed"* || $gpu == *"No devices"* ]]; then
  problem "nvidia-smi finds no usable GPU: ${gpu:-no output}"
fi

# 3. Python for benches/vs_trl/compare.py: transformers (the prompts' chat template) and pyarrow
#    always, torch, TRL and datasets for TRL's side. trl, datasets and pyarrow may come as wheels.
need_import=(transformers)
need_or_wheel=(pyarrow)
$skip_trl || { need_import+=(torch); need_or_wheel+=(trl datasets); }
to_install=()
if ! $python_found; then
  problem "no Python at $python (the benchmark needs transformers and pyarrow, TRL's side torch as well): pass --python PY"
else
  for module in "${need_import[@]}"; do
    "$python" -c "import $module" >/dev/null 2>&1 || problem "$python cannot import $module"
  done
  for module in "${need_or_wheel[@]}"; do
    if ! "$python" -c "import $module" >/dev/null 2>&1; then
      to_install+=("$module")
      compgen -G "$wheels/$module-*.whl" >/dev/null ||
        problem "$python cannot import $module and $wheels has no $module wheel: carry the wheels (e.g. pip download -d wheels trl==1.16.0 datasets==5.2.0 on a machine with network, for this Python version; docs/BENCHMARKS.md) and pass --wheels DIR"
    fi
  done
fi

# 4. The golden folder.
[ -f "$golden/cases.json" ] || problem "no golden folder at $golden (no cases.json): pass --golden DIR"

if [ ${#problems[@]} -gt 0 ]; then
  for p in "${problems[@]}"; do echo "gpu-check: missing: $p" >&2; done
  echo "gpu-check: ${#problems[@]} problem(s) found; nothing was run" >&2
  exit 1
fi
echo "gpu-check: preflight passed: $grpo ($version) on $gpu"
$preflight_only && exit 0

mkdir -p "$out"
status=0

# a. Golden checks on CUDA.
echo "gpu-check: a. golden checks on CUDA (f32, bf16)"
if ! "$grpo" check --golden "$golden" --device cuda --dtype f32,bf16 --out "$out/golden.md"; then
  echo "gpu-check: the golden check FAILED (see the table above and $out/golden.md)" >&2
  status=1
fi

# b. and c. The seed recipe's step, grpo and TRL on the same model and prompts.
bench_python=$python
if [ ${#to_install[@]} -gt 0 ]; then
  echo "gpu-check: installing ${to_install[*]} from $wheels into $out/venv"
  "$python" -m venv --system-site-packages "$out/venv"
  "$out/venv/bin/python" -m pip install --quiet --no-index --find-links "$wheels" "${to_install[@]}"
  bench_python=$out/venv/bin/python
fi
sides=(--sides grpo,trl)
$skip_trl && sides=(--sides grpo)
echo "gpu-check: b./c. the seed recipe, $steps optimizer steps per side"
if ! "$bench_python" "$repo/benches/vs_trl/compare.py" --device cuda --grpo "$grpo" --shapes seed \
  --steps "seed=$steps" --side-timeout "$side_timeout" --out "$out/bench" "${sides[@]}"; then
  echo "gpu-check: the benchmark FAILED (logs under $out/bench/work/runs/seed)" >&2
  status=1
fi

# d. The table for docs/BENCHMARKS.md.
{
  echo "## GPU check: $gpu ($(date -u +%Y-%m-%d))"
  echo
  echo "grpo $version, $grpo"
  echo
  [ -f "$out/golden.md" ] && cat "$out/golden.md" && echo
  [ -f "$out/bench/results.md" ] && cat "$out/bench/results.md"
} >"$out/gpu-check.md"
echo
cat "$out/gpu-check.md"
echo "gpu-check: written $out/gpu-check.md"
exit $status
