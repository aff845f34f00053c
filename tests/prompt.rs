//! Chat-template prompts against the golden transformers outputs (`chat`, `roundtrip`, the GRPO
//! prompts) and the tokenizer-config variants transformers accepts.

mod common;

use std::fs;
use std::path::Path;
use std::sync::Arc;

use grpo::prompt::{left_pad, ChatTokenizer, Message, Prompter};
use serde_json::{json, Value};

fn golden_tokenizer() -> ChatTokenizer {
    ChatTokenizer::from_dir(&common::golden_dir()).expect("golden tokenizer loads")
}

fn messages(value: &Value) -> Vec<Message> {
    serde_json::from_value(value.clone()).expect("messages are [{role, content}]")
}

fn u32s(value: &Value) -> Vec<u32> {
    serde_json::from_value(value.clone()).expect("a list of token ids")
}

fn string(value: &Value) -> String {
    value.as_str().expect("a string").to_string()
}

/// The golden chat template source, wherever the golden folder keeps it.
fn golden_template() -> String {
    let dir = common::golden_dir();
    let sidecar = dir.join("chat_template.jinja");
    if sidecar.is_file() {
        return fs::read_to_string(sidecar).unwrap();
    }
    let config: Value =
        serde_json::from_str(&fs::read_to_string(dir.join("tokenizer_config.json")).unwrap())
            .unwrap();
    string(&config["chat_template"])
}

