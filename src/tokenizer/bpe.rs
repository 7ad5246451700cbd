//! CLIP byte-level BPE read from `vocab.json` + `merges.txt` (transformers' slow
//! `CLIPTokenizer._tokenize` / `bpe`).

use anyhow::{bail, Context};
use regex::Regex;
use std::collections::HashMap;
use std::path::Path;

/// The number of merges transformers' `CLIPTokenizer` reads from `merges.txt`
/// (`49152 - 256 - 2`); later lines are ignored.
const MAX_MERGES: usize = 49152 - 256 - 2;

/// The CLIP pre-tokenisation pattern. transformers compiles it with `re.IGNORECASE`; on
/// lower-cased text that only matters for the literal alternatives (e.g. `'ſ` matches `'s`),
/// so only those are case-insensitive here (a case-insensitive `\p{L}` would wrongly take
/// U+0345, which the tokenizer replaces by a space beforehand, see `tokenizer::tokenize`).
const CLIP_PATTERN: &str = r"(?i:<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d)|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// GPT-2 / CLIP `bytes_to_unicode`: a printable character for every byte value.
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let printable = |b: u32| {
        (u32::from(b'!')..=u32::from(b'~')).contains(&b)
            || (0xA1..=0xAC).contains(&b)
            || (0xAE..=0xFF).contains(&b)
    };
    let mut extra = 0u32;
    for b in 0..256u32 {
        let cp = if printable(b) {
            b
        } else {
            extra += 1;
            255 + extra
        };
        table[b as usize] = char::from_u32(cp).unwrap_or('\u{FFFD}');
    }
    table
}

/// Byte-level BPE with the `</w>` end-of-word suffix.
pub struct ClipBpe {
    encoder: HashMap<String, u32>,
    /// Merge rank keyed by `"left right"` (a space never occurs in byte-encoded text).
    ranks: HashMap<String, usize>,
    byte_encoder: [char; 256],
    pattern: Regex,
}

impl ClipBpe {
    /// Reads `vocab.json` (token -> id) and `merges.txt` (`#version` header, one merge a line).
    pub fn from_files(vocab_path: &Path, merges_path: &Path) -> anyhow::Result<Self> {
        let vocab_text = std::fs::read_to_string(vocab_path).with_context(|| {
            format!("cannot read tokenizer vocabulary {}", vocab_path.display())
        })?;
        let encoder: HashMap<String, u32> =
            serde_json::from_str(&vocab_text).with_context(|| {
                format!(
                    "{} is not a JSON object mapping tokens to integer ids",
                    vocab_path.display()
                )
            })?;
        if encoder.is_empty() {
            bail!(
                "{} is an empty vocabulary (a CLIP vocab.json maps 49408 tokens to ids)",
                vocab_path.display()
            );
        }
        let merges_text = std::fs::read_to_string(merges_path)
            .with_context(|| format!("cannot read BPE merges {}", merges_path.display()))?;
        let mut ranks = HashMap::new();
        let mut lines = merges_text.trim().split('\n').enumerate().peekable();
        if let Some((_, first)) = lines.peek() {
            if first.starts_with("#version") {
                lines.next();
            }
        }
        for (rank, (line_no, line)) in lines.take(MAX_MERGES).enumerate() {
            let parts: Vec<&str> = line.split_whitespace().collect();
            if parts.len() != 2 {
                bail!(
                    "{} line {}: expected two space-separated symbols, found {:?}",
                    merges_path.display(),
                    line_no + 1,
                    line
                );
            }
            // A repeated merge keeps its last rank, as Python's `dict(zip(merges, range(n)))`.
            ranks.insert(format!("{} {}", parts[0], parts[1]), rank);
        }
        let pattern = Regex::new(CLIP_PATTERN).context("CLIP pre-tokenisation regex")?;
        Ok(Self {
            encoder,
            ranks,
            byte_encoder: bytes_to_unicode(),
            pattern,
        })
    }

    /// The number of entries of `vocab.json`.
    pub fn vocab_len(&self) -> usize {
        self.encoder.len()
    }

    /// The id of `token` in `vocab.json`.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.encoder.get(token).copied()
    }

    /// Splits one byte-encoded word into BPE symbols (the last one carries `</w>`).
    fn bpe(&self, word: &str) -> Vec<String> {
        if word == "<|startoftext|>" || word == "<|endoftext|>" {
            return vec![word.to_string()];
        }
        let chars: Vec<char> = word.chars().collect();
        let mut symbols: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
        match symbols.last_mut() {
            Some(last) => last.push_str("</w>"),
            None => return symbols,
        }
        while symbols.len() > 1 {
            let mut best: Option<(usize, usize)> = None;
            for i in 0..symbols.len() - 1 {
                let key = format!("{} {}", symbols[i], symbols[i + 1]);
                if let Some(&rank) = self.ranks.get(&key) {
                    if best.is_none_or(|(r, _)| rank < r) {
                        best = Some((rank, i));
                    }
                }
            }
            let Some((_, at)) = best else { break };
            let (first, second) = (symbols[at].clone(), symbols[at + 1].clone());
            let mut merged = Vec::with_capacity(symbols.len());
            let mut i = 0;
            while i < symbols.len() {
                if i + 1 < symbols.len() && symbols[i] == first && symbols[i + 1] == second {
                    merged.push(format!("{first}{second}"));
                    i += 2;
                } else {
                    merged.push(std::mem::take(&mut symbols[i]));
                    i += 1;
                }
            }
            symbols = merged;
        }
        symbols
    }

    /// Token ids of already-cleaned text (no bos / eos); unknown symbols map to `unk_id`.
    pub fn encode_clean(&self, text: &str, unk_id: u32) -> Vec<u32> {
        let mut ids = Vec::new();
        for m in self.pattern.find_iter(text) {
            let word: String = m
                .as_str()
                .bytes()
                .map(|b| self.byte_encoder[b as usize])
                .collect();
            for symbol in self.bpe(&word) {
                ids.push(self.encoder.get(&symbol).copied().unwrap_or(unk_id));
            }
        }
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::bytes_to_unicode;

    #[test]
    fn byte_table_matches_gpt2() {
        let t = bytes_to_unicode();
        assert_eq!(t[b'a' as usize], 'a');
        assert_eq!(t[b' ' as usize], '\u{120}'); // 'Ġ'
        assert_eq!(t[0], '\u{100}');
        assert_eq!(t[0xAD], '\u{143}');
        let mut seen = std::collections::HashSet::new();
        assert!(t.iter().all(|c| seen.insert(*c)));
    }
}
