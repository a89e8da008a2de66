//! Text in and out: tokenizer.json through the `tokenizers` crate, the chat template of
//! tokenizer_config.json (or chat_template.jinja) rendered with minijinja the way transformers'
//! `apply_chat_template` renders it, and the set of tokens that end generation.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use minijinja::value::Value;
use minijinja::{Environment, ErrorKind};
use serde::{Deserialize, Serialize};

use super::config::{Config, TokenIds};
use super::error::{ModelError, Result, TokenizerError};

/// End-of-turn markers of the Phi family (Phi-3 <|end|>, Phi-4 <|im_end|>), stop tokens when present.
const END_OF_TURN: &[&str] = &["<|end|>", "<|im_end|>"];

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    template: Option<String>,
    /// Special tokens as the template sees them (bos_token, eos_token, ...).
    special: Vec<(String, String)>,
    stop: Vec<u32>,
}

/// tokenizer_config.json writes special tokens as a string or as an AddedToken object.
#[derive(Deserialize)]
#[serde(untagged)]
enum TokenText {
    Plain(String),
    Added { content: String },
}

impl TokenText {
    fn text(self) -> String {
        match self {
            TokenText::Plain(s) => s,
            TokenText::Added { content } => content,
        }
    }
}

/// One template, or several named ones ("default", "tool_use", ...).
#[derive(Deserialize)]
#[serde(untagged)]
enum Templates {
    One(String),
    Named(Vec<NamedTemplate>),
}

#[derive(Deserialize)]
struct NamedTemplate {
    name: String,
    template: String,
}

#[derive(Deserialize, Default)]
struct TokenizerConfig {
    chat_template: Option<Templates>,
    bos_token: Option<TokenText>,
    eos_token: Option<TokenText>,
    unk_token: Option<TokenText>,
    pad_token: Option<TokenText>,
}

#[derive(Deserialize, Default)]
struct GenerationConfig {
    eos_token_id: Option<TokenIds>,
}

/// Parses an optional JSON file's text; a missing file is the default.
fn parse_json<T: for<'de> Deserialize<'de> + Default>(
    text: Option<&str>,
    path: &Path,
) -> Result<T> {
    let Some(text) = text else {
        return Ok(T::default());
    };
    serde_json::from_str(text).map_err(|e| {
        ModelError::from(TokenizerError::Invalid {
            path: path.to_owned(),
            reason: format!("not valid JSON of the expected form: {e}"),
        })
    })
}

/// The files a tokenizer is made of, as read from a model folder or stored in a .upg file. Only
/// tokenizer.json is required.
#[derive(Clone, Debug, Default)]
pub struct TokenizerFiles {
    pub tokenizer: Vec<u8>,
    pub tokenizer_config: Option<String>,
    pub chat_template: Option<String>,
    pub generation_config: Option<String>,
}

impl TokenizerFiles {
    /// File names in a Hugging Face folder, in the order of the fields.
    pub const NAMES: [&'static str; 4] = [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
    ];

    pub fn read_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(TokenizerError::Missing { path }.into());
        }
        let optional = |name: &str| -> Result<Option<String>> {
            let p = dir.join(name);
            if !p.exists() {
                return Ok(None);
            }
            std::fs::read_to_string(&p)
                .map(Some)
                .map_err(|e| ModelError::io(&p, e))
        };
        Ok(Self {
            tokenizer: std::fs::read(&path).map_err(|e| ModelError::io(&path, e))?,
            tokenizer_config: optional(Self::NAMES[1])?,
            chat_template: optional(Self::NAMES[2])?,
            generation_config: optional(Self::NAMES[3])?,
        })
    }

    /// (name, contents) of the files present.
    pub fn entries(&self) -> Vec<(&'static str, &[u8])> {
        let mut out = vec![(Self::NAMES[0], self.tokenizer.as_slice())];
        for (name, text) in Self::NAMES[1..].iter().zip([
            &self.tokenizer_config,
            &self.chat_template,
            &self.generation_config,
        ]) {
            if let Some(t) = text {
                out.push((name, t.as_bytes()));
            }
        }
        out
    }
}

