#!/usr/bin/env python3
"""Side-by-side speed and memory of TRL's GRPOTrainer and `grpo train` on the CPU.

For each shape it makes the inputs (one prompts parquet, one model folder), runs TRL in its own
process, then `grpo train` in its own process, on the same model folder, prompts and settings,
and prints the ratio of median step times (first step excluded) and of peak memory.

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


def run_measured(cmd, env, log_path: Path) -> dict:
    """Runs cmd to completion, output to log_path. Peak memory: the largest VmHWM or VmRSS seen by
    polling /proc/<pid>/status every 20 ms. VmHWM is the kernel's exact peak since the process
    started or since its last reset (both sides reset it at each step start), so only a peak
    followed by a reset within one polling interval can be missed."""
    print("+", " ".join(str(c) for c in cmd), f"> {log_path}", flush=True)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(c) for c in cmd], env=env, stdout=log, stderr=subprocess.STDOUT)
        peak = [0]
        done = threading.Event()

        def poll():
            while not done.is_set():
                for key in ("VmHWM", "VmRSS"):
                    v = _status_kib(proc.pid, key)
                    if v is not None and v > peak[0]:
                        peak[0] = v
                time.sleep(0.02)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        _, status, _ = os.wait4(proc.pid, 0)
        done.set()
        poller.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-4000:]
        raise SystemExit(f"{cmd[0]} exited with {proc.returncode}; end of {log_path}:\n{tail}")
    # Not ru_maxrss: it also counts the forked copy of this (large) Python process before exec.
    return {"wall_s": wall, "peak_rss_gib": peak[0] / 2**20, "load_before": load_before,
            "load_after": os.getloadavg()[0]}


def thread_env(threads: int) -> dict:
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS"):
        env[key] = str(threads)
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env["HF_DATASETS_OFFLINE"] = "1"
    return env


def run_grpo(grpo: Path, shape: str, model: Path, prompts: dict, steps: int, run_dir: Path, threads: int) -> dict:
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
        "device": "cpu",
        "output_dir": str(out),
        "max_steps": steps,
        "per_device_train_batch_size": spec["prompts"],  # grpo: prompts per micro-step
        "num_generations": spec["generations"],
        "max_prompt_length": 4096,  # no truncation; TRL does not truncate prompts
        "max_completion_length": spec["completion"],
        "logging_steps": 1,
        "save_steps": 1_000_000,
        "report_to": "none",
        **COMMON,
    }
    toml_path = run_dir / "grpo.toml"
    toml_path.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in config.items()))
    measured = run_measured([grpo, "train", "--config", toml_path], thread_env(threads), run_dir / "grpo.log")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps_out = []
    for i, row in enumerate(rows):
        step = {
            "step": row.get("step", i + 1),
            "step_time": row["step_time"],
            "completion_length": row.get("completions/mean_length"),
            "step_peak_rss_gib": row.get("memory/peak_gib"),
            "num_tokens": row.get("num_tokens"),
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


def run_trl(shape: str, model: Path, prompts: dict, steps: int, run_dir: Path, threads: int) -> dict:
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
        "common": COMMON,
    }
    job_path = run_dir / "trl_job.json"
    job_path.write_text(json.dumps(job, indent=2))
    measured = run_measured([sys.executable, __file__, "--trl-worker", job_path], thread_env(threads), run_dir / "trl.log")
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
    args = GRPOConfig(
        output_dir=job["output_dir"],
        max_steps=job["max_steps"],
        per_device_train_batch_size=job["per_device_train_batch_size"],
        num_generations=job["num_generations"],
        max_completion_length=job["max_completion_length"],
        gradient_checkpointing=False,
        fp16=False,
        use_cpu=True,
        use_vllm=False,
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
    }, indent=2))


# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------


def median_after_first(values):
    rest = [v for v in values[1:] if v is not None]
    return statistics.median(rest) if rest else float("nan")


def summarize(shape: str, trl: dict, grpo: dict) -> dict:
    spec = SHAPES[shape]
    s = {"shape": shape, "prompts": spec["prompts"], "generations": spec["generations"],
         "completion": spec["completion"]}
    for side, r in (("trl", trl), ("grpo", grpo)):
        times = [st["step_time"] for st in r["steps"]]
        s[f"{side}_step_times"] = times
        s[f"{side}_median_s"] = median_after_first(times)
        s[f"{side}_peak_rss_gib"] = r["peak_rss_gib"]
        s[f"{side}_step_peak_rss_gib"] = max((st["step_peak_rss_gib"] or 0.0) for st in r["steps"])
        s[f"{side}_completion_length"] = statistics.mean(
            st["completion_length"] for st in r["steps"] if st["completion_length"] is not None)
        tokens = [st["num_tokens"] for st in r["steps"] if st["num_tokens"] is not None]
        s[f"{side}_tokens_per_step"] = (tokens[-1] / len(tokens)) if tokens else None
        s[f"{side}_wall_s"] = r["wall_s"]
        s[f"{side}_load"] = [r["load_before"], r["load_after"]]
        phase_names = sorted({k for st in r["steps"] for k in st.get("phases", {})})
        s[f"{side}_phases_median_s"] = {
            k: median_after_first([st.get("phases", {}).get(k) for st in r["steps"]]) for k in phase_names}
    s["speed_ratio"] = s["trl_median_s"] / s["grpo_median_s"]
    s["memory_ratio"] = s["trl_peak_rss_gib"] / s["grpo_peak_rss_gib"]
    s["step_memory_ratio"] = s["trl_step_peak_rss_gib"] / s["grpo_step_peak_rss_gib"]
    return s


def markdown(summaries: list[dict], meta: dict) -> str:
    lines = [
        f"Machine: {meta['cpu']}, {meta['nproc']} CPUs, {meta['mem_gib']:.0f} GiB RAM; threads per side: "
        f"{meta['threads']}; load average before: {meta['load_before']}, after: {meta['load_after']}",
        f"Date: {meta['date']}; grpo binary built {meta.get('grpo_binary_mtime', '?')}, tree {meta['grpo_commit']}; TRL {meta['versions'].get('trl')}, transformers "
        f"{meta['versions'].get('transformers')}, torch {meta['versions'].get('torch')}; Python {meta['python']}",
        "",
        "| shape (prompts x G x new tokens) | steps | TRL s/step | grpo s/step | TRL / grpo time | "
        "TRL peak RSS | grpo peak RSS | TRL / grpo memory | mean completion length TRL / grpo | tokens per step TRL / grpo |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        lines.append(
            f"| {s['shape']} ({s['prompts']} x {s['generations']} x {s['completion']}) | {len(s['trl_step_times'])} | "
            f"{s['trl_median_s']:.3f} | {s['grpo_median_s']:.3f} | **{s['speed_ratio']:.2f}** | "
            f"{s['trl_peak_rss_gib']:.2f} GiB | {s['grpo_peak_rss_gib']:.2f} GiB | **{s['memory_ratio']:.2f}** | "
            f"{s['trl_completion_length']:.1f} / {s['grpo_completion_length']:.1f} | "
            f"{fmt(s['trl_tokens_per_step'])} / {fmt(s['grpo_tokens_per_step'])} |"
        )
    lines += ["", "Peak memory during training steps only (VmHWM reset at each step start; max over steps):", "",
              "| shape | TRL | grpo | TRL / grpo |", "|---|---:|---:|---:|"]
    for s in summaries:
        lines.append(f"| {s['shape']} | {s['trl_step_peak_rss_gib']:.2f} GiB | {s['grpo_step_peak_rss_gib']:.2f} GiB | "
                     f"{s['step_memory_ratio']:.2f} |")
    lines += ["", "Per-step times (s), first step included:", ""]
    for s in summaries:
        lines.append(f"- {s['shape']}: TRL {fmt_list(s['trl_step_times'])}; grpo {fmt_list(s['grpo_step_times'])} "
                     f"(1-minute load average before / after: TRL {fmt_list(s['trl_load'], 2)}, "
                     f"grpo {fmt_list(s['grpo_load'], 2)})")
    lines += ["", "Phase medians (s/step, first step excluded). grpo: its `timing/*` keys (`reference+rewards` is "
              "`timing/reference` + `timing/rewards`). TRL: `generation` is its `transformers.generate` profiling "
              "time, `reference+rewards` the rest of `_prepare_inputs`, `policy` the rest of `training_step` "
              "(forward, loss, backward), `optimizer` the rest of the step (clipping, optimizer step, schedule, "
              "zero_grad).", ""]
    names = ["generation", "reference+rewards", "policy", "optimizer"]
    lines += ["| shape | side | " + " | ".join(names) + " | other keys |", "|---|---|" + "---:|" * len(names) + "---|"]
    for s in summaries:
        for side in ("trl", "grpo"):
            ph = s[f"{side}_phases_median_s"]
            if not ph:
                continue
            cells = [f"{ph[n]:.3f}" if n in ph else "-" for n in names]
            other = ", ".join(f"`{k}` {v:.3f}" for k, v in ph.items() if k not in names)
            lines.append(f"| {s['shape']} | {side} | " + " | ".join(cells) + f" | {other} |")
    return "\n".join(lines) + "\n"


def fmt(v):
    return "-" if v is None else f"{v:.0f}"


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
                        "(default tiny=6,mid=6,qwen05b=4); the first step is left out of the median")
    p.add_argument("--out", type=Path, default=REPO / "target" / "vs_trl", help="results and work folder")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of each side")
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
    steps = parse_steps(a.steps)
    out = a.out.resolve()
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    # Run a copy, so that a rebuild of the binary during the run cannot mix two builds.
    snapshot = work / "grpo"
    shutil.copy2(grpo, snapshot)
    meta = machine_meta(a.threads, grpo)
    meta["grpo_binary_mtime"] = datetime.datetime.fromtimestamp(grpo.stat().st_mtime).strftime("%Y-%m-%d %H:%M:%S")
    grpo = snapshot
    print(f"machine: {meta['cpu']}, load average {meta['load_before']}", flush=True)

    prompts = prepare_prompts(grpo, work, GOLDEN, min_rows=max(steps[s] for s in shapes) * 2)
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
        trl = run_trl(shape, model, prompts, steps[shape], run_dir, a.threads)
        versions = trl["versions"]
        print(f"TRL: step times {fmt_list([s['step_time'] for s in trl['steps']])}, peak RSS "
              f"{trl['peak_rss_gib']:.2f} GiB", flush=True)
        grpo_result = run_grpo(grpo, shape, model, prompts, steps[shape], run_dir, a.threads)
        print(f"grpo: step times {fmt_list([s['step_time'] for s in grpo_result['steps']])}, peak RSS "
              f"{grpo_result['peak_rss_gib']:.2f} GiB", flush=True)
        s = summarize(shape, trl, grpo_result)
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
    (out / "results.json").write_text(json.dumps({"meta": meta, "common": COMMON, "shapes": summaries}, indent=2,
                                                 default=str))
    print("\n" + md)
    print(f"written: {out / 'results.md'}, {out / 'results.json'}")


if __name__ == "__main__":
    main()
