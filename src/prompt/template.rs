//! The chat-template engine: a minijinja environment set up the way transformers sets up its
//! jinja2 one (`_compile_jinja_template`), so that templates render byte for byte as in Python.
//!
//! transformers uses `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)` with
//! the `loopcontrols` extension, overrides `tojson` (plain `json.dumps`, no HTML escaping) and adds
//! the globals `raise_exception(msg)` and `strftime_now(format)`. Python string methods
//! (`.strip()`, `.startswith()`, `.split()`, …) come from minijinja-contrib's `pycompat`
//! callback. Extra template variables (TRL's `chat_template_kwargs`, e.g. Qwen3's
//! `enable_thinking`) are passed as `apply_chat_template(..., **kwargs)` passes them.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, Serde, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind};

/// The name the template is registered under (no file extension: no auto-escaping).
const TEMPLATE_NAME: &str = "chat_template";

/// Names that `apply_chat_template` takes as its own arguments (or sets as template variables
/// itself), so that they cannot be extra template variables: Python refuses them as duplicate
/// keyword arguments or consumes them before the template sees them.
pub const RESERVED_TEMPLATE_VARIABLES: [&str; 15] = [
    "messages",
    "conversation",
    "tools",
    "documents",
    "chat_template",
    "add_generation_prompt",
    "continue_final_message",
    "tokenize",
    "padding",
    "truncation",
    "max_length",
    "return_tensors",
    "return_dict",
    "return_assistant_tokens_mask",
    "tokenizer_kwargs",
];

/// The first of `names` that is one of [`RESERVED_TEMPLATE_VARIABLES`].
pub fn reserved_template_variable<'a>(
    names: impl IntoIterator<Item = &'a String>,
) -> Option<&'a str> {
    names
        .into_iter()
        .map(String::as_str)
        .find(|name| RESERVED_TEMPLATE_VARIABLES.contains(name))
}

/// Fails naming the first of `names` that is one of [`RESERVED_TEMPLATE_VARIABLES`].
pub fn check_template_kwargs<'a>(names: impl IntoIterator<Item = &'a String>) -> Result<()> {
    if let Some(name) = reserved_template_variable(names) {
        bail!(
            "chat_template_kwargs cannot set {name:?}: apply_chat_template sets it itself \
             (reserved: {})",
            RESERVED_TEMPLATE_VARIABLES.join(", ")
        );
    }
    Ok(())
}

/// A compiled chat template plus the variables transformers always passes to it.
pub(crate) struct ChatTemplate {
    env: Environment<'static>,
    /// `special_tokens_map` entries (`bos_token`, `eos_token`, …), in order.
    special_tokens: Vec<(String, Value)>,
}

impl ChatTemplate {
    /// Compiles `source`; `origin` names where it came from for error messages.
    pub(crate) fn compile(
        source: String,
        origin: &str,
        special_tokens: Vec<(String, Value)>,
    ) -> Result<Self> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .keep_trailing_newline(false)
            .build()
            .context("building the jinja syntax configuration")?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(TEMPLATE_NAME, source)
            .with_context(|| format!("the chat template in {origin} is not valid jinja"))?;
        Ok(Self {
            env,
            special_tokens,
        })
    }

    /// Renders `messages` (a sequence of maps) as `apply_chat_template(..., tokenize=False,
    /// **kwargs)` does: the special tokens, then `kwargs` (which may override them), then
    /// `messages`, `tools=None`, `documents=None`, `add_generation_prompt`. `kwargs` must not
    /// use a [`RESERVED_TEMPLATE_VARIABLES`] name.
    pub(crate) fn render(
        &self,
        messages: Value,
        add_generation_prompt: bool,
        kwargs: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String> {
        check_template_kwargs(kwargs.keys())?;
        let kwargs = kwargs
            .iter()
            .map(|(name, value)| (name.clone(), Value::from(Serde(value))));
        let variables = self.special_tokens.iter().cloned().chain(kwargs).chain([
            ("messages".to_string(), messages),
            ("tools".to_string(), Value::from(())),
            ("documents".to_string(), Value::from(())),
            (
                "add_generation_prompt".to_string(),
                Value::from(add_generation_prompt),
            ),
        ]);
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .context("the chat template was not registered")?;
        template
            .render(Value::from_pairs(variables))
            .context("rendering the chat template failed")
    }
}

