//! External rewards through their real transports: the shipped Python adapter
//! (`python/grpo_reward.py`) serving a TRL-style function in a long-lived child process, shell
//! children for every failure a child can have, and a loopback HTTP server for the HTTP
//! transport; then `grpo train` and `grpo score` with external rewards through the binary.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use grpo::config::Config;
use grpo::prompt::Message;
use grpo::rewards::external::{ExternalParams, TrainerProgress};
use grpo::rewards::{Completion, RewardParams, RewardSet};
use serde_json::{json, Map, Value};

mod common;

fn params(timeout: Duration, retries: usize) -> RewardParams {
    RewardParams {
        max_completion_length: 64,
        external: ExternalParams { timeout, retries },
    }
}

fn set(names: &[&str], timeout: Duration, retries: usize) -> RewardSet {
    let names: Vec<String> = names.iter().map(|name| name.to_string()).collect();
    RewardSet::new(&names, None, params(timeout, retries)).unwrap()
}

/// `python3 <repo>/python/grpo_reward.py FILE:FUNCTION` for a function in `file`.
fn adapter(file: &Path, function: &str) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/grpo_reward.py");
    format!(
        "cmd:python3 {} {}:{function}",
        script.display(),
        file.display()
    )
}

/// Three completions of two prompts with everything external rewards are sent.
struct Batch {
    messages: Vec<Vec<Message>>,
    texts: Vec<&'static str>,
    ids: Vec<Vec<u32>>,
    columns: Vec<Map<String, Value>>,
}

impl Batch {
    fn new() -> Self {
        let row = |question: &str, answer: Value, level: i64| {
            json!({"question": question, "answer": answer, "level": level, "tags": ["a", "b"]})
                .as_object()
                .unwrap()
                .clone()
        };
        Self {
            messages: vec![
                vec![Message::system("Think."), Message::user("6+7?")],
                vec![Message::user("2*4?")],
            ],
            texts: vec!["<answer>13</answer>", "14", "<answer>8</answer>"],
            ids: vec![vec![5, 6, 7], vec![8], vec![9, 10]],
            columns: vec![row("6+7?", json!("13"), 1), row("2*4?", json!(8), 2)],
        }
    }

