//! `grpo eval`: a model or checkpoint answers every question of a dataset split, greedily (or K
//! sampled times for pass@K and maj@K), and is scored with the configured rewards.
//!
//! Accuracy is the mean of `correctness` (computed even when it is not a configured reward);
//! the format rate is the fraction of completions with the full `hard_format` reward. The
//! report goes to `output_dir/eval/<split>-<step>.json` and every completion, with its rewards,
//! to `<split>-<step>.jsonl` next to it (the split's name made safe for a file name, so no
//! report lands outside `output_dir/eval`).

use std::collections::HashMap;
use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::config::Config;
use crate::data::Dataset;
use crate::device::Runtime;
use crate::progress::Progress;
use crate::rewards::{extract_answer, Completion, RewardParams, RewardSet};
use crate::sample::{GeneratedText, Generator, ModelChoice};
use crate::sampling::SamplingParams;

/// Questions completed per generation batch.
const QUESTIONS_PER_BATCH: usize = 8;
/// `hard_format`'s reward for a completion in the exact format.
const HARD_FORMAT_MAX: f64 = 0.5;

/// What to evaluate, besides the config.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EvalOptions {
    /// An HF-format model folder (e.g. `output_dir/checkpoint-N`) or a PEFT adapter folder;
    /// `None`: model_name_or_path (with adapter_name_or_path).
    pub checkpoint: Option<PathBuf>,
    /// The base model of an adapter `checkpoint`; `None`: its base_model_name_or_path.
    pub base_model: Option<String>,
    /// `None`: the config's `dataset_test_split`.
    pub split: Option<String>,
    /// Only the first N rows of the split.
    pub limit: Option<usize>,
    /// Completions per question; 1 is greedy, more are sampled with the config's settings.
    pub num_samples: usize,
}

/// The results of one evaluation, as written to `<split>-<step>.json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalReport {
    /// The model folder or hub id evaluated.
    pub model: String,
    /// `N` for a `checkpoint-N` folder, `final` for another folder, `base` for the config's model.
    pub step: String,
    pub split: String,
    pub num_questions: usize,
    pub num_samples: usize,
    /// `greedy` or `sampled`.
    pub decoding: String,
    /// Fraction of completions whose answer is correct (`correctness` > 0), the mean of the
    /// per-sample `correct` flags.
    pub accuracy: f64,
    /// Fraction of completions with the full `hard_format` reward.
    pub format_rate: f64,
    /// With K > 1 samples: fraction of questions with at least one correct completion.
    pub pass_at_k: Option<f64>,
    /// With K > 1 samples: fraction of questions whose most frequent extracted answer is correct.
    pub maj_at_k: Option<f64>,
    /// Mean of each configured reward function over the completions it rewarded (all, but for
    /// an external reward's nulls; null when it rewarded none).
    pub rewards: Map<String, Value>,
    /// Mean of the weighted total reward, over the completions some function rewarded.
    pub reward: f64,
    /// Mean completion length in tokens (EOS included).
    pub mean_completion_length: f64,
    /// Fraction of completions cut at max_completion_length.
    pub truncated_rate: f64,
    /// The report file and the per-sample file.
    pub report_path: PathBuf,
    pub samples_path: PathBuf,
}

impl EvalReport {
    /// A short table for the terminal.
    pub fn summary(&self) -> String {
        let mut rows = vec![
            ("accuracy".to_string(), format!("{:.4}", self.accuracy)),
            (
                "format rate".to_string(),
                format!("{:.4}", self.format_rate),
            ),
        ];
        let k = self.num_samples;
        if let (Some(pass), Some(maj)) = (self.pass_at_k, self.maj_at_k) {
            rows.push((format!("pass@{k}"), format!("{pass:.4}")));
            rows.push((format!("maj@{k}"), format!("{maj:.4}")));
        }
        rows.push(("reward".to_string(), format!("{:.4}", self.reward)));
        for (name, value) in &self.rewards {
            let value = value.as_f64().unwrap_or(f64::NAN);
            rows.push((format!("  {name}"), format!("{value:.4}")));
        }
        rows.push((
            "completion length".to_string(),
            format!("{:.1}", self.mean_completion_length),
        ));
        rows.push((
            "truncated".to_string(),
            format!("{:.4}", self.truncated_rate),
        ));
        let mut text = format!(
            "eval of {} (step {}) on split `{}`: {} questions × {} ({})\n",
            self.model, self.step, self.split, self.num_questions, k, self.decoding
        );
        for (name, value) in rows {
            text.push_str(&format!("  {name:<20} {value:>10}\n"));
        }
        text.push_str(&format!("  report: {}\n", self.report_path.display()));
        text
    }
}

