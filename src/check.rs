//! `grpo check --golden DIR`: this build's model, on a device and in a compute dtype, against a
//! golden folder (the schema of `tests/fixtures/golden`, made by PyTorch and TRL in float32):
//! the forward logits, the per-token log-probs of the policy and of the reference, the training
//! forward's log-probs and entropies, and for each loss type the loss and the full gradient of
//! every parameter. Each comparison has the tolerance `docs/PRECISION.md` gives for its dtype:
//!
//! - f32: `GOLDEN_SAFETY` (4) times the float32 error `cases.json` → `precision` records for the
//!   quantity, plus 4 float32 roundings of each value (the rule of the golden tests);
//! - bf16 compute: `16·u·L` on logits (`u = 2⁻⁹`, `L` the largest golden logit), `16·u·L / T` on
//!   log-probs and entropies, 5 % relative L2 error on each parameter's gradient;
//! - on losses, in both, also the bound the KL term's sensitivity to the log-probs' tolerance
//!   gives (a GPU's log-probs differ from the golden ones by about as much as the CPU's).
//!
//! Dimensions, ids and settings all come from the folder, so any folder of the schema works.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use crate::grpo::{grpo_loss, LossInputs, LossParams, LossType};
use crate::model::{
    completion_logprobs, grouped_completion_logprobs, GroupedBatch, ModelFiles, Qwen2,
};

/// Each golden float32 value and ours are each off the exact value by about the recorded
/// error; twice that, twice again.
const GOLDEN_SAFETY: f64 = 4.0;
/// float32's machine epsilon.
const F32_EPS: f64 = f32::EPSILON as f64;
/// One bf16 rounding: a relative error of at most 2⁻⁹.
const BF16_UNIT_ROUNDOFF: f64 = 1.0 / 512.0;
/// bf16 logits may differ from the golden ones by this many roundoffs of the largest logit.
const BF16_LOGIT_ROUNDOFFS: f64 = 16.0;
/// Relative L2 error allowed for each parameter's gradient with bf16 compute.
const BF16_GRADIENT_RELATIVE_ERROR: f64 = 0.05;

/// One quantity compared with the golden folder.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    /// What was compared, e.g. `logits` or `grad.dapo (24 parameters)`.
    pub quantity: String,
    pub dtype: DType,
    /// The largest absolute difference from the golden values.
    pub max_abs_error: f64,
    /// The error in units of its tolerance (the worst element, or parameter): at most 1 passes.
    pub ratio: f64,
    /// The tolerance, in words.
    pub tolerance: String,
    /// Where the worst ratio was (an element index or a parameter name).
    pub worst: String,
}

impl Comparison {
    /// Within tolerance (a NaN never is).
    pub fn passed(&self) -> bool {
        self.ratio <= 1.0
    }
}

/// Every comparison of one `grpo check --golden` run.
#[derive(Debug, Clone, PartialEq)]
pub struct GoldenReport {
    /// The device, e.g. `cuda:0`.
    pub device: String,
    pub comparisons: Vec<Comparison>,
}

impl GoldenReport {
    /// Whether every comparison passed.
    pub fn passed(&self) -> bool {
        self.comparisons.iter().all(Comparison::passed)
    }

    /// The comparisons that failed.
    pub fn failures(&self) -> impl Iterator<Item = &Comparison> {
        self.comparisons.iter().filter(|c| !c.passed())
    }

    /// A Markdown table, one row per comparison.
    pub fn table(&self) -> String {
        let mut out = format!(
            "golden check on {}\n\n| dtype | quantity | max abs error | error / tolerance | tolerance | worst at | result |\n|---|---|---:|---:|---|---|---|\n",
            self.device
        );
        for c in &self.comparisons {
            let _ = writeln!(
                out,
                "| {} | {} | {:.3e} | {:.3} | {} | {} | {} |",
                c.dtype.as_str(),
                c.quantity,
                c.max_abs_error,
                c.ratio,
                c.tolerance,
                c.worst,
                if c.passed() { "ok" } else { "FAIL" }
            );
        }
        out
    }
}

