//! CLIP tokenizer equal to transformers' slow `CLIPTokenizer` (without ftfy), as diffusers'
//! Stable Diffusion pipelines use it: `padding="max_length", max_length=77, truncation=True`.
//!
//! Two engines share the same special-token splitting and text cleanup: our own byte-level
//! BPE over `vocab.json` + `merges.txt`, or the `tokenizers` crate over `tokenizer.json`.

mod bpe;
mod clean;

pub use clean::basic_clean;

use anyhow::{anyhow, bail, Context};
use bpe::ClipBpe;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The sequence length of every Stable Diffusion CLIP text encoder.
pub const DEFAULT_MAX_LENGTH: usize = 77;
const DEFAULT_BOS: &str = "<|startoftext|>";
const DEFAULT_EOS: &str = "<|endoftext|>";

/// Where the ids of ordinary text come from.
#[allow(clippy::large_enum_variant)] // one per tokenizer, never moved in a loop
enum Engine {
    Bpe(ClipBpe),
    Hf(Box<tokenizers::Tokenizer>),
}

impl Engine {
    fn token_to_id(&self, token: &str) -> Option<u32> {
        match self {
            Engine::Bpe(b) => b.token_to_id(token),
            Engine::Hf(t) => t.token_to_id(token),
        }
    }

    fn vocab_len(&self) -> usize {
        match self {
            Engine::Bpe(b) => b.vocab_len(),
            Engine::Hf(t) => t.get_vocab_size(false),
        }
    }
}

/// A token matched verbatim in the input before any cleanup (transformers' added tokens).
#[derive(Debug, Clone)]
struct AddedToken {
    content: String,
    id: u32,
    lstrip: bool,
    rstrip: bool,
    /// Ids that follow `id` (the other vectors of a multi-vector learned token).
    more: Vec<u32>,
}

/// Special-token settings read from `tokenizer_config.json` / `special_tokens_map.json`.
#[derive(Debug, Default)]
struct TokenSettings {
    bos: Option<String>,
    eos: Option<String>,
    unk: Option<String>,
    pad: Option<String>,
    extra: Vec<String>,
    /// `added_tokens_decoder` entries: (content, id, lstrip, rstrip).
    added: Vec<AddedToken>,
    model_max_length: Option<usize>,
}

/// The text of a special-token entry: a plain string or an `{"content": ...}` object.
fn token_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

fn read_json(path: &Path) -> anyhow::Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let v = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    Ok(Some(v))
}

impl TokenSettings {
    /// Merges `tokenizer_config.json` (first) and `special_tokens_map.json` (fallback).
    fn from_dir(dir: &Path) -> anyhow::Result<Self> {
        let mut s = TokenSettings::default();
        let config_path = dir.join("tokenizer_config.json");
        let map_path = dir.join("special_tokens_map.json");
        for (path, v) in [
            (&config_path, read_json(&config_path)?),
            (&map_path, read_json(&map_path)?),
        ] {
            let Some(v) = v else { continue };
            let Some(obj) = v.as_object() else {
                bail!("{} must hold a JSON object", path.display());
            };
            let get = |k: &str| obj.get(k).and_then(token_text);
            s.bos = s.bos.take().or_else(|| get("bos_token"));
            s.eos = s.eos.take().or_else(|| get("eos_token"));
            s.unk = s.unk.take().or_else(|| get("unk_token"));
            s.pad = s.pad.take().or_else(|| get("pad_token"));
            if let Some(list) = obj
                .get("additional_special_tokens")
                .and_then(Value::as_array)
            {
                s.extra.extend(list.iter().filter_map(token_text));
            }
            if s.model_max_length.is_none() {
                // transformers writes a huge sentinel (1e30) when the length is unset.
                s.model_max_length = obj
                    .get("model_max_length")
                    .and_then(Value::as_u64)
                    .filter(|&n| n <= 1 << 20)
                    .map(|n| n as usize);
            }
            if let Some(decoder) = obj.get("added_tokens_decoder").and_then(Value::as_object) {
                for (id, entry) in decoder {
                    let id: u32 = id.parse().with_context(|| {
                        format!(
                            "{}: added_tokens_decoder key {id:?} is not an integer id",
                            path.display()
                        )
                    })?;
                    let content = token_text(entry).ok_or_else(|| {
                        anyhow!(
                            "{}: added_tokens_decoder[{id}] has no \"content\"",
                            path.display()
                        )
                    })?;
                    let flag = |k: &str| entry.get(k).and_then(Value::as_bool).unwrap_or(false);
                    s.added.push(AddedToken {
                        content,
                        id,
                        lstrip: flag("lstrip"),
                        rstrip: flag("rstrip"),
                        more: vec![],
                    });
                }
            }
        }
        Ok(s)
    }
}

/// CLIP tokenizer producing fixed-length id sequences (bos, tokens, eos, padding).
pub struct ClipTokenizer {
    engine: Engine,
    /// Tokens split out of the raw text first, longest first.
    added: Vec<AddedToken>,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    unk_id: u32,
    max_length: usize,
    source: PathBuf,
}

