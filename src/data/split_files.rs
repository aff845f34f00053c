//! Finding a split's parquet files in a folder or hub repo listing, by the layouts Hugging Face
//! `datasets` recognises.
//!
//! A parquet file belongs to split `S` when its name is `S` followed by a non-word character
//! (`S.parquet`, `S-00000-of-00002.parquet`, `S_0.parquet`) or when a folder on its path is named
//! `S` (`S/0000.parquet`). The folders before that, other than `data`, name the file's config
//! (subset): `data/train-*.parquet` and `train.parquet` are in the default config, while
//! `main/train-*.parquet` and `main/train/0000.parquet` are in config `main`. Hidden paths
//! (`.x`, `__x`) are ignored. As in `datasets`, when no file names any usual split (train,
//! validation, test and their synonyms), every parquet file is the `train` split.

use std::collections::BTreeSet;

use anyhow::{bail, Result};

/// Characters that may follow a split name in a file name (`datasets`' "non-word" separators).
const SPLIT_NAME_SEPARATORS: &str = "-._ 0123456789";

/// The split names `datasets` recognises by default.
const KNOWN_SPLIT_NAMES: [&str; 10] = [
    "train",
    "training",
    "validation",
    "valid",
    "dev",
    "val",
    "test",
    "testing",
    "eval",
    "evaluation",
];

/// How many file names an error message shows.
const LISTED_FILES: usize = 12;

/// A parquet file of the wanted split and the config it belongs to (`""` for the default).
struct SplitFile<'a> {
    path: &'a str,
    config: String,
}

/// The sorted relative paths, among `files`, of the parquet files of `split` in `config` (the
/// only config holding the split, or the default one, when `config` is `None`). `source` names
/// the folder or repo in errors.
pub(crate) fn select_split_files(
    files: &[String],
    split: &str,
    config: Option<&str>,
    source: &str,
) -> Result<Vec<String>> {
    let parquet: Vec<&str> = files
        .iter()
        .map(String::as_str)
        .filter(|path| path.ends_with(".parquet") && !is_hidden(path))
        .collect();
    if parquet.is_empty() {
        let shown: Vec<&str> = files
            .iter()
            .take(LISTED_FILES)
            .map(String::as_str)
            .collect();
        bail!(
            "{source} holds no .parquet files (files: {}); grpo reads parquet datasets: export \
             the data with `datasets`' `to_parquet`, or for a hub dataset set dataset_revision = \
             \"refs/convert/parquet\" (the hub's parquet conversion)",
            list_or_none(&shown)
        );
    }
    let mut matches: Vec<SplitFile> = parquet
        .iter()
        .filter_map(|path| split_file(path, split))
        .collect();
    let untagged = !parquet.iter().any(|path| {
        KNOWN_SPLIT_NAMES
            .iter()
            .any(|name| split_file(path, name).is_some())
    });
    if matches.is_empty() && split == "train" && config.is_none() && untagged {
        matches = parquet
            .iter()
            .map(|path| SplitFile {
                path,
                config: String::new(),
            })
            .collect();
    }
    if matches.is_empty() {
        let shown: Vec<&str> = parquet.iter().take(LISTED_FILES).copied().collect();
        bail!(
            "no parquet files for split `{split}` in {source}; looked for {split}.parquet, \
             {split}-*.parquet, {split}/*.parquet and the same under data/ or a config folder; \
             parquet files present: {}",
            list_or_none(&shown)
        );
    }

    let configs: BTreeSet<&str> = matches.iter().map(|file| file.config.as_str()).collect();
    let listed_configs = || {
        configs
            .iter()
            .map(|config| if config.is_empty() { "default" } else { config })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let chosen = match config {
        Some(wanted) if configs.contains(wanted) => wanted,
        Some("default") if configs.contains("") => "",
        Some(wanted) => bail!(
            "{source} has no config `{wanted}` with split `{split}`; configs with that split: {}; \
             set dataset_config to one of them",
            listed_configs()
        ),
        None if configs.contains("") => "",
        None if configs.len() == 1 => configs.first().copied().unwrap_or_default(),
        None => bail!(
            "{source} has split `{split}` in several configs ({}); set dataset_config to one of \
             them",
            listed_configs()
        ),
    };
    let mut chosen_files: Vec<String> = matches
        .iter()
        .filter(|file| file.config == chosen)
        .map(|file| file.path.to_string())
        .collect();
    chosen_files.sort();
    Ok(chosen_files)
}

/// `path` as a file of `split`, with its config, or `None` when it belongs to another split.
fn split_file<'a>(path: &'a str, split: &str) -> Option<SplitFile<'a>> {
    let parts: Vec<&str> = path.split('/').collect();
    let (file_name, folders) = parts.split_last()?;
    let config_folders = match folders.iter().position(|folder| *folder == split) {
        Some(split_folder) => &folders[..split_folder],
        None if names_split(file_name, split) => folders,
        None => return None,
    };
    let config = config_folders
        .iter()
        .filter(|folder| **folder != "data")
        .copied()
        .collect::<Vec<_>>()
        .join("/");
    Some(SplitFile { path, config })
}

