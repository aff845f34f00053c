//! Rewards: rule rewards from a registry by name, external ones (a command or an HTTP
//! endpoint, see [`external`]), and the weighted total.
//!
//! Each rule reward is a pure function of one [`Completion`] (and, for length-aware ones, the
//! [`RewardParams`]); an external one scores a whole batch in one call. A [`RewardSet`] is the
//! configured list with its weights. The formulas, ranges and sources of every reward, and the
//! protocol of external ones, are in `docs/REWARDS.md`.

pub mod external;
mod extra;
mod numeric;
mod python;
mod seed;

use anyhow::{bail, Result};
use serde_json::{Map, Value};

use crate::prompt::Message;
use external::ExternalReward;

pub use numeric::{gold_answer, parse_number, Rational};
pub use seed::extract_answer;

/// Every reward name the registry knows, in documentation order.
pub const AVAILABLE: &[&str] = &[
    "mark",
    "soft_format",
    "hard_format",
    "digit",
    "correctness",
    "accuracy",
    "tag_count",
    "reasoning_steps",
    "cosine",
    "repetition_penalty",
    "soft_overlong_punishment",
];

/// The reward functions of the users' TRL recipe, in its order.
pub const SEED_REWARDS: &[&str] = &["mark", "soft_format", "hard_format", "digit", "correctness"];

/// One completion to score, with what reward functions may look at.
#[derive(Debug, Clone, Copy)]
pub struct Completion<'a> {
    /// The user question (may be empty when unknown).
    pub prompt: &'a str,
    /// The generated text, decoded without special tokens.
    pub text: &'a str,
    /// The dataset answer, as a string.
    pub answer: &'a str,
    /// Completion length in tokens (for length-aware rewards), if known.
    pub num_tokens: Option<usize>,
    /// The prompt as the chat messages the model was given (empty when unknown); external
    /// rewards get it as TRL's conversational `prompts`.
    pub messages: &'a [Message],
    /// The completion's token ids up to and including its EOS (empty when unknown).
    pub ids: &'a [u32],
    /// Every column of the completion's dataset row, for external rewards (`None` when not
    /// loaded).
    pub columns: Option<&'a Map<String, Value>>,
}

impl<'a> Completion<'a> {
    /// A completion known only by its text and answer (and prompt and length, when known).
    pub fn of_text(
        prompt: &'a str,
        text: &'a str,
        answer: &'a str,
        num_tokens: Option<usize>,
    ) -> Self {
        Self {
            prompt,
            text,
            answer,
            num_tokens,
            messages: &[],
            ids: &[],
            columns: None,
        }
    }
}

/// Settings that rewards need from the run config.
#[derive(Debug, Clone, Copy)]
pub struct RewardParams {
    /// For length-aware rule rewards.
    pub max_completion_length: usize,
    /// How external rewards are called.
    pub external: external::ExternalParams,
}

/// One reward function of the registry (same order as [`AVAILABLE`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reward {
    Mark,
    SoftFormat,
    HardFormat,
    Digit,
    Correctness,
    Accuracy,
    TagCount,
    ReasoningSteps,
    Cosine,
    RepetitionPenalty,
    SoftOverlongPunishment,
}

impl Reward {
    fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "mark" => Self::Mark,
            "soft_format" => Self::SoftFormat,
            "hard_format" => Self::HardFormat,
            "digit" => Self::Digit,
            "correctness" => Self::Correctness,
            "accuracy" => Self::Accuracy,
            "tag_count" => Self::TagCount,
            "reasoning_steps" => Self::ReasoningSteps,
            "cosine" => Self::Cosine,
            "repetition_penalty" => Self::RepetitionPenalty,
            "soft_overlong_punishment" => Self::SoftOverlongPunishment,
            _ => return None,
        })
    }

    fn score(self, completion: &Completion, params: &RewardParams) -> f64 {
        let text = completion.text;
        match self {
            Self::Mark => seed::mark(text),
            Self::SoftFormat => seed::soft_format(text),
            Self::HardFormat => seed::hard_format(text),
            Self::Digit => seed::digit(text),
            Self::Correctness => seed::correctness(text, completion.answer),
            Self::Accuracy => numeric::accuracy(text, completion.answer),
            Self::TagCount => extra::tag_count(text),
            Self::ReasoningSteps => extra::reasoning_steps(text),
            Self::Cosine => extra::cosine(text, completion.answer, &extra::COSINE_DEFAULTS),
            Self::RepetitionPenalty => extra::repetition_penalty(
                text,
                extra::REPETITION_NGRAM_SIZE,
                extra::REPETITION_MAX_PENALTY,
            ),
            Self::SoftOverlongPunishment => extra::soft_overlong_punishment(
                completion
                    .num_tokens
                    .unwrap_or_else(|| text.chars().count()),
                params.max_completion_length,
            ),
        }
    }
}

