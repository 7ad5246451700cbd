//! What a run writes: checkpoints, the LoRA file with its metadata (or the fully fine-tuned
//! UNet), and sample images.

use super::checkpoint::{self, Checkpoint};
use super::model::lora_file_bytes_as;
use super::pivotal::Phase;
use super::plot::write_loss_log;
use super::setup::optimizer_for;
use super::trainer::Trainer;
use crate::formats::kohya_meta;
use crate::lora::LoraSet;
use crate::models::unet::config::PerBlock;
use crate::pipeline::image_io::{save_png, to_rgb8};
use crate::pipeline::GenerateParams;
use crate::schedulers::PredictionType;
use anyhow::Context;
use candle_core::Tensor;
use std::collections::BTreeMap;
use std::path::PathBuf;

impl Trainer {
    /// Writes a checkpoint for the current step.
    pub fn save_checkpoint(&mut self) -> anyhow::Result<PathBuf> {
        let m = &self.model;
        // The phase of the next step: at the end of textual inversion that is the LoRA phase,
        // whose optimizer starts from zero moments.
        let phase = Phase::at(&self.cfg, self.state.step);
        let (optimizer, _) = match phase == m.phase {
            true => m.opt.state()?,
            false => optimizer_for(&self.cfg, &m.params, m.tokens.as_ref(), phase)?.state()?,
        };
        let mut state = self
            .state
            .to_checkpoint(m.params.dropout_states(), self.cfg.training_args());
        let mut params = m.params.snapshot()?;
        if let Some(t) = &m.tokens {
            state.phase = Some(phase.number());
            let (name, rows) = t.snapshot()?;
            params.insert(name, rows);
        }
        let ckpt = Checkpoint {
            params,
            optimizer: optimizer.into_iter().collect(),
            ema: match &self.model.ema {
                Some(e) => e.state()?,
                None => BTreeMap::new(),
            },
            state,
        };
        let mut extra = vec![];
        let name = self.lora_file_name();
        if let Some(set) = self.lora_set()? {
            let bytes = lora_file_bytes_as(&set, &self.metadata()?, self.cfg.lora_format()?)?;
            extra.push((name.as_str(), bytes));
        }
        let dir = checkpoint::save(&self.out_dir, &ckpt, &extra)?;
        write_loss_log(&self.out_dir, &self.state.losses)?;
        self.last_checkpoint = Some(dir.clone());
        Ok(dir)
    }

    /// The trained LoRA with the learned tokens of pivotal tuning; `None` for full
    /// fine-tuning.
    pub fn lora_set(&self) -> anyhow::Result<Option<LoraSet>> {
        let Some(mut set) = self.model.params.lora_set()? else {
            return Ok(None);
        };
        if let Some(t) = &self.model.tokens {
            set.embeddings = t.learned_tokens()?;
        }
        Ok(Some(set))
    }

    /// The LoRA file's name, `<output_name>.safetensors`.
    pub fn lora_file_name(&self) -> String {
        format!("{}.safetensors", self.cfg.output_name)
    }

    /// The metadata of the LoRA file: the base model's name, the training options, and the
    /// keys sd-scripts records (`ss_*` training settings, the model family, the model-spec
    /// title / resolution / date). The format's own keys (rank, alpha, targets, hashes, …)
    /// are added by its encoder.
    pub fn metadata(&self) -> anyhow::Result<BTreeMap<String, String>> {
        let c = &self.cfg;
        let sd = &self.model.sd;
        let json = |v: serde_json::Value| match v {
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        };
        let py_bool = |b: bool| if b { "True" } else { "False" }.to_string();
        let mut m: BTreeMap<String, String> = BTreeMap::new();
        let mut put = |k: &str, v: String| {
            m.insert(k.to_string(), v);
        };
        put("base_model", sd.source.public_name());
        put("training_args", c.training_args().to_string());
        put("ss_sd_model_name", sd.source.public_name());
        put("ss_output_name", c.output_name.clone());
        put("ss_learning_rate", c.learning_rate.to_string());
        put("ss_unet_lr", c.learning_rate.to_string());
        if c.train_text_encoder {
            put("ss_text_encoder_lr", c.learning_rate_text.to_string());
        }
        put("ss_max_train_steps", c.max_train_steps.to_string());
        put("ss_steps", self.state.step.to_string());
        put(
            "ss_lr_scheduler",
            json(serde_json::to_value(c.lr_scheduler)?),
        );
        put("ss_lr_warmup_steps", c.lr_warmup_steps.to_string());
        put("ss_batch_size_per_device", c.batch_size.to_string());
        put(
            "ss_gradient_accumulation_steps",
            c.gradient_accumulation_steps.to_string(),
        );
        put("ss_max_grad_norm", c.max_grad_norm.to_string());
        put("ss_network_dropout", c.dropout.to_string());
        put("ss_noise_offset", c.noise_offset.to_string());
        if let Some(g) = c.min_snr_gamma {
            put("ss_min_snr_gamma", g.to_string());
        }
        put("ss_prior_loss_weight", c.prior_loss_weight.to_string());
        put("ss_cache_latents", py_bool(c.cache_latents));
        put("ss_seed", c.seed.to_string());
        put("ss_resolution", format!("({0}, {0})", c.resolution));
        put("ss_mixed_precision", c.mixed_precision.to_string());
        let family = self.family();
        put("ss_v2", py_bool(family.v2));
        put("ss_base_model_version", family.base_model_version());
        put(
            "modelspec.prediction_type",
            if family.v_prediction { "v" } else { "epsilon" }.to_string(),
        );
        put("modelspec.title", c.output_name.clone());
        put("modelspec.resolution", format!("{0}x{0}", c.resolution));
        // The day only, so that a resumed run writes the same bytes as an uninterrupted one.
        let date = kohya_meta::iso_datetime(kohya_meta::now_secs());
        put("modelspec.date", date[..10].to_string());
        Ok(m)
    }

