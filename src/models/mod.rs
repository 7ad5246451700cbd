//! Stable Diffusion models (UNet, CLIP text encoder, VAE) and the blocks they share.

pub mod blocks;
pub mod clip;
pub mod layers;
pub mod unet;
pub mod presets;
pub mod weights;
pub mod vae;
