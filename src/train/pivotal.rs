//! Pivotal tuning (cloneofsimo's `lora_pti`): new tokens are added to the tokenizer and to the
//! text encoder, their embedding rows trained alone first (textual inversion), then beside the
//! LoRA (with `--continue-inversion`); they are saved as learned tokens of the LoRA file.
//!
//! The new rows are one variable read by the text encoder after its fixed rows
//! ([`ClipTextModel::set_live_token_rows`](crate::models::clip::ClipTextModel::set_live_token_rows)),
//! so no other row is ever part of the optimizer: the original's restoring of every other row
//! after each step (`index_no_updates`) holds by construction, exactly.

use super::config::TrainConfig;
use super::data::TrainImage;
use crate::lora::LearnedToken;
use crate::pipeline::StableDiffusion;
use crate::rng::Rng;
use anyhow::{bail, Context};
use candle_core::{DType, Tensor, Var};
use std::collections::BTreeMap;

/// The name of the trained rows in checkpoints and in the optimizer.
pub const ROWS_NAME: &str = "text_encoder.token_embedding.placeholders";
/// Stream of the generator of random initialisations, xor-ed into the seed.
const INIT_STREAM: u64 = 0x7E11_5EED;

/// The phase of a pivotal-tuning run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Textual inversion: only the new token rows are trained.
    Inversion,
    /// LoRA (and the rows with `--continue-inversion`).
    Lora,
}

impl Phase {
    /// The phase in which optimizer step `completed + 1` runs.
    pub fn at(cfg: &TrainConfig, completed: usize) -> Self {
        if completed < cfg.ti_phase_steps() {
            Self::Inversion
        } else {
            Self::Lora
        }
    }

    /// The number recorded in checkpoints (1 or 2).
    pub fn number(self) -> u8 {
        match self {
            Self::Inversion => 1,
            Self::Lora => 2,
        }
    }
}

/// The new tokens of a pivotal-tuning run and their trained embedding rows.
pub struct PivotalTokens {
    names: Vec<String>,
    ids: Vec<u32>,
    rows: Var,
}

/// How one placeholder starts.
enum Init {
    Token(u32),
    Random(f64),
    Zero,
}

/// Parses one initializer: `<rand-SIGMA>`, `<zero>` or a word that is exactly one token.
fn parse_init(sd: &StableDiffusion, init: &str) -> anyhow::Result<Init> {
    if let Some(sigma) = init
        .strip_prefix("<rand-")
        .and_then(|s| s.strip_suffix('>'))
    {
        let v: f64 = sigma
            .parse()
            .ok()
            .filter(|v: &f64| v.is_finite() && *v >= 0.0)
            .with_context(|| {
                format!("--initializer-tokens {init:?}: <rand-SIGMA> needs a number >= 0 as SIGMA")
            })?;
        return Ok(Init::Random(v));
    }
    if init == "<zero>" {
        return Ok(Init::Zero);
    }
    let ids = sd.tokenizer.tokenize(init)?;
    match ids.as_slice() {
        [id] => Ok(Init::Token(*id)),
        _ => bail!(
            "--initializer-tokens {init:?} is {} tokens ({ids:?}) for the tokenizer of {}; an \
             initializer must be exactly one token (a common word), <rand-SIGMA> or <zero>",
            ids.len(),
            sd.source.describe()
        ),
    }
}

