//! What a run writes: checkpoints, the LoRA file with its metadata (or the fully fine-tuned
//! UNet), and sample images.

use super::checkpoint::{self, Checkpoint};
use super::model::lora_file_bytes;
use super::plot::write_loss_log;
use super::trainer::Trainer;
use crate::pipeline::image_io::{save_png, to_rgb8};
use crate::pipeline::GenerateParams;
use anyhow::Context;
use candle_core::Tensor;
use std::collections::BTreeMap;
use std::path::PathBuf;

impl Trainer {
    /// Writes a checkpoint for the current step.
    pub fn save_checkpoint(&mut self) -> anyhow::Result<PathBuf> {
        let (optimizer, _) = self.model.opt.state()?;
        let state = self
            .state
            .to_checkpoint(self.model.params.dropout_states(), self.cfg.training_args());
        let ckpt = Checkpoint {
            params: self.model.params.snapshot()?,
            optimizer: optimizer.into_iter().collect(),
            state,
        };
        let mut extra = vec![];
        if let Some(set) = self.model.params.lora_set()? {
            extra.push((
                "lora.safetensors",
                lora_file_bytes(&set, &self.metadata()?)?,
            ));
        }
        let dir = checkpoint::save(&self.out_dir, &ckpt, &extra)?;
        write_loss_log(&self.out_dir, &self.state.losses)?;
        self.last_checkpoint = Some(dir.clone());
        Ok(dir)
    }

    /// The metadata of the LoRA file.
    pub fn metadata(&self) -> anyhow::Result<BTreeMap<String, String>> {
        let c = &self.cfg;
        // The format version, rank, alpha and targets are added by the `ours` encoder.
        Ok([
            ("base_model", self.model.sd.source.public_name()),
            ("training_args", c.training_args().to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect())
    }

    /// Draws the sample image for the current step into `<output>/samples/`.
    pub(super) fn sample(&mut self) -> anyhow::Result<PathBuf> {
        let prompt = self.cfg.sample_prompt.clone().unwrap_or_default();
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

    /// Writes the final output: `lora.safetensors`, or `unet/` for full fine-tuning.
    pub(super) fn save_final(&self) -> anyhow::Result<PathBuf> {
        match self.model.params.lora_set()? {
            Some(set) => {
                let path = self.out_dir.join("lora.safetensors");
                let bytes = lora_file_bytes(&set, &self.metadata()?)?;
                crate::atomic::write_file(&path, true, |tmp| {
                    std::fs::write(tmp, &bytes)
                        .with_context(|| format!("cannot write {}", path.display()))
                })?;
                Ok(path)
            }
            None => {
                let dir = self.out_dir.join("unet");
                std::fs::create_dir_all(&dir)?;
                let params: BTreeMap<String, Tensor> = self
                    .model
                    .params
                    .snapshot()?
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
