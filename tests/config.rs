//! The config through the library API: defaults, both file formats, overrides, validation errors
//! and the `to_toml` round-trip.

use std::path::{Path, PathBuf};

use grpo::config::{Config, DeviceChoice, LrSchedulerType, ResumeFrom};
use grpo::grpo::{ImportanceSamplingLevel, LossType, ScaleRewards};
use grpo::rewards;

fn recipe(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("configs")
        .join(name)
}

/// Writes `text` to a temporary file named `name` and loads it with `overrides`.
fn load_text(name: &str, text: &str, overrides: &[&str]) -> anyhow::Result<Config> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    Config::load(Some(&path), &overrides)
}

fn load_overrides(overrides: &[&str]) -> anyhow::Result<Config> {
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    Config::load(None, &overrides)
}

/// The error of `result` as one line, with its context chain.
fn error_of(result: anyhow::Result<Config>) -> String {
    match result {
        Ok(config) => panic!("expected an error, got {config:?}"),
        Err(error) => format!("{error:#}"),
    }
}

fn assert_mentions(message: &str, parts: &[&str]) {
    for part in parts {
        assert!(
            message.contains(part),
            "error message should mention {part:?}:\n{message}"
        );
    }
}

#[test]
fn defaults_are_trl_0_14_and_hf_training_arguments() {
    let c = Config::default();
    // GRPOConfig (TRL 0.14 era).
    assert_eq!(c.learning_rate, 1e-6);
    assert_eq!(c.beta, 0.04);
    assert_eq!(c.temperature, 0.9);
    assert_eq!(c.num_generations, 8);
    assert_eq!(c.max_prompt_length, 512);
    assert_eq!(c.max_completion_length, 256);
    assert_eq!(c.epsilon, 0.2);
    assert_eq!(c.epsilon_high, None);
    assert_eq!(c.epsilon_high(), 0.2);
    assert_eq!(c.num_iterations, 1);
    assert_eq!(c.loss_type, LossType::Grpo);
    assert_eq!(c.scale_rewards, ScaleRewards::Group);
    assert_eq!(c.top_k, 0);
    assert_eq!(c.top_p, 1.0);
    assert_eq!(c.min_p, None);
    assert_eq!(c.repetition_penalty, 1.0);
    assert!(!c.mask_truncated_completions);
    assert!(!c.log_completions);
    // TrainingArguments.
    assert_eq!(
        (c.adam_beta1, c.adam_beta2, c.adam_epsilon),
        (0.9, 0.999, 1e-8)
    );
    assert_eq!(c.weight_decay, 0.0);
    assert_eq!((c.warmup_ratio, c.warmup_steps), (0.0, 0));
    assert_eq!(c.lr_scheduler_type, LrSchedulerType::Linear);
    assert_eq!(c.max_grad_norm, 1.0);
    assert_eq!(c.num_train_epochs, 3.0);
    assert_eq!(c.max_steps, -1);
    assert_eq!(c.per_device_train_batch_size, 8);
    assert_eq!(c.gradient_accumulation_steps, 1);
    assert_eq!(
        c.forward_batch_size, 0,
        "ours: one pass over each micro-step"
    );
    assert_eq!((c.logging_steps, c.save_steps), (500, 500));
    assert_eq!(c.save_total_limit, None);
    assert_eq!(c.seed, 42);
    assert!(!c.bf16);
    assert_eq!(c.resume_from_checkpoint, None);
    // Ours.
    assert_eq!(c.reward_funcs, rewards::SEED_REWARDS);
    assert_eq!(c.reward_weights(), vec![1.0; rewards::SEED_REWARDS.len()]);
    assert_eq!(c.device, DeviceChoice::Auto);
    // LoRA: TRL ModelConfig's defaults, targets the seven Qwen projections.
    assert!(!c.use_peft);
    assert_eq!((c.lora_r, c.lora_alpha, c.lora_dropout), (16, 32.0, 0.05));
    assert_eq!(
        c.lora_target_modules,
        [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj"
        ]
    );
    assert_eq!(c.lora_modules_to_save, None);
    assert_eq!(c.adapter_name_or_path, None);
    c.validate().expect("the defaults are valid");
}

#[test]
fn load_without_file_or_overrides_is_the_default() {
    assert_eq!(Config::load(None, &[]).unwrap(), Config::default());
}

