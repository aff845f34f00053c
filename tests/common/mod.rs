//! Shared helpers for integration tests: where the golden folder is and how to read it.
//!
//! Golden tests read the folder named by env `GRPO_GOLDEN_DIR` (default: the fixture copy of
//! `shared/golden/a` in `tests/fixtures/golden`) and must pass for ANY folder of that schema:
//! dimensions, ids and sizes always come from the folder, never from the test.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};
use grpo::grpo::{grpo_loss, LossInputs, LossParams, LossType};
use grpo::model::{grouped_completion_logprobs, GroupedBatch, ModelFiles, Qwen2};

/// The golden folder under test.
pub fn golden_dir() -> PathBuf {
    match std::env::var_os("GRPO_GOLDEN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden"),
    }
}

/// The golden folder's Qwen3 model and its ground truth (`$GRPO_GOLDEN_DIR/qwen3`).
pub fn qwen3_dir() -> PathBuf {
    golden_dir().join("qwen3")
}

/// The checkpoint folder `dir` on the CPU: trainable (every parameter a `Var`) or frozen.
pub fn load_model(dir: &Path, trainable: bool) -> Qwen2 {
    let files = ModelFiles::resolve(dir.to_str().expect("utf-8 path"), "main")
        .unwrap_or_else(|e| panic!("{} resolves: {e:#}", dir.display()));
    let model = match trainable {
        true => Qwen2::load_policy(&files, &Device::Cpu),
        false => Qwen2::load_reference(&files, &Device::Cpu),
    };
    model.unwrap_or_else(|e| panic!("{} loads: {e:#}", dir.display()))
}

