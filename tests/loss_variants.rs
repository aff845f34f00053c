//! TRL 1.16's loss variants and options against TRL's own `GRPOTrainer._compute_loss` on the
//! golden batch with off-policy ratios (tests/fixtures/loss_variants, written by its pinned
//! make_fixtures.py): GSPO (`importance_sampling_level = "sequence"`), `cispo`, `sapo` and its
//! temperatures, two-sided clipping `delta`, `top_entropy_quantile`, and the dapo/cispo
//! normaliser under `steps_per_generation` / `generation_batch_size`.
//!
//! Each case's settings go through our [`Config`] under TRL's field names and
//! [`LossParams::from_config`], so the names, their defaults and their resolution are checked
//! with the math. The fixture holds the loss inputs TRL computed (its own log-probs and
//! entropies of the golden policy) and, per case, the loss, d loss / d log-probs (every
//! parameter's gradient is this times the log-probs' Jacobian, which tests/grpo_gradients.rs
//! checks against TRL) and the metrics `_compute_loss` logged.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use grpo::config::Config;
use grpo::grpo::{
    chunk_grpo_loss, entropy_threshold, grpo_loss, high_entropy_mask, GrpoLoss, LossInputs,
    LossMetrics, LossParams, Mean, MicroBatchSize,
};
use serde_json::Value;

use common::assert_tensor_close;

struct Fixture {
    cases: Value,
    tensors: HashMap<String, Tensor>,
}

fn fixture() -> Fixture {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/loss_variants");
    let cases: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let tensors =
        candle_core::safetensors::load(dir.join("tensors.safetensors"), &Device::Cpu).unwrap();
    Fixture { cases, tensors }
}

impl Fixture {
    fn tensor(&self, key: &str) -> &Tensor {
        self.tensors
            .get(key)
            .unwrap_or_else(|| panic!("fixture tensor {key} missing"))
    }