impl PivotalTokens {
    /// Adds the placeholders of `cfg` to `sd`'s tokenizer (new ids after the vocabulary, in
    /// order) and their rows, initialised as `cfg` says, to its text encoder.
    pub fn attach(sd: &mut StableDiffusion, cfg: &TrainConfig) -> anyhow::Result<Self> {
        let names = cfg.placeholders()?;
        let inits = cfg.initializers()?;
        for n in &names {
            if let Some(id) = sd.tokenizer.token_id(n) {
                bail!(
                    "--placeholder-tokens: {n:?} is already in the vocabulary of {} (id {id}); \
                     pick a token the tokenizer does not know (e.g. \"<s1>\")",
                    sd.source.describe()
                );
            }
        }
        let table = sd.text_encoder()?.token_embedding_all()?;
        let width = table.dim(1)?;
        let dev = sd.device.clone();
        let mut rng = Rng::new(cfg.seed ^ INIT_STREAM);
        let mut rows = Vec::with_capacity(names.len());
        for init in &inits {
            let row = match parse_init(sd, init)? {
                Init::Token(id) => table.get(id as usize)?.to_dtype(DType::F32)?,
                Init::Random(sigma) => rng.randn(width, &dev)?.affine(sigma, 0.0)?,
                Init::Zero => Tensor::zeros(width, DType::F32, &dev)?,
            };
            rows.push(row);
        }
        let rows = Var::from_tensor(&Tensor::stack(&rows, 0)?)?;
        let mut ids = vec![];
        for n in &names {
            ids.extend(sd.tokenizer.add_learned_token(std::slice::from_ref(n))?);
        }
        let encoder = sd
            .text_encoder_mut()
            .context("the text encoder was released before the placeholders were added")?;
        let first = encoder.set_live_token_rows(rows.as_tensor().clone())?;
        if ids.first().is_some_and(|&i| i as usize != first) {
            bail!(
                "the tokenizer gave the placeholders ids from {} but the text encoder's rows \
                 start at {first} (its vocabulary sizes differ)",
                ids[0]
            );
        }
        sd.clear_prompt_cache();
        Ok(Self { names, ids, rows })
    }

    /// The placeholder tokens, in order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Their tokenizer ids.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// The trained rows `[n, width]` by [`ROWS_NAME`].
    pub fn named_var(&self) -> (String, Var) {
        (ROWS_NAME.to_string(), self.rows.clone())
    }

    /// The rows as learned tokens (copies), for the LoRA file.
    pub fn learned_tokens(&self) -> anyhow::Result<Vec<LearnedToken>> {
        let rows = self.rows.as_tensor().detach();
        self.names
            .iter()
            .enumerate()
            .map(|(i, n)| Ok(LearnedToken::new(n, rows.get(i)?.copy()?)?))
            .collect()
    }

    /// A copy of the rows for a checkpoint.
    pub fn snapshot(&self) -> anyhow::Result<(String, Tensor)> {
        Ok((
            ROWS_NAME.to_string(),
            self.rows.as_tensor().detach().copy()?,
        ))
    }

    /// Restores the rows from a checkpoint's tensors.
    pub fn restore(&self, params: &BTreeMap<String, Tensor>) -> anyhow::Result<()> {
        let t = params.get(ROWS_NAME).with_context(|| {
            format!("checkpoint does not fit this run: {ROWS_NAME} (the placeholder rows) missing")
        })?;
        if t.dims() != self.rows.dims() {
            bail!(
                "checkpoint does not fit this run: {ROWS_NAME} has shape {:?}, the run trains {:?}",
                t.dims(),
                self.rows.dims()
            );
        }
        self.rows
            .set(&t.to_dtype(DType::F32)?.to_device(self.rows.device())?)?;
        Ok(())
    }

    /// The original's `clip_ti_decay` after a textual-inversion step at learning rate `lr`:
    /// each row keeps its direction and its norm moves towards 0.4 by `min(1, 100·lr)`.
    pub fn decay_norms(&self, lr: f64) -> anyhow::Result<()> {
        let lambda = (100.0 * lr).min(1.0);
        let r = self.rows.as_tensor().detach();
        let norm = r.sqr()?.sum_keepdim(1)?.sqrt()?;
        let unit = r.broadcast_div(&norm.maximum(1e-12)?)?;
        let target = norm.affine(1.0 - lambda, 0.4 * lambda)?;
        self.rows.set(&unit.broadcast_mul(&target)?)?;
        Ok(())
    }

    /// Replaces `{}` in every caption by the placeholders joined (`<s1><s2>`, the original's
    /// template filling); returns the number of captions that name no placeholder, an error
    /// when none does (textual inversion would train nothing).
    pub fn fill_captions(&self, images: &mut [TrainImage]) -> anyhow::Result<usize> {
        let joined = self.names.concat();
        let mut without = 0;
        for im in images.iter_mut() {
            im.caption = im.caption.replace("{}", &joined);
            if !self.names.iter().any(|n| im.caption.contains(n.as_str())) {
                without += 1;
            }
        }
        if without == images.len() {
            bail!(
                "--pivotal: no caption names a placeholder ({}); write them in \
                 --instance-prompt (e.g. \"a photo of {joined}\", or \"a photo of {{}}\")",
                self.names.join(", ")
            );
        }
        Ok(without)
    }
}