impl ClipTokenizer {
    /// Loads a diffusers `tokenizer/` folder: `tokenizer.json` when present, otherwise
    /// `vocab.json` + `merges.txt`, plus `tokenizer_config.json` / `special_tokens_map.json`.
    pub fn from_dir(dir: &Path) -> anyhow::Result<Self> {
        if !dir.is_dir() {
            bail!("tokenizer directory {} does not exist", dir.display());
        }
        let settings = TokenSettings::from_dir(dir)?;
        let json_path = dir.join("tokenizer.json");
        let (engine, source) = if json_path.is_file() {
            let mut t = tokenizers::Tokenizer::from_file(&json_path)
                .map_err(|e| anyhow!("cannot load {}: {e}", json_path.display()))?;
            t.with_truncation(None)
                .map_err(|e| anyhow!("{}: {e}", json_path.display()))?;
            t.with_padding(None);
            (Engine::Hf(Box::new(t)), json_path)
        } else {
            let vocab = dir.join("vocab.json");
            let merges = dir.join("merges.txt");
            for p in [&vocab, &merges] {
                if !p.is_file() {
                    bail!(
                        "tokenizer file {} is missing (need tokenizer.json, or vocab.json + merges.txt)",
                        p.display()
                    );
                }
            }
            (Engine::Bpe(ClipBpe::from_files(&vocab, &merges)?), vocab)
        };
        Self::assemble(engine, settings, source)
    }

    fn assemble(engine: Engine, s: TokenSettings, source: PathBuf) -> anyhow::Result<Self> {
        let mut added = s.added.clone();
        if let Engine::Hf(t) = &engine {
            for (id, tok) in t.get_added_tokens_decoder() {
                if !added.iter().any(|a| a.content == tok.content) {
                    added.push(AddedToken {
                        content: tok.content.clone(),
                        id,
                        lstrip: tok.lstrip,
                        rstrip: tok.rstrip,
                        more: vec![],
                    });
                }
            }
        }
        let bos = s.bos.clone().unwrap_or_else(|| DEFAULT_BOS.to_string());
        let eos = s.eos.clone().unwrap_or_else(|| DEFAULT_EOS.to_string());
        let unk = s.unk.clone().unwrap_or_else(|| DEFAULT_EOS.to_string());
        let pad = s.pad.clone().unwrap_or_else(|| DEFAULT_EOS.to_string());
        let mut specials = vec![bos.clone(), eos.clone(), unk.clone(), pad.clone()];
        specials.extend(s.extra.iter().cloned());
        for tok in specials {
            if added.iter().any(|a| a.content == tok) {
                continue;
            }
            let id = engine.token_to_id(&tok).ok_or_else(|| {
                anyhow!(
                    "special token {tok:?} is not in the vocabulary of {}",
                    source.display()
                )
            })?;
            added.push(AddedToken {
                content: tok,
                id,
                lstrip: false,
                rstrip: false,
                more: vec![],
            });
        }
        added.sort_by_key(|a| std::cmp::Reverse(a.content.len()));
        let id_of = |tok: &str| -> anyhow::Result<u32> {
            added
                .iter()
                .find(|a| a.content == tok)
                .map(|a| a.id)
                .ok_or_else(|| anyhow!("special token {tok:?} has no id in {}", source.display()))
        };
        let (bos_id, eos_id, pad_id, unk_id) =
            (id_of(&bos)?, id_of(&eos)?, id_of(&pad)?, id_of(&unk)?);
        let max_length = s.model_max_length.unwrap_or(DEFAULT_MAX_LENGTH);
        if max_length < 2 {
            bail!(
                "model_max_length {max_length} leaves no room for bos and eos ({})",
                source.display()
            );
        }
        Ok(Self {
            engine,
            added,
            bos_id,
            eos_id,
            pad_id,
            unk_id,
            max_length,
            source,
        })
    }

    /// The same tokenizer padding with `token` (a vocabulary entry, made a special token as
    /// SD 2.x's tokenizer config makes `!`).
    pub fn with_pad_token(mut self, token: &str) -> anyhow::Result<Self> {
        let id = match self.added.iter().find(|a| a.content == token) {
            Some(a) => a.id,
            None => {
                let id = self.engine.token_to_id(token).ok_or_else(|| {
                    anyhow!(
                        "pad token {token:?} is not in the vocabulary of {}",
                        self.source.display()
                    )
                })?;
                self.added.push(AddedToken {
                    content: token.to_string(),
                    id,
                    lstrip: false,
                    rstrip: false,
                    more: vec![],
                });
                self.added
                    .sort_by_key(|a| std::cmp::Reverse(a.content.len()));
                id
            }
        };
        self.pad_id = id;
        Ok(self)
    }

    /// The number of ids: the vocabulary and every added token (transformers' `len(tokenizer)`).
    pub fn len(&self) -> usize {
        let added = self
            .added
            .iter()
            .map(|a| a.id as usize + 1)
            .max()
            .unwrap_or(0);
        self.engine.vocab_len().max(added)
    }

