//! diffusers' `UNet2DConditionModel` (Stable Diffusion 1.x / 2.x), module paths equal to the
//! diffusers state-dict keys.

pub mod blocks;
pub mod config;

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;

pub use blocks::{BlockAttention, BlockCommon, DownBlock, MidBlock, UpBlock, UpChannels};
pub use config::{PerBlock, ResolvedUNetConfig, UNet2DConditionConfig};

use crate::models::blocks::{timestep_embedding, TimestepEmbedding};
use crate::models::layers::{silu, Conv2d, GroupNorm};
use crate::models::walk::{LayerRef, LayerWalk};

/// The conditional denoising UNet: `time_proj` + `time_embedding`, `conv_in`, `down_blocks`,
/// `mid_block`, `up_blocks`, `conv_norm_out`, SiLU, `conv_out`.
#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    down_blocks: Vec<DownBlock>,
    mid_block: Option<MidBlock>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    time_proj_dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    center_input_sample: bool,
    num_upsamplers: usize,
    dtype: DType,
}

impl UNet2DConditionModel {
    /// Builds the UNet from `vb` (root = the UNet state dict) for `cfg`; unsupported configs fail.
    pub fn new(vb: VarBuilder, cfg: &UNet2DConditionConfig) -> Result<Self> {
        let r = cfg
            .resolve()
            .map_err(|e| candle_core::Error::Msg(format!("unsupported UNet config: {e}")))?;
        let n = r.levels.len();
        let boc = &cfg.block_out_channels;
        let common = BlockCommon {
            temb_channels: r.time_embed_dim,
            groups: r.groups,
            eps: cfg.norm_eps,
            use_linear_projection: cfg.use_linear_projection,
            upcast_attention: cfg.upcast_attention,
        };
        let attn_of = |i: usize| BlockAttention {
            heads: r.levels[i].heads,
            transformer_layers: r.levels[i].transformer_layers,
            cross_attention_dim: r.levels[i].cross_attention_dim,
            only_cross_attention: r.levels[i].only_cross_attention,
        };

        let conv_in = Conv2d::new(
            vb.pp("conv_in"),
            cfg.in_channels,
            boc[0],
            cfg.conv_in_kernel,
            1,
            (cfg.conv_in_kernel - 1) / 2,
            true,
        )?;
        let time_embedding =
            TimestepEmbedding::new(vb.pp("time_embedding"), boc[0], r.time_embed_dim)?;

        let vb_d = vb.pp("down_blocks");
        let mut down_blocks = Vec::with_capacity(n);
        for (i, level) in r.levels.iter().enumerate() {
            let cin = if i == 0 { boc[0] } else { boc[i - 1] };
            let attn = level.cross_attention.then(|| attn_of(i));
            let pad = (i + 1 < n).then_some(cfg.downsample_padding);
            down_blocks.push(DownBlock::new(
                vb_d.pp(i),
                &common,
                attn.as_ref(),
                (cin, boc[i]),
                level.layers,
                pad,
            )?);
        }

        let mid_block = if r.mid_block {
            let mut attn = attn_of(n - 1);
            attn.only_cross_attention = false;
            Some(MidBlock::new(
                vb.pp("mid_block"),
                &common,
                &attn,
                boc[n - 1],
                cfg.mid_block_scale_factor,
            )?)
        } else {
            None
        };

        let vb_u = vb.pp("up_blocks");
        let mut up_blocks = Vec::with_capacity(n);
        let mut num_upsamplers = 0;
        for i in 0..n {
            let level = n - 1 - i;
            let prev = if i == 0 { boc[n - 1] } else { boc[n - i] };
            let ch = UpChannels {
                in_channels: boc[level.saturating_sub(1)],
                out_channels: boc[level],
                prev_output_channels: prev,
            };
            let add_upsample = i + 1 < n;
            num_upsamplers += usize::from(add_upsample);
            let attn = r.up_cross_attention[i].then(|| attn_of(level));
            up_blocks.push(UpBlock::new(
                vb_u.pp(i),
                &common,
                attn.as_ref(),
                ch,
                r.levels[level].layers + 1,
                add_upsample,
            )?);
        }

        let conv_norm_out = GroupNorm::new(vb.pp("conv_norm_out"), r.groups, boc[0], cfg.norm_eps)?;
        let conv_out = Conv2d::new(
            vb.pp("conv_out"),
            boc[0],
            cfg.out_channels,
            cfg.conv_out_kernel,
            1,
            (cfg.conv_out_kernel - 1) / 2,
            true,
        )?;
        Ok(Self {
            conv_in,
            time_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
            time_proj_dim: boc[0],
            flip_sin_to_cos: cfg.flip_sin_to_cos,
            freq_shift: cfg.freq_shift,
            center_input_sample: cfg.center_input_sample,
            num_upsamplers,
            dtype: vb.dtype(),
        })
    }

