//! Dataset loading from parquet files written here (several row groups, every compression the
//! hub uses), folder layouts, an offline hub cache, answer normalisation and epoch orders.

use std::fs;
use std::path::Path;
use std::sync::Arc;

use arrow_array::{
    ArrayRef, Float64Array, Int32Array, Int64Array, LargeStringArray, RecordBatch, StringArray,
    StringViewArray,
};
use grpo::data::{epoch_order, normalize_answer, Dataset, DatasetSpec, Example};
use grpo::hub::HubSettings;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use parquet::file::reader::{FileReader, SerializedFileReader};

const ROWS_PER_GROUP: usize = 3;

/// Writes `columns` to a parquet file with small row groups.
fn write_parquet(path: &Path, columns: Vec<(&str, ArrayRef)>, compression: Compression) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let batch = RecordBatch::try_from_iter(columns).unwrap();
    let properties = WriterProperties::builder()
        .set_compression(compression)
        .set_max_row_group_row_count(Some(ROWS_PER_GROUP))
        .build();
    let mut writer = ArrowWriter::try_new(
        fs::File::create(path).unwrap(),
        batch.schema(),
        Some(properties),
    )
    .unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
}

fn strings(values: &[&str]) -> ArrayRef {
    Arc::new(StringArray::from(values.to_vec()))
}

fn spec(name_or_path: &Path) -> DatasetSpec {
    DatasetSpec {
        name_or_path: name_or_path.to_str().unwrap().to_string(),
        revision: None,
        config: None,
        split: "train".to_string(),
        prompt_column: "question".to_string(),
        answer_column: "answer".to_string(),
    }
}

fn questions(count: usize) -> Vec<String> {
    (0..count).map(|i| format!("question {i}")).collect()
}

fn question_array(count: usize) -> ArrayRef {
    Arc::new(StringArray::from(questions(count)))
}

fn load_err(spec: &DatasetSpec) -> String {
    format!("{:#}", Dataset::load(spec).unwrap_err())
}

#[test]
fn gsm8k_answers_keep_their_final_number() {
    let cases = [
        ("Natalia sold 48 clips.\n#### 72", "72"),
        (
            "She has 1,234 + 1 = <<1234+1=1235>>1,235\n#### 1,235",
            "1235",
        ),
        ("A loss.\n#### -5", "-5"),
        ("Half.\n####   3.75 \n", "3.75"),
        ("#### $1,000,000.50", "1000000.50"),
        ("first #### 1\nthen #### 2", "2"),
        ("  42 \n", "42"),
        ("18", "18"),
        ("no number here ####  none ", "none"),
    ];
    for (raw, expected) in cases {
        assert_eq!(normalize_answer(raw), expected, "normalising {raw:?}");
    }
}

#[test]
fn string_answers_stream_across_row_groups_and_compressions() {
    let dir = tempfile::tempdir().unwrap();
    let raw_answers: Vec<String> = (0..10)
        .map(|i| format!("step one\nstep two\n#### {},{:03}", i + 1, i * 7))
        .collect();
    for (name, compression) in [
        ("snappy.parquet", Compression::SNAPPY),
        ("zstd.parquet", Compression::ZSTD(ZstdLevel::default())),
        ("plain.parquet", Compression::UNCOMPRESSED),
    ] {
        let path = dir.path().join(name);
        write_parquet(
            &path,
            vec![
                (
                    "id",
                    Arc::new(Int64Array::from_iter_values(0..10)) as ArrayRef,
                ),
                ("question", question_array(10)),
                ("answer", Arc::new(StringArray::from(raw_answers.clone()))),
            ],
            compression,
        );
        let reader = SerializedFileReader::new(fs::File::open(&path).unwrap()).unwrap();
        assert_eq!(reader.metadata().num_row_groups(), 4, "{name}");

        let dataset = Dataset::load(&spec(&path)).unwrap();
        assert_eq!(dataset.len(), 10, "{name}");
        assert!(!dataset.is_empty());
        for i in 0..10 {
            let expected = Example {
                question: format!("question {i}"),
                answer: format!("{}{:03}", i + 1, i * 7),
                columns: None,
            };
            assert_eq!(dataset.get(i), &expected, "{name} row {i}");
        }
        assert_eq!(dataset.files(), std::slice::from_ref(&path));
    }
}

