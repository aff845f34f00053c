//! Synthetic Chinese grade-school arithmetic word problems for the offline demonstration
//! (`grpo data synth`): one or two operations (+, −, ×, ÷) with exact non-negative integer
//! results, written as parquet splits in the schema of `swulling/gsm8k_chinese` so that the
//! training and evaluation commands read them like the real dataset.
//!
//! Each problem comes from a sentence template filled with a person, an object with its measure
//! word (个苹果, 支铅笔, 本练习本, ...), a container or a shop item, and operands drawn from the
//! template's ranges until every intermediate result is a whole number in `1..=max_answer`
//! (default [`MAX_ANSWER`]; a lower bound makes the arithmetic easier, for tiny models).
//! The `answer` column is a worked solution with GSM8K's `<<a+b=c>>` calculation annotations,
//! ending with `#### n`; `answer_only` is `n`.

use std::collections::HashSet;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use arrow_array::{ArrayRef, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use Op::{Add, Div, Mul, Sub};

/// The parquet columns, named as in `swulling/gsm8k_chinese`.
pub const COLUMNS: [&str; 4] = ["question", "question_zh-cn", "answer", "answer_only"];

/// The default bound: every intermediate and final result lies in `1..=MAX_ANSWER`.
pub const MAX_ANSWER: u32 = 1000;

/// The smallest `max_answer` every template can satisfy.
pub const MIN_MAX_ANSWER: u32 = 20;

/// The most problems one call generates (the whole set is kept in memory to stay duplicate-free).
pub const MAX_PROBLEMS: usize = 1_000_000;

/// One arithmetic operation, applied left to right.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Add,
    Sub,
    Mul,
    Div,
}

impl Op {
    /// The ASCII symbol GSM8K's calculation annotations use: `+ - * /`.
    pub fn symbol(self) -> char {
        match self {
            Op::Add => '+',
            Op::Sub => '-',
            Op::Mul => '*',
            Op::Div => '/',
        }
    }

    /// `left op right`, or `None` unless the result is a whole number that fits a `u32`
    /// (a subtraction below zero, an inexact division or a division by zero give `None`).
    pub fn apply(self, left: u32, right: u32) -> Option<u32> {
        match self {
            Op::Add => left.checked_add(right),
            Op::Sub => left.checked_sub(right),
            Op::Mul => left.checked_mul(right),
            Op::Div => (right != 0 && left % right == 0).then(|| left / right),
        }
    }
}

/// One generated problem: the four dataset columns plus the arithmetic behind them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// English rendering of the problem.
    pub question: String,
    /// The Chinese problem (column `question_zh-cn`).
    pub question_zh: String,
    /// Worked solution, one annotated calculation per operation, ending with `\n#### n`.
    pub answer: String,
    /// The final number `n`.
    pub answer_only: String,
    /// The operands in the order the question states them.
    pub operands: Vec<u32>,
    /// The operations, applied left to right: `((operands[0] ops[0] operands[1]) ops[1] ...)`.
    pub ops: Vec<Op>,
    /// Index of the sentence template the problem was written from, in `0..TEMPLATE_COUNT`.
    pub template: usize,
}

