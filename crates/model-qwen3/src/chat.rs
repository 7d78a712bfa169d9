//! Renders a conversation into prompt text with the checkpoint's own Jinja
//! chat template (from tokenizer_config.json), reproducing what Hugging
//! Face's `apply_chat_template(..., tokenize=False)` produces so that the
//! model sees exactly the prompt format it was trained on.

use std::collections::BTreeMap;
use std::path::Path;

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// Name the template is registered under. It has no file extension so that
/// minijinja never turns on HTML auto-escaping for it.
const TEMPLATE_NAME: &str = "chat";

/// Special tokens Hugging Face exposes to chat templates as variables.
const SPECIAL_TOKEN_KEYS: [&str; 4] = ["bos_token", "eos_token", "pad_token", "unk_token"];

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Who is speaking: `"system"`, `"user"`, `"assistant"` or `"tool"`.
    pub role: String,
    /// The text of the turn. For assistant turns it may include a
    /// `<think>...</think>` block, which the Qwen3 template strips from
    /// earlier turns.
    pub content: String,
}

impl ChatMessage {
    /// A message with the given role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }

    /// A `system` message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    /// A `user` message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    /// An `assistant` message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// A compiled chat template plus the special-token variables it may use.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// `bos_token`, `eos_token`, ... as given in tokenizer_config.json.
    special_tokens: BTreeMap<String, String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("special_tokens", &self.special_tokens)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Loads the chat template of the checkpoint in `dir`.
    ///
    /// The template comes from `dir/chat_template.jinja` if that file exists
    /// (newer `transformers` versions save it there, and it then takes
    /// precedence), else from the `chat_template` field of
    /// `dir/tokenizer_config.json`: a string, or a list of
    /// `{name, template}` entries of which the one named `"default"` is used.
    /// Special tokens (`bos_token`, `eos_token`, ...) are read from
    /// tokenizer_config.json.
    ///
    /// Errors: [`ModelError::Io`] if tokenizer_config.json cannot be read,
    /// [`ModelError::Template`] if it is not JSON, has no usable template,
    /// or the template does not compile.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let config_path = dir.join("tokenizer_config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|source| ModelError::Io {
            path: config_path.clone(),
            source,
        })?;
        let config: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            ModelError::Template(format!("cannot parse {}: {e}", config_path.display()))
        })?;

        let jinja_path = dir.join("chat_template.jinja");
        let source = if jinja_path.is_file() {
            std::fs::read_to_string(&jinja_path).map_err(|source| ModelError::Io {
                path: jinja_path,
                source,
            })?
        } else {
            template_from_config(&config, &config_path)?
        };

        let special_tokens = SPECIAL_TOKEN_KEYS
            .iter()
            .filter_map(|&key| {
                let value = match config.get(key)? {
                    serde_json::Value::String(s) => s.clone(),
                    // Older configs store tokens as serialized AddedToken objects.
                    obj @ serde_json::Value::Object(_) => obj.get("content")?.as_str()?.to_string(),
                    _ => return None,
                };
                Some((key.to_string(), value))
            })
            .collect();
        Self::build(source, special_tokens)
    }

    /// Compiles a template given as source text. `bos_token` and
    /// `eos_token`, when given, are available to the template as variables
    /// of those names, as Hugging Face provides them.
    pub fn from_template(
        source: &str,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
    ) -> Result<Self> {
        let special_tokens = [("bos_token", bos_token), ("eos_token", eos_token)]
            .into_iter()
            .filter_map(|(k, v)| Some((k.to_string(), v?.to_string())))
            .collect();
        Self::build(source.to_string(), special_tokens)
    }

    fn build(source: String, special_tokens: BTreeMap<String, String>) -> Result<Self> {
        let mut env = Environment::new();
        // Hugging Face renders with jinja2's Environment(trim_blocks=True,
        // lstrip_blocks=True); without these the whitespace around `{% %}`
        // tags ends up in the prompt.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        // Templates are written against Python strings and dicts
        // (`.startswith`, `.split`, `.items()`, ...).
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        // minijinja's own tojson escapes HTML characters and uses compact
        // separators; templates expect Python's json.dumps output.
        env.add_filter("tojson", py_tojson);
        env.add_template_owned(TEMPLATE_NAME, source)
            .map_err(|e| ModelError::Template(format!("cannot compile: {}", describe(&e))))?;
        Ok(Self {
            env,
            special_tokens,
        })
    }

    /// Renders `messages` into prompt text.
    ///
    /// `add_generation_prompt` appends the header of a new assistant turn so
    /// the model answers next. `enable_thinking = false` asks Qwen3 to skip
    /// reasoning (its template then pre-fills an empty `<think>` block);
    /// `true` leaves the model free to think. Like Hugging Face, `tools` is
    /// passed as none, so tool sections of the template are skipped.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        enable_thinking: bool,
    ) -> Result<String> {
        let mut ctx: BTreeMap<&str, Value> = self
            .special_tokens
            .iter()
            .map(|(k, v)| (k.as_str(), Value::from(v.as_str())))
            .collect();
        ctx.insert("messages", Value::from_serialize(messages));
        ctx.insert("add_generation_prompt", Value::from(add_generation_prompt));
        ctx.insert("enable_thinking", Value::from(enable_thinking));
        // HF passes these explicitly as None rather than leaving them
        // undefined; `tools is defined` must therefore be true.
        ctx.insert("tools", Value::from(()));
        ctx.insert("documents", Value::from(()));

        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| ModelError::Template(describe(&e)))?;
        template
            .render(ctx)
            .map_err(|e| ModelError::Template(format!("render failed: {}", describe(&e))))
    }
}