#[test]
fn toml_recipe_is_the_users_trl_recipe() {
    let c = Config::load(Some(&recipe("qwen05b.toml")), &[]).unwrap();
    assert_eq!(c.model_name_or_path, "Qwen/Qwen2.5-0.5B-Instruct");
    assert_eq!(c.dataset_name, "swulling/gsm8k_chinese");
    assert_eq!(c.dataset_prompt_column, "question_zh-cn");
    assert_eq!(c.dataset_answer_column, "answer_only");
    assert_eq!(
        c.system_prompt,
        "\n按照如下格式生成\u{ff1a}\n<think>\n...\n</think>\n<answer>\n...\n</answer>\n"
    );
    assert_eq!(
        c.reward_funcs,
        ["mark", "soft_format", "hard_format", "digit", "correctness"]
    );
    assert_eq!(c.learning_rate, 5e-6);
    assert_eq!((c.adam_beta1, c.adam_beta2), (0.9, 0.99));
    assert_eq!(c.weight_decay, 0.1);
    assert_eq!(c.warmup_ratio, 0.1);
    assert_eq!(c.lr_scheduler_type, LrSchedulerType::Cosine);
    assert_eq!(c.logging_steps, 1);
    assert!(c.bf16);
    assert_eq!(c.per_device_train_batch_size, 1);
    assert_eq!(c.gradient_accumulation_steps, 4);
    assert_eq!(c.num_generations, 16);
    assert_eq!(c.forward_batch_size, 8);
    assert_eq!(c.max_prompt_length, 256);
    assert_eq!(c.max_completion_length, 200);
    assert_eq!(c.num_train_epochs, 1.0);
    assert_eq!(c.save_steps, 100);
    assert_eq!(c.max_grad_norm, 0.1);
    assert_eq!(c.report_to, ["tensorboard"]);
    assert_eq!(c.output_dir, "output");
    // Not set by the recipe: TRL 0.14 defaults.
    assert_eq!(c.beta, 0.04);
    assert_eq!(c.temperature, 0.9);
}

#[test]
fn qwen3_recipe_is_the_qwen05b_recipe_on_qwen3_0_6b_without_thinking() {
    let qwen3 = Config::load(Some(&recipe("qwen3-0.6b.toml")), &[]).unwrap();
    assert_eq!(qwen3.model_name_or_path, "Qwen/Qwen3-0.6B");
    let enable_thinking =
        serde_json::Map::from_iter([("enable_thinking".to_string(), false.into())]);
    assert_eq!(qwen3.chat_template_kwargs, enable_thinking);
    let base = Config::load(Some(&recipe("qwen05b.toml")), &[]).unwrap();
    assert_eq!(
        Config {
            model_name_or_path: base.model_name_or_path.clone(),
            chat_template_kwargs: base.chat_template_kwargs.clone(),
            ..qwen3
        },
        base,
        "every other field is the recipe's"
    );
}

/// Every file shipped in configs/ loads: run configs (`.toml`, `.yaml`) validate, model
/// configs (`.json`) parse as a supported model.
#[test]
fn every_shipped_config_loads() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let extension = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        match extension {
            "toml" | "yaml" | "yml" => {
                Config::load(Some(&path), &[])
                    .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            }
            "json" => {
                let text = std::fs::read_to_string(&path).unwrap();
                grpo::model::Qwen2Config::parse(&text, &path.display().to_string())
                    .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            }
            _ => panic!("{}: not a config this test knows", path.display()),
        }
        seen += 1;
    }
    assert!(seen >= 2, "configs/ holds the recipes");
}

#[test]
fn chat_template_kwargs_take_any_values_and_refuse_reserved_names() {
    let c = load_text(
        "run.toml",
        "chat_template_kwargs = { enable_thinking = false, depth = 2, tags = [\"a\"] }\n",
        &[],
    )
    .unwrap();
    let kwargs = serde_json::json!({"enable_thinking": false, "depth": 2, "tags": ["a"]});
    assert_eq!(
        serde_json::Value::Object(c.chat_template_kwargs.clone()),
        kwargs
    );
    let yaml = load_text(
        "run.yaml",
        "chat_template_kwargs:\n  enable_thinking: false\n  depth: 2\n  tags: [a]\n",
        &[],
    )
    .unwrap();
    assert_eq!(yaml, c);
    for reserved in ["messages", "add_generation_prompt", "tools"] {
        let message = error_of(load_overrides(&[&format!(
            "chat_template_kwargs={{{reserved}=1}}"
        )]));
        assert_mentions(&message, &["chat_template_kwargs", reserved]);
    }
    let message = error_of(load_overrides(&["chat_template_kwargs=true"]));
    assert_mentions(&message, &["chat_template_kwargs"]);
}

