//! Reward functions: the seed five against the golden TRL cases, the rewards beyond the seed
//! against values computed with the open-r1 / TRL Python definitions, the registry's errors, and
//! properties over arbitrary Unicode.

mod common;

use std::time::Duration;

use grpo::rewards::external::ExternalParams;
use grpo::rewards::{Completion, RewardParams, RewardSet, AVAILABLE, SEED_REWARDS};
use proptest::prelude::*;
use serde_json::Value;

const PARAMS: RewardParams = RewardParams {
    max_completion_length: 200,
    external: ExternalParams {
        timeout: Duration::from_secs(10),
        retries: 0,
    },
};

fn names(names: &[&str]) -> Vec<String> {
    names.iter().map(|name| name.to_string()).collect()
}

fn completion<'a>(text: &'a str, answer: &'a str) -> Completion<'a> {
    Completion::of_text("", text, answer, None)
}

/// Each function's reward for one completion.
fn score_one(set: &RewardSet, completion: &Completion) -> Vec<f64> {
    set.score(std::slice::from_ref(completion), None)
        .unwrap()
        .remove(0)
}

/// One reward's value for one completion.
fn reward(name: &str, text: &str, answer: &str) -> f64 {
    let set = RewardSet::new(&names(&[name]), None, PARAMS).expect("known reward");
    score_one(&set, &completion(text, answer))[0]
}

/// `str(answer)` of a golden case: strings as they are, JSON integers as their decimal digits.
fn answer_string(answer: &Value) -> String {
    match answer {
        Value::String(text) => text.clone(),
        Value::Number(number) => number.to_string(),
        other => panic!("golden answer is neither string nor number: {other}"),
    }
}

#[test]
fn seed_rewards_equal_golden_fixed_values_on_every_case() {
    let cases = common::cases();
    let reward_cases = cases["rewards"]["cases"].as_array().expect("rewards.cases");
    assert!(
        !reward_cases.is_empty(),
        "golden folder has no reward cases"
    );
    let functions: Vec<String> = cases["rewards"]["functions"]
        .as_array()
        .expect("rewards.functions")
        .iter()
        .map(|name| name.as_str().expect("function name").to_string())
        .collect();
    let set = RewardSet::new(&functions, None, PARAMS).expect("golden functions are known");
    for (index, case) in reward_cases.iter().enumerate() {
        let text = case["completion"].as_str().expect("completion");
        let answer = answer_string(&case["answer"]);
        assert_eq!(
            grpo::rewards::extract_answer(text),
            case["extracted"].as_str().expect("extracted"),
            "case {index} {text:?}: extracted answer"
        );
        let values = score_one(&set, &completion(text, &answer));
        for (name, value) in functions.iter().zip(&values) {
            let expected = case["fixed"][name].as_f64().expect("fixed value");
            assert_eq!(
                *value, expected,
                "case {index} {text:?} answer {answer:?}: {name}"
            );
        }
        let expected_total = case["fixed_total"].as_f64().expect("fixed_total");
        assert!(
            (set.total(&values) - expected_total).abs() < 1e-12,
            "case {index} {text:?}: total"
        );
    }
}

#[test]
fn unknown_name_error_names_it_the_nearest_and_the_list() {
    let error = RewardSet::new(&names(&["mark", "corectness"]), None, PARAMS)
        .err()
        .expect("unknown name must fail")
        .to_string();
    assert!(error.contains("`corectness`"), "{error}");
    assert!(error.contains("did you mean `correctness`"), "{error}");
    for name in AVAILABLE {
        assert!(error.contains(name), "{error} should list {name}");
    }
}

#[test]
fn weights_must_match_names_and_be_finite() {
    let error = RewardSet::new(&names(SEED_REWARDS), Some(&[1.0, 2.0]), PARAMS)
        .err()
        .expect("length mismatch must fail")
        .to_string();
    assert!(
        error.contains("reward_weights has 2 entries but reward_funcs has 5"),
        "{error}"
    );
    let error = RewardSet::new(&names(&["mark"]), Some(&[f64::NAN]), PARAMS)
        .err()
        .expect("NaN weight must fail")
        .to_string();
    assert!(
        error.contains("`mark`") && error.contains("finite"),
        "{error}"
    );
    assert!(RewardSet::new(&[], None, PARAMS).is_err());
    assert!(RewardSet::new(&names(&["mark", "mark"]), None, PARAMS).is_err());
}

#[test]
fn weights_default_to_one_and_total_is_the_weighted_sum() {
    let set = RewardSet::new(&names(SEED_REWARDS), None, PARAMS).unwrap();
    assert_eq!(set.weights(), [1.0; 5]);
    assert_eq!(set.names(), names(SEED_REWARDS));
    let weighted =
        RewardSet::new(&names(&["correctness", "digit"]), Some(&[0.5, 2.0]), PARAMS).unwrap();
    let text = "<think>\nx\n</think>\n<answer>\n8\n</answer>\n";
    let values = score_one(&weighted, &completion(text, "8"));
    assert_eq!(values, [2.0, 0.5]);
    assert_eq!(weighted.total(&values), 2.0);
}

