//! Learned tokens (textual inversion, pivotal tuning) at generation time: each becomes new
//! tokenizer ids after the vocabulary, in order, with its vectors appended to the text
//! encoder's token embedding (cloneofsimo's `apply_learned_embed_in_clip`, diffusers'
//! `load_textual_inversion`).

use super::StableDiffusion;
use crate::formats::embeddings::{read_standalone, EmbeddingSpec};
use crate::lora::{LearnedToken, LoraSet};
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};

/// A learned token and the file it came from.
#[derive(Debug, Clone)]
pub struct SourcedToken {
    /// The file that defines it.
    pub file: PathBuf,
    /// The token and its vectors.
    pub token: LearnedToken,
}

/// The learned tokens of `loras` (each LoRA file's own, in file order) then of the standalone
/// files `embeddings`; an error naming both files when two define the same token name.
pub fn collect_tokens(
    loras: &[(&Path, &LoraSet)],
    embeddings: &[EmbeddingSpec],
) -> anyhow::Result<Vec<SourcedToken>> {
    let mut out: Vec<SourcedToken> = vec![];
    let mut push = |file: &Path, token: LearnedToken| -> anyhow::Result<()> {
        for name in token.token_names() {
            if let Some(prev) = out.iter().find(|p| p.token.token_names().contains(&name)) {
                bail!(
                    "token {name:?} is defined by both {} and {}; load only one of them",
                    prev.file.display(),
                    file.display()
                );
            }
        }
        out.push(SourcedToken {
            file: file.to_path_buf(),
            token,
        });
        Ok(())
    };
    for (file, set) in loras {
        for e in &set.embeddings {
            push(file, e.clone())?;
        }
    }
    for spec in embeddings {
        let tokens = read_standalone(&spec.path, spec.token.as_deref())
            .with_context(|| format!("cannot read embedding file {}", spec.path.display()))?;
        for e in tokens {
            push(&spec.path, e)?;
        }
    }
    Ok(out)
}

impl StableDiffusion {
    /// Adds `tokens` to the tokenizer and the text encoder. Every token is checked first
    /// (width = the text encoder's hidden size, name not in the vocabulary); nothing changes
    /// on an error.
    pub fn add_learned_tokens(&mut self, tokens: &[SourcedToken]) -> anyhow::Result<()> {
        if tokens.is_empty() {
            return Ok(());
        }
        let width = self.text_encoder()?.config().hidden_size;
        for t in tokens {
            if t.token.width() != width {
                bail!(
                    "{}: token {:?} has embedding width {}, the text encoder of {} has {width}",
                    t.file.display(),
                    t.token.token,
                    t.token.width(),
                    self.source.describe()
                );
            }
            for name in t.token.token_names() {
                if let Some(id) = self.tokenizer.token_id(&name) {
                    bail!(
                        "{}: token {name:?} is already in the tokenizer's vocabulary (id {id}); \
                         rename it (--embedding FILE:TOKEN for a standalone file)",
                        t.file.display()
                    );
                }
            }
        }
        let encoder = self
            .text_encoder
            .as_mut()
            .context("the text encoder was released before the learned tokens were added")?;
        for t in tokens {
            let ids = self
                .tokenizer
                .add_learned_token(&t.token.token_names())
                .with_context(|| format!("{}", t.file.display()))?;
            let first = encoder.append_token_embeddings(&t.token.vectors)?;
            if first as u32 != ids[0] {
                bail!(
                    "{}: token {:?} got tokenizer id {} but text-encoder row {first} (the \
                     tokenizer and the text encoder's vocabulary sizes differ)",
                    t.file.display(),
                    t.token.token,
                    ids[0]
                );
            }
        }
        self.prompt_cache.clear();
        Ok(())
    }

    /// The learned tokens (by name) whose first id occurs in none of `prompts`.
    pub fn absent_tokens(
        &self,
        tokens: &[SourcedToken],
        prompts: &[&str],
    ) -> anyhow::Result<Vec<String>> {
        let mut ids = vec![];
        for p in prompts {
            ids.extend(self.tokenizer.tokenize(p)?);
        }
        Ok(tokens
            .iter()
            .filter(|t| {
                self.tokenizer
                    .token_id(&t.token.token)
                    .is_none_or(|id| !ids.contains(&id))
            })
            .map(|t| t.token.token.clone())
            .collect())
    }
}