#[test]
fn yaml_recipe_equals_toml_recipe() {
    let toml = Config::load(Some(&recipe("qwen05b.toml")), &[]).unwrap();
    let yaml = Config::load(Some(&recipe("qwen05b.yaml")), &[]).unwrap();
    assert_eq!(yaml, toml);
}

#[test]
fn yml_extension_is_yaml() {
    let c = load_text("run.yml", "beta: 0.0\nreport_to: [none]\n", &[]).unwrap();
    assert_eq!(c.beta, 0.0);
    assert_eq!(c.report_to, ["none"]);
}

#[test]
fn unknown_extension_is_an_error_naming_the_allowed_ones() {
    let message = error_of(load_text("run.json", "{}", &[]));
    assert_mentions(&message, &["run.json", ".toml", ".yaml", ".yml"]);
}

#[test]
fn missing_file_is_an_error_naming_it() {
    let message = error_of(Config::load(Some(Path::new("/nonexistent/run.toml")), &[]));
    assert_mentions(&message, &["/nonexistent/run.toml"]);
}

#[test]
fn empty_files_give_the_defaults() {
    assert_eq!(load_text("a.toml", "", &[]).unwrap(), Config::default());
    assert_eq!(load_text("a.yaml", "", &[]).unwrap(), Config::default());
}

#[test]
fn syntax_errors_name_the_file() {
    assert_mentions(
        &error_of(load_text("bad.toml", "beta = = 1", &[])),
        &["bad.toml", "TOML"],
    );
    assert_mentions(
        &error_of(load_text("bad.yaml", "beta: [1, 2", &[])),
        &["bad.yaml", "YAML"],
    );
    assert_mentions(
        &error_of(load_text("list.yaml", "- beta\n- 1\n", &[])),
        &["list.yaml", "mapping"],
    );
}

#[test]
fn unknown_key_names_it_and_the_nearest_valid_key() {
    let message = error_of(load_text("a.toml", "learnig_rate = 1e-5\n", &[]));
    assert_mentions(&message, &["learnig_rate", "learning_rate"]);
    let message = error_of(load_text("a.yaml", "num_generation: 4\n", &[]));
    assert_mentions(&message, &["num_generation", "num_generations"]);
    let message = error_of(load_overrides(&["max_completion_len=10"]));
    assert_mentions(&message, &["max_completion_len", "max_completion_length"]);
}

#[test]
fn wrong_types_name_the_field_and_the_value() {
    for (text, parts) in [
        ("beta = \"abc\"", &["beta", "abc"][..]),
        ("num_generations = 2.5", &["num_generations", "2.5"]),
        ("num_generations = -4", &["num_generations", "-4"]),
        ("bf16 = \"yes\"", &["bf16", "yes"]),
        ("reward_funcs = \"mark\"", &["reward_funcs", "mark"]),
        ("report_to = 3", &["report_to", "3"]),
        (
            "resume_from_checkpoint = 7",
            &["resume_from_checkpoint", "7"],
        ),
        (
            "loss_type = \"ppo\"",
            &["loss_type", "ppo", "dr_grpo", "dapo"],
        ),
        (
            "scale_rewards = \"std\"",
            &["scale_rewards", "std", "group", "batch"],
        ),
        (
            "lr_scheduler_type = \"cosin\"",
            &["lr_scheduler_type", "cosin", "constant_with_warmup"],
        ),
        ("device = \"gpu\"", &["device", "gpu", "cuda", "cpu"]),
    ] {
        let message = error_of(load_text("a.toml", text, &[]));
        assert_mentions(&message, parts);
    }
}