/// An element-wise tolerance `atol + rtol * |golden|`.
#[derive(Debug, Clone, Copy)]
struct Tolerance {
    rtol: f64,
    atol: f64,
}

impl Tolerance {
    fn describe(&self) -> String {
        format!("atol {:.2e} + rtol {:.2e}", self.atol, self.rtol)
    }
}

/// The golden folder's cases, tensors and models.
struct Golden {
    cases: serde_json::Value,
    tensors: HashMap<String, Tensor>,
    device: Device,
}

impl Golden {
    fn load(dir: &Path, device: &Device) -> Result<Self> {
        let cases_path = dir.join("cases.json");
        let text = std::fs::read_to_string(&cases_path).with_context(|| {
            format!(
                "reading {} (is {} a golden folder like tests/fixtures/golden?)",
                cases_path.display(),
                dir.display()
            )
        })?;
        let cases = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", cases_path.display()))?;
        let tensors_path = dir.join("tensors.safetensors");
        let tensors = candle_core::safetensors::load(&tensors_path, &Device::Cpu)
            .with_context(|| format!("loading {}", tensors_path.display()))?;
        Ok(Golden {
            cases,
            tensors,
            device: device.clone(),
        })
    }

    /// A golden tensor on the CPU.
    fn host(&self, key: &str) -> Result<&Tensor> {
        self.tensors
            .get(key)
            .with_context(|| format!("the golden tensors have no {key}"))
    }

    /// A golden tensor on the device; integer tensors (ids, masks, positions) as u32.
    fn tensor(&self, key: &str) -> Result<Tensor> {
        let t = self.host(key)?;
        let t = match t.dtype() {
            DType::I64 | DType::U8 => t.to_dtype(DType::U32)?,
            _ => t.clone(),
        };
        Ok(t.to_device(&self.device)?)
    }

    fn case(&self, path: &str) -> Result<&serde_json::Value> {
        let mut value = &self.cases;
        for part in path.split('.') {
            value = &value[part];
        }
        if value.is_null() {
            bail!("cases.json has no {path}");
        }
        Ok(value)
    }

    fn f64(&self, path: &str) -> Result<f64> {
        self.case(path)?
            .as_f64()
            .with_context(|| format!("cases.json {path} is not a number"))
    }

    fn usize(&self, path: &str) -> Result<usize> {
        let v = self
            .case(path)?
            .as_u64()
            .with_context(|| format!("cases.json {path} is not a count"))?;
        Ok(usize::try_from(v)?)
    }

    /// The f32 tolerance of a quantity whose golden float32 error `precision.<key>` records.
    fn recorded(&self, key: &str) -> Result<Tolerance> {
        Ok(Tolerance {
            rtol: GOLDEN_SAFETY * F32_EPS,
            atol: GOLDEN_SAFETY * self.f64(&format!("precision.{key}"))?,
        })
    }
}

/// The values of `t` as f64 on the host, flattened.
fn host_values(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1()?)
}

/// Element-wise comparison of `actual` with `golden` where `mask` (a prefix of the shape; all
/// when `None`) is non-zero.
fn compare(
    quantity: &str,
    dtype: DType,
    actual: &Tensor,
    golden: &Tensor,
    mask: Option<&Tensor>,
    tolerance: Tolerance,
) -> Result<Comparison> {
    if actual.dims() != golden.dims() {
        bail!(
            "{quantity}: shape {:?}, golden {:?}",
            actual.dims(),
            golden.dims()
        );
    }
    let (a, e) = (host_values(actual)?, host_values(golden)?);
    let keep = match mask {
        Some(mask) => {
            let m = host_values(mask)?;
            let per = a.len() / m.len().max(1);
            (0..a.len()).map(|i| m[i / per] != 0.0).collect()
        }
        None => vec![true; a.len()],
    };
    let mut max_abs_error = 0f64;
    let (mut ratio, mut worst) = (0f64, String::from("-"));
    for i in (0..a.len()).filter(|&i| keep[i]) {
        let error = (a[i] - e[i]).abs();
        let excess = error / (tolerance.atol + tolerance.rtol * e[i].abs());
        // NaN propagates: a NaN anywhere fails the comparison.
        if excess.is_nan() || excess > ratio {
            ratio = excess;
            worst = format!("element {i}: {} vs {}", a[i], e[i]);
        }
        if error.is_nan() || error > max_abs_error {
            max_abs_error = error;
        }
        if ratio.is_nan() {
            break;
        }
    }
    Ok(Comparison {
        quantity: quantity.to_string(),
        dtype,
        max_abs_error,
        ratio,
        tolerance: tolerance.describe(),
        worst,
    })
}

