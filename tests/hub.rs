//! Hub settings and cache resolution, on hand-built caches with Python's layout. Nothing here
//! reaches the network: "online" cases point at a closed local port.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use grpo::hub::{HubRepo, HubSettings, RepoKind};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn settings_from(vars: &[(&str, &str)]) -> HubSettings {
    let vars: HashMap<String, String> = vars
        .iter()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect();
    HubSettings::from_vars(|name| vars.get(name).cloned())
}

fn offline(cache_dir: &Path) -> HubSettings {
    HubSettings {
        cache_dir: cache_dir.to_path_buf(),
        token: None,
        offline: true,
        endpoint: "https://huggingface.co".to_string(),
    }
}

/// An endpoint nothing listens on, so any request fails at once.
fn closed_endpoint() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    format!("http://127.0.0.1:{port}")
}

/// Writes `files` into `{cache}/{folder}/snapshots/{COMMIT}/` and `refs/{revision}`.
fn cache_repo(cache: &Path, folder: &str, revision: &str, files: &[(&str, &str)]) -> PathBuf {
    let repo = cache.join(folder);
    let snapshot = repo.join("snapshots").join(COMMIT);
    for (name, text) in files {
        let path = snapshot.join(name);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }
    let reference = repo.join("refs").join(revision);
    fs::create_dir_all(reference.parent().unwrap()).unwrap();
    fs::write(reference, format!("{COMMIT}\n")).unwrap();
    snapshot
}

#[test]
fn token_comes_from_env_then_token_file() {
    let home = tempfile::tempdir().unwrap();
    let hf_home = home.path().to_str().unwrap();
    fs::write(home.path().join("token"), "  hf_from_file\n").unwrap();

    let from_env = settings_from(&[("HF_HOME", hf_home), ("HF_TOKEN", "hf_from_env")]);
    assert_eq!(from_env.token.as_deref(), Some("hf_from_env"));

    let from_file = settings_from(&[("HF_HOME", hf_home)]);
    assert_eq!(from_file.token.as_deref(), Some("hf_from_file"));

    let empty_env = settings_from(&[("HF_HOME", hf_home), ("HF_TOKEN", "")]);
    assert_eq!(empty_env.token.as_deref(), Some("hf_from_file"));

    let other_file = home.path().join("other-token");
    fs::write(&other_file, "hf_other").unwrap();
    let token_path = settings_from(&[
        ("HF_HOME", hf_home),
        ("HF_TOKEN_PATH", other_file.to_str().unwrap()),
    ]);
    assert_eq!(token_path.token.as_deref(), Some("hf_other"));

    let empty_home = tempfile::tempdir().unwrap();
    let none = settings_from(&[("HF_HOME", empty_home.path().to_str().unwrap())]);
    assert_eq!(none.token, None);
}

#[test]
fn cache_dir_follows_python_precedence() {
    let settings = settings_from(&[("HF_HOME", "/h"), ("HF_HUB_CACHE", "/c")]);
    assert_eq!(settings.cache_dir, PathBuf::from("/c"));
    let settings = settings_from(&[("HF_HOME", "/h")]);
    assert_eq!(settings.cache_dir, PathBuf::from("/h/hub"));
    let settings = settings_from(&[("HOME", "/home/u")]);
    assert_eq!(
        settings.cache_dir,
        PathBuf::from("/home/u/.cache/huggingface/hub")
    );
    let settings = settings_from(&[("HOME", "/home/u"), ("XDG_CACHE_HOME", "/x")]);
    assert_eq!(settings.cache_dir, PathBuf::from("/x/huggingface/hub"));
    assert_eq!(settings.endpoint, "https://huggingface.co");
    let settings = settings_from(&[("HF_ENDPOINT", "https://mirror.example/")]);
    assert_eq!(settings.endpoint, "https://mirror.example");
}

#[test]
fn offline_flag_accepts_pythons_true_values() {
    for value in ["1", "true", "TRUE", "yes", "On"] {
        assert!(
            settings_from(&[("HF_HUB_OFFLINE", value)]).offline,
            "{value}"
        );
    }
    for value in ["0", "false", "no", ""] {
        assert!(
            !settings_from(&[("HF_HUB_OFFLINE", value)]).offline,
            "{value}"
        );
    }
    assert!(!settings_from(&[]).offline);
}

#[test]
fn file_resolves_through_refs_and_commit_hashes() {
    let cache = tempfile::tempdir().unwrap();
    let snapshot = cache_repo(
        cache.path(),
        "models--Qwen--Qwen2.5-0.5B-Instruct",
        "main",
        &[("config.json", "{}"), ("sub/dir/file.txt", "x")],
    );
    let settings = offline(cache.path());
    let repo = HubRepo::new("Qwen/Qwen2.5-0.5B-Instruct", RepoKind::Model, None);
    assert_eq!(repo.revision, "main");
    assert_eq!(
        repo.file_with("config.json", &settings).unwrap(),
        snapshot.join("config.json")
    );
    assert_eq!(
        repo.file_with("sub/dir/file.txt", &settings).unwrap(),
        snapshot.join("sub/dir/file.txt")
    );

    let by_commit = HubRepo::new("Qwen/Qwen2.5-0.5B-Instruct", RepoKind::Model, Some(COMMIT));
    assert_eq!(
        by_commit.file_with("config.json", &settings).unwrap(),
        snapshot.join("config.json")
    );

    // The same id as a dataset lives in another folder, which is not cached.
    let as_dataset = HubRepo::new("Qwen/Qwen2.5-0.5B-Instruct", RepoKind::Dataset, None);
    assert!(as_dataset.file_with("config.json", &settings).is_err());
}