/// `n` distinct problems (no two share `question_zh`) whose operands and results are at most
/// `max_answer`, the same for the same `seed`.
pub fn generate(n: usize, seed: u64, max_answer: u32) -> Result<Vec<Problem>> {
    if max_answer < MIN_MAX_ANSWER {
        bail!("--max-answer {max_answer} is too small: use at least {MIN_MAX_ANSWER}");
    }
    if n == 0 {
        bail!("cannot generate 0 problems: ask for at least 1");
    }
    if n > MAX_PROBLEMS {
        bail!("cannot generate {n} problems: at most {MAX_PROBLEMS} per call");
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut seen = HashSet::with_capacity(n);
    let mut problems = Vec::with_capacity(n);
    while problems.len() < n {
        let problem = random_problem(&mut rng, max_answer);
        if seen.insert(problem.question_zh.clone()) {
            problems.push(problem);
        }
    }
    Ok(problems)
}

/// Writes `train.parquet` (`train` problems) and `test.parquet` (`test` problems) into `dir`,
/// creating it if needed. The two splits share no question.
pub fn write_dataset(
    dir: &Path,
    train: usize,
    test: usize,
    seed: u64,
    max_answer: u32,
) -> Result<()> {
    if train == 0 || test == 0 {
        bail!(
            "the train and test splits need at least 1 problem each (got --train {train}, \
             --test {test})"
        );
    }
    let total = train
        .checked_add(test)
        .filter(|&total| total <= MAX_PROBLEMS)
        .with_context(|| {
            format!("--train {train} + --test {test} problems exceed the limit of {MAX_PROBLEMS}")
        })?;
    // One duplicate-free stream split in two keeps the splits disjoint.
    let mut problems = generate(total, seed, max_answer)?;
    let test_problems = problems.split_off(train);
    std::fs::create_dir_all(dir).with_context(|| {
        format!(
            "cannot create the output folder {}: choose a writable --out",
            dir.display()
        )
    })?;
    write_split(&dir.join("train.parquet"), &problems)?;
    write_split(&dir.join("test.parquet"), &test_problems)
}

/// Writes problems as one snappy-compressed parquet file with the string columns [`COLUMNS`].
/// The file appears complete or not at all: it is written beside `path` and then renamed.
pub fn write_split(path: &Path, problems: &[Problem]) -> Result<()> {
    let schema = Arc::new(Schema::new(
        COLUMNS
            .iter()
            .map(|name| Field::new(*name, DataType::Utf8, true))
            .collect::<Vec<_>>(),
    ));
    let column = |field: fn(&Problem) -> &str| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(problems.iter().map(field)))
    };
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            column(|p| &p.question),
            column(|p| &p.question_zh),
            column(|p| &p.answer),
            column(|p| &p.answer_only),
        ],
    )?;

    let partial = path.with_extension("parquet.partial");
    let written = write_parquet(&partial, schema, &batch);
    if written.is_err() {
        // Best effort: the error below is what matters, not a leftover partial file.
        let _ = std::fs::remove_file(&partial);
    }
    written?;
    std::fs::rename(&partial, path)
        .with_context(|| format!("cannot rename {} to {}", partial.display(), path.display()))
}

fn write_parquet(path: &Path, schema: Arc<Schema>, batch: &RecordBatch) -> Result<()> {
    let file = File::create(path).with_context(|| {
        format!(
            "cannot create {}: choose a writable --out folder",
            path.display()
        )
    })?;
    let properties = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .build();
    let mut writer = ArrowWriter::try_new(file, schema, Some(properties))?;
    writer
        .write(batch)
        .with_context(|| format!("cannot write {}", path.display()))?;
    writer
        .close()
        .with_context(|| format!("cannot finish {}", path.display()))?;
    Ok(())
}

/// A sentence template. Operands appear in the text in the order they are computed with.
struct Template {
    ops: &'static [Op],
    /// Inclusive range of each operand.
    ranges: &'static [(u32, u32)],
    zh: &'static str,
    en: &'static str,
    /// One English solution sentence per operation; `{calc1}`, `{calc2}` become
    /// `a + b = <<a+b=r>>r`.
    steps: &'static [&'static str],
}

/// The number of sentence templates (see [`Problem::template`]).
pub const TEMPLATE_COUNT: usize = TEMPLATES.len();