/// Checks this build's model on `device` with each compute dtype in `dtypes` against the golden
/// folder `dir`.
pub fn check_golden(dir: &Path, device: &Device, dtypes: &[DType]) -> Result<GoldenReport> {
    let golden = Golden::load(dir, device)?;
    let resolve = |path: &Path| {
        let text = path
            .to_str()
            .with_context(|| format!("{} is not UTF-8", path.display()))?;
        ModelFiles::resolve(text, "main")
    };
    let policy_files = resolve(dir)?;
    let reference_files = resolve(&dir.join("ref_model"))?;
    let mut comparisons = Vec::new();
    for &dtype in dtypes {
        let policy = Qwen2::load_policy(&policy_files, device)?.with_compute_dtype(dtype)?;
        let reference =
            Qwen2::load_reference(&reference_files, device)?.with_compute_dtype(dtype)?;
        let bf16 = dtype != DType::F32;
        let largest_logit = {
            let logits = host_values(golden.host("forward.logits")?)?;
            let mask = host_values(golden.host("forward.attention_mask")?)?;
            let per = logits.len() / mask.len().max(1);
            (0..logits.len())
                .filter(|&i| mask[i / per] != 0.0)
                .fold(0f64, |m, i| m.max(logits[i].abs()))
        };
        let bf16_logit_atol = BF16_LOGIT_ROUNDOFFS * BF16_UNIT_ROUNDOFF * largest_logit;
        let bf16_tolerance = |atol: f64| Tolerance { rtol: 0.0, atol };

        // Forward logits where attended.
        let mask = golden.tensor("forward.attention_mask")?;
        let hidden = policy.forward(
            &golden.tensor("forward.input_ids")?,
            &golden.tensor("forward.position_ids")?,
            &mask,
            None,
        )?;
        let logits = policy.lm_head(&hidden)?;
        let tolerance = match bf16 {
            true => bf16_tolerance(bf16_logit_atol),
            false => golden.recorded("forward_logits_max_abs_err")?,
        };
        comparisons.push(compare(
            "logits",
            dtype,
            &logits,
            golden.host("forward.logits")?,
            Some(golden.host("forward.attention_mask")?),
            tolerance,
        )?);

        // Per-token log-probs of the policy and the reference.
        let temperature = golden.f64("logprobs.temperature")?;
        let prompt_len = golden.usize("logprobs.P")?;
        for (model, key, precision) in [
            (&policy, "logprobs.policy", "logprobs_policy_max_abs_err"),
            (&reference, "logprobs.ref", "grpo_ref_logps_max_abs_err"),
        ] {
            let out = completion_logprobs(
                model,
                &golden.tensor("logprobs.input_ids")?,
                &golden.tensor("logprobs.attention_mask")?,
                prompt_len,
                temperature,
                false,
            )?;
            let tolerance = match bf16 {
                true => bf16_tolerance(bf16_logit_atol / temperature),
                false => golden.recorded(precision)?,
            };
            comparisons.push(compare(
                key,
                dtype,
                &out.logprobs,
                golden.host(key)?,
                None,
                tolerance,
            )?);
        }

        comparisons.extend(check_grpo(
            &golden,
            &policy,
            &reference,
            dtype,
            bf16_logit_atol,
        )?);
    }
    Ok(GoldenReport {
        device: crate::device::device_name(device),
        comparisons,
    })
}