    /// Completions 0 and 1 answer prompt 0, completion 2 prompt 1.
    fn completions(&self) -> Vec<Completion<'_>> {
        [0usize, 0, 1]
            .iter()
            .enumerate()
            .map(|(row, &prompt)| Completion {
                prompt: &self.messages[prompt].last().unwrap().content,
                text: self.texts[row],
                answer: ["13", "8"][prompt],
                num_tokens: Some(self.ids[row].len()),
                messages: &self.messages[prompt],
                ids: &self.ids[row],
                columns: Some(&self.columns[prompt]),
            })
            .collect()
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

// ---------------------------------------------------------------------------------------------
// The Python adapter
// ---------------------------------------------------------------------------------------------

/// A TRL reward function that checks every argument TRL passes and derives its rewards from
/// them, so a field that does not arrive, or arrives misplaced, changes the numbers or fails.
const TRL_STYLE: &str = r#"
import os

def checked(prompts, completions, completion_ids, trainer_state, log_extra, log_metric,
            question, answer, level, tags, **kwargs):
    assert not kwargs, kwargs
    log_metric("ignored", 1.0)
    log_extra("ignored", [1])
    print("this print must not corrupt the protocol")
    rewards = []
    for prompt, completion, ids, q, a, lv, t in zip(
            prompts, completions, completion_ids, question, answer, level, tags):
        assert prompt[-1] == {"role": "user", "content": q}, (prompt, q)
        assert completion[0]["role"] == "assistant" and t == ["a", "b"]
        text = completion[0]["content"]
        if text == "14":
            rewards.append(None)
            continue
        correct = text == "<answer>" + str(a) + "</answer>"
        step = 0 if trainer_state is None else trainer_state.global_step
        rewards.append(float(correct) + 10 * len(ids) + 100 * lv + 1000 * step)
    return rewards

async def async_lengths(completions, **kwargs):
    return [len(c[0]["content"]) for c in completions]

def pid(completions, **kwargs):
    return [os.getpid()] * len(completions)

def raises(completions, **kwargs):
    raise ValueError("no reward for you")

def nan(completions, **kwargs):
    return [float("nan")] + [0.5] * (len(completions) - 1)

def text(completions, **kwargs):
    return ["0.5"] * len(completions)
"#;

#[test]
fn python_adapter_serves_a_trl_reward_function_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let module = write(dir.path(), "my_rewards.py", TRL_STYLE);
    let name = adapter(&module, "checked");
    let rewards = set(&["correctness", &name], Duration::from_secs(30), 0);
    let batch = Batch::new();
    let completions = batch.completions();
    let progress = TrainerProgress {
        global_step: 3,
        max_steps: 10,
        epoch: 0.5,
    };
    let scores = rewards.score(&completions, Some(&progress)).unwrap();
    // correct + 10 * ids + 100 * level + 1000 * step; "14" gets None (NaN).
    assert_eq!(scores[0], [2.0, 1.0 + 30.0 + 100.0 + 3000.0]);
    assert_eq!(scores[1][0], 0.0);
    assert!(scores[1][1].is_nan(), "None is no reward: {:?}", scores[1]);
    assert_eq!(
        scores[2][1],
        1.0 + 20.0 + 200.0 + 3000.0,
        "answer 8 is str(8)"
    );
    // Outside training there is no trainer state.
    let scores = rewards.score(&completions, None).unwrap();
    assert_eq!(scores[0][1], 131.0);
    // The total leaves out the missing reward: correctness only.
    assert_eq!(rewards.total(&scores[1]), 0.0);

    let rewards = set(
        &[&adapter(&module, "async_lengths")],
        Duration::from_secs(30),
        0,
    );
    let scores = rewards.score(&completions, None).unwrap();
    assert_eq!(
        scores,
        [[19.0], [2.0], [18.0]],
        "async def functions are awaited"
    );
}

#[test]
fn the_child_is_started_once_and_stopped_when_the_set_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "my_rewards.py", TRL_STYLE);
    // The module form, from the folder of the reward module, as the docs show it.
    let name = format!(
        "cmd:cd {} && PYTHONPATH={} python3 -m grpo_reward my_rewards:pid",
        dir.path().display(),
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("python")
            .display()
    );
    let rewards = set(&[&name], Duration::from_secs(30), 0);
    let batch = Batch::new();
    let first = rewards.score(&batch.completions(), None).unwrap()[0][0];
    let second = rewards.score(&batch.completions(), None).unwrap()[0][0];
    assert_eq!(first, second, "one long-lived process serves every batch");
    let pid = first as libc::pid_t;
    // SAFETY: signal 0 only checks that the process exists.
    assert_eq!(unsafe { libc::kill(pid, 0) }, 0, "the child runs");
    drop(rewards);
    // It exited when its input closed and was waited for: the pid is gone.
    assert_eq!(unsafe { libc::kill(pid, 0) }, -1, "the child was stopped");
}

#[test]
fn python_failures_are_named_errors() {
    let dir = tempfile::tempdir().unwrap();
    let module = write(dir.path(), "my_rewards.py", TRL_STYLE);
    let batch = Batch::new();
    for (function, expected) in [
        (
            "raises",
            "the reward function failed: ValueError: no reward for you",
        ),
        ("nan", "value 0 is NaN, not a finite number"),
        ("text", "value 0 is the string \"0.5\", not a number"),
    ] {
        let name = adapter(&module, function);
        let rewards = set(&[&name], Duration::from_secs(30), 0);
        let error = rewards.score(&batch.completions(), None).unwrap_err();
        let message = format!("{error:#}");
        assert!(message.contains(&format!("reward `{name}`")), "{message}");
        assert!(message.contains(expected), "{function}: {message}");
    }
}

