//! GRPO step math against the golden folder (TRL 1.16 on CPU, float32) and hand-derived
//! expectations: masks, advantages, the four loss aggregations, their gradients and the metrics.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use grpo::grpo::{
    chunk_grpo_loss, group_advantages, grpo_loss, masked_mean, rewards_agree, weighted_rewards,
    CompletionBatch, CompletionLengthMetrics, DynamicSamplingMetrics, GrpoLoss, LossInputs,
    LossMetrics, LossParams, LossType, MicroBatchSize, RewardMetrics, ScaleRewards, StepMetrics,
};
use serde_json::Value;

const LOSS_TYPES: [(LossType, &str); 4] = [
    (LossType::Grpo, "grpo"),
    (LossType::Bnpo, "bnpo"),
    (LossType::DrGrpo, "dr_grpo"),
    (LossType::Dapo, "dapo"),
];

fn assert_close(actual: f64, expected: f64, rtol: f64, atol: f64, what: &str) {
    let tolerance = atol + rtol * expected.abs();
    assert!(
        (actual - expected).abs() <= tolerance,
        "{what}: {actual} vs expected {expected} (tolerance {tolerance})"
    );
}

fn assert_all_close(actual: &[f32], expected: &[f64], rtol: f64, atol: f64, what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        assert_close(f64::from(a), e, rtol, atol, &format!("{what}[{i}]"));
    }
}

fn f64s(value: &Value) -> Vec<f64> {
    value
        .as_array()
        .expect("array")
        .iter()
        .map(|v| v.as_f64().expect("number"))
        .collect()
}

fn u32s(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .expect("array")
        .iter()
        .map(|v| v.as_u64().expect("id") as u32)
        .collect()
}