#[test]
fn out_of_range_values_name_field_value_and_what_is_allowed() {
    for (set, parts) in [
        ("num_generations=1", &["num_generations", "1", ">= 2"][..]),
        ("temperature=0.0", &["temperature", "0", "> 0"]),
        ("temperature=-1.0", &["temperature", "-1", "> 0"]),
        ("top_p=0.0", &["top_p", "0", "(0, 1]"]),
        ("top_p=1.5", &["top_p", "1.5", "(0, 1]"]),
        ("min_p=1.5", &["min_p", "1.5", "[0, 1]"]),
        ("beta=-0.1", &["beta", "-0.1", ">= 0"]),
        ("beta=nan", &["beta", "nan"]),
        ("epsilon=-0.2", &["epsilon", "-0.2", ">= 0"]),
        ("epsilon_high=-1.0", &["epsilon_high", "-1", ">= 0"]),
        (
            "max_prompt_length=0",
            &["max_prompt_length", "0", "[1, 2147483647]"],
        ),
        (
            "max_completion_length=0",
            &["max_completion_length", "0", "[1, 2147483647]"],
        ),
        (
            "per_device_train_batch_size=0",
            &["per_device_train_batch_size", "0", "[1, 2147483647]"],
        ),
        (
            "gradient_accumulation_steps=0",
            &["gradient_accumulation_steps", "0", "[1, 2147483647]"],
        ),
        (
            "num_iterations=0",
            &["num_iterations", "0", "[1, 2147483647]"],
        ),
        (
            "forward_batch_size=3",
            &[
                "forward_batch_size",
                "3",
                "divisor of num_generations = 8",
                "multiple",
            ],
        ),
        (
            "forward_batch_size=12",
            &[
                "forward_batch_size",
                "12",
                "divisor of num_generations = 8",
                "multiple",
            ],
        ),
        ("forward_batch_size=4", &[]),
        ("forward_batch_size=16", &[]),
        ("cpu_workers=1025", &["cpu_workers", "1025", "up to 1024"]),
        ("cpu_workers=1024", &[]),
        (
            "logging_steps=0",
            &["logging_steps", "0", "[1, 2147483647]"],
        ),
        ("save_steps=0", &["save_steps", "0", "[1, 2147483647]"]),
        ("save_total_limit=0", &["save_total_limit", "0"]),
        (
            "learning_rate=-1e-6",
            &["learning_rate", "-0.000001", ">= 0"],
        ),
        ("learning_rate=inf", &["learning_rate", "inf"]),
        ("adam_beta1=1.0", &["adam_beta1", "1", "[0, 1)"]),
        ("adam_beta2=-0.5", &["adam_beta2", "-0.5", "[0, 1)"]),
        ("adam_epsilon=0.0", &["adam_epsilon", "0", "> 0"]),
        ("weight_decay=-0.1", &["weight_decay", "-0.1", ">= 0"]),
        ("warmup_ratio=1.5", &["warmup_ratio", "1.5", "[0, 1]"]),
        ("max_grad_norm=-1.0", &["max_grad_norm", "-1", ">= 0"]),
        ("max_steps=0", &["max_steps", "0", "-1"]),
        ("max_steps=-5", &["max_steps", "-5", "-1"]),
        ("num_train_epochs=0", &["num_train_epochs", "0", "> 0"]),
        (
            "repetition_penalty=0.0",
            &["repetition_penalty", "0", "> 0"],
        ),
        ("output_dir=''", &["output_dir", "non-empty"]),
        (
            "model_name_or_path=''",
            &["model_name_or_path", "non-empty"],
        ),
        (
            "dataset_prompt_column=''",
            &["dataset_prompt_column", "non-empty"],
        ),
        (
            "report_to=\"wandb\"",
            &["report_to", "wandb", "tensorboard", "none"],
        ),
        (
            "report_to=[\"none\",\"tensorboard\"]",
            &["report_to", "none", "alone"],
        ),
        (
            "resume_from_checkpoint=''",
            &["resume_from_checkpoint", "checkpoint folder"],
        ),
        ("reward_funcs=[]", &["reward_funcs", "[]", "non-empty"]),
        (
            "reward_funcs=[\"mark\",\"mark\"]",
            &["reward_funcs", "mark", "twice"],
        ),
        (
            "reward_weights=[1.0, 2.0]",
            &[
                "reward_weights",
                "[1.0, 2.0]",
                "one weight per reward_funcs",
            ],
        ),
        ("seed=9223372036854775807", &[]),
        ("dataset_config=''", &["dataset_config", "non-empty"]),
        ("dataset_revision=''", &["dataset_revision", "non-empty"]),
        // Sizes beyond what an i32 holds are refused by name, before anything is allocated.
        (
            "per_device_train_batch_size=1000000000000000",
            &[
                "per_device_train_batch_size",
                "1000000000000000",
                "2147483647",
            ],
        ),
        (
            "max_completion_length=4000000000",
            &["max_completion_length", "4000000000", "2147483647"],
        ),
        (
            "num_generations=9223372036854775807",
            &["num_generations", "9223372036854775807", "2147483647"],
        ),
        ("top_k=3000000000", &["top_k", "3000000000", "2147483647"]),
        (
            "max_steps=2147483648",
            &["max_steps", "2147483648", "2147483647"],
        ),
        ("max_steps=2147483647", &[]),
        (
            "per_device_train_batch_size=268435456",
            &[
                "per_device_train_batch_size × num_generations",
                "268435456 × 8",
            ],
        ),
        ("per_device_train_batch_size=268435455", &[]),
        (
            "max_prompt_length=2147483500",
            &[
                "max_prompt_length + max_completion_length",
                "2147483500 + 256",
            ],
        ),
    ] {
        let result = load_overrides(&[set]);
        if parts.is_empty() {
            result.unwrap_or_else(|e| panic!("--set {set} should be valid: {e:#}"));
            continue;
        }
        let message = error_of(result);
        assert_mentions(&message, parts);
    }
}