// ---------------------------------------------------------------------------------------------
// Child processes that misbehave
// ---------------------------------------------------------------------------------------------

/// The error of scoring the batch with `cmd:SCRIPT`.
fn command_error(script: &str, timeout: Duration, retries: usize) -> String {
    let name = format!("cmd:{script}");
    let rewards = set(&[&name], timeout, retries);
    let batch = Batch::new();
    let error = rewards.score(&batch.completions(), None).unwrap_err();
    let message = format!("{error:#}");
    assert!(message.contains(&format!("reward `{name}`")), "{message}");
    message
}

#[test]
fn every_child_failure_is_an_error_naming_it() {
    let long = Duration::from_secs(30);
    let reply = |line: &str| format!("while read request; do echo '{line}'; done");
    for (script, expected) in [
        (
            "exit 3".to_string(),
            "ended (exit status: 3) without replying",
        ),
        (reply("[1.0, 2.0]"), "returned 2 values for 3 completions"),
        (
            reply("[1.0, true, 2]"),
            "value 1 is the boolean true, not a number",
        ),
        (
            reply("[1.0, NaN, 2]"),
            "value 1 is NaN, not a finite number",
        ),
        (
            reply("[1.0, -Infinity, 2]"),
            "value 1 is -Infinity, not a finite number",
        ),
        (reply("not json"), "the reply is not JSON"),
        (reply("{\"score\": 1}"), "holds no \"rewards\" list"),
        (
            reply("{\"error\": \"judge down\"}"),
            "the reward function failed: judge down",
        ),
    ] {
        let message = command_error(&script, long, 0);
        assert!(message.contains(expected), "{script}: {message}");
    }
}

#[test]
fn a_silent_child_times_out_and_is_stopped() {
    let message = command_error("sleep 60", Duration::from_millis(200), 0);
    assert!(
        message.contains("no reply within 0.2 s (reward_timeout)"),
        "{message}"
    );
    assert!(message.contains("reward_retries = 0"), "{message}");
}

#[test]
fn a_crash_is_tried_again_in_a_new_process() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("started-once");
    // Crashes the first time it is started, serves from the second.
    let script = format!(
        "if [ -e {m} ]; then while read r; do echo '[1, 2, 3]'; done; else touch {m}; exit 1; fi",
        m = marker.display()
    );
    let rewards = set(&[&format!("cmd:{script}")], Duration::from_secs(30), 1);
    let batch = Batch::new();
    let scores = rewards.score(&batch.completions(), None).unwrap();
    assert_eq!(scores, [[1.0], [2.0], [3.0]]);

    std::fs::remove_file(&marker).unwrap();
    let message = command_error(&script, Duration::from_secs(30), 0);
    assert!(message.contains("exit status: 1"), "{message}");
}

#[test]
fn a_line_that_answers_no_request_is_an_error() {
    let rewards = set(
        &["cmd:while read r; do echo '[1, 1, 1]'; echo debug; done"],
        Duration::from_secs(30),
        0,
    );
    let batch = Batch::new();
    rewards.score(&batch.completions(), None).unwrap();
    // The stray line arrives after the first reply; give it time before the next request.
    std::thread::sleep(Duration::from_millis(100));
    let error = format!(
        "{:#}",
        rewards.score(&batch.completions(), None).unwrap_err()
    );
    assert!(
        error.contains("wrote a line that answers no request: debug"),
        "{error}"
    );
}