/// `cases.json` of the golden folder.
pub fn cases() -> serde_json::Value {
    let path = golden_dir().join("cases.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Every tensor of `tensors.safetensors`, on the CPU.
pub fn tensors() -> HashMap<String, Tensor> {
    let path = golden_dir().join("tensors.safetensors");
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot load {}: {e}", path.display()))
}

/// The tensor's values, flattened, as f64.
pub fn flat_f64(t: &Tensor) -> Vec<f64> {
    t.to_dtype(candle_core::DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Final hidden states of `model` on the golden `forward.*` batch (left-padded, with its mask
/// and position ids).
pub fn golden_forward_hidden(model: &grpo::model::Qwen2, t: &HashMap<String, Tensor>) -> Tensor {
    model
        .forward(
            &t["forward.input_ids"],
            &t["forward.position_ids"],
            &t["forward.attention_mask"],
            None,
        )
        .unwrap()
}

/// Largest absolute difference between two tensors of the same shape (as f64).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a
        .to_dtype(candle_core::DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap();
    let b = b
        .to_dtype(candle_core::DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Writes a small GSM8K-zh-style parquet split (`question_zh-cn`, `answer_only`, snappy).
pub fn write_qa_parquet(
    path: &std::path::Path,
    questions: &[impl AsRef<str>],
    answers: &[impl AsRef<str>],
) {
    use std::sync::Arc;

    use arrow_array::{ArrayRef, RecordBatch, StringArray};
    use parquet::arrow::ArrowWriter;
    use parquet::basic::Compression;
    use parquet::file::properties::WriterProperties;

    fn column(values: &[impl AsRef<str>]) -> ArrayRef {
        Arc::new(StringArray::from_iter_values(
            values.iter().map(AsRef::as_ref),
        ))
    }
    let batch = RecordBatch::try_from_iter([
        ("question_zh-cn", column(questions)),
        ("answer_only", column(answers)),
    ])
    .unwrap();
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .build();
    let file = std::fs::File::create(path).unwrap();
    let mut writer = ArrowWriter::try_new(file, batch.schema(), Some(props)).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
}

/// float32's machine epsilon, 2^-23: one float32 rounding of a value of magnitude `m` is off by
/// at most `m * F32_EPS / 2`. The golden folder is float32 (`cases.json` → `precision`).
pub const F32_EPS: f64 = f32::EPSILON as f64;

/// How much a float32 recomputation may differ from a golden float32 value: our result and the
/// golden one are each off the exact value by about the error `cases.json` → `precision` records
/// for the golden computation (the same float32 arithmetic in another order), so they differ by
/// up to twice that; `GOLDEN_SAFETY` allows twice again.
pub const GOLDEN_SAFETY: f64 = 4.0;

/// The error `cases.json` → `precision` → `key` records: the golden float32 value's largest
/// absolute difference from the same computation in float64.
pub fn recorded_error(key: &str) -> f64 {
    let precision = &cases()["precision"];
    let mut value = precision;
    for part in key.split('.') {
        value = &value[part];
    }
    value
        .as_f64()
        .unwrap_or_else(|| panic!("cases.json precision lacks {key}"))
}

/// A tolerance that scales with the magnitude: `atol + rtol * |expected|`.
#[derive(Debug, Clone, Copy)]
pub struct Tolerance {
    pub rtol: f64,
    pub atol: f64,
}

impl Tolerance {
    /// For a golden quantity whose float32 error `cases.json` records under `key`: an absolute
    /// part of `GOLDEN_SAFETY` times that error and a relative part of `GOLDEN_SAFETY` float32
    /// roundings, so values far larger than those of this folder still get their own ulps.
    pub fn recorded(key: &str) -> Self {
        Self {
            rtol: GOLDEN_SAFETY * F32_EPS,
            atol: GOLDEN_SAFETY * recorded_error(key),
        }
    }

    /// For a float32 formula of a few operations evaluated on golden float32 inputs: `ulps`
    /// roundings of the result, plus as many of `terms`, the magnitude of the terms that cancel
    /// in it (a difference of values near 1 is off by their ulps, not the result's).
    pub fn ulps(ulps: f64, terms: f64) -> Self {
        Self {
            rtol: ulps * F32_EPS,
            atol: ulps * F32_EPS * terms,
        }
    }

    pub fn bound(&self, expected: f64) -> f64 {
        self.atol + self.rtol * expected.abs()
    }
}

/// Asserts `|actual - expected| <= tolerance.bound(expected)` element by element (both tensors
/// flattened; entries where `mask` is 0 are skipped), naming the worst element.
pub fn assert_tensor_close(
    what: &str,
    actual: &Tensor,
    expected: &Tensor,
    mask: Option<&Tensor>,
    tolerance: Tolerance,
) {
    assert_eq!(actual.dims(), expected.dims(), "{what}: shape");
    let (a, e) = (flat_f64(actual), flat_f64(expected));
    let keep: Vec<bool> = match mask {
        None => vec![true; a.len()],
        Some(mask) => {
            let m = flat_f64(mask);
            let per_mask = a.len() / m.len();
            (0..a.len()).map(|i| m[i / per_mask] != 0.0).collect()
        }
    };
    let mut worst: Option<(usize, f64)> = None;
    for i in (0..a.len()).filter(|&i| keep[i]) {
        let excess = (a[i] - e[i]).abs() / tolerance.bound(e[i]);
        if worst.is_none_or(|(_, w)| excess > w) {
            worst = Some((i, excess));
        }
    }
    if let Some((i, excess)) = worst {
        assert!(
            excess <= 1.0,
            "{what}: element {i} is {} vs golden {} (tolerance {}, {tolerance:?})",
            a[i],
            e[i],
            tolerance.bound(e[i])
        );
    }
}

/// Max |a - b| over the entries where `mask` (same leading shape) is 1.
pub fn masked_max_diff(a: &Tensor, b: &Tensor, mask: &Tensor) -> f64 {
    let mut mask = mask.to_dtype(DType::F64).unwrap();
    while mask.rank() < a.rank() {
        mask = mask.unsqueeze(D::Minus1).unwrap();
    }
    let masked = |t: &Tensor| {
        t.to_dtype(DType::F64)
            .unwrap()
            .broadcast_mul(&mask)
            .unwrap()
    };
    max_abs_diff(&masked(a), &masked(b))
}

/// Deterministic, varied loss weights (sin of the flat index), so gradient tests cannot be flaky.
pub fn loss_weights(shape: &candle_core::Shape) -> Tensor {
    Tensor::arange(0f32, shape.elem_count() as f32, &Device::Cpu)
        .unwrap()
        .sin()
        .unwrap()
        .reshape(shape)
        .unwrap()
}

/// Two gradients of one parameter agree up to summation order: relative to the gradient's scale.
pub fn assert_same_gradient(name: &str, a: &Tensor, b: &Tensor) {
    let scale = a
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    let diff = max_abs_diff(a, b);
    assert!(
        diff <= 1e-5 * scale.max(1.0),
        "{name}: gradients differ by {diff} (scale {scale})"
    );
}

/// The golden GRPO batch (`grpo.*`) as the training forward takes it: one row per distinct
/// prompt (rows are `prompt * G + g`), the completions and their f32 mask.
pub struct GoldenGrpoBatch {
    pub prompt_ids: Tensor,
    pub prompt_mask: Tensor,
    pub completion_ids: Tensor,
    pub completion_mask: Tensor,
    pub group_size: usize,
}

impl GoldenGrpoBatch {
    pub fn load() -> Self {
        let t = tensors();
        let group_size = cases()["grpo"]["num_generations"].as_u64().unwrap() as usize;
        let rows = t["grpo.prompt_ids"].dim(0).unwrap();
        let firsts = Tensor::new(
            (0..rows as u32).step_by(group_size).collect::<Vec<_>>(),
            &Device::Cpu,
        )
        .unwrap();
        Self {
            prompt_ids: t["grpo.prompt_ids"].index_select(&firsts, 0).unwrap(),
            prompt_mask: t["grpo.prompt_mask"].index_select(&firsts, 0).unwrap(),
            completion_ids: t["grpo.completion_ids"].clone(),
            completion_mask: t["grpo.completion_mask"].to_dtype(DType::F32).unwrap(),
            group_size,
        }
    }

    pub fn grouped(&self) -> GroupedBatch<'_> {
        GroupedBatch {
            prompt_ids: &self.prompt_ids,
            prompt_mask: &self.prompt_mask,
            completion_ids: &self.completion_ids,
            completion_mask: &self.completion_mask,
            group_size: self.group_size,
        }
    }
}

/// The GRPO settings of a golden loss.
pub struct GrpoSettings {
    pub loss_type: LossType,
    pub temperature: f64,
    pub beta: f64,
    pub epsilon_low: f64,
    pub epsilon_high: f64,
    pub use_bias_correction_kl: bool,
}

/// What one GRPO step computes on the golden batch.
pub struct GrpoOutcome {
    pub loss: f32,
    /// The gradient of every named parameter of the policy, in `named_parameters()` order.
    pub grads: Vec<(String, Tensor)>,
    pub policy_logps: Tensor,
    pub ref_logps: Tensor,
}

/// The training forward (one prompt pass per group), the loss and its backward on the golden
/// GRPO batch (`grpo.*`: its advantages, mask and `max_completion_length`), as TRL does with one
/// iteration (old log-probs = the detached policy's).
pub fn golden_grpo_step(policy: &Qwen2, reference: &Qwen2, settings: &GrpoSettings) -> GrpoOutcome {
    let t = tensors();
    let batch = GoldenGrpoBatch::load();
    let temperature = settings.temperature;
    let logp = grouped_completion_logprobs(policy, &batch.grouped(), temperature, false)
        .unwrap()
        .logprobs;
    let ref_logp = grouped_completion_logprobs(reference, &batch.grouped(), temperature, false)
        .unwrap()
        .logprobs;
    let mask = &batch.completion_mask;
    let num_items = mask.sum_all().unwrap().to_scalar::<f32>().unwrap() as usize;
    let params = LossParams {
        use_bias_correction_kl: settings.use_bias_correction_kl,
        ..LossParams::new(
            settings.loss_type,
            settings.beta,
            settings.epsilon_low,
            settings.epsilon_high,
            cases()["grpo"]["max_completion_length"].as_u64().unwrap() as usize,
            num_items,
        )
    };
    let inputs = LossInputs {
        logp: &logp,
        old_logp: &logp.detach(),
        ref_logp: Some(&ref_logp),
        advantages: &t["grpo.advantages"],
        mask,
        entropy_mask: None,
    };
    let loss = grpo_loss(&inputs, &params).unwrap().loss;
    let grads = loss.backward().unwrap();
    let grads = policy
        .named_parameters()
        .iter()
        .map(|(name, var)| {
            let grad = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient"));
            (name.clone(), grad.clone())
        })
        .collect();
    GrpoOutcome {
        loss: loss.to_scalar::<f32>().unwrap(),
        grads,
        policy_logps: logp.detach(),
        ref_logps: ref_logp,
    }
}

/// Decoding `ids` `[b, t]` (with its `positions` and key `mask`) token by token with the KV
/// cache (in the model's compute dtype), after prefilling half, gives the hidden states of the
/// full forward within `tolerance`; and a cache prefilled once and repeated to 3 rows per
/// sequence decodes one more token as the full forward of the extended sequences does.
pub fn assert_kv_cache_decoding_matches_full_forward(
    model: &Qwen2,
    ids: &Tensor,
    positions: &Tensor,
    mask: &Tensor,
    tolerance: f64,
) {
    let (rows, width) = ids.dims2().unwrap();
    let full = model.forward(ids, positions, mask, None).unwrap();

    let prefill = width / 2;
    let mut cache = model.new_cache(rows, width).unwrap();
    let first = model
        .forward(
            &ids.narrow(1, 0, prefill).unwrap(),
            &positions.narrow(1, 0, prefill).unwrap(),
            &mask.narrow(1, 0, prefill).unwrap(),
            Some(&mut cache),
        )
        .unwrap();
    let mut pieces = vec![first];
    for step in prefill..width {
        pieces.push(
            model
                .forward(
                    &ids.narrow(1, step, 1).unwrap(),
                    &positions.narrow(1, step, 1).unwrap(),
                    &mask.narrow(1, 0, step + 1).unwrap(),
                    Some(&mut cache),
                )
                .unwrap(),
        );
    }
    assert_eq!(cache.len(), width);
    let decoded = Tensor::cat(&pieces, 1).unwrap();
    let diff = masked_max_diff(&decoded, &full, mask);
    assert!(
        diff < tolerance,
        "cached decoding differs from the full forward by {diff}"
    );

    // Prefill once, expand to G rows per prompt, decode one more token per row.
    let group = 3;
    let mut cache = model.new_cache(rows, width + 2).unwrap();
    model
        .forward(ids, positions, mask, Some(&mut cache))
        .unwrap();
    let mut cache = cache.repeat_rows(group).unwrap();
    assert_eq!((cache.batch(), cache.len()), (rows * group, width));
    let expand = grpo::model::group_index(rows, group, &Device::Cpu).unwrap();
    let next_ids = ids
        .narrow(1, width - 1, 1)
        .unwrap()
        .contiguous()
        .unwrap()
        .index_select(&expand, 0)
        .unwrap();
    let next_positions = (positions.narrow(1, width - 1, 1).unwrap() + 1.0)
        .unwrap()
        .index_select(&expand, 0)
        .unwrap();
    let ones = Tensor::ones((rows, 1), mask.dtype(), &Device::Cpu).unwrap();
    let key_mask = Tensor::cat(&[mask, &ones], 1).unwrap();
    let step = model
        .forward(
            &next_ids,
            &next_positions,
            &key_mask.index_select(&expand, 0).unwrap(),
            Some(&mut cache),
        )
        .unwrap();
    let extended_ids = Tensor::cat(&[ids, &ids.narrow(1, width - 1, 1).unwrap()], 1).unwrap();
    // The full forward's hidden state at `position` for each of `rows` (prompt indices).
    let full_forward_at = |ids: &Tensor, key_mask: &Tensor, position: usize, rows: &Tensor| {
        let whole = model.forward_masked(ids, key_mask).unwrap();
        let at = whole.narrow(1, position, 1).unwrap().contiguous().unwrap();
        at.index_select(rows, 0).unwrap()
    };
    let expected = full_forward_at(&extended_ids, &key_mask, width, &expand);
    let diff = max_abs_diff(&step, &expected);
    assert!(
        diff < tolerance,
        "decoding after repeat_rows differs by {diff}"
    );

    // Rows leave the batch (finished sequences): the kept rows decode on as before.
    let keep: Vec<usize> = (0..rows * group).filter(|row| row % 3 != 1).collect();
    cache.keep_rows(&keep).unwrap();
    assert_eq!((cache.batch(), cache.len()), (keep.len(), width + 1));
    for refused in [&[1, 0][..], &[0, keep.len()][..]] {
        let error = cache.keep_rows(refused).unwrap_err().to_string();
        assert!(error.contains("is not increasing within"), "{error}");
    }
    let kept = Tensor::new(
        keep.iter()
            .map(|&row| (row / group) as u32)
            .collect::<Vec<_>>(),
        &Device::Cpu,
    )
    .unwrap();
    let key_mask = Tensor::cat(&[&key_mask, &ones], 1).unwrap();
    let last = ids.narrow(1, width - 1, 1).unwrap().contiguous().unwrap();
    let step = model
        .forward(
            &last.index_select(&kept, 0).unwrap(),
            &(positions.narrow(1, width - 1, 1).unwrap() + 2.0)
                .unwrap()
                .index_select(&kept, 0)
                .unwrap(),
            &key_mask.index_select(&kept, 0).unwrap(),
            Some(&mut cache),
        )
        .unwrap();
    let extended_ids = Tensor::cat(&[&extended_ids, &last], 1).unwrap();
    let expected = full_forward_at(&extended_ids, &key_mask, width + 1, &kept);
    let diff = max_abs_diff(&step, &expected);
    assert!(
        diff < tolerance,
        "decoding after keep_rows differs by {diff}"
    );
}

/// The grouped training forward (each prompt once for its G completions) gives the log-probs,
/// entropies and gradients of the plain forward over the whole golden GRPO batch.
pub fn assert_grouped_forward_matches_plain_forward(model: &Qwen2) {
    let t = tensors();
    let case = &cases()["grpo"];
    let prompt_len = case["P"].as_u64().unwrap() as usize;
    let temperature = case["temperature"].as_f64().unwrap();
    let (ids, mask) = (&t["grpo.input_ids"], &t["grpo.attention_mask"]);
    let plain =
        grpo::model::completion_logprobs(model, ids, mask, prompt_len, temperature, true).unwrap();
    let batch = GoldenGrpoBatch::load();
    let grouped = grouped_completion_logprobs(model, &batch.grouped(), temperature, true).unwrap();
    let diff = max_abs_diff(&plain.logprobs, &grouped.logprobs);
    assert!(diff < 1e-5, "log-probs differ by {diff}");
    let diff = max_abs_diff(&plain.entropy.unwrap(), &grouped.entropy.unwrap());
    assert!(diff < 1e-5, "entropies differ by {diff}");

    // Same gradients for a loss weighting each token differently.
    let weights = loss_weights(plain.logprobs.shape());
    let backward = |logprobs: &Tensor| {
        (logprobs * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
    };
    let (plain_grads, grouped_grads) = (backward(&plain.logprobs), backward(&grouped.logprobs));
    for (name, var) in model.named_parameters() {
        let grad = |grads: &candle_core::backprop::GradStore| {
            grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient"))
                .clone()
        };
        assert_same_gradient(name, &grad(&plain_grads), &grad(&grouped_grads));
    }
}

/// bf16 keeps 8 significant bits: one rounding is a relative error of at most 2^-9.
pub const BF16_UNIT_ROUNDOFF: f64 = 1.0 / 512.0;

/// Logits (and log-probs) in bf16 compute may differ from f32 by this many units of roundoff,
/// times the largest golden logit (docs/PRECISION.md).
pub const LOGIT_ROUNDOFFS: f64 = 16.0;

/// Relative L2 error allowed for each parameter's gradient in bf16 compute.
pub const GRADIENT_RELATIVE_ERROR: f64 = 0.05;

/// The L2 norm of a tensor (as f64).
pub fn l2(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .sqrt()
}

/// metrics.jsonl of the run in `out` without the fields that measure the machine (time,
/// memory), so two runs' logs compare equal.
pub fn machine_independent_metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|line| {
            let mut line: serde_json::Value = serde_json::from_str(line).unwrap();
            line.as_object_mut().unwrap().retain(|key, _| {
                !(key == "step_time"
                    || key == "memory/peak_gib"
                    || key.starts_with("timing/")
                    || key == "generation/tokens_per_second")
            });
            line
        })
        .collect()
}

/// Runs `grpo merge --adapter ADAPTER --base-model <golden folder> --out OUT` and asserts that it
/// succeeded (a failure prints the command's output).
pub fn merge_onto_golden(adapter: &Path, out: &Path) {
    assert_cmd::Command::new(env!("CARGO_BIN_EXE_grpo"))
        .args(["merge", "--adapter"])
        .arg(adapter)
        .arg("--base-model")
        .arg(golden_dir())
        .arg("--out")
        .arg(out)
        .assert()
        .success();
}