#[test]
fn numeric_and_wide_string_columns_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, ArrayRef, ArrayRef, [&str; 4])> = vec![
        (
            "int64",
            question_array(4),
            Arc::new(Int64Array::from(vec![1, -2, 1_000_000, 0])),
            ["1", "-2", "1000000", "0"],
        ),
        (
            "int32",
            Arc::new(LargeStringArray::from(questions(4))),
            Arc::new(Int32Array::from(vec![7, 8, -9, 10])),
            ["7", "8", "-9", "10"],
        ),
        (
            "float64",
            Arc::new(StringViewArray::from(questions(4))),
            Arc::new(Float64Array::from(vec![2.5, 3.0, -0.25, 100.0])),
            ["2.5", "3", "-0.25", "100"],
        ),
        (
            "large-utf8",
            question_array(4),
            Arc::new(LargeStringArray::from(vec![
                " 5 ",
                "#### 6",
                "x\n#### 1,007",
                "8",
            ])),
            ["5", "6", "1007", "8"],
        ),
    ];
    for (name, prompts, answers, expected) in cases {
        let path = dir.path().join(format!("{name}.parquet"));
        write_parquet(
            &path,
            vec![("question", prompts), ("answer", answers)],
            Compression::SNAPPY,
        );
        let dataset = Dataset::load(&spec(&path)).unwrap();
        let got: Vec<&str> = dataset
            .examples()
            .iter()
            .map(|e| e.answer.as_str())
            .collect();
        assert_eq!(got, expected, "{name}");
        assert_eq!(dataset.get(3).question, "question 3", "{name}");
    }
}

#[test]
fn missing_column_lists_the_columns_present() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("train.parquet");
    write_parquet(
        &path,
        vec![
            ("question", question_array(2)),
            ("answer_only", strings(&["1", "2"])),
            ("source", strings(&["a", "b"])),
        ],
        Compression::SNAPPY,
    );
    let err = load_err(&spec(&path));
    assert!(err.contains("column `answer`"), "{err}");
    assert!(err.contains("question, answer_only, source"), "{err}");
    assert!(err.contains("set dataset_answer_column"), "{err}");
    assert!(err.contains(&path.display().to_string()), "{err}");
}

#[test]
fn corrupt_and_truncated_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.parquet");
    fs::write(&garbage, b"question,answer\nwhat,1\n").unwrap();
    let err = load_err(&spec(&garbage));
    assert!(err.contains(&garbage.display().to_string()), "{err}");
    assert!(err.contains("not a readable parquet file"), "{err}");

    let truncated = dir.path().join("truncated.parquet");
    write_parquet(
        &truncated,
        vec![
            ("question", question_array(10)),
            ("answer", question_array(10)),
        ],
        Compression::SNAPPY,
    );
    let bytes = fs::read(&truncated).unwrap();
    fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_err(&spec(&truncated));
    assert!(err.contains(&truncated.display().to_string()), "{err}");
}

#[test]
fn null_cells_are_errors_naming_row_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("train.parquet");
    let mut prompts: Vec<Option<String>> = questions(9).into_iter().map(Some).collect();
    prompts[7] = None;
    write_parquet(
        &path,
        vec![
            ("question", Arc::new(StringArray::from(prompts)) as ArrayRef),
            ("answer", question_array(9)),
        ],
        Compression::SNAPPY,
    );
    let err = load_err(&spec(&path));
    assert!(
        err.contains("row 7") && err.contains("column `question`"),
        "{err}"
    );

    let all_null = dir.path().join("all_null.parquet");
    write_parquet(
        &all_null,
        vec![
            (
                "question",
                Arc::new(StringArray::from(vec![None::<&str>; 4])) as ArrayRef,
            ),
            ("answer", question_array(4)),
        ],
        Compression::SNAPPY,
    );
    let err = load_err(&spec(&all_null));
    assert!(err.contains("row 0") && err.contains("null"), "{err}");

    let null_answer = dir.path().join("null_answer.parquet");
    write_parquet(
        &null_answer,
        vec![
            ("question", question_array(2)),
            (
                "answer",
                Arc::new(Int64Array::from(vec![Some(1), None])) as ArrayRef,
            ),
        ],
        Compression::SNAPPY,
    );
    let err = load_err(&spec(&null_answer));
    assert!(
        err.contains("row 1") && err.contains("column `answer`"),
        "{err}"
    );
}

