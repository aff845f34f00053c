//! The JSON of an external reward call, the same for both transports: the request built from a
//! batch of completions and the reply read back into one value per completion
//! (`docs/REWARDS.md`, "External rewards").

use anyhow::{bail, Result};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::rewards::Completion;

/// Request fields that are not dataset columns: a dataset column of one of these names (or one
/// of TRL's own `prompt` and `completion`) is not sent.
const RESERVED: &[&str] = &[
    "prompts",
    "completions",
    "completion_ids",
    "trainer_state",
    "prompt",
    "completion",
];

/// Where training stands when a batch is scored (TRL's `trainer_state` keyword argument).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TrainerProgress {
    /// Optimizer steps completed before this batch.
    pub global_step: u64,
    /// Optimizer steps of the whole run.
    pub max_steps: u64,
    /// Epochs completed, fractional.
    pub epoch: f64,
}

/// The request for `completions`, one JSON line: `prompts` (each completion's prompt as chat
/// messages), `completions` (`[{"role": "assistant", "content": text}]` each),
/// `completion_ids`, one list per dataset column (every column of any completion's row, null
/// where a row lacks it), and `trainer_state` when training.
pub fn request(completions: &[Completion], progress: Option<&TrainerProgress>) -> String {
    let mut fields = Map::new();
    fields.insert(
        "prompts".into(),
        completions
            .iter()
            .map(|c| serde_json::to_value(c.messages).unwrap_or_default())
            .collect(),
    );
    fields.insert(
        "completions".into(),
        completions
            .iter()
            .map(|c| serde_json::json!([{"role": "assistant", "content": c.text}]))
            .collect(),
    );
    fields.insert(
        "completion_ids".into(),
        completions.iter().map(|c| Value::from(c.ids)).collect(),
    );
    let mut names: Vec<&str> = Vec::new();
    for row in completions.iter().filter_map(|c| c.columns) {
        for name in row.keys() {
            if !RESERVED.contains(&name.as_str()) && !names.contains(&name.as_str()) {
                names.push(name);
            }
        }
    }
    for name in names {
        let column = completions
            .iter()
            .map(|c| {
                c.columns
                    .and_then(|row| row.get(name))
                    .cloned()
                    .unwrap_or_default()
            })
            .collect();
        fields.insert(name.into(), column);
    }
    if let Some(progress) = progress {
        fields.insert(
            "trainer_state".into(),
            serde_json::to_value(progress).unwrap_or_default(),
        );
    }
    Value::Object(fields).to_string()
}

/// One reward per completion from a reply line: a JSON list of numbers and nulls, or an object
/// `{"rewards": [...]}`; null (no reward) becomes NaN. `{"error": "..."}` reports the reward
/// function's own failure. A wrong count, a value that is not a number, and NaN or ±Infinity
/// (Python's `json.dumps` writes them) are errors naming the value.
pub fn parse_reply(reply: &str, expected: usize) -> Result<Vec<f64>> {
    let reply = reply.trim();
    let value: Value = match serde_json::from_str(reply) {
        Ok(value) => value,
        Err(error) => match mark_non_finite(reply).map(|text| serde_json::from_str(&text)) {
            Some(Ok(value)) => value,
            _ => bail!(
                "the reply is not JSON ({error}): {}; the reply must be one line like \
                 [0.5, 1.0, null] or {{\"rewards\": [...]}}",
                excerpt(reply)
            ),
        },
    };
    let values = match value {
        Value::Array(values) => values,
        Value::Object(mut fields) => match (fields.remove("rewards"), fields.remove("error")) {
            (_, Some(error)) => bail!(
                "the reward function failed: {}",
                error
                    .as_str()
                    .map_or_else(|| error.to_string(), str::to_owned)
            ),
            (Some(Value::Array(values)), None) => values,
            _ => bail!(
                "the reply {} holds no \"rewards\" list: it must be a list of numbers (null for \
                 no reward) or an object {{\"rewards\": [...]}}",
                excerpt(reply)
            ),
        },
        other => bail!(
            "the reply is {}, not a list of rewards: it must be a list of numbers (null for no \
             reward) or an object {{\"rewards\": [...]}}",
            describe(&other)
        ),
    };
    if values.len() != expected {
        bail!(
            "returned {} values for {expected} completions: give exactly one value per \
             completion, in order (null for no reward)",
            values.len()
        );
    }
    values
        .iter()
        .enumerate()
        .map(|(index, value)| match value {
            Value::Null => Ok(f64::NAN),
            Value::Number(number) => match number.as_f64() {
                Some(reward) if reward.is_finite() => Ok(reward),
                _ => bail!("value {index} is {number}, not a finite number"),
            },
            Value::Object(marker) if marker.contains_key(NON_FINITE) => bail!(
                "value {index} is {}, not a finite number: return a finite number, or None / null \
                 for no reward",
                marker[NON_FINITE].as_str().unwrap_or("not finite")
            ),
            other => bail!(
                "value {index} is {}, not a number: rewards must be numbers (null for no reward)",
                describe(other)
            ),
        })
        .collect()
}

/// Key of the object that [`mark_non_finite`] puts in place of a NaN or infinity.
const NON_FINITE: &str = "\u{0}non-finite";

/// `reply` with each bare `NaN`, `Infinity` and `-Infinity` outside strings (what Python's
/// `json.dumps` writes for non-finite floats) replaced by a marker object naming it, so that the
/// offending value can be named; `None` when there is none.
fn mark_non_finite(reply: &str) -> Option<String> {
    let mut out = String::with_capacity(reply.len());
    let (mut in_string, mut escaped, mut found) = (false, false, false);
    let mut rest = reply;
    while let Some(c) = rest.chars().next() {
        if in_string {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
        } else if c == '"' {
            in_string = true;
        } else if let Some(token) = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|token| rest.starts_with(token))
        {
            let marker = serde_json::json!({ NON_FINITE: token });
            out.push_str(&marker.to_string());
            rest = &rest[token.len()..];
            found = true;
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    found.then_some(out)
}

/// What a JSON value is, for errors (the value itself may be long).
fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(flag) => format!("the boolean {flag}"),
        Value::Number(number) => format!("the number {number}"),
        Value::String(text) => format!(
            "the string {}",
            excerpt(&Value::from(text.as_str()).to_string())
        ),
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "an object".into(),
    }
}

/// The start of `text`, for errors.
pub fn excerpt(text: &str) -> String {
    const MAX_CHARS: usize = 200;
    match text.char_indices().nth(MAX_CHARS) {
        Some((end, _)) => format!("{}… ({} bytes)", &text[..end], text.len()),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_tokens_are_marked_outside_strings_only() {
        assert_eq!(mark_non_finite("[1.0, 2]"), None);
        assert_eq!(mark_non_finite(r#"["NaN", "x\"Infinity"]"#), None);
        let marked = mark_non_finite("[NaN, -Infinity, Infinity]").unwrap();
        let values: Vec<Value> = serde_json::from_str(&marked).unwrap();
        assert_eq!(values.len(), 3);
        assert_eq!(values[1][NON_FINITE], "-Infinity");
    }
}
