//! What is trained: LoRA adapters on the UNet (and optionally the text encoder), or every UNet
//! weight (`--full`); their named variables, snapshots for checkpoints and samples, and the
//! final output files.

use crate::lora::{
    apply_lora_set, inject_trainable, Component, InjectedLora, LoraHandle, LoraSet, LoraTargets,
};
use crate::models::unet::UNet2DConditionModel;
use crate::models::weights::ModelWeights;
use crate::pipeline::StableDiffusion;
use crate::rng::Rng;
use anyhow::{bail, Context};
use candle_core::{Tensor, Var};
use std::collections::{BTreeMap, HashMap};

/// The trained part of the model.
pub enum Trainable {
    /// LoRA adapters.
    Lora {
        /// The UNet LoRA.
        unet: InjectedLora,
        /// The text-encoder LoRA, with `--train-text-encoder`.
        text: Option<InjectedLora>,
    },
    /// Every UNet weight is a variable (named `unet.<diffusers key>`).
    Full {
        /// The variables.
        vars: Vec<(String, Var)>,
    },
}

/// LoRA options for [`Trainable::inject`].
pub struct LoraSpec<'a> {
    /// UNet targets.
    pub targets: &'a LoraTargets,
    /// Text-encoder targets (`None`: the text encoder is not trained).
    pub text_targets: Option<&'a LoraTargets>,
    /// Rank.
    pub rank: usize,
    /// Alpha.
    pub alpha: f64,
    /// Dropout probability.
    pub dropout: f64,
}

impl Trainable {
    /// Attaches trainable LoRA to `sd` (UNet first, then the text encoder), initialised from
    /// `rng`.
    pub fn inject(sd: &StableDiffusion, spec: &LoraSpec, rng: &mut Rng) -> anyhow::Result<Self> {
        let dev = &sd.device;
        let unet = inject_trainable(
            &sd.unet,
            Component::Unet,
            spec.targets,
            spec.rank,
            spec.alpha,
            spec.dropout,
            rng,
            dev,
        )
        .context("--targets / --rank")?;
        let text = match spec.text_targets {
            Some(t) => Some(
                inject_trainable(
                    sd.text_encoder()?,
                    Component::TextEncoder,
                    t,
                    spec.rank,
                    spec.alpha,
                    spec.dropout,
                    rng,
                    dev,
                )
                .context("--text-targets / --rank")?,
            ),
            None => None,
        };
        Ok(Self::Lora { unet, text })
    }

    /// Rebuilds `sd.unet` with every weight a variable (full fine-tuning).
    pub fn full(sd: &mut StableDiffusion) -> anyhow::Result<Self> {
        let probe = ModelWeights::structure_only("unet");
        UNet2DConditionModel::new(probe.var_builder(sd.dtype, &sd.device), &sd.unet_config)?;
        let weights = sd.source.weights("unet")?;
        let vb = weights.var_builder(sd.dtype, &sd.device);
        let varmap = candle_nn::VarMap::new();
        let mut vars = vec![];
        {
            let mut data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
            for (key, shape) in probe.requested() {
                let t = vb.get(shape.as_slice(), &key)?;
                let var = Var::from_tensor(&t)?;
                data.insert(key.clone(), var.clone());
                vars.push((format!("unet.{key}"), var));
            }
        }
        weights.finish()?;
        let vb = candle_nn::VarBuilder::from_varmap(&varmap, sd.dtype, &sd.device);
        sd.unet = UNet2DConditionModel::new(vb, &sd.unet_config)?;
        Ok(Self::Full { vars })
    }

    /// The parameter groups: `(named variables, true for the text-encoder group)`.
    pub fn groups(&self) -> Vec<(Vec<(String, Var)>, bool)> {
        match self {
            Self::Lora { unet, text } => {
                let mut g = vec![(unet.named_vars().to_vec(), false)];
                if let Some(t) = text {
                    g.push((t.named_vars().to_vec(), true));
                }
                g
            }
            Self::Full { vars } => vec![(vars.clone(), false)],
        }
    }

