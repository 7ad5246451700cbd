//! Runs `examples/library.rs` (the crate used as a library: inject, train, save, reload,
//! generate at two scales) and checks what it produced.

#[path = "../examples/library.rs"]
mod library;

use lora_diffusion::formats::{self, Architecture, Format};
use lora_diffusion::hub::{bundled_model_dir, ModelSource};
use lora_diffusion::lora::Component;

/// Rank-4 LoRA on to_q / to_k / to_v / to_out.0 of attn1 and attn2 in the bundled UNet's
/// seven transformer blocks (2 down, 1 mid, 4 up): 7 × 2 × 4 layers.
const ATTN_LAYERS: usize = 56;

#[test]
fn library_example_trains_saves_reloads_and_scales() {
    let dir = tempfile::tempdir().unwrap();
    let r = library::run(dir.path()).unwrap();

    assert_eq!(r.losses.len(), library::STEPS);
    assert!(
        r.losses.iter().all(|l| l.is_finite() && *l > 0.0),
        "losses {:?}",
        r.losses
    );

    // The file is kohya-format and holds every attention projection of the UNet, rank 4.
    assert_eq!(formats::detect(&r.lora_file).unwrap(), Format::Kohya);
    let arch = Architecture::from_model(&ModelSource::Local(bundled_model_dir())).unwrap();
    let set = formats::read_with(&r.lora_file, Some(&arch)).unwrap();
    assert_eq!(set.layers.len(), ATTN_LAYERS);
    assert_eq!(r.loaded_layers, ATTN_LAYERS);
    for (key, w) in &set.layers {
        assert_eq!(key.component(), Some(Component::Unet), "{key}");
        assert_eq!(w.rank(), 4, "{key}");
        assert_eq!(w.alpha(), 4.0, "{key}");
    }
    // Training moved the zero-initialised `up` factors.
    let moved = set
        .layers
        .values()
        .filter(|w| {
            let m = w.up().abs().unwrap().max_all().unwrap();
            m.to_scalar::<f32>().unwrap() > 0.0
        })
        .count();
    assert_eq!(moved, ATTN_LAYERS);

    // Scale 0 is exactly the model without LoRA; scale 1 changes the image.
    assert_eq!(r.base.dims(), &[1, 3, 64, 64]);
    assert!(library::bit_equal(&r.scale0, &r.base).unwrap());
    let diff = library::max_abs_diff(&r.scale1, &r.scale0).unwrap();
    assert!(diff > 1e-3 && diff.is_finite(), "max abs difference {diff}");
    for name in ["scale-0.png", "scale-1.png"] {
        let img = image::open(dir.path().join(name)).unwrap();
        assert_eq!((img.width(), img.height()), (64, 64), "{name}");
    }
}