#[test]
fn the_request_is_one_line_with_every_field() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("requests.jsonl");
    let script = format!(
        "while read -r r; do echo \"$r\" >> {}; echo '[0, 0, 0]'; done",
        log.display()
    );
    let rewards = set(&[&format!("cmd:{script}")], Duration::from_secs(30), 0);
    let batch = Batch::new();
    let progress = TrainerProgress {
        global_step: 7,
        max_steps: 9,
        epoch: 1.25,
    };
    rewards
        .score(&batch.completions(), Some(&progress))
        .unwrap();
    drop(rewards);
    let text = std::fs::read_to_string(&log).unwrap();
    let request: Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(text.lines().count(), 1);
    let keys: Vec<&str> = request
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        [
            "prompts",
            "completions",
            "completion_ids",
            "question",
            "answer",
            "level",
            "tags",
            "trainer_state"
        ]
    );
    assert_eq!(
        request["prompts"][1],
        json!([{"role": "system", "content": "Think."}, {"role": "user", "content": "6+7?"}])
    );
    assert_eq!(
        request["prompts"][2],
        json!([{"role": "user", "content": "2*4?"}])
    );
    assert_eq!(
        request["completions"][1],
        json!([{"role": "assistant", "content": "14"}])
    );
    assert_eq!(request["completion_ids"], json!([[5, 6, 7], [8], [9, 10]]));
    assert_eq!(request["answer"], json!(["13", "13", 8]));
    assert_eq!(request["level"], json!([1, 1, 2]));
    assert_eq!(
        request["trainer_state"],
        json!({"global_step": 7, "max_steps": 9, "epoch": 1.25})
    );
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

/// A loopback HTTP server that answers the `n`-th POST (from 0) with `respond(n, body)`:
/// status, body and a delay before answering. Requests are kept for inspection.
struct Server {
    url: String,
    bodies: Arc<std::sync::Mutex<Vec<String>>>,
}

fn serve(
    respond: impl Fn(usize, &str) -> (u16, String, Duration) + Send + Sync + 'static,
) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/reward", listener.local_addr().unwrap());
    let bodies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = bodies.clone();
    let respond = Arc::new(respond);
    let count = Arc::new(AtomicUsize::new(0));
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let (respond, seen, count) = (respond.clone(), seen.clone(), count.clone());
            std::thread::spawn(move || {
                let _ = answer(stream, &*respond, &seen, &count);
            });
        }
    });
    Server { url, bodies }
}

