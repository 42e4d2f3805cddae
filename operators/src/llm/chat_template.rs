//! Chat templates: a model's Jinja template rendered as Hugging Face's
//! `apply_chat_template(messages, tokenize=False, add_generation_prompt=True)` does.
//!
//! transformers compiles the template with `trim_blocks=True, lstrip_blocks=True` (and
//! Jinja's default of dropping one trailing newline), provides `raise_exception(msg)`,
//! its own `tojson` (Python's `json.dumps`: `", "` and `": "` separators, non-ASCII kept),
//! and passes `messages`, `add_generation_prompt`, `tools` and `documents` (None) and the
//! tokenizer's special tokens (`bos_token`, `eos_token`, ...) as strings. minijinja with
//! minijinja-contrib's Python compatibility (`str.strip()`, `dict.items()`, ...) renders
//! the same text.
//!
//! One deliberate difference: `strftime_now` is not defined, so a template that would
//! print today's date (Llama 3.1's) takes its fixed fallback date instead, and the same
//! request renders to the same prompt on every day (the query cache relies on it).
//!
//! Where the template comes from, first found: `chat_template.jinja` in the tokenizer
//! directory (transformers >= 4.43 saves it there), `chat_template` in
//! `tokenizer_config.json` (a string, or a list of named templates of which `default` is
//! used), and for a GGUF file its `tokenizer.chat_template` metadata.

use std::path::{Path, PathBuf};

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, Error, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use crate::error::{OperatorError, Result};

/// One message of a chat, as in Hugging Face chat templates and OpenAI's chat API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// The special-token fields transformers passes to templates.
pub const SPECIAL_TOKEN_FIELDS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// A compiled chat template with the special tokens it may print.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Where the template came from, for errors.
    source: PathBuf,
    /// `(field, token string)`, e.g. `("bos_token", "<|begin_of_text|>")`.
    special_tokens: Vec<(String, String)>,
}

/// The template's name inside the environment.
const TEMPLATE_NAME: &str = "chat_template";

impl ChatTemplate {
    /// Compiles `template`; `source` names it in errors.
    pub fn new(
        template: String,
        source: PathBuf,
        special_tokens: Vec<(String, String)>,
    ) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, template)
            .map_err(|e| OperatorError::BadConfig {
                path: source.clone(),
                what: "chat template",
                message: describe(&e),
            })?;
        Ok(ChatTemplate {
            env,
            source,
            special_tokens,
        })
    }

    /// Where the template came from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The prompt for `messages`, ending with the assistant's turn opened when
    /// `add_generation_prompt`.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| self.error(&e))?;
        let mut context: Vec<(String, Value)> = vec![
            ("messages".into(), Value::from_serialize(messages)),
            (
                "add_generation_prompt".into(),
                Value::from(add_generation_prompt),
            ),
            ("tools".into(), Value::from(())),
            ("documents".into(), Value::from(())),
        ];
        for (field, token) in &self.special_tokens {
            context.push((field.clone(), Value::from(token.as_str())));
        }
        let context: Value = context.into_iter().collect();
        template.render(context).map_err(|e| self.error(&e))
    }

    fn error(&self, e: &Error) -> OperatorError {
        OperatorError::BadConfig {
            path: self.source.clone(),
            what: "chat template",
            message: describe(e),
        }
    }
}

/// An error with its line and the message a template gave (`raise_exception`).
fn describe(e: &Error) -> String {
    let mut s = e.to_string();
    if let Some(detail) = e.detail() {
        if !s.contains(detail) {
            s = format!("{s}: {detail}");
        }
    }
    s
}

