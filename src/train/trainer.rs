//! The training loop: steps with gradient accumulation / clipping / AdamW / schedule,
//! checkpoints and samples on schedule, NaN and Ctrl-C handling, and the final outputs. Set-up
//! is in `setup.rs`, writing files in `outputs.rs`.
//!
//! A [`Trainer`] is made of what it is: the model being trained ([`TrainedModel`]), where its
//! batches come from ([`BatchSource`]), the state a checkpoint saves ([`RunState`]), the
//! options and the caller's hooks.

use super::bucket::BucketTable;
use super::config::TrainConfig;
use super::ema::Ema;
use super::hooks::TrainHooks;
use super::loss::{dreambooth_loss, min_snr_weights, noise_batch};
use super::model::Trainable;
use super::optim::{clip_grad_norm, lr_factor, AdamW};
use super::pivotal::{Phase, PivotalTokens};
use super::plot::{write_loss_log, LossPoint};
use super::scaler::ScaleUpdate;
use super::source::{Batch, BatchSource};
use super::state::RunState;
use crate::pipeline::StableDiffusion;
use crate::schedulers::{DdpmScheduler, PredictionType};
use candle_core::Tensor;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Instant;

/// What a finished (or interrupted) run produced.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    /// Optimizer steps completed in total (including those before a resume).
    pub steps: usize,
    /// The loss log.
    pub losses: Vec<LossPoint>,
    /// The final LoRA file (or the fully fine-tuned UNet file), absent when interrupted.
    pub output: Option<PathBuf>,
    /// The last checkpoint written, if any.
    pub checkpoint: Option<PathBuf>,
    /// Whether the run stopped early (Ctrl-C or `stop_after`).
    pub interrupted: bool,
    /// Steps run by this call (fewer than `steps` after a resume).
    pub steps_this_run: usize,
    /// Number of trained scalars.
    pub trained_params: usize,
    /// Seconds spent in training steps.
    pub train_seconds: f64,
}

/// The model being trained: the pipeline with its trainable part, the optimizer over that
/// part, and the noise schedule the loss is computed under.
pub struct TrainedModel {
    /// The pipeline the trained parameters are attached to.
    pub sd: StableDiffusion,
    /// The trained parameters (LoRA adapters or the whole UNet).
    pub params: Trainable,
    /// AdamW over `params`.
    pub opt: AdamW,
    /// The training noise schedule.
    pub sched: DdpmScheduler,
    /// What the UNet predicts (epsilon, v).
    pub prediction: PredictionType,
    /// The moving average of the trained weights (`--use-ema`).
    pub ema: Option<Ema>,
    /// The new tokens of pivotal tuning (`--pivotal`).
    pub tokens: Option<PivotalTokens>,
    /// The phase `opt` belongs to (always [`Phase::Lora`] without `--pivotal`).
    pub phase: Phase,
}

/// A prepared training run.
pub struct Trainer {
    pub(super) cfg: TrainConfig,
    pub(super) hooks: TrainHooks,
    pub(super) model: TrainedModel,
    pub(super) data: BatchSource,
    pub(super) state: RunState,
    pub(super) out_dir: PathBuf,
    pub(super) last_checkpoint: Option<PathBuf>,
}

impl Trainer {
    /// The model with the trained parameters attached.
    pub fn sd(&self) -> &StableDiffusion {
        &self.model.sd
    }

    /// The trained parameters.
    pub fn trainable(&self) -> &Trainable {
        &self.model.params
    }

    /// The configuration.
    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    /// The new tokens of pivotal tuning.
    pub fn pivotal_tokens(&self) -> Option<&PivotalTokens> {
        self.model.tokens.as_ref()
    }

    /// Whether the token embeddings change in the current phase (so captions are encoded
    /// at every step instead of from the cache).
    fn tokens_training(&self) -> bool {
        self.model.tokens.is_some()
            && (self.model.phase == Phase::Inversion || self.cfg.continue_inversion)
    }

    /// The base learning rate of the current phase's first group.
    fn phase_lr(&self) -> f64 {
        match self.model.phase {
            Phase::Inversion => self.cfg.learning_rate_ti,
            Phase::Lora => self.cfg.learning_rate,
        }
    }

    /// The learning-rate factor of optimizer step `completed + 1`: the phase's schedule over
    /// the phase's steps.
    fn lr_factor_at(&self, completed: usize) -> f64 {
        let c = &self.cfg;
        match self.model.phase {
            Phase::Inversion => lr_factor(
                c.lr_scheduler_ti,
                completed,
                c.lr_warmup_steps_ti,
                c.ti_steps,
            ),
            Phase::Lora => lr_factor(
                c.lr_scheduler,
                completed - c.ti_phase_steps(),
                c.lr_warmup_steps,
                c.max_train_steps,
            ),
        }
    }

    /// Ends textual inversion: the LoRA is switched on and a new optimizer takes over; cached
    /// caption embeddings are dropped (the tokens changed).
    fn enter_lora_phase(&mut self) -> anyhow::Result<()> {
        let m = &mut self.model;
        m.params.set_enabled(true);
        m.opt = super::setup::optimizer_for(&self.cfg, &m.params, m.tokens.as_ref(), Phase::Lora)?;
        m.phase = Phase::Lora;
        m.sd.clear_prompt_cache();
        self.data.emb = Default::default();
        Ok(())
    }

