//! `grpo check --golden DIR` on the CPU: it passes on the golden folder in f32 and bf16, fails
//! (exit 1, naming what) when a golden number is off by more than its tolerance, and refuses a
//! folder that is not a golden one.

mod common;

use std::path::Path;

use assert_cmd::Command;
use candle_core::{Device, Tensor};
use predicates::prelude::*;

use common::golden_dir;

fn grpo() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_grpo"));
    cmd.env_remove("RUST_LOG");
    cmd
}

/// Copies the golden folder (with ref_model/) into `to`.
fn copy_golden(to: &Path) {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), target).unwrap();
            }
        }
    }
    copy(&golden_dir(), to);
}

/// Adds `delta` to element `index` of golden tensor `key` in the folder `dir`.
fn perturb(dir: &Path, key: &str, index: usize, delta: f32) {
    let path = dir.join("tensors.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let t = &tensors[key];
    let mut values: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    values[index] += delta;
    let changed = Tensor::from_vec(values, t.shape(), &Device::Cpu).unwrap();
    tensors.insert(key.to_string(), changed);
    candle_core::safetensors::save(&tensors, &path).unwrap();
}

/// The index of the first attended logit of the golden forward batch.
fn first_attended_logit() -> usize {
    let t = common::tensors();
    let mask: Vec<i64> = t["forward.attention_mask"]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let vocab = t["forward.logits"].dim(2).unwrap();
    mask.iter().position(|&m| m != 0).unwrap() * vocab
}

#[test]
fn golden_check_passes_in_f32_and_bf16_and_writes_the_table() {
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("golden.md");
    let output = grpo()
        .args(["check", "--device", "cpu", "--golden"])
        .arg(golden_dir())
        .arg("--out")
        .arg(&table)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.starts_with("golden check on cpu"), "{stdout}");
    assert!(!stdout.contains("FAIL"), "{stdout}");
    for dtype in ["f32", "bf16"] {
        for quantity in [
            "logits",
            "logprobs.policy",
            "logprobs.ref",
            "grpo.policy_logps",
            "grpo.entropy",
            "grpo.ref_logps",
            "grpo.loss.grpo",
            "grpo.loss.dapo",
            "grad.grpo",
            "grad.bnpo",
            "grad.dr_grpo",
            "grad.dapo",
        ] {
            let row = format!("| {dtype} | {quantity}");
            assert!(stdout.contains(&row), "no row {row:?} in\n{stdout}");
        }
    }
    let parameters = common::cases()["meta"]["model"]["parameter_names"]
        .as_array()
        .unwrap()
        .len();
    assert!(stdout.contains(&format!("grad.grpo ({parameters} parameters)")));
    assert_eq!(std::fs::read_to_string(&table).unwrap(), stdout);
}

#[test]
fn golden_check_fails_when_a_number_is_off() {
    let dir = tempfile::tempdir().unwrap();
    let golden = dir.path().join("golden");
    copy_golden(&golden);
    // 1e-3 is far beyond the f32 tolerance of a logit (~1e-5) and well within the bf16 one.
    perturb(&golden, "forward.logits", first_attended_logit(), 1e-3);
    let parameter = common::cases()["meta"]["model"]["parameter_names"][0]
        .as_str()
        .unwrap()
        .to_string();
    perturb(&golden, &format!("grad.dapo.{parameter}"), 0, 1e-3);
    grpo()
        .args([
            "check", "--device", "cpu", "--dtype", "f32,bf16", "--golden",
        ])
        .arg(&golden)
        .assert()
        .code(1)
        .stdout(predicate::str::contains("| f32 | logits |").and(predicate::str::contains("FAIL")))
        .stderr(
            predicate::str::contains("2 of")
                .and(predicate::str::contains("out of tolerance"))
                .and(predicate::str::contains("f32 logits"))
                .and(predicate::str::contains("f32 grad.dapo"))
                .and(predicate::str::contains("bf16 logits").not()),
        );
}

#[test]
fn golden_check_refuses_what_is_not_a_golden_folder() {
    let dir = tempfile::tempdir().unwrap();
    grpo()
        .args(["check", "--device", "cpu", "--golden"])
        .arg(dir.path())
        .assert()
        .code(1)
        .stderr(
            predicate::str::contains("cases.json").and(predicate::str::contains("golden folder")),
        );
    grpo()
        .args(["check", "--dtype", "f16", "--golden"])
        .arg(golden_dir())
        .assert()
        .code(2)
        .stderr(predicate::str::contains("expected f32 or bf16"));
}

#[test]
fn version_says_which_devices_the_build_has() {
    let expected = if cfg!(feature = "cuda") {
        "(cuda)"
    } else {
        "(cpu)"
    };
    grpo()
        .arg("--version")
        .assert()
        .success()
        .stdout(predicate::str::contains(expected));
}
