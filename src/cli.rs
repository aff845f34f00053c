//! The command line: `grpo train | sft | eval | sample | score`, each reading the same config
//! (`--config`, `--set`, `--print-config`), the tools `grpo data synth`, `grpo plot`,
//! `grpo init-model`, `grpo merge` and `grpo check`, plus logging setup and the mapping of errors
//! to exit codes. Each command is one function called from [`run`].

use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use candle_core::DType;
use clap::{ArgAction, Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use crate::config::{Config, DeviceChoice};
use crate::eval::{self, EvalOptions};
use crate::rewards::RewardSet;
use crate::sample::{self, ModelChoice, PromptSource};
use crate::score::score_jsonl;

/// GRPO (the rule-reward RL of DeepSeek-R1-Zero) for Qwen2.5 and Qwen3 chat models.
#[derive(Debug, Parser)]
#[command(
    name = "grpo",
    version = crate::device::VERSION,
    about = "GRPO (the rule-reward RL of DeepSeek-R1-Zero) for Qwen2.5 and Qwen3 chat models",
    long_about = "GRPO (the rule-reward RL of DeepSeek-R1-Zero) for Qwen2.5 and Qwen3 chat models, \
in one binary.\n\n\
Every command reads the same configuration: the defaults of TRL's GRPOConfig (0.14 era), then \
the file given with --config (.toml, .yaml or .yml, with TRL's field names), then each \
--set key=value. --print-config shows the result as TOML and exits. docs/CONFIG.md lists every \
field.\n\n\
Logs go to stderr at level info; -v gives debug, -vv trace, and RUST_LOG (e.g. \
RUST_LOG=grpo=debug) takes precedence when set."
)]
pub struct Cli {
    /// More log output on stderr: -v debug, -vv trace (RUST_LOG, when set, takes precedence).
    #[arg(short, long, action = ArgAction::Count, global = true)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train the policy with GRPO.
    #[command(
        long_about = "Train the policy with GRPO: for each prompt sample num_generations \
completions, score them with reward_funcs, turn group-normalised rewards into advantages and \
take an AdamW step on the clipped surrogate minus beta times the KL to the reference model. \
Checkpoints go to output_dir every save_steps steps."
    )]
    Train(TrainArgs),

    /// Supervised fine-tuning on worked solutions (the warm start before GRPO).
    #[command(
        long_about = "Supervised fine-tuning on worked solutions, the warm start before GRPO: \
each row's dataset_solution_column (GSM8K style, reasoning then `#### answer`) becomes the \
assistant turn <think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>, and the \
model learns it with cross-entropy on those tokens only. Same batching, optimiser, schedule, \
logs and checkpoints as train."
    )]
    Sft(TrainArgs),

    /// Evaluate a model or checkpoint on a dataset split.
    #[command(
        long_about = "Evaluate a model or checkpoint on a dataset split: sample \
completions for each question and report the mean of each reward and of their weighted sum. \
A PEFT LoRA adapter folder (a use_peft checkpoint) is evaluated on its base model."
    )]
    Eval(EvalArgs),

    /// Generate completions for one prompt.
    #[command(
        long_about = "Generate completions for one prompt, given as text or as a row \
of the training split, with the config's system prompt, chat template and sampling settings. \
A PEFT LoRA adapter folder (a use_peft checkpoint) is sampled on its base model."
    )]
    Sample(SampleArgs),

    /// Score completions from a JSONL file with the configured rewards.
    #[command(
        long_about = "Score completions from a JSONL file with the configured rewards \
(reward_funcs and reward_weights; without --config, the five rewards of the users' recipe with \
weight 1). Each input line is {\"completion\": ..., \"answer\": ..., \"prompt\": ...} (prompt \
optional); each output line on stdout is {\"rewards\": {name: value, ...}, \"reward\": \
weighted_sum}, in input order."
    )]
    Score(ScoreArgs),

    /// Write a randomly initialised Qwen2 or Qwen3 checkpoint shaped like a config.json.
    #[command(
        long_about = "Write a randomly initialised Qwen2 or Qwen3 checkpoint (the config's model_type) \
shaped like a config.json: \
matrices and embeddings drawn from normal(0, initializer_range), norm weights 1, biases 0, as \
transformers initialises a new model. The folder gets config.json (as given), model.safetensors \
and generation_config.json, plus tokenizer.json and tokenizer_config.json from --tokenizer-from; \
model_name_or_path can then point at it."
    )]
    InitModel(InitModelArgs),

    /// Merge a PEFT LoRA adapter into its base model, writing a full model folder.
    #[command(
        long_about = "Merge a PEFT LoRA adapter (a use_peft checkpoint or final output_dir, or \
any adapter PEFT saved) into its base model: every targeted weight becomes W + (lora_alpha / r) \
B A, as PEFT's merge_and_unload does. OUT gets a full model that transformers and grpo load \
without PEFT: config.json, model.safetensors (f32), generation_config.json and the base's \
tokenizer files. The base is the adapter's base_model_name_or_path unless --base-model says \
otherwise."
    )]
    Merge(MergeArgs),

    /// Make or inspect datasets.
    #[command(subcommand)]
    Data(DataCommand),

    /// Check this build's model against a golden folder, on a device and in f32 and bf16.
    #[command(
        long_about = "Check this build's model against a golden folder (the schema of \
tests/fixtures/golden: PyTorch and TRL values in float32), on --device and with each --dtype \
as compute dtype: the forward logits, the per-token log-probs of the policy and the reference, \
the training forward's log-probs and entropies, and for each loss type (grpo, bnpo, dr_grpo, \
dapo) the loss and the gradient of every parameter, each within the tolerance \
docs/PRECISION.md gives for the dtype. Prints a table (also written to --out); exits 1 when a \
comparison is out of tolerance."
    )]
    Check(CheckArgs),

    /// Draw the training curves of a run as an SVG.
    #[command(
        long_about = "Draw the training curves of a run as an SVG: one panel each for reward, \
accuracy (rewards/correctness/mean), kl and loss, whichever OUTPUT_DIR/metrics.jsonl logged, \
with the raw values in a light line and an exponential moving average over them."
    )]
    Plot(PlotArgs),
}