    /// Every trained variable by name.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        self.groups().into_iter().flat_map(|(v, _)| v).collect()
    }

    /// Copies of every trained tensor by name (for a checkpoint).
    pub fn snapshot(&self) -> anyhow::Result<BTreeMap<String, Tensor>> {
        self.named_vars()
            .into_iter()
            .map(|(n, v)| Ok((n, v.as_tensor().detach().copy()?)))
            .collect()
    }

    /// Overwrites every trained variable from `params` (a checkpoint); all must be present
    /// with their shapes.
    pub fn restore(&self, params: &BTreeMap<String, Tensor>) -> anyhow::Result<()> {
        let mut problems = vec![];
        let vars = self.named_vars();
        for (name, var) in &vars {
            match params.get(name) {
                None => problems.push(format!("{name}: missing")),
                Some(t) if t.dims() != var.dims() => problems.push(format!(
                    "{name}: shape {:?}, the run has {:?}",
                    t.dims(),
                    var.dims()
                )),
                Some(_) => {}
            }
        }
        if params.len() != vars.len() {
            problems.push(format!(
                "the checkpoint has {} tensors, the run trains {}",
                params.len(),
                vars.len()
            ));
        }
        if !problems.is_empty() {
            bail!(
                "checkpoint does not fit this run:\n  {}",
                problems.join("\n  ")
            );
        }
        for (name, var) in vars {
            let t = &params[&name];
            var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
        }
        Ok(())
    }

    /// Enables or disables every LoRA adapter (pivotal tuning attaches them before its
    /// textual-inversion phase and enables them for the LoRA phase).
    pub fn set_enabled(&self, on: bool) {
        if let Self::Lora { unet, text } = self {
            for l in std::iter::once(unet).chain(text.iter()) {
                l.handle().set_enabled(on);
            }
        }
    }

    /// The dropout RNG states (UNet, then text encoder).
    pub fn dropout_states(&self) -> Vec<[u64; 4]> {
        match self {
            Self::Lora { unet, text } => std::iter::once(unet)
                .chain(text.iter())
                .map(|l| l.dropout_rng_state())
                .collect(),
            Self::Full { .. } => vec![],
        }
    }

    /// Restores [`Trainable::dropout_states`].
    pub fn set_dropout_states(&self, states: &[[u64; 4]]) {
        if let Self::Lora { unet, text } = self {
            for (l, s) in std::iter::once(unet).chain(text.iter()).zip(states) {
                l.set_dropout_rng_state(*s);
            }
        }
    }

    /// The trained LoRA as one set (UNet and text encoder), `None` for full fine-tuning.
    pub fn lora_set(&self) -> anyhow::Result<Option<LoraSet>> {
        let Self::Lora { unet, text } = self else {
            return Ok(None);
        };
        let mut set = unet.to_lora_set()?;
        if let Some(t) = text {
            set.layers.extend(t.to_lora_set()?.layers);
        }
        Ok(Some(set))
    }

    /// Runs `f` with `sd` answering as the trained model but without gradient tracking:
    /// a frozen snapshot of the LoRA replaces the trainable one (dropout off), or a detached
    /// copy of the fully fine-tuned UNet is swapped in.
    pub fn with_snapshot<T>(
        &self,
        sd: &mut StableDiffusion,
        f: impl FnOnce(&StableDiffusion) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        match self {
            Self::Lora { unet, text } => {
                let mut guard = SnapshotGuard(vec![]);
                // LoRAs not in use yet (pivotal tuning's first phase) stay out of the sample.
                let active = std::iter::once(unet)
                    .chain(text.iter())
                    .filter(|l| l.handle().is_enabled());
                for lora in active {
                    let set = lora.to_lora_set()?;
                    lora.handle().set_enabled(false);
                    guard.0.push((lora, None));
                    let h = match lora.handle().component() {
                        Component::Unet => apply_lora_set(&sd.unet, Component::Unet, &set, 1.0)?,
                        Component::TextEncoder => {
                            apply_lora_set(sd.text_encoder()?, Component::TextEncoder, &set, 1.0)?
                        }
                    };
                    if let Some(last) = guard.0.last_mut() {
                        last.1 = Some(h);
                    }
                }
                let out = f(sd);
                drop(guard);
                out
            }
            Self::Full { vars } => {
                let map: HashMap<String, Tensor> = vars
                    .iter()
                    .map(|(n, v)| {
                        (
                            n.trim_start_matches("unet.").to_string(),
                            v.as_tensor().detach(),
                        )
                    })
                    .collect();
                let w = ModelWeights::from_tensors("unet", map);
                let copy = UNet2DConditionModel::new(
                    w.var_builder(sd.dtype, &sd.device),
                    &sd.unet_config,
                )?;
                let trained = std::mem::replace(&mut sd.unet, copy);
                let out = f(sd);
                sd.unet = trained;
                out
            }
        }
    }
}

/// Puts the trainable LoRAs back when a snapshot ends, however it ends: removes each frozen
/// copy and re-enables the trained adapters.
struct SnapshotGuard<'a>(Vec<(&'a InjectedLora, Option<LoraHandle>)>);

impl Drop for SnapshotGuard<'_> {
    fn drop(&mut self) {
        for (lora, copy) in self.0.drain(..) {
            if let Some(h) = copy {
                h.remove();
            }
            lora.handle().set_enabled(true);
        }
    }
}

/// The bytes of our LoRA file: `<component>.<path>.lora_down.weight`, `.lora_up.weight` (f32,
/// as trained) and `.alpha` (0-d f32) per layer, plus `metadata`.
pub fn lora_file_bytes(
    set: &LoraSet,
    metadata: &BTreeMap<String, String>,
) -> anyhow::Result<Vec<u8>> {
    lora_file_bytes_as(set, metadata, crate::formats::Format::Ours)
}

/// The bytes of the LoRA file in `format` (factors as trained), with `metadata`.
pub fn lora_file_bytes_as(
    set: &LoraSet,
    metadata: &BTreeMap<String, String>,
    format: crate::formats::Format,
) -> anyhow::Result<Vec<u8>> {
    let set = LoraSet {
        layers: set.layers.clone(),
        embeddings: set.embeddings.clone(),
        metadata: metadata.clone(),
    };
    crate::formats::encode_bytes(&set, format, &crate::formats::WriteOptions::default())
}
