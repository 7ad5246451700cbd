//! Aspect-ratio bucketing (`--enable-bucket`): the bucket table and the bucket of each image equal
//! kohya sd-scripts' (fixture made by scripts/fixture_buckets.py from its code), a folder of mixed
//! aspect ratios trains with one bucket per batch, and resume stays bit-exact.

mod common;

use common::{err_text, expect_failure, fixtures, lora, read_json, s};
use lora_diffusion::train::bucket::{make_bucket_resolutions, BucketSpec, Bucketer};
use lora_diffusion::train::{train, TrainConfig, TrainHooks, Trainer};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn quiet() -> TrainHooks {
    TrainHooks {
        quiet: true,
        ..Default::default()
    }
}

fn pair(v: &serde_json::Value) -> (usize, usize) {
    (
        v[0].as_u64().unwrap() as usize,
        v[1].as_u64().unwrap() as usize,
    )
}

fn usize_of(v: &serde_json::Value) -> usize {
    v.as_u64().unwrap() as usize
}

#[test]
fn bucket_resolutions_equal_sd_scripts() {
    let f = read_json(fixtures().join("buckets.json"));
    let cases = f["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 7);
    for c in cases {
        let (reso, lo, hi, steps) = (
            usize_of(&c["resolution"]),
            usize_of(&c["min_bucket_reso"]),
            usize_of(&c["max_bucket_reso"]),
            usize_of(&c["bucket_reso_steps"]),
        );
        let want: Vec<(usize, usize)> = c["resolutions"]
            .as_array()
            .unwrap()
            .iter()
            .map(pair)
            .collect();
        let got = make_bucket_resolutions(reso, lo, hi, steps);
        assert_eq!(
            got, want,
            "make_bucket_resolutions({reso}, {lo}, {hi}, {steps})"
        );
        let (spec, _) = BucketSpec::new(reso, lo, hi, steps, false).unwrap();
        assert_eq!(Bucketer::new(spec).predefined(), want.as_slice());
    }
    // SD 1.5 at 512 with kohya's defaults: 17 buckets from 256x1024 to 1024x256.
    assert_eq!(make_bucket_resolutions(512, 256, 1024, 64).len(), 17);
}

#[test]
fn selected_buckets_equal_sd_scripts() {
    let f = read_json(fixtures().join("buckets.json"));
    let (mut checked, mut refused) = (0, 0);
    for c in f["cases"].as_array().unwrap() {
        let (reso, lo, hi, steps) = (
            usize_of(&c["resolution"]),
            usize_of(&c["min_bucket_reso"]),
            usize_of(&c["max_bucket_reso"]),
            usize_of(&c["bucket_reso_steps"]),
        );
        for (key, no_upscale) in [("select", false), ("select_no_upscale", true)] {
            let (spec, _) = BucketSpec::new(reso, lo, hi, steps, no_upscale).unwrap();
            let b = Bucketer::new(spec);
            for e in c[key].as_array().unwrap() {
                let (w, h) = pair(&e["size"]);
                let what = format!("{key} {w}x{h} at {reso} ({lo}..{hi} step {steps})");
                let got = b.select(w, h);
                // sd-scripts fails (or makes a bucket with a zero side) on images smaller than
                // one step with no_upscale; we refuse them with an error.
                let bucket = &e["bucket"];
                if bucket.is_null() || pair(bucket).0 == 0 || pair(bucket).1 == 0 {
                    let msg = err_text(got);
                    assert!(msg.contains(&format!("{w}x{h}")), "{what}: {msg}");
                    refused += 1;
                    continue;
                }
                let got = got.unwrap_or_else(|e| panic!("{what}: {e:#}"));
                assert_eq!(got.bucket, pair(bucket), "{what}: bucket");
                assert_eq!(got.resized, pair(&e["resized"]), "{what}: resized size");
                let err = e["ar_error"].as_f64().unwrap();
                assert!(
                    (got.ar_error - err).abs() < 1e-12,
                    "{what}: ar error {} vs {err}",
                    got.ar_error
                );
                checked += 1;
            }
        }
    }
    eprintln!("{checked} image sizes assigned as sd-scripts does, {refused} refused as it fails");
    assert!(checked >= 300 && refused >= 20, "{checked} / {refused}");
}

#[test]
fn bucket_options_are_checked() {
    let mut c = TrainConfig {
        instance_data_dir: Some("x".into()),
        instance_prompt: Some("p".into()),
        output_dir: Some("o".into()),
        resolution: 32,
        ..Default::default()
    };
    c.bucket_no_upscale = true;
    assert!(err_text(c.validate()).contains("--bucket-no-upscale needs --enable-bucket"));
    c.enable_bucket = true;
    c.bucket_reso_steps = 12;
    assert!(err_text(c.validate()).contains("--bucket-reso-steps 12"));
    c.bucket_reso_steps = 8;
    c.min_bucket_reso = 40;
    c.max_bucket_reso = 64;
    assert!(err_text(c.validate()).contains("--min-bucket-reso 40 must not exceed --resolution 32"));
    c.min_bucket_reso = 20;
    let (spec, notes) = c.bucket_spec().unwrap().unwrap();
    assert_eq!((spec.min_reso, spec.max_reso), (16, 64));
    assert_eq!(notes.len(), 1, "{notes:?}");
}

/// Writes a smooth `w`×`h` test image with a per-image tint.
fn write_image(dir: &Path, name: &str, (w, h): (u32, u32), tint: u8) {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            (x * 5) as u8,
            (y * 5) as u8,
            tint.wrapping_add((x + y) as u8),
        ])
    });
    img.save(dir.join(name)).unwrap();
}

