//! Rule rewards: a registry by name and the weighted total.
//!
//! Each reward is a pure function of one [`Completion`] (and, for length-aware ones, the
//! [`RewardParams`]); a [`RewardSet`] is the configured list with its weights. The formulas,
//! ranges and sources of every reward are in `docs/REWARDS.md`.

mod extra;
mod numeric;
mod python;
mod seed;

use anyhow::{bail, Result};

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
}

/// Settings that length-aware rewards need from the run config.
#[derive(Debug, Clone, Copy)]
pub struct RewardParams {
    pub max_completion_length: usize,
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

/// The configured reward functions with their weights.
pub struct RewardSet {
    names: Vec<String>,
    weights: Vec<f64>,
    rewards: Vec<Reward>,
    params: RewardParams,
}

impl RewardSet {
    /// Builds the set; `weights` defaults to all 1. Unknown names and a weights/names length
    /// mismatch are errors.
    pub fn new(names: &[String], weights: Option<&[f64]>, params: RewardParams) -> Result<Self> {
        if names.is_empty() {
            bail!(
                "reward_funcs is empty: name at least one reward function (available: {})",
                AVAILABLE.join(", ")
            );
        }
        let mut rewards = Vec::with_capacity(names.len());
        for (index, name) in names.iter().enumerate() {
            let Some(reward) = Reward::from_name(name) else {
                bail!(
                    "unknown reward function `{name}` in reward_funcs (did you mean `{}`?); \
                     available: {}",
                    nearest_available(name),
                    AVAILABLE.join(", ")
                );
            };
            if names[..index].contains(name) {
                bail!(
                    "reward function `{name}` is listed twice in reward_funcs: list it once and \
                     give it a larger weight in reward_weights instead"
                );
            }
            rewards.push(reward);
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
            rewards,
            params,
        })
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn weights(&self) -> &[f64] {
        &self.weights
    }

    /// Each function's reward for one completion, in `names()` order.
    pub fn score(&self, completion: &Completion) -> Vec<f64> {
        self.rewards
            .iter()
            .map(|reward| reward.score(completion, &self.params))
            .collect()
    }

    /// The weighted sum of per-function rewards.
    pub fn total(&self, per_function: &[f64]) -> f64 {
        per_function
            .iter()
            .zip(&self.weights)
            .map(|(r, w)| r * w)
            .sum()
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
