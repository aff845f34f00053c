//! `ChatTokenizer`: a model folder's `tokenizer.json` plus the chat template and special tokens
//! of its `tokenizer_config.json` (or `chat_template.jinja`), read as transformers reads them.

use std::fs;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use minijinja::value::Value;
use serde_json::{Map, Value as Json};
use tokenizers::Tokenizer;

use super::template::ChatTemplate;
use super::Message;

/// The special-token names transformers puts into the template's scope (`special_tokens_map`).
const SPECIAL_TOKEN_NAMES: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// A tokenizer that can render conversations with the model's own chat template.
pub struct ChatTokenizer {
    tokenizer: Tokenizer,
    template: ChatTemplate,
    eos_token_id: Option<u32>,
    pad_token_id: Option<u32>,
}

impl ChatTokenizer {
    /// Loads `tokenizer.json` and `tokenizer_config.json` (and `chat_template.jinja` when present,
    /// which wins over the config's `chat_template`, as in transformers ≥ 4.47) from `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&tokenizer_path).map_err(|e| {
            anyhow!(
                "cannot load {}: {e} (expected a Hugging Face `tokenizers` JSON file)",
                tokenizer_path.display()
            )
        })?;

        let config_path = dir.join("tokenizer_config.json");
        let config_text = fs::read_to_string(&config_path).with_context(|| {
            format!(
                "cannot read {} (expected the tokenizer config next to tokenizer.json)",
                config_path.display()
            )
        })?;
        let config: Json = serde_json::from_str(&config_text)
            .with_context(|| format!("{} is not valid JSON", config_path.display()))?;
        let config_origin = config_path.display().to_string();

        let mut special_tokens = Vec::new();
        for name in SPECIAL_TOKEN_NAMES {
            if let Some(token) = special_token(&config, name, &config_origin)? {
                special_tokens.push((name.to_string(), token));
            }
        }
        let token_id = |name: &str| -> Result<Option<u32>> {
            let Some((_, token)) = special_tokens.iter().find(|(key, _)| key == name) else {
                return Ok(None);
            };
            let id = tokenizer.token_to_id(token).with_context(|| {
                format!(
                    "{name} {token:?} in {config_origin} is not a token of {}; \
                     fix the config or use the matching tokenizer.json",
                    tokenizer_path.display()
                )
            })?;
            Ok(Some(id))
        };
        let eos_token_id = token_id("eos_token")?;
        let pad_token_id = token_id("pad_token")?;
        let mut template_variables: Vec<(String, Value)> = special_tokens
            .into_iter()
            .map(|(name, token)| (name, Value::from(token)))
            .collect();
        if let Some(additional) = config.get("additional_special_tokens") {
            template_variables.push((
                "additional_special_tokens".to_string(),
                additional_special_tokens(additional, &config_origin)?,
            ));
        }

        let (source, origin) = chat_template_source(dir, &config, &config_origin)?;
        let template = ChatTemplate::compile(source, &origin, template_variables)?;
        Ok(Self {
            tokenizer,
            template,
            eos_token_id,
            pad_token_id,
        })
    }

    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_with_kwargs(messages, add_generation_prompt, &Map::new())
    }

    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=..., **kwargs)`:
    /// `kwargs` become template variables (e.g. `{"enable_thinking": false}` for Qwen3).
    pub fn render_with_kwargs(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        kwargs: &Map<String, Json>,
    ) -> Result<String> {
        let messages: Value = messages
            .iter()
            .map(|message| {
                Value::from_pairs([
                    ("role", message.role.as_str()),
                    ("content", message.content.as_str()),
                ])
            })
            .collect();
        self.template
            .render(messages, add_generation_prompt, kwargs)
    }

    /// `tokenizer(text, add_special_tokens=False).input_ids`: special-token strings inside `text`
    /// are matched as their added tokens, nothing is prepended or appended.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| anyhow!("cannot tokenise {:?}: {e}", preview(text)))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// `tokenizer.decode(ids, skip_special_tokens=...)`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| anyhow!("cannot decode {} token ids: {e}", ids.len()))
    }

    /// The token string of `id` (`convert_ids_to_tokens`), `None` outside the vocabulary.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.tokenizer.id_to_token(id)
    }

    /// The id of a token string (vocabulary or added token).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// The id of the config's `eos_token`.
    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token_id
    }

    /// The id of the config's `pad_token` (TRL falls back to the EOS token when it is unset).
    pub fn pad_token_id(&self) -> Option<u32> {
        self.pad_token_id
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
}

/// The template source and a description of where it came from.
fn chat_template_source(
    dir: &Path,
    config: &Json,
    config_origin: &str,
) -> Result<(String, String)> {
    let jinja_path = dir.join("chat_template.jinja");
    if jinja_path.is_file() {
        let source = fs::read_to_string(&jinja_path)
            .with_context(|| format!("cannot read {}", jinja_path.display()))?;
        return Ok((source, jinja_path.display().to_string()));
    }
    let origin = format!("{config_origin} (key `chat_template`)");
    match config.get("chat_template") {
        Some(Json::String(source)) => Ok((source.clone(), origin)),
        Some(Json::Array(templates)) => {
            let names: Vec<&str> = templates
                .iter()
                .filter_map(named_template)
                .map(|(n, _)| n)
                .collect();
            templates
                .iter()
                .filter_map(named_template)
                .find(|(name, _)| *name == "default")
                .map(|(_, source)| {
                    (
                        source.to_string(),
                        format!("{origin}, template \"default\""),
                    )
                })
                .with_context(|| {
                    format!(
                        "{origin} lists chat templates {names:?} but none named \"default\"; \
                         add a {{\"name\": \"default\", \"template\": ...}} entry"
                    )
                })
        }
        None | Some(Json::Null) => bail!(
            "no chat template: neither {} exists nor does {config_origin} have a `chat_template` \
             key; use an instruct/chat model's tokenizer or add a jinja chat template",
            jinja_path.display()
        ),
        Some(other) => bail!(
            "{origin} must be a string or a list of {{\"name\", \"template\"}} objects, got {other}"
        ),
    }
}

/// `(name, template)` of one entry of a `chat_template` list.
fn named_template(entry: &Json) -> Option<(&str, &str)> {
    let name = entry.get("name").and_then(Json::as_str)?;
    let source = entry.get("template").and_then(Json::as_str)?;
    Some((name, source))
}

/// A special token of the config: a string, null / missing, or an AddedToken dict.
fn special_token(config: &Json, name: &str, config_origin: &str) -> Result<Option<String>> {
    match config.get(name) {
        None | Some(Json::Null) => Ok(None),
        Some(token) => token_content(token)
            .map(|content| Some(content.to_string()))
            .with_context(|| {
                format!(
                    "`{name}` in {config_origin} must be a string, null or {{\"content\": ...}}, \
                     got {token}"
                )
            }),
    }
}

/// `additional_special_tokens` as the list of token strings transformers passes to templates.
fn additional_special_tokens(tokens: &Json, config_origin: &str) -> Result<Value> {
    let invalid = || {
        format!(
            "`additional_special_tokens` in {config_origin} must be a list of strings or \
             {{\"content\": ...}} objects, got {tokens}"
        )
    };
    let list = tokens.as_array().with_context(invalid)?;
    list.iter()
        .map(|token| token_content(token).map(Value::from).with_context(invalid))
        .collect()
}

/// The text of a token given as a string or as an AddedToken dict.
fn token_content(token: &Json) -> Option<&str> {
    match token {
        Json::String(content) => Some(content),
        Json::Object(fields) => fields.get("content").and_then(Json::as_str),
        _ => None,
    }
}

/// The first characters of a long text, for error messages.
fn preview(text: &str) -> String {
    const LIMIT: usize = 80;
    match text.char_indices().nth(LIMIT) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_string(),
    }
}