#[test]
fn unknown_reward_name_is_refused_with_a_suggestion() {
    let message = error_of(load_overrides(&["reward_funcs=[\"mark\", \"corectness\"]"]));
    assert_mentions(
        &message,
        &[
            "reward_funcs",
            "corectness",
            "did you mean \"correctness\"",
            "tag_count",
        ],
    );
}

#[test]
fn every_available_reward_is_accepted() {
    let names: Vec<String> = rewards::AVAILABLE
        .iter()
        .map(|n| format!("{n:?}"))
        .collect();
    let c = load_overrides(&[&format!("reward_funcs=[{}]", names.join(","))]).unwrap();
    assert_eq!(c.reward_funcs, rewards::AVAILABLE);
}

#[test]
fn validation_reports_every_problem_at_once() {
    let message = error_of(load_overrides(&[
        "beta=-1.0",
        "top_p=2.0",
        "num_generations=1",
    ]));
    assert_mentions(&message, &["beta", "top_p", "num_generations"]);
}

#[test]
fn overrides_apply_after_the_file() {
    let c = Config::load(
        Some(&recipe("qwen05b.toml")),
        &[
            "beta=0.0".into(),
            "reward_funcs=[\"mark\",\"digit\"]".into(),
            "output_dir=out/run 1".into(),
            "num_generations = 4".into(),
            "loss_type=dr_grpo".into(),
            "scale_rewards=false".into(),
            "reward_weights=[0.5, 2]".into(),
            "max_steps=10".into(),
            "min_p=0.05".into(),
        ],
    )
    .unwrap();
    assert_eq!(c.beta, 0.0);
    assert_eq!(c.reward_funcs, ["mark", "digit"]);
    assert_eq!(c.output_dir, "out/run 1");
    assert_eq!(c.num_generations, 4);
    assert_eq!(c.loss_type, LossType::DrGrpo);
    assert_eq!(c.scale_rewards, ScaleRewards::None);
    assert_eq!(c.reward_weights, Some(vec![0.5, 2.0]));
    assert_eq!(c.max_steps, 10);
    assert_eq!(c.min_p, Some(0.05));
    // Untouched recipe values stay.
    assert_eq!(c.learning_rate, 5e-6);
}

#[test]
fn later_overrides_win() {
    let c = load_overrides(&["beta=0.1", "beta=0.2"]).unwrap();
    assert_eq!(c.beta, 0.2);
}

#[test]
fn string_fields_keep_override_text_that_looks_like_a_number() {
    let c = load_overrides(&["output_dir=2024", "model_revision=true"]).unwrap();
    assert_eq!(c.output_dir, "2024");
    assert_eq!(c.model_revision, "true");
}

#[test]
fn malformed_override_is_an_error() {
    assert_mentions(&error_of(load_overrides(&["beta"])), &["beta", "key=value"]);
    assert_mentions(&error_of(load_overrides(&["=1"])), &["=1", "key"]);
}

