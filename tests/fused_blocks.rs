//! The fused block ops in the tiny SD 1.x / 2.x UNets: with LoRA on the attention only,
//! every ResnetBlock2D runs `norm → SiLU → conv` and every FeedForward runs `GEGLU → net.2`
//! as one op; attaching zero-valued LoRA residuals to conv1 / conv2 / conv_shortcut /
//! time_emb_proj and ff.net.0.proj / ff.net.2 sends the same layers through the unfused ops.
//! The output must stay bit-equal and the attention LoRA's gradients equal within the bound.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use lora_diffusion::lora::{inject_trainable, Component, InjectedLora, LoraTargets};
use lora_diffusion::models::unet::UNet2DConditionModel;
use lora_diffusion::rng::Rng;

/// Bound on `max |g_unfused − g_fused| / max |g|` per LoRA gradient: the unfused graph has
/// more nodes, so gradients meeting at one tensor may be summed in another order.
const GRAD_REL_BOUND: f32 = 1e-5;

fn inject(unet: &UNet2DConditionModel, targets: &str, rng: &mut Rng, std: f64) -> InjectedLora {
    let targets = LoraTargets::parse(targets).unwrap();
    let lora = inject_trainable(
        unet,
        Component::Unet,
        &targets,
        2,
        2.0,
        0.0,
        rng,
        &Device::Cpu,
    )
    .unwrap();
    for (_, v) in lora.named_vars() {
        v.set(&randn(rng, v.dims(), std)).unwrap();
    }
    lora
}

/// The UNet output and the gradients of the attention LoRA's factors.
fn step(unet: &UNet2DConditionModel, attn: &InjectedLora, model: &str) -> (Tensor, Vec<Tensor>) {
    let cfg = unet_config(model);
    let mut rng = Rng::new(11);
    let x = randn(&mut rng, &[2, cfg.in_channels, 8, 8], 1.0);
    let cross = cfg
        .cross_attention_dim
        .expand(1, "cross_attention_dim")
        .unwrap()[0];
    let ctx = randn(&mut rng, &[2, 7, cross], 1.0);
    let target = randn(&mut rng, &[2, cfg.out_channels, 8, 8], 1.0);
    let ts = Tensor::new(&[10f32, 700.0], &Device::Cpu).unwrap();
    let out = unet.forward(&x, &ts, &ctx).unwrap();
    let grads = mse(&out, &target).backward().unwrap();
    let g = attn
        .named_vars()
        .iter()
        .map(|(name, v)| {
            grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient"))
                .clone()
        })
        .collect();
    (out.detach(), g)
}

#[test]
fn fused_and_unfused_blocks_agree() {
    for model in ["sd1", "sd2"] {
        let unet = load_unet(model, DType::F32);
        let mut rng = Rng::new(3);
        let attn = inject(&unet, "attn", &mut rng, 0.3);
        let (out_fused, g_fused) = step(&unet, &attn, model);
        let zero = inject(&unet, "resnet,ff", &mut rng, 0.0);
        assert!(
            !zero.named_vars().is_empty(),
            "{model}: no resnet / ff layer adapted"
        );
        let (out_plain, g_plain) = step(&unet, &attn, model);
        assert_eq!(
            max_abs_diff(&out_fused, &out_plain),
            0.0,
            "{model}: output differs"
        );
        let mut worst = 0f32;
        for (a, b) in g_fused.iter().zip(&g_plain) {
            let rel = max_abs_diff(a, b) / max_abs(b).max(f32::MIN_POSITIVE);
            worst = worst.max(rel);
        }
        eprintln!("{model}: attention LoRA gradients fused vs unfused, relative {worst:.1e}");
        assert!(
            worst <= GRAD_REL_BOUND,
            "{model}: gradients off by {worst:e}"
        );
    }
}