/// Whether a file name starts with `split` followed by a separator (`train-0.parquet`).
fn names_split(file_name: &str, split: &str) -> bool {
    file_name
        .strip_prefix(split)
        .and_then(|rest| rest.chars().next())
        .is_some_and(|next| SPLIT_NAME_SEPARATORS.contains(next))
}

fn is_hidden(path: &str) -> bool {
    path.split('/')
        .any(|part| part.starts_with('.') || part.starts_with("__"))
}

fn list_or_none(items: &[&str]) -> String {
    if items.is_empty() {
        "none".to_string()
    } else {
        items.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn select(files: &[&str], split: &str, config: Option<&str>) -> Result<Vec<String>> {
        let files: Vec<String> = files.iter().map(|file| file.to_string()).collect();
        select_split_files(&files, split, config, "test repo")
    }

    #[test]
    fn finds_the_usual_layouts() {
        let sharded = [
            "README.md",
            "data/train-00001-of-00002.parquet",
            "data/train-00000-of-00002.parquet",
            "data/test-00000-of-00001.parquet",
        ];
        assert_eq!(
            select(&sharded, "train", None).unwrap(),
            [
                "data/train-00000-of-00002.parquet",
                "data/train-00001-of-00002.parquet"
            ]
        );
        assert_eq!(
            select(&sharded, "test", None).unwrap(),
            ["data/test-00000-of-00001.parquet"]
        );
        let flat = ["train.parquet", "test.parquet", "trainer.parquet"];
        assert_eq!(select(&flat, "train", None).unwrap(), ["train.parquet"]);
        let folders = [
            "train/0000.parquet",
            "train/0001.parquet",
            "test/0000.parquet",
        ];
        assert_eq!(
            select(&folders, "train", None).unwrap(),
            ["train/0000.parquet", "train/0001.parquet"]
        );
    }

    #[test]
    fn config_folders_need_a_choice_when_ambiguous() {
        let gsm8k = [
            "main/train-00000-of-00001.parquet",
            "main/test-00000-of-00001.parquet",
            "socratic/train-00000-of-00001.parquet",
        ];
        let err = select(&gsm8k, "train", None).unwrap_err().to_string();
        assert!(err.contains("main, socratic"), "{err}");
        assert!(err.contains("dataset_config"), "{err}");
        assert_eq!(
            select(&gsm8k, "train", Some("socratic")).unwrap(),
            ["socratic/train-00000-of-00001.parquet"]
        );
        assert_eq!(
            select(&gsm8k, "test", None).unwrap(),
            ["main/test-00000-of-00001.parquet"]
        );
        let converted = ["default/train/0000.parquet", "default/train/0001.parquet"];
        assert_eq!(select(&converted, "train", None).unwrap().len(), 2);
        let err = select(&gsm8k, "train", Some("other"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no config `other`"), "{err}");
    }

    #[test]
    fn untagged_files_are_train_only_when_no_split_is_named() {
        let untagged = ["part-0.parquet", "part-1.parquet"];
        assert_eq!(select(&untagged, "train", None).unwrap().len(), 2);
        assert!(select(&untagged, "test", None).is_err());
        let only_test = ["test.parquet", "extra.parquet"];
        let err = select(&only_test, "train", None).unwrap_err().to_string();
        assert!(
            err.contains("split `train`") && err.contains("test.parquet"),
            "{err}"
        );
    }

    #[test]
    fn no_parquet_files_is_explained() {
        let err = select(
            &["data/train.jsonl", ".hidden/train.parquet"],
            "train",
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("no .parquet files"), "{err}");
        assert!(err.contains("data/train.jsonl"), "{err}");
    }
}
