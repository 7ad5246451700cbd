//! The state of a run that a checkpoint saves and restores: step, loss log, the data and
//! noise generators and the data order. Restoring it continues a run bit-exactly.

use super::checkpoint::{DataOrder, TrainerState};
use super::plot::LossPoint;
use super::scaler::LossScaler;
use crate::rng::Rng;

/// Stream of the data generator (shuffling, crops, flips), xor-ed into the seed.
pub(super) const DATA_STREAM: u64 = 0xD47A_5EED;
/// Stream of the noise generator (latent sampling, noise, timesteps).
pub(super) const NOISE_STREAM: u64 = 0x0015_E5EE;
/// Stream of the generator used while caching latents.
pub(super) const CACHE_STREAM: u64 = 0xCAC4_E5EE;

/// Step, losses, generators and data order of a run.
#[derive(Debug, Clone)]
pub struct RunState {
    /// Optimizer steps completed.
    pub step: usize,
    /// The loss log so far.
    pub losses: Vec<LossPoint>,
    /// The data generator (shuffling, crops, flips).
    pub data_rng: Rng,
    /// The noise generator (latent sampling, noise, timesteps).
    pub noise_rng: Rng,
    /// The order training items are visited in.
    pub order: DataOrder,
    /// The fp16 loss scaler (`--mixed-precision fp16` only).
    pub loss_scaler: Option<LossScaler>,
    /// The order class images are drawn in (buckets with prior preservation).
    pub class_order: DataOrder,
}

impl RunState {
    /// The state at step 0 of a run seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            step: 0,
            losses: vec![],
            data_rng: Rng::new(seed ^ DATA_STREAM),
            noise_rng: Rng::new(seed ^ NOISE_STREAM),
            order: DataOrder::default(),
            class_order: DataOrder::default(),
            loss_scaler: None,
        }
    }

    /// The checkpoint record of this state, with the dropout generators and training options.
    pub fn to_checkpoint(
        &self,
        dropout_rng: Vec<[u64; 4]>,
        training_args: serde_json::Value,
    ) -> TrainerState {
        TrainerState {
            version: 1,
            step: self.step,
            data_rng: self.data_rng.state(),
            noise_rng: self.noise_rng.state(),
            dropout_rng,
            order: self.order.clone(),
            class_order: self.class_order.clone(),
            losses: self.losses.clone(),
            training_args,
            loss_scaler: self.loss_scaler,
            phase: None,
        }
    }

    /// The state a checkpoint record holds.
    pub fn from_checkpoint(s: &TrainerState) -> Self {
        Self {
            step: s.step,
            losses: s.losses.clone(),
            data_rng: Rng::from_state(s.data_rng),
            noise_rng: Rng::from_state(s.noise_rng),
            order: s.order.clone(),
            loss_scaler: s.loss_scaler,
            class_order: s.class_order.clone(),
        }
    }
}