    /// The input convolution `conv_in`.
    pub fn conv_in(&self) -> &Conv2d {
        &self.conv_in
    }

    /// The timestep MLP `time_embedding`.
    pub fn time_embedding(&self) -> &TimestepEmbedding {
        &self.time_embedding
    }

    /// The output convolution `conv_out`.
    pub fn conv_out(&self) -> &Conv2d {
        &self.conv_out
    }

    /// The down blocks.
    pub fn down_blocks(&self) -> &[DownBlock] {
        &self.down_blocks
    }

    /// The up blocks.
    pub fn up_blocks(&self) -> &[UpBlock] {
        &self.up_blocks
    }

    /// The mid block, if the config has one.
    pub fn mid_block(&self) -> Option<&MidBlock> {
        self.mid_block.as_ref()
    }

    /// The dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Gradient checkpointing (diffusers' `enable_gradient_checkpointing`): every transformer
    /// block, and every resnet not on the fused path (its convs or norms train), keeps only
    /// its inputs and is recomputed in the backward. Gradients are unchanged; outside training
    /// the forward is unchanged.
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.down_blocks
            .iter_mut()
            .for_each(|b| b.set_gradient_checkpointing(on));
        self.mid_block
            .iter_mut()
            .for_each(|b| b.set_gradient_checkpointing(on));
        self.up_blocks
            .iter_mut()
            .for_each(|b| b.set_gradient_checkpointing(on));
    }

    /// Predicts noise (or v) for `sample` `[B, C, H, W]` at `timesteps` (`[B]` or `[1]` / scalar,
    /// broadcast to the batch; any float values) given `encoder_hidden_states` `[B, L, cross]`.
    /// Inputs are cast to the weights' dtype; the output has that dtype.
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
    ) -> Result<Tensor> {
        let (b, _, h, w) = sample.dims4()?;
        let mut sample = sample.to_dtype(self.dtype)?;
        let context = encoder_hidden_states.to_dtype(self.dtype)?;
        let factor = 1usize << self.num_upsamplers;
        let forward_upsample_size = h % factor != 0 || w % factor != 0;
        if self.center_input_sample {
            sample = sample.affine(2.0, -1.0)?;
        }

        // 1. time
        let t = timesteps.flatten_all()?.to_dtype(DType::F32)?;
        let t = match t.dim(0)? {
            1 if b != 1 => t.broadcast_as(b)?.contiguous()?,
            n if n == b => t,
            n => candle_core::bail!("UNet: {n} timesteps for a batch of {b}"),
        };
        let t_emb = timestep_embedding(
            &t,
            self.time_proj_dim,
            self.flip_sin_to_cos,
            self.freq_shift,
        )?
        .to_dtype(self.dtype)?;
        let emb = self.time_embedding.forward(&t_emb)?;

        // 2. pre-process
        let mut x = self.conv_in.forward(&sample)?;

        // 3. down
        let mut skips = vec![x.clone()];
        for block in &self.down_blocks {
            let (out, s) = block.forward(&x, &emb, &context)?;
            x = out;
            skips.extend(s);
        }

        // 4. mid
        if let Some(mid) = &self.mid_block {
            x = mid.forward(&x, &emb, &context)?;
        }

        // 5. up
        let last = self.up_blocks.len().saturating_sub(1);
        for (i, block) in self.up_blocks.iter().enumerate() {
            let k = block.resnets().len();
            if skips.len() < k {
                candle_core::bail!("UNet: up block {i} needs {k} skips, {} left", skips.len());
            }
            let res = skips.split_off(skips.len() - k);
            let upsample_size = match skips.last() {
                Some(s) if i != last && forward_upsample_size => {
                    let (_, _, sh, sw) = s.dims4()?;
                    Some((sh, sw))
                }
                _ => None,
            };
            x = block.forward(&x, &res, &emb, &context, upsample_size)?;
        }

        // 6. post-process
        let x = silu(&self.conv_norm_out.forward(&x)?)?;
        self.conv_out.forward(&x)
    }

    /// [`forward`](Self::forward) with one timestep `t` for the whole batch.
    pub fn forward_t(
        &self,
        sample: &Tensor,
        t: f64,
        encoder_hidden_states: &Tensor,
    ) -> Result<Tensor> {
        let ts = Tensor::new(&[t as f32], sample.device())?;
        self.forward(sample, &ts, encoder_hidden_states)
    }
}

impl LayerWalk for UNet2DConditionModel {
    /// diffusers registers `conv_in`, `time_embedding`, `down_blocks`, `up_blocks`,
    /// `mid_block`, `conv_out`.
    fn walk<'a>(&'a self, f: &mut dyn FnMut(LayerRef<'a>)) {
        self.conv_in().walk(f);
        self.time_embedding().walk(f);
        self.down_blocks().walk(f);
        self.up_blocks().walk(f);
        self.mid_block.walk(f);
        self.conv_out().walk(f);
    }
}