    /// True when the tokenizer has no ids at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The id of `token` when it is a vocabulary entry or an added token.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.added
            .iter()
            .find(|a| a.content == token)
            .map(|a| a.id)
            .or_else(|| self.engine.token_to_id(token))
    }

    /// Adds `tokens` (the names of one learned token's vectors: `token`, `token_1`, …) as new
    /// ids after the last one, in order, like transformers' `add_tokens` (matched verbatim in
    /// the raw text, no stripping). The first name, found in a prompt, gives all the ids, as
    /// diffusers' `maybe_convert_prompt` expands a multi-vector token. Returns the new ids; an
    /// error when a name is empty or already known.
    pub fn add_learned_token(&mut self, tokens: &[String]) -> anyhow::Result<Vec<u32>> {
        if tokens.is_empty() {
            bail!("a learned token needs at least one name");
        }
        for t in tokens {
            if t.is_empty() {
                bail!("a learned token cannot be the empty string");
            }
            if let Some(id) = self.token_id(t) {
                bail!(
                    "token {t:?} is already in the vocabulary of {} (id {id}); pick another token",
                    self.source.display()
                );
            }
        }
        let first = self.len() as u32;
        let ids: Vec<u32> = (first..first + tokens.len() as u32).collect();
        for (i, (t, id)) in tokens.iter().zip(&ids).enumerate() {
            self.added.push(AddedToken {
                content: t.clone(),
                id: *id,
                lstrip: false,
                rstrip: false,
                more: if i == 0 { ids[1..].to_vec() } else { vec![] },
            });
        }
        self.added
            .sort_by_key(|a| std::cmp::Reverse(a.content.len()));
        Ok(ids)
    }

    /// Sequence length of `encode` (`model_max_length`, 77 when unset).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Id used to pad sequences (`<|endoftext|>` for SD 1.x, `!` for SD 2.x).
    pub fn pad_token_id(&self) -> u32 {
        self.pad_id
    }

    /// Id of `<|startoftext|>`.
    pub fn bos_token_id(&self) -> u32 {
        self.bos_id
    }

    /// Id of `<|endoftext|>`.
    pub fn eos_token_id(&self) -> u32 {
        self.eos_id
    }

    /// The file the vocabulary came from (`tokenizer.json` or `vocab.json`).
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// Splits raw text on added tokens: (text before, token) pairs, honouring lstrip/rstrip.
    fn split_added<'a>(&self, text: &'a str) -> Vec<(&'a str, Option<&AddedToken>)> {
        let mut out = Vec::new();
        let mut start = 0;
        let mut pos = 0;
        let mut strip_next = false;
        while pos < text.len() {
            let hit = self
                .added
                .iter()
                .find(|a| !a.content.is_empty() && text[pos..].starts_with(&a.content));
            match hit {
                Some(tok) => {
                    let mut before = &text[start..pos];
                    if strip_next {
                        before = before.trim_start();
                    }
                    if tok.lstrip {
                        before = before.trim_end();
                    }
                    out.push((before, Some(tok)));
                    pos += tok.content.len();
                    start = pos;
                    strip_next = tok.rstrip;
                }
                None => pos += text[pos..].chars().next().map_or(1, char::len_utf8),
            }
        }
        let mut rest = &text[start..];
        if strip_next {
            rest = rest.trim_start();
        }
        out.push((rest, None));
        out
    }

    /// Ids of cleaned text (no bos / eos) from the active engine.
    fn encode_clean(&self, clean: &str) -> anyhow::Result<Vec<u32>> {
        if clean.is_empty() {
            return Ok(Vec::new());
        }
        match &self.engine {
            Engine::Bpe(b) => Ok(b.encode_clean(clean, self.unk_id)),
            Engine::Hf(t) => {
                let enc = t
                    .encode(clean, false)
                    .map_err(|e| anyhow!("tokenizing with {}: {e}", self.source.display()))?;
                Ok(enc.get_ids().to_vec())
            }
        }
    }

    /// The token ids of `text` without bos / eos, padding or truncation.
    pub fn tokenize(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        let mut ids = Vec::new();
        for (piece, tok) in self.split_added(text) {
            // U+0345 matches no alternative of transformers' case-insensitive CLIP regex, so
            // `re.findall` skips it: it only separates the words around it.
            let clean = basic_clean(piece).replace('\u{345}', " ");
            ids.extend(self.encode_clean(&clean)?);
            if let Some(tok) = tok {
                ids.push(tok.id);
                ids.extend_from_slice(&tok.more);
            }
        }
        Ok(ids)
    }

    /// Exactly `max_length()` ids: bos, the tokens truncated so that eos fits, eos, padding.
    pub fn encode(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        let mut tokens = self.tokenize(text)?;
        tokens.truncate(self.max_length - 2);
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos_id);
        ids.extend(tokens);
        ids.push(self.eos_id);
        ids.resize(self.max_length, self.pad_id);
        Ok(ids)
    }

    /// `encode` for every prompt.
    pub fn encode_batch<S: AsRef<str>>(&self, texts: &[S]) -> anyhow::Result<Vec<Vec<u32>>> {
        texts.iter().map(|t| self.encode(t.as_ref())).collect()
    }
}
