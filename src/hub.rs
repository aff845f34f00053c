//! Hugging Face Hub access for models and datasets: resolve a repo's files to local paths through
//! the cache shared with Python's `huggingface_hub`, downloading with `hf-hub` when online.
//!
//! The cache layout is Python's: `{cache}/{models|datasets}--{org}--{name}/refs/{revision}` holds
//! a commit hash and `snapshots/{commit}/{path}` holds the files, so whatever Python downloaded is
//! found here and the other way round. `hf-hub` itself honours only `HF_HOME` and `HF_ENDPOINT`;
//! [`HubSettings`] adds `HF_HUB_CACHE`, `HF_TOKEN` (or the token file) and `HF_HUB_OFFLINE`, and
//! can be built explicitly so that callers and tests do not depend on the process environment.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use hf_hub::api::sync::{Api, ApiBuilder};
use hf_hub::{Repo, RepoType};

/// Whether a repo holds a model or a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoKind {
    Model,
    Dataset,
}

impl RepoKind {
    /// The prefix of this kind's folders in the cache (`models--org--name`).
    fn cache_prefix(self) -> &'static str {
        match self {
            RepoKind::Model => "models",
            RepoKind::Dataset => "datasets",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            RepoKind::Model => "model",
            RepoKind::Dataset => "dataset",
        }
    }
}

/// Where the hub cache lives, how to authenticate and whether the network may be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubSettings {
    /// The hub cache root (holds `models--*` and `datasets--*` folders).
    pub cache_dir: PathBuf,
    /// Bearer token for private or gated repos.
    pub token: Option<String>,
    /// Never touch the network; answer from the cache only.
    pub offline: bool,
    /// Hub base URL, `https://huggingface.co` unless `HF_ENDPOINT` says otherwise.
    pub endpoint: String,
}

const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

impl HubSettings {
    /// Settings from the process environment (see [`HubSettings::from_vars`]).
    pub fn from_env() -> Self {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// Settings from environment-like variables given by `var`, with Python's rules:
    /// - `HF_HOME`: default `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`;
    /// - cache: `HF_HUB_CACHE`, else `HUGGINGFACE_HUB_CACHE`, else `$HF_HOME/hub`;
    /// - token: `HF_TOKEN`, else the file `HF_TOKEN_PATH`, else `$HF_HOME/token` (trimmed;
    ///   empty means none);
    /// - offline: `HF_HUB_OFFLINE` is one of `1`, `true`, `yes`, `on` (any case);
    /// - endpoint: `HF_ENDPOINT`.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let set = |name: &str| var(name).filter(|value| !value.trim().is_empty());
        let hf_home = set("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let cache_home = set("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or_else(|| {
                let home = set("HOME")
                    .or_else(|| set("USERPROFILE"))
                    .unwrap_or_default();
                Path::new(&home).join(".cache")
            });
            cache_home.join("huggingface")
        });
        let cache_dir = set("HF_HUB_CACHE")
            .or_else(|| set("HUGGINGFACE_HUB_CACHE"))
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let token_path = set("HF_TOKEN_PATH")
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("token"));
        let token = set("HF_TOKEN")
            .or_else(|| std::fs::read_to_string(token_path).ok())
            .map(|token| token.trim().to_string())
            .filter(|token| !token.is_empty());
        let offline = set("HF_HUB_OFFLINE").is_some_and(|value| {
            matches!(
                value.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        });
        let endpoint = set("HF_ENDPOINT")
            .map(|endpoint| endpoint.trim_end_matches('/').to_string())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        HubSettings {
            cache_dir,
            token,
            offline,
            endpoint,
        }
    }

    fn api(&self) -> Result<Api> {
        ApiBuilder::from_cache(hf_hub::Cache::new(self.cache_dir.clone()))
            .with_token(self.token.clone())
            .with_endpoint(self.endpoint.clone())
            .with_progress(true)
            .build()
            .context("creating the Hugging Face Hub client")
    }
}

/// A repo on the hub at a revision.
#[derive(Debug, Clone)]
pub struct HubRepo {
    pub id: String,
    pub kind: RepoKind,
    /// Branch, tag or commit; `main` when unset.
    pub revision: String,
}

impl HubRepo {
    /// A repo at `revision`, or at `main` when none is given.
    pub fn new(id: &str, kind: RepoKind, revision: Option<&str>) -> Self {
        HubRepo {
            id: id.to_string(),
            kind,
            revision: revision.unwrap_or("main").to_string(),
        }
    }

    /// Local path of one file, from the cache or downloaded into it (settings from the
    /// environment).
    pub fn file(&self, name: &str) -> Result<PathBuf> {
        self.file_with(name, &HubSettings::from_env())
    }

    /// Paths of every file in the repo (relative to its root; settings from the environment).
    pub fn list_files(&self) -> Result<Vec<String>> {
        self.list_files_with(&HubSettings::from_env())
    }