#[test]
fn report_to_takes_a_string_or_a_list() {
    assert_eq!(
        load_overrides(&["report_to=none"]).unwrap().report_to,
        ["none"]
    );
    let c = load_text("a.yaml", "report_to:\n  - tensorboard\n", &[]).unwrap();
    assert_eq!(c.report_to, ["tensorboard"]);
    assert!(c.reports_to_tensorboard());
    assert!(!load_overrides(&["report_to=none"])
        .unwrap()
        .reports_to_tensorboard());
}

#[test]
fn resume_from_checkpoint_takes_a_path_or_a_bool() {
    assert_eq!(
        load_overrides(&["resume_from_checkpoint=true"])
            .unwrap()
            .resume_from_checkpoint,
        Some(ResumeFrom::Latest)
    );
    assert_eq!(
        load_overrides(&["resume_from_checkpoint=false"])
            .unwrap()
            .resume_from_checkpoint,
        None
    );
    assert_eq!(
        load_overrides(&["resume_from_checkpoint=output/checkpoint-100"])
            .unwrap()
            .resume_from_checkpoint,
        Some(ResumeFrom::Path("output/checkpoint-100".into()))
    );
    let c = load_text("a.yaml", "resume_from_checkpoint: null\n", &[]).unwrap();
    assert_eq!(c.resume_from_checkpoint, None);
}

#[test]
fn scale_rewards_takes_trl_booleans() {
    assert_eq!(
        load_overrides(&["scale_rewards=true"])
            .unwrap()
            .scale_rewards,
        ScaleRewards::Group
    );
    assert_eq!(
        load_overrides(&["scale_rewards=false"])
            .unwrap()
            .scale_rewards,
        ScaleRewards::None
    );
    assert_eq!(
        load_overrides(&["scale_rewards=batch"])
            .unwrap()
            .scale_rewards,
        ScaleRewards::Batch
    );
}

#[test]
fn epsilon_high_defaults_to_epsilon() {
    assert_eq!(
        load_overrides(&["epsilon=0.3"]).unwrap().epsilon_high(),
        0.3
    );
    assert_eq!(
        load_overrides(&["epsilon=0.3", "epsilon_high=0.28"])
            .unwrap()
            .epsilon_high(),
        0.28
    );
}