#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Write a synthetic Chinese arithmetic dataset (train.parquet and test.parquet).
    #[command(
        long_about = "Write a synthetic dataset of Chinese grade-school arithmetic word \
problems (one or two of + - * /, whole-number answers from 1 to --max-answer, default 1000) as OUT/train.parquet and \
OUT/test.parquet, with the columns of swulling/gsm8k_chinese (question, question_zh-cn, answer, \
answer_only). The same --seed gives the same files; no question appears in both splits."
    )]
    Synth(SynthArgs),
}

#[derive(Debug, Args)]
pub struct SynthArgs {
    /// Folder to write train.parquet and test.parquet into (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,

    /// Number of problems in the training split.
    #[arg(long, value_name = "N", default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..))]
    pub train: u64,

    /// Number of problems in the test split.
    #[arg(long, value_name = "M", default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..))]
    pub test: u64,

    /// Random seed; the same seed writes the same problems.
    #[arg(long, value_name = "S", default_value_t = 42)]
    pub seed: u64,

    /// Largest operand, intermediate and final result (at least 20); lower is easier.
    #[arg(long, value_name = "N", default_value_t = crate::synth::MAX_ANSWER)]
    pub max_answer: u32,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Golden folder to compare with (e.g. tests/fixtures/golden).
    #[arg(long, value_name = "DIR")]
    pub golden: PathBuf,

    /// Device: auto (CUDA when this build has it and a GPU opens, else the CPU), cpu or cuda.
    #[arg(long, value_name = "DEVICE", default_value = "auto", value_parser = parse_device)]
    pub device: DeviceChoice,

    /// Compute dtypes to check, comma-separated (f32, bf16).
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "f32,bf16",
        value_parser = parse_compute_dtype
    )]
    pub dtype: Vec<DType>,

    /// Also write the table to this file.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

