#!/usr/bin/env python3
"""Side-by-side speed and memory of TRL's GRPOTrainer and `grpo train`, on the CPU (float32) or
on a CUDA GPU (`--device cuda`: bf16 compute on float32 weights on both sides).

For each shape it makes the inputs (one prompts parquet, one model folder), runs TRL in its own
process, then `grpo train` in its own process, on the same model folder, prompts and settings,
and prints the ratio of median step times (first step excluded) and of peak memory (and, on a
GPU, of peak GPU memory).

Run it with the Python of a venv that has torch, transformers, trl, datasets and pyarrow
(requirements.txt); see README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
GOLDEN = REPO / "tests" / "fixtures" / "golden"

# grpo's default system prompt (docs/CONFIG.md, `system_prompt`), given explicitly to both sides.
SYSTEM_PROMPT = "\n按照如下格式生成：\n<think>\n...\n</think>\n<answer>\n...\n</answer>\n"
PROMPT_COLUMN = "question_zh-cn"
ANSWER_COLUMN = "answer_only"

# The end-of-sequence token of the benchmark models: a token added to the tokenizer at id 1000,
# the first id after the golden tokenizer's 1000 tokens. See prepare_model().
BENCH_EOS = "<|bench_eos|>"
BENCH_EOS_ID = 1000
PAD_ID = 997  # <|endoftext|>, the golden tokenizer's pad and bos token

# prompts per step x completions per prompt (num_generations) x new tokens per completion
SHAPES = {
    "tiny": {"config": None, "prompts": 1, "generations": 16, "completion": 64, "steps": 6},
    "mid": {"config": HERE / "mid.json", "prompts": 1, "generations": 16, "completion": 64, "steps": 6},
    "qwen05b": {"config": HERE / "qwen05b.json", "prompts": 1, "generations": 4, "completion": 32, "steps": 4},
    # The users' seed recipe (configs/qwen05b.toml) on a Qwen2.5-0.5B-shaped model: G = 16,
    # 200-token completions, 4 micro-steps per optimizer step (one prompt each), grpo's
    # forward_batch_size 8, and the recipe's optimiser settings (SEED below). For a GPU.
    "seed": {"config": HERE / "qwen05b.json", "prompts": 1, "generations": 16, "completion": 200, "steps": 3,
             "settings": "SEED"},
}

# Settings both sides get (TRL's GRPOConfig names, which grpo shares).
COMMON = {
    "learning_rate": 1e-6,
    "lr_scheduler_type": "linear",
    "warmup_steps": 0,
    "weight_decay": 0.0,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_epsilon": 1e-8,
    "max_grad_norm": 1.0,
    "temperature": 0.9,
    "top_p": 1.0,
    "top_k": 0,
    "repetition_penalty": 1.0,
    "beta": 0.04,
    "epsilon": 0.2,
    "num_iterations": 1,
    "loss_type": "grpo",
    "scale_rewards": "group",
    "mask_truncated_completions": False,
    "gradient_accumulation_steps": 1,
    "bf16": False,
    "seed": 42,
}


# What the seed recipe (configs/qwen05b.toml) sets beyond COMMON, for the `seed` shape. Its
# warmup (warmup_ratio 0.1) is left out: transformers 5 takes it as warmup_steps=0.1 and grpo as
# warmup_ratio; it changes no step's work.
SEED = {
    "learning_rate": 5e-6,
    "lr_scheduler_type": "cosine",
    "adam_beta2": 0.99,
    "weight_decay": 0.1,
    "max_grad_norm": 0.1,
    "gradient_accumulation_steps": 4,
}
SEED_GRPO_ONLY = {"forward_batch_size": 8}


def settings(shape: str, device: str) -> dict:
    """The settings both sides get for a shape on a device: COMMON, the seed recipe's for the
    seed shape, bf16 on CUDA."""
    out = dict(COMMON)
    if SHAPES[shape].get("settings") == "SEED":
        out.update(SEED)
    out["bf16"] = device == "cuda"
    return out


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def run_checked(cmd, **kwargs):
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kwargs)


def prepare_prompts(grpo: Path, work: Path, tokenizer_dir: Path, min_rows: int) -> dict:
    """Synthetic GSM8K-zh questions (`grpo data synth`), kept only those whose chat-rendered
    prompt (system + user + generation prompt) has the most common token length, so every step
    of both sides sees a prompt of the same length. Writes
    `prompts/grpo/train.parquet` (grpo's columns) and `prompts/trl.parquet` (a conversational
    `prompt` column plus the same two columns), same rows in the same order."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    synth = work / "synth"
    if not (synth / "train.parquet").exists():
        run_checked([grpo, "data", "synth", "--out", synth, "--train", 2000, "--test", 10, "--seed", 42])
    table = pq.read_table(synth / "train.parquet").to_pydict()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    def conversation(question):
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]

    lengths = []
    for question in table[PROMPT_COLUMN]:
        ids = tokenizer.apply_chat_template(conversation(question), add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        lengths.append(len(ids))
    mode = statistics.mode(lengths)
    keep = [i for i, n in enumerate(lengths) if n == mode]
    if len(keep) < min_rows:
        raise SystemExit(f"only {len(keep)} synthetic prompts of {mode} tokens, need {min_rows}")
    questions = [table[PROMPT_COLUMN][i] for i in keep]
    answers = [str(table[ANSWER_COLUMN][i]) for i in keep]

    out = work / "prompts"
    (out / "grpo").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({PROMPT_COLUMN: questions, ANSWER_COLUMN: answers}), out / "grpo" / "train.parquet")
    pq.write_table(
        pa.table(
            {
                "prompt": [conversation(q) for q in questions],
                PROMPT_COLUMN: questions,
                ANSWER_COLUMN: answers,
            }
        ),
        out / "trl.parquet",
    )
    return {"rows": len(questions), "prompt_tokens": mode, "grpo_dir": out / "grpo", "trl_file": out / "trl.parquet"}


