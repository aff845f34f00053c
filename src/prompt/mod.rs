//! Prompts: a system prompt and a user question rendered with the tokenizer's own chat template
//! (with TRL's `chat_template_kwargs` as extra template variables), tokenised without extra
//! special tokens, left-truncated to `max_prompt_length` (keeping the
//! last tokens, as TRL does) and left-padded into batches.
//!
//! [`ChatTokenizer`] reproduces `tokenizer.apply_chat_template(..., add_generation_prompt=True)`
//! and `tokenizer(text, add_special_tokens=False)` of transformers exactly; [`Prompter`] turns
//! dataset questions into prompt ids; [`left_pad`] builds the padded id and mask rows that the
//! sampler and the trainer feed to the model.

mod chat_tokenizer;
mod template;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use chat_tokenizer::ChatTokenizer;
pub use template::{
    check_template_kwargs, reserved_template_variable, RESERVED_TEMPLATE_VARIABLES,
};

/// One chat message, as in `[{"role": "user", "content": "..."}]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }

    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
}

/// The conversation of one question: the system prompt (if any), then the question as the
/// user's message.
pub fn conversation(system_prompt: Option<&str>, question: &str) -> Vec<Message> {
    system_prompt
        .into_iter()
        .map(Message::system)
        .chain([Message::user(question)])
        .collect()
}

/// Builds the prompt ids of dataset questions: `[system?, user]` rendered with the generation
/// prompt, encoded, and left-truncated to `max_prompt_length` tokens.
pub struct Prompter {
    tokenizer: Arc<ChatTokenizer>,
    system_prompt: Option<String>,
    max_prompt_length: usize,
    /// Extra template variables (see [`Prompter::with_chat_template_kwargs`]).
    chat_template_kwargs: Map<String, Value>,
    truncated: AtomicUsize,
}

impl Prompter {
    pub fn new(
        tokenizer: Arc<ChatTokenizer>,
        system_prompt: Option<String>,
        max_prompt_length: usize,
    ) -> Result<Self> {
        ensure!(
            max_prompt_length > 0,
            "max_prompt_length must be at least 1 token (it is 0)"
        );
        Ok(Self {
            tokenizer,
            system_prompt,
            max_prompt_length,
            chat_template_kwargs: Map::new(),
            truncated: AtomicUsize::new(0),
        })
    }

    /// This prompter passing `kwargs` to the chat template as extra variables (TRL's
    /// `chat_template_kwargs`: `apply_chat_template(..., **kwargs)`). A name that
    /// `apply_chat_template` sets itself ([`RESERVED_TEMPLATE_VARIABLES`]) is an error.
    pub fn with_chat_template_kwargs(self, kwargs: Map<String, Value>) -> Result<Self> {
        check_template_kwargs(kwargs.keys())?;
        Ok(Self {
            chat_template_kwargs: kwargs,
            ..self
        })
    }

    /// The conversation of one question: the system prompt (if any), then the question.
    pub fn messages(&self, question: &str) -> Vec<Message> {
        conversation(self.system_prompt.as_deref(), question)
    }

    /// The prompt ids of `question`, keeping the LAST `max_prompt_length` tokens when longer
    /// (TRL's `prompt_ids[:, -max_prompt_length:]`). The first truncation logs a warning.
    pub fn prompt_ids(&self, question: &str) -> Result<Vec<u32>> {
        let text = self.tokenizer.render_with_kwargs(
            &self.messages(question),
            true,
            &self.chat_template_kwargs,
        )?;
        let mut ids = self.tokenizer.encode(&text)?;
        if ids.len() > self.max_prompt_length {
            if self.truncated.fetch_add(1, Ordering::Relaxed) == 0 {
                tracing::warn!(
                    "a prompt has {} tokens, more than max_prompt_length = {}: its first tokens \
                     are dropped (later truncations are only counted); raise max_prompt_length \
                     to keep whole prompts",
                    ids.len(),
                    self.max_prompt_length
                );
            }
            ids.drain(..ids.len() - self.max_prompt_length);
        }
        Ok(ids)
    }

    /// How many prompts have been truncated so far.
    pub fn truncated_count(&self) -> usize {
        self.truncated.load(Ordering::Relaxed)
    }

    pub fn max_prompt_length(&self) -> usize {
        self.max_prompt_length
    }

    pub fn tokenizer(&self) -> &Arc<ChatTokenizer> {
        &self.tokenizer
    }
}

/// Rows of token ids left-padded to a common width, with their attention masks.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LeftPadded {
    /// `[rows][width]`: pad ids first, then the row's tokens.
    pub ids: Vec<Vec<u32>>,
    /// `[rows][width]`: 0 on padding, 1 on real tokens.
    pub mask: Vec<Vec<u32>>,
}

impl LeftPadded {
    /// The common row length (the longest input row).
    pub fn width(&self) -> usize {
        self.ids.first().map_or(0, Vec::len)
    }
}

/// Left-pads `rows` with `pad_id` to the longest row, as TRL pads prompts.
pub fn left_pad<R: AsRef<[u32]>>(rows: &[R], pad_id: u32) -> LeftPadded {
    let width = rows.iter().map(|row| row.as_ref().len()).max().unwrap_or(0);
    let (ids, mask) = rows
        .iter()
        .map(|row| {
            let row = row.as_ref();
            let padding = width - row.len();
            let ids = std::iter::repeat_n(pad_id, padding).chain(row.iter().copied());
            let mask = std::iter::repeat_n(0, padding).chain(std::iter::repeat_n(1, row.len()));
            (ids.collect(), mask.collect())
        })
        .unzip();
    LeftPadded { ids, mask }
}