/// The GRPO batch: the training forward's log-probs and entropies, and each loss type's value
/// and full gradient.
fn check_grpo(
    golden: &Golden,
    policy: &Qwen2,
    reference: &Qwen2,
    dtype: DType,
    bf16_logit_atol: f64,
) -> Result<Vec<Comparison>> {
    let bf16 = dtype != DType::F32;
    let group = golden.usize("grpo.num_generations")?;
    let temperature = golden.f64("grpo.temperature")?;
    let prompt_ids = golden.tensor("grpo.prompt_ids")?;
    let rows = prompt_ids.dim(0)?;
    // One prompt row per group: rows are prompt * G + g.
    let firsts: Vec<u32> = (0..rows as u32).step_by(group.max(1)).collect();
    let firsts = Tensor::new(firsts, prompt_ids.device())?;
    let prompt_ids = prompt_ids.index_select(&firsts, 0)?;
    let prompt_mask = golden
        .tensor("grpo.prompt_mask")?
        .index_select(&firsts, 0)?;
    let completion_ids = golden.tensor("grpo.completion_ids")?;
    let mask = golden
        .tensor("grpo.completion_mask")?
        .to_dtype(DType::F32)?;
    let batch = GroupedBatch {
        prompt_ids: &prompt_ids,
        prompt_mask: &prompt_mask,
        completion_ids: &completion_ids,
        completion_mask: &mask,
        group_size: group,
    };
    let mut comparisons = Vec::new();
    let logprob_atol = bf16_logit_atol / temperature;
    let vocab = policy.config().vocab_size as f64;

    let policy_tolerance = match bf16 {
        true => Tolerance {
            rtol: 0.0,
            atol: logprob_atol,
        },
        false => golden.recorded("logprobs_policy_max_abs_err")?,
    };
    // The entropy -sum p log p is a p-weighted mean of -log p: each term carries at most the
    // log-probs' error, and the weights' error adds at most ln(V) times it.
    let entropy_tolerance = Tolerance {
        rtol: policy_tolerance.rtol,
        atol: policy_tolerance.atol * (1.0 + vocab.ln()),
    };
    let with_entropy = grouped_completion_logprobs(policy, &batch, temperature, true)?;
    comparisons.push(compare(
        "grpo.policy_logps",
        dtype,
        &with_entropy.logprobs,
        golden.host("grpo.policy_logps")?,
        None,
        policy_tolerance,
    )?);
    let entropy = with_entropy
        .entropy
        .context("the entropy was asked for and not computed")?;
    comparisons.push(compare(
        "grpo.entropy",
        dtype,
        &entropy,
        golden.host("grpo.entropy")?,
        None,
        entropy_tolerance,
    )?);
    let ref_logp = grouped_completion_logprobs(reference, &batch, temperature, false)?.logprobs;
    let ref_tolerance = match bf16 {
        true => policy_tolerance,
        false => golden.recorded("grpo_ref_logps_max_abs_err")?,
    };
    comparisons.push(compare(
        "grpo.ref_logps",
        dtype,
        &ref_logp,
        golden.host("grpo.ref_logps")?,
        None,
        ref_tolerance,
    )?);

    let beta = golden.f64("grpo.beta")?;
    let num_items = host_values(&mask)?.iter().sum::<f64>() as usize;
    // The loss's value moves with the log-probs only through beta * kl(ref - logp), where
    // |d kl / d delta| = |e^delta - 1| <= e^|delta|, and the aggregation weights sum to at most
    // 1: log-probs each within `error` move it by at most beta * 2 error * e^(|delta| + 2 error).
    let (ref_golden, policy_golden) = (
        host_values(golden.host("grpo.ref_logps")?)?,
        host_values(golden.host("grpo.policy_logps")?)?,
    );
    let largest_delta = ref_golden
        .iter()
        .zip(&policy_golden)
        .fold(0f64, |m, (r, p)| m.max((r - p).abs()));
    let largest_logp = ref_golden
        .iter()
        .chain(&policy_golden)
        .fold(0f64, |m, v| m.max(v.abs()));
    let logprob_error = [policy_tolerance, ref_tolerance]
        .iter()
        .map(|t| t.atol + t.rtol * largest_logp)
        .fold(0f64, f64::max);
    let propagated = beta * 2.0 * logprob_error * (largest_delta + 2.0 * logprob_error).exp();
    for (loss_type, key) in [
        (LossType::Grpo, "grpo"),
        (LossType::Bnpo, "bnpo"),
        (LossType::DrGrpo, "dr_grpo"),
        (LossType::Dapo, "dapo"),
    ] {
        let logp = grouped_completion_logprobs(policy, &batch, temperature, false)?.logprobs;
        let params = LossParams::new(
            loss_type,
            beta,
            golden.f64("grpo.epsilon_low")?,
            golden.f64("grpo.epsilon_high")?,
            golden.usize("grpo.max_completion_length")?,
            num_items,
        );
        let inputs = LossInputs {
            logp: &logp,
            old_logp: &logp.detach(),
            ref_logp: Some(&ref_logp),
            advantages: &golden.tensor("grpo.advantages")?,
            mask: &mask,
            entropy_mask: None,
        };
        let loss = grpo_loss(&inputs, &params)?.loss;
        // In f32 also the error the golden loss itself carries.
        let tolerance = match bf16 {
            true => Tolerance {
                rtol: 0.0,
                atol: propagated,
            },
            false => {
                let recorded = golden.recorded(&format!("grpo.{key}.abs_err_loss"))?;
                Tolerance {
                    rtol: recorded.rtol,
                    atol: recorded.atol + propagated,
                }
            }
        };
        comparisons.push(compare(
            &format!("grpo.loss.{key}"),
            dtype,
            &loss,
            golden.host(&format!("grpo.loss.{key}"))?,
            None,
            tolerance,
        )?);
        let grads = loss.backward()?;
        comparisons.push(compare_gradients(golden, policy, &grads, key, dtype)?);
    }
    Ok(comparisons)
}

