//! LoRA joins (src/lora/combine.rs): ljl is exact, svd is the best rank-R approximation,
//! lpl follows the original rule and reports its error correctly.

mod common;

use candle_core::{DType, Device};
use common::{
    expect_failure, expect_success, fixtures, lora, lora_fixture, names_in, run_lora_add, to_f64s,
};
use lora_diffusion::lora::combine::{delta_mat, ljl, lpl, svd_join};
use lora_diffusion::lora::svd::{svd, Mat};
use lora_diffusion::lora::{LoraSet, LoraWeights};
use lora_diffusion::rng::Rng;
use std::path::Path;

const Q: &str = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
const K: &str = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k";
const CONV: &str = "unet.down_blocks.0.resnets.0.conv1";
const TE: &str = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj";

/// A layer with seeded factors: linear (out, in) or conv (out, in, k).
fn layer(
    rng: &mut Rng,
    out: usize,
    inp: usize,
    kernel: Option<usize>,
    rank: usize,
    alpha: f64,
) -> LoraWeights {
    let dev = Device::Cpu;
    let (down, up) = match kernel {
        None => (
            rng.randn((rank, inp), &dev).unwrap(),
            rng.randn((out, rank), &dev).unwrap(),
        ),
        Some(k) => (
            rng.randn((rank, inp, k, k), &dev).unwrap(),
            rng.randn((out, rank, 1, 1), &dev).unwrap(),
        ),
    };
    LoraWeights::new((down * 0.3).unwrap(), (up * 0.2).unwrap(), alpha).unwrap()
}

fn set(layers: Vec<(&str, LoraWeights)>) -> LoraSet {
    LoraSet {
        layers: layers.into_iter().map(|(k, v)| (k.into(), v)).collect(),
        embeddings: vec![],
        metadata: Default::default(),
    }
}

/// Two LoRAs with different ranks and alphas, a conv layer, and layers only in one of them.
fn pair() -> (LoraSet, LoraSet) {
    let mut rng = Rng::new(42);
    let a = set(vec![
        (Q, layer(&mut rng, 32, 32, None, 4, 8.0)),
        (K, layer(&mut rng, 32, 24, None, 4, 4.0)),
        (CONV, layer(&mut rng, 16, 8, Some(3), 2, 1.0)),
        (TE, layer(&mut rng, 32, 32, None, 4, 4.0)),
    ]);
    let b = set(vec![
        (Q, layer(&mut rng, 32, 32, None, 8, 8.0)),
        (K, layer(&mut rng, 32, 24, None, 2, 1.0)),
        (CONV, layer(&mut rng, 16, 8, Some(3), 4, 4.0)),
    ]);
    (a, b)
}

/// The exact A·ΔW₁ + (1−A)·ΔW₂ of one layer (a missing side counts as 0).
fn exact(a: &LoraSet, b: &LoraSet, name: &str, alpha: f64) -> Mat {
    let da = a.layers.get(name).map(|l| delta_mat(l).unwrap());
    let db = b.layers.get(name).map(|l| delta_mat(l).unwrap());
    match (da, db) {
        (Some(x), Some(y)) => x.scaled(alpha).add_scaled(&y, 1.0 - alpha).unwrap(),
        (Some(x), None) => x.scaled(alpha),
        (None, Some(y)) => y.scaled(1.0 - alpha),
        (None, None) => panic!("no layer {name}"),
    }
}

fn rel_diff(a: &Mat, b: &Mat) -> f64 {
    a.add_scaled(b, -1.0).unwrap().frob_sq().sqrt() / b.frob_sq().sqrt()
}