fn answer(
    stream: TcpStream,
    respond: &(dyn Fn(usize, &str) -> (u16, String, Duration) + Send + Sync),
    seen: &std::sync::Mutex<Vec<String>>,
    count: &AtomicUsize,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    assert!(line.starts_with("POST /reward "), "{line}");
    let mut length = 0;
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let header = line.trim().to_ascii_lowercase();
        if header.is_empty() {
            break;
        }
        if let Some(value) = header.strip_prefix("content-length:") {
            length = value.trim().parse().unwrap();
        }
        if header.starts_with("content-type:") {
            assert_eq!(header, "content-type: application/json");
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    let body = String::from_utf8(body).unwrap();
    let n = count.fetch_add(1, Ordering::SeqCst);
    let (status, reply, delay) = respond(n, &body);
    seen.lock().unwrap().push(body);
    std::thread::sleep(delay);
    let mut stream = stream;
    write!(
        stream,
        "HTTP/1.1 {status} Status\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{reply}",
        reply.len()
    )?;
    stream.flush()
}

/// One reward per completion: the number of its token ids.
fn id_counts(body: &str) -> String {
    let request: Value = serde_json::from_str(body).unwrap();
    let counts: Vec<usize> = request["completion_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|ids| ids.as_array().unwrap().len())
        .collect();
    json!({ "rewards": counts }).to_string()
}

#[test]
fn http_rewards_post_the_request_and_read_the_reply() {
    let server = serve(|_, body| (200, id_counts(body), Duration::ZERO));
    let rewards = set(&["accuracy", &server.url], Duration::from_secs(10), 0);
    let batch = Batch::new();
    let scores = rewards.score(&batch.completions(), None).unwrap();
    assert_eq!(
        scores.iter().map(|row| row[1]).collect::<Vec<_>>(),
        [3.0, 1.0, 2.0]
    );
    let bodies = server.bodies.lock().unwrap();
    assert_eq!(bodies.len(), 1, "one POST per batch");
    let request: Value = serde_json::from_str(&bodies[0]).unwrap();
    assert_eq!(request["question"], json!(["6+7?", "6+7?", "2*4?"]));
}

#[test]
fn http_server_errors_are_tried_again_and_client_errors_are_not() {
    let server = serve(|n, body| match n {
        0 => (503, "busy".into(), Duration::ZERO),
        _ => (200, id_counts(body), Duration::ZERO),
    });
    let rewards = set(&[&server.url], Duration::from_secs(10), 1);
    let batch = Batch::new();
    assert_eq!(
        rewards.score(&batch.completions(), None).unwrap(),
        [[3.0], [1.0], [2.0]]
    );
    assert_eq!(server.bodies.lock().unwrap().len(), 2);

    let server = serve(|_, _| (400, "{\"detail\": \"bad field\"}".into(), Duration::ZERO));
    let rewards = set(&[&server.url], Duration::from_secs(10), 3);
    let error = format!(
        "{:#}",
        rewards.score(&batch.completions(), None).unwrap_err()
    );
    assert!(
        error.contains("answered HTTP 400 Bad Request: {\"detail\": \"bad field\"}"),
        "{error}"
    );
    assert_eq!(server.bodies.lock().unwrap().len(), 1, "4xx is not retried");

    let server = serve(|_, _| (500, "boom".into(), Duration::ZERO));
    let rewards = set(&[&server.url], Duration::from_secs(10), 1);
    let error = format!(
        "{:#}",
        rewards.score(&batch.completions(), None).unwrap_err()
    );
    assert!(
        error.contains("HTTP 500") && error.contains("after 2 attempts"),
        "{error}"
    );
}

#[test]
fn http_timeouts_bad_replies_and_refused_connections_are_errors() {
    let batch = Batch::new();
    let slow = serve(|_, body| (200, id_counts(body), Duration::from_secs(3)));
    let rewards = set(&[&slow.url], Duration::from_millis(200), 0);
    let error = format!(
        "{:#}",
        rewards.score(&batch.completions(), None).unwrap_err()
    );
    assert!(error.contains("within 0.2 s (reward_timeout)"), "{error}");

    let short = serve(|_, _| (200, "[1.0]".into(), Duration::ZERO));
    let rewards = set(&[&short.url], Duration::from_secs(10), 0);
    let error = format!(
        "{:#}",
        rewards.score(&batch.completions(), None).unwrap_err()
    );
    assert!(
        error.contains("returned 1 values for 3 completions"),
        "{error}"
    );

    // A port nobody listens on (bound, then closed).
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/reward");
    let rewards = set(&[&url], Duration::from_secs(10), 0);
    let error = format!(
        "{:#}",
        rewards.score(&batch.completions(), None).unwrap_err()
    );
    assert!(error.contains(&format!("POST {url} failed")), "{error}");
}

#[test]
fn malformed_external_names_are_refused_at_start_up() {
    for (name, expected) in [
        ("cmd:  ", "names no command"),
        ("http://", "is not"),
        ("https:///path", "is not"),
    ] {
        let names = vec![name.to_string()];
        let error = RewardSet::new(&names, None, params(Duration::from_secs(1), 0))
            .err()
            .expect("malformed name");
        assert!(format!("{error:#}").contains(expected), "{name}: {error:#}");
        let error = Config::load(None, &[format!("reward_funcs=[{name:?}]")]).unwrap_err();
        assert!(error.to_string().contains("reward_funcs"), "{error}");
    }
    for (key, value) in [
        ("reward_timeout", "0"),
        ("reward_timeout", "1e9"),
        ("reward_retries", "101"),
    ] {
        let error = Config::load(None, &[format!("{key}={value}")]).unwrap_err();
        assert!(
            error.to_string().contains(&format!("`{key}` = ")),
            "{error}"
        );
    }
    let config = Config::load(
        None,
        &[r#"reward_funcs=["correctness","cmd:python3 r.py","http://127.0.0.1:8000/r"]"#.into()],
    )
    .unwrap();
    assert_eq!(config.reward_funcs.len(), 3);
}

// ---------------------------------------------------------------------------------------------
// Through the binary
// ---------------------------------------------------------------------------------------------

/// `grpo <args>` with each of `sets` as a `--set key=value` override.
fn grpo_with(args: &[&str], sets: &[String]) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_grpo"));
    command.env_remove("RUST_LOG").args(args);
    for set in sets {
        command.args(["--set", set]);
    }
    command
}

/// The overrides of a small `grpo train` run of the golden model on `data` into `out` (one
/// prompt and two completions of at most 4 tokens per step, no report), then `extra`.
fn small_train_run(data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    [
        format!("model_name_or_path={}", common::golden_dir().display()),
        format!("dataset_name={}", data.display()),
        format!("output_dir={}", out.display()),
        "per_device_train_batch_size=1".into(),
        "num_generations=2".into(),
        "max_completion_length=4".into(),
        "report_to=none".into(),
    ]
    .into_iter()
    .chain(extra.iter().map(|set| set.to_string()))
    .collect()
}

/// A reward of len(completion_ids) / 100 that also checks, at every batch, that the prompts,
/// the dataset columns and the trainer state arrived as TRL passes them.
const TRAIN_REWARD: &str = r#"
def ids_per_hundred(prompts, completions, completion_ids, trainer_state, **columns):
    questions, answers = columns["question_zh-cn"], columns["answer_only"]
    assert trainer_state.max_steps == 2 and trainer_state.global_step in (0, 1), trainer_state
    assert len(prompts) == len(completions) == len(completion_ids) == len(questions) == 4
    gold = {"What is 6 + 7?": "13", "小明有3个苹果，又买了5个，现在有多少个？": "8", "20个糖分给4个人，每人几个？": "5"}
    for prompt, question, answer in zip(prompts, questions, answers):
        assert prompt == [{"role": "user", "content": question}], prompt
        assert gold[question] == answer, (question, answer)
    return [len(ids) / 100 for ids in completion_ids]
"#;

#[test]
fn grpo_train_logs_the_metric_of_a_command_reward() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("train.parquet");
    let questions = [
        "What is 6 + 7?",
        "小明有3个苹果，又买了5个，现在有多少个？",
        "20个糖分给4个人，每人几个？",
    ];
    common::write_qa_parquet(&data, &questions, &["13", "8", "5"]);
    let module = write(dir.path(), "train_reward.py", TRAIN_REWARD);
    let name = adapter(&module, "ids_per_hundred");
    let out = dir.path().join("out");
    let sets = [
        format!("model_name_or_path={}", common::golden_dir().display()),
        format!("dataset_name={}", data.display()),
        format!("output_dir={}", out.display()),
        "per_device_train_batch_size=2".into(),
        "num_generations=2".into(),
        "max_completion_length=8".into(),
        "max_steps=2".into(),
        "logging_steps=1".into(),
        "report_to=none".into(),
        "system_prompt=\"\"".into(),
        format!("reward_funcs=[\"cosine\", {name:?}]"),
    ];
    let output = grpo_with(&["train"], &sets).output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for line in &lines {
        let mean = line[format!("rewards/{name}/mean")].as_f64().unwrap();
        let length = line["completions/mean_length"].as_f64().unwrap();
        assert!(
            (mean - length / 100.0).abs() < 1e-6,
            "{mean} vs mean length {length}: {line}"
        );
        assert!(line[format!("rewards/{name}/std")].is_number(), "{line}");
        assert!(line["rewards/cosine/mean"].is_number(), "{line}");
    }
}

#[test]
fn grpo_train_stops_naming_the_reward_and_step_with_the_configured_timeout_and_retries() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("train.parquet");
    common::write_qa_parquet(&data, &["What is 6 + 7?"], &["13"]);
    let out = dir.path().join("out");
    let sets = small_train_run(
        &data,
        &out,
        &[
            "max_steps=1",
            r#"reward_funcs=["cmd:sleep 60"]"#,
            "reward_timeout=0.2",
            "reward_retries=1",
        ],
    );
    let output = grpo_with(&["train"], &sets).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    for expected in [
        "step 1",
        "reward `cmd:sleep 60`",
        "no reply within 0.2 s (reward_timeout)",
        "after 2 attempts",
    ] {
        assert!(stderr.contains(expected), "{expected}: {stderr}");
    }
}