/// TRL 1.16's loss variants and generation options, and ours (dynamic sampling): their
/// defaults, values, and every combination refused with the field, the value and the fix.
#[test]
fn loss_variants_and_generation_options() {
    let c = Config::default();
    assert_eq!(c.importance_sampling_level, ImportanceSamplingLevel::Token);
    assert_eq!(c.delta, None);
    assert_eq!(
        (c.sapo_temperature_pos, c.sapo_temperature_neg),
        (1.0, 1.05)
    );
    assert_eq!(c.top_entropy_quantile, 1.0);
    assert_eq!(
        (c.steps_per_generation, c.generation_batch_size),
        (None, None)
    );
    assert!(!c.dynamic_sampling);
    assert_eq!(c.max_resample_rounds, 10);

    let c = load_overrides(&[
        "importance_sampling_level=sequence",
        "loss_type=sapo",
        "sapo_temperature_pos=0.5",
        "top_entropy_quantile=0.2",
        "dynamic_sampling=true",
        "max_resample_rounds=3",
    ])
    .unwrap();
    assert_eq!(
        c.importance_sampling_level,
        ImportanceSamplingLevel::Sequence
    );
    assert_eq!(c.loss_type, LossType::Sapo);
    assert_eq!(c.sapo_temperature_pos, 0.5);
    assert_eq!(c.top_entropy_quantile, 0.2);
    assert!(c.dynamic_sampling);
    assert_eq!(c.max_resample_rounds, 3);
    let c = load_overrides(&["loss_type=cispo", "epsilon_high=5.0"]).unwrap();
    assert_eq!(c.loss_type, LossType::Cispo);
    let c = load_overrides(&["delta=4.0"]).unwrap();
    assert_eq!(c.delta, Some(4.0));

    // steps_per_generation as TRL resolves it: given, from generation_batch_size (completions,
    // here over micro-steps of 2 prompts x 4 completions), or gradient_accumulation_steps.
    let base = ["per_device_train_batch_size=2", "num_generations=4"];
    let resolved = |extra: &[&str]| {
        load_overrides(&[&base[..], extra].concat())
            .unwrap()
            .steps_per_generation()
    };
    assert_eq!(resolved(&["gradient_accumulation_steps=3"]), 3);
    assert_eq!(resolved(&["steps_per_generation=5"]), 5);
    assert_eq!(resolved(&["generation_batch_size=24"]), 3);

    for (sets, parts) in [
        (
            &["steps_per_generation=2", "generation_batch_size=16"][..],
            &["generation_batch_size", "steps_per_generation", "only one"][..],
        ),
        (
            &["generation_batch_size=12", "num_generations=8"],
            &[
                "generation_batch_size",
                "12",
                "multiple of num_generations = 8",
            ],
        ),
        (
            &[
                "generation_batch_size=12",
                "num_generations=4",
                "per_device_train_batch_size=2",
            ],
            &[
                "generation_batch_size",
                "12",
                "per_device_train_batch_size × num_generations = 8",
            ],
        ),
        (
            &["generation_batch_size=0"],
            &["generation_batch_size", "0", "[1, 2147483647]"],
        ),
        (
            &["steps_per_generation=0"],
            &["steps_per_generation", "0", "[1, 2147483647]"],
        ),
        (
            &["max_resample_rounds=0"],
            &["max_resample_rounds", "0", "[1, 2147483647]"],
        ),
        (
            &["delta=1.1"],
            &["delta", "1.1", "above 1 + epsilon_high = 1.2"],
        ),
        (
            &["delta=1.25", "epsilon_high=0.28"],
            &["delta", "1.25", "above 1 + epsilon_high = 1.28"],
        ),
        (
            &["delta=4.0", "loss_type=sapo"],
            &["delta", "sapo", "clipped losses"],
        ),
        (
            &["loss_type=cispo"],
            &["epsilon_high", "cispo", "5.0", "set it"],
        ),
        (
            &["loss_type=cispo", "epsilon_high=0.0"],
            &["epsilon_high", "cispo", "> 0"],
        ),
        (
            &["sapo_temperature_neg=0.0"],
            &["sapo_temperature_neg", "0", "> 0"],
        ),
        (
            &["sapo_temperature_pos=inf"],
            &["sapo_temperature_pos", "inf"],
        ),
        (
            &["top_entropy_quantile=1.5"],
            &["top_entropy_quantile", "1.5", "[0, 1]"],
        ),
        (
            &["top_entropy_quantile=-0.1"],
            &["top_entropy_quantile", "-0.1", "[0, 1]"],
        ),
        (
            &["importance_sampling_level=sentence"],
            &["importance_sampling_level", "sentence", "token", "sequence"],
        ),
        (
            &["loss_type=luspo"],
            &["loss_type", "luspo", "cispo", "sapo"],
        ),
    ] {
        assert_mentions(&error_of(load_overrides(sets)), parts);
    }
}

fn assert_round_trips(config: &Config) {
    let text = config.to_toml().unwrap();
    let back = Config::from_toml_str(&text).unwrap_or_else(|e| panic!("{e:#}\n{text}"));
    assert_eq!(&back, config, "to_toml output:\n{text}");
}

#[test]
fn to_toml_round_trips() {
    assert_round_trips(&Config::default());
    assert_round_trips(&Config::load(Some(&recipe("qwen05b.toml")), &[]).unwrap());
    let every_option_set = load_overrides(&[
        "epsilon_high=0.28",
        "min_p=0.1",
        "dataset_config=socratic",
        "dataset_revision=refs/convert/parquet",
        "save_total_limit=3",
        "reward_weights=[1.0, 0.1, 1e-7, 3.0, 0.3333333333333333]",
        "resume_from_checkpoint=true",
        "report_to=[\"tensorboard\"]",
        "learning_rate=3.14159e-7",
        "device=cpu",
        "chat_template_kwargs={enable_thinking=false, depth=2, name=\"x\", tags=[1, 2]}",
        "system_prompt='''a \"quoted\" \\ line\n'''",
        "use_peft=true",
        "lora_r=4",
        "lora_alpha=7.5",
        "lora_target_modules=\"all-linear\"",
        "lora_modules_to_save=[]",
        "adapter_name_or_path=runs/adapter",
        "delta=1.5",
        "steps_per_generation=3",
        "importance_sampling_level=sequence",
        "top_entropy_quantile=0.2",
        "dynamic_sampling=true",
    ])
    .unwrap();
    assert_round_trips(&every_option_set);
    assert_round_trips(&load_overrides(&["generation_batch_size=64"]).unwrap());
    assert_round_trips(&load_overrides(&["resume_from_checkpoint=runs/checkpoint-7"]).unwrap());
}

