//! Checks of the training options that need no model; every error names the option.

use super::config::{MixedPrecision, TrainConfig};
use anyhow::bail;

impl TrainConfig {
    /// Checks values that do not need the model; errors name the option.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.instance_data_dir.is_none() {
            bail!("--instance-data-dir is required (a folder of training images)");
        }
        if self
            .instance_prompt
            .as_deref()
            .is_none_or(|p| p.trim().is_empty())
        {
            bail!("--instance-prompt is required (e.g. \"a photo of sks dog\")");
        }
        if self.output_dir.is_none() {
            bail!("--output-dir is required");
        }
        self.lora_format()?;
        let name = self.output_name.as_str();
        if name.is_empty()
            || name.starts_with('.')
            || name.contains(['/', '\\', ':'])
            || name.chars().any(char::is_control)
        {
            bail!(
                "--output-name {name:?}: must be a plain file name (no folders), e.g. \"my_lora\""
            );
        }
        if ["params", "optimizer"].contains(&name) {
            bail!("--output-name {name:?}: checkpoints hold a {name}.safetensors of their own; choose another name");
        }
        if self.resolution < 8 || !self.resolution.is_multiple_of(8) {
            bail!(
                "--resolution {}: must be a positive multiple of 8",
                self.resolution
            );
        }
        if self.rank == 0 && !self.full {
            bail!("--rank must be at least 1");
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("--dropout {}: must be in [0, 1)", self.dropout);
        }
        if self.max_train_steps == 0 {
            bail!("--max-train-steps must be at least 1");
        }
        if self.batch_size == 0 || self.gradient_accumulation_steps == 0 {
            bail!("--batch-size and --gradient-accumulation-steps must be at least 1");
        }
        for (name, v) in [
            ("--learning-rate", self.learning_rate),
            ("--learning-rate-text", self.learning_rate_text),
            ("--adam-weight-decay", self.adam_weight_decay),
            ("--adam-epsilon", self.adam_epsilon),
            ("--max-grad-norm", self.max_grad_norm),
            ("--noise-offset", self.noise_offset),
            ("--prior-loss-weight", self.prior_loss_weight),
        ] {
            if !v.is_finite() || v < 0.0 {
                bail!("{name} {v}: must be a finite number >= 0");
            }
        }
        for (name, v) in [
            ("--adam-beta1", self.adam_beta1),
            ("--adam-beta2", self.adam_beta2),
        ] {
            if !(0.0..1.0).contains(&v) {
                bail!("{name} {v}: must be in [0, 1)");
            }
        }
        if let Some(g) = self.min_snr_gamma {
            if !g.is_finite() || g <= 0.0 {
                bail!("--min-snr-gamma {g}: must be > 0 (typical: 5)");
            }
        }
        if let Some(a) = self.lora_alpha {
            if !a.is_finite() || a <= 0.0 {
                bail!("--lora-alpha {a}: must be > 0");
            }
        }
        if self.with_prior_preservation {
            if self.class_data_dir.is_none() {
                bail!("--with-prior-preservation needs --class-data-dir");
            }
            if self
                .class_prompt
                .as_deref()
                .is_none_or(|p| p.trim().is_empty())
            {
                bail!("--with-prior-preservation needs --class-prompt");
            }
            if self.num_class_images == 0 {
                bail!("--num-class-images must be at least 1");
            }
        }
        if self.full && self.gradient_checkpointing {
            bail!("--gradient-checkpointing is a LoRA option (--full trains the norm weights too)");
        }
        if self.full && self.train_text_encoder {
            bail!("--full trains the UNet only; --train-text-encoder is a LoRA option");
        }
        if self.use_ema && !self.full {
            bail!("--use-ema averages the weights of a full fine-tune: it needs --full");
        }
        if !(0.0..1.0).contains(&self.ema_decay) {
            bail!("--ema-decay {}: must be in [0, 1)", self.ema_decay);
        }
        if self.bucket_no_upscale && !self.enable_bucket {
            bail!("--bucket-no-upscale needs --enable-bucket");
        }
        self.bucket_spec()?;
        if self.sample_every > 0 && self.sample_prompt.is_none() {
            bail!("--sample-every needs --sample-prompt");
        }
        if let Some(s) = self.initial_loss_scale {
            if !s.is_finite() || s <= 0.0 {
                bail!("--initial-loss-scale {s}: must be > 0");
            }
        }
        self.validate_pivotal()?;
        if self.full && self.mixed_precision != MixedPrecision::No {
            bail!(
                "--full trains every UNet weight in the model's own dtype, so it has no f32 master \
                 weights: use --mixed-precision no with --full"
            );
        }
        Ok(())
    }

    /// The pivotal-tuning options: present only with `--pivotal`, one initializer per
    /// placeholder (or `--init-random`), no `--full`.
    fn validate_pivotal(&self) -> anyhow::Result<()> {
        let given = [
            ("--placeholder-tokens", self.placeholder_tokens.is_some()),
            ("--initializer-tokens", self.initializer_tokens.is_some()),
            ("--init-random", self.init_random),
            ("--continue-inversion", self.continue_inversion),
            (
                "--continue-inversion-lr",
                self.continue_inversion_lr.is_some(),
            ),
        ];
        if !self.pivotal {
            if let Some((name, _)) = given.iter().find(|(_, on)| *on) {
                bail!("{name} is a pivotal-tuning option: add --pivotal");
            }
            return Ok(());
        }
        if self.full {
            bail!("--pivotal trains LoRA after the new tokens; it cannot be combined with --full");
        }
        let placeholders = self.placeholders()?;
        match (&self.initializer_tokens, self.init_random) {
            (Some(_), true) => {
                bail!("--initializer-tokens and --init-random exclude each other; give one")
            }
            (None, false) => bail!(
                "--pivotal needs --initializer-tokens (one per placeholder, e.g. \"dog|dog\") \
                 or --init-random"
            ),
            _ => {}
        }
        let inits = self.initializers()?;
        if inits.len() != placeholders.len() {
            bail!(
                "--initializer-tokens has {} entries ({:?}) but --placeholder-tokens has {} \
                 ({:?}); give one initializer per placeholder",
                inits.len(),
                inits,
                placeholders.len(),
                placeholders
            );
        }
        if self.continue_inversion_lr.is_some() && !self.continue_inversion {
            bail!("--continue-inversion-lr needs --continue-inversion");
        }
        for (name, v) in [
            ("--learning-rate-ti", Some(self.learning_rate_ti)),
            ("--weight-decay-ti", Some(self.weight_decay_ti)),
            ("--continue-inversion-lr", self.continue_inversion_lr),
        ] {
            if let Some(v) = v.filter(|v| !v.is_finite() || *v < 0.0) {
                bail!("{name} {v}: must be a finite number >= 0");
            }
        }
        Ok(())
    }

    /// The `--placeholder-tokens` list (`|`-separated); an error when empty, blank or repeated.
    pub fn placeholders(&self) -> anyhow::Result<Vec<String>> {
        let Some(s) = self.placeholder_tokens.as_deref() else {
            bail!("--pivotal needs --placeholder-tokens (e.g. \"<s1>|<s2>\")");
        };
        let list: Vec<String> = s.split('|').map(str::to_string).collect();
        for (i, t) in list.iter().enumerate() {
            if t.trim().is_empty() || t.trim() != t {
                bail!("--placeholder-tokens {s:?}: entry {} is {t:?}; tokens must be non-empty and have no surrounding spaces", i + 1);
            }
            if list[..i].contains(t) {
                bail!("--placeholder-tokens {s:?}: {t:?} is given twice");
            }
        }
        Ok(list)
    }

    /// The initializer of each placeholder: the `--initializer-tokens` entries, or
    /// `<rand-0.017>` for each with `--init-random`.
    pub fn initializers(&self) -> anyhow::Result<Vec<String>> {
        match &self.initializer_tokens {
            Some(s) => Ok(s.split('|').map(str::to_string).collect()),
            None => Ok(vec![RANDOM_INIT.to_string(); self.placeholders()?.len()]),
        }
    }
}

/// The original's random initializer (`<rand-0.017>`: normal noise, std 0.017).
pub const RANDOM_INIT: &str = "<rand-0.017>";
