//! `grpo score`: rewards for completions given as JSONL, one JSON line out per line in.
//!
//! Input lines are `{"completion": str, "answer": str|number, "prompt"?: str|messages,
//! "num_tokens"?: int, "completion_ids"?: [int]}`; every other key is a dataset column, sent to
//! external rewards with `answer` (rule rewards ignore them). A number answer is read as its
//! JSON text, so `1000` is "1000" like Python's `str(1000)`. Each line gives
//! `{"rewards": {"<name>": value, ...}, "reward": total}` with the rewards in the set's order and
//! `total` the weighted sum (null where no function gave a reward). Lines are scored
//! [`BATCH_LINES`] at a time, so an external reward gets one call per batch. Blank lines are
//! skipped (no output line); any other bad line stops with an error naming its 1-based line
//! number.

use std::io::{BufRead, Write};

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};

use crate::prompt::{conversation, Message};
use crate::rewards::{Completion, RewardSet};

/// Input lines scored together (one call per external reward).
pub const BATCH_LINES: usize = 64;

/// Input fields that are not dataset columns.
const OWN_FIELDS: &[&str] = &["completion", "prompt", "num_tokens", "completion_ids"];

/// Reads `{"completion", "answer", "prompt"?, ...}` lines and writes
/// `{"rewards": {...}, "reward": x}` lines in the same order. A string prompt is asked as
/// `system_prompt` (if any) then the prompt, for external rewards. A bad line is an error naming
/// its line number.
pub fn score_jsonl(
    input: impl BufRead,
    mut output: impl Write,
    rewards: &RewardSet,
    system_prompt: Option<&str>,
) -> Result<()> {
    let mut batch: Vec<(usize, Record)> = Vec::with_capacity(BATCH_LINES);
    for (index, line) in input.lines().enumerate() {
        let line_number = index + 1;
        let line = line.with_context(|| format!("cannot read input line {line_number}"))?;
        if line.trim().is_empty() {
            continue;
        }
        let record = match Record::parse(&line, system_prompt) {
            Ok(record) => record,
            Err(error) => {
                // The lines before the bad one are still answered.
                write_scores(&batch, rewards, &mut output)?;
                output.flush().context("cannot flush the scores")?;
                return Err(error.context(format!("input line {line_number}")));
            }
        };
        batch.push((line_number, record));
        if batch.len() == BATCH_LINES {
            write_scores(&batch, rewards, &mut output)?;
            batch.clear();
        }
    }
    write_scores(&batch, rewards, &mut output)?;
    output.flush().context("cannot flush the scores")
}

/// Scores `batch` and writes one line per record.
fn write_scores(
    batch: &[(usize, Record)],
    rewards: &RewardSet,
    output: &mut impl Write,
) -> Result<()> {
    let (Some((first, _)), Some((last, _))) = (batch.first(), batch.last()) else {
        return Ok(());
    };
    let completions: Vec<Completion> = batch
        .iter()
        .map(|(_, record)| record.completion())
        .collect();
    let scores = rewards
        .score(&completions, None)
        .with_context(|| format!("scoring input lines {first} to {last}"))?;
    for ((line_number, _), values) in batch.iter().zip(scores) {
        let per_function: Map<String, Value> = rewards
            .names()
            .iter()
            .zip(&values)
            .map(|(name, &value)| (name.clone(), Value::from(value)))
            .collect();
        let scored = serde_json::json!({
            "rewards": per_function,
            "reward": rewards.total(&values),
        });
        writeln!(output, "{scored}")
            .with_context(|| format!("cannot write the scores of input line {line_number}"))?;
    }
    Ok(())
}

/// One input line.
struct Record {
    text: String,
    answer: String,
    /// The user question (the last user message of a conversation prompt).
    question: String,
    messages: Vec<Message>,
    num_tokens: Option<usize>,
    ids: Vec<u32>,
    columns: Map<String, Value>,
}

impl Record {
    fn parse(line: &str, system_prompt: Option<&str>) -> Result<Self> {
        let record: Value = serde_json::from_str(line).context(
            "not valid JSON; each line must be one object like {\"completion\": \"...\", \"answer\": \"8\"}",
        )?;
        let Value::Object(record) = record else {
            bail!(
                "expected a JSON object like {{\"completion\": \"...\", \"answer\": \"8\"}}, found {}",
                json_type(&record)
            );
        };
        let text = string_field(&record, "completion")?
            .context("missing field \"completion\" (the generated text)")?
            .to_owned();
        let answer = match record.get("answer") {
            Some(Value::String(answer)) => answer.clone(),
            Some(Value::Number(answer)) => answer.to_string(),
            Some(other) => bail!(
                "field \"answer\" must be a string or a number, found {}",
                json_type(other)
            ),
            None => bail!("missing field \"answer\" (the dataset answer)"),
        };
        let (question, messages) = match record.get("prompt") {
            None | Some(Value::Null) => (String::new(), Vec::new()),
            Some(Value::String(prompt)) => (prompt.clone(), conversation(system_prompt, prompt)),
            Some(value @ Value::Array(_)) => {
                let messages: Vec<Message> = serde_json::from_value(value.clone()).context(
                    "field \"prompt\" must be a string or a list of messages like \
                     [{\"role\": \"user\", \"content\": \"...\"}]",
                )?;
                let question = messages
                    .iter()
                    .rev()
                    .find(|message| message.role == "user")
                    .map(|message| message.content.clone())
                    .unwrap_or_default();
                (question, messages)
            }
            Some(other) => bail!(
                "field \"prompt\" must be a string or a list of messages, found {}",
                json_type(other)
            ),
        };
        let num_tokens = match record.get("num_tokens") {
            None | Some(Value::Null) => None,
            Some(value) => Some(
                value
                    .as_u64()
                    .and_then(|count| usize::try_from(count).ok())
                    .with_context(|| {
                        format!(
                            "field \"num_tokens\" must be a non-negative integer, found {}",
                            json_type(value)
                        )
                    })?,
            ),
        };
        let ids = match record.get("completion_ids") {
            None | Some(Value::Null) => Vec::new(),
            Some(value) => serde_json::from_value(value.clone()).with_context(|| {
                format!(
                    "field \"completion_ids\" must be a list of token ids, found {}",
                    json_type(value)
                )
            })?,
        };
        let columns = record
            .into_iter()
            .filter(|(key, _)| !OWN_FIELDS.contains(&key.as_str()))
            .collect();
        Ok(Self {
            text,
            answer,
            question,
            messages,
            num_tokens,
            ids,
            columns,
        })
    }

    fn completion(&self) -> Completion<'_> {
        Completion {
            prompt: &self.question,
            text: &self.text,
            answer: &self.answer,
            num_tokens: self.num_tokens,
            messages: &self.messages,
            ids: &self.ids,
            columns: Some(&self.columns),
        }
    }
}

/// The string value of an optional field; an error when it is present with another type.
fn string_field<'a>(record: &'a Map<String, Value>, field: &str) -> Result<Option<&'a str>> {
    match record.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(value)) => Ok(Some(value)),
        Some(other) => bail!(
            "field \"{field}\" must be a string, found {}",
            json_type(other)
        ),
    }
}

/// What a JSON value is, for error messages (the value itself may be huge).
fn json_type(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(flag) => format!("the boolean {flag}"),
        Value::Number(number) => format!("the number {number}"),
        Value::String(_) => "a string".into(),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}