    /// Local path of one file: the cached snapshot's copy when there is one, else downloaded
    /// (an error in offline mode).
    pub fn file_with(&self, name: &str, settings: &HubSettings) -> Result<PathBuf> {
        self.check_names()?;
        if !is_inside(name) {
            bail!(
                "file `{name}` of {} repo `{}` is not inside the repo (a relative path without \
                 `..` is required)",
                self.kind.describe(),
                self.id
            );
        }
        if let Some(snapshot) = self.cached_snapshot(&settings.cache_dir) {
            let path = snapshot.join(name);
            if path.is_file() {
                return Ok(path);
            }
        }
        if settings.offline {
            bail!(
                "file `{name}` of {} repo `{}` at revision `{}` is not in the hub cache at {} and \
                 offline mode is on (HF_HUB_OFFLINE); download it while online or unset \
                 HF_HUB_OFFLINE",
                self.kind.describe(),
                self.id,
                self.revision,
                self.cache_folder(&settings.cache_dir).display()
            );
        }
        let repo = settings.api()?.repo(self.hf_hub_repo());
        repo.download(name).map_err(|err| {
            anyhow::anyhow!(
                "downloading `{name}` of {} repo `{}` at revision `{}` from {}: {err}; check the \
                 repo id and revision, set HF_TOKEN (or log in) for private or gated repos, or \
                 set HF_HUB_OFFLINE=1 to use only the cache at {}",
                self.kind.describe(),
                self.id,
                self.revision,
                settings.endpoint,
                settings.cache_dir.display()
            )
        })
    }

    /// Every file in the repo: from the hub's repo info when online, else by walking the cached
    /// snapshot (which may hold only the files downloaded so far).
    pub fn list_files_with(&self, settings: &HubSettings) -> Result<Vec<String>> {
        self.check_names()?;
        if settings.offline {
            let Some(snapshot) = self.cached_snapshot(&settings.cache_dir) else {
                bail!(
                    "{} repo `{}` at revision `{}` is not in the hub cache at {} and offline \
                     mode is on (HF_HUB_OFFLINE); download it while online or unset HF_HUB_OFFLINE",
                    self.kind.describe(),
                    self.id,
                    self.revision,
                    self.cache_folder(&settings.cache_dir).display()
                );
            };
            return list_dir_files(&snapshot)
                .with_context(|| format!("listing the cached snapshot {}", snapshot.display()));
        }
        let info = settings
            .api()?
            .repo(self.hf_hub_repo())
            .info()
            .map_err(|err| {
                anyhow::anyhow!(
                    "listing the files of {} repo `{}` at revision `{}` on {}: {err}; check the \
                     repo id and revision, set HF_TOKEN (or log in) for private or gated repos, \
                     or set HF_HUB_OFFLINE=1 to use only the cache at {}",
                    self.kind.describe(),
                    self.id,
                    self.revision,
                    settings.endpoint,
                    settings.cache_dir.display()
                )
            })?;
        Ok(info
            .siblings
            .into_iter()
            .map(|sibling| sibling.rfilename)
            .collect())
    }

    /// `{cache}/{models|datasets}--{org}--{name}`.
    pub fn cache_folder(&self, cache_dir: &Path) -> PathBuf {
        let name = format!("{}--{}", self.kind.cache_prefix(), self.id).replace('/', "--");
        cache_dir.join(name)
    }

    /// The cached snapshot folder of this revision: through `refs/{revision}`, or the revision
    /// itself when it is a commit hash with a snapshot.
    fn cached_snapshot(&self, cache_dir: &Path) -> Option<PathBuf> {
        let folder = self.cache_folder(cache_dir);
        let snapshots = folder.join("snapshots");
        if let Ok(commit) = std::fs::read_to_string(folder.join("refs").join(&self.revision)) {
            let snapshot = snapshots.join(commit.trim());
            if snapshot.is_dir() {
                return Some(snapshot);
            }
        }
        let snapshot = snapshots.join(&self.revision);
        (is_commit_hash(&self.revision) && snapshot.is_dir()).then_some(snapshot)
    }

    fn hf_hub_repo(&self) -> Repo {
        let kind = match self.kind {
            RepoKind::Model => RepoType::Model,
            RepoKind::Dataset => RepoType::Dataset,
        };
        Repo::with_revision(self.id.clone(), kind, self.revision.clone())
    }

    /// Rejects ids and revisions that would escape the cache folder.
    fn check_names(&self) -> Result<()> {
        let escapes =
            |text: &str| text.is_empty() || text.split('/').any(|part| part == ".." || part == ".");
        if escapes(&self.id) || escapes(&self.revision) || self.id.starts_with('/') {
            bail!(
                "invalid hub {} repo `{}` at revision `{}`: expected `name` or `org/name` and a \
                 branch, tag or commit",
                self.kind.describe(),
                self.id,
                self.revision
            );
        }
        Ok(())
    }
}

/// Whether `name` is a relative path that stays inside the folder it is relative to: only
/// normal components (no `..`, no root, no `.`), so joining it to a folder cannot leave it.
pub(crate) fn is_inside(name: &str) -> bool {
    !name.is_empty()
        && Path::new(name)
            .components()
            .all(|part| matches!(part, std::path::Component::Normal(_)))
}

/// A full 40-hex-digit git commit hash.
fn is_commit_hash(revision: &str) -> bool {
    revision.len() == 40 && revision.bytes().all(|byte| byte.is_ascii_hexdigit())
}

/// The `/`-separated paths, relative to `dir` and sorted, of the files under it (following
/// symlinks, as the cache's snapshots point into `blobs/`; dangling links are skipped).
pub(crate) fn list_dir_files(dir: &Path) -> std::io::Result<Vec<String>> {
    fn walk(dir: &Path, prefix: &str, files: &mut Vec<String>) -> std::io::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let relative = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            };
            let path = entry.path();
            if path.is_dir() {
                walk(&path, &relative, files)?;
            } else if path.is_file() {
                files.push(relative);
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    walk(dir, "", &mut files)?;
    files.sort();
    Ok(files)
}