#[test]
fn non_text_prompt_column_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("train.parquet");
    write_parquet(
        &path,
        vec![
            (
                "question",
                Arc::new(Int64Array::from(vec![1, 2])) as ArrayRef,
            ),
            ("answer", strings(&["1", "2"])),
        ],
        Compression::SNAPPY,
    );
    let err = load_err(&spec(&path));
    assert!(
        err.contains("prompt column `question`")
            && err.contains("Int64")
            && err.contains("set dataset_prompt_column"),
        "{err}"
    );
}

#[test]
fn empty_split_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("train.parquet");
    write_parquet(
        &path,
        vec![("question", strings(&[])), ("answer", strings(&[]))],
        Compression::SNAPPY,
    );
    let err = load_err(&spec(&path));
    assert!(err.contains("no rows") && err.contains("`train`"), "{err}");
}

/// Writes a split file whose questions are `{label} {i}`.
fn write_split(path: &Path, label: &str, rows: usize) {
    let prompts: Vec<String> = (0..rows).map(|i| format!("{label} {i}")).collect();
    let answers: Vec<i64> = (0..rows as i64).collect();
    write_parquet(
        path,
        vec![
            ("question", Arc::new(StringArray::from(prompts)) as ArrayRef),
            ("answer", Arc::new(Int64Array::from(answers))),
        ],
        Compression::ZSTD(ZstdLevel::default()),
    );
}

fn first_questions(dataset: &Dataset) -> Vec<String> {
    dataset
        .examples()
        .iter()
        .map(|e| e.question.clone())
        .collect()
}

#[test]
fn folder_layouts_find_the_split() {
    // data/{split}-NNNNN-of-NNNNN.parquet: shards read in order, other splits left out.
    let sharded = tempfile::tempdir().unwrap();
    write_split(
        &sharded.path().join("data/train-00001-of-00002.parquet"),
        "b",
        2,
    );
    write_split(
        &sharded.path().join("data/train-00000-of-00002.parquet"),
        "a",
        2,
    );
    write_split(
        &sharded.path().join("data/test-00000-of-00001.parquet"),
        "t",
        5,
    );
    fs::write(sharded.path().join("README.md"), "# card").unwrap();
    let dataset = Dataset::load(&spec(sharded.path())).unwrap();
    assert_eq!(first_questions(&dataset), ["a 0", "a 1", "b 0", "b 1"]);
    let test = Dataset::load(&DatasetSpec {
        split: "test".to_string(),
        ..spec(sharded.path())
    })
    .unwrap();
    assert_eq!(test.len(), 5);

    // {split}.parquet and {split}/*.parquet.
    let flat = tempfile::tempdir().unwrap();
    write_split(&flat.path().join("train.parquet"), "flat", 3);
    write_split(&flat.path().join("validation.parquet"), "val", 1);
    assert_eq!(Dataset::load(&spec(flat.path())).unwrap().len(), 3);
    let nested = tempfile::tempdir().unwrap();
    write_split(&nested.path().join("train/0000.parquet"), "n", 2);
    write_split(&nested.path().join("train/0001.parquet"), "m", 1);
    assert_eq!(
        first_questions(&Dataset::load(&spec(nested.path())).unwrap()),
        ["n 0", "n 1", "m 0"]
    );

    // {config}/{split}-*.parquet: several configs need dataset_config.
    let configs = tempfile::tempdir().unwrap();
    write_split(
        &configs.path().join("main/train-00000-of-00001.parquet"),
        "main",
        2,
    );
    write_split(
        &configs.path().join("socratic/train-00000-of-00001.parquet"),
        "soc",
        3,
    );
    let err = load_err(&spec(configs.path()));
    assert!(
        err.contains("main, socratic") && err.contains("dataset_config"),
        "{err}"
    );
    let socratic = Dataset::load(&DatasetSpec {
        config: Some("socratic".to_string()),
        ..spec(configs.path())
    })
    .unwrap();
    assert_eq!(first_questions(&socratic), ["soc 0", "soc 1", "soc 2"]);

    // A split that is not there lists what is.
    let err = load_err(&DatasetSpec {
        split: "test".to_string(),
        ..spec(flat.path())
    });
    assert!(
        err.contains("split `test`") && err.contains("train.parquet"),
        "{err}"
    );
}

#[test]
fn unknown_dataset_names_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    let err = load_err(&spec(&dir.path().join("missing.parquet")));
    assert!(
        err.contains("missing.parquet") && err.contains("neither"),
        "{err}"
    );
}

