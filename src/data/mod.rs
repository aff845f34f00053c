//! Training data: the question and reference answer of every row of a dataset split, read from a
//! local parquet file or folder or a hub dataset, and a reproducible shuffled order per epoch.
//!
//! Only the two configured columns are decoded (see [`parquet`]) and only the questions and
//! normalised answers ([`normalize_answer`]) stay in memory, unless every column is asked for
//! ([`Dataset::load_columns`], for external rewards).

mod answer;
mod parquet;
mod split_files;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::hub::{list_dir_files, HubRepo, HubSettings, RepoKind};

pub use answer::normalize_answer;

/// Which dataset split to train on and which columns hold the prompt and the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetSpec {
    /// A `.parquet` file, a folder of parquet files, or a hub dataset id (`org/name`).
    pub name_or_path: String,
    /// Hub branch, tag or commit (`main` when unset); ignored for local paths.
    pub revision: Option<String>,
    /// Config (subset) folder when the dataset has several, TRL's `dataset_config`.
    pub config: Option<String>,
    /// Split name, e.g. `train`.
    pub split: String,
    pub prompt_column: String,
    pub answer_column: String,
}

/// One training row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub question: String,
    /// Normalised with [`normalize_answer`] (as written for [`Dataset::load_solutions`]).
    pub answer: String,
    /// Every column of the row as JSON, once [`Dataset::load_columns`] has read them.
    pub columns: Option<Arc<Map<String, Value>>>,
}

/// Where a run stands in its data: the epoch in progress and how many of its examples were used.
/// Saved in `trainer_state.json` as `data_epoch` and `data_index`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataPosition {
    #[serde(rename = "data_epoch")]
    pub epoch: u64,
    #[serde(rename = "data_index")]
    pub index: u64,
}

/// The examples of one split, in file order.
#[derive(Debug, Clone)]
pub struct Dataset {
    examples: Vec<Example>,
    files: Vec<PathBuf>,
}

impl Dataset {
    /// Loads `spec`'s split, with hub settings from the environment.
    pub fn load(spec: &DatasetSpec) -> Result<Dataset> {
        Self::load_with(spec, &HubSettings::from_env())
    }

    /// Loads `spec`'s split; a hub dataset is resolved with `hub`.
    pub fn load_with(spec: &DatasetSpec, hub: &HubSettings) -> Result<Dataset> {
        let mut dataset = Self::read(spec, hub, "dataset_answer_column")?;
        for example in &mut dataset.examples {
            example.answer = normalize_answer(&example.answer);
        }
        Ok(dataset)
    }

    /// Loads `spec`'s split keeping the answer column as written (for `grpo sft`, whose
    /// targets are the worked solutions, not just their final numbers).
    /// Its answer column is the config's `dataset_solution_column`, which errors name.
    pub fn load_solutions(spec: &DatasetSpec) -> Result<Dataset> {
        Self::read(spec, &HubSettings::from_env(), "dataset_solution_column")
    }

