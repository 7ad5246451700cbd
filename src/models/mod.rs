//! Stable Diffusion models (UNet, CLIP text encoder, VAE) and the blocks they share.

pub mod blocks;
pub mod clip;
pub mod layers;
pub mod presets;
pub mod residual;
pub mod unet;
pub mod vae;
pub mod walk;
pub mod weights;