/// Evaluates, writes the report and per-sample files under `output_dir/eval/`, and returns the
/// report.
pub fn run(config: &Config, options: &EvalOptions) -> Result<EvalReport> {
    if options.num_samples == 0 {
        bail!("--num-samples must be at least 1");
    }
    let (model, step) = match &options.checkpoint {
        Some(dir) => {
            if !dir.is_dir() {
                bail!(
                    "--checkpoint {}: no such folder (give an HF-format model or PEFT adapter \
                     folder such as output_dir/checkpoint-N)",
                    dir.display()
                );
            }
            (dir.display().to_string(), checkpoint_step(dir))
        }
        None => (config.model_name_or_path.clone(), "base".to_string()),
    };
    let split = options
        .split
        .clone()
        .unwrap_or_else(|| config.dataset_test_split.clone());
    let dataset = Dataset::from_config(config, &split)?;
    let examples = &dataset.examples()[..options
        .limit
        .map_or(dataset.len(), |n| n.min(dataset.len()))];
    let rewards = RewardSet::from_config(config)?;
    let checks = RewardSet::new(
        &["correctness".to_string(), "hard_format".to_string()],
        None,
        RewardParams::from_config(config),
    )?;
    let choice = ModelChoice::new(
        config,
        options.checkpoint.as_deref(),
        options.base_model.clone(),
    );
    let generator = Generator::load(
        &choice,
        &config.model_revision,
        config,
        &Runtime::from_config(config)?,
    )?;
    let k = options.num_samples;
    generator.ensure_fits(&[
        (
            "questions per batch",
            QUESTIONS_PER_BATCH.min(examples.len()),
        ),
        ("--num-samples", k),
    ])?;
    let params = match k {
        1 => SamplingParams {
            repetition_penalty: config.repetition_penalty as f32,
            ..SamplingParams::greedy()
        },
        _ => SamplingParams::from_config(config),
    };

    let eval_dir = Path::new(&config.output_dir).join("eval");
    fs::create_dir_all(&eval_dir)
        .with_context(|| format!("creating the eval folder {}", eval_dir.display()))?;
    let stem = format!("{}-{step}", file_name_part(&split));
    let report_path = eval_dir.join(format!("{stem}.json"));
    let samples_path = eval_dir.join(format!("{stem}.jsonl"));
    let mut samples = BufWriter::new(
        fs::File::create(&samples_path)
            .with_context(|| format!("creating {}", samples_path.display()))?,
    );

    let progress = Progress::new(examples.len() as u64, 0, "eval");
    let mut totals = Totals::new(rewards.names().len());
    for (batch_index, batch) in examples.chunks(QUESTIONS_PER_BATCH).enumerate() {
        let first = batch_index * QUESTIONS_PER_BATCH;
        let questions: Vec<&str> = batch.iter().map(|e| e.question.as_str()).collect();
        let seed = config.seed.wrapping_add(first as u64);
        let completions = generator
            .complete(&questions, k, params, seed)
            .with_context(|| format!("generating for rows {first}..{}", first + batch.len()))?;
        let messages: Vec<_> = batch
            .iter()
            .map(|example| generator.messages(&example.question))
            .collect();
        let scored: Vec<Completion> = completions
            .iter()
            .enumerate()
            .map(|(row, generated)| generated.to_score(&batch[row / k], &messages[row / k]))
            .collect();
        let scores = rewards.score(&scored, None)?;
        let checked = checks.score(&scored, None)?;
        let mut rows = scores.iter().zip(&checked);
        for (example, group) in batch.iter().zip(completions.chunks(k)) {
            let mut answers = Vec::with_capacity(k);
            for (sample, generated) in group.iter().enumerate() {
                let (scores, checked) = rows.next().context("one score per completion")?;
                let correct = checked[0] > 0.0;
                totals.add_completion(
                    scores,
                    rewards.total(scores),
                    correct,
                    checked[1] >= HARD_FORMAT_MAX,
                    generated,
                );
                answers.push((extract_answer(&generated.text), correct));
                let named: Map<String, Value> = rewards
                    .names()
                    .iter()
                    .zip(scores)
                    .map(|(name, value)| (name.clone(), json!(value)))
                    .collect();
                let line = json!({
                    "question": example.question,
                    "answer": example.answer,
                    "sample": sample,
                    "completion": generated.text,
                    "rewards": named,
                    "reward": rewards.total(scores),
                    "correct": correct,
                    "length": generated.length,
                    "truncated": generated.truncated,
                });
                serde_json::to_writer(&mut samples, &line)?;
                writeln!(samples)?;
            }
            totals.add_question(&answers);
        }
        progress.log_step((first + batch.len()) as u64, "questions");
    }
    progress.finish();
    samples
        .flush()
        .with_context(|| format!("writing {}", samples_path.display()))?;

    let report = totals.report(ReportHeader {
        model,
        step,
        split,
        k,
        rewards: &rewards,
        report_path,
        samples_path,
    });
    let text = serde_json::to_string_pretty(&report)?;
    fs::write(&report.report_path, text + "\n")
        .with_context(|| format!("writing {}", report.report_path.display()))?;
    Ok(report)
}