#[test]
fn ljl_is_the_exact_weighted_sum() {
    let (a, b) = pair();
    for alpha in [0.5, 0.3, 1.0, 1.5] {
        let m = ljl(&a, &b, alpha, 1.0 - alpha).unwrap();
        let names = [Q, K, CONV, TE];
        assert_eq!(m.layers.len(), names.len());
        let mut worst: f64 = 0.0;
        for name in names {
            let got = delta_mat(&m.layers[name]).unwrap();
            worst = worst.max(rel_diff(&got, &exact(&a, &b, name, alpha)));
        }
        eprintln!(
            "ljl A={alpha}: worst relative ΔW error {worst:.2e}; ranks q {} k {} conv {} te {}",
            m.layers[Q].rank(),
            m.layers[K].rank(),
            m.layers[CONV].rank(),
            m.layers[TE].rank()
        );
        assert!(worst < 1e-6, "ljl not exact: {worst}");
        if alpha != 1.0 {
            assert_eq!(m.layers[Q].rank(), 12);
            assert_eq!(m.layers[CONV].rank(), 6);
            assert_eq!(m.layers[CONV].down().dims(), &[6, 8, 3, 3]);
            assert_eq!(m.layers[CONV].up().dims(), &[16, 6, 1, 1]);
        } else {
            // Weight 0 for the second LoRA: its factors are left out, the first's kept.
            assert_eq!(m.layers[Q].rank(), 4);
        }
        // A layer only in the first LoRA keeps its alpha; the weight is folded into up.
        assert_eq!(m.layers[TE].alpha(), 4.0);
    }
}

#[test]
fn svd_at_full_rank_is_exact_and_lower_rank_is_eckart_young() {
    let (a, b) = pair();
    let alpha = 0.4;
    let (full, report) = svd_join(&a, &b, alpha, 1.0 - alpha, 64).unwrap();
    for name in [Q, K, CONV, TE] {
        let d = rel_diff(
            &delta_mat(&full.layers[name]).unwrap(),
            &exact(&a, &b, name, alpha),
        );
        eprintln!(
            "svd full rank {name}: rank {}, relative ΔW error {d:.2e}",
            full.layers[name].rank()
        );
        assert!(d < 1e-6);
    }
    assert!(
        (report.overall() - 1.0).abs() < 1e-12,
        "energy {}",
        report.overall()
    );

    for rank in [1, 3, 5] {
        let (low, report) = svd_join(&a, &b, alpha, 1.0 - alpha, rank).unwrap();
        for e in &report.layers {
            let target = exact(&a, &b, &e.name, alpha);
            // Singular values of the formed exact matrix, by a direct SVD.
            let sv = svd(&target).s;
            let total: f64 = sv.iter().map(|s| s * s).sum();
            let k = rank.min(e.rank_in);
            let tail: f64 = sv[k..].iter().map(|s| s * s).sum();
            let got = delta_mat(&low.layers[e.name.as_str()]).unwrap();
            let err_sq = got.add_scaled(&target, -1.0).unwrap().frob_sq();
            eprintln!(
                "svd rank {rank} {}: ‖ΔW_R − ΔW‖² {err_sq:.6e}, Eckart–Young tail {tail:.6e}, energy kept {:.6} (direct {:.6})",
                e.name,
                e.fraction(),
                1.0 - tail / total
            );
            assert_eq!(low.layers[e.name.as_str()].rank(), k);
            assert!(
                (err_sq - tail).abs() <= 1e-5 * total,
                "{}: {err_sq} vs {tail}",
                e.name
            );
            assert!((e.fraction() - (1.0 - tail / total)).abs() < 1e-9);
            assert_eq!(low.layers[e.name.as_str()].alpha(), k as f64);
        }
    }
    assert!(svd_join(&a, &b, 0.5, 0.5, 0).is_err());
}

/// Two LoRAs with the same targets and ranks.
fn same_shape_pair(alpha_b: f64) -> (LoraSet, LoraSet) {
    let mut rng = Rng::new(9);
    let a = set(vec![
        (Q, layer(&mut rng, 32, 32, None, 4, 8.0)),
        (CONV, layer(&mut rng, 16, 8, Some(3), 2, 2.0)),
    ]);
    let b = set(vec![
        (Q, layer(&mut rng, 32, 32, None, 4, alpha_b)),
        (CONV, layer(&mut rng, 16, 8, Some(3), 2, 2.0)),
    ]);
    (a, b)
}