/// Seven images of three aspect ratios: 48x32 (x3), 32x48 (x2), 40x40 (x2).
fn mixed_data(dir: &Path) -> PathBuf {
    let d = dir.join("mixed");
    std::fs::create_dir_all(&d).unwrap();
    let sizes = [
        (48, 32),
        (32, 48),
        (40, 40),
        (48, 32),
        (32, 48),
        (40, 40),
        (48, 32),
    ];
    for (i, &size) in sizes.iter().enumerate() {
        write_image(&d, &format!("img{i}.png"), size, (i * 30) as u8);
    }
    d
}

/// Bucketed training on the bundled model at resolution 32 (buckets 16..64, steps 8).
fn bucket_cfg(data: &Path, out: &Path) -> TrainConfig {
    TrainConfig {
        instance_data_dir: Some(data.to_path_buf()),
        instance_prompt: Some("a photo of sks toy".into()),
        output_dir: Some(out.to_path_buf()),
        resolution: 32,
        enable_bucket: true,
        min_bucket_reso: 16,
        max_bucket_reso: 64,
        bucket_reso_steps: 8,
        batch_size: 2,
        max_train_steps: 4,
        learning_rate: 1e-3,
        ..Default::default()
    }
}

#[test]
fn mixed_aspect_ratios_train_with_one_bucket_per_batch() {
    let dir = tempfile::tempdir().unwrap();
    let data = mixed_data(dir.path());
    let out = dir.path().join("out");
    let mut trainer = Trainer::new(bucket_cfg(&data, &out), quiet()).unwrap();
    // sd-scripts at 32: 48x32 -> 40x24, 32x48 -> 24x40, 40x40 -> 32x32 (see the fixture).
    let table = trainer.buckets().unwrap().clone();
    let want: BTreeMap<(usize, usize), Vec<usize>> = [
        ((24, 40), vec![1, 4]),
        ((32, 32), vec![2, 5]),
        ((40, 24), vec![0, 3, 6]),
    ]
    .into_iter()
    .collect();
    assert_eq!(table.buckets, want);
    let lines = table.describe(0.0);
    assert_eq!(lines[1], "  bucket 0: 24x40: 2");
    assert_eq!(lines[3], "  bucket 2: 40x24: 3");

    // Two epochs: every batch holds images of one bucket at that bucket's latent size; an epoch
    // has ceil(n / 2) batches per bucket and visits every image once.
    let mut seen = vec![0usize; 7];
    let mut shapes = vec![];
    for _ in 0..8 {
        let b = trainer.next_batch().unwrap();
        let (w, h) = b.bucket.unwrap();
        assert!(
            b.items.iter().all(|i| table.buckets[&(w, h)].contains(i)),
            "{:?}",
            b.items
        );
        assert_eq!(b.latents.dims(), [b.items.len(), 4, h / 8, w / 8]);
        assert_eq!(b.context.dim(0).unwrap(), b.items.len());
        assert_eq!(b.n_instance, b.items.len());
        b.items.iter().for_each(|&i| seen[i] += 1);
        shapes.push((b.items.len(), w, h));
    }
    eprintln!("batches (rows, w, h): {shapes:?}");
    assert_eq!(seen, vec![2; 7]);
    let mut epoch: Vec<_> = shapes[..4].to_vec();
    epoch.sort();
    assert_eq!(epoch, [(1, 40, 24), (2, 24, 40), (2, 32, 32), (2, 40, 24)]);

    // And it trains.
    let o = train(bucket_cfg(&data, &out), quiet()).unwrap();
    assert_eq!(o.steps, 4);
    assert!(o.losses.iter().all(|p| p.loss.is_finite() && p.loss > 0.0));
    assert!(out.join("lora.safetensors").is_file());
}