#[test]
fn offline_hub_cache_resolves_a_dataset_split() {
    let cache = tempfile::tempdir().unwrap();
    let commit = "1f2e3d4c5b6a79881f2e3d4c5b6a79881f2e3d4c";
    let repo = cache.path().join("datasets--swulling--gsm8k_tiny");
    fs::create_dir_all(repo.join("refs")).unwrap();
    fs::write(repo.join("refs/main"), commit).unwrap();
    let snapshot = repo.join("snapshots").join(commit);
    write_split(
        &snapshot.join("data/train-00000-of-00001.parquet"),
        "hub",
        4,
    );
    write_split(
        &snapshot.join("data/test-00000-of-00001.parquet"),
        "other",
        1,
    );
    fs::write(snapshot.join("README.md"), "# card").unwrap();

    let settings = HubSettings {
        cache_dir: cache.path().to_path_buf(),
        token: None,
        offline: true,
        endpoint: "https://huggingface.co".to_string(),
    };
    let hub_spec = DatasetSpec {
        name_or_path: "swulling/gsm8k_tiny".to_string(),
        ..spec(Path::new("unused"))
    };
    let dataset = Dataset::load_with(&hub_spec, &settings).unwrap();
    assert_eq!(
        first_questions(&dataset),
        ["hub 0", "hub 1", "hub 2", "hub 3"]
    );
    assert_eq!(dataset.get(2).answer, "2");
    assert_eq!(
        dataset.files(),
        [snapshot.join("data/train-00000-of-00001.parquet")]
    );

    let by_commit = DatasetSpec {
        revision: Some(commit.to_string()),
        ..hub_spec.clone()
    };
    assert_eq!(Dataset::load_with(&by_commit, &settings).unwrap().len(), 4);

    let uncached = DatasetSpec {
        name_or_path: "swulling/gsm8k_chinese".to_string(),
        ..hub_spec
    };
    let err = format!(
        "{:#}",
        Dataset::load_with(&uncached, &settings).unwrap_err()
    );
    assert!(
        err.contains("swulling/gsm8k_chinese") && err.contains("offline"),
        "{err}"
    );
}

#[test]
fn epoch_orders_are_reproducible_permutations() {
    let len = 50;
    let order = epoch_order(len, 42, 0);
    let mut sorted = order.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..len).collect::<Vec<_>>());
    assert_ne!(order, sorted, "the order is shuffled");
    assert_eq!(
        order,
        epoch_order(len, 42, 0),
        "same seed and epoch, same order"
    );
    assert_ne!(order, epoch_order(len, 42, 1), "epochs differ");
    assert_ne!(order, epoch_order(len, 43, 0), "seeds differ");
    assert!(epoch_order(0, 42, 0).is_empty());
    assert_eq!(epoch_order(1, 42, 7), [0]);
}

/// `dataset_config` and `dataset_revision` reach the resolution: the subset folder of a local
/// dataset, the hub revision (here the hub's `refs/convert/parquet` branch, cached as Python
/// caches it), and a subset given for a single file is an error naming the key.
#[test]
fn config_keys_choose_the_dataset_subset_and_revision() {
    let load_config = |sets: &[String]| grpo::config::Config::load(None, sets).unwrap();
    let columns = || {
        vec![
            "dataset_prompt_column=question".to_string(),
            "dataset_answer_column=answer".to_string(),
        ]
    };

    let configs = tempfile::tempdir().unwrap();
    write_split(&configs.path().join("main/train-0.parquet"), "main", 2);
    write_split(&configs.path().join("socratic/train-0.parquet"), "soc", 3);
    let mut sets = columns();
    sets.push(format!("dataset_name={}", configs.path().display()));
    sets.push("dataset_config=socratic".into());
    let cfg = load_config(&sets);
    let socratic = Dataset::load(&DatasetSpec::from_config(&cfg, "train")).unwrap();
    assert_eq!(first_questions(&socratic), ["soc 0", "soc 1", "soc 2"]);

    let file = configs.path().join("main/train-0.parquet");
    let mut sets = columns();
    sets.push(format!("dataset_name={}", file.display()));
    sets.push("dataset_config=main".into());
    let err = load_err(&DatasetSpec::from_config(&load_config(&sets), "train"));
    assert!(err.contains("dataset_config"), "{err}");

    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("datasets--org--converted");
    let (main, converted) = (
        "1111111111111111111111111111111111111111",
        "2222222222222222222222222222222222222222",
    );
    fs::create_dir_all(repo.join("refs/refs/convert")).unwrap();
    fs::write(repo.join("refs/main"), main).unwrap();
    fs::write(repo.join("refs/refs/convert/parquet"), converted).unwrap();
    write_split(
        &repo
            .join("snapshots")
            .join(main)
            .join("data/train-0.parquet"),
        "main branch",
        1,
    );
    write_split(
        &repo
            .join("snapshots")
            .join(converted)
            .join("default/train/0000.parquet"),
        "converted",
        2,
    );
    let settings = HubSettings {
        cache_dir: cache.path().to_path_buf(),
        token: None,
        offline: true,
        endpoint: "https://huggingface.co".to_string(),
    };
    let mut sets = columns();
    sets.push("dataset_name=org/converted".into());
    let on_main = Dataset::load_with(
        &DatasetSpec::from_config(&load_config(&sets), "train"),
        &settings,
    )
    .unwrap();
    assert_eq!(first_questions(&on_main), ["main branch 0"]);
    sets.push("dataset_revision=refs/convert/parquet".into());
    let on_branch = Dataset::load_with(
        &DatasetSpec::from_config(&load_config(&sets), "train"),
        &settings,
    )
    .unwrap();
    assert_eq!(first_questions(&on_branch), ["converted 0", "converted 1"]);
}