#[test]
fn lpl_follows_the_original_rule_and_reports_its_error() {
    let alpha = 0.3;
    let (a, b) = same_shape_pair(8.0);
    let (m, report) = lpl(&a, &b, alpha, 1.0 - alpha).unwrap();
    assert_eq!(report.folded, 0);
    for name in [Q, CONV] {
        let (la, lb, lm) = (&a.layers[name], &b.layers[name], &m.layers[name]);
        for (got, x, y) in [
            (&lm.up(), &la.up(), &lb.up()),
            (&lm.down(), &la.down(), &lb.down()),
        ] {
            let want: Vec<f64> = to_f64s(x)
                .iter()
                .zip(to_f64s(y))
                .map(|(x, y)| alpha * x + (1.0 - alpha) * y)
                .collect();
            let d = to_f64s(got)
                .iter()
                .zip(&want)
                .map(|(g, w)| (g - w).abs())
                .fold(0.0, f64::max);
            assert!(d < 1e-6, "{name}: factor differs from the rule by {d}");
        }
        assert_eq!(lm.alpha(), la.alpha());
    }
    // The reported error equals a direct computation from the written factors.
    let (mut e2, mut n2) = (0.0, 0.0);
    for l in &report.layers {
        let ex = exact(&a, &b, &l.name, alpha);
        let got = delta_mat(&m.layers[l.name.as_str()]).unwrap();
        let direct = got.add_scaled(&ex, -1.0).unwrap().frob_sq().sqrt();
        eprintln!(
            "lpl {}: reported relative error {:.6e}, direct {:.6e}",
            l.name,
            l.relative(),
            direct / ex.frob_sq().sqrt()
        );
        assert!((l.error - direct).abs() <= 1e-5 * direct.max(1e-12));
        e2 += direct * direct;
        n2 += ex.frob_sq();
    }
    let overall = (e2 / n2).sqrt();
    eprintln!(
        "lpl overall: reported {:.6e}, direct {overall:.6e}",
        report.overall()
    );
    assert!((report.overall() - overall).abs() < 1e-5 * overall);
    assert!(
        overall > 0.1,
        "cross terms should make lpl clearly inexact here"
    );

    // A LoRA mixed with itself comes back unchanged (zero error), also with the weight outside [0, 1].
    let (same, r) = lpl(&a, &a, 1.7, -0.7).unwrap();
    assert!(r.overall() < 1e-12, "{}", r.overall());
    for name in [Q, CONV] {
        assert!(
            rel_diff(
                &delta_mat(&same.layers[name]).unwrap(),
                &delta_mat(&a.layers[name]).unwrap()
            ) < 1e-6
        );
    }
}

#[test]
fn lpl_with_different_scales_folds_them_first() {
    let alpha = 0.5;
    let (a, b) = same_shape_pair(2.0); // Q: scale 2 vs 0.5
    let (m, report) = lpl(&a, &b, alpha, 1.0 - alpha).unwrap();
    assert_eq!(report.folded, 1);
    let (la, lb, lm) = (&a.layers[Q], &b.layers[Q], &m.layers[Q]);
    assert_eq!(lm.alpha(), 4.0, "scale 1 after folding");
    let want: Vec<f64> = to_f64s(la.up())
        .iter()
        .zip(to_f64s(lb.up()))
        .map(|(x, y)| alpha * la.scale() * x + (1.0 - alpha) * lb.scale() * y)
        .collect();
    let d = to_f64s(lm.up())
        .iter()
        .zip(&want)
        .map(|(g, w)| (g - w).abs())
        .fold(0.0, f64::max);
    assert!(d < 1e-6);
    let l = report.layers.iter().find(|l| l.name == Q).unwrap();
    let direct = delta_mat(lm)
        .unwrap()
        .add_scaled(&exact(&a, &b, Q, alpha), -1.0)
        .unwrap()
        .frob_sq()
        .sqrt();
    assert!((l.error - direct).abs() <= 1e-5 * direct);
}

