//! `score_jsonl` through the library with in-memory input and output: order, keys, totals
//! against the golden reward cases, blank lines, and errors naming the bad line.

mod common;

use std::time::Duration;

use grpo::rewards::external::ExternalParams;
use grpo::rewards::{RewardParams, RewardSet, SEED_REWARDS};
use grpo::score::score_jsonl;
use serde_json::{json, Value};

fn reward_set(names: &[&str], weights: Option<&[f64]>) -> RewardSet {
    let names: Vec<String> = names.iter().map(|name| name.to_string()).collect();
    RewardSet::new(
        &names,
        weights,
        RewardParams {
            max_completion_length: 200,
            external: ExternalParams {
                timeout: Duration::from_secs(10),
                retries: 0,
            },
        },
    )
    .expect("valid reward set")
}

fn score(input: &str, rewards: &RewardSet) -> anyhow::Result<Vec<Value>> {
    let mut output = Vec::new();
    score_jsonl(input.as_bytes(), &mut output, rewards, None)?;
    let text = String::from_utf8(output).expect("UTF-8 output");
    Ok(text
        .lines()
        .map(|line| serde_json::from_str(line).expect("each output line is JSON"))
        .collect())
}

#[test]
fn golden_reward_cases_score_to_the_golden_fixed_totals() {
    let cases = common::cases();
    let reward_cases = cases["rewards"]["cases"].as_array().expect("rewards.cases");
    let input: String = reward_cases
        .iter()
        .map(|case| {
            json!({"completion": case["completion"], "answer": case["answer"]}).to_string() + "\n"
        })
        .collect();
    let rewards = reward_set(SEED_REWARDS, None);
    let output = score(&input, &rewards).unwrap();
    assert_eq!(output.len(), reward_cases.len());
    for (index, (case, line)) in reward_cases.iter().zip(&output).enumerate() {
        let keys: Vec<&str> = line["rewards"]
            .as_object()
            .expect("rewards object")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys, SEED_REWARDS,
            "case {index}: rewards keys in the set's order"
        );
        for name in SEED_REWARDS {
            assert_eq!(
                line["rewards"][name].as_f64(),
                case["fixed"][name].as_f64(),
                "case {index}: {name}"
            );
        }
        let total = line["reward"].as_f64().expect("reward");
        let expected = case["fixed_total"].as_f64().expect("fixed_total");
        assert!(
            (total - expected).abs() < 1e-12,
            "case {index}: {total} vs {expected}"
        );
    }
}

#[test]
fn weights_apply_and_optional_fields_are_read() {
    let rewards = reward_set(
        &["correctness", "soft_overlong_punishment"],
        Some(&[0.5, 2.0]),
    );
    let input = concat!(
        r#"{"completion": "<answer>8</answer>", "answer": 8, "prompt": "3+5?", "num_tokens": 180}"#,
        "\n",
        r#"{"completion": "<answer>2.5</answer>", "answer": 2.5, "extra": [1]}"#,
        "\n"
    );
    let output = score(input, &rewards).unwrap();
    assert_eq!(
        output[0],
        json!({"rewards": {"correctness": 2.0, "soft_overlong_punishment": -0.5}, "reward": 0.0})
    );
    assert_eq!(
        output[1],
        json!({"rewards": {"correctness": 2.0, "soft_overlong_punishment": 0.0}, "reward": 1.0})
    );
}

#[test]
fn blank_lines_are_skipped() {
    let rewards = reward_set(&["correctness"], None);
    let input = "\n{\"completion\": \"8\", \"answer\": \"8\"}\n   \n\r\n{\"completion\": \"7\", \"answer\": \"8\"}";
    let output = score(input, &rewards).unwrap();
    let totals: Vec<f64> = output
        .iter()
        .map(|line| line["reward"].as_f64().unwrap())
        .collect();
    assert_eq!(totals, [2.0, 0.0]);
}

#[test]
fn bad_lines_are_errors_with_their_line_number_and_problem() {
    let rewards = reward_set(&["mark"], None);
    let good = r#"{"completion": "x", "answer": "8"}"#;
    let bad_lines = [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (r#"{"answer": "8"}"#, "missing field \"completion\""),
        (r#"{"completion": "x"}"#, "missing field \"answer\""),
        (
            r#"{"completion": 5, "answer": "8"}"#,
            "field \"completion\" must be a string",
        ),
        (
            r#"{"completion": "x", "answer": true}"#,
            "field \"answer\" must be a string or a number",
        ),
        (
            r#"{"completion": "x", "answer": "8", "prompt": 1}"#,
            "field \"prompt\" must be a string",
        ),
        (
            r#"{"completion": "x", "answer": "8", "num_tokens": -1}"#,
            "non-negative integer",
        ),
    ];
    for (bad, problem) in bad_lines {
        let input = format!("{good}\n\n{bad}\n{good}\n");
        let error = format!("{:#}", score(&input, &rewards).unwrap_err());
        assert!(error.contains("input line 3"), "{bad}: {error}");
        assert!(error.contains(problem), "{bad}: {error}");
    }
}
