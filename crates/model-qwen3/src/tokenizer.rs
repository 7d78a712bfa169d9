//! Text <-> token ids for a Qwen3 checkpoint, backed by the checkpoint's own
//! `tokenizer.json` through the pure-Rust `tokenizers` crate, plus a
//! streaming decoder that only ever hands out whole UTF-8 characters.

use std::path::Path;

use crate::error::{ModelError, Result};

/// What a byte-level BPE decode yields when the ids end partway through a
/// multi-byte character.
const REPLACEMENT: char = '\u{FFFD}';

/// A Qwen3 tokenizer loaded from a checkpoint's `tokenizer.json`.
///
/// Encoding never adds BOS/EOS or other template tokens (Qwen3 adds none
/// anyway); special tokens spelled out in the text, such as `<|im_start|>`,
/// still map to their single ids, as they do in Hugging Face.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .finish()
    }
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json`.
    ///
    /// A missing or unreadable file gives [`ModelError::Io`] naming the path;
    /// a file the `tokenizers` crate cannot parse gives
    /// [`ModelError::Tokenizer`], also naming the path.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_file(&dir.join("tokenizer.json"))
    }

    /// Loads a `tokenizer.json` at an explicit path.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| {
            ModelError::Tokenizer(format!("cannot parse {}: {}", path.display(), one_line(&e)))
        })?;
        Ok(Self { inner })
    }

    /// Encodes `text` to token ids exactly as Hugging Face's
    /// `tokenizer(text)["input_ids"]` does for Qwen3.
    ///
    /// `add_special_tokens` is off so that a rendered chat template, which
    /// already spells out every control token, is not wrapped a second time.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        // encode_fast skips computing character offsets, which we never use;
        // the ids are the same.
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| ModelError::Tokenizer(format!("encode failed: {}", one_line(&e))))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids to text, keeping special tokens such as `<|im_end|>` in
    /// the output. Ids ending partway through a character decode to U+FFFD
    /// there; use [`StreamDecoder`] for incremental output.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| ModelError::Tokenizer(format!("decode failed: {}", one_line(&e))))
    }

    /// The id of a single token given by its exact vocabulary string (for
    /// example `"<|im_end|>"`), or `None` if it is not in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The vocabulary string of `id`, or `None` if the id is out of range.
    /// Byte-level tokens come back in their mapped form (e.g. `Ġ` for a
    /// space), not as decoded text.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Number of tokens the tokenizer knows, added/special tokens included.
    ///
    /// This can be smaller than the model's `vocab_size` in config.json:
    /// Qwen3 pads its embedding table past the last real token.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// `tokenizers` errors can carry nested sources with their own line breaks;
/// our errors promise a single line.
fn one_line(e: &dyn std::fmt::Display) -> String {
    e.to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Turns a stream of generated ids into text chunks that never split a
/// UTF-8 character.
///
/// A byte-level BPE token can hold just part of a character (an emoji is
/// often two or three tokens), so decoding one token at a time would print
/// replacement characters. Instead the decoder re-decodes a short window of
/// recent ids and only emits text once the window no longer ends in an
/// incomplete character. Decoding a window rather than a single id also
/// keeps any context-dependent decoder behaviour (such as leading-space
/// handling) identical to a full decode.
#[derive(Debug, Default, Clone)]
pub struct StreamDecoder {
    /// The ids behind the last emitted chunk (re-decoded as context),
    /// followed by ids whose text has not been emitted yet.
    ids: Vec<u32>,
    /// How many of `ids` are context, i.e. already emitted.
    read: usize,
    /// Text decoded past the context but not yet emitted, for `finish`.
    pending: String,
}

impl StreamDecoder {
    /// A decoder with nothing buffered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one generated id and returns the text it completes, if any.
    ///
    /// Returns `Ok(None)` while the ids so far end inside a multi-byte
    /// character (or add no text). The concatenation of all returned chunks
    /// plus [`finish`](Self::finish) equals `tok.decode(all_ids)`.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let context = tok.decode(&self.ids[..self.read])?;
        let full = tok.decode(&self.ids)?;
        let Some(new) = full.strip_prefix(context.as_str()) else {
            // Cannot happen for byte-level BPE, where decoding concatenates;
            // refusing is better than emitting garbled text.
            return Err(ModelError::Tokenizer(format!(
                "stream decode: text of {} ids does not extend the text of the first {}",
                self.ids.len(),
                self.read
            )));
        };
        if new.is_empty() || new.ends_with(REPLACEMENT) {
            self.pending = new.to_string();
            return Ok(None);
        }
        let out = new.to_string();
        // The ids just emitted become the context for the next step; older
        // context is no longer needed, which keeps each step's decode short.
        self.ids.drain(..self.read);
        self.read = self.ids.len();
        self.pending.clear();
        Ok(Some(out))
    }

    /// Returns whatever text is still held back (an incomplete character
    /// comes out as U+FFFD) and resets the decoder for a new sequence.
    pub fn finish(&mut self) -> Option<String> {
        let rest = std::mem::take(&mut self.pending);
        *self = Self::default();
        (!rest.is_empty()).then_some(rest)
    }
}