#[test]
fn lpl_refuses_different_targets_ranks_and_shapes() {
    let (a, b) = pair();
    let err = lpl(&a, &b, 0.5, 0.5).unwrap_err().to_string();
    eprintln!("{err}");
    for needle in [
        "layers only in the first LoRA",
        TE,
        "different ranks",
        "rank 4 vs 8",
        "--mode ljl",
        "--mode svd",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in: {err}");
    }
    let mut rng = Rng::new(1);
    let x = set(vec![(K, layer(&mut rng, 32, 24, None, 4, 4.0))]);
    let y = set(vec![(K, layer(&mut rng, 32, 16, None, 4, 4.0))]);
    let err = lpl(&x, &y, 0.5, 0.5).unwrap_err().to_string();
    eprintln!("{err}");
    assert!(err.contains("different shapes") && err.contains("[4, 24]") && err.contains("[4, 16]"));
    // ljl also refuses a layer of two shapes, naming both.
    let err = ljl(&x, &y, 0.5, 0.5).unwrap_err().to_string();
    assert!(
        err.contains(K) && err.contains("[32, 24]") && err.contains("[32, 16]"),
        "{err}"
    );
}

// ---- the command line: `lora_add` and `lora add` on LoRA files ----

fn read_with_model(p: &Path) -> LoraSet {
    lora_diffusion::formats::read_with(p, Some(&common::tiny_arch("sd1-tiny"))).unwrap()
}

#[test]
fn cli_ljl_and_svd_on_files_of_two_formats() {
    let dir = tempfile::tempdir().unwrap();
    let (k, g) = (
        lora_fixture("kohya.safetensors"),
        lora_fixture("cloneofsimo_geglu.safetensors"),
    );
    let model = fixtures().join("sd1-tiny");
    let m = ["--model", model.to_str().unwrap()];
    let (a, b) = (read_with_model(&k), read_with_model(&g));
    let out = dir.path().join("ljl.safetensors");
    let mut extra = vec!["--alpha", "0.3"];
    extra.extend_from_slice(&m);
    expect_success(&run_lora_add(&k, &g, "ljl", &out, &extra));
    let j = lora_diffusion::formats::read(&out).unwrap();
    let names: std::collections::BTreeSet<&lora_diffusion::lora::LayerKey> =
        a.layers.keys().chain(b.layers.keys()).collect();
    assert_eq!(j.layers.len(), names.len());
    let worst = names
        .iter()
        .map(|n| {
            rel_diff(
                &delta_mat(&j.layers[n.as_str()]).unwrap(),
                &exact(&a, &b, n.as_str(), 0.3),
            )
        })
        .fold(0.0, f64::max);
    eprintln!(
        "ljl from files: {} layers, worst relative ΔW error {worst:.2e}",
        j.layers.len()
    );
    assert!(worst < 1e-6);

    // `lora add` is the same program: the same LoRA (values, alphas, metadata).
    let out2 = dir.path().join("ljl2.safetensors");
    let mut args = vec![
        "add",
        "--path_1",
        k.to_str().unwrap(),
        "--path_2",
        g.to_str().unwrap(),
        "--mode",
        "ljl",
    ];
    args.extend_from_slice(&["--alpha", "0.3", "--output_path", out2.to_str().unwrap()]);
    args.extend_from_slice(&m);
    expect_success(&lora(&args));
    let j2 = lora_diffusion::formats::read(&out2).unwrap();
    assert_eq!(j.metadata, j2.metadata);
    assert_eq!(j.layers.len(), j2.layers.len());
    for (n, l) in &j.layers {
        let l2 = &j2.layers[n];
        assert!(
            l.alpha() == l2.alpha()
                && to_f64s(l.up()) == to_f64s(l2.up())
                && to_f64s(l.down()) == to_f64s(l2.down()),
            "{n}"
        );
    }

    // svd at rank 2, written as f16 kohya: best rank-2 fit of the exact sum, energy printed.
    let out = dir.path().join("svd.safetensors");
    let mut extra = vec!["--rank", "2", "--dtype", "f16", "--format", "kohya"];
    extra.extend_from_slice(&m);
    let o = run_lora_add(&k, &g, "svd", &out, &extra);
    expect_success(&o);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("energy kept") && stdout.contains("overall"),
        "{stdout}"
    );
    let sv = lora_diffusion::formats::read(&out).unwrap();
    assert!(sv
        .layers
        .values()
        .all(|l| l.rank() <= 2 && l.down().dtype() == DType::F16));
    let (mut err_sq, mut tail, mut total) = (0.0, 0.0, 0.0);
    for n in &names {
        let target = exact(&a, &b, n.as_str(), 0.5);
        let s = svd(&target).s;
        tail += s[2..].iter().map(|x| x * x).sum::<f64>();
        total += target.frob_sq();
        err_sq += delta_mat(&sv.layers[n.as_str()])
            .unwrap()
            .add_scaled(&target, -1.0)
            .unwrap()
            .frob_sq();
    }
    eprintln!("svd rank 2 (f16 file): Σ‖ΔW_R − ΔW‖² {err_sq:.5e}, Eckart–Young Σ tail {tail:.5e}, energy kept {:.4}%", 100.0 * (1.0 - tail / total));
    assert!(
        (err_sq - tail).abs() < 1e-3 * total,
        "f16 storage aside, the error is the Eckart–Young tail"
    );
    let printed = format!("overall {:.4}%", 100.0 * (1.0 - tail / total));
    assert!(
        stdout.contains(&printed),
        "expected {printed:?} in {stdout}"
    );
}