    fn names(&self) -> Vec<String> {
        self.cases["cases"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect()
    }

    fn case(&self, name: &str) -> &Value {
        &self.cases["cases"][name]
    }

    /// Our config for the case: the batch's shape (a micro-step of `rows / G` prompts; TRL's
    /// `per_device_train_batch_size` counts the `rows` completions) and the case's GRPOConfig
    /// fields under their TRL names.
    fn config(&self, name: &str) -> Config {
        let batch = &self.cases["batch"];
        let g = batch["num_generations"].as_u64().unwrap();
        let case = self.case(name);
        let mut sets = vec![
            format!(
                "per_device_train_batch_size={}",
                batch["rows"].as_u64().unwrap() / g
            ),
            format!("num_generations={g}"),
            format!("max_completion_length={}", batch["max_completion_length"]),
            format!("temperature={}", batch["temperature"]),
            format!("epsilon={}", batch["epsilon"]),
            format!(
                "gradient_accumulation_steps={}",
                case["gradient_accumulation_steps"]
            ),
        ];
        for (key, value) in case["config"].as_object().unwrap() {
            // Not a config field of ours (TRL 0.14 had no bias correction): set on the params.
            if key != "use_bias_correction_kl" {
                sets.push(format!("{key}={value}"));
            }
        }
        Config::load(None, &sets).unwrap_or_else(|e| panic!("{name}: {e:#}"))
    }

    fn params(&self, name: &str) -> LossParams {
        let case = self.case(name);
        let cfg = self.config(name);
        assert_eq!(
            cfg.steps_per_generation() as u64,
            case["steps_per_generation"].as_u64().unwrap(),
            "{name}: steps_per_generation resolved as TRL does"
        );
        let num_items = case["num_items_in_batch"].as_u64().unwrap() as usize;
        LossParams {
            use_bias_correction_kl: case["config"]["use_bias_correction_kl"] == true,
            ..LossParams::from_config(&cfg, num_items)
        }
    }

    fn mask(&self) -> &Tensor {
        self.tensor("inputs.mask")
    }

    /// The entropy mask of the case's `top_entropy_quantile` over the rows `rows` of the batch,
    /// its threshold taken over the whole batch.
    fn entropy_mask(&self, name: &str, rows: std::ops::Range<usize>) -> Option<Tensor> {
        let quantile = self.config(name).top_entropy_quantile;
        if quantile >= 1.0 {
            return None;
        }
        let entropy = self.tensor("inputs.entropy");
        let threshold = entropy_threshold(&[(entropy, self.mask())], quantile).unwrap();
        let cut = |t: &Tensor| t.narrow(0, rows.start, rows.len()).unwrap();
        Some(high_entropy_mask(&cut(entropy), &cut(self.mask()), threshold).unwrap())
    }

    /// The case's loss over rows `rows` of the batch (a chunk of the micro-batch), with the
    /// log-probs as a variable.
    fn loss(&self, name: &str, rows: std::ops::Range<usize>) -> (Var, GrpoLoss) {
        let cut = |key: &str| self.tensor(key).narrow(0, rows.start, rows.len()).unwrap();
        let logp = Var::from_tensor(&cut("inputs.logp")).unwrap();
        let entropy_mask = self.entropy_mask(name, rows.clone());
        let inputs = LossInputs {
            logp: logp.as_tensor(),
            old_logp: &cut("inputs.old_logp"),
            ref_logp: Some(&cut("inputs.ref_logp")),
            advantages: &cut("inputs.advantages"),
            mask: &cut("inputs.mask"),
            entropy_mask: entropy_mask.as_ref(),
        };
        let micro_batch = MicroBatchSize::of(self.mask()).unwrap();
        let loss = chunk_grpo_loss(&inputs, &self.params(name), micro_batch).unwrap();
        (logp, loss)
    }

    fn rows(&self) -> usize {
        self.mask().dim(0).unwrap()
    }
}

fn grad_of(logp: &Var, loss: &GrpoLoss) -> Tensor {
    loss.loss
        .backward()
        .unwrap()
        .get(logp.as_tensor())
        .expect("a gradient for the log-probs")
        .clone()
}

fn largest(t: &Tensor) -> f64 {
    t.abs()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Our f32 arithmetic runs in another order than torch's: a loss (a normalised sum of per-token
/// terms) is off by a few ulps of its largest term, a gradient element (a product of a few
/// factors, or a difference of two such) by a few ulps of the largest element.
fn tolerance(scale: f64) -> common::Tolerance {
    common::Tolerance::ulps(8.0, scale)
}

#[test]
fn every_variant_matches_trl_loss_gradient_and_metrics() {
    let f = fixture();
    let names = f.names();
    assert!(names.len() >= 10, "the fixture's cases: {names:?}");
    for name in &names {
        let case = f.case(name);
        let (logp, loss) = f.loss(name, 0..f.rows());
        let params = f.params(name);

        // The loss: a normalised sum of the per-token terms.
        let terms = (&loss.per_token_loss * f.mask()).unwrap();
        let scale = largest(&terms);
        let value = f64::from(loss.loss.to_scalar::<f32>().unwrap());
        let expected = f64::from(
            f.tensor(&format!("{name}.loss"))
                .to_scalar::<f32>()
                .unwrap(),
        );
        let bound = tolerance(scale).bound(expected);
        assert!(
            (value - expected).abs() <= bound,
            "{name}: loss {value} vs TRL {expected} (tolerance {bound}, {params:?})"
        );

        // The gradient w.r.t. every per-token log-prob.
        let grad = grad_of(&logp, &loss);
        let expected = f.tensor(&format!("{name}.grad_logp"));
        assert_tensor_close(
            &format!("{name}: d loss / d logp"),
            &grad,
            expected,
            None,
            tolerance(largest(expected)),
        );

        // Exactly the metrics TRL logs for the case, with its values.
        let trl = &case["metrics"];
        let ours = serde_json::to_value(loss.metrics).unwrap();
        for (key, value) in ours.as_object().unwrap() {
            let want = trl[key]
                .as_f64()
                .unwrap_or_else(|| panic!("{name}: we log {key}, TRL does not"));
            let got = value.as_f64().unwrap();
            assert!(
                (got - want).abs() <= 1e-6 * want.abs().max(1.0),
                "{name}: {key} = {got}, TRL {want}"
            );
        }
        for key in [
            "kl",
            "clip_ratio/low_mean",
            "clip_ratio/high_mean",
            "clip_ratio/region_mean",
            "cispo_clip_ratio",
        ] {
            assert_eq!(
                ours.get(key).is_some(),
                trl.get(key).is_some(),
                "{name}: {key} logged by TRL: {}",
                trl.get(key).is_some()
            );
        }

        // The tokens top_entropy_quantile keeps: TRL's get_high_entropy_mask.
        if let Some(kept) = f.entropy_mask(name, 0..f.rows()) {
            let expected = f.tensor(&format!("{name}.entropy_mask"));
            assert_eq!(
                kept.to_vec2::<f32>().unwrap(),
                expected.to_vec2::<f32>().unwrap(),
                "{name}: entropy mask"
            );
        }
    }
}

/// The variants differ from each other where they should: a plausible bug that drops a field
/// on the way to the loss (sequence level computed per token, delta or the sapo temperatures
/// ignored, the entropy mask not applied, the generation size not in the dapo normaliser) would
/// make two of these equal.
#[test]
fn every_option_changes_the_gradient() {
    let f = fixture();
    let grad = |name: &str| {
        let (logp, loss) = f.loss(name, 0..f.rows());
        grad_of(&logp, &loss)
    };
    for (a, b) in [
        ("token_grpo", "gspo"),
        ("token_grpo", "top_entropy"),
        ("sapo", "sapo_sequence"),
        ("sapo", "sapo_temperatures"),
        ("cispo", "cispo_sequence"),
        ("gspo", "gspo_small_epsilon"),
    ] {
        let diff = common::max_abs_diff(&grad(a), &grad(b));
        assert!(diff > 1e-5, "{a} and {b} have the same gradient");
    }
    // delta with bnpo against plain bnpo, dapo under steps_per_generation against plain dapo:
    // the same inputs with the field taken away.
    let without = |name: &str, change: fn(&mut LossParams)| {
        let mut params = f.params(name);
        change(&mut params);
        let logp = Var::from_tensor(f.tensor("inputs.logp")).unwrap();
        let inputs = LossInputs {
            logp: logp.as_tensor(),
            old_logp: f.tensor("inputs.old_logp"),
            ref_logp: Some(f.tensor("inputs.ref_logp")),
            advantages: f.tensor("inputs.advantages"),
            mask: f.mask(),
            entropy_mask: None,
        };
        let loss = grpo_loss(&inputs, &params).unwrap();
        grad_of(&logp, &loss)
    };
    let diff = common::max_abs_diff(&grad("delta"), &without("delta", |p| p.delta = None));
    assert!(diff > 1e-5, "delta changes the gradient");
    let diff = common::max_abs_diff(
        &grad("dapo_steps_per_generation"),
        &without("dapo_steps_per_generation", |p| {
            p.steps_per_generation = p.gradient_accumulation_steps
        }),
    );
    assert!(
        diff > 1e-5,
        "steps_per_generation changes the dapo normaliser"
    );
}

/// Training skips the backward of completions whose gradient is zero
/// (`LossParams::gradient_vanishes`): for every variant, with its off-policy ratios, entropy
/// mask and options, zero advantages without the KL term give exactly zero gradient; with the KL
/// term (the fixture's reference log-probs differ from the policy's) or with the case's own
/// advantages they do not, and the predicate says so.
#[test]
fn zero_advantages_without_kl_give_zero_gradient_for_every_variant() {
    let f = fixture();
    let rows = f.rows();
    let zeros = f.tensor("inputs.advantages").zeros_like().unwrap();
    for name in f.names() {
        let entropy_mask = f.entropy_mask(&name, 0..rows);
        let grad = |params: &LossParams, advantages: &Tensor| {
            let logp = Var::from_tensor(f.tensor("inputs.logp")).unwrap();
            let inputs = LossInputs {
                logp: logp.as_tensor(),
                old_logp: f.tensor("inputs.old_logp"),
                ref_logp: Some(f.tensor("inputs.ref_logp")),
                advantages,
                mask: f.mask(),
                entropy_mask: entropy_mask.as_ref(),
            };
            grad_of(&logp, &grpo_loss(&inputs, params).unwrap())
        };
        let without_kl = LossParams {
            beta: 0.0,
            ..f.params(&name)
        };
        assert!(without_kl.gradient_vanishes(&zeros).unwrap(), "{name}");
        assert_eq!(
            largest(&grad(&without_kl, &zeros)),
            0.0,
            "{name}: zero gradient"
        );

        let advantages = f.tensor("inputs.advantages");
        assert!(!without_kl.gradient_vanishes(advantages).unwrap(), "{name}");
        assert!(largest(&grad(&without_kl, advantages)) > 0.0, "{name}");

        let with_kl = LossParams {
            beta: 0.04,
            ..f.params(&name)
        };
        assert!(!with_kl.gradient_vanishes(&zeros).unwrap(), "{name}");
        assert!(
            largest(&grad(&with_kl, &zeros)) > 0.0,
            "{name}: the KL term's gradient"
        );
    }
}

/// `forward_batch_size` cuts a micro-batch into row chunks: for every variant the chunks'
/// losses and gradients sum to the whole micro-batch's and their metrics combine to its own
/// (sequence-level clip ratios count sequences, token-level ones tokens; the entropy threshold
/// is the whole micro-batch's).
#[test]
fn chunks_of_every_variant_sum_to_the_micro_batch() {
    let f = fixture();
    let rows = f.rows();
    for name in f.names() {
        let (logp, whole) = f.loss(&name, 0..rows);
        let whole_grad = grad_of(&logp, &whole).to_vec2::<f32>().unwrap();
        let whole_loss = f64::from(whole.loss.to_scalar::<f32>().unwrap());
        for size in 1..rows {
            let what = format!("{name} in chunks of {size}");
            let chunks: Vec<(f64, Vec<Vec<f32>>, LossMetrics)> = (0..rows)
                .step_by(size)
                .map(|start| {
                    let (logp, loss) = f.loss(&name, start..(start + size).min(rows));
                    let grad = grad_of(&logp, &loss).to_vec2::<f32>().unwrap();
                    let value = f64::from(loss.loss.to_scalar::<f32>().unwrap());
                    (value, grad, loss.metrics)
                })
                .collect();
            let loss: f64 = chunks.iter().map(|c| c.0).sum();
            assert!(
                (loss - whole_loss).abs() <= 1e-6 + 1e-5 * whole_loss.abs(),
                "{what}: loss {loss} vs {whole_loss}"
            );
            let grad: Vec<Vec<f32>> = chunks.iter().flat_map(|c| c.1.clone()).collect();
            assert_eq!(grad.len(), whole_grad.len());
            for (b, (row, whole_row)) in grad.iter().zip(&whole_grad).enumerate() {
                for (t, (g, w)) in row.iter().zip(whole_row).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-9 + 1e-5 * w.abs(),
                        "{what}: grad [{b}, {t}] {g} vs {w}"
                    );
                }
            }
            let metrics: Vec<LossMetrics> = chunks.iter().map(|c| c.2).collect();
            let combined = serde_json::to_value(LossMetrics::of_chunks(&metrics)).unwrap();
            let expected = serde_json::to_value(whole.metrics).unwrap();
            let (combined, expected) =
                (combined.as_object().unwrap(), expected.as_object().unwrap());
            assert_eq!(
                combined.keys().collect::<Vec<_>>(),
                expected.keys().collect::<Vec<_>>(),
                "{what}: metric names"
            );
            for (key, value) in expected {
                let (got, want) = (combined[key].as_f64().unwrap(), value.as_f64().unwrap());
                assert!((got - want).abs() <= 1e-12, "{what}: {key} {got} vs {want}");
            }
        }
    }
}

