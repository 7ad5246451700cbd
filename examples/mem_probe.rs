//! Which allocations an SD 1.5 LoRA step holds: a table of live heap blocks of 1 MiB and
//! more, by size, when the forward ends and at the backward's peak.
//!
//!     cargo run --release --example mem_probe [resolution] [f32|bf16]
//!
//! A diagnostic for memory work (nothing is asserted); the sizes name the tensors
//! (e.g. 5.24 MB = 320 × 64 × 64 f32).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering::Relaxed};

use candle_core::{DType, Device, Tensor};
use lora_diffusion::lora::{inject_trainable, Component, LoraTargets};
use lora_diffusion::models::presets::SD15_UNET_CONFIG;
use lora_diffusion::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use lora_diffusion::models::weights::ModelWeights;
use lora_diffusion::rng::Rng;

const SLOTS: usize = 4096;
const BIG: usize = 1 << 20;

/// Counts live bytes, and live blocks of at least [`BIG`] bytes by exact size.
struct Probe;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static SIZES: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
static COUNTS: [AtomicIsize; SLOTS] = [const { AtomicIsize::new(0) }; SLOTS];
static AT_PEAK: [AtomicIsize; SLOTS] = [const { AtomicIsize::new(0) }; SLOTS];
static TRACK_PEAK: AtomicUsize = AtomicUsize::new(0);

fn slot(size: usize) -> usize {
    let mut i = (size / 4096).wrapping_mul(2654435761) % SLOTS;
    loop {
        match SIZES[i].compare_exchange(0, size, Relaxed, Relaxed) {
            Ok(_) => return i,
            Err(s) if s == size => return i,
            Err(_) => i = (i + 1) % SLOTS,
        }
    }
}

fn note(size: usize, d: isize) {
    if size >= BIG {
        COUNTS[slot(size)].fetch_add(d, Relaxed);
    }
    if d > 0 {
        let now = LIVE.fetch_add(size, Relaxed) + size;
        if now > PEAK.fetch_max(now, Relaxed) && TRACK_PEAK.load(Relaxed) == 1 && size >= BIG {
            for i in 0..SLOTS {
                AT_PEAK[i].store(COUNTS[i].load(Relaxed), Relaxed);
            }
        }
    } else {
        LIVE.fetch_sub(size, Relaxed);
    }
}

unsafe impl GlobalAlloc for Probe {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            note(l.size(), 1);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        note(l.size(), -1);
    }
}

#[global_allocator]
static A: Probe = Probe;

fn table(counts: &dyn Fn(usize) -> isize) -> Vec<(usize, isize)> {
    let mut v: Vec<(usize, isize)> = (0..SLOTS)
        .map(|i| (SIZES[i].load(Relaxed), counts(i)))
        .filter(|&(s, c)| s > 0 && c > 0)
        .collect();
    v.sort_by_key(|&(s, c)| std::cmp::Reverse(s as isize * c));
    v
}

fn print(name: &str, v: &[(usize, isize)], base: &[(usize, isize)]) {
    let total: f64 = v.iter().map(|&(s, c)| s as f64 * c as f64).sum::<f64>() / 1e6;
    println!("{name}: {total:.0} MB in blocks >= 1 MiB");
    for &(s, c) in v.iter().take(25) {
        let before = base.iter().find(|b| b.0 == s).map_or(0, |b| b.1);
        println!(
            "  {:>9.2} MB x {c:>4} = {:>8.1} MB   (model {before})",
            s as f64 / 1e6,
            s as f64 * c as f64 / 1e6
        );
    }
}

fn main() -> anyhow::Result<()> {
    let res: usize = std::env::args().nth(1).map_or(Ok(512), |s| s.parse())?;
    let dtype = match std::env::args().nth(2).as_deref() {
        None | Some("f32") => DType::F32,
        Some("bf16") => DType::BF16,
        Some(other) => anyhow::bail!("model dtype {other}: expected f32 or bf16"),
    };
    let dev = Device::Cpu;
    let cfg: UNet2DConditionConfig = serde_json::from_str(SD15_UNET_CONFIG)?;
    let model = UNet2DConditionModel::new(
        ModelWeights::random("bench", 0).var_builder(dtype, &dev),
        &cfg,
    )?;
    let _lora = inject_trainable(
        &model,
        Component::Unet,
        &LoraTargets::parse("attn")?,
        4,
        4.0,
        0.0,
        &mut Rng::new(2),
        &dev,
    )?;
    let mut rng = Rng::new(0);
    let l = res / 8;
    let x = rng.randn((1, 4, l, l), &dev)?.to_dtype(dtype)?;
    let ctx = rng.randn((1, 77, 768), &dev)?.to_dtype(dtype)?;
    let ts = Tensor::new(&[500f32], &dev)?;
    let model_table = table(&|i| COUNTS[i].load(Relaxed));
    let base = LIVE.load(Relaxed);
    let loss = model
        .forward(&x, &ts, &ctx)?
        .to_dtype(DType::F32)?
        .sqr()?
        .mean_all()?;
    let graph = table(&|i| COUNTS[i].load(Relaxed));
    println!(
        "graph: {:.0} MB beyond the model",
        (LIVE.load(Relaxed) - base) as f64 / 1e6
    );
    print("live when the forward ends", &graph, &model_table);
    PEAK.store(LIVE.load(Relaxed), Relaxed);
    TRACK_PEAK.store(1, Relaxed);
    let grads = loss.backward()?;
    TRACK_PEAK.store(0, Relaxed);
    println!(
        "backward peak: {:.0} MB beyond the model",
        (PEAK.load(Relaxed) - base) as f64 / 1e6
    );
    print(
        "live at the backward's peak",
        &table(&|i| AT_PEAK[i].load(Relaxed)),
        &graph,
    );
    drop(grads);
    Ok(())
}
