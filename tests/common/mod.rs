//! Shared helpers for integration tests: where the golden folder is and how to read it.
//!
//! Golden tests read the folder named by env `GRPO_GOLDEN_DIR` (default: the fixture copy of
//! `shared/golden/a` in `tests/fixtures/golden`) and must pass for ANY folder of that schema:
//! dimensions, ids and sizes always come from the folder, never from the test.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};

/// The golden folder under test.
pub fn golden_dir() -> PathBuf {
    match std::env::var_os("GRPO_GOLDEN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden"),
    }
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