#[test]
fn cli_lpl_prints_the_true_error_and_refuses_mismatches() {
    let dir = tempfile::tempdir().unwrap();
    let k = lora_fixture("kohya.safetensors");
    let a = lora_diffusion::formats::read(&k).unwrap();
    // A second LoRA with the same targets, ranks and alphas, other factors.
    let mut rng = Rng::new(77);
    let mut b = a.clone();
    for l in b.layers.values_mut() {
        let down = (rng.randn(l.down().dims(), &Device::Cpu).unwrap() * 0.3).unwrap();
        let up = (rng.randn(l.up().dims(), &Device::Cpu).unwrap() * 0.3).unwrap();
        *l = LoraWeights::new(down, up, l.alpha()).unwrap();
    }
    let p2 = dir.path().join("other.safetensors");
    lora_diffusion::formats::write(
        &b,
        &p2,
        lora_diffusion::formats::Format::Ours,
        &Default::default(),
    )
    .unwrap();
    let out = dir.path().join("lpl.safetensors");
    let o = run_lora_add(&k, &p2, "lpl", &out, &["--alpha", "0.25"]);
    expect_success(&o);
    let (m, report) = lpl(&a, &b, 0.25, 0.75).unwrap();
    let (mut e2, mut n2) = (0.0, 0.0);
    for name in a.layers.keys() {
        let ex = exact(&a, &b, name.as_str(), 0.25);
        e2 += delta_mat(&m.layers[name])
            .unwrap()
            .add_scaled(&ex, -1.0)
            .unwrap()
            .frob_sq();
        n2 += ex.frob_sq();
    }
    let direct = (e2 / n2).sqrt();
    let stdout = String::from_utf8_lossy(&o.stdout);
    let printed = format!("overall {:.4}%", 100.0 * direct);
    eprintln!(
        "lpl: direct overall relative error {direct:.6}, reported {:.6}",
        report.overall()
    );
    assert!(
        stdout.contains(&printed) && stdout.contains("--mode ljl"),
        "expected {printed:?} in {stdout}"
    );
    let written = lora_diffusion::formats::read(&out).unwrap();
    for (name, l) in &written.layers {
        assert_eq!(to_f64s(l.up()), to_f64s(m.layers[name].up()), "{name}");
        assert_eq!(to_f64s(l.down()), to_f64s(m.layers[name].down()), "{name}");
    }

    // Different ranks: refused with the list, nothing written.
    let out = dir.path().join("bad.safetensors");
    let svd_file = dir.path().join("r2.safetensors");
    let (r2, _) = lora_diffusion::lora::combine::compress(&a, 2).unwrap();
    lora_diffusion::formats::write(
        &r2,
        &svd_file,
        lora_diffusion::formats::Format::Ours,
        &Default::default(),
    )
    .unwrap();
    expect_failure(
        &run_lora_add(&k, &svd_file, "lpl", &out, &[]),
        &["different ranks", "rank 4 vs 2", "--mode svd"],
    );
    assert!(!out.exists());
    // A corrupt file, an existing output, --rank misuse: clear errors, no output.
    let cut = dir.path().join("cut.safetensors");
    let bytes = std::fs::read(&k).unwrap();
    std::fs::write(&cut, &bytes[..100]).unwrap();
    expect_failure(
        &run_lora_add(&k, &cut, "ljl", &out, &[]),
        &["cut.safetensors"],
    );
    assert!(!out.exists());
    expect_failure(&run_lora_add(&k, &p2, "svd", &out, &[]), &["needs --rank"]);
    expect_failure(
        &run_lora_add(&k, &p2, "ljl", &out, &["--rank", "2"]),
        &["--mode svd only"],
    );
    std::fs::write(&out, "mine").unwrap();
    expect_failure(
        &run_lora_add(&k, &p2, "ljl", &out, &[]),
        &["already exists"],
    );
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "mine");
    let leftovers: Vec<String> = names_in(dir.path())
        .into_iter()
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[test]
fn lpl_broadcasts_rank_1_against_rank_r_with_scales_folded() {
    let mut rng = Rng::new(5);
    // Rank 1 (alpha 1, scale 1) against rank 4 (alpha 8, scale 2): scales differ, so folded.
    let a = set(vec![(Q, layer(&mut rng, 32, 32, None, 1, 1.0))]);
    let b = set(vec![(Q, layer(&mut rng, 32, 32, None, 4, 8.0))]);
    let (w1, w2) = (0.7, 0.6);
    let (m, report) = lpl(&a, &b, w1, w2).unwrap();
    assert_eq!((report.broadcast, report.folded), (1, 1));
    let (la, lb, lm) = (&a.layers[Q], &b.layers[Q], &m.layers[Q]);
    assert_eq!((lm.rank(), lm.alpha()), (4, 4.0));
    let (ua, da, ub, db) = (
        to_f64s(la.up()),
        to_f64s(la.down()),
        to_f64s(lb.up()),
        to_f64s(lb.down()),
    );
    // up[o][j] = w₁·1·ua[o] + w₂·2·ub[o][j]; down[j][i] = w₁·da[i] + w₂·db[j][i].
    let mut worst: f64 = 0.0;
    for (idx, g) in to_f64s(lm.up()).iter().enumerate() {
        let (o, _) = (idx / 4, idx % 4);
        worst = worst.max((g - (w1 * ua[o] + w2 * 2.0 * ub[idx])).abs());
    }
    for (idx, g) in to_f64s(lm.down()).iter().enumerate() {
        worst = worst.max((g - (w1 * da[idx % 32] + w2 * db[idx])).abs());
    }
    eprintln!("lpl rank 1 + rank 4: max |factor − broadcast rule| = {worst:.2e}");
    assert!(worst < 1e-6);
    // Equal scales (cloneofsimo: alpha = rank): raw factors mixed, the rank-4 side's alpha kept.
    let c = set(vec![(Q, layer(&mut rng, 32, 32, None, 4, 4.0))]);
    let (m, report) = lpl(&a, &c, w1, w2).unwrap();
    assert_eq!((report.broadcast, report.folded), (1, 0));
    assert_eq!((m.layers[Q].rank(), m.layers[Q].alpha()), (4, 4.0));
    // Rank 2 against rank 4 does not broadcast.
    let d = set(vec![(Q, layer(&mut rng, 32, 32, None, 2, 2.0))]);
    let err = lpl(&d, &c, w1, w2).unwrap_err().to_string();
    assert!(
        err.contains(&format!("{Q}: rank 2 vs 4")) && err.contains("neither is 1"),
        "{err}"
    );
}