#[test]
fn every_column_is_read_as_json_rows_across_files_and_row_groups() {
    use arrow_array::builder::{ListBuilder, StringBuilder};
    use arrow_array::StructArray;
    use arrow_schema::{DataType, Field};
    use serde_json::json;

    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("data");
    // Two files of the split, the first with two row groups.
    for (file, first) in [
        ("train-00000-of-00002.parquet", 0),
        ("train-00001-of-00002.parquet", 5),
    ] {
        let rows = 5 - first / 5 * 3;
        let mut tags = ListBuilder::new(StringBuilder::new());
        for i in 0..rows {
            for t in 0..(first + i) % 3 {
                tags.values().append_value(format!("t{t}"));
            }
            tags.append(true);
        }
        let levels: ArrayRef = Arc::new(Int32Array::from_iter_values(first..first + rows));
        let sources: ArrayRef = Arc::new(StringArray::from_iter_values(
            (first..first + rows).map(|i| format!("src{i}")),
        ));
        let meta = StructArray::from(vec![
            (
                Arc::new(Field::new("level", DataType::Int32, false)),
                levels,
            ),
            (
                Arc::new(Field::new("source", DataType::Utf8, false)),
                sources,
            ),
        ]);
        let score: ArrayRef = Arc::new(Float64Array::from_iter(
            (first..first + rows).map(|i| (i % 2 == 0).then_some(i as f64 / 4.0)),
        ));
        write_parquet(
            &folder.join(file),
            vec![
                (
                    "question",
                    Arc::new(StringArray::from(
                        (first..first + rows)
                            .map(|i| format!("question {i}"))
                            .collect::<Vec<_>>(),
                    )) as ArrayRef,
                ),
                (
                    "answer",
                    Arc::new(Int64Array::from_iter_values(
                        (first..first + rows).map(|i| 100 + i as i64),
                    )),
                ),
                ("tags", Arc::new(tags.finish())),
                ("meta", Arc::new(meta)),
                ("score", score),
            ],
            Compression::SNAPPY,
        );
    }
    let mut dataset = Dataset::load(&spec(dir.path())).unwrap();
    assert_eq!(dataset.len(), 7);
    assert!(
        dataset.examples().iter().all(|e| e.columns.is_none()),
        "not read unless asked"
    );
    dataset.load_columns().unwrap();
    for (i, example) in dataset.examples().iter().enumerate() {
        let i = i as i64;
        let tags: Vec<String> = (0..i % 3).map(|t| format!("t{t}")).collect();
        let score = if i % 2 == 0 {
            json!(i as f64 / 4.0)
        } else {
            json!(null)
        };
        let expected = json!({
            "question": format!("question {i}"),
            "answer": 100 + i,
            "tags": tags,
            "meta": {"level": i, "source": format!("src{i}")},
            "score": score,
        });
        assert_eq!(
            serde_json::Value::Object(example.columns.as_deref().unwrap().clone()),
            expected,
            "row {i}"
        );
        assert_eq!(
            example.answer,
            (100 + i).to_string(),
            "normalised answer kept"
        );
    }
}