/// One configured reward function.
enum RewardFunction {
    Rule(Reward),
    External(ExternalReward),
}

/// The configured reward functions with their weights.
pub struct RewardSet {
    names: Vec<String>,
    weights: Vec<f64>,
    functions: Vec<RewardFunction>,
    params: RewardParams,
}

impl RewardSet {
    /// Builds the set; `weights` defaults to all 1. Unknown names, malformed external ones and a
    /// weights/names length mismatch are errors. External rewards start at their first call.
    pub fn new(names: &[String], weights: Option<&[f64]>, params: RewardParams) -> Result<Self> {
        if names.is_empty() {
            bail!(
                "reward_funcs is empty: name at least one reward function (available: {}, or an \
                 external `cmd:COMMAND` or `http://URL`)",
                AVAILABLE.join(", ")
            );
        }
        let mut functions = Vec::with_capacity(names.len());
        for (index, name) in names.iter().enumerate() {
            if names[..index].contains(name) {
                bail!(
                    "reward function `{name}` is listed twice in reward_funcs: list it once and \
                     give it a larger weight in reward_weights instead"
                );
            }
            let function = if external::is_external(name) {
                RewardFunction::External(ExternalReward::new(name, params.external)?)
            } else if let Some(reward) = Reward::from_name(name) {
                RewardFunction::Rule(reward)
            } else {
                bail!(
                    "unknown reward function `{name}` in reward_funcs (did you mean `{}`?); \
                     available: {}, or an external `cmd:COMMAND` or `http://URL`",
                    nearest_available(name),
                    AVAILABLE.join(", ")
                );
            };
            functions.push(function);
        }
        let weights = match weights {
            None => vec![1.0; names.len()],
            Some(weights) if weights.len() != names.len() => bail!(
                "reward_weights has {} entries but reward_funcs has {} ({}): give one weight per \
                 reward function, or leave reward_weights out for all 1",
                weights.len(),
                names.len(),
                names.join(", ")
            ),
            Some(weights) => {
                if let Some((name, weight)) = names
                    .iter()
                    .zip(weights)
                    .find(|(_, weight)| !weight.is_finite())
                {
                    bail!(
                        "reward_weights: the weight of `{name}` is {weight}; give a finite number"
                    );
                }
                weights.to_vec()
            }
        };
        Ok(Self {
            names: names.to_vec(),
            weights,
            functions,
            params,
        })
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn weights(&self) -> &[f64] {
        &self.weights
    }

    /// Whether some reward is external (and so wants the dataset's columns).
    pub fn has_external(&self) -> bool {
        self.functions
            .iter()
            .any(|function| matches!(function, RewardFunction::External(_)))
    }

    /// Each function's reward for each completion, `[completion][function]` in `names()`
    /// order; NaN where an external function gave no reward (null). External functions get
    /// the whole batch in one call (with `progress` when training); their failures are errors
    /// naming them.
    pub fn score(
        &self,
        completions: &[Completion],
        progress: Option<&external::TrainerProgress>,
    ) -> Result<Vec<Vec<f64>>> {
        let mut request = None;
        let mut rows = vec![Vec::with_capacity(self.functions.len()); completions.len()];
        if completions.is_empty() {
            return Ok(rows);
        }
        for function in &self.functions {
            let column: Vec<f64> = match function {
                RewardFunction::Rule(reward) => completions
                    .iter()
                    .map(|completion| reward.score(completion, &self.params))
                    .collect(),
                RewardFunction::External(reward) => {
                    let request =
                        request.get_or_insert_with(|| external::request(completions, progress));
                    reward.score(request, completions.len())?
                }
            };
            for (row, value) in rows.iter_mut().zip(column) {
                row.push(value);
            }
        }
        Ok(rows)
    }

    /// The weighted sum of per-function rewards; NaN (no reward) terms are left out, and a
    /// completion no function rewarded totals NaN (as TRL's `nansum` with unscorable rows).
    pub fn total(&self, per_function: &[f64]) -> f64 {
        let rewarded = per_function
            .iter()
            .zip(&self.weights)
            .filter(|(r, _)| !r.is_nan());
        let mut terms = rewarded.map(|(r, w)| r * w).peekable();
        if terms.peek().is_none() {
            return f64::NAN;
        }
        terms.sum()
    }
}

/// The registry name closest to `name` (Levenshtein distance over characters).
fn nearest_available(name: &str) -> &'static str {
    AVAILABLE
        .iter()
        .min_by_key(|candidate| strsim::levenshtein(name, candidate))
        .copied()
        .unwrap_or(AVAILABLE[0])
}