fn parse_device(text: &str) -> std::result::Result<DeviceChoice, String> {
    match text {
        "auto" => Ok(DeviceChoice::Auto),
        "cpu" => Ok(DeviceChoice::Cpu),
        "cuda" => Ok(DeviceChoice::Cuda),
        _ => Err(format!("expected auto, cpu or cuda, got {text:?}")),
    }
}

fn parse_compute_dtype(text: &str) -> std::result::Result<DType, String> {
    match text {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        _ => Err(format!("expected f32 or bf16, got {text:?}")),
    }
}

#[derive(Debug, Args)]
pub struct PlotArgs {
    /// Run folder (a training output_dir) holding metrics.jsonl.
    #[arg(value_name = "OUTPUT_DIR")]
    pub output_dir: PathBuf,

    /// SVG file to write (default: OUTPUT_DIR/curves.svg, or OUTPUT_DIR/timings.svg with
    /// --timings).
    #[arg(long, value_name = "FILE.svg")]
    pub out: Option<PathBuf>,

    /// Plot where each step's time went (timing/generation, timing/policy, timing/reference,
    /// timing/optimizer, timing/rewards, generation/tokens_per_second) instead of reward,
    /// accuracy, KL and loss.
    #[arg(long)]
    pub timings: bool,
}

/// How a command finds its configuration.
#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// Config file (.toml, .yaml or .yml) with TRL's field names; without it, the defaults.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Override one config field after the file, e.g. --set beta=0.0,
    /// --set 'reward_funcs=["mark","digit"]', --set output_dir=out. The value is read as TOML;
    /// text that is not valid TOML is taken as a string. Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,

    /// Print the fully resolved config as TOML and exit, without loading a model or data.
    #[arg(long)]
    pub print_config: bool,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub config: ConfigArgs,

    /// Checkpoint folder to evaluate: a model, or a PEFT adapter on its base (default:
    /// model_name_or_path from the config, with adapter_name_or_path).
    #[arg(long, value_name = "DIR")]
    pub checkpoint: Option<PathBuf>,

    /// The base model (folder or hub id) of an adapter --checkpoint (default: the
    /// base_model_name_or_path in its adapter_config.json).
    #[arg(long, value_name = "MODEL", requires = "checkpoint")]
    pub base_model: Option<String>,

    /// Dataset split to evaluate on (default: dataset_test_split from the config).
    #[arg(long, value_name = "NAME")]
    pub split: Option<String>,

    /// Evaluate only the first N rows of the split (default: all).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub limit: Option<u64>,

    /// Completions sampled per question (default: 1).
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u64).range(1..))]
    pub num_samples: Option<u64>,
}

#[derive(Debug, Args)]
pub struct SampleArgs {
    #[command(flatten)]
    pub config: ConfigArgs,

    /// The user message to answer.
    #[arg(long, value_name = "TEXT", conflicts_with = "index")]
    pub prompt: Option<String>,

    /// Use row N (from 0) of the training split as the prompt instead of --prompt.
    #[arg(long, value_name = "N")]
    pub index: Option<u64>,

    /// The reference answer that correctness-type rewards compare --prompt's completions with.
    /// Without it they compare with the empty string (so `correctness` is 0). --index takes the
    /// row's own answer.
    #[arg(long, value_name = "TEXT", requires = "prompt")]
    pub answer: Option<String>,

    /// Completions to sample (default: num_generations from the config).
    #[arg(long, value_name = "G", value_parser = clap::value_parser!(u64).range(1..))]
    pub num_generations: Option<u64>,

    /// Print one JSON object per completion instead of plain text.
    #[arg(long)]
    pub json: bool,

    /// Model folder to sample from: a model, or a PEFT adapter on its base (default:
    /// model_name_or_path from the config, with adapter_name_or_path).
    #[arg(long, value_name = "DIR")]
    pub checkpoint: Option<PathBuf>,

    /// The base model (folder or hub id) of an adapter --checkpoint (default: the
    /// base_model_name_or_path in its adapter_config.json).
    #[arg(long, value_name = "MODEL", requires = "checkpoint")]
    pub base_model: Option<String>,
}