/// Every parameter's gradient against `grad.<key>.<name>`: element-wise with the recorded
/// float32 error in f32, relative L2 error with bf16 compute; the row shows the worst parameter.
fn compare_gradients(
    golden: &Golden,
    policy: &Qwen2,
    grads: &candle_core::backprop::GradStore,
    key: &str,
    dtype: DType,
) -> Result<Comparison> {
    let parameters = policy.named_parameters();
    let mut row = Comparison {
        quantity: format!("grad.{key} ({} parameters)", parameters.len()),
        dtype,
        max_abs_error: 0.0,
        ratio: 0.0,
        tolerance: String::new(),
        worst: String::from("-"),
    };
    for (name, var) in parameters {
        let grad = grads
            .get(var.as_tensor())
            .with_context(|| format!("{name} got no gradient"))?;
        let want = golden.host(&format!("grad.{key}.{name}"))?;
        let one = if dtype == DType::F32 {
            let tolerance = golden.recorded(&format!("grpo.{key}.max_abs_err_grad"))?;
            compare(name, dtype, grad, want, None, tolerance)?
        } else {
            let (a, e) = (host_values(grad)?, host_values(want)?);
            if a.len() != e.len() {
                bail!("{name}: gradient of {} values, golden {}", a.len(), e.len());
            }
            let diff = a.iter().zip(&e).map(|(a, e)| (a - e).powi(2)).sum::<f64>();
            let norm = e.iter().map(|e| e * e).sum::<f64>();
            let relative = (diff / norm).sqrt();
            Comparison {
                quantity: name.clone(),
                dtype,
                max_abs_error: a
                    .iter()
                    .zip(&e)
                    .fold(0f64, |m, (a, e)| m.max((a - e).abs())),
                ratio: relative / BF16_GRADIENT_RELATIVE_ERROR,
                tolerance: format!(
                    "relative L2 error {:.0} %",
                    BF16_GRADIENT_RELATIVE_ERROR * 100.0
                ),
                worst: String::new(),
            }
        };
        row.max_abs_error = row.max_abs_error.max(one.max_abs_error);
        // The worst parameter so far; a NaN is the worst there is.
        let worse = row.tolerance.is_empty()
            || one.ratio.is_nan()
            || (!row.ratio.is_nan() && one.ratio > row.ratio);
        if worse {
            row.ratio = one.ratio;
            row.tolerance = one.tolerance;
            row.worst = match one.worst.as_str() {
                "" | "-" => name.clone(),
                at => format!("{name} {at}"),
            };
        }
    }
    Ok(row)
}