const TEMPLATES: [Template; 26] = [
    Template {
        ops: &[Add],
        ranges: &[(5, 200), (2, 100)],
        zh: "{name}有{a}{unit}{obj}，{name2}又给了{name}{b}{unit}。{name}现在一共有多少{unit}{obj}？",
        en: "{Name} has {a} {objs}. {Name2} gives {Name} {b} more. How many {objs} does {Name} have now?",
        steps: &["{Name} now has {calc1} {objs}."],
    },
    Template {
        ops: &[Sub],
        ranges: &[(10, 300), (2, 150)],
        zh: "{name}有{a}{unit}{obj}，送给{name2}{b}{unit}后，还剩多少{unit}？",
        en: "{Name} has {a} {objs} and gives {b} of them to {Name2}. How many {objs} are left?",
        steps: &["{Name} has {calc1} {objs} left."],
    },
    Template {
        ops: &[Mul],
        ranges: &[(2, 12), (2, 30)],
        zh: "每{box}{obj}有{a}{unit}，{name}买了{b}{box}，一共买了多少{unit}{obj}？",
        en: "Each {box_en} holds {a} {objs}. {Name} buys {b} {boxes_en}. How many {objs} does {Name} buy in total?",
        steps: &["{Name} buys {calc1} {objs}."],
    },
    Template {
        ops: &[Div],
        ranges: &[(10, 200), (2, 10)],
        zh: "{name}把{a}{unit}{obj}平均分给{b}个小朋友，每个小朋友分到多少{unit}？",
        en: "{Name} shares {a} {objs} equally among {b} children. How many {objs} does each child get?",
        steps: &["Each child gets {calc1} {objs}."],
    },
    Template {
        ops: &[Div],
        ranges: &[(12, 240), (2, 12)],
        zh: "{name}有{a}{unit}{obj}，每{b}{unit}装一{box}，可以装满多少{box}？",
        en: "{Name} has {a} {objs} and puts {b} {objs} in each {box_en}. How many {boxes_en} can {Name} fill?",
        steps: &["{Name} fills {calc1} {boxes_en}."],
    },
    Template {
        ops: &[Add],
        ranges: &[(5, 300), (2, 100)],
        zh: "{name}有{a}{unit}{obj}，{name2}比{name}多{b}{unit}。{name2}有多少{unit}{obj}？",
        en: "{Name} has {a} {objs}. {Name2} has {b} more {objs} than {Name}. How many {objs} does {Name2} have?",
        steps: &["{Name2} has {calc1} {objs}."],
    },
    Template {
        ops: &[Sub],
        ranges: &[(20, 300), (2, 100)],
        zh: "{name}有{a}{unit}{obj}，{name2}比{name}少{b}{unit}。{name2}有多少{unit}{obj}？",
        en: "{Name} has {a} {objs}. {Name2} has {b} fewer {objs} than {Name}. How many {objs} does {Name2} have?",
        steps: &["{Name2} has {calc1} {objs}."],
    },
    Template {
        ops: &[Mul],
        ranges: &[(2, 50), (2, 9)],
        zh: "{name}有{a}{unit}{obj}，{name2}的{obj}数量是{name}的{b}倍。{name2}有多少{unit}{obj}？",
        en: "{Name} has {a} {objs}. {Name2} has {b} times as many {objs} as {Name}. How many {objs} does {Name2} have?",
        steps: &["{Name2} has {calc1} {objs}."],
    },
    Template {
        ops: &[Mul],
        ranges: &[(2, 30), (2, 12)],
        zh: "一{unit}{obj}{a}元，{name}买了{b}{unit}，一共要付多少元？",
        en: "One {obj_en} costs {a} yuan. {Name} buys {b} {objs}. How many yuan does {Name} pay in total?",
        steps: &["{Name} pays {calc1} yuan."],
    },
    Template {
        ops: &[Sub],
        ranges: &[(20, 500), (5, 300)],
        zh: "{name}带了{a}元去商店，买{item}花了{b}元，还剩多少元？",
        en: "{Name} takes {a} yuan to the shop and spends {b} yuan on {a_item_en}. How many yuan are left?",
        steps: &["{Name} has {calc1} yuan left."],
    },
    Template {
        ops: &[Sub],
        ranges: &[(60, 400), (10, 300)],
        zh: "一本故事书有{a}页，{name}已经看了{b}页，还剩多少页没有看？",
        en: "A storybook has {a} pages. {Name} has read {b} pages. How many pages are left to read?",
        steps: &["There are {calc1} pages left."],
    },
    Template {
        ops: &[Mul],
        ranges: &[(5, 40), (2, 14)],
        zh: "{name}每天看{a}页书，{b}天一共看多少页？",
        en: "{Name} reads {a} pages a day. How many pages does {Name} read in {b} days?",
        steps: &["{Name} reads {calc1} pages."],
    },
    Template {
        ops: &[Add],
        ranges: &[(10, 30), (10, 30)],
        zh: "{name}的班上有{a}名男生和{b}名女生，这个班一共有多少名学生？",
        en: "{Name}'s class has {a} boys and {b} girls. How many students are in the class?",
        steps: &["The class has {calc1} students."],
    },
    Template {
        ops: &[Add, Sub],
        ranges: &[(5, 100), (2, 50), (2, 50)],
        zh: "{name}有{a}{unit}{obj}，又买了{b}{unit}，然后送给{name2}{c}{unit}。{name}现在有多少{unit}{obj}？",
        en: "{Name} has {a} {objs}, buys {b} more, then gives {c} to {Name2}. How many {objs} does {Name} have now?",
        steps: &[
            "After buying, {Name} has {calc1} {objs}.",
            "After giving some away, {Name} has {calc2} {objs}.",
        ],
    },
    Template {
        ops: &[Sub, Add],
        ranges: &[(20, 200), (2, 60), (2, 60)],
        zh: "停车场里有{a}辆汽车，开走了{b}辆，又开来了{c}辆。停车场里现在有多少辆汽车？",
        en: "A parking lot has {a} cars. Then {b} cars drive away and {c} cars arrive. How many cars are in the parking lot now?",
        steps: &[
            "After some leave, there are {calc1} cars.",
            "After more arrive, there are {calc2} cars.",
        ],
    },
    Template {
        ops: &[Mul, Add],
        ranges: &[(2, 12), (2, 20), (2, 30)],
        zh: "每{box}{obj}有{a}{unit}，{name}买了{b}{box}，又另外买了{c}{unit}。{name}一共买了多少{unit}{obj}？",
        en: "Each {box_en} holds {a} {objs}. {Name} buys {b} {boxes_en} and {c} loose {objs}. How many {objs} does {Name} buy in total?",
        steps: &[
            "The {boxes_en} hold {calc1} {objs}.",
            "In total {Name} buys {calc2} {objs}.",
        ],
    },
    Template {
        ops: &[Mul, Sub],
        ranges: &[(2, 20), (2, 12), (2, 100)],
        zh: "{name}买了{a}{box}{obj}，每{box}{b}{unit}，分给同学{c}{unit}后，还剩多少{unit}？",
        en: "{Name} buys {a} {boxes_en} of {objs} with {b} in each. After giving {c} {objs} to classmates, how many {objs} are left?",
        steps: &["{Name} buys {calc1} {objs}.", "That leaves {calc2} {objs}."],
    },
    Template {
        ops: &[Add, Div],
        ranges: &[(5, 100), (5, 100), (2, 10)],
        zh: "{name}有{a}{unit}{obj}，{name2}有{b}{unit}{obj}。两人把{obj}合在一起，平均分成{c}份，每份有多少{unit}？",
        en: "{Name} has {a} {objs} and {Name2} has {b} {objs}. They put them together and split them into {c} equal shares. How many {objs} are in each share?",
        steps: &[
            "Together they have {calc1} {objs}.",
            "Each share has {calc2} {objs}.",
        ],
    },
    Template {
        ops: &[Sub, Div],
        ranges: &[(20, 200), (2, 100), (2, 10)],
        zh: "{name}有{a}{unit}{obj}，先送给{name2}{b}{unit}，剩下的平均分给{c}个小朋友，每个小朋友分到多少{unit}？",
        en: "{Name} has {a} {objs}, gives {b} to {Name2} and shares the rest equally among {c} children. How many {objs} does each child get?",
        steps: &[
            "{Name} has {calc1} {objs} left to share.",
            "Each child gets {calc2} {objs}.",
        ],
    },
    Template {
        ops: &[Div, Mul],
        ranges: &[(12, 240), (2, 12), (2, 12)],
        zh: "{a}{unit}{obj}平均装进{b}个{box_noun}里。照这样计算，{c}{box}一共有多少{unit}{obj}？",
        en: "There are {a} {objs} packed equally into {b} {boxes_en}. At that rate, how many {objs} are in {c} {boxes_en}?",
        steps: &[
            "Each {box_en} holds {calc1} {objs}.",
            "So {c} {boxes_en} hold {calc2} {objs}.",
        ],
    },
    Template {
        ops: &[Add, Mul],
        ranges: &[(2, 10), (2, 10), (2, 14)],
        zh: "{name}每天早上跑{a}圈，晚上跑{b}圈。{c}天一共跑多少圈？",
        en: "{Name} runs {a} laps every morning and {b} laps every evening. How many laps does {Name} run in {c} days?",
        steps: &[
            "Each day {Name} runs {calc1} laps.",
            "In {c} days {Name} runs {calc2} laps.",
        ],
    },
    Template {
        ops: &[Sub, Mul],
        ranges: &[(5, 50), (1, 10), (2, 12)],
        zh: "一{unit}{obj}原价{a}元，现在每{unit}便宜{b}元。{name}买{c}{unit}要花多少元？",
        en: "One {obj_en} used to cost {a} yuan and is now {b} yuan cheaper. How many yuan does {Name} spend on {c} {objs}?",
        steps: &[
            "Each {obj_en} now costs {calc1} yuan.",
            "So {c} {objs} cost {calc2} yuan.",
        ],
    },
    Template {
        ops: &[Add, Add],
        ranges: &[(5, 200), (5, 200), (5, 200)],
        zh: "{name}买{item}花了{a}元，买{item2}花了{b}元，还剩{c}元。{name}原来有多少元？",
        en: "{Name} spends {a} yuan on {a_item_en} and {b} yuan on {a_item2_en}, and has {c} yuan left. How many yuan did {Name} have at first?",
        steps: &[
            "{Name} spends {calc1} yuan.",
            "At first {Name} had {calc2} yuan.",
        ],
    },
    Template {
        ops: &[Sub, Sub],
        ranges: &[(50, 500), (5, 200), (5, 200)],
        zh: "{name}有{a}元，买{item}花了{b}元，又买{item2}花了{c}元，还剩多少元？",
        en: "{Name} has {a} yuan, spends {b} yuan on {a_item_en} and then {c} yuan on {a_item2_en}. How many yuan are left?",
        steps: &[
            "After the {item_en}, {Name} has {calc1} yuan.",
            "After the {item2_en}, {Name} has {calc2} yuan.",
        ],
    },
    Template {
        ops: &[Mul, Sub],
        ranges: &[(2, 20), (2, 30), (5, 100)],
        zh: "{name}每天存{a}元，存了{b}天后，用其中的{c}元买了{item}，还剩多少元？",
        en: "{Name} saves {a} yuan a day for {b} days, then spends {c} yuan on {a_item_en}. How many yuan are left?",
        steps: &[
            "{Name} saves {calc1} yuan.",
            "After buying the {item_en}, {Name} has {calc2} yuan left.",
        ],
    },
    Template {
        ops: &[Div, Add],
        ranges: &[(10, 200), (2, 10), (2, 20)],
        zh: "{name}把{a}{unit}{obj}平均分给{b}个小朋友，{name2}又给了每个小朋友{c}{unit}。现在每个小朋友有多少{unit}？",
        en: "{Name} shares {a} {objs} equally among {b} children, and then {Name2} gives each child {c} more. How many {objs} does each child have now?",
        steps: &[
            "Each child first gets {calc1} {objs}.",
            "Each child now has {calc2} {objs}.",
        ],
    },
];

