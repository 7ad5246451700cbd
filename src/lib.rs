//! lora-diffusion: Stable Diffusion inference and LoRA fine-tuning on candle.
//!
//! Module paths of the models equal diffusers' state-dict keys, so a checkpoint key
//! tells where its code lives.

pub mod atomic;
pub mod bench;
pub mod cli;
pub mod formats;
pub mod hub;
pub mod lora;
pub mod models;
pub mod ops;
pub mod pickle;
pub mod pipeline;
pub mod rng;
pub mod schedulers;
pub mod sys;
pub mod tensor_file;
pub mod tokenizer;
pub mod train;
pub mod world;

pub use anyhow::{Error, Result};