#[test]
fn branch_names_with_slashes_resolve() {
    let cache = tempfile::tempdir().unwrap();
    let snapshot = cache_repo(
        cache.path(),
        "datasets--org--data",
        "refs/convert/parquet",
        &[("default/train/0000.parquet", "p")],
    );
    let repo = HubRepo::new("org/data", RepoKind::Dataset, Some("refs/convert/parquet"));
    let settings = offline(cache.path());
    assert_eq!(
        repo.file_with("default/train/0000.parquet", &settings)
            .unwrap(),
        snapshot.join("default/train/0000.parquet")
    );
    assert_eq!(
        repo.list_files_with(&settings).unwrap(),
        ["default/train/0000.parquet"]
    );
}

#[test]
fn offline_miss_names_repo_revision_file_and_cache() {
    let cache = tempfile::tempdir().unwrap();
    cache_repo(
        cache.path(),
        "models--org--model",
        "main",
        &[("config.json", "{}")],
    );
    let settings = offline(cache.path());
    let repo = HubRepo::new("org/model", RepoKind::Model, Some("v2"));
    let err = repo
        .file_with("model.safetensors", &settings)
        .unwrap_err()
        .to_string();
    for needle in [
        "model.safetensors",
        "org/model",
        "`v2`",
        "offline",
        "not in the hub cache",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in: {err}");
    }
    assert!(
        err.contains(
            &cache
                .path()
                .join("models--org--model")
                .display()
                .to_string()
        ),
        "{err}"
    );

    let missing_file = HubRepo::new("org/model", RepoKind::Model, None)
        .file_with("tokenizer.json", &settings)
        .unwrap_err()
        .to_string();
    assert!(missing_file.contains("tokenizer.json"), "{missing_file}");

    let err = HubRepo::new("org/absent", RepoKind::Dataset, None)
        .list_files_with(&settings)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("org/absent") && err.contains("offline"),
        "{err}"
    );
}

#[cfg(unix)]
#[test]
fn offline_listing_follows_blob_symlinks_and_skips_dangling_ones() {
    let cache = tempfile::tempdir().unwrap();
    let repo_dir = cache.path().join("datasets--org--data");
    let snapshot = cache_repo(
        cache.path(),
        "datasets--org--data",
        "main",
        &[("README.md", "r")],
    );
    fs::create_dir_all(repo_dir.join("blobs")).unwrap();
    fs::write(repo_dir.join("blobs/abc"), "parquet bytes").unwrap();
    fs::create_dir_all(snapshot.join("data")).unwrap();
    std::os::unix::fs::symlink(
        "../../../blobs/abc",
        snapshot.join("data/train-00000-of-00001.parquet"),
    )
    .unwrap();
    std::os::unix::fs::symlink("../../blobs/gone", snapshot.join("dangling.parquet")).unwrap();

    let repo = HubRepo::new("org/data", RepoKind::Dataset, None);
    let settings = offline(cache.path());
    assert_eq!(
        repo.list_files_with(&settings).unwrap(),
        ["README.md", "data/train-00000-of-00001.parquet"]
    );
    let path = repo
        .file_with("data/train-00000-of-00001.parquet", &settings)
        .unwrap();
    assert_eq!(fs::read_to_string(path).unwrap(), "parquet bytes");
}

#[test]
fn online_prefers_the_cache_and_reports_failed_downloads() {
    let cache = tempfile::tempdir().unwrap();
    let snapshot = cache_repo(
        cache.path(),
        "models--org--model",
        "main",
        &[("config.json", "{}")],
    );
    let settings = HubSettings {
        offline: false,
        endpoint: closed_endpoint(),
        ..offline(cache.path())
    };
    let repo = HubRepo::new("org/model", RepoKind::Model, None);
    assert_eq!(
        repo.file_with("config.json", &settings).unwrap(),
        snapshot.join("config.json")
    );
    let err = format!(
        "{:#}",
        repo.file_with("model.safetensors", &settings).unwrap_err()
    );
    assert!(
        err.contains("downloading `model.safetensors`") && err.contains("org/model"),
        "{err}"
    );
    assert!(err.contains("HF_HUB_OFFLINE"), "{err}");
    let err = format!("{:#}", repo.list_files_with(&settings).unwrap_err());
    assert!(
        err.contains("listing the files") && err.contains("org/model"),
        "{err}"
    );
}

#[test]
fn ids_and_revisions_cannot_escape_the_cache() {
    let cache = tempfile::tempdir().unwrap();
    let settings = offline(cache.path());
    for (id, revision) in [("../x", "main"), ("org/model", "../../etc"), ("", "main")] {
        let err = HubRepo::new(id, RepoKind::Model, Some(revision))
            .file_with("config.json", &settings)
            .unwrap_err()
            .to_string();
        assert!(err.contains("invalid hub model repo"), "{err}");
    }
}

/// A file name that leaves the snapshot (`..`, an absolute path) is refused even when the file it
/// points at exists in the cache: a sharded model's index cannot pull weights from elsewhere.
#[test]
fn file_names_cannot_escape_the_snapshot() {
    let cache = tempfile::tempdir().unwrap();
    let snapshot = cache_repo(
        cache.path(),
        "models--org--model",
        "main",
        &[("config.json", "{}")],
    );
    fs::write(snapshot.parent().unwrap().join("outside.safetensors"), "x").unwrap();
    let repo = HubRepo::new("org/model", RepoKind::Model, None);
    let settings = offline(cache.path());
    let absolute = snapshot.join("config.json").display().to_string();
    for name in ["../outside.safetensors", absolute.as_str(), "./config.json"] {
        let err = repo.file_with(name, &settings).unwrap_err().to_string();
        assert!(err.contains("not inside the repo"), "{name}: {err}");
    }
    assert_eq!(
        repo.file_with("config.json", &settings).unwrap(),
        snapshot.join("config.json")
    );
}