#[test]
fn no_upscale_buckets_come_from_the_image_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let data = mixed_data(dir.path());
    let mut c = bucket_cfg(&data, &dir.path().join("out"));
    c.bucket_no_upscale = true;
    let t = Trainer::new(c, quiet()).unwrap();
    // Below the area (32²) sides are floored to the steps; above it scaled down first.
    let keys: Vec<_> = t.buckets().unwrap().buckets.keys().copied().collect();
    assert_eq!(keys, [(24, 32), (32, 24), (32, 32)]);

    let d = dir.path().join("tiny");
    std::fs::create_dir_all(&d).unwrap();
    write_image(&d, "thin.png", (6, 40), 0);
    let mut c = bucket_cfg(&d, &dir.path().join("out2"));
    c.bucket_no_upscale = true;
    let e = err_text(Trainer::new(c, quiet()).map(|_| ()));
    assert!(
        e.contains("thin.png") && e.contains("6x40") && e.contains("no bucket"),
        "{e}"
    );
}

/// Options that move every generator: random crops and flips, dropout, min-SNR, offset noise,
/// gradient accumulation over partial batches, the text encoder trained.
fn resume_cfg(data: &Path, out: &Path) -> TrainConfig {
    let mut c = bucket_cfg(data, out);
    c.max_train_steps = 6;
    c.random_flip = true;
    c.dropout = 0.1;
    c.min_snr_gamma = Some(5.0);
    c.noise_offset = 0.05;
    c.gradient_accumulation_steps = 2;
    c.train_text_encoder = true;
    c.learning_rate_text = 1e-3;
    c.seed = 11;
    c
}

/// Trains `make(out)` straight and interrupted after `stop` steps then resumed; returns both
/// LoRA files' bytes.
fn straight_and_resumed(
    dir: &Path,
    stop: usize,
    make: impl Fn(&Path) -> TrainConfig,
) -> (Vec<u8>, Vec<u8>) {
    let straight = dir.join("straight");
    train(make(&straight), quiet()).unwrap();
    let split = dir.join("split");
    let mut c = make(&split);
    c.stop_after = Some(stop);
    assert!(train(c, quiet()).unwrap().interrupted);
    let mut c = make(&split);
    c.resume = Some("latest".into());
    let o = train(c, quiet()).unwrap();
    assert_eq!(o.steps_this_run, o.steps - stop);
    let la = std::fs::read_to_string(straight.join("loss.csv")).unwrap();
    let lb = std::fs::read_to_string(split.join("loss.csv")).unwrap();
    assert_eq!(la, lb);
    (
        std::fs::read(straight.join("lora.safetensors")).unwrap(),
        std::fs::read(split.join("lora.safetensors")).unwrap(),
    )
}

#[test]
fn resume_with_buckets_gives_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let data = mixed_data(dir.path());
    // Stopped at step 3: mid-epoch (an epoch is 4 batches, a step 2 of them).
    let (a, b) = straight_and_resumed(dir.path(), 3, |out| resume_cfg(&data, out));
    eprintln!(
        "straight and resumed lora.safetensors: {} and {} bytes",
        a.len(),
        b.len()
    );
    assert!(
        a == b,
        "resumed bucketed LoRA differs from the uninterrupted one"
    );
}