    /// The SD family of the trained model: SD 2 by its 1024-wide text context (for models of
    /// other sizes: by its linear transformer projections, as SD 2 has them), v-prediction by
    /// its scheduler config.
    fn family(&self) -> kohya_meta::Family {
        let sd = &self.model.sd;
        // The UNet's cross-attention width is the text encoder's (which may have been freed).
        let width = match &sd.unet_config.cross_attention_dim {
            PerBlock::One(w) => *w,
            PerBlock::Many(w) => w.first().copied().unwrap_or(0),
        };
        let v2 = match width {
            1024 => true,
            768 => false,
            _ => sd.unet_config.use_linear_projection,
        };
        kohya_meta::Family {
            v2,
            v_prediction: sd.scheduler_config.prediction_type == PredictionType::VPrediction,
        }
    }

    /// Draws the sample image for the current step into `<output>/samples/`.
    pub(super) fn sample(&mut self) -> anyhow::Result<PathBuf> {
        let prompt = self.cfg.sample_prompt.clone().unwrap_or_default();
        if self.model.tokens.is_some() {
            self.model.sd.clear_prompt_cache();
        }
        let params = GenerateParams {
            prompt,
            steps: self.cfg.sample_steps,
            guidance: self.cfg.sample_guidance,
            seed: self.cfg.seed,
            height: Some(self.cfg.resolution),
            width: Some(self.cfg.resolution),
            ..Default::default()
        };
        let m = &mut self.model;
        let img = m
            .params
            .with_snapshot(&mut m.sd, |sd| sd.generate(&params, &mut |_, _| {}))?;
        let dir = self.out_dir.join("samples");
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join(format!("step-{:06}.png", self.state.step));
        save_png(&to_rgb8(&img)?[0], &path, true)?;
        Ok(path)
    }

    /// Writes the final output: `<output_name>.safetensors` in the `save_format` layout, or
    /// `unet/` for full fine-tuning.
    pub(super) fn save_final(&self) -> anyhow::Result<PathBuf> {
        match self.lora_set()? {
            Some(set) => {
                let path = self.out_dir.join(self.lora_file_name());
                let format = self.cfg.lora_format()?;
                let bytes = lora_file_bytes_as(&set, &self.metadata()?, format)?;
                crate::atomic::write_file(&path, true, |tmp| {
                    std::fs::write(tmp, &bytes)
                        .with_context(|| format!("cannot write {}", path.display()))
                })?;
                if let Some(side) = crate::formats::sidecar_for(&set, &path, format) {
                    crate::formats::embeddings::write_standalone(&set, &side, true)?;
                    self.hooks.note(format!(
                        "note: --save-format {format} cannot hold the learned tokens; they are in {}",
                        side.display()
                    ));
                }
                Ok(path)
            }
            None => {
                let dir = self.out_dir.join("unet");
                std::fs::create_dir_all(&dir)?;
                let weights = match &self.model.ema {
                    Some(e) => e.weights().clone(),
                    None => self.model.params.snapshot()?,
                };
                let params: BTreeMap<String, Tensor> = weights
                    .into_iter()
                    .map(|(k, v)| (k.trim_start_matches("unet.").to_string(), v))
                    .collect();
                let path = dir.join("diffusion_pytorch_model.safetensors");
                let params = crate::tensor_file::out_tensors(&params)?;
                crate::tensor_file::write(&path, params, &BTreeMap::new(), true)?;
                if let Some(cfg) = self.model.sd.source.file("unet/config.json")? {
                    std::fs::copy(&cfg, dir.join("config.json"))
                        .with_context(|| format!("cannot copy {}", cfg.display()))?;
                }
                Ok(path)
            }
        }
    }
}