fn vec1(tensor: &Tensor) -> Vec<f32> {
    tensor
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn vec2(tensor: &Tensor) -> Vec<Vec<f32>> {
    tensor.to_dtype(DType::F32).unwrap().to_vec2().unwrap()
}

/// The golden GRPO batch: tensors and the loss settings of `cases.json` → `grpo`.
struct Golden {
    case: Value,
    tensors: HashMap<String, Tensor>,
}

impl Golden {
    fn load() -> Self {
        Self {
            case: common::cases()["grpo"].clone(),
            tensors: common::tensors(),
        }
    }

    fn tensor(&self, key: &str) -> &Tensor {
        self.tensors
            .get(key)
            .unwrap_or_else(|| panic!("golden tensor {key} missing"))
    }

    fn mask(&self) -> Tensor {
        self.tensor("grpo.completion_mask")
            .to_dtype(DType::F32)
            .unwrap()
    }

    fn params(&self, loss_type: LossType) -> LossParams {
        let num_items = vec1(&self.mask()).iter().sum::<f32>() as usize;
        assert_eq!(
            num_items as u64,
            self.case["metrics"]["num_items_in_batch"].as_u64().unwrap(),
            "num_items_in_batch"
        );
        LossParams::new(
            loss_type,
            self.case["beta"].as_f64().unwrap(),
            self.case["epsilon_low"].as_f64().unwrap(),
            self.case["epsilon_high"].as_f64().unwrap(),
            self.case["max_completion_length"].as_u64().unwrap() as usize,
            num_items,
        )
    }

    /// The loss with `grpo.policy_logps` as a trainable variable and ratio 1 (one iteration).
    fn loss(&self, params: &LossParams) -> (Var, GrpoLoss) {
        let logp = Var::from_tensor(self.tensor("grpo.policy_logps")).unwrap();
        let old_logp = logp.as_tensor().detach();
        let mask = self.mask();
        let inputs = LossInputs {
            logp: logp.as_tensor(),
            old_logp: &old_logp,
            ref_logp: Some(self.tensor("grpo.ref_logps")),
            advantages: self.tensor("grpo.advantages"),
            mask: &mask,
            entropy_mask: None,
        };
        let loss = grpo_loss(&inputs, params).unwrap();
        (logp, loss)
    }
}

// ---------------------------------------------------------------------------------------------
// Masks
// ---------------------------------------------------------------------------------------------

#[test]
fn masks_and_truncated_ids_match_trl() {
    let golden = Golden::load();
    let eos = u32s(&golden.case["eos_token_ids"]);
    let pad = golden.case["pad_token_id"].as_u64().unwrap() as u32;
    let batch =
        CompletionBatch::from_tensor(golden.tensor("grpo.completion_ids_raw"), &eos, pad, false)
            .unwrap();
    let expected_ids = golden
        .tensor("grpo.completion_ids")
        .to_dtype(DType::U32)
        .unwrap();
    assert_eq!(batch.ids, expected_ids.to_vec2::<u32>().unwrap());
    assert_eq!(batch.mask, vec2(&golden.mask()));
    assert_eq!(
        batch
            .mask_tensor(&Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap(),
        vec2(&golden.mask())
    );
    assert_eq!(
        batch
            .ids_tensor(&Device::Cpu)
            .unwrap()
            .to_vec2::<u32>()
            .unwrap(),
        batch.ids
    );
    assert_eq!(
        batch.num_items() as u64,
        golden.case["metrics"]["num_items_in_batch"]
            .as_u64()
            .unwrap()
    );

    let metrics = CompletionLengthMetrics::new(&batch);
    let expected = &golden.case["metrics"];
    for (actual, key) in [
        (metrics.mean_length, "completions/mean_length"),
        (metrics.min_length, "completions/min_length"),
        (metrics.max_length, "completions/max_length"),
        (metrics.clipped_ratio, "completions/clipped_ratio"),
    ] {
        assert_close(actual, expected[key].as_f64().unwrap(), 1e-6, 0.0, key);
    }
}

#[test]
fn any_eos_id_ends_a_completion_and_truncated_rows_can_leave_the_loss() {
    let (eos_a, eos_b, pad) = (7, 8, 0);
    let rows = vec![
        vec![1, 2, eos_b, 5, 6],
        vec![3, 4, 5, 6, 9],
        vec![eos_a, 1],
        vec![2, 3],
    ];
    let kept = CompletionBatch::new(&rows, &[eos_a, eos_b], pad, false).unwrap();
    assert_eq!(
        kept.ids,
        vec![
            vec![1, 2, eos_b, 0, 0],
            vec![3, 4, 5, 6, 9],
            vec![eos_a, 0, 0, 0, 0],
            vec![2, 3, 0, 0, 0]
        ]
    );
    assert_eq!(kept.lengths, vec![3, 5, 1, 2]);
    assert_eq!(kept.truncated, vec![false, true, false, true]);
    assert_eq!(kept.mask[1], vec![1.0; 5]);
    assert_eq!(kept.mask[3], vec![1.0, 1.0, 0.0, 0.0, 0.0]);

    let masked = CompletionBatch::new(&rows, &[eos_a, eos_b], pad, true).unwrap();
    assert_eq!(masked.mask[0], vec![1.0, 1.0, 1.0, 0.0, 0.0]);
    assert_eq!(masked.mask[1], vec![0.0; 5]);
    assert_eq!(masked.mask[3], vec![0.0; 5]);
    assert_eq!(
        masked.lengths, kept.lengths,
        "logged lengths ignore the truncation mask"
    );
    assert_eq!(masked.num_items(), 4);

    let err = CompletionBatch::new(&rows, &[], pad, false).unwrap_err();
    assert!(err.to_string().contains("eos_token_id"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Advantages
// ---------------------------------------------------------------------------------------------

#[test]
fn golden_rewards_and_advantages() {
    let golden = Golden::load();
    let per_func: Vec<Vec<f64>> = golden.case["rewards_per_func"]
        .as_array()
        .unwrap()
        .iter()
        .map(f64s)
        .collect();
    let weights = f64s(&golden.case["reward_weights"]);
    let rewards = weighted_rewards(&per_func, &weights).unwrap();
    let tensor = |key| f64s(&serde_json::to_value(vec1(golden.tensor(key))).unwrap());
    // Float32 roundings only (the inputs are exact): a weighted sum of K rewards rounds 2K
    // times, terms at most max sum |w r|.
    let eps = common::F32_EPS;
    let k = weights.len() as f64;
    let max_abs = |values: &[f64]| values.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let term_scale = per_func
        .iter()
        .map(|row| {
            row.iter()
                .zip(&weights)
                .map(|(r, w)| (r * w).abs())
                .sum::<f64>()
        })
        .fold(0.0f64, f64::max);
    let golden_rewards = tensor("grpo.rewards");
    assert_all_close(
        &rewards,
        &golden_rewards,
        2.0 * k * eps,
        2.0 * k * eps * term_scale,
        "rewards",
    );

    // Group means and stds of G rewards: G + 2 roundings of values at most max |r|.
    let g = golden.case["num_generations"].as_u64().unwrap() as usize;
    let adv = group_advantages(&rewards, g, ScaleRewards::Group).unwrap();
    let r_max = max_abs(&golden_rewards);
    let stat_ulps = (g + 2) as f64 * eps;
    assert_all_close(
        &adv.group_mean,
        &tensor("grpo.group_mean"),
        stat_ulps,
        stat_ulps * r_max,
        "group_mean",
    );
    assert_all_close(
        &adv.std,
        &tensor("grpo.group_std"),
        stat_ulps,
        stat_ulps * r_max,
        "group_std",
    );
    // (r - mean) / (std + 1e-4): the numerator's error (its terms' and the mean's) divided by
    // the smallest denominator, and the std's relative error plus a few roundings of the result.
    let smallest_std = tensor("grpo.group_std")
        .iter()
        .fold(f64::INFINITY, |m, &s| m.min(s));
    assert_all_close(
        &adv.advantages,
        &tensor("grpo.advantages"),
        4.0 * eps + stat_ulps,
        (2.0 * eps * r_max + stat_ulps * r_max) * 2.0 / (smallest_std + 1e-4),
        "advantages",
    );

    let names = vec!["func0".to_owned(), "func1".to_owned()];
    let metrics = RewardMetrics::new(&names, &per_func, &adv).unwrap();
    let expected = &golden.case["metrics"];
    let json = serde_json::to_value(&metrics).unwrap();
    for key in [
        "reward",
        "reward_std",
        "frac_reward_zero_std",
        "rewards/func0/mean",
        "rewards/func0/std",
        "rewards/func1/mean",
        "rewards/func1/std",
    ] {
        let actual = json[key]
            .as_f64()
            .unwrap_or_else(|| panic!("metric {key} missing"));
        // Means and stds over the batch of float32 rewards: B + 2 roundings of values at most
        // max |r| (the per-function ones at most their own max, below the weighted max).
        let b = golden_rewards.len() as f64;
        let r_max = max_abs(&golden_rewards).max(
            per_func
                .iter()
                .flatten()
                .fold(0.0f64, |m, v| m.max(v.abs())),
        );
        let ulps = (b + 2.0) * eps;
        assert_close(
            actual,
            expected[key].as_f64().unwrap(),
            ulps,
            ulps * r_max,
            key,
        );
    }
}

#[test]
fn extra_advantage_cases() {
    let cases = common::cases();
    let extra = cases["advantages_extra"].as_array().unwrap();
    assert!(!extra.is_empty());
    for case in extra {
        let name = case["name"].as_str().unwrap();
        let rewards: Vec<f32> = f64s(&case["rewards"]).iter().map(|&r| r as f32).collect();
        let g = case["num_generations"].as_u64().unwrap() as usize;
        let adv = group_advantages(&rewards, g, ScaleRewards::Group).unwrap();
        let what = |field: &str| format!("{name}.{field}");
        assert_all_close(
            &adv.group_mean,
            &f64s(&case["group_mean"]),
            1e-6,
            1e-7,
            &what("mean"),
        );
        assert_all_close(
            &adv.std,
            &f64s(&case["group_std"]),
            1e-6,
            1e-7,
            &what("std"),
        );
        assert_all_close(
            &adv.advantages,
            &f64s(&case["advantages"]),
            1e-4,
            1e-6,
            &what("advantages"),
        );
        let zero_groups = f64s(&case["group_std"])
            .iter()
            .filter(|&&s| s == 0.0)
            .count();
        assert_close(
            adv.frac_reward_zero_std(),
            zero_groups as f64 / rewards.len() as f64,
            0.0,
            1e-12,
            &what("frac_reward_zero_std"),
        );
    }
}

#[test]
fn batch_and_no_scaling() {
    let rewards = [0.0f32, 1.0, 2.0, 3.0, 3.0, 3.0];
    // Group means of G = 2; batch std by hand: mean 2, squares 4+1+0+1+1+1 = 8, 8/5.
    let means = [0.5, 0.5, 2.5, 2.5, 3.0, 3.0];
    let batch_std = (8.0f64 / 5.0).sqrt();
    let batch = group_advantages(&rewards, 2, ScaleRewards::Batch).unwrap();
    let expected: Vec<f64> = rewards
        .iter()
        .zip(means)
        .map(|(&r, m)| (f64::from(r) - m) / (batch_std + 1e-4))
        .collect();
    assert_all_close(&batch.advantages, &expected, 1e-6, 1e-7, "batch advantages");
    assert_close(
        batch.frac_reward_zero_std(),
        0.0,
        0.0,
        0.0,
        "batch std is not zero",
    );

    let none = group_advantages(&rewards, 2, ScaleRewards::None).unwrap();
    let expected: Vec<f64> = rewards
        .iter()
        .zip(means)
        .map(|(&r, m)| f64::from(r) - m)
        .collect();
    assert_all_close(
        &none.advantages,
        &expected,
        0.0,
        1e-7,
        "unscaled advantages",
    );
    // Only the last group has zero std; with "none" it is still counted for logging.
    assert_close(
        none.frac_reward_zero_std(),
        2.0 / 6.0,
        0.0,
        1e-12,
        "zero std fraction",
    );
}

#[test]
fn single_generation_groups_have_zero_advantage() {
    let adv = group_advantages(&[1.0, 5.0], 1, ScaleRewards::Group).unwrap();
    assert_eq!(adv.advantages, vec![0.0, 0.0]);
    assert_eq!(adv.std, vec![0.0, 0.0]);
    assert_eq!(adv.frac_reward_zero_std(), 1.0);
}

/// Dynamic sampling drops exactly the groups `frac_reward_zero_std` counts; a generation's
/// advantages split into micro-batches by rows.
#[test]
fn groups_whose_rewards_agree_are_the_zero_std_ones() {
    assert!(rewards_agree(&[1.0, 1.0, 1.0]));
    assert!(!rewards_agree(&[1.0, 1.0, 1.5]));
    assert!(
        !rewards_agree(&[0.0, 1e-6]),
        "a tiny difference is still a signal"
    );
    assert!(rewards_agree(&[0.3]), "one completion has no std");
    assert!(
        rewards_agree(&[f32::NAN, 2.0, f32::NAN]),
        "one rewarded completion: zero advantages"
    );
    assert!(!rewards_agree(&[f32::NAN, 2.0, 1.0]));
    let rewards = [1.0f32, 1.0, 0.0, 2.0, 0.5, 0.5];
    let adv = group_advantages(&rewards, 2, ScaleRewards::Group).unwrap();
    let agree = rewards.chunks(2).filter(|g| rewards_agree(g)).count();
    assert_eq!(agree, 2);
    assert_eq!(adv.frac_reward_zero_std(), agree as f64 / 3.0);
    let middle = adv.rows(2, 2);
    assert_eq!(middle.rewards, [0.0, 2.0]);
    assert_eq!(middle.group_mean, [1.0, 1.0]);
    assert_eq!(middle.std, adv.std[2..4]);
    assert_eq!(middle.advantages, adv.advantages[2..4]);
}

#[test]
fn advantage_and_reward_errors_name_the_problem() {
    let err = group_advantages(&[1.0, 2.0, 3.0], 2, ScaleRewards::Group).unwrap_err();
    assert!(err.to_string().contains("num_generations = 2"), "{err}");
    let err = weighted_rewards(&[vec![1.0, 2.0]], &[1.0]).unwrap_err();
    assert!(err.to_string().contains("reward weights"), "{err}");
    let err = weighted_rewards(&[vec![f64::INFINITY]], &[1.0]).unwrap_err();
    assert!(err.to_string().contains("finite"), "{err}");
}

/// A value of `tests/fixtures/rewards/none_rewards.json`, where JSON null stands for NaN.
fn nan_or_f64(value: &Value) -> f64 {
    if value.is_null() {
        f64::NAN
    } else {
        value.as_f64().expect("number or null")
    }
}

/// Rewards that are None (NaN: "no reward") are left out of the weighted sum, the group
/// statistics and the logged metrics exactly as TRL 1.16's own `_generate_and_score_completions`
/// does (fixture written by the pinned script beside it): partly rewarded completions, completions
/// no function rewarded (advantage 0), groups with one or no rewarded completion, every scaling,
/// and a function that never rewards (its metrics NaN).
#[test]
fn none_rewards_are_left_out_as_trl_does() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/rewards/none_rewards.json");
    let fixture: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert!(!cases.is_empty());
    let eps = common::F32_EPS;
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let per_func: Vec<Vec<f64>> = case["rewards_per_func"]
            .as_array()
            .unwrap()
            .iter()
            .map(|row| row.as_array().unwrap().iter().map(nan_or_f64).collect())
            .collect();
        let weights = f64s(&case["reward_weights"]);
        let g = case["num_generations"].as_u64().unwrap() as usize;
        let scale: ScaleRewards = serde_json::from_value(case["scale_rewards"].clone()).unwrap();
        let rewards = weighted_rewards(&per_func, &weights).unwrap();
        let adv = group_advantages(&rewards, g, scale).unwrap();
        // f32 sums and stds of a few values at most `r_max`, the advantages divided by the
        // smallest std (+ 1e-4) when scaled: a few dozen roundings of those magnitudes.
        let r_max = per_func
            .iter()
            .flatten()
            .chain(
                rewards
                    .iter()
                    .map(|&r| f64::from(r))
                    .collect::<Vec<_>>()
                    .iter(),
            )
            .filter(|v| !v.is_nan())
            .fold(0.0f64, |m, v| m.max(v.abs()));
        let scale_of_division = match scale {
            ScaleRewards::None => 1.0,
            _ => {
                adv.std
                    .iter()
                    .filter(|s| !s.is_nan())
                    .fold(f64::INFINITY, |m, &s| m.min(f64::from(s)))
                    .min(1.0)
                    + 1e-4
            }
        };
        let ulps = 4.0 * (g as f64 + 4.0) * eps;
        let expected = case["advantages"].as_array().unwrap();
        assert_eq!(adv.advantages.len(), expected.len(), "{name}: rows");
        for (row, (&actual, expected)) in adv.advantages.iter().zip(expected).enumerate() {
            let expected = nan_or_f64(expected);
            assert_close(
                f64::from(actual),
                expected,
                ulps,
                ulps * r_max / scale_of_division,
                &format!("{name}: advantage {row}"),
            );
        }
        let names: Vec<String> = (0..weights.len()).map(|k| format!("func{k}")).collect();
        let metrics =
            serde_json::to_value(RewardMetrics::new(&names, &per_func, &adv).unwrap()).unwrap();
        for (key, expected) in case["metrics"].as_object().unwrap() {
            let (actual, expected) = (nan_or_f64(&metrics[key]), nan_or_f64(expected));
            if expected.is_nan() {
                assert!(actual.is_nan(), "{name}: {key} = {actual}, TRL logs NaN");
            } else {
                let ulps = 4.0 * (per_func.len() as f64 + 4.0) * eps;
                assert_close(
                    actual,
                    expected,
                    ulps,
                    ulps * r_max,
                    &format!("{name}: {key}"),
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Loss
// ---------------------------------------------------------------------------------------------

#[test]
fn golden_per_token_terms_and_losses() {
    let golden = Golden::load();
    let mask = vec2(&golden.mask());
    for (loss_type, label) in LOSS_TYPES {
        let (_, loss) = golden.loss(&golden.params(loss_type));
        // kl = exp(d) - d - 1 (d = ref - logp) from the golden float32 log-probs: four float32
        // roundings, of terms no larger than 3 |kl| + 4 (exp(d) = kl + d + 1, |d| <= kl + 1).
        let eps = common::F32_EPS;
        let kl_tolerance = common::Tolerance {
            rtol: 4.0 * 3.0 * eps,
            atol: 4.0 * 4.0 * eps,
        };
        let kl = loss.per_token_kl.as_ref().expect("beta > 0 gives a KL");
        let golden_kl = golden.tensor("grpo.per_token_kl");
        common::assert_tensor_close(
            &format!("{label}: per-token KL"),
            kl,
            golden_kl,
            None,
            kl_tolerance,
        );
        // The per-token loss -A * ratio + beta * kl (ratio 1): the KL's error times beta, plus
        // four roundings of |A| + beta * kl.
        let beta = golden.case["beta"].as_f64().unwrap();
        let actual = vec2(&loss.per_token_loss);
        let expected = vec2(golden.tensor("grpo.per_token_loss"));
        let advantages = vec1(golden.tensor("grpo.advantages"));
        let kls = vec2(golden_kl);
        for (b, row) in mask.iter().enumerate() {
            for (t, &m) in row.iter().enumerate() {
                if m > 0.0 {
                    let what = format!("{label}: per-token loss [{b}, {t}]");
                    let e = f64::from(expected[b][t]);
                    let kl = f64::from(kls[b][t]);
                    let a = f64::from(advantages[b]).abs();
                    let atol = beta * kl_tolerance.bound(kl) + 4.0 * eps * (a + beta * kl);
                    assert_close(f64::from(actual[b][t]), e, 4.0 * eps, atol, &what);
                }
            }
        }
        // The loss: the golden float32 loss is off the float64 one by the recorded error, ours
        // by as much again (a float32 sum in another order).
        let tolerance = common::Tolerance::recorded(&format!("grpo.{label}.abs_err_loss"));
        let value = f64::from(loss.loss.to_scalar::<f32>().unwrap());
        let expected = golden.case["loss"][label].as_f64().unwrap();
        assert_close(
            value,
            expected,
            tolerance.rtol,
            tolerance.atol,
            &format!("{label}: loss"),
        );
        let golden_loss = golden.tensor(&format!("grpo.loss.{label}"));
        assert_close(
            value,
            f64::from(golden_loss.to_scalar::<f32>().unwrap()),
            tolerance.rtol,
            tolerance.atol,
            label,
        );

        let metrics = &golden.case["metrics_per_loss_type"][label];
        let kl = loss.metrics.kl.expect("kl metric").value();
        assert_close(
            kl,
            metrics["kl"].as_f64().unwrap(),
            1e-5,
            1e-7,
            &format!("{label}: kl"),
        );
        for (actual, key) in [
            (loss.metrics.clip_ratio_low_mean, "clip_ratio/low_mean"),
            (loss.metrics.clip_ratio_high_mean, "clip_ratio/high_mean"),
            (
                loss.metrics.clip_ratio_region_mean,
                "clip_ratio/region_mean",
            ),
        ] {
            let actual = actual.expect("clip metric").value();
            assert_close(actual, metrics[key].as_f64().unwrap(), 0.0, 1e-12, key);
        }
    }
}

/// d(loss)/d(logp) per token for ratio 1: `(-A + beta * (1 - exp(ref - logp)) [+ beta * kl]) * m`
/// divided by the loss type's normaliser (`len_i * B`, `sum m`, `B * L`, `num_items`).
fn analytic_gradient(golden: &Golden, params: &LossParams) -> Vec<Vec<f64>> {
    let logp = vec2(golden.tensor("grpo.policy_logps"));
    let reference = vec2(golden.tensor("grpo.ref_logps"));
    let advantages = vec1(golden.tensor("grpo.advantages"));
    let mask = vec2(&golden.mask());
    let batch = mask.len() as f64;
    let total: f64 = mask.iter().flatten().map(|&m| f64::from(m)).sum();
    let accumulation = params.gradient_accumulation_steps as f64;
    (0..mask.len())
        .map(|b| {
            let length: f64 = mask[b].iter().map(|&m| f64::from(m)).sum();
            let normaliser = match params.loss_type {
                LossType::Grpo => length.max(1.0) * batch * accumulation,
                LossType::Bnpo => total.max(1.0) * accumulation,
                LossType::DrGrpo => batch * params.max_completion_length as f64 * accumulation,
                LossType::Dapo => {
                    params.num_items_in_batch.max(1) as f64 * accumulation
                        / params.steps_per_generation as f64
                }
                other => panic!("{other:?} has no analytic form here"),
            };
            (0..mask[b].len())
                .map(|t| {
                    let d = f64::from(reference[b][t]) - f64::from(logp[b][t]);
                    let kl = d.exp() - d - 1.0;
                    let mut grad = -f64::from(advantages[b]) + params.beta * (1.0 - d.exp());
                    if params.use_bias_correction_kl {
                        grad += params.beta * kl;
                    }
                    grad * f64::from(mask[b][t]) / normaliser
                })
                .collect()
        })
        .collect()
}

fn assert_gradient_matches(golden: &Golden, params: &LossParams, what: &str) {
    let (logp, loss) = golden.loss(params);
    let grads = loss.loss.backward().unwrap();
    let grad = vec2(grads.get(logp.as_tensor()).expect("gradient of logp"));
    let expected = analytic_gradient(golden, params);
    for (b, row) in expected.iter().enumerate() {
        for (t, &e) in row.iter().enumerate() {
            let a = f64::from(grad[b][t]);
            assert_close(
                a,
                e,
                1e-4,
                1e-8,
                &format!("{what}: d loss / d logp [{b}, {t}]"),
            );
        }
    }
}

#[test]
fn gradient_wrt_logp_matches_the_analytic_form() {
    let golden = Golden::load();
    for (loss_type, label) in LOSS_TYPES {
        assert_gradient_matches(&golden, &golden.params(loss_type), label);
    }
}

#[test]
fn gradient_accumulation_scales_all_but_dapo() {
    let golden = Golden::load();
    for (loss_type, label) in LOSS_TYPES {
        // One generation per optimizer step (TRL's default steps_per_generation).
        let params = LossParams {
            gradient_accumulation_steps: 4,
            steps_per_generation: 4,
            ..golden.params(loss_type)
        };
        let (_, single) = golden.loss(&golden.params(loss_type));
        let (_, accumulated) = golden.loss(&params);
        let single = single.loss.to_scalar::<f32>().unwrap();
        let accumulated = accumulated.loss.to_scalar::<f32>().unwrap();
        let expected = if loss_type == LossType::Dapo {
            single
        } else {
            single / 4.0
        };
        assert_close(
            f64::from(accumulated),
            f64::from(expected),
            1e-6,
            0.0,
            label,
        );
        assert_gradient_matches(&golden, &params, &format!("{label} with 4 micro-batches"));
    }
}

#[test]
fn bias_corrected_kl_keeps_the_loss_and_changes_the_gradient() {
    let golden = Golden::load();
    let params = LossParams {
        use_bias_correction_kl: true,
        ..golden.params(LossType::Grpo)
    };
    let (_, loss) = golden.loss(&params);
    let expected = golden.case["loss"]["grpo"].as_f64().unwrap();
    let value = f64::from(loss.loss.to_scalar::<f32>().unwrap());
    assert_close(
        value,
        expected,
        1e-4,
        1e-7,
        "loss with use_bias_correction_kl",
    );
    assert_gradient_matches(&golden, &params, "use_bias_correction_kl");
}

/// `forward_batch_size`: the golden micro-batch cut into row chunks of every size, each chunk's
/// loss normalised by the whole micro-batch, gives the whole batch's loss, gradient and metrics
/// (off-policy ratios, so the clip metrics are not all 0).
#[test]
fn chunked_losses_sum_to_the_micro_batch_loss() {
    let golden = Golden::load();
    let logp = Var::from_tensor(golden.tensor("grpo.policy_logps")).unwrap();
    let (rows, width) = logp.dims2().unwrap();
    let shift: Vec<f32> = (0..rows * width)
        .map(|i| [-0.3f32, 0.0, 0.3][i % 3])
        .collect();
    let old_logp = (logp.as_tensor().detach()
        + Tensor::from_vec(shift, (rows, width), &Device::Cpu).unwrap())
    .unwrap();
    let mask = golden.mask();
    let (reference, advantages) = (
        golden.tensor("grpo.ref_logps"),
        golden.tensor("grpo.advantages"),
    );
    let micro_batch = MicroBatchSize::of(&mask).unwrap();
    for (loss_type, label) in LOSS_TYPES {
        let params = LossParams {
            gradient_accumulation_steps: 2,
            steps_per_generation: 2,
            ..golden.params(loss_type)
        };
        let loss_of_rows = |start: usize, len: usize| {
            let rows_of = |t: &Tensor| t.narrow(0, start, len).unwrap();
            let inputs = LossInputs {
                logp: &rows_of(logp.as_tensor()),
                old_logp: &rows_of(&old_logp),
                ref_logp: Some(&rows_of(reference)),
                advantages: &rows_of(advantages),
                mask: &rows_of(&mask),
                entropy_mask: None,
            };
            let loss = chunk_grpo_loss(&inputs, &params, micro_batch).unwrap();
            let grad = vec2(loss.loss.backward().unwrap().get(logp.as_tensor()).unwrap());
            (
                f64::from(loss.loss.to_scalar::<f32>().unwrap()),
                grad,
                loss.metrics,
            )
        };
        let (whole_loss, whole_grad, whole_metrics) = loss_of_rows(0, rows);
        let inputs = LossInputs {
            logp: logp.as_tensor(),
            old_logp: &old_logp,
            ref_logp: Some(reference),
            advantages,
            mask: &mask,
            entropy_mask: None,
        };
        let unchunked = grpo_loss(&inputs, &params).unwrap();
        assert_close(
            f64::from(unchunked.loss.to_scalar::<f32>().unwrap()),
            whole_loss,
            1e-6,
            0.0,
            &format!("{label}: one chunk of everything is grpo_loss"),
        );
        assert!(
            whole_metrics.clip_ratio_region_mean.unwrap().value() > 0.0,
            "{label}: some tokens clipped"
        );
        for size in 1..rows {
            let chunks: Vec<_> = (0..rows)
                .step_by(size)
                .map(|start| loss_of_rows(start, size.min(rows - start)))
                .collect();
            let what = format!("{label} in chunks of {size}");
            let loss: f64 = chunks.iter().map(|c| c.0).sum();
            assert_close(loss, whole_loss, 1e-5, 1e-8, &format!("{what}: loss"));
            for (b, row) in whole_grad.iter().enumerate() {
                for (t, &expected) in row.iter().enumerate() {
                    let grad: f64 = chunks.iter().map(|c| f64::from(c.1[b][t])).sum();
                    assert_close(
                        grad,
                        f64::from(expected),
                        1e-5,
                        1e-9,
                        &format!("{what}: grad [{b}, {t}]"),
                    );
                }
            }
            let metrics: Vec<_> = chunks.iter().map(|c| c.2).collect();
            let combined = LossMetrics::of_chunks(&metrics);
            for (actual, expected, name) in [
                (combined.kl, whole_metrics.kl, "kl"),
                (
                    combined.clip_ratio_low_mean,
                    whole_metrics.clip_ratio_low_mean,
                    "low",
                ),
                (
                    combined.clip_ratio_high_mean,
                    whole_metrics.clip_ratio_high_mean,
                    "high",
                ),
                (
                    combined.clip_ratio_region_mean,
                    whole_metrics.clip_ratio_region_mean,
                    "region",
                ),
            ] {
                let (actual, expected) = (actual.unwrap().value(), expected.unwrap().value());
                assert_close(actual, expected, 1e-9, 1e-12, &format!("{what}: {name}"));
            }
        }
    }
}

/// One row of 4 tokens with ratios 0.5, 1.0, 1.5 and a masked 3.0, against a hand computation.
#[test]
fn clipping_off_policy_ratios() {
    let ratios = [0.5f64, 1.0, 1.5, 3.0];
    let old = [-1.0f64, -2.0, -0.5, -1.5];
    let logp_values: Vec<f32> = ratios
        .iter()
        .zip(old)
        .map(|(r, o)| (o + r.ln()) as f32)
        .collect();
    let device = Device::Cpu;
    let logp = Var::from_vec(logp_values.repeat(2), (2, 4), &device).unwrap();
    let old_logp = Tensor::from_vec(old.map(|o| o as f32).repeat(2), (2, 4), &device).unwrap();
    let mask = Tensor::from_vec(vec![1f32, 1., 1., 0., 1., 1., 1., 0.], (2, 4), &device).unwrap();
    // Row 0 has a positive advantage, row 1 a negative one.
    let advantages = Tensor::new(&[2f32, -1.0], &device).unwrap();
    let params = LossParams::new(LossType::Bnpo, 0.0, 0.2, 0.28, 4, 6);
    let inputs = LossInputs {
        logp: logp.as_tensor(),
        old_logp: &old_logp,
        ref_logp: None,
        advantages: &advantages,
        mask: &mask,
        entropy_mask: None,
    };
    let loss = grpo_loss(&inputs, &params).unwrap();
    assert!(loss.per_token_kl.is_none() && loss.metrics.kl.is_none());
    // A = 2: -min(r A, clip(r) A) = -min(1, 1.6), -min(2, 2), -min(3, 2.56) = -1, -2, -2.56.
    // A = -1: -min(-r, -clip(r)) = max(r, clip(r)) = 0.8, 1, 1.5.
    let expected_tokens = [-1.0, -2.0, -2.56, 0.8, 1.0, 1.5];
    let expected = expected_tokens.iter().sum::<f64>() / 6.0;
    assert_close(
        f64::from(loss.loss.to_scalar::<f32>().unwrap()),
        expected,
        1e-5,
        1e-7,
        "loss",
    );
    // Clipped: row 0's ratio 1.5 > 1.28 with A > 0; row 1's 0.5 < 0.8 with A < 0.
    assert_close(
        loss.metrics.clip_ratio_high_mean.unwrap().value(),
        1.0 / 6.0,
        0.0,
        1e-12,
        "high",
    );
    assert_close(
        loss.metrics.clip_ratio_low_mean.unwrap().value(),
        1.0 / 6.0,
        0.0,
        1e-12,
        "low",
    );
    assert_close(
        loss.metrics.clip_ratio_region_mean.unwrap().value(),
        2.0 / 6.0,
        0.0,
        1e-12,
        "region",
    );

    // d/dlogp of -r A is -r A where the unclipped term is the minimum, 0 where the clipped
    // (constant) one is; row 1's 0.5 is clipped (max picks the constant 0.8).
    let grads = loss.loss.backward().unwrap();
    let grad = vec2(grads.get(logp.as_tensor()).unwrap());
    let expected = [[-1.0, -2.0, 0.0, 0.0], [0.0, 1.0, 1.5, 0.0]];
    for (b, row) in expected.iter().enumerate() {
        for (t, &e) in row.iter().enumerate() {
            let what = format!("clipped gradient [{b}, {t}]");
            assert_close(f64::from(grad[b][t]), e / 6.0, 1e-5, 1e-7, &what);
        }
    }
}

#[test]
fn loss_errors_name_the_culprit() {
    let golden = Golden::load();
    let logp = golden.tensor("grpo.policy_logps");
    let mask = golden.mask();
    let advantages = golden.tensor("grpo.advantages");
    let without_ref = LossInputs {
        logp,
        old_logp: logp,
        ref_logp: None,
        advantages,
        mask: &mask,
        entropy_mask: None,
    };
    let err = grpo_loss(&without_ref, &golden.params(LossType::Grpo)).unwrap_err();
    assert!(err.to_string().contains("reference log-probs"), "{err}");

    let short_mask = mask.narrow(1, 0, 3).unwrap();
    let bad_mask = LossInputs {
        mask: &short_mask,
        ..without_ref
    };
    let err = grpo_loss(&bad_mask, &golden.params(LossType::Grpo)).unwrap_err();
    assert!(err.to_string().contains("mask has shape"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------

#[test]
fn step_metrics_serialise_with_trl_names() {
    let golden = Golden::load();
    let (_, loss) = golden.loss(&golden.params(LossType::Grpo));
    let adv = group_advantages(&[1.0, 0.0, 2.0, 2.0], 2, ScaleRewards::Group).unwrap();
    let per_func = vec![vec![1.0], vec![0.0], vec![2.0], vec![2.0]];
    let entropy = masked_mean(golden.tensor("grpo.entropy"), &golden.mask()).unwrap();
    let expected_entropy = golden.case["metrics"]["entropy"].as_f64().unwrap();
    assert_close(entropy, expected_entropy, 1e-5, 1e-7, "entropy");
    let metrics = StepMetrics {
        loss: 0.5,
        grad_norm: 1.5,
        learning_rate: 1e-6,
        rewards: RewardMetrics::new(&["accuracy".to_owned()], &per_func, &adv).unwrap(),
        dynamic_sampling: None,
        policy: loss.metrics,
        completions: CompletionLengthMetrics::default(),
        entropy,
        num_tokens: 1234,
        step_time: 2.0,
    };
    let json = serde_json::to_value(&metrics).unwrap();
    let keys: Vec<&str> = json
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        [
            "loss",
            "grad_norm",
            "learning_rate",
            "reward",
            "reward_std",
            "rewards/accuracy/mean",
            "rewards/accuracy/std",
            "frac_reward_zero_std",
            "kl",
            "clip_ratio/low_mean",
            "clip_ratio/high_mean",
            "clip_ratio/region_mean",
            "completions/mean_length",
            "completions/min_length",
            "completions/max_length",
            "completions/clipped_ratio",
            "entropy",
            "num_tokens",
            "step_time",
        ]
    );
    assert_eq!(json["frac_reward_zero_std"], 0.5);
    assert_eq!(json["rewards/accuracy/mean"], 1.25);

    // Dynamic sampling's metrics follow the rewards'; a sapo loss logs no clip ratios.
    let sapo = LossParams {
        loss_type: LossType::Sapo,
        ..golden.params(LossType::Grpo)
    };
    let (_, sapo_loss) = golden.loss(&sapo);
    let with_dynamic_sampling = StepMetrics {
        dynamic_sampling: Some(DynamicSamplingMetrics {
            generation_rounds: 2.5,
            filled_groups: 0.0,
        }),
        policy: sapo_loss.metrics,
        ..metrics
    };
    let json = serde_json::to_value(&with_dynamic_sampling).unwrap();
    let keys: Vec<&str> = json
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys[7..11],
        [
            "frac_reward_zero_std",
            "dynamic_sampling/generation_rounds",
            "dynamic_sampling/filled_groups",
            "kl",
        ]
    );
    assert_eq!(json["dynamic_sampling/generation_rounds"], 2.5);
    assert!(
        !keys.iter().any(|k| k.starts_with("clip_ratio")),
        "{keys:?}"
    );
}
