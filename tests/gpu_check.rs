//! `scripts/gpu-check.sh` up to the point a GPU is needed: its preflight finds a missing
//! binary, CUDA build, driver, Python module, wheel or golden folder, says which and how to fix
//! it, and exits 1 before running anything; with everything there (fakes of the GPU machine's
//! tools), `--preflight` passes. The tools are found on a PATH made for each test.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/gpu-check.sh")
}

fn golden() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden")
}

/// An executable shell script at `dir/name`.
fn fake(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// A PATH folder with the system tools the script uses and nothing else (no nvidia-smi, no
/// python unless a test adds them).
fn tool_path(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for tool in [
        "bash", "env", "dirname", "cat", "sed", "awk", "tr", "head", "ldd", "mkdir", "date",
        "gzip", "chmod", "grep", "rm",
    ] {
        let found = ["/usr/bin", "/bin"]
            .iter()
            .map(|d| Path::new(d).join(tool))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("the test needs {tool} in /usr/bin or /bin"));
        std::os::unix::fs::symlink(found, bin.join(tool)).unwrap();
    }
    bin
}

/// A GPU machine's tools as fakes: nvidia-smi that lists an H200, a python that imports
/// everything asked except `missing` modules.
fn gpu_machine(bin: &Path, missing: &[&str]) -> PathBuf {
    fake(
        bin,
        "nvidia-smi",
        "echo 'NVIDIA H200, 143771 MiB, 580.95.05'",
    );
    let cases: String = missing
        .iter()
        .map(|m| format!("  'import {m}') exit 1 ;;\n"))
        .collect();
    fake(
        bin,
        "python3",
        &format!("[ \"$1\" = -c ] || exit 1\ncase \"$2\" in\n{cases}  'import '*) exit 0 ;;\nesac\nexit 1"),
    )
}

/// A grpo binary that says it was built with CUDA.
fn cuda_grpo(dir: &Path) -> PathBuf {
    fake(dir, "grpo", "echo 'grpo 0.1.0 (cuda)'")
}

fn run(bin: &Path, args: &[&std::ffi::OsStr]) -> (Output, String) {
    let output = Command::new(bin.join("bash"))
        .arg(script())
        .args(args)
        .env_clear()
        .env("PATH", bin)
        .env("HOME", bin)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output, text)
}

#[test]
fn everything_missing_is_reported_at_once_and_nothing_runs() {
    let dir = tempfile::tempdir().unwrap();
    let bin = tool_path(dir.path());
    let out = dir.path().join("out");
    let (output, text) = run(
        &bin,
        &[
            "--grpo".as_ref(),
            dir.path().join("no-grpo").as_os_str(),
            "--python".as_ref(),
            "python3".as_ref(),
            "--golden".as_ref(),
            dir.path().join("no-golden").as_os_str(),
            "--out".as_ref(),
            out.as_os_str(),
        ],
    );
    assert_eq!(output.status.code(), Some(1), "{text}");
    for expected in [
        "no grpo binary at",
        "scripts/build-cuda.sh",
        "no NVIDIA driver: nvidia-smi is not on PATH",
        "no Python at python3",
        "no golden folder at",
        "4 problem(s) found; nothing was run",
    ] {
        assert!(
            text.contains(expected),
            "{expected:?} missing from:\n{text}"
        );
    }
    assert!(!out.exists(), "nothing may run: {text}");
}

#[test]
fn a_cpu_build_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bin = tool_path(dir.path());
    gpu_machine(&bin, &[]);
    let (output, text) = run(
        &bin,
        &[
            "--grpo".as_ref(),
            env!("CARGO_BIN_EXE_grpo").as_ref(),
            "--golden".as_ref(),
            golden().as_os_str(),
            "--preflight".as_ref(),
        ],
    );
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(text.contains("was built without CUDA"), "{text}");
    assert!(
        text.contains("(cpu)"),
        "the binary's --version is quoted: {text}"
    );
    assert!(text.contains("1 problem(s) found"), "{text}");
}