#[test]
fn grpo_score_sends_the_input_lines_to_an_external_reward() {
    let dir = tempfile::tempdir().unwrap();
    let module = write(
        dir.path(),
        "score_reward.py",
        r#"
def exact(prompts, completions, answer, level, **kwargs):
    assert kwargs["trainer_state"] is None
    return [None if lv is None else float(c[0]["content"] == str(a)) + lv / 4
            for c, a, lv in zip(completions, answer, level)]
"#,
    );
    let name = adapter(&module, "exact");
    let input = write(
        dir.path(),
        "input.jsonl",
        concat!(
            r#"{"completion": "13", "answer": 13, "level": 2, "prompt": "6+7?"}"#,
            "\n\n",
            r#"{"completion": "12", "answer": "13", "level": 1}"#,
            "\n",
            r#"{"completion": "<answer>8</answer>", "answer": "8", "level": null}"#,
            "\n",
        ),
    );
    let sets = [
        format!("reward_funcs=[\"correctness\", {name:?}]"),
        "reward_weights=[1.0, 2.0]".into(),
    ];
    let output = grpo_with(&["score", "--input", input.to_str().unwrap()], &sets)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(
        lines,
        [
            json!({"rewards": {"correctness": 2.0, &name: 1.5}, "reward": 5.0}),
            json!({"rewards": {"correctness": 0.0, &name: 0.25}, "reward": 0.5}),
            json!({"rewards": {"correctness": 2.0, &name: null}, "reward": 2.0}),
        ]
    );
}