#[test]
fn accuracy_compares_numbers_by_value() {
    let wrap = |answer: &str| format!("<think>\nx\n</think>\n<answer>\n{answer}\n</answer>\n");
    let equal = [
        ("８", "8"),
        ("1,000", "1000"),
        ("+8", "8"),
        ("8.0", "8"),
        ("$8", "8"),
        ("8元", "8"),
        ("8 个", "8"),
        ("50%", "50"),
        ("3/4", "0.75"),
        ("-2", "-2"),
        ("2.50", "5/2"),
        ("18", "Janet sells 16 - 3 - 4 = 9 duck eggs.\n#### 18"),
    ];
    for (predicted, gold) in equal {
        assert_eq!(
            reward("accuracy", &wrap(predicted), gold),
            1.0,
            "{predicted} vs {gold}"
        );
    }
    let different = [
        ("7", "8"),
        ("-8", "8"),
        ("8.01", "8"),
        ("8 or 9", "8"),
        ("", "8"),
    ];
    for (predicted, gold) in different {
        assert_eq!(
            reward("accuracy", &wrap(predicted), gold),
            0.0,
            "{predicted} vs {gold}"
        );
    }
}

// Expected values below were computed with open-r1's Python definitions (CPython 3.11).

#[test]
fn tag_count_matches_open_r1() {
    let cases = [
        ("<think>\nx\n</think>\n<answer>\n8\n</answer>", 1.0),
        ("<think>x</think><answer>8</answer>", 0.0),
        (
            "<think>\n<think>\nx\n</think>\n<answer>\n8\n</answer>\n</answer>",
            0.5,
        ),
    ];
    for (text, expected) in cases {
        assert_eq!(reward("tag_count", text, "8"), expected, "{text:?}");
    }
}

#[test]
fn reasoning_steps_matches_open_r1() {
    let cases = [
        ("1. a\n2. b\n3. c", 1.0 / 3.0),
        ("Step 1: x\nStep 2: y", 2.0 / 3.0),
        ("First, a. Second, b. Next, c. Finally, d.", 1.0),
        ("intro\n- a\n- b\n* c", 1.0),
        ("Step ١: x", 1.0 / 3.0),
        ("no steps", 0.0),
    ];
    for (text, expected) in cases {
        let value = reward("reasoning_steps", text, "8");
        assert!(
            (value - expected).abs() < 1e-15,
            "{text:?}: {value} vs {expected}"
        );
    }
}

#[test]
fn repetition_penalty_matches_open_r1_on_space_separated_text() {
    let cases = [
        ("The cat sat on the mat. The cat sat on the mat.", -0.4),
        ("the the the the", -0.5),
        ("A a A a B b", -0.25),
        ("one two three four five", 0.0),
        ("", 0.0),
    ];
    for (text, expected) in cases {
        let value = reward("repetition_penalty", text, "8");
        assert!(
            (value - expected).abs() < 1e-12,
            "{text:?}: {value} vs {expected}"
        );
    }
    // Chinese counts characters: 11 characters, 9 trigrams of which 4 distinct.
    let value = reward("repetition_penalty", "三个苹果三个苹果三个苹", "8");
    assert!((value - (4.0 / 9.0 - 1.0)).abs() < 1e-12, "{value}");
}

#[test]
fn cosine_follows_the_open_r1_schedule_in_characters() {
    // A correct completion padded to a given number of characters.
    let correct = |length: usize| {
        let body = "<answer>8</answer>";
        format!("{}{body}", "x".repeat(length - body.chars().count()))
    };
    let wrong = |length: usize| "好".repeat(length);
    let cases = [
        (correct(250), 0.9267766952966369),
        (correct(500), 0.75),
        (correct(1000), 0.5),
        (correct(5000), 0.5),
        (wrong(250), -0.42677669529663687),
        (wrong(500), -0.25),
        (wrong(1000), 0.0),
    ];
    for (text, expected) in &cases {
        let value = reward("cosine", text, "8");
        assert!(
            (value - expected).abs() < 1e-12,
            "len {}: {value} vs {expected}",
            text.len()
        );
    }
    assert_eq!(reward("cosine", "", "8"), -0.5);
}

#[test]
fn soft_overlong_uses_tokens_when_known_and_characters_otherwise() {
    let set = RewardSet::new(&names(&["soft_overlong_punishment"]), None, PARAMS).unwrap();
    let score = |text: &str, num_tokens: Option<usize>| {
        score_one(&set, &Completion::of_text("", text, "8", num_tokens))[0]
    };
    // max 200, cache 40: free up to 160 tokens, −1 beyond 200.
    assert_eq!(score("short", Some(160)), 0.0);
    assert_eq!(score("short", Some(170)), -0.25);
    assert_eq!(score("short", Some(201)), -1.0);
    assert_eq!(score(&"字".repeat(180), None), -0.5);
    assert_eq!(score("short", None), 0.0);
}