#[test]
fn missing_modules_and_wheels_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let bin = tool_path(dir.path());
    gpu_machine(&bin, &["torch", "trl", "datasets"]);
    let wheels = dir.path().join("wheels");
    std::fs::create_dir(&wheels).unwrap();
    // A datasets wheel is there; trl's is not.
    std::fs::write(wheels.join("datasets-5.2.0-py3-none-any.whl"), "").unwrap();
    let (output, text) = run(
        &bin,
        &[
            "--grpo".as_ref(),
            cuda_grpo(dir.path()).as_os_str(),
            "--golden".as_ref(),
            golden().as_os_str(),
            "--wheels".as_ref(),
            wheels.as_os_str(),
            "--preflight".as_ref(),
        ],
    );
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(text.contains("cannot import torch"), "{text}");
    assert!(text.contains("has no trl wheel"), "{text}");
    assert!(!text.contains("no datasets wheel"), "{text}");
    assert!(text.contains("2 problem(s) found"), "{text}");

    // Without TRL's side, torch, trl and datasets are not needed.
    let (output, text) = run(
        &bin,
        &[
            "--grpo".as_ref(),
            cuda_grpo(dir.path()).as_os_str(),
            "--golden".as_ref(),
            golden().as_os_str(),
            "--wheels".as_ref(),
            wheels.as_os_str(),
            "--skip-trl".as_ref(),
            "--preflight".as_ref(),
        ],
    );
    assert_eq!(output.status.code(), Some(0), "{text}");
}

#[test]
fn preflight_passes_on_a_complete_gpu_machine() {
    let dir = tempfile::tempdir().unwrap();
    let bin = tool_path(dir.path());
    gpu_machine(&bin, &["trl", "datasets"]);
    let wheels = dir.path().join("wheels");
    std::fs::create_dir(&wheels).unwrap();
    for wheel in [
        "trl-1.16.0-py3-none-any.whl",
        "datasets-5.2.0-py3-none-any.whl",
    ] {
        std::fs::write(wheels.join(wheel), "").unwrap();
    }
    let (output, text) = run(
        &bin,
        &[
            "--grpo".as_ref(),
            cuda_grpo(dir.path()).as_os_str(),
            "--golden".as_ref(),
            golden().as_os_str(),
            "--wheels".as_ref(),
            wheels.as_os_str(),
            "--preflight".as_ref(),
        ],
    );
    assert_eq!(output.status.code(), Some(0), "{text}");
    assert!(
        text.contains("preflight passed") && text.contains("NVIDIA H200"),
        "{text}"
    );
}

#[test]
fn a_gzipped_binary_is_unpacked_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let bin = tool_path(dir.path());
    gpu_machine(&bin, &[]);
    let packed = dir.path().join("grpo.gz");
    let gzip = Command::new(bin.join("gzip"))
        .arg("-c")
        .arg(cuda_grpo(dir.path()))
        .output()
        .unwrap();
    std::fs::write(&packed, gzip.stdout).unwrap();
    let out = dir.path().join("out");
    let args = |grpo: &Path| -> Vec<std::ffi::OsString> {
        vec![
            "--grpo".into(),
            grpo.into(),
            "--golden".into(),
            golden().into(),
            "--out".into(),
            out.clone().into(),
            "--preflight".into(),
        ]
    };
    let packed_args = args(&packed);
    let (output, text) = run(
        &bin,
        &packed_args
            .iter()
            .map(|a| a.as_os_str())
            .collect::<Vec<_>>(),
    );
    assert_eq!(output.status.code(), Some(0), "{text}");
    assert!(
        text.contains(&format!("{}/bin/grpo", out.display())),
        "{text}"
    );

    let not_gzip = dir.path().join("other.gz");
    std::fs::write(&not_gzip, "not gzip").unwrap();
    let bad_args = args(&not_gzip);
    let (output, text) = run(
        &bin,
        &bad_args.iter().map(|a| a.as_os_str()).collect::<Vec<_>>(),
    );
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(text.contains("could not be unpacked"), "{text}");
    assert!(text.contains("1 problem(s) found"), "{text}");
}

#[test]
fn bad_arguments_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bin = tool_path(dir.path());
    for args in [&["--steps", "1"][..], &["--steps", "x"], &["--frobnicate"]] {
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
        let (output, text) = run(&bin, &args);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {text}");
        assert!(text.contains("gpu-check: "), "{text}");
    }
}