/// Picks the template out of tokenizer_config.json's `chat_template` field.
fn template_from_config(config: &serde_json::Value, path: &Path) -> Result<String> {
    match config.get("chat_template") {
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        Some(serde_json::Value::Array(entries)) => entries
            .iter()
            .find(|e| e.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|e| e.get("template")?.as_str())
            .map(str::to_string)
            .ok_or_else(|| {
                let names: Vec<&str> = entries
                    .iter()
                    .filter_map(|e| e.get("name")?.as_str())
                    .collect();
                ModelError::Template(format!(
                    "{} lists chat templates {names:?} but none named \"default\"",
                    path.display()
                ))
            }),
        Some(_) => Err(ModelError::Template(format!(
            "{}: chat_template is neither a string nor a list of named templates",
            path.display()
        ))),
        None => Err(ModelError::Template(format!(
            "{} has no chat_template (and there is no chat_template.jinja beside it)",
            path.display()
        ))),
    }
}

/// Error message plus the minijinja detail/location, on one line.
fn describe(e: &Error) -> String {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Templates call `raise_exception("...")` to reject conversations they
/// cannot format; surface that message as a render error.
fn raise_exception(msg: String) -> std::result::Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

/// `tojson` as Hugging Face defines it for templates: Python's
/// `json.dumps(value, ensure_ascii=False, indent=indent)`, i.e. `", "` and
/// `": "` separators when not indenting, non-ASCII text left as is.
fn py_tojson(value: &Value, kwargs: Kwargs) -> std::result::Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    // Accepted for compatibility; maps reach us with sorted keys anyway.
    let _: Option<bool> = kwargs.get("sort_keys")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_py_json(value, indent, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

fn write_py_json(
    value: &Value,
    indent: Option<usize>,
    depth: usize,
    out: &mut String,
) -> std::result::Result<(), Error> {
    // Python puts one separator between items and, when indenting, a line
    // break plus the nesting depth's indentation before each item.
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if value.is_integer() {
                out.push_str(&value.to_string());
            } else {
                let f = f64::try_from(value.clone())?;
                if f.is_nan() {
                    out.push_str("NaN");
                } else if f.is_infinite() {
                    out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" });
                } else {
                    out.push_str(&value.to_string());
                }
            }
        }
        ValueKind::String => {
            let s = value.as_str().unwrap_or_default();
            // serde_json escapes exactly the characters Python does with
            // ensure_ascii=False: quote, backslash and control characters.
            out.push_str(
                &serde_json::to_string(s)
                    .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?,
            );
        }
        ValueKind::Map => {
            let keys: Vec<Value> = value.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                let name = match key.as_str() {
                    Some(s) => s.to_string(),
                    None => key.to_string(),
                };
                write_py_json(&Value::from(name), indent, depth + 1, out)?;
                out.push_str(": ");
                write_py_json(&value.get_item(key)?, indent, depth + 1, out)?;
            }
            newline(out, depth);
            out.push('}');
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_py_json(item, indent, depth + 1, out)?;
            }
            newline(out, depth);
            out.push(']');
        }
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: cannot serialize a value of kind {}", value.kind()),
            ))
        }
    }
    Ok(())
}