    /// Reads the split's rows; `answer_key` is the config key naming the answer column.
    fn read(spec: &DatasetSpec, hub: &HubSettings, answer_key: &str) -> Result<Dataset> {
        let files = resolve_files(spec, hub)?;
        let mut examples = Vec::new();
        for file in &files {
            parquet::read_examples(
                file,
                &spec.prompt_column,
                &spec.answer_column,
                answer_key,
                &mut examples,
            )?;
        }
        if examples.is_empty() {
            bail!(
                "split `{}` of dataset `{}` has no rows (files: {})",
                spec.split,
                spec.name_or_path,
                files
                    .iter()
                    .map(|file| file.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        Ok(Dataset { examples, files })
    }

    /// Reads every column of every row (as JSON: numbers, strings, lists, objects; binary as
    /// base64, dates as text) into [`Example::columns`], with the answer as written.
    pub fn load_columns(&mut self) -> Result<()> {
        let mut rows = Vec::with_capacity(self.examples.len());
        for file in &self.files {
            parquet::read_rows(file, &mut rows)?;
        }
        if rows.len() != self.examples.len() {
            bail!(
                "the dataset files gave {} rows with every column but {} examples: were they \
                 changed while loading?",
                rows.len(),
                self.examples.len()
            );
        }
        for (example, row) in self.examples.iter_mut().zip(rows) {
            example.columns = Some(Arc::new(row));
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.examples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// The example at `index` (file order). Panics when out of range, like slice indexing.
    pub fn get(&self, index: usize) -> &Example {
        &self.examples[index]
    }

    pub fn examples(&self) -> &[Example] {
        &self.examples
    }

    /// The parquet files the examples came from, in reading order.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// This dataset's shuffled order for `epoch` (see [`epoch_order`]).
    pub fn epoch_order(&self, seed: u64, epoch: u64) -> Vec<usize> {
        epoch_order(self.len(), seed, epoch)
    }

    /// The next `count` examples of the seeded epoch order from `position`, which advances; a
    /// new epoch (with a new order) starts when the current one is used up.
    pub fn next_batch(&self, seed: u64, count: usize, position: &mut DataPosition) -> Vec<Example> {
        let mut order = self.epoch_order(seed, position.epoch);
        let mut batch = Vec::with_capacity(count);
        while batch.len() < count {
            if position.index as usize >= order.len() {
                position.epoch += 1;
                position.index = 0;
                order = self.epoch_order(seed, position.epoch);
            }
            batch.push(self.examples[order[position.index as usize]].clone());
            position.index += 1;
        }
        batch
    }
}

/// A permutation of `0..len` that depends only on `(len, seed, epoch)`, so a run can resume
/// from a stored `(epoch, position)`. Each epoch gets its own RNG stream (rand's `StdRng`,
/// seeded with the seed and the epoch), so orders differ between epochs and between seeds.
pub fn epoch_order(len: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&epoch.to_le_bytes());
    key[16..].copy_from_slice(b"grpo epoch order");
    let mut order: Vec<usize> = (0..len).collect();
    order.shuffle(&mut StdRng::from_seed(key));
    order
}

/// The parquet files of the spec's split: the file itself, the split's files in a local folder,
/// or the split's files of a hub dataset (from the cache or downloaded).
fn resolve_files(spec: &DatasetSpec, hub: &HubSettings) -> Result<Vec<PathBuf>> {
    let path = Path::new(&spec.name_or_path);
    if path.is_file() {
        if let Some(config) = &spec.config {
            bail!(
                "dataset_config = {config:?} is set but dataset `{}` is a single parquet file, \
                 which has no configs: unset dataset_config, or point dataset_name at the \
                 dataset's folder",
                spec.name_or_path
            );
        }
        return Ok(vec![path.to_path_buf()]);
    }
    let config = spec.config.as_deref();
    if path.is_dir() {
        let files = list_dir_files(path)
            .with_context(|| format!("listing dataset folder {}", path.display()))?;
        let source = format!("dataset folder {}", path.display());
        let chosen = split_files::select_split_files(&files, &spec.split, config, &source)?;
        return Ok(chosen.iter().map(|file| path.join(file)).collect());
    }
    if !is_hub_id(&spec.name_or_path) {
        bail!(
            "dataset `{}` is neither an existing file or folder nor a hub dataset id \
             (`name` or `org/name`); check the path",
            spec.name_or_path
        );
    }
    let repo = HubRepo::new(
        &spec.name_or_path,
        RepoKind::Dataset,
        spec.revision.as_deref(),
    );
    let files = repo.list_files_with(hub)?;
    let source = format!("hub dataset `{}` at revision `{}`", repo.id, repo.revision);
    let chosen = split_files::select_split_files(&files, &spec.split, config, &source)?;
    chosen
        .iter()
        .map(|file| repo.file_with(file, hub))
        .collect()
}

/// `name` or `org/name` made of letters, digits, `-`, `_` and `.`, not a parquet file name.
fn is_hub_id(name: &str) -> bool {
    let parts: Vec<&str> = name.split('/').collect();
    parts.len() <= 2
        && !name.ends_with(".parquet")
        && parts.iter().all(|part| {
            !part.is_empty()
                && !part.starts_with('.')
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
}