    /// The instance images' aspect-ratio buckets (`--enable-bucket`).
    pub fn buckets(&self) -> Option<&BucketTable> {
        self.data.buckets.as_ref()
    }

    /// Draws the next micro-batch as a training step does, advancing the data order and the
    /// generators of the run.
    pub fn next_batch(&mut self) -> anyhow::Result<Batch> {
        let live = self.cfg.train_text_encoder || self.tokens_training();
        let m = &self.model;
        self.data
            .next(&mut self.state, &m.sd, self.cfg.batch_size, live)
    }

    /// Loss of one micro-batch (differentiable).
    fn micro_batch_loss(&mut self) -> anyhow::Result<Tensor> {
        let batch = self.next_batch()?;
        let b = batch.n_instance;
        let m = &self.model;
        let dev = m.sd.device.clone();
        let (latents, context) = (batch.latents, batch.context);
        let nb = noise_batch(
            &m.sched,
            m.prediction,
            &latents,
            self.cfg.noise_offset,
            &mut self.state.noise_rng,
        )?;
        let ts: Vec<f32> = nb.timesteps.iter().map(|&t| t as f32).collect();
        let ts = Tensor::from_vec(ts, nb.timesteps.len(), &dev)?;
        let pred = m.sd.unet.forward(&nb.noisy, &ts, &context)?;
        let weights = self
            .cfg
            .min_snr_gamma
            .map(|g| min_snr_weights(m.sched.alphas_cumprod(), &nb.timesteps, g, m.prediction));
        Ok(dreambooth_loss(
            &pred,
            &nb.target,
            weights.as_deref(),
            b,
            self.cfg.prior_loss_weight,
        )?)
    }

    /// One optimizer step (with gradient accumulation); returns the mean loss.
    fn train_step(&mut self) -> anyhow::Result<f64> {
        let accum = self.cfg.gradient_accumulation_steps;
        let vars: Vec<(String, candle_core::Var)> = self
            .model
            .opt
            .vars()
            .map(|(n, v)| (n.to_string(), v.clone()))
            .collect();
        let mut grads: BTreeMap<String, Tensor> = BTreeMap::new();
        let mut loss_sum = 0f64;
        let step = self.state.step + 1;
        let loss_scale = self.state.loss_scaler.map(|s| s.scale);
        let mut overflow = false;
        for _ in 0..accum {
            let loss = self.micro_batch_loss()?;
            let v = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
            if !v.is_finite() {
                if loss_scale.is_none() {
                    return Err(self.diverged(step, &format!("the loss is {v}")));
                }
                // An fp16 forward that overflowed: the step is skipped below. The remaining
                // micro-batches are still drawn so that the data order stays the same.
                overflow = true;
                continue;
            }
            loss_sum += v;
            let factor = loss_scale.unwrap_or(1.0) / accum as f64;
            let scaled = if factor != 1.0 {
                loss.affine(factor, 0.0)?
            } else {
                loss
            };
            let store = scaled.backward()?;
            for (name, var) in &vars {
                if let Some(g) = store.get(var.as_tensor()) {
                    let g = g.detach();
                    let sum = match grads.remove(name) {
                        Some(prev) => (prev + g)?,
                        None => g,
                    };
                    grads.insert(name.clone(), sum);
                }
            }
        }
        if let Some(s) = loss_scale {
            for g in grads.values_mut() {
                *g = g.affine(1.0 / s, 0.0)?;
            }
        }
        // The original clips gradients in its LoRA phase only.
        let max_norm = match self.model.phase {
            Phase::Inversion => 0.0,
            Phase::Lora => self.cfg.max_grad_norm,
        };
        let norm = match overflow {
            true => f64::INFINITY,
            false => clip_grad_norm(&mut grads, max_norm)?,
        };
        if let Some(scaler) = self.state.loss_scaler.as_mut() {
            if scaler.update(!norm.is_finite()) == ScaleUpdate::Skipped {
                let (scale, exhausted) = (scaler.scale, scaler.exhausted());
                if exhausted {
                    let why = format!("fp16 gradients overflow even at loss scale {scale:e}");
                    return Err(self.diverged(step, &why));
                }
                self.hooks.note(format!(
                    "step {step}: fp16 overflow (loss or gradients not finite), step skipped; \
                     loss scale now {scale}"
                ));
                self.state.step = step;
                return Ok(f64::NAN);
            }
        }
        if !norm.is_finite() {
            return Err(self.diverged(step, &format!("the gradient norm is {norm}")));
        }
        let f = self.lr_factor_at(self.state.step);
        self.model.opt.step(&grads, f)?;
        if let Some(ema) = self.model.ema.as_mut() {
            ema.update(&vars)?;
        }
        let lr = self.phase_lr() * f;
        if let (Phase::Inversion, Some(t)) = (self.model.phase, &self.model.tokens) {
            if self.cfg.clip_ti_decay {
                t.decay_norms(lr)?;
            }
        }
        self.state.step = step;
        let loss = loss_sum / accum as f64;
        self.state.losses.push(LossPoint { step, loss, lr });
        Ok(loss)
    }