/// `raise_exception(message)`: templates call it to reject a conversation.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// HF's `tojson`: `json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<String, Error> {
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let indent: Option<usize> = kwargs.get("indent")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let (item_separator, key_separator) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be a pair (item_separator, key_separator)",
            ))
        }
        // Python's defaults: no trailing space after "," when indenting.
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let mut writer = PythonJson {
        out: String::new(),
        ensure_ascii: ensure_ascii.unwrap_or(false),
        indent,
        item_separator,
        key_separator,
        sort_keys: sort_keys.unwrap_or(false),
    };
    writer.value(value, 0)?;
    Ok(writer.out)
}

/// A `json.dumps` look-alike over minijinja values.
struct PythonJson {
    out: String,
    ensure_ascii: bool,
    indent: Option<usize>,
    item_separator: String,
    key_separator: String,
    sort_keys: bool,
}

impl PythonJson {
    fn value(&mut self, value: &Value, depth: usize) -> Result<(), Error> {
        match value.kind() {
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = value.try_iter()?.collect();
                self.container(('[', ']'), items.len(), depth, |this, index| {
                    this.value(&items[index], depth + 1)
                })
            }
            ValueKind::Map => {
                let mut keys: Vec<Value> = value.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort();
                }
                self.container(('{', '}'), keys.len(), depth, |this, index| {
                    let key = &keys[index];
                    match key.as_str() {
                        Some(text) => this.string(text),
                        None => {
                            let text = scalar(key)?;
                            this.string(&text)
                        }
                    }
                    this.out.push_str(&this.key_separator.clone());
                    this.value(&value.get_item(key)?, depth + 1)
                })
            }
            ValueKind::String => {
                self.string(value.as_str().unwrap_or_default());
                Ok(())
            }
            _ => {
                let text = scalar(value)?;
                self.out.push_str(&text);
                Ok(())
            }
        }
    }

    /// Writes `len` items between `open` and `close`, with Python's indentation rules.
    fn container(
        &mut self,
        (open, close): (char, char),
        len: usize,
        depth: usize,
        mut item: impl FnMut(&mut Self, usize) -> Result<(), Error>,
    ) -> Result<(), Error> {
        self.out.push(open);
        for index in 0..len {
            if index > 0 {
                self.out.push_str(&self.item_separator.clone());
            }
            self.newline(depth + 1);
            item(self, index)?;
        }
        if len > 0 {
            self.newline(depth);
        }
        self.out.push(close);
        Ok(())
    }

    fn newline(&mut self, depth: usize) {
        if let Some(indent) = self.indent {
            self.out.push('\n');
            self.out.push_str(&" ".repeat(indent * depth));
        }
    }

    fn string(&mut self, text: &str) {
        self.out.push('"');
        for c in text.chars() {
            match c {
                '"' => self.out.push_str("\\\""),
                '\\' => self.out.push_str("\\\\"),
                '\n' => self.out.push_str("\\n"),
                '\r' => self.out.push_str("\\r"),
                '\t' => self.out.push_str("\\t"),
                '\u{8}' => self.out.push_str("\\b"),
                '\u{c}' => self.out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && !c.is_ascii()) => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        self.out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
                c => self.out.push(c),
            }
        }
        self.out.push('"');
    }
}

/// A JSON scalar as Python's `json.dumps` writes it (floats as `repr(float)`).
fn scalar(value: &Value) -> Result<String, Error> {
    match value.kind() {
        ValueKind::None => Ok("null".to_string()),
        ValueKind::Bool => Ok(if value.is_true() { "true" } else { "false" }.to_string()),
        ValueKind::Number if value.is_integer() => Ok(value.to_string()),
        ValueKind::Number => {
            let float = f64::try_from(value.clone())?;
            Ok(python_float_repr(float))
        }
        ValueKind::String => Ok(value.as_str().unwrap_or_default().to_string()),
        kind => Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("tojson: object of type {kind} is not JSON serializable"),
        )),
    }
}

