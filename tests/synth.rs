//! The synthetic arithmetic dataset: arithmetic checked independently of the generator,
//! determinism, disjoint splits, and the parquet files read back with the parquet crate.

use std::collections::HashSet;
use std::fs::File;
use std::path::Path;

use arrow_array::{Array, StringArray};
use assert_cmd::Command;
use grpo::synth::{self, Op, Problem, COLUMNS, MAX_ANSWER, TEMPLATE_COUNT};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::Compression;
use parquet::file::reader::{FileReader, SerializedFileReader};
use predicates::prelude::*;
use predicates::str::contains;

/// Left-to-right evaluation written here, independently of `Op::apply`: `None` when a step
/// leaves the whole numbers.
fn evaluate(problem: &Problem) -> Option<i64> {
    let mut value = i64::from(problem.operands[0]);
    for (op, &right) in problem.ops.iter().zip(&problem.operands[1..]) {
        let right = i64::from(right);
        value = match op {
            Op::Add => value + right,
            Op::Sub => value - right,
            Op::Mul => value * right,
            Op::Div if right != 0 && value % right == 0 => value / right,
            Op::Div => return None,
        };
        if value < 0 {
            return None;
        }
    }
    Some(value)
}

/// The runs of ASCII digits in `text`, as numbers.
fn numbers_in(text: &str) -> Vec<u32> {
    text.split(|c: char| !c.is_ascii_digit())
        .filter(|run| !run.is_empty())
        .map(|run| run.parse().unwrap())
        .collect()
}

/// The `<<x?y=z>>` annotations of a worked answer, as (x, symbol, y, z).
fn annotations(answer: &str) -> Vec<(i64, char, i64, i64)> {
    answer
        .split("<<")
        .skip(1)
        .map(|rest| {
            let inner = &rest[..rest.find(">>").expect("annotation closed with >>")];
            let (calc, result) = inner.split_once('=').expect("annotation has =");
            let at = calc
                .find(['+', '-', '*', '/'])
                .expect("annotation has an operator");
            let symbol = calc[at..].chars().next().unwrap();
            (
                calc[..at].parse().unwrap(),
                symbol,
                calc[at + 1..].parse().unwrap(),
                result.parse().unwrap(),
            )
        })
        .collect()
}

#[test]
fn every_answer_is_the_arithmetic_of_its_question() {
    let problems = synth::generate(3000, 7, MAX_ANSWER).unwrap();
    assert_eq!(problems.len(), 3000);
    for problem in &problems {
        let expected =
            evaluate(problem).unwrap_or_else(|| panic!("not whole-number arithmetic: {problem:?}"));
        assert!(
            (1..=i64::from(MAX_ANSWER)).contains(&expected),
            "{problem:?}"
        );
        assert_eq!(problem.answer_only, expected.to_string(), "{problem:?}");
        assert!(
            problem
                .answer
                .ends_with(&format!("\n#### {}", problem.answer_only)),
            "{problem:?}"
        );
        assert_eq!(problem.operands.len(), problem.ops.len() + 1);
        assert!((1..=2).contains(&problem.ops.len()));

        // The question states exactly the operands, in computation order, in both languages.
        assert_eq!(
            numbers_in(&problem.question_zh),
            problem.operands,
            "{problem:?}"
        );
        assert_eq!(
            numbers_in(&problem.question),
            problem.operands,
            "{problem:?}"
        );
        for text in [&problem.question, &problem.question_zh, &problem.answer] {
            assert!(!text.contains(['{', '}']), "unfilled placeholder: {text}");
        }

        // The annotations chain the operands and each one is right.
        let steps = annotations(&problem.answer);
        assert_eq!(steps.len(), problem.ops.len(), "{problem:?}");
        let mut left = i64::from(problem.operands[0]);
        for ((x, symbol, y, z), (op, &operand)) in steps
            .iter()
            .zip(problem.ops.iter().zip(&problem.operands[1..]))
        {
            assert_eq!((*x, *y), (left, i64::from(operand)), "{problem:?}");
            let computed = match symbol {
                '+' => x + y,
                '-' => x - y,
                '*' => x * y,
                _ => {
                    assert_eq!(x % y, 0, "{problem:?}");
                    x / y
                }
            };
            assert_eq!(*z, computed, "{problem:?}");
            assert_eq!(*symbol, op.symbol());
            left = *z;
        }
        assert_eq!(left, expected);
    }
}

#[test]
fn draws_from_every_template_with_every_operation() {
    let problems = synth::generate(3000, 11, MAX_ANSWER).unwrap();
    let templates: HashSet<usize> = problems.iter().map(|p| p.template).collect();
    assert_eq!(templates.len(), TEMPLATE_COUNT);
    const { assert!(TEMPLATE_COUNT >= 15) };
    let ops: HashSet<Op> = problems.iter().flat_map(|p| p.ops.clone()).collect();
    assert_eq!(ops.len(), 4);
    let two_step = problems.iter().filter(|p| p.ops.len() == 2).count();
    assert!(
        two_step > 500 && two_step < 2500,
        "{two_step} two-step problems"
    );
    let names = ["小明", "王老师", "李阿姨"];
    for name in names {
        assert!(problems.iter().any(|p| p.question_zh.contains(name)));
    }
}

#[test]
fn same_seed_same_problems_other_seed_other_problems() {
    let first = synth::generate(200, 3, MAX_ANSWER).unwrap();
    assert_eq!(first, synth::generate(200, 3, MAX_ANSWER).unwrap());
    assert_ne!(first, synth::generate(200, 4, MAX_ANSWER).unwrap());
    // A shorter run is a prefix of a longer one with the same seed.
    assert_eq!(synth::generate(50, 3, MAX_ANSWER).unwrap(), first[..50]);
}