    /// The error for a non-finite loss or gradient at `step`.
    fn diverged(&self, step: usize, why: &str) -> anyhow::Error {
        let _ = write_loss_log(&self.out_dir, &self.state.losses);
        let ckpt = match &self.last_checkpoint {
            Some(p) => format!("the last good checkpoint is {} (resume with --resume {} and a lower learning rate)", p.display(), p.display()),
            None => "no checkpoint was written before (use --save-steps to keep some)".to_string(),
        };
        anyhow::anyhow!(
            "training stopped at step {step} of {}: {why}; that step was not applied and no \
             LoRA file was written; {ckpt}. The learning rate ({:e}) is probably too high.",
            self.cfg.total_steps(),
            self.phase_lr()
        )
    }

    /// Runs the remaining steps (with `--pivotal`: textual inversion, then LoRA, each with its
    /// progress bar), then writes the outputs.
    pub fn run(&mut self) -> anyhow::Result<TrainOutcome> {
        let total = self.cfg.total_steps();
        let ti = self.cfg.ti_phase_steps();
        let t0 = Instant::now();
        let start_step = self.state.step;
        let mut interrupted = false;
        let phases: &[(Phase, usize, usize)] = match self.model.tokens.is_some() {
            true => &[(Phase::Inversion, 0, ti), (Phase::Lora, ti, total)],
            false => &[(Phase::Lora, 0, total)],
        };
        for &(phase, lo, hi) in phases {
            if self.state.step >= hi || interrupted {
                continue;
            }
            if phase == Phase::Lora && self.model.phase == Phase::Inversion {
                self.enter_lora_phase()?;
            }
            let label = match (phase, self.model.tokens.is_some()) {
                (Phase::Inversion, _) => "textual inversion",
                (Phase::Lora, true) => "LoRA",
                (Phase::Lora, false) => "training",
            };
            interrupted = self.run_phase(label, lo, hi)?;
        }
        let train_seconds = t0.elapsed().as_secs_f64();
        let mut output = None;
        if interrupted {
            let d = self.save_checkpoint()?;
            self.hooks.note(format!(
                "interrupted at step {}: checkpoint {}",
                self.state.step,
                d.display()
            ));
        } else {
            output = Some(self.save_final()?);
            if self.cfg.save_steps > 0
                && self
                    .last_checkpoint
                    .as_ref()
                    .is_none_or(|p| !p.ends_with(format!("checkpoint-{}", self.state.step)))
            {
                self.save_checkpoint()?;
            }
            write_loss_log(&self.out_dir, &self.state.losses)?;
        }
        Ok(TrainOutcome {
            steps: self.state.step,
            losses: self.state.losses.clone(),
            output,
            checkpoint: self.last_checkpoint.clone(),
            interrupted,
            steps_this_run: self.state.step - start_step,
            trained_params: self.model.opt.num_params(),
            train_seconds,
        })
    }
}

impl Trainer {
    /// Runs the steps `lo..hi` of one phase under a progress bar labelled `label`; returns
    /// whether the run was interrupted.
    fn run_phase(&mut self, label: &str, lo: usize, hi: usize) -> anyhow::Result<bool> {
        let total = self.cfg.total_steps();
        let pb = self.hooks.progress((hi - lo) as u64, label);
        pb.set_position((self.state.step - lo) as u64);
        pb.reset_eta();
        while self.state.step < hi {
            if self.hooks.interrupt.load(Ordering::SeqCst)
                || self.cfg.stop_after == Some(self.state.step)
            {
                pb.finish_and_clear();
                return Ok(true);
            }
            let loss = self.train_step()?;
            pb.set_position((self.state.step - lo) as u64);
            pb.set_message(match loss.is_nan() {
                true => format!("{label} (step skipped: fp16 overflow)"),
                false => format!("{label} (loss {loss:.4})"),
            });
            let step = self.state.step;
            if self.cfg.save_steps > 0 && step.is_multiple_of(self.cfg.save_steps) {
                let d = self.save_checkpoint()?;
                pb.suspend(|| {
                    self.hooks
                        .note(format!("step {step}: checkpoint {}", d.display()))
                });
            }
            // A sample at the end of each phase, and every `sample_every` steps.
            let due = (self.cfg.sample_every > 0 && step.is_multiple_of(self.cfg.sample_every))
                || step == hi
                || step == total;
            if self.cfg.sample_prompt.is_some() && due {
                let p = self.sample()?;
                pb.suspend(|| {
                    self.hooks
                        .note(format!("step {step}: sample {}", p.display()))
                });
            }
        }
        pb.finish_and_clear();
        Ok(false)
    }
}

/// Runs a whole training from `cfg`.
pub fn train(cfg: TrainConfig, hooks: TrainHooks) -> anyhow::Result<TrainOutcome> {
    Trainer::new(cfg, hooks)?.run()
}