#[test]
fn to_toml_lists_every_field() {
    // The fields docs/CONFIG.md documents, one table row each: an oracle independent of the code.
    let docs =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/CONFIG.md"))
            .unwrap();
    let mut documented: Vec<String> = docs
        .lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .filter_map(|rest| rest.split_once('`'))
        .map(|(name, _)| name.to_string())
        .collect();
    documented.sort();
    let mut known = grpo::config::field_names();
    known.sort();
    assert_eq!(
        known, documented,
        "config keys vs the fields docs/CONFIG.md documents"
    );

    let every_option_set = load_overrides(&[
        "epsilon_high=0.28",
        "min_p=0.1",
        "save_total_limit=3",
        "reward_weights=[1.0]",
        "reward_funcs=[\"mark\"]",
        "resume_from_checkpoint=true",
        "dataset_config=main",
        "chat_template_kwargs={enable_thinking=false}",
        "use_peft=true",
        "lora_modules_to_save=[]",
        "adapter_name_or_path=runs/adapter",
        "delta=1.5",
        "steps_per_generation=2",
    ])
    .unwrap();
    for config in [Config::default(), every_option_set] {
        let text = config.to_toml().unwrap();
        // Each field is a key of the TOML table or named in the closing comment, exactly once.
        let table: toml::Table = toml::from_str(&text).unwrap();
        let mut listed: Vec<String> = table.keys().cloned().collect();
        let unset_line = text
            .lines()
            .find_map(|line| line.strip_prefix("# Unset, so their documented defaults apply: "));
        let unset: Vec<String> = unset_line
            .map(|names| names.split(", ").map(str::to_string).collect())
            .unwrap_or_default();
        for name in &unset {
            assert!(
                !table.contains_key(name),
                "{name} both set and unset:\n{text}"
            );
        }
        listed.extend(unset);
        listed.sort();
        assert_eq!(listed, documented, "to_toml output:\n{text}");
    }
}

/// The LoRA fields: a string or a list of target modules, and every bad value refused naming the
/// field and what is allowed.
#[test]
fn lora_fields_are_validated() {
    let config = load_overrides(&["use_peft=true", "lora_target_modules=\"all-linear\""]).unwrap();
    assert_eq!(config.lora_target_modules, ["all-linear"]);
    let config = load_overrides(&["lora_target_modules=[\"v_proj\", \"q_proj\"]"]).unwrap();
    assert_eq!(config.lora_target_modules, ["v_proj", "q_proj"]);
    for (set, parts) in [
        (&["lora_r=0"][..], &["lora_r", "0", "[1, 2147483647]"][..]),
        (&["lora_alpha=0.0"], &["lora_alpha", "0", "> 0"]),
        (&["lora_dropout=1.0"], &["lora_dropout", "1", "[0, 1)"]),
        (&["lora_dropout=-0.1"], &["lora_dropout", "-0.1", "[0, 1)"]),
        (
            &["lora_target_modules=[\"q_proj\", \"qproj\"]"],
            &[
                "lora_target_modules",
                "qproj",
                "did you mean \"q_proj\"",
                "all-linear",
            ],
        ),
        (
            &["lora_target_modules=[\"q_proj\", \"all-linear\"]"],
            &["lora_target_modules", "\"all-linear\" alone"],
        ),
        (
            &["lora_target_modules=[\"q_proj\", \"q_proj\"]"],
            &["lora_target_modules", "each once"],
        ),
        (&["lora_target_modules=[]"], &["lora_target_modules", "[]"]),
        (
            &["use_peft=true", "lora_modules_to_save=[\"lm_head\"]"],
            &["lora_modules_to_save", "lm_head", "not supported"],
        ),
        (
            &["adapter_name_or_path=runs/adapter"],
            &["adapter_name_or_path", "use_peft = true"],
        ),
        (
            &["use_peft=true", "adapter_name_or_path=' '"],
            &["adapter_name_or_path", "adapter folder"],
        ),
    ] {
        assert_mentions(&error_of(load_overrides(set)), parts);
    }
}