/// `name` as part of a file name in `output_dir/eval`: letters, digits, `-`, `_` and `.` are
/// kept, anything else (path separators included) becomes `_`, and a leading `.` too, so no
/// split name can place a report outside the folder or hide it.
fn file_name_part(name: &str) -> String {
    name.chars()
        .enumerate()
        .map(|(i, c)| match c {
            '.' if i == 0 => '_',
            c if c.is_alphanumeric() || matches!(c, '-' | '_' | '.') => c,
            _ => '_',
        })
        .collect()
}

/// The step a model folder stands for: `N` for `checkpoint-N`, else `final`.
fn checkpoint_step(dir: &Path) -> String {
    dir.file_name()
        .and_then(|name| name.to_str())
        .and_then(|name| name.strip_prefix("checkpoint-"))
        .filter(|step| !step.is_empty() && step.bytes().all(|b| b.is_ascii_digit()))
        .map_or_else(|| "final".to_string(), str::to_string)
}

/// Running sums over completions and questions.
struct Totals {
    completions: usize,
    questions: usize,
    /// Per reward function, and for the weighted total: the sum and count of the rewarded
    /// completions (an external reward's null is no reward, left out as in training).
    rewards: Vec<MeanOf>,
    reward: MeanOf,
    correct: usize,
    formatted: usize,
    tokens: usize,
    truncated: usize,
    any_correct: usize,
    majority_correct: usize,
}

/// What the report says besides the totals.
struct ReportHeader<'a> {
    model: String,
    step: String,
    split: String,
    k: usize,
    rewards: &'a RewardSet,
    report_path: PathBuf,
    samples_path: PathBuf,
}

impl Totals {
    fn new(num_rewards: usize) -> Self {
        Self {
            completions: 0,
            questions: 0,
            rewards: vec![MeanOf::default(); num_rewards],
            reward: MeanOf::default(),
            correct: 0,
            formatted: 0,
            tokens: 0,
            truncated: 0,
            any_correct: 0,
            majority_correct: 0,
        }
    }

    fn add_completion(
        &mut self,
        scores: &[f64],
        total: f64,
        correct: bool,
        formatted: bool,
        generated: &GeneratedText,
    ) {
        self.completions += 1;
        for (mean, &score) in self.rewards.iter_mut().zip(scores) {
            mean.add(score);
        }
        self.reward.add(total);
        self.correct += usize::from(correct);
        self.formatted += usize::from(formatted);
        self.tokens += generated.length;
        self.truncated += usize::from(generated.truncated);
    }