#[derive(Debug, Args)]
pub struct ScoreArgs {
    #[command(flatten)]
    pub config: ConfigArgs,

    /// JSONL file of completions to score ("-" reads stdin).
    #[arg(long, value_name = "FILE.jsonl")]
    pub input: PathBuf,
}

#[derive(Debug, Args)]
pub struct InitModelArgs {
    /// The config.json whose shape (and initializer_range, dtype and token ids) to use.
    #[arg(long, value_name = "CONFIG.json")]
    pub like: PathBuf,

    /// Folder to write the checkpoint into (created; must not hold a model already).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,

    /// Seed of the random weights (the same seed gives the same weights).
    #[arg(long, value_name = "S", default_value_t = 42)]
    pub seed: u64,

    /// Model folder whose tokenizer.json and tokenizer_config.json to copy.
    #[arg(long, value_name = "DIR")]
    pub tokenizer_from: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The PEFT adapter folder (adapter_config.json and adapter_model.safetensors).
    #[arg(long, value_name = "DIR")]
    pub adapter: PathBuf,

    /// Folder to write the merged model into (created; must not hold a model or adapter).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,

    /// The base model (folder or hub id) to merge into (default: the adapter's
    /// base_model_name_or_path).
    #[arg(long, value_name = "MODEL")]
    pub base_model: Option<String>,
}

/// Parses arguments, runs the command, maps errors to a non-zero exit.
pub fn main() -> ExitCode {
    // Usage errors exit here with clap's code 2; --help and --version with 0.
    let cli = Cli::parse();
    init_logging(cli.verbose);
    crate::memory::reuse_freed_memory();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs one parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(args) => train(args),
        Command::Sft(args) => sft(args),
        Command::Eval(args) => eval(args),
        Command::Sample(args) => sample(args),
        Command::Score(args) => score(args),
        Command::Data(DataCommand::Synth(args)) => data_synth(args),
        Command::Plot(args) => plot(args),
        Command::InitModel(args) => init_model(args),
        Command::Merge(args) => merge(args),
        Command::Check(args) => check(args),
    }
}

fn train(args: TrainArgs) -> Result<()> {
    let Some(config) = args.config.resolve()? else {
        return Ok(());
    };
    crate::train::train(&config)
}

fn sft(args: TrainArgs) -> Result<()> {
    let Some(config) = args.config.resolve()? else {
        return Ok(());
    };
    crate::sft::sft(&config)
}

fn eval(args: EvalArgs) -> Result<()> {
    let Some(config) = args.config.resolve()? else {
        return Ok(());
    };
    let options = EvalOptions {
        checkpoint: args.checkpoint,
        base_model: args.base_model,
        split: args.split,
        limit: args.limit.map(usize::try_from).transpose()?,
        num_samples: args.num_samples.map_or(Ok(1), usize::try_from)?,
    };
    let report = eval::run(&config, &options)?;
    let mut stdout = io::stdout().lock();
    stdout
        .write_all(report.summary().as_bytes())
        .and_then(|()| stdout.flush())
        .context("writing the eval summary to stdout")
}

fn sample(args: SampleArgs) -> Result<()> {
    let Some(config) = args.config.resolve()? else {
        return Ok(());
    };
    let source = match (args.prompt, args.index) {
        (Some(prompt), _) => PromptSource::Text {
            prompt,
            answer: args.answer,
        },
        (None, Some(index)) => PromptSource::TrainRow(usize::try_from(index)?),
        (None, None) => bail!(
            "say what to sample from: --prompt TEXT (a user message) or --index N (row N of the \
             training split `{}`)",
            config.dataset_train_split
        ),
    };
    let num_generations = args.num_generations.map(usize::try_from).transpose()?;
    let model = ModelChoice::new(&config, args.checkpoint.as_deref(), args.base_model);
    let completions = sample::run(&config, &model, &source, num_generations)?;
    let mut stdout = io::stdout().lock();
    if args.json {
        sample::write_json(&mut stdout, &completions)?;
    } else {
        sample::write_text(&mut stdout, &completions)?;
    }
    stdout.flush().context("writing completions to stdout")
}