#[test]
fn grpo_eval_averages_an_external_reward_over_the_completions_it_rewarded() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    // Ten questions: one batch of 8 and one of 2.
    let (questions, answers): (Vec<String>, Vec<String>) = (0..10)
        .map(|i| (format!("{i}+{i}等于几？"), format!("{}", 2 * i)))
        .unzip();
    common::write_qa_parquet(&data.join("test.parquet"), &questions, &answers);
    let module = write(
        dir.path(),
        "eval_reward.py",
        r#"
def even_lengths(completions, completion_ids, **columns):
    questions = columns["question_zh-cn"]
    return [None if int(q.split("+")[0]) % 2 else float(len(ids))
            for q, ids in zip(questions, completion_ids)]
"#,
    );
    let name = adapter(&module, "even_lengths");
    let out = dir.path().join("out");
    let sets = [
        format!("model_name_or_path={}", common::golden_dir().display()),
        format!("dataset_name={}", data.display()),
        format!("output_dir={}", out.display()),
        "max_completion_length=6".into(),
        format!("reward_funcs=[\"correctness\", {name:?}]"),
    ];
    let output = grpo_with(&["eval"], &sets).output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let samples: Vec<Value> = std::fs::read_to_string(out.join("eval/test-base.jsonl"))
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(samples.len(), 10);
    let mut even = Vec::new();
    for sample in &samples {
        let question = sample["question"].as_str().unwrap();
        let i: usize = question.split('+').next().unwrap().parse().unwrap();
        let value = &sample["rewards"][&name];
        if i % 2 == 1 {
            assert!(value.is_null(), "no reward for {question}: {sample}");
            assert_eq!(
                sample["reward"], sample["rewards"]["correctness"],
                "{sample}"
            );
        } else {
            assert_eq!(value.as_f64(), sample["length"].as_f64(), "{sample}");
            even.push(value.as_f64().unwrap());
        }
    }
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval/test-base.json")).unwrap())
            .unwrap();
    let mean = even.iter().sum::<f64>() / even.len() as f64;
    let reported = report["rewards"][&name].as_f64().unwrap();
    assert!((reported - mean).abs() < 1e-9, "{reported} vs {mean}");
}