#[test]
fn a_lower_max_answer_bounds_operands_and_results_and_keeps_every_template() {
    let problems = synth::generate(2000, 5, synth::MIN_MAX_ANSWER).unwrap();
    for problem in &problems {
        let result = evaluate(problem).unwrap();
        assert!((1..=20).contains(&result), "{problem:?}");
        assert!(problem.operands.iter().all(|&n| n <= 20), "{problem:?}");
    }
    let templates: HashSet<usize> = problems.iter().map(|p| p.template).collect();
    assert_eq!(
        templates.len(),
        TEMPLATE_COUNT,
        "every template still occurs"
    );
    let error = synth::generate(10, 5, 19).unwrap_err().to_string();
    assert!(error.contains("19") && error.contains("20"), "{error}");
}

#[test]
fn questions_are_unique() {
    let problems = synth::generate(5000, 1, MAX_ANSWER).unwrap();
    let distinct: HashSet<&str> = problems.iter().map(|p| p.question_zh.as_str()).collect();
    assert_eq!(distinct.len(), problems.len());
}

#[test]
fn zero_problems_is_an_error() {
    let error = synth::generate(0, 1, MAX_ANSWER).unwrap_err().to_string();
    assert!(error.contains("at least 1"), "{error}");
    let dir = tempfile::tempdir().unwrap();
    let error = synth::write_dataset(dir.path(), 0, 5, 1, MAX_ANSWER)
        .unwrap_err()
        .to_string();
    assert!(error.contains("train 0"), "{error}");
}

/// The columns of a parquet file as strings, checking names and snappy compression.
fn read_split(path: &Path) -> Vec<Vec<String>> {
    let metadata = SerializedFileReader::new(File::open(path).unwrap())
        .unwrap()
        .metadata()
        .clone();
    for row_group in metadata.row_groups() {
        for column in row_group.columns() {
            assert_eq!(column.compression(), Compression::SNAPPY);
        }
    }
    let builder = ParquetRecordBatchReaderBuilder::try_new(File::open(path).unwrap()).unwrap();
    let names: Vec<&str> = builder
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .collect();
    assert_eq!(
        names,
        ["question", "question_zh-cn", "answer", "answer_only"]
    );
    let mut columns = vec![Vec::new(); names.len()];
    for batch in builder.build().unwrap() {
        let batch = batch.unwrap();
        for (column, values) in batch.columns().iter().zip(&mut columns) {
            let strings = column.as_any().downcast_ref::<StringArray>().unwrap();
            assert_eq!(strings.null_count(), 0);
            values.extend(strings.iter().map(|s| s.unwrap().to_owned()));
        }
    }
    columns
}

#[test]
fn writes_disjoint_parquet_splits_that_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("nested/synth");
    synth::write_dataset(&out, 120, 30, 9, MAX_ANSWER).unwrap();
    let train = read_split(&out.join("train.parquet"));
    let test = read_split(&out.join("test.parquet"));
    assert_eq!(train[0].len(), 120);
    assert_eq!(test[0].len(), 30);
    assert_eq!(COLUMNS.len(), train.len());

    let train_questions: HashSet<&String> = train[1].iter().collect();
    assert!(test[1].iter().all(|q| !train_questions.contains(q)));

    // The rows are the generated problems, train first then test.
    let problems = synth::generate(150, 9, MAX_ANSWER).unwrap();
    for (row, problem) in problems.iter().enumerate() {
        let (split, index) = if row < 120 {
            (&train, row)
        } else {
            (&test, row - 120)
        };
        assert_eq!(split[0][index], problem.question);
        assert_eq!(split[1][index], problem.question_zh);
        assert_eq!(split[2][index], problem.answer);
        assert_eq!(split[3][index], problem.answer_only);
    }
    assert!(!out.join("train.parquet.partial").exists());
}

#[test]
fn cli_writes_the_splits_deterministically() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["a", "b"] {
        Command::cargo_bin("grpo")
            .unwrap()
            .args([
                "data", "synth", "--train", "40", "--test", "10", "--seed", "5",
            ])
            .arg("--out")
            .arg(dir.path().join(name))
            .assert()
            .success()
            .stdout(contains("40 training and 10 test problems"));
    }
    for split in ["train.parquet", "test.parquet"] {
        let a = read_split(&dir.path().join("a").join(split));
        let b = read_split(&dir.path().join("b").join(split));
        assert_eq!(a, b);
    }
    assert_eq!(read_split(&dir.path().join("a/train.parquet"))[0].len(), 40);
}

#[test]
fn cli_rejects_zero_rows_and_unwritable_folders() {
    Command::cargo_bin("grpo")
        .unwrap()
        .args(["data", "synth", "--out", "unused", "--train", "0"])
        .assert()
        .failure()
        .stderr(contains("--train"));

    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, "not a folder").unwrap();
    Command::cargo_bin("grpo")
        .unwrap()
        .args(["data", "synth", "--train", "5", "--test", "5", "--out"])
        .arg(blocker.join("out"))
        .assert()
        .failure()
        .stderr(contains("cannot create the output folder").and(contains("--out")));
}

#[test]
fn cli_help_explains_every_flag() {
    let assert = Command::cargo_bin("grpo")
        .unwrap()
        .args(["data", "synth", "--help"])
        .assert()
        .success();
    let help = String::from_utf8(assert.get_output().stdout.clone()).unwrap();
    for flag in ["--out", "--train", "--test", "--seed", "gsm8k_chinese"] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
}