#[test]
fn prior_preservation_with_buckets_and_cached_latents_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let data = mixed_data(dir.path());
    let class = dir.path().join("class");
    std::fs::create_dir_all(&class).unwrap();
    for i in 0..3 {
        write_image(&class, &format!("c{i}.png"), (36, 36), 200 + i as u8);
    }
    let make = |out: &Path| {
        let mut c = bucket_cfg(&data, out);
        c.with_prior_preservation = true;
        c.class_data_dir = Some(class.clone());
        c.class_prompt = Some("a photo of a toy".into());
        c.num_class_images = 3;
        c.cache_latents = true;
        c.random_flip = true;
        c.seed = 3;
        c
    };
    // Class rows take the batch's bucket: 2 instance + 2 class rows of one shape.
    let mut t = Trainer::new(make(&dir.path().join("probe")), quiet()).unwrap();
    for _ in 0..4 {
        let b = t.next_batch().unwrap();
        let (w, h) = b.bucket.unwrap();
        assert_eq!(b.latents.dims(), [2 * b.n_instance, 4, h / 8, w / 8]);
    }
    let (a, b) = straight_and_resumed(dir.path(), 2, make);
    assert!(
        a == b,
        "resumed LoRA (prior preservation, buckets, cache) differs"
    );
}

#[test]
fn cli_prints_the_bucket_table() {
    let dir = tempfile::tempdir().unwrap();
    let data = mixed_data(dir.path());
    let out = dir.path().join("out");
    let args = [
        "train",
        "--instance-data-dir",
        s(&data),
        "--instance-prompt",
        "a photo of sks toy",
        "--output-dir",
        s(&out),
        "--resolution",
        "32",
        "--enable-bucket",
        "--min-bucket-reso",
        "16",
        "--max-bucket-reso",
        "64",
        "--bucket-reso-steps",
        "8",
        "--max-train-steps",
        "1",
    ];
    let o = lora(&args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    for line in [
        "bucket 0: 24x40: 2",
        "bucket 1: 32x32: 2",
        "bucket 2: 40x24: 3",
        "mean aspect-ratio error: 0.0905",
    ] {
        assert!(err.contains(line), "no {line:?} in: {err}");
    }
    let mut bad = args.to_vec();
    bad[15] = "12";
    bad.extend(["--force"]);
    let o = lora(&bad);
    expect_failure(&o, &["--bucket-reso-steps 12", "multiple of 8"]);
}

#[test]
fn odd_size_upsample_matches_pytorch_forward_and_backward() {
    // Odd latent sizes (e.g. a 24x40 bucket: 3x5 latents) make the UNet upsample to sizes that
    // are not integer multiples; training needs that op's backward.
    use candle_core::Var;
    let t = common::load_tensors(fixtures().join("upsample_odd.safetensors"));
    for i in 0..5 {
        let size: Vec<i64> = t[&format!("{i}.size")].to_vec1().unwrap();
        let (th, tw) = (size[2] as usize, size[3] as usize);
        let x = Var::from_tensor(&t[&format!("{i}.x")]).unwrap();
        let y = lora_diffusion::ops::upsample_nearest2d(x.as_tensor(), th, tw).unwrap();
        assert_eq!(
            common::max_abs_diff(&y, &t[&format!("{i}.y")]),
            0.0,
            "case {i} forward"
        );
        let loss = (y * &t[&format!("{i}.g")]).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let dx = grads.get(x.as_tensor()).unwrap();
        let d = common::max_abs_diff(dx, &t[&format!("{i}.dx")]);
        eprintln!("upsample {size:?}: backward max abs diff {d:e}");
        assert!(d <= 1e-6, "case {i} backward: {d}");
        let plain = x.as_tensor().detach().upsample_nearest2d(th, tw).unwrap();
        assert_eq!(common::max_abs_diff(&plain, &t[&format!("{i}.y")]), 0.0);
    }
}