def prepare_model(grpo: Path, shape: str, work: Path) -> Path:
    """The model folder both sides load. tiny: the golden checkpoint's weights; others: a random
    model from `grpo init-model` with the golden tokenizer. Then the end-of-sequence token is made
    one the model cannot (or, for a vocabulary larger than the tokenizer, practically never) sample,
    so every completion runs to max_completion_length on both sides: BENCH_EOS is added to the
    tokenizer at id 1000 and made the tokenizer's eos_token and the only eos_token_id of
    config.json and generation_config.json. With vocab_size 1000 (tiny, mid) no logit exists for
    id 1000; with 151,936 (qwen05b) it is one token of 151,936."""
    out = work / "models" / shape
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    spec = SHAPES[shape]
    if spec["config"] is None:
        out.mkdir()
        for name in ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]:
            shutil.copy(GOLDEN / name, out / name)
    else:
        run_checked([grpo, "init-model", "--like", spec["config"], "--out", out, "--tokenizer-from", GOLDEN])

    tok = json.loads((out / "tokenizer.json").read_text())
    assert all(t["id"] != BENCH_EOS_ID for t in tok["added_tokens"]), "tokenizer already has id 1000"
    assert max(t["id"] for t in tok["added_tokens"]) == BENCH_EOS_ID - 1
    tok["added_tokens"].append(
        {"id": BENCH_EOS_ID, "content": BENCH_EOS, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
    )
    (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False, indent=2))
    tc = json.loads((out / "tokenizer_config.json").read_text())
    tc["eos_token"] = BENCH_EOS
    tc.setdefault("added_tokens_decoder", {})[str(BENCH_EOS_ID)] = {
        "content": BENCH_EOS, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
        "special": True,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tc, ensure_ascii=False, indent=2))
    config = json.loads((out / "config.json").read_text())
    config.update({"eos_token_id": BENCH_EOS_ID, "bos_token_id": PAD_ID, "pad_token_id": PAD_ID})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": PAD_ID, "eos_token_id": [BENCH_EOS_ID], "pad_token_id": PAD_ID}, indent=2)
    )
    return out


# ---------------------------------------------------------------------------------------------
# Running a side, with its memory
# ---------------------------------------------------------------------------------------------