/// `torch.quantile`'s linear interpolation, hand computed, and the mask's `>=`.
#[test]
fn entropy_threshold_is_torch_quantile_of_the_unmasked_tokens() {
    let device = Device::Cpu;
    // Unmasked values 1, 2, 4, 8 (a masked 100 must not count).
    let entropy = Tensor::new(&[[4f32, 1.0, 100.0], [8.0, 2.0, 0.0]], &device).unwrap();
    let mask = Tensor::new(&[[1f32, 1.0, 0.0], [1.0, 1.0, 0.0]], &device).unwrap();
    let threshold = |keep: f64| entropy_threshold(&[(&entropy, &mask)], keep).unwrap();
    // keep 1.0: quantile 0 = the smallest; keep 0.0: quantile 1 = the largest.
    assert_eq!(threshold(1.0), Some(1.0));
    assert_eq!(threshold(0.0), Some(8.0));
    // keep 0.5: rank 0.5 * 3 = 1.5, between 2 and 4.
    assert_eq!(threshold(0.5), Some(3.0));
    // keep 0.2: rank 0.8 * 3 = 2.4 between 4 and 8: 4 + 0.4 * 4 (f32 arithmetic).
    let rank = 0.8f32 * 3.0;
    let expected = 4.0 + (rank - 2.0) * 4.0;
    assert!((threshold(0.2).unwrap() - expected).abs() <= 8.0 * f32::EPSILON);
    // Chunks give the whole batch's threshold.
    let halves = [
        (
            &entropy.narrow(0, 0, 1).unwrap(),
            &mask.narrow(0, 0, 1).unwrap(),
        ),
        (
            &entropy.narrow(0, 1, 1).unwrap(),
            &mask.narrow(0, 1, 1).unwrap(),
        ),
    ];
    assert_eq!(entropy_threshold(&halves, 0.5).unwrap(), Some(3.0));

    let kept = high_entropy_mask(&entropy, &mask, Some(4.0)).unwrap();
    assert_eq!(
        kept.to_vec2::<f32>().unwrap(),
        [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]],
        "at or above 4, masked tokens never"
    );
    // No unmasked token: no threshold, nothing kept.
    let nothing = mask.zeros_like().unwrap();
    assert_eq!(
        entropy_threshold(&[(&entropy, &nothing)], 0.5).unwrap(),
        None
    );
    let kept = high_entropy_mask(&entropy, &nothing, None).unwrap();
    assert_eq!(largest(&kept), 0.0);
    let err = entropy_threshold(&[(&entropy, &mask)], 1.5).unwrap_err();
    assert!(err.to_string().contains("top_entropy_quantile"), "{err}");
}

/// A mean kept as parts: chunks add, micro-batches average, and it serialises as its value.
#[test]
fn means_combine_exactly() {
    let a = Mean {
        sum: 3.0,
        count: 4.0,
    };
    let b = Mean {
        sum: 1.0,
        count: 1.0,
    };
    assert_eq!((a + b).value(), 0.8);
    assert_eq!(Mean::of_values([0.75, 1.0].into_iter()).value(), 0.875);
    assert_eq!(
        Mean::default().value(),
        0.0,
        "an empty mean is 0, as TRL's clamp(min=1)"
    );
    assert_eq!(serde_json::to_value(a).unwrap(), 0.75);
}