/// People: (Chinese, English).
const NAMES: [(&str, &str); 18] = [
    ("小明", "Xiaoming"),
    ("小红", "Xiaohong"),
    ("小刚", "Xiaogang"),
    ("小丽", "Xiaoli"),
    ("小华", "Xiaohua"),
    ("小芳", "Xiaofang"),
    ("小军", "Xiaojun"),
    ("小美", "Xiaomei"),
    ("小亮", "Xiaoliang"),
    ("小雨", "Xiaoyu"),
    ("王老师", "Teacher Wang"),
    ("李老师", "Teacher Li"),
    ("张叔叔", "Uncle Zhang"),
    ("李阿姨", "Aunt Li"),
    ("陈奶奶", "Grandma Chen"),
    ("刘爷爷", "Grandpa Liu"),
    ("赵师傅", "Master Zhao"),
    ("周同学", "Student Zhou"),
];

/// Countable things: (measure word, Chinese, English singular, English plural).
const OBJECTS: [(&str, &str, &str, &str); 16] = [
    ("个", "苹果", "apple", "apples"),
    ("支", "铅笔", "pencil", "pencils"),
    ("本", "练习本", "notebook", "notebooks"),
    ("颗", "糖", "candy", "candies"),
    ("张", "贴纸", "sticker", "stickers"),
    ("个", "鸡蛋", "egg", "eggs"),
    ("朵", "花", "flower", "flowers"),
    ("块", "饼干", "cookie", "cookies"),
    ("根", "香蕉", "banana", "bananas"),
    ("个", "橘子", "orange", "oranges"),
    ("块", "橡皮", "eraser", "erasers"),
    ("颗", "玻璃球", "marble", "marbles"),
    ("个", "气球", "balloon", "balloons"),
    ("把", "尺子", "ruler", "rulers"),
    ("本", "故事书", "storybook", "storybooks"),
    ("个", "桃子", "peach", "peaches"),
];