/// `repr(float)` as `json.dumps` writes it: `1.0`, `1e+16`, `1e-05`, `NaN`, `Infinity`.
fn python_float_repr(float: f64) -> String {
    if float.is_nan() {
        return "NaN".to_string();
    }
    if float.is_infinite() {
        return if float > 0.0 { "Infinity" } else { "-Infinity" }.to_string();
    }
    // Rust's Debug form is the shortest round-trip digits with the same exponent thresholds;
    // only the exponent spelling differs (`1e16` vs `1e+16`, `1e-5` vs `1e-05`).
    let repr = format!("{float:?}");
    match repr.split_once('e') {
        Some((mantissa, exponent)) => {
            let (sign, digits) = match exponent.strip_prefix('-') {
                Some(digits) => ('-', digits),
                None => ('+', exponent),
            };
            format!("{mantissa}e{sign}{digits:0>2}")
        }
        None => repr,
    }
}

/// `strftime_now(format)`: the current time formatted like Python's `datetime.strftime`.
/// The time is UTC (no time-zone database here); templates use it for "today's date".
fn strftime_now(format: String) -> Result<String, Error> {
    let seconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?
        .as_secs();
    strftime(&format, CivilTime::from_unix(seconds))
}

/// A UTC calendar date and time.
#[derive(Debug, Clone, Copy, PartialEq)]
struct CivilTime {
    year: i64,
    month: usize,
    day: u64,
    hour: u64,
    minute: u64,
    second: u64,
    weekday: usize,
    day_of_year: u64,
}