fn score(args: ScoreArgs) -> Result<()> {
    let Some(config) = args.config.resolve()? else {
        return Ok(());
    };
    let rewards = RewardSet::from_config(&config)?;
    let input = open_input(&args.input)?;
    let mut output = BufWriter::new(io::stdout().lock());
    let system_prompt = Some(config.system_prompt.as_str()).filter(|s| !s.is_empty());
    score_jsonl(input, &mut output, &rewards, system_prompt)
        .with_context(|| format!("scoring {}", args.input.display()))?;
    output.flush().context("writing scores to stdout")
}

fn data_synth(args: SynthArgs) -> Result<()> {
    let train = usize::try_from(args.train).context("--train is too large")?;
    let test = usize::try_from(args.test).context("--test is too large")?;
    crate::synth::write_dataset(&args.out, train, test, args.seed, args.max_answer)?;
    println!(
        "wrote {train} training and {test} test problems to {}",
        args.out.display()
    );
    Ok(())
}

fn plot(args: PlotArgs) -> Result<()> {
    let panels = match args.timings {
        true => crate::plot::Panels::Timings,
        false => crate::plot::Panels::Training,
    };
    let written = crate::plot::plot(&args.output_dir, args.out.as_deref(), panels)?;
    println!("wrote {}", written.display());
    Ok(())
}

fn init_model(args: InitModelArgs) -> Result<()> {
    crate::init_model::init_model_folder(
        &args.like,
        &args.out,
        args.seed,
        args.tokenizer_from.as_deref(),
    )?;
    tracing::info!("wrote a random model to {}", args.out.display());
    Ok(())
}

fn merge(args: MergeArgs) -> Result<()> {
    crate::merge::merge(&args.adapter, args.base_model.as_deref(), &args.out)?;
    println!("wrote the merged model to {}", args.out.display());
    Ok(())
}

fn check(args: CheckArgs) -> Result<()> {
    let device = crate::device::select_device(args.device)?;
    let report = crate::check::check_golden(&args.golden, &device, &args.dtype)?;
    let table = report.table();
    let mut stdout = io::stdout().lock();
    stdout
        .write_all(table.as_bytes())
        .and_then(|()| stdout.flush())
        .context("writing the check table to stdout")?;
    if let Some(out) = &args.out {
        std::fs::write(out, &table).with_context(|| format!("writing {}", out.display()))?;
    }
    let failed: Vec<String> = report
        .failures()
        .map(|c| format!("{} {}", c.dtype.as_str(), c.quantity))
        .collect();
    if !failed.is_empty() {
        bail!(
            "{} of {} golden comparisons on {} are out of tolerance: {}",
            failed.len(),
            report.comparisons.len(),
            report.device,
            failed.join(", ")
        );
    }
    Ok(())
}

impl ConfigArgs {
    /// The validated config, or `None` when it was printed for `--print-config`.
    fn resolve(&self) -> Result<Option<Config>> {
        let config = Config::load(self.config.as_deref(), &self.overrides)?;
        if self.print_config {
            let text = config.to_toml()?;
            let mut stdout = io::stdout().lock();
            stdout
                .write_all(text.as_bytes())
                .and_then(|()| stdout.flush())
                .context("writing the config to stdout")?;
            return Ok(None);
        }
        tracing::debug!(config = ?config, "resolved config");
        Ok(Some(config))
    }
}

fn open_input(path: &Path) -> Result<Box<dyn BufRead>> {
    if path == Path::new("-") {
        return Ok(Box::new(io::stdin().lock()));
    }
    let file = File::open(path).with_context(|| format!("opening --input {}", path.display()))?;
    Ok(Box::new(BufReader::new(file)))
}

/// Logs to stderr: RUST_LOG when set, else info / debug (-v) / trace (-vv and more).
fn init_logging(verbose: u8) {
    let default_level = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    // A subscriber set earlier (e.g. by a test harness) stays in place.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .with_ansi(io::stderr().is_terminal())
        .try_init();
}