/// Containers: (measure word, noun, English singular, English plural).
const CONTAINERS: [(&str, &str, &str, &str); 4] = [
    ("盒", "盒子", "box", "boxes"),
    ("袋", "袋子", "bag", "bags"),
    ("箱", "箱子", "crate", "crates"),
    ("篮", "篮子", "basket", "baskets"),
];

/// Things bought with money: (Chinese, English, English with its article).
const SHOP_ITEMS: [(&str, &str, &str); 8] = [
    ("书包", "schoolbag", "a schoolbag"),
    ("文具盒", "pencil case", "a pencil case"),
    ("足球", "football", "a football"),
    ("玩具车", "toy car", "a toy car"),
    ("台灯", "desk lamp", "a desk lamp"),
    ("雨伞", "umbrella", "an umbrella"),
    ("水杯", "water bottle", "a water bottle"),
    ("风筝", "kite", "a kite"),
];

fn random_problem(rng: &mut StdRng, max_answer: u32) -> Problem {
    let template_index = rng.random_range(0..TEMPLATES.len());
    let template = &TEMPLATES[template_index];
    let (operands, results) = random_operands(rng, template, max_answer);

    let [name, name2] = two_distinct(rng, &NAMES);
    let [item, item2] = two_distinct(rng, &SHOP_ITEMS);
    let object = OBJECTS[rng.random_range(0..OBJECTS.len())];
    let container = CONTAINERS[rng.random_range(0..CONTAINERS.len())];

    let mut values: Vec<(&str, String)> = vec![
        ("name", name.0.into()),
        ("name2", name2.0.into()),
        ("Name", name.1.into()),
        ("Name2", name2.1.into()),
        ("unit", object.0.into()),
        ("obj", object.1.into()),
        ("obj_en", object.2.into()),
        ("objs", object.3.into()),
        ("box", container.0.into()),
        ("box_noun", container.1.into()),
        ("box_en", container.2.into()),
        ("boxes_en", container.3.into()),
        ("item", item.0.into()),
        ("item2", item2.0.into()),
        ("item_en", item.1.into()),
        ("item2_en", item2.1.into()),
        ("a_item_en", item.2.into()),
        ("a_item2_en", item2.2.into()),
    ];
    for (key, operand) in ["a", "b", "c"].into_iter().zip(&operands) {
        values.push((key, operand.to_string()));
    }
    let mut left = operands[0];
    for (step, ((op, right), result)) in template
        .ops
        .iter()
        .zip(&operands[1..])
        .zip(&results)
        .enumerate()
    {
        let symbol = op.symbol();
        let calc = format!("{left} {symbol} {right} = <<{left}{symbol}{right}={result}>>{result}");
        values.push((["calc1", "calc2"][step], calc));
        left = *result;
    }

    let mut answer: Vec<String> = template
        .steps
        .iter()
        .map(|step| fill(step, &values))
        .collect();
    answer.push(format!("#### {left}"));
    Problem {
        question: fill(template.en, &values),
        question_zh: fill(template.zh, &values),
        answer: answer.join("\n"),
        answer_only: left.to_string(),
        operands,
        ops: template.ops.to_vec(),
        template: template_index,
    }
}

