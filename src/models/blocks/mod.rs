//! Building blocks shared by the UNet and the VAE (diffusers module names and semantics).

pub mod attention;
pub mod embeddings;
pub mod resnet;
pub mod sampling;
pub mod transformer;

pub use attention::{Attention, AttentionConfig};
pub use embeddings::{timestep_embedding, TimestepEmbedding};
pub use resnet::{ResnetBlock2D, ResnetBlock2DConfig};
pub use sampling::{Downsample2D, Upsample2D};
pub use transformer::{
    BasicTransformerBlock, FeedForward, GeGlu, Transformer2DConfig, Transformer2DModel,
};