/// Documented range of each reward (docs/REWARDS.md).
fn documented_range(name: &str) -> (f64, f64) {
    match name {
        "mark" | "soft_format" | "hard_format" | "digit" => (0.0, 0.5),
        "correctness" => (0.0, 2.0),
        "accuracy" | "tag_count" | "reasoning_steps" => (0.0, 1.0),
        "cosine" => (-0.5, 1.0),
        "repetition_penalty" | "soft_overlong_punishment" => (-1.0, 0.0),
        other => panic!("no documented range for {other}"),
    }
}

/// Text made of tags, newlines, digits and arbitrary characters, to reach every branch.
fn tag_soup() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("<think>".to_string()),
        Just("</think>".to_string()),
        Just("<answer>".to_string()),
        Just("</answer>".to_string()),
        Just("\n".to_string()),
        Just("Step 1:".to_string()),
        Just("1,000".to_string()),
        Just("８".to_string()),
        Just("个".to_string()),
        Just(" ".to_string()),
        "[0-9./+-]{1,4}",
        any::<char>().prop_map(String::from),
    ];
    prop::collection::vec(piece, 0..40).prop_map(|pieces| pieces.concat())
}

fn text_strategy() -> impl Strategy<Value = String> {
    prop_oneof![any::<String>(), tag_soup()]
}

proptest! {
    #[test]
    fn every_reward_stays_in_its_range_and_total_is_weighted_sum(
        text in text_strategy(),
        answer in text_strategy(),
        num_tokens in proptest::option::of(0usize..1000),
        weights in prop::collection::vec(-3.0f64..3.0, AVAILABLE.len()),
    ) {
        let set = RewardSet::new(&names(AVAILABLE), Some(&weights), PARAMS).unwrap();
        let values = score_one(&set, &Completion::of_text("", &text, &answer, num_tokens));
        prop_assert_eq!(values.len(), AVAILABLE.len());
        for (name, value) in AVAILABLE.iter().zip(&values) {
            let (low, high) = documented_range(name);
            prop_assert!(value.is_finite() && *value >= low && *value <= high,
                "{} = {} outside [{}, {}] for {:?}", name, value, low, high, text);
        }
        // Each weight belongs to its own reward: the set's total is the sum of the totals of
        // one-reward sets, each given that reward's weight (a mix-up of weights and names, or a
        // dropped reward, breaks it for some draw).
        let completion = Completion::of_text("", &text, &answer, num_tokens);
        let singles: Vec<f64> = AVAILABLE
            .iter()
            .zip(&weights)
            .map(|(name, &weight)| {
                let one = RewardSet::new(&names(&[name]), Some(&[weight]), PARAMS).unwrap();
                one.total(&score_one(&one, &completion))
            })
            .collect();
        let sum: f64 = singles.iter().sum();
        let total = set.total(&values);
        prop_assert!((total - sum).abs() <= 1e-12 * (1.0 + sum.abs()), "{} vs {}", total, sum);
        // Doubling every weight doubles the total (exactly: doubling is exact in binary), so
        // the weights are used at all.
        let doubled: Vec<f64> = weights.iter().map(|w| 2.0 * w).collect();
        let twice = RewardSet::new(&names(AVAILABLE), Some(&doubled), PARAMS).unwrap();
        prop_assert_eq!(twice.total(&score_one(&twice, &completion)), 2.0 * total);
        // A weight of 0 drops exactly its reward: the total moves by that reward's single total.
        for (k, single) in singles.iter().enumerate() {
            let mut dropped = weights.clone();
            dropped[k] = 0.0;
            let without = RewardSet::new(&names(AVAILABLE), Some(&dropped), PARAMS).unwrap();
            let rest = without.total(&score_one(&without, &completion));
            prop_assert!((total - rest - single).abs() <= 1e-12 * (1.0 + total.abs()));
        }
    }

    #[test]
    fn numbers_never_panic(text in text_strategy()) {
        let _ = grpo::rewards::parse_number(&text);
    }
}

#[test]
fn huge_inputs_are_scored() {
    let set = RewardSet::new(&names(AVAILABLE), None, PARAMS).unwrap();
    let tags = "<think>\n</think>\n<answer>\n8\n</answer>\n".repeat(50_000);
    let repeated = "苹果 apple ".repeat(100_000);
    let digits = "9".repeat(100_000);
    for text in [&tags, &repeated, &digits] {
        for (name, value) in AVAILABLE
            .iter()
            .zip(score_one(&set, &completion(text, &digits)))
        {
            let (low, high) = documented_range(name);
            assert!(value >= low && value <= high, "{name} = {value}");
        }
    }
}