impl CivilTime {
    /// Howard Hinnant's days-to-civil algorithm.
    fn from_unix(seconds: u64) -> Self {
        let days = (seconds / 86_400) as i64;
        let secs_of_day = seconds % 86_400;
        let shifted = days + 719_468;
        let era = shifted.div_euclid(146_097);
        let day_of_era = shifted.rem_euclid(146_097);
        let year_of_era =
            (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
        let day_of_march_year =
            day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
        let month_index = (5 * day_of_march_year + 2) / 153;
        let day = (day_of_march_year - (153 * month_index + 2) / 5 + 1) as u64;
        let month = if month_index < 10 {
            month_index + 3
        } else {
            month_index - 9
        } as usize;
        let year = year_of_era + era * 400 + i64::from(month <= 2);
        let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
        const DAYS_BEFORE_MONTH: [u64; 12] =
            [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
        let day_of_year = DAYS_BEFORE_MONTH[month - 1] + day + u64::from(leap && month > 2);
        Self {
            year,
            month,
            day,
            hour: secs_of_day / 3600,
            minute: secs_of_day / 60 % 60,
            second: secs_of_day % 60,
            // 1970-01-01 was a Thursday; index 0 is Monday as in Python's weekday().
            weekday: (days + 3).rem_euclid(7) as usize,
            day_of_year,
        }
    }
}

const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];
const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// Python `strftime` for the C-locale directives chat templates use (`%d %b %Y` and friends).
fn strftime(format: &str, time: CivilTime) -> Result<String, Error> {
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        // `%-d` (glibc: no padding) is common in Llama templates.
        let mut directive = chars.next();
        let padded = directive != Some('-');
        if !padded {
            directive = chars.next();
        }
        let number = |value: u64, width: usize| {
            if padded {
                format!("{value:0width$}")
            } else {
                value.to_string()
            }
        };
        let hour12 = if time.hour % 12 == 0 {
            12
        } else {
            time.hour % 12
        };
        let text = match directive {
            Some('Y') => time.year.to_string(),
            Some('y') => number(time.year.rem_euclid(100) as u64, 2),
            Some('m') => number(time.month as u64, 2),
            Some('d') => number(time.day, 2),
            Some('j') => number(time.day_of_year, 3),
            Some('H') => number(time.hour, 2),
            Some('I') => number(hour12, 2),
            Some('M') => number(time.minute, 2),
            Some('S') => number(time.second, 2),
            Some('p') => if time.hour < 12 { "AM" } else { "PM" }.to_string(),
            Some('B') => MONTHS[time.month - 1].to_string(),
            Some('b') => MONTHS[time.month - 1][..3].to_string(),
            Some('A') => WEEKDAYS[time.weekday].to_string(),
            Some('a') => WEEKDAYS[time.weekday][..3].to_string(),
            Some('%') => "%".to_string(),
            other => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!(
                        "strftime_now: unsupported directive %{} in {format:?}",
                        other.map(String::from).unwrap_or_default()
                    ),
                ))
            }
        };
        out.push_str(&text);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(source: &str, value: Value) -> Result<String> {
        let template = ChatTemplate::compile(source.to_string(), "a test", Vec::new())?;
        template.render(value, false, &serde_json::Map::new())
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let messages = Value::from_pairs([
            ("b", Value::from("é\"\n\u{1}")),
            (
                "a",
                Value::from(vec![Value::from(1), Value::from(2.5), Value::from(())]),
            ),
            ("c", Value::from(true)),
        ]);
        // json.dumps({"b": "é\"\n\x01", "a": [1, 2.5, None], "c": True}, ensure_ascii=False)
        assert_eq!(
            render("{{ messages | tojson }}", messages.clone()).unwrap(),
            r#"{"b": "é\"\n\u0001", "a": [1, 2.5, null], "c": true}"#
        );
        // json.dumps(..., indent=2, sort_keys=True, ensure_ascii=True)
        assert_eq!(
            render(
                "{{ messages | tojson(indent=2, sort_keys=true, ensure_ascii=true) }}",
                messages
            )
            .unwrap(),
            "{\n  \"a\": [\n    1,\n    2.5,\n    null\n  ],\n  \"b\": \"\\u00e9\\\"\\n\\u0001\",\n  \"c\": true\n}"
        );
        assert_eq!(
            render("{{ messages | tojson }}", Value::from(Vec::<Value>::new())).unwrap(),
            "[]"
        );
    }

    #[test]
    fn floats_are_written_like_python_repr() {
        assert_eq!(python_float_repr(1.0), "1.0");
        assert_eq!(python_float_repr(0.1), "0.1");
        assert_eq!(python_float_repr(1e16), "1e+16");
        assert_eq!(python_float_repr(1.5e-5), "1.5e-05");
        assert_eq!(python_float_repr(123456.789), "123456.789");
        assert_eq!(python_float_repr(f64::NAN), "NaN");
    }

    #[test]
    fn civil_time_and_strftime() {
        // 2024-02-29 13:05:09 UTC was a Thursday, day 60 of a leap year.
        let time = CivilTime::from_unix(1_709_211_909);
        assert_eq!(
            strftime("%Y-%m-%d %H:%M:%S %a %A %b %B %j %I%p %-d %y %%", time).unwrap(),
            "2024-02-29 13:05:09 Thu Thursday Feb February 060 01PM 29 24 %"
        );
        let epoch = CivilTime::from_unix(0);
        assert_eq!(
            strftime("%d %b %Y %A", epoch).unwrap(),
            "01 Jan 1970 Thursday"
        );
        let error = strftime("%Q", epoch).unwrap_err();
        assert!(error.to_string().contains("%Q"), "{error}");
    }

    #[test]
    fn python_string_methods_and_loop_controls_work() {
        let source = "{% for m in messages %}{% if m == 'skip' %}{% continue %}{% endif %}\
                      {{ m.strip().upper() }}{% if m.startswith(' b') %}!{% endif %}{% endfor %}";
        let value = Value::from(vec![" a ", "skip", " b"]);
        assert_eq!(render(source, value).unwrap(), "AB!");
    }
}