#[test]
fn a_reward_failure_in_training_keeps_the_steps_done() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("train.parquet");
    common::write_qa_parquet(
        &data,
        &[
            "What is 6 + 7?",
            "一支笔2元，买4支要多少元？",
            "20个糖分给4个人，每人几个？",
        ],
        &["13", "8", "5"],
    );
    let train = |out: &Path, reward: &str, extra: &[&str]| {
        let reward_funcs = format!("reward_funcs=[{reward:?}]");
        let settings = [
            "max_steps=3",
            "logging_steps=1",
            "learning_rate=0.01",
            "reward_retries=0",
            &reward_funcs,
        ];
        let sets = small_train_run(&data, out, &[&settings[..], extra].concat());
        grpo_with(&["train"], &sets).output().unwrap()
    };
    let good = "cmd:while read -r r; do echo '[0.5, 1]'; done";
    let uninterrupted = dir.path().join("uninterrupted");
    assert!(train(&uninterrupted, good, &[]).status.success());

    // Answers the first batch, then one value too few.
    let out = dir.path().join("out");
    let output = train(
        &out,
        "cmd:n=0; while read -r r; do n=$((n+1)); \
         if [ $n -eq 1 ]; then echo '[0.5, 1]'; else echo '[1]'; fi; done",
        &[],
    );
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    for expected in [
        "stopped after step 1, saved in",
        "checkpoint-1",
        "step 2: sampling the rollout",
        "returned 1 values for 2 completions",
    ] {
        assert!(stderr.contains(expected), "{expected}: {stderr}");
    }
    assert!(out.join("checkpoint-1/trainer_state.json").is_file());

    // Resumed with a working reward, the run goes on as if it had never stopped (the
    // checkpoint holds the data position from before the failed step).
    let output = train(&out, good, &["resume_from_checkpoint=true"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // (Step 1's per-reward keys name the failing command.)
    let without_reward_names = |mut lines: Vec<Value>| {
        for line in &mut lines {
            let fields = line.as_object_mut().unwrap();
            fields.retain(|key, _| !key.starts_with("rewards/"));
        }
        lines
    };
    assert_eq!(
        without_reward_names(common::machine_independent_metrics(&out)),
        without_reward_names(common::machine_independent_metrics(&uninterrupted))
    );
}

#[test]
fn grpo_score_posts_to_a_loopback_http_reward_past_any_proxy() {
    let server = serve(|_, body| (200, id_counts(body), Duration::ZERO));
    let dir = tempfile::tempdir().unwrap();
    let input = write(
        dir.path(),
        "input.jsonl",
        concat!(
            r#"{"completion": "a", "answer": "1", "completion_ids": [1, 2]}"#,
            "\n",
            r#"{"completion": "b", "answer": "2", "completion_ids": [3]}"#,
            "\n",
        ),
    );
    // A proxy that does not exist: loopback endpoints must not go through it.
    let sets = [format!("reward_funcs=[{:?}]", server.url)];
    let output = grpo_with(&["score", "--input", input.to_str().unwrap()], &sets)
        .env("HTTP_PROXY", "http://127.0.0.1:9")
        .env("ALL_PROXY", "http://127.0.0.1:9")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines[0]["reward"], json!(2.0));
    assert_eq!(lines[1]["reward"], json!(1.0));
    let bodies = server.bodies.lock().unwrap();
    assert_eq!(bodies.len(), 1, "both lines in one request");
    let request: Value = serde_json::from_str(&bodies[0]).unwrap();
    assert_eq!(request["answer"], json!(["1", "2"]));
    assert_eq!(request["prompts"], json!([[], []]));
}
