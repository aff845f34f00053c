//! Reading the prompt and answer columns of one parquet file, batch by batch, with a projection
//! so that no other column is decoded; and, when asked, every column of every row as JSON.

use std::fs::File;
use std::path::Path;

use anyhow::{bail, Context, Result};
use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float16Type, Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, Int8Type, UInt16Type,
    UInt32Type, UInt64Type, UInt8Type,
};
use arrow_array::Array;
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;
use parquet::file::reader::{FileReader, SerializedFileReader};
use serde_json::{Map, Value};

use super::Example;

/// Rows decoded at a time; bounds memory for files with huge row groups.
const BATCH_ROWS: usize = 1024;

/// The config key that names the prompt column, for error messages.
const PROMPT_KEY: &str = "dataset_prompt_column";

/// Appends the examples of `path` to `examples`, reading only `prompt_column` (text) and
/// `answer_column` (text or number, kept as written; [`super::Dataset::load`] normalises it).
/// `answer_key` is the config key that named the answer column (`dataset_answer_column`, or
/// `dataset_solution_column` for `grpo sft`), which errors tell the user to change.
pub(crate) fn read_examples(
    path: &Path,
    prompt_column: &str,
    answer_column: &str,
    answer_key: &str,
    examples: &mut Vec<Example>,
) -> Result<()> {
    let file =
        File::open(path).with_context(|| format!("opening dataset file {}", path.display()))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).with_context(|| {
        format!(
            "{} is not a readable parquet file (corrupt, truncated or another format); \
             re-download or re-export it as parquet",
            path.display()
        )
    })?;
    let schema = builder.schema().clone();
    let column_index = |name: &str, setting: &str| -> Result<usize> {
        schema.index_of(name).map_err(|_| {
            let present: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            anyhow::anyhow!(
                "column `{name}` ({setting}) not found in {}; columns present: {}; set {setting} \
                 to one of them",
                path.display(),
                present.join(", ")
            )
        })
    };
    let prompt_index = column_index(prompt_column, PROMPT_KEY)?;
    let answer_index = column_index(answer_column, answer_key)?;
    let prompt_type = schema.field(prompt_index).data_type();
    if !is_text(prompt_type) {
        bail!(
            "prompt column `{prompt_column}` in {} has type {prompt_type}; it must hold text \
             (a string column): set {PROMPT_KEY} to a text column",
            path.display()
        );
    }
    let answer_type = schema.field(answer_index).data_type();
    if !(is_text(answer_type) || answer_type.is_integer() || answer_type.is_floating()) {
        bail!(
            "answer column `{answer_column}` in {} has type {answer_type}; it must hold text or \
             numbers: set {answer_key} to such a column",
            path.display()
        );
    }

    let projection = ProjectionMask::roots(builder.parquet_schema(), [prompt_index, answer_index]);
    let reader = builder
        .with_projection(projection)
        .with_batch_size(BATCH_ROWS)
        .build()
        .with_context(|| format!("reading parquet file {}", path.display()))?;
    let mut first_row = 0;
    for batch in reader {
        let batch = batch.with_context(|| {
            format!(
                "decoding rows from row {first_row} of parquet file {} (corrupt data?)",
                path.display()
            )
        })?;
        let column = |name: &str| {
            batch.column_by_name(name).with_context(|| {
                format!("column `{name}` missing from a batch of {}", path.display())
            })
        };
        let prompts = cell_texts(column(prompt_column)?.as_ref());
        let answers = cell_texts(column(answer_column)?.as_ref());
        for (offset, (prompt, answer)) in prompts.into_iter().zip(answers).enumerate() {
            let row = first_row + offset;
            let null_cell = |name: &str| {
                anyhow::anyhow!(
                    "row {row} (0-based) of {} has a null in column `{name}`; every row needs a \
                     prompt and an answer (check {PROMPT_KEY} and {answer_key}, or drop such rows)",
                    path.display()
                )
            };
            let question = prompt.ok_or_else(|| null_cell(prompt_column))?;
            let answer = answer.ok_or_else(|| null_cell(answer_column))?;
            examples.push(Example {
                question,
                answer,
                columns: None,
            });
        }
        first_row += batch.num_rows();
    }
    Ok(())
}

/// Appends every row of `path`, all columns, as JSON objects (parquet's own record reader and
/// JSON conversion) to `rows`.
pub(crate) fn read_rows(path: &Path, rows: &mut Vec<Map<String, Value>>) -> Result<()> {
    let file =
        File::open(path).with_context(|| format!("opening dataset file {}", path.display()))?;
    let reader = SerializedFileReader::new(file)
        .with_context(|| format!("{} is not a readable parquet file", path.display()))?;
    let records = reader
        .get_row_iter(None)
        .with_context(|| format!("reading the rows of {}", path.display()))?;
    for (index, record) in records.enumerate() {
        let record = record.with_context(|| {
            format!(
                "decoding row {index} (0-based) of {} (corrupt data?)",
                path.display()
            )
        })?;
        match record.to_json_value() {
            Value::Object(row) => rows.push(row),
            other => bail!("row {index} of {} is not a record: {other}", path.display()),
        }
    }
    Ok(())
}

fn is_text(data_type: &DataType) -> bool {
    matches!(
        data_type,
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
    )
}

/// The cells of a text or numeric column as text (`None` for nulls). Numbers print as Rust
/// does (`3`, `2.5`, `-7`). Only called on the types [`read_examples`] accepted.
fn cell_texts(array: &dyn Array) -> Vec<Option<String>> {
    fn texts<T: ToString>(cells: impl Iterator<Item = Option<T>>) -> Vec<Option<String>> {
        cells
            .map(|cell| cell.map(|value| value.to_string()))
            .collect()
    }
    match array.data_type() {
        DataType::Utf8 => texts(array.as_string::<i32>().iter()),
        DataType::LargeUtf8 => texts(array.as_string::<i64>().iter()),
        DataType::Utf8View => texts(array.as_string_view().iter()),
        DataType::Int8 => texts(array.as_primitive::<Int8Type>().iter()),
        DataType::Int16 => texts(array.as_primitive::<Int16Type>().iter()),
        DataType::Int32 => texts(array.as_primitive::<Int32Type>().iter()),
        DataType::Int64 => texts(array.as_primitive::<Int64Type>().iter()),
        DataType::UInt8 => texts(array.as_primitive::<UInt8Type>().iter()),
        DataType::UInt16 => texts(array.as_primitive::<UInt16Type>().iter()),
        DataType::UInt32 => texts(array.as_primitive::<UInt32Type>().iter()),
        DataType::UInt64 => texts(array.as_primitive::<UInt64Type>().iter()),
        DataType::Float16 => texts(array.as_primitive::<Float16Type>().iter()),
        DataType::Float32 => texts(array.as_primitive::<Float32Type>().iter()),
        DataType::Float64 => texts(array.as_primitive::<Float64Type>().iter()),
        other => unreachable!("column type {other} was rejected when the schema was checked"),
    }
}