    /// One question's K `(extracted answer, correct)` pairs.
    fn add_question(&mut self, answers: &[(&str, bool)]) {
        self.questions += 1;
        self.any_correct += usize::from(answers.iter().any(|&(_, correct)| correct));
        self.majority_correct += usize::from(majority_is_correct(answers));
    }

    fn report(self, header: ReportHeader) -> EvalReport {
        let per_completion = |sum: f64| sum / self.completions.max(1) as f64;
        let per_question = |count: usize| count as f64 / self.questions.max(1) as f64;
        let sampled = header.k > 1;
        EvalReport {
            model: header.model,
            step: header.step,
            split: header.split,
            num_questions: self.questions,
            num_samples: header.k,
            decoding: if sampled { "sampled" } else { "greedy" }.to_string(),
            accuracy: per_completion(self.correct as f64),
            format_rate: per_completion(self.formatted as f64),
            pass_at_k: sampled.then(|| per_question(self.any_correct)),
            maj_at_k: sampled.then(|| per_question(self.majority_correct)),
            rewards: header
                .rewards
                .names()
                .iter()
                .zip(&self.rewards)
                .map(|(name, mean)| (name.clone(), json!(mean.value())))
                .collect(),
            reward: self.reward.value(),
            mean_completion_length: per_completion(self.tokens as f64),
            truncated_rate: per_completion(self.truncated as f64),
            report_path: header.report_path,
            samples_path: header.samples_path,
        }
    }
}

/// A running mean of the values that are not NaN.
#[derive(Debug, Clone, Copy, Default)]
struct MeanOf {
    sum: f64,
    count: usize,
}

impl MeanOf {
    fn add(&mut self, value: f64) {
        if !value.is_nan() {
            self.sum += value;
            self.count += 1;
        }
    }

    /// The mean; NaN (written as null) when nothing was added.
    fn value(&self) -> f64 {
        self.sum / self.count as f64
    }
}

/// Whether the most frequent extracted answer (the first one seen among equally frequent ones)
/// is a correct one.
fn majority_is_correct(answers: &[(&str, bool)]) -> bool {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for &(answer, _) in answers {
        *counts.entry(answer).or_default() += 1;
    }
    let mut best: Option<(&str, usize, bool)> = None;
    for &(answer, correct) in answers {
        let count = counts[answer];
        if best.is_none_or(|(_, best_count, _)| count > best_count) {
            best = Some((answer, count, correct));
        }
    }
    best.is_some_and(|(_, _, correct)| correct)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_comes_from_the_checkpoint_folder_name() {
        assert_eq!(checkpoint_step(Path::new("out/checkpoint-120")), "120");
        assert_eq!(checkpoint_step(Path::new("out/checkpoint-120/")), "120");
        assert_eq!(checkpoint_step(Path::new("out")), "final");
        assert_eq!(checkpoint_step(Path::new("out/checkpoint-x")), "final");
    }

    #[test]
    fn split_names_cannot_leave_the_eval_folder() {
        assert_eq!(file_name_part("test"), "test");
        assert_eq!(file_name_part("validation_2.v1"), "validation_2.v1");
        assert_eq!(file_name_part("../../x"), "_._.._x");
        assert_eq!(file_name_part("/etc/passwd"), "_etc_passwd");
        assert_eq!(file_name_part(".hidden"), "_hidden");
        assert_eq!(file_name_part("a\\b"), "a_b");
    }

    #[test]
    fn majority_vote_takes_the_most_frequent_answer() {
        assert!(majority_is_correct(&[
            ("3", false),
            ("4", true),
            ("4", true)
        ]));
        assert!(!majority_is_correct(&[
            ("3", false),
            ("4", true),
            ("3", false)
        ]));
        // A tie goes to the answer seen first.
        assert!(majority_is_correct(&[("4", true), ("3", false)]));
        assert!(!majority_is_correct(&[("3", false), ("4", true)]));
        assert!(!majority_is_correct(&[]));
    }
}
