//! LoRA (and full) fine-tuning of Stable Diffusion: DreamBooth with optional prior
//! preservation, the loop behind `lora train`.

pub mod batch;
pub mod bucket;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod ema;
pub mod hooks;
pub mod loss;
pub mod model;
pub mod optim;
mod outputs;
pub mod pivotal;
pub mod plot;
pub mod precision;
pub mod prior;
pub mod scaler;
mod setup;
pub mod source;
pub mod state;
pub mod trainer;
pub mod validate;

pub use config::{LrScheduler, TrainConfig};
pub use hooks::TrainHooks;
pub use trainer::{train, TrainOutcome, TrainedModel, Trainer};