fn raise_exception(message: String) -> std::result::Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`, output not escaped.
fn tojson(
    value: Value,
    indent: Option<Value>,
    kwargs: Kwargs,
) -> std::result::Result<Value, Error> {
    let indent = match indent {
        Some(v) => Some(v),
        None => kwargs.get::<Option<Value>>("indent")?,
    };
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(match v.as_i64() {
            Some(n) if n >= 0 => " ".repeat(n as usize),
            _ => match v.as_str() {
                Some(s) => s.to_string(),
                None => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: indent must be a number or a string",
                    ))
                }
            },
        }),
    };
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    let separators = kwargs.get::<Option<Vec<String>>>("separators")?;
    kwargs.assert_all_used()?;
    let (item_sep, key_sep) = match separators {
        Some(s) if s.len() == 2 => (s[0].clone(), s[1].clone()),
        Some(_) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be two strings",
            ))
        }
        // Python: (", ", ": ") without indent, (",", ": ") with it.
        None if indent.is_some() => (",".into(), ": ".into()),
        None => (", ".into(), ": ".into()),
    };
    let style = JsonStyle {
        indent,
        item_sep,
        key_sep,
        sort_keys,
        ensure_ascii,
    };
    let mut out = String::new();
    style.write(&value, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

/// How Python's `json.dumps` lays a value out.
struct JsonStyle {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

impl JsonStyle {
    fn newline(&self, depth: usize, out: &mut String) {
        if let Some(unit) = &self.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(unit);
            }
        }
    }

    fn write(&self, v: &Value, depth: usize, out: &mut String) -> std::result::Result<(), Error> {
        match v.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => {
                if let (true, Some(i)) = (v.is_integer(), v.as_i64()) {
                    out.push_str(&i.to_string());
                } else {
                    let f = f64::try_from(v.clone())?;
                    out.push_str(&python_float(f));
                }
            }
            ValueKind::String => self.string(v.as_str().unwrap_or_default(), out),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                self.sequence(items.len(), '[', ']', depth, out, |i, out| {
                    self.write(&items[i], depth + 1, out)
                })?;
            }
            ValueKind::Map => {
                let mut keys: Vec<Value> = v.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort_by_key(|k| k.to_string());
                }
                self.sequence(keys.len(), '{', '}', depth, out, |i, out| {
                    let key = &keys[i];
                    match key.as_str() {
                        Some(s) => self.string(s, out),
                        None => self.string(&key.to_string(), out),
                    }
                    out.push_str(&self.key_sep);
                    self.write(&v.get_item(key)?, depth + 1, out)
                })?;
            }
            _ => self.string(&v.to_string(), out),
        }
        Ok(())
    }

    fn sequence(
        &self,
        n: usize,
        open: char,
        close: char,
        depth: usize,
        out: &mut String,
        mut item: impl FnMut(usize, &mut String) -> std::result::Result<(), Error>,
    ) -> std::result::Result<(), Error> {
        out.push(open);
        if n == 0 {
            out.push(close);
            return Ok(());
        }
        for i in 0..n {
            if i > 0 {
                out.push_str(&self.item_sep);
            }
            self.newline(depth + 1, out);
            item(i, out)?;
        }
        self.newline(depth, out);
        out.push(close);
        Ok(())
    }

    /// A JSON string as Python escapes it: `"`, `\`, the short escapes for \b \f \n \r
    /// \t, `\u00XX` for other control characters, and non-ASCII as `\uXXXX` (surrogate
    /// pairs beyond the BMP) only with `ensure_ascii`.
    fn string(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                c if self.ensure_ascii && !c.is_ascii() => {
                    let mut units = [0u16; 2];
                    for u in c.encode_utf16(&mut units) {
                        out.push_str(&format!("\\u{u:04x}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// Python's `repr` of a float: shortest round-trip digits, `.0` on integral values,
/// exponents as `e+16` / `e-07`, and `NaN` / `Infinity` as `json.dumps` writes them.
fn python_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    // Rust's Debug gives the shortest round-trip digits and switches to an exponent
    // where Python does (below 1e-4, from 1e16), but writes it as `1e-7` / `1e16`.
    let s = format!("{f:?}");
    match s.split_once('e') {
        None => s,
        Some((mantissa, exp)) => {
            let (sign, digits) = match exp.strip_prefix('-') {
                Some(d) => ('-', d),
                None => ('+', exp),
            };
            format!("{mantissa}e{sign}{digits:0>2}")
        }
    }
}

/// A special token as tokenizer_config.json writes it: a string, or an AddedToken
/// object with `content`.
pub(crate) fn token_string(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    }
}

/// A chat template's text as found, before compiling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TemplateSource {
    pub text: String,
    /// The file it came from.
    pub path: PathBuf,
    /// `(field, token string)` from tokenizer_config.json.
    pub special_tokens: Vec<(String, String)>,
}

/// The chat template of a tokenizer directory and its special tokens, when it has one:
/// `chat_template.jinja`, else `tokenizer_config.json`'s `chat_template`.
pub(crate) fn from_tokenizer_dir(dir: &Path) -> Result<Option<TemplateSource>> {
    let config_path = dir.join("tokenizer_config.json");
    let config: Option<serde_json::Value> = if config_path.is_file() {
        let text = std::fs::read_to_string(&config_path).map_err(|source| OperatorError::Io {
            path: config_path.clone(),
            source,
        })?;
        Some(
            serde_json::from_str(&text).map_err(|e| OperatorError::BadConfig {
                path: config_path.clone(),
                what: "tokenizer config",
                message: e.to_string(),
            })?,
        )
    } else {
        None
    };
    let specials: Vec<(String, String)> = config
        .as_ref()
        .map(|c| {
            SPECIAL_TOKEN_FIELDS
                .iter()
                .filter_map(|f| c.get(*f).and_then(token_string).map(|t| (f.to_string(), t)))
                .collect()
        })
        .unwrap_or_default();
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        let text = std::fs::read_to_string(&jinja).map_err(|source| OperatorError::Io {
            path: jinja.clone(),
            source,
        })?;
        return Ok(Some(TemplateSource {
            text,
            path: jinja,
            special_tokens: specials,
        }));
    }
    let Some(template) = config.as_ref().and_then(|c| c.get("chat_template")) else {
        return Ok(None);
    };
    let bad = |message: String| OperatorError::BadConfig {
        path: config_path.clone(),
        what: "tokenizer config",
        message,
    };
    let text = match template {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(named) => named
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(|t| t.as_str())
            .map(String::from)
            .ok_or_else(|| {
                bad("chat_template: a list of templates without one named `default`".into())
            })?,
        serde_json::Value::Null => return Ok(None),
        _ => {
            return Err(bad(
                "chat_template: neither a string nor a list of named templates".into(),
            ))
        }
    };
    Ok(Some(TemplateSource {
        text,
        path: config_path,
        special_tokens: specials,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(template: &str, messages: &[ChatMessage]) -> Result<String> {
        ChatTemplate::new(
            template.into(),
            PathBuf::from("t.jinja"),
            vec![("bos_token".into(), "<s>".into())],
        )?
        .render(messages, true)
    }

    #[test]
    fn blocks_are_trimmed_as_transformers_does() {
        // trim_blocks drops the newline after a block tag, lstrip_blocks the indentation
        // before it; the final newline of the template is dropped.
        let t = "{{ bos_token }}\n{% for m in messages %}\n    {% if m.role == 'user' %}\nU: {{ m.content.strip() }}\n    {% endif %}\n{% endfor %}\n{% if add_generation_prompt %}\nA:\n{% endif %}\n";
        let out = render(t, &[ChatMessage::new("user", "  hi  ")]).unwrap();
        assert_eq!(out, "<s>\nU: hi\nA:\n");
    }

    #[test]
    fn raise_exception_is_an_error_naming_the_template() {
        let t = "{% if messages[0].role != 'system' %}{{ raise_exception('System first!') }}{% endif %}";
        let e = render(t, &[ChatMessage::new("user", "x")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("t.jinja") && e.contains("System first!"), "{e}");
    }

    #[test]
    fn tojson_writes_what_python_json_dumps_writes() {
        // json.dumps({"a": "é\n\"", "b": [1, 2.5, None, True], "c": 1e-07}); the keys are
        // in sorted order because minijinja's maps sort them (without its
        // `preserve_order` feature) where Python keeps insertion order.
        let t = "{{ {'a': 'é\\n\"', 'b': [1, 2.5, none, true], 'c': 0.0000001} | tojson }}";
        assert_eq!(
            render(t, &[]).unwrap(),
            r#"{"a": "é\n\"", "b": [1, 2.5, null, true], "c": 1e-07}"#
        );
        // json.dumps({"k": [1, {}]}, indent=2)
        let t = "{{ {'k': [1, {}]} | tojson(indent=2) }}";
        assert_eq!(
            render(t, &[]).unwrap(),
            "{\n  \"k\": [\n    1,\n    {}\n  ]\n}"
        );
        assert_eq!(python_float(1e16), "1e+16");
        assert_eq!(python_float(123.0), "123.0");
        assert_eq!(python_float(0.1), "0.1");
    }

    #[test]
    fn named_templates_use_default() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"bos_token": {"content": "<s>", "lstrip": false}, "eos_token": "</s>",
                "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}"#,
        )
        .unwrap();
        let found = from_tokenizer_dir(dir.path()).unwrap().unwrap();
        assert_eq!(found.text, "D");
        assert_eq!(
            found.special_tokens,
            vec![
                ("bos_token".to_string(), "<s>".to_string()),
                ("eos_token".to_string(), "</s>".to_string())
            ]
        );
    }
}