def _status_kib(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def gpu_memory_used_mib() -> int | None:
    """Memory in use on GPU 0, from nvidia-smi (MiB), or None without one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=10)
        return int(out.stdout.strip().splitlines()[0]) if out.returncode == 0 else None
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def run_measured(cmd, env, log_path: Path, gpu: bool = False, timeout: float | None = None) -> dict:
    """Runs cmd to completion, output to log_path. Peak memory: the largest VmHWM or VmRSS seen by
    polling /proc/<pid>/status every 20 ms. VmHWM is the kernel's exact peak since the process
    started or since its last reset (both sides reset it at each step start), so only a peak
    followed by a reset within one polling interval can be missed. With `gpu`, also the peak of
    GPU 0's used memory above what was in use before the start (nvidia-smi every 100 ms: the
    whole process's, CUDA context and allocator caches included). After `timeout` seconds the
    process is killed and the run fails."""
    print("+", " ".join(str(c) for c in cmd), f"> {log_path}", flush=True)
    load_before = os.getloadavg()[0]
    gpu_before = gpu_memory_used_mib() if gpu else None
    if gpu and gpu_before is None:
        raise SystemExit("--device cuda: nvidia-smi cannot read GPU 0's memory")
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(c) for c in cmd], env=env, stdout=log, stderr=subprocess.STDOUT)
        peak = [0]
        gpu_peak = [gpu_before or 0]
        done = threading.Event()
        timed_out = threading.Event()

        def poll():
            while not done.is_set():
                for key in ("VmHWM", "VmRSS"):
                    v = _status_kib(proc.pid, key)
                    if v is not None and v > peak[0]:
                        peak[0] = v
                time.sleep(0.02)

        def poll_gpu():
            while not done.is_set():
                v = gpu_memory_used_mib()
                if v is not None and v > gpu_peak[0]:
                    gpu_peak[0] = v
                time.sleep(0.1)

        def kill():
            timed_out.set()
            proc.kill()

        pollers = [threading.Thread(target=f, daemon=True) for f in ([poll, poll_gpu] if gpu else [poll])]
        for poller in pollers:
            poller.start()
        killer = threading.Timer(timeout, kill) if timeout is not None else None
        if killer is not None:
            killer.start()
        _, status, _ = os.wait4(proc.pid, 0)
        if killer is not None:
            killer.cancel()
        done.set()
        for poller in pollers:
            poller.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-4000:]
        why = f"was killed after {timeout:.0f} s (--side-timeout)" if timed_out.is_set() else \
            f"exited with {proc.returncode}"
        raise SystemExit(f"{cmd[0]} {why}; end of {log_path}:\n{tail}")
    # Not ru_maxrss: it also counts the forked copy of this (large) Python process before exec.
    return {"wall_s": wall, "peak_rss_gib": peak[0] / 2**20, "load_before": load_before,
            "load_after": os.getloadavg()[0],
            "peak_gpu_gib": (gpu_peak[0] - gpu_before) / 1024 if gpu else None}


def thread_env(threads: int) -> dict:
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS"):
        env[key] = str(threads)
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env["HF_DATASETS_OFFLINE"] = "1"
    return env


def run_grpo(grpo: Path, shape: str, model: Path, prompts: dict, steps: int, run_dir: Path, threads: int,
             device: str = "cpu", timeout: float | None = None) -> dict:
    spec = SHAPES[shape]
    out = run_dir / "grpo_output"
    if out.exists():
        shutil.rmtree(out)
    config = {
        "model_name_or_path": str(model),
        "dataset_name": str(prompts["grpo_dir"]),
        "dataset_prompt_column": PROMPT_COLUMN,
        "dataset_answer_column": ANSWER_COLUMN,
        "system_prompt": SYSTEM_PROMPT,
        "reward_funcs": ["repetition_penalty"],
        "device": device,
        "output_dir": str(out),
        "max_steps": steps,
        "per_device_train_batch_size": spec["prompts"],  # grpo: prompts per micro-step
        "num_generations": spec["generations"],
        "max_prompt_length": 4096,  # no truncation; TRL does not truncate prompts
        "max_completion_length": spec["completion"],
        "logging_steps": 1,
        "save_steps": 1_000_000,
        "report_to": "none",
        **settings(shape, device),
        **(SEED_GRPO_ONLY if spec.get("settings") == "SEED" else {}),
    }
    toml_path = run_dir / "grpo.toml"
    toml_path.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in config.items()))
    measured = run_measured([grpo, "train", "--config", toml_path], thread_env(threads), run_dir / "grpo.log",
                            gpu=device == "cuda", timeout=timeout)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps_out = []
    for i, row in enumerate(rows):
        step = {
            "step": row.get("step", i + 1),
            "step_time": row["step_time"],
            "completion_length": row.get("completions/mean_length"),
            "step_peak_rss_gib": row.get("memory/peak_gib"),
            "num_tokens": row.get("num_tokens"),
            "generation_tokens_per_s": row.get("generation/tokens_per_second"),
        }
        timing = {k.removeprefix("timing/"): v for k, v in row.items() if k.startswith("timing/")}
        step["timing"] = timing
        if {"generation", "reference", "rewards", "policy", "optimizer"} <= timing.keys():
            step["phases"] = {
                "generation": timing["generation"],
                "reference+rewards": timing["reference"] + timing["rewards"],
                "policy": timing["policy"],
                "optimizer": timing["optimizer"],
            }
        else:
            step["phases"] = timing
        steps_out.append(step)
    return {"steps": steps_out, **measured}


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(str(v), ensure_ascii=False)  # a JSON string is a TOML basic string


def run_trl(shape: str, model: Path, prompts: dict, steps: int, run_dir: Path, threads: int,
            device: str = "cpu", timeout: float | None = None) -> dict:
    spec = SHAPES[shape]
    out = run_dir / "trl_output"
    if out.exists():
        shutil.rmtree(out)
    job = {
        "model": str(model),
        "prompts": str(prompts["trl_file"]),
        "output_dir": str(out),
        "result": str(run_dir / "trl_result.json"),
        "threads": threads,
        "max_steps": steps,
        # TRL counts completions per device batch: one prompt's num_generations completions.
        "per_device_train_batch_size": spec["prompts"] * spec["generations"],
        "num_generations": spec["generations"],
        "max_completion_length": spec["completion"],
        "device": device,
        "common": settings(shape, device),
    }
    job_path = run_dir / "trl_job.json"
    job_path.write_text(json.dumps(job, indent=2))
    measured = run_measured([sys.executable, __file__, "--trl-worker", job_path], thread_env(threads), run_dir / "trl.log",
                            gpu=device == "cuda", timeout=timeout)
    result = json.loads((run_dir / "trl_result.json").read_text())
    return {**result, **measured}


# ---------------------------------------------------------------------------------------------
# The TRL side (runs in its own process: compare.py --trl-worker JOB.json)
# ---------------------------------------------------------------------------------------------

_CJK = "\u3001-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uff00-\uffef"
_WORD = re.compile(f"[{_CJK}]|[^\\s{_CJK}]+")


def repetition_penalty_reward(completions, **kwargs):
    """grpo's `repetition_penalty` reward (docs/REWARDS.md): (1 - distinct 3-grams / 3-grams) * -1
    over lower-cased words, each CJK character a word. Its cost is negligible either way."""
    rewards = []
    for completion in completions:
        text = completion[-1]["content"] if isinstance(completion, list) else completion
        words = _WORD.findall(text.lower())
        grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
        rewards.append(0.0 if not grams else -(1.0 - len(set(grams)) / len(grams)))
    return rewards


def _vm_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _reset_hwm() -> None:
    """As grpo does for its `memory/peak_gib`: VmHWM back to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def trl_worker(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    import torch

    torch.set_num_threads(job["threads"])
    import datasets
    import transformers
    import trl
    import trl.extras.profiling as profiling
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    # TRL times its phases (generation, log-prob passes, loss, rewards) with ProfilingContext and
    # sends them only to wandb/mlflow/trackio; keep them here instead, per step.
    phases: dict[int, dict[str, float]] = {}
    original_log = profiling.ProfilingContext._log_metrics

    def keep_phase(self, duration):
        per_step = phases.setdefault(int(self.step or 0), {})
        per_step[self.name] = per_step.get(self.name, 0.0) + duration
        return original_log(self, duration)

    profiling.ProfilingContext._log_metrics = keep_phase

    steps: list[dict] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            _reset_hwm()
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            steps.append({
                "step": state.global_step,
                "step_time": time.perf_counter() - self.started,
                "step_peak_rss_gib": _vm_kib("VmHWM") / 2**20,
            })

    common = job["common"]
    on_gpu = job.get("device", "cpu") == "cuda"
    args = GRPOConfig(
        output_dir=job["output_dir"],
        max_steps=job["max_steps"],
        per_device_train_batch_size=job["per_device_train_batch_size"],
        num_generations=job["num_generations"],
        max_completion_length=job["max_completion_length"],
        gradient_checkpointing=False,
        fp16=False,
        use_cpu=not on_gpu,
        use_vllm=False,
        # float32 weights; with bf16 (on the GPU) the Trainer computes under bf16 autocast, as
        # grpo computes in bf16 on float32 master weights.
        model_init_kwargs={"dtype": "float32", "attn_implementation": "sdpa"},
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        log_completions=False,
        **common,
    )
    dataset = datasets.load_dataset("parquet", data_files=job["prompts"], split="train")
    trainer = GRPOTrainer(
        model=job["model"],
        reward_funcs=repetition_penalty_reward,
        args=args,
        train_dataset=dataset,
        callbacks=[StepTimer()],
    )
    trainer.train()

    logs = [h for h in trainer.state.log_history if "loss" in h and "step" in h]
    by_step = {h["step"]: h for h in logs}
    for s in steps:
        h = by_step.get(s["step"], {})
        s["completion_length"] = h.get("completions/mean_length")
        s["num_tokens"] = h.get("num_tokens")
        s["trl_step_time"] = h.get("step_time")  # TRL's own: training_step only (no optimizer step)
        # ProfilingContext records the global_step at entry, i.e. the step number minus one.
        raw = phases.get(s["step"] - 1, {})
        s["trl_profiling"] = raw
        generate_time = raw.get("GRPOTrainer.transformers.generate")
        if generate_time and s["completion_length"] is not None:
            # One generation per optimizer step: every micro-step's completions at once.
            completions = job["per_device_train_batch_size"] * common.get("gradient_accumulation_steps", 1)
            s["generation_tokens_per_s"] = completions * s["completion_length"] / generate_time
        # The same four phases as grpo's timing/* keys. _prepare_inputs holds generation, the
        # reference model's log-probs and the rewards; TRL's own step_time is training_step
        # (_prepare_inputs, then the policy's forward, loss and backward); what is left of the
        # step is clipping, the optimizer step, the schedule and zero_grad.
        prepare = raw.get("GRPOTrainer._prepare_inputs")
        generate = raw.get("GRPOTrainer.transformers.generate")
        s["phases"] = {}
        if prepare is not None and generate is not None and s["trl_step_time"] is not None:
            s["phases"] = {
                "generation": generate,
                "reference+rewards": prepare - generate,
                "policy": s["trl_step_time"] - prepare,
                "optimizer": s["step_time"] - s["trl_step_time"],
            }
    Path(job["result"]).write_text(json.dumps({
        "steps": steps,
        "log_history": trainer.state.log_history,
        "eos_token_ids": list(trainer.eos_token_ids),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
                     "datasets": datasets.__version__},
        "torch_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name(0) if on_gpu else None,
    }, indent=2))


# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------


def median_after_first(values):
    rest = [v for v in values[1:] if v is not None]
    return statistics.median(rest) if rest else float("nan")


SIDES = ("trl", "grpo")


def summarize(shape: str, results: dict) -> dict:
    """Medians and peaks of each side that ran (`results`: side -> run result), and the TRL /
    grpo ratios when both did."""
    spec = SHAPES[shape]
    s = {"shape": shape, "prompts": spec["prompts"], "generations": spec["generations"],
         "completion": spec["completion"], "sides": [side for side in SIDES if side in results]}
    for side, r in results.items():
        times = [st["step_time"] for st in r["steps"]]
        s[f"{side}_step_times"] = times
        s[f"{side}_median_s"] = median_after_first(times)
        s[f"{side}_peak_rss_gib"] = r["peak_rss_gib"]
        s[f"{side}_peak_gpu_gib"] = r.get("peak_gpu_gib")
        s[f"{side}_step_peak_rss_gib"] = max((st["step_peak_rss_gib"] or 0.0) for st in r["steps"])
        s[f"{side}_completion_length"] = statistics.mean(
            st["completion_length"] for st in r["steps"] if st["completion_length"] is not None)
        tokens = [st["num_tokens"] for st in r["steps"] if st["num_tokens"] is not None]
        s[f"{side}_tokens_per_step"] = (tokens[-1] / len(tokens)) if tokens else None
        s[f"{side}_generation_tokens_per_s"] = median_after_first(
            [st.get("generation_tokens_per_s") for st in r["steps"]])
        s[f"{side}_wall_s"] = r["wall_s"]
        s[f"{side}_load"] = [r["load_before"], r["load_after"]]
        phase_names = sorted({k for st in r["steps"] for k in st.get("phases", {})})
        s[f"{side}_phases_median_s"] = {
            k: median_after_first([st.get("phases", {}).get(k) for st in r["steps"]]) for k in phase_names}
    if len(results) == len(SIDES):
        s["speed_ratio"] = s["trl_median_s"] / s["grpo_median_s"]
        s["memory_ratio"] = s["trl_peak_rss_gib"] / s["grpo_peak_rss_gib"]
        s["step_memory_ratio"] = s["trl_step_peak_rss_gib"] / s["grpo_step_peak_rss_gib"]
        if s["grpo_peak_gpu_gib"]:
            s["gpu_memory_ratio"] = s["trl_peak_gpu_gib"] / s["grpo_peak_gpu_gib"]
    return s


def cell(s: dict, key: str, spec: str = ".3f", unit: str = "") -> str:
    v = s.get(key)
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    return f"{v:{spec}}{unit}"


def markdown(summaries: list[dict], meta: dict) -> str:
    gpu = meta.get("device") == "cuda"
    where = f"GPU: {meta.get('gpu', '?')}; " if gpu else ""
    lines = [
        f"{where}Machine: {meta['cpu']}, {meta['nproc']} CPUs, {meta['mem_gib']:.0f} GiB RAM; threads per side: "
        f"{meta['threads']}; load average before: {meta['load_before']}, after: {meta['load_after']}",
        f"Date: {meta['date']}; device {meta.get('device', 'cpu')} ({'bf16 compute' if gpu else 'float32'}); grpo binary "
        f"built {meta.get('grpo_binary_mtime', '?')}, tree {meta['grpo_commit']}; TRL {meta['versions'].get('trl')}, "
        f"transformers {meta['versions'].get('transformers')}, torch {meta['versions'].get('torch')}; Python {meta['python']}",
        "",
    ]
    header = ("| shape (prompts x G x new tokens) | steps | TRL s/step | grpo s/step | TRL / grpo time | "
              "TRL peak RSS | grpo peak RSS | TRL / grpo memory |")
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|"
    if gpu:
        header += " TRL peak GPU memory | grpo peak GPU memory | TRL / grpo GPU memory |"
        rule += "---:|---:|---:|"
    header += " generation tokens/s TRL / grpo | mean completion length TRL / grpo | tokens per step TRL / grpo |"
    rule += "---:|---:|---:|"
    lines += [header, rule]
    for s in summaries:
        steps = max(len(s.get(f"{side}_step_times", [])) for side in s["sides"])
        row = (f"| {s['shape']} ({s['prompts']} x {s['generations']} x {s['completion']}) | {steps} | "
               f"{cell(s, 'trl_median_s')} | {cell(s, 'grpo_median_s')} | **{cell(s, 'speed_ratio', '.2f')}** | "
               f"{cell(s, 'trl_peak_rss_gib', '.2f', ' GiB')} | {cell(s, 'grpo_peak_rss_gib', '.2f', ' GiB')} | "
               f"**{cell(s, 'memory_ratio', '.2f')}** |")
        if gpu:
            row += (f" {cell(s, 'trl_peak_gpu_gib', '.2f', ' GiB')} | {cell(s, 'grpo_peak_gpu_gib', '.2f', ' GiB')} | "
                    f"**{cell(s, 'gpu_memory_ratio', '.2f')}** |")
        row += (f" {cell(s, 'trl_generation_tokens_per_s', '.0f')} / {cell(s, 'grpo_generation_tokens_per_s', '.0f')} | "
                f"{cell(s, 'trl_completion_length', '.1f')} / {cell(s, 'grpo_completion_length', '.1f')} | "
                f"{cell(s, 'trl_tokens_per_step', '.0f')} / {cell(s, 'grpo_tokens_per_step', '.0f')} |")
        lines.append(row)
    lines += ["", "Peak memory during training steps only (VmHWM reset at each step start; max over steps):", "",
              "| shape | TRL | grpo | TRL / grpo |", "|---|---:|---:|---:|"]
    for s in summaries:
        lines.append(f"| {s['shape']} | {cell(s, 'trl_step_peak_rss_gib', '.2f', ' GiB')} | "
                     f"{cell(s, 'grpo_step_peak_rss_gib', '.2f', ' GiB')} | {cell(s, 'step_memory_ratio', '.2f')} |")
    lines += ["", "Per-step times (s), first step included:", ""]
    for s in summaries:
        parts = [f"{side} {fmt_list(s[f'{side}_step_times'])} (1-minute load average before / after "
                 f"{fmt_list(s[f'{side}_load'], 2)})" for side in s["sides"]]
        lines.append(f"- {s['shape']}: " + "; ".join(parts))
    lines += ["", "Phase medians (s/step, first step excluded). grpo: its `timing/*` keys (`reference+rewards` is "
              "`timing/reference` + `timing/rewards`). TRL: `generation` is its `transformers.generate` profiling "
              "time, `reference+rewards` the rest of `_prepare_inputs`, `policy` the rest of `training_step` "
              "(forward, loss, backward), `optimizer` the rest of the step (clipping, optimizer step, schedule, "
              "zero_grad).", ""]
    names = ["generation", "reference+rewards", "policy", "optimizer"]
    lines += ["| shape | side | " + " | ".join(names) + " | other keys |", "|---|---|" + "---:|" * len(names) + "---|"]
    for s in summaries:
        for side in s["sides"]:
            ph = s[f"{side}_phases_median_s"]
            if not ph:
                continue
            cells = [f"{ph[n]:.3f}" if n in ph else "-" for n in names]
            other = ", ".join(f"`{k}` {v:.3f}" for k, v in ph.items() if k not in names)
            lines.append(f"| {s['shape']} | {side} | " + " | ".join(cells) + f" | {other} |")
    return "\n".join(lines) + "\n"


def fmt_list(values, digits=3):
    return "[" + ", ".join(f"{v:.{digits}f}" for v in values) + "]"


def machine_meta(threads: int, grpo: Path) -> dict:
    cpu = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except Exception:
        pass
    mem = 0.0
    try:
        mem = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal")) / 2**20
    except Exception:
        pass
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                                capture_output=True, text=True).stdout.strip()
    except Exception:
        commit = "?"
    return {"cpu": cpu, "nproc": os.cpu_count(), "mem_gib": mem, "threads": threads,
            "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "grpo_commit": commit or "?",
            "grpo_binary": str(grpo), "python": platform.python_version(),
            "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg())}


def parse_steps(text: str | None) -> dict:
    steps = {k: v["steps"] for k, v in SHAPES.items()}
    if not text:
        return steps
    if text.isdigit():
        return {k: int(text) for k in steps}
    for part in text.split(","):
        name, _, n = part.partition("=")
        if name not in steps or not n.isdigit():
            raise SystemExit(f"--steps: expected N or shape=N,..., got {text!r}")
        steps[name] = int(n)
    return steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grpo", type=Path, default=REPO / "target" / "release" / "grpo", help="grpo binary")
    p.add_argument("--shapes", default="tiny,mid,qwen05b", help="comma-separated: " + ",".join(SHAPES))
    p.add_argument("--steps", default=None,
                   help="optimizer steps per side: N for every shape, or shape=N,... "
                        "(default tiny=6,mid=6,qwen05b=4,seed=3); the first step is left out of the median")
    p.add_argument("--out", type=Path, default=REPO / "target" / "vs_trl", help="results and work folder")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of each side")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cpu (float32) or cuda (GPU 0, bf16 compute on float32 weights, peak GPU memory measured)")
    p.add_argument("--sides", default="trl,grpo", help="which sides to run: trl,grpo (default), trl or grpo")
    p.add_argument("--side-timeout", type=float, default=None,
                   help="seconds after which a side's process is killed and the run fails (default: none)")
    p.add_argument("--trl-worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.trl_worker:
        trl_worker(a.trl_worker)
        return

    grpo = a.grpo.resolve()
    if not grpo.exists():
        raise SystemExit(f"no grpo binary at {grpo}: build it with `cargo build --release` or pass --grpo")
    shapes = [s.strip() for s in a.shapes.split(",") if s.strip()]
    for s in shapes:
        if s not in SHAPES:
            raise SystemExit(f"unknown shape {s!r}; known: {', '.join(SHAPES)}")
    sides = [s.strip() for s in a.sides.split(",") if s.strip()]
    if not sides or any(s not in SIDES for s in sides):
        raise SystemExit(f"--sides: expected trl, grpo or both, got {a.sides!r}")
    steps = parse_steps(a.steps)
    out = a.out.resolve()
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    # Run a copy, so that a rebuild of the binary during the run cannot mix two builds.
    snapshot = work / "grpo"
    shutil.copy2(grpo, snapshot)
    meta = machine_meta(a.threads, grpo)
    meta["device"] = a.device
    if a.device == "cuda":
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader",
                              "-i", "0"], capture_output=True, text=True)
        if gpu.returncode != 0:
            raise SystemExit(f"--device cuda: nvidia-smi failed: {gpu.stderr.strip()}")
        meta["gpu"] = gpu.stdout.strip()
    meta["grpo_binary_mtime"] = datetime.datetime.fromtimestamp(grpo.stat().st_mtime).strftime("%Y-%m-%d %H:%M:%S")
    grpo = snapshot
    print(f"machine: {meta['cpu']}, load average {meta['load_before']}", flush=True)

    prompts = prepare_prompts(grpo, work, GOLDEN, min_rows=max(steps[s] * micro_steps(s, a.device) for s in shapes) * 2)
    print(f"prompts: {prompts['rows']} questions, each {prompts['prompt_tokens']} prompt tokens", flush=True)

    summaries = []
    versions = {}
    for shape in shapes:
        spec = SHAPES[shape]
        print(f"\n== {shape}: {spec['prompts']} x {spec['generations']} x {spec['completion']}, {steps[shape]} steps",
              flush=True)
        model = prepare_model(grpo, shape, work)
        run_dir = work / "runs" / shape
        run_dir.mkdir(parents=True, exist_ok=True)
        results = {}
        if "trl" in sides:
            trl = run_trl(shape, model, prompts, steps[shape], run_dir, a.threads, a.device, a.side_timeout)
            versions = trl["versions"]
            results["trl"] = trl
            print(f"TRL: step times {fmt_list([s['step_time'] for s in trl['steps']])}, peak RSS "
                  f"{trl['peak_rss_gib']:.2f} GiB", flush=True)
        if "grpo" in sides:
            grpo_result = run_grpo(grpo, shape, model, prompts, steps[shape], run_dir, a.threads, a.device,
                                   a.side_timeout)
            results["grpo"] = grpo_result
            print(f"grpo: step times {fmt_list([s['step_time'] for s in grpo_result['steps']])}, peak RSS "
                  f"{grpo_result['peak_rss_gib']:.2f} GiB", flush=True)
        s = summarize(shape, results)
        if "speed_ratio" in s:
            print(f"{shape}: TRL {s['trl_median_s']:.3f} s/step, grpo {s['grpo_median_s']:.3f} s/step, "
                  f"TRL/grpo time {s['speed_ratio']:.2f}; peak RSS TRL {s['trl_peak_rss_gib']:.2f} GiB, grpo "
                  f"{s['grpo_peak_rss_gib']:.2f} GiB, TRL/grpo {s['memory_ratio']:.2f}", flush=True)
        summaries.append(s)
        (run_dir / "summary.json").write_text(json.dumps(s, indent=2))

    meta["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    meta["versions"] = versions
    meta["prompt_tokens"] = prompts["prompt_tokens"]
    md = markdown(summaries, meta)
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps({"meta": meta, "common": COMMON, "seed": SEED, "shapes": summaries},
                                                 indent=2, default=str))
    print("\n" + md)
    print(f"written: {out / 'results.md'}, {out / 'results.json'}")


def micro_steps(shape: str, device: str) -> int:
    """Prompts one optimizer step uses: prompts per micro-step times micro-steps."""
    return SHAPES[shape]["prompts"] * settings(shape, device)["gradient_accumulation_steps"]


if __name__ == "__main__":
    main()