impl TextTokenizer {
    /// Reads tokenizer.json, tokenizer_config.json, chat_template.jinja and generation_config.json from
    /// `dir` (only tokenizer.json is required); stop tokens come from `config`'s eos ids too.
    pub fn from_dir(dir: &Path, config: &Config) -> Result<Self> {
        Self::from_files(&TokenizerFiles::read_dir(dir)?, dir, config)
    }

    /// A tokenizer from its files; `origin` (a folder or a .upg file) names them in errors.
    pub fn from_files(files: &TokenizerFiles, origin: &Path, config: &Config) -> Result<Self> {
        let path = origin.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_bytes(&files.tokenizer).map_err(|e| {
            ModelError::from(TokenizerError::Invalid {
                path: path.clone(),
                reason: format!("cannot be read ({e}): the file is damaged or not a Hugging Face tokenizer; download it again"),
            })
        })?;
        let tc: TokenizerConfig = parse_json(
            files.tokenizer_config.as_deref(),
            &origin.join("tokenizer_config.json"),
        )?;
        let template = match (&files.chat_template, tc.chat_template) {
            (Some(t), _) => Some(t.clone()),
            (None, None) => None,
            (None, Some(Templates::One(t))) => Some(t),
            (None, Some(Templates::Named(list))) => {
                let pick = list.iter().position(|t| t.name == "default").unwrap_or(0);
                list.into_iter().nth(pick).map(|t| t.template)
            }
        };
        let special: Vec<(String, String)> = [
            ("bos_token", tc.bos_token),
            ("eos_token", tc.eos_token),
            ("unk_token", tc.unk_token),
            ("pad_token", tc.pad_token),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k.to_string(), v.text())))
        .collect();

        let gen: GenerationConfig = parse_json(
            files.generation_config.as_deref(),
            &origin.join("generation_config.json"),
        )?;
        let mut stop: BTreeSet<u32> = config.eos_token_ids.iter().copied().collect();
        stop.extend(gen.eos_token_id.map(TokenIds::into_vec).unwrap_or_default());
        let eos_text = special
            .iter()
            .find(|(k, _)| k == "eos_token")
            .map(|(_, v)| v.as_str());
        for t in END_OF_TURN.iter().copied().chain(eos_text) {
            if let Some(id) = inner.token_to_id(t) {
                stop.insert(id);
            }
        }
        Ok(Self {
            inner,
            path,
            template,
            special,
            stop: stop.into_iter().collect(),
        })
    }

    fn err(&self, what: &str, e: impl std::fmt::Display) -> ModelError {
        ModelError::from(TokenizerError::Invalid {
            path: self.path.clone(),
            reason: format!("{what}: {e}"),
        })
    }

    /// Token ids of `text`; `add_special_tokens` applies the tokenizer's post-processor (BOS, ...), as
    /// transformers' `tokenizer(text)` does. A rendered chat template is encoded without.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| self.err("encoding failed", e))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| self.err("decoding failed", e))
    }

    /// Incremental decoding for printing tokens as they come: `step` returns the text a token completes
    /// (None while a multi-byte character is still incomplete).
    pub fn stream(&self, skip_special_tokens: bool) -> TextStream<'_> {
        TextStream {
            inner: self.inner.decode_stream(skip_special_tokens),
        }
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Tokens that end generation: eos ids of config.json and generation_config.json, the eos token of
    /// tokenizer_config.json, <|end|> and <|im_end|>.
    pub fn stop_tokens(&self) -> &[u32] {
        &self.stop
    }

    pub fn has_chat_template(&self) -> bool {
        self.template.is_some()
    }

    /// The chat template applied to `messages`, as transformers renders it (jinja with trim_blocks and
    /// lstrip_blocks, special tokens and `add_generation_prompt` in the context).
    pub fn apply_chat_template(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let source = self.template.as_deref().ok_or_else(|| {
            ModelError::from(TokenizerError::Template(format!(
                "{} has no chat template (tokenizer_config.json 'chat_template' or chat_template.jinja): use --raw",
                self.path.parent().unwrap_or(&self.path).display()
            )))
        })?;
        render_chat_template(source, messages, add_generation_prompt, &self.special)
    }
}