/// A folder with the golden `tokenizer.json` and the given `tokenizer_config.json`.
fn folder_with_config(config: &Value) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fs::copy(
        common::golden_dir().join("tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    write_json(&dir.path().join("tokenizer_config.json"), config);
    dir
}

fn write_json(path: &Path, value: &Value) {
    fs::write(path, serde_json::to_string_pretty(value).unwrap()).unwrap();
}

fn meta_token(name: &str) -> Value {
    common::cases()["meta"]["tokenizer"][name].clone()
}

/// The first golden chat case made of exactly a system and a user message.
fn system_user_case() -> Value {
    let cases = common::cases();
    cases["chat"]
        .as_array()
        .unwrap()
        .iter()
        .find(|case| {
            let roles: Vec<&str> = case["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["role"].as_str().unwrap())
                .collect();
            roles == ["system", "user"]
        })
        .expect("a golden chat case with [system, user]")
        .clone()
}

#[test]
fn golden_chat_cases_render_and_encode_exactly() {
    let tokenizer = golden_tokenizer();
    let cases = common::cases();
    let chat = cases["chat"].as_array().unwrap();
    assert!(!chat.is_empty());
    for case in chat {
        let name = &case["name"];
        let text = tokenizer
            .render(&messages(&case["messages"]), true)
            .unwrap();
        assert_eq!(text, string(&case["text"]), "text of chat case {name}");
        let ids = tokenizer.encode(&text).unwrap();
        assert_eq!(ids, u32s(&case["ids"]), "ids of chat case {name}");
        assert_eq!(
            ids,
            u32s(&case["ids_via_apply_chat_template"]),
            "apply_chat_template ids of chat case {name}"
        );
    }
}

#[test]
fn generation_prompt_is_only_added_when_asked() {
    let tokenizer = golden_tokenizer();
    let case = system_user_case();
    let with = tokenizer
        .render(&messages(&case["messages"]), true)
        .unwrap();
    let without = tokenizer
        .render(&messages(&case["messages"]), false)
        .unwrap();
    assert!(with.len() > without.len());
    assert!(
        with.starts_with(&without),
        "{without:?} is not a prefix of {with:?}"
    );
}

#[test]
fn golden_roundtrip_cases_encode_and_decode_exactly() {
    let tokenizer = golden_tokenizer();
    let cases = common::cases();
    let roundtrip = cases["roundtrip"].as_array().unwrap();
    assert!(!roundtrip.is_empty());
    for case in roundtrip {
        let text = string(&case["text"]);
        let ids = tokenizer.encode(&text).unwrap();
        assert_eq!(ids, u32s(&case["ids"]), "ids of {text:?}");
        let tokens: Vec<String> = ids
            .iter()
            .map(|&id| tokenizer.id_to_token(id).expect("id in vocabulary"))
            .collect();
        let golden_tokens: Vec<String> = serde_json::from_value(case["tokens"].clone()).unwrap();
        assert_eq!(tokens, golden_tokens, "tokens of {text:?}");
        assert_eq!(
            tokenizer.decode(&ids, true).unwrap(),
            string(&case["decoded_skip_special"]),
            "decode(skip_special_tokens=True) of {text:?}"
        );
        assert_eq!(
            tokenizer.decode(&ids, false).unwrap(),
            string(&case["decoded_keep_special"]),
            "decode(skip_special_tokens=False) of {text:?}"
        );
    }
}

#[test]
fn special_token_ids_match_the_golden_tokenizer() {
    let tokenizer = golden_tokenizer();
    let id = |value: Value| value.as_u64().map(|id| id as u32);
    assert_eq!(tokenizer.eos_token_id(), id(meta_token("eos_token_id")));
    assert_eq!(tokenizer.pad_token_id(), id(meta_token("pad_token_id")));
    let special_ids = meta_token("special_token_ids");
    for (token, golden_id) in special_ids.as_object().unwrap() {
        assert_eq!(
            tokenizer.token_to_id(token),
            id(golden_id.clone()),
            "{token}"
        );
    }
}

#[test]
fn left_pad_reproduces_the_golden_forward_batch() {
    let tokenizer = golden_tokenizer();
    let cases = common::cases();
    let forward = &cases["forward"];
    let rows: Vec<Vec<u32>> = forward["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|text| tokenizer.encode(text.as_str().unwrap()).unwrap())
        .collect();
    let lengths: Vec<usize> = rows.iter().map(Vec::len).collect();
    assert_eq!(
        lengths,
        serde_json::from_value::<Vec<usize>>(forward["lengths"].clone()).unwrap()
    );
    let pad_id = tokenizer.pad_token_id().expect("golden pad token");
    let padded = left_pad(&rows, pad_id);
    let golden_ids: Vec<Vec<u32>> = serde_json::from_value(forward["input_ids"].clone()).unwrap();
    let golden_mask: Vec<Vec<u32>> =
        serde_json::from_value(forward["attention_mask"].clone()).unwrap();
    assert_eq!(padded.ids, golden_ids);
    assert_eq!(padded.mask, golden_mask);
    assert_eq!(padded.width(), golden_ids[0].len());
}

#[test]
fn left_pad_of_nothing_is_empty() {
    let padded = left_pad::<Vec<u32>>(&[], 0);
    assert!(padded.ids.is_empty() && padded.mask.is_empty());
    assert_eq!(padded.width(), 0);
}

#[test]
fn prompter_reproduces_the_golden_grpo_prompt_batch() {
    let cases = common::cases();
    let grpo = &cases["grpo"];
    let tensors = common::tensors();
    let tokenizer = Arc::new(golden_tokenizer());
    let generations = grpo["num_generations"].as_u64().unwrap() as usize;
    let mut rows = Vec::new();
    for conversation in grpo["prompt_messages"].as_array().unwrap() {
        let conversation = messages(conversation);
        let [system, user] = conversation.as_slice() else {
            panic!("golden GRPO prompts are [system, user], got {conversation:?}");
        };
        assert_eq!(
            (system.role.as_str(), user.role.as_str()),
            ("system", "user")
        );
        let prompter =
            Prompter::new(tokenizer.clone(), Some(system.content.clone()), usize::MAX).unwrap();
        assert_eq!(prompter.messages(&user.content), conversation);
        let ids = prompter.prompt_ids(&user.content).unwrap();
        assert_eq!(prompter.truncated_count(), 0);
        rows.extend(std::iter::repeat_n(ids, generations));
    }
    let pad_id = grpo["pad_token_id"].as_u64().unwrap() as u32;
    let padded = left_pad(&rows, pad_id);
    let as_u32 = |key: &str| -> Vec<Vec<u32>> {
        let rows = tensors[key].to_vec2::<i64>().unwrap();
        rows.into_iter()
            .map(|row| row.into_iter().map(|v| v as u32).collect())
            .collect()
    };
    assert_eq!(padded.ids, as_u32("grpo.prompt_ids"));
    assert_eq!(padded.mask, as_u32("grpo.prompt_mask"));
    assert_eq!(padded.width() as u64, grpo["P"].as_u64().unwrap());
}

#[test]
fn prompts_are_left_truncated_keeping_the_last_tokens_and_counted() {
    let case = system_user_case();
    let conversation = messages(&case["messages"]);
    let (system, question) = (&conversation[0].content, &conversation[1].content);
    let full = u32s(&case["ids"]);
    let keep = full.len() - 3;
    let tokenizer = Arc::new(golden_tokenizer());
    let prompter = Prompter::new(tokenizer.clone(), Some(system.clone()), keep).unwrap();
    assert_eq!(prompter.prompt_ids(question).unwrap(), full[3..].to_vec());
    assert_eq!(prompter.truncated_count(), 1);
    assert_eq!(prompter.prompt_ids(question).unwrap(), full[3..].to_vec());
    assert_eq!(prompter.truncated_count(), 2);

    let exact = Prompter::new(tokenizer.clone(), Some(system.clone()), full.len()).unwrap();
    assert_eq!(exact.prompt_ids(question).unwrap(), full);
    assert_eq!(exact.truncated_count(), 0);

    let error = Prompter::new(tokenizer, None, 0)
        .err()
        .expect("0 is rejected");
    assert!(error.to_string().contains("max_prompt_length"), "{error}");
}

#[test]
fn prompter_without_system_prompt_uses_the_template_default() {
    let cases = common::cases();
    let case = cases["chat"]
        .as_array()
        .unwrap()
        .iter()
        .find(|case| {
            let conversation = messages(&case["messages"]);
            conversation.len() == 1 && conversation[0].role == "user"
        })
        .expect("a golden chat case with a lone user message")
        .clone();
    let question = messages(&case["messages"])[0].content.clone();
    let prompter = Prompter::new(Arc::new(golden_tokenizer()), None, usize::MAX).unwrap();
    assert_eq!(prompter.prompt_ids(&question).unwrap(), u32s(&case["ids"]));
}

#[test]
fn added_token_dicts_and_template_lists_are_understood() {
    let eos = meta_token("eos_token");
    let pad = meta_token("pad_token");
    let config = json!({
        "eos_token": {"content": eos, "lstrip": false, "normalized": false, "rstrip": false,
                      "single_word": false, "special": true},
        "pad_token": {"content": pad, "special": true},
        "bos_token": null,
        "chat_template": [
            {"name": "tool_use", "template": "{{ raise_exception('not this one') }}"},
            {"name": "default", "template": golden_template()},
        ],
    });
    let dir = folder_with_config(&config);
    let tokenizer = ChatTokenizer::from_dir(dir.path()).unwrap();
    let case = system_user_case();
    assert_eq!(
        tokenizer
            .render(&messages(&case["messages"]), true)
            .unwrap(),
        string(&case["text"])
    );
    let id = |value: Value| value.as_u64().map(|id| id as u32);
    assert_eq!(tokenizer.eos_token_id(), id(meta_token("eos_token_id")));
    assert_eq!(tokenizer.pad_token_id(), id(meta_token("pad_token_id")));
}

#[test]
fn chat_template_jinja_file_wins_over_the_config() {
    let config = json!({
        "eos_token": meta_token("eos_token"),
        "chat_template": "{{ raise_exception('the config template must not be used') }}",
    });
    let dir = folder_with_config(&config);
    fs::write(dir.path().join("chat_template.jinja"), golden_template()).unwrap();
    let tokenizer = ChatTokenizer::from_dir(dir.path()).unwrap();
    let case = system_user_case();
    assert_eq!(
        tokenizer
            .render(&messages(&case["messages"]), true)
            .unwrap(),
        string(&case["text"])
    );
    assert_eq!(tokenizer.pad_token_id(), None);
}

#[test]
fn templates_see_special_tokens_trim_blocks_and_hf_tojson() {
    // Expected output computed with Python jinja2 3.1.6 set up as transformers does
    // (ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True), HF's tojson),
    // with eos_token="<E>" and no bos_token in special_tokens_map.
    let template = "{% for m in messages %}\n    {% if m.role == 'user' %}\n<{{ m.role }}>\
                    {{ m.content | trim }}\n    {% else %}\n[{{ m | tojson }}]\n    {% endif %}\n\
                    {% endfor %}\n{{ eos_token }}|{{ bos_token }}|\n";
    let eos = string(&meta_token("eos_token"));
    let config = json!({"eos_token": eos, "bos_token": null, "chat_template": template});
    let dir = folder_with_config(&config);
    let tokenizer = ChatTokenizer::from_dir(dir.path()).unwrap();
    let conversation = [Message::system("a \"b\" é"), Message::user("  hi  ")];
    assert_eq!(
        tokenizer.render(&conversation, true).unwrap(),
        format!("[{{\"role\": \"system\", \"content\": \"a \\\"b\\\" é\"}}]\n<user>hi\n{eos}||")
    );
}

#[test]
fn raise_exception_fails_with_the_template_message() {
    let template = "{% if messages[0].role != 'user' %}\
                    {{ raise_exception('Conversations must start with a user message') }}\
                    {% endif %}{{ messages[0].content }}";
    let dir = folder_with_config(&json!({"chat_template": template}));
    let tokenizer = ChatTokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(
        tokenizer.render(&[Message::user("hi")], true).unwrap(),
        "hi"
    );
    let error = tokenizer.render(&[Message::system("x")], true).unwrap_err();
    assert!(
        format!("{error:#}").contains("Conversations must start with a user message"),
        "{error:#}"
    );
}

#[test]
fn missing_files_and_templates_are_named_in_errors() {
    let dir = folder_with_config(&json!({"eos_token": meta_token("eos_token")}));
    let error = ChatTokenizer::from_dir(dir.path())
        .err()
        .expect("no template");
    let message = format!("{error:#}");
    assert!(message.contains("chat_template.jinja"), "{message}");
    assert!(message.contains("`chat_template`"), "{message}");

    let dir = folder_with_config(&json!({"chat_template": [{"name": "rag", "template": "x"}]}));
    let message = format!("{:#}", ChatTokenizer::from_dir(dir.path()).err().unwrap());
    assert!(
        message.contains("\"default\"") && message.contains("rag"),
        "{message}"
    );

    let dir = folder_with_config(&json!({"chat_template": "x", "eos_token": "<|no such token|>"}));
    let message = format!("{:#}", ChatTokenizer::from_dir(dir.path()).err().unwrap());
    assert!(
        message.contains("eos_token") && message.contains("<|no such token|>"),
        "{message}"
    );

    let dir = folder_with_config(&json!({"chat_template": "{% if %}"}));
    let message = format!("{:#}", ChatTokenizer::from_dir(dir.path()).err().unwrap());
    assert!(message.contains("not valid jinja"), "{message}");

    let dir = tempfile::tempdir().unwrap();
    let message = format!("{:#}", ChatTokenizer::from_dir(dir.path()).err().unwrap());
    assert!(message.contains("tokenizer.json"), "{message}");

    fs::copy(
        common::golden_dir().join("tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    let message = format!("{:#}", ChatTokenizer::from_dir(dir.path()).err().unwrap());
    assert!(message.contains("tokenizer_config.json"), "{message}");
}

#[test]
fn tokenizer_and_prompter_can_be_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<ChatTokenizer>();
    assert_send_sync::<Prompter>();
}

#[test]
fn chat_template_kwargs_are_template_variables_that_override_special_tokens() {
    let eos = string(&meta_token("eos_token"));
    let config = json!({
        "eos_token": eos,
        "chat_template": "{{ eos_token }}|{{ depth }}|{{ flags | tojson }}|{{ messages[0].content }}",
    });
    let dir = folder_with_config(&config);
    let tokenizer = Arc::new(ChatTokenizer::from_dir(dir.path()).unwrap());
    let question = [Message::user("q")];
    let kwargs = |value: Value| value.as_object().unwrap().clone();
    // apply_chat_template(..., depth=2, flags={"a": [True, None]}) in transformers.
    let given = kwargs(json!({"depth": 2, "flags": {"a": [true, null]}}));
    assert_eq!(
        tokenizer
            .render_with_kwargs(&question, true, &given)
            .unwrap(),
        format!("{eos}|2|{{\"a\": [true, null]}}|q")
    );
    // {**special_tokens_map, **kwargs}: a kwarg wins over the special token of its name.
    let overriding = kwargs(json!({"eos_token": "E", "depth": 1, "flags": []}));
    assert_eq!(
        tokenizer
            .render_with_kwargs(&question, true, &overriding)
            .unwrap(),
        "E|1|[]|q"
    );
    // The prompter passes them to every prompt.
    let prompter = Prompter::new(tokenizer.clone(), None, usize::MAX)
        .unwrap()
        .with_chat_template_kwargs(given.clone())
        .unwrap();
    let text = tokenizer
        .render_with_kwargs(&question, true, &given)
        .unwrap();
    assert_eq!(
        prompter.prompt_ids("q").unwrap(),
        tokenizer.encode(&text).unwrap()
    );

    for reserved in grpo::prompt::RESERVED_TEMPLATE_VARIABLES {
        let bad = kwargs(json!({ reserved: 1 }));
        let error = tokenizer
            .render_with_kwargs(&question, true, &bad)
            .unwrap_err();
        assert!(format!("{error:#}").contains(reserved), "{error:#}");
        let error = Prompter::new(tokenizer.clone(), None, usize::MAX)
            .unwrap()
            .with_chat_template_kwargs(bad)
            .err()
            .expect("a reserved name is refused");
        assert!(format!("{error:#}").contains(reserved), "{error:#}");
    }
}

/// Qwen3's template on conversations a `[system, user]` prompt does not exercise (assistant
/// turns holding `<think>` blocks, tool turns found by its reversed loop and namespace, a late
/// system message, `enable_thinking`), against transformers' renderings
/// (`tests/fixtures/chat_templates/make_qwen3_chat.py`, with the tokenizer of the Qwen3 fixture).
#[test]
fn qwen3_template_renders_every_turn_kind_like_transformers() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let tokenizer = ChatTokenizer::from_dir(&root.join("golden/qwen3")).unwrap();
    let text = fs::read_to_string(root.join("chat_templates/qwen3_chat.json")).unwrap();
    let fixture: Value = serde_json::from_str(&text).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert!(!cases.is_empty());
    for case in cases {
        let name = format!("{} {}", case["name"], case["kwargs"]);
        let kwargs = case["kwargs"].as_object().unwrap();
        let add_generation_prompt = case["add_generation_prompt"].as_bool().unwrap();
        let rendered = tokenizer
            .render_with_kwargs(&messages(&case["messages"]), add_generation_prompt, kwargs)
            .unwrap();
        assert_eq!(rendered, string(&case["text"]), "text of {name}");
        assert_eq!(
            tokenizer.encode(&rendered).unwrap(),
            u32s(&case["ids"]),
            "ids of {name}"
        );
    }
}