/// Operands from the template's ranges (capped at `max_answer`, lower bounds lowered to at most
/// half the cap), redrawn until every
/// intermediate result is a whole number in `1..=max_answer`; returns the operands and the
/// result after each operation. Every template's ranges admit such draws for any `max_answer`
/// of at least [`MIN_MAX_ANSWER`] (the tests generate from each one).
fn random_operands(rng: &mut StdRng, template: &Template, max_answer: u32) -> (Vec<u32>, Vec<u32>) {
    loop {
        let operands: Vec<u32> = template
            .ranges
            .iter()
            .map(|&(low, high)| {
                // Under a low cap, a template's range shrinks to at most [cap / 2, cap].
                let high = high.min(max_answer);
                rng.random_range(low.min(high / 2).max(1)..=high)
            })
            .collect();
        let mut results = Vec::with_capacity(template.ops.len());
        let mut value = operands[0];
        for (op, &right) in template.ops.iter().zip(&operands[1..]) {
            match op.apply(value, right) {
                Some(result) if (1..=max_answer).contains(&result) => value = result,
                _ => break,
            }
            results.push(value);
        }
        if results.len() == template.ops.len() {
            return (operands, results);
        }
    }
}

fn two_distinct<T: Copy>(rng: &mut StdRng, choices: &[T]) -> [T; 2] {
    let first = rng.random_range(0..choices.len());
    // Draw from the others by skipping over `first`.
    let mut second = rng.random_range(0..choices.len() - 1);
    if second >= first {
        second += 1;
    }
    [choices[first], choices[second]]
}

/// Replaces each `{key}` in `text` with its value.
fn fill(text: &str, values: &[(&str, String)]) -> String {
    values.iter().fold(text.to_owned(), |text, (key, value)| {
        text.replace(&format!("{{{key}}}"), value)
    })
}