pub struct TextStream<'a> {
    inner: tokenizers::tokenizer::DecodeStream<
        'a,
        tokenizers::ModelWrapper,
        tokenizers::NormalizerWrapper,
        tokenizers::PreTokenizerWrapper,
        tokenizers::PostProcessorWrapper,
        tokenizers::DecoderWrapper,
    >,
}

impl TextStream<'_> {
    pub fn step(&mut self, id: u32) -> Result<Option<String>> {
        self.inner.step(id).map_err(|e| {
            ModelError::from(TokenizerError::Invalid {
                path: "tokenizer.json".into(),
                reason: format!("decoding token {id} failed: {e}"),
            })
        })
    }
}

/// Renders a Hugging Face chat template. transformers uses a jinja2 sandbox with trim_blocks and
/// lstrip_blocks, a `raise_exception` function, and Python string methods on values; minijinja gets the
/// same settings and the string methods templates use.
pub fn render_chat_template(
    source: &str,
    messages: &[Message],
    add_generation_prompt: bool,
    special: &[(String, String)],
) -> Result<String> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        },
    );
    env.set_unknown_method_callback(python_methods);
    env.add_template("chat", source).map_err(|e| {
        ModelError::from(TokenizerError::Template(format!("does not compile: {e:#}")))
    })?;
    let tmpl = env
        .get_template("chat")
        .map_err(|e| ModelError::from(TokenizerError::Template(e.to_string())))?;
    let mut ctx = std::collections::BTreeMap::new();
    ctx.insert("messages".to_string(), Value::from_serialize(messages));
    ctx.insert(
        "add_generation_prompt".to_string(),
        Value::from(add_generation_prompt),
    );
    for (k, v) in special {
        ctx.insert(k.clone(), Value::from(v.as_str()));
    }
    tmpl.render(ctx)
        .map_err(|e| ModelError::from(TokenizerError::Template(format!("rendering failed: {e:#}"))))
}

/// The Python string methods chat templates call (`content.strip()`, `role.startswith('u')`, ...).
fn python_methods(
    _state: &minijinja::State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> std::result::Result<Value, minijinja::Error> {
    let unknown = || {
        minijinja::Error::new(
            ErrorKind::UnknownMethod,
            format!("method '{method}' is not available in chat templates here"),
        )
    };
    let Some(s) = value.as_str() else {
        return Err(unknown());
    };
    let arg = |i: usize| args.get(i).and_then(|a| a.as_str());
    Ok(match (method, args.len()) {
        ("strip", 0) => Value::from(s.trim()),
        ("lstrip", 0) => Value::from(s.trim_start()),
        ("rstrip", 0) => Value::from(s.trim_end()),
        ("strip", 1) => Value::from(s.trim_matches(|c| arg(0).unwrap_or("").contains(c))),
        ("lstrip", 1) => Value::from(s.trim_start_matches(|c| arg(0).unwrap_or("").contains(c))),
        ("rstrip", 1) => Value::from(s.trim_end_matches(|c| arg(0).unwrap_or("").contains(c))),
        ("startswith", 1) => Value::from(s.starts_with(arg(0).ok_or_else(unknown)?)),
        ("endswith", 1) => Value::from(s.ends_with(arg(0).ok_or_else(unknown)?)),
        ("upper", 0) => Value::from(s.to_uppercase()),
        ("lower", 0) => Value::from(s.to_lowercase()),
        ("split", 1) => Value::from(
            s.split(arg(0).ok_or_else(unknown)?)
                .map(Value::from)
                .collect::<Vec<_>>(),
        ),
        ("split", 0) => Value::from(s.split_whitespace().map(Value::from).collect::<Vec<_>>()),
        ("replace", 2) => {
            Value::from(s.replace(arg(0).ok_or_else(unknown)?, arg(1).ok_or_else(unknown)?))
        }
        _ => return Err(unknown()),
    })
}
