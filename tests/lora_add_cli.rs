//! `lora_add` as the original cloneofsimo tool is called: python-fire positions mixed with
//! flags, the seed's `--alpha A` and the later `--alpha_1` / `--alpha_2`, `--with_text_lora`,
//! rank-1 broadcasting in lpl; outputs against the original `add` (tests/fixtures/lora_add,
//! scripts/fixture_lora_add_original.py) and clear errors that write nothing.

mod common;

use common::{
    expect_failure, expect_success, fixtures, lora_add, lora_fixture, names_in, read_json, s,
};
use lora_diffusion::tensor_file::TensorFile;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

fn dir() -> PathBuf {
    fixtures().join("lora_add")
}

fn input(name: &str) -> String {
    s(&dir().join(name)).to_string()
}

fn model() -> String {
    s(&fixtures().join("sd1-tiny")).to_string()
}

/// `lora_add ARGS --format cloneofsimo --model sd1-tiny` (the original's output layout).
fn run_cloneofsimo(args: &[String]) -> Output {
    let mut all: Vec<&str> = args.iter().map(String::as_str).collect();
    let m = model();
    all.extend_from_slice(&["--format", "cloneofsimo", "--model", &m]);
    lora_add(&all)
}

/// Every tensor of a safetensors file as f64, with its shape, and the file's metadata.
#[allow(clippy::type_complexity)]
fn read_all(
    p: &Path,
) -> (
    BTreeMap<String, (Vec<usize>, Vec<f64>)>,
    BTreeMap<String, String>,
) {
    let f = TensorFile::open(p).unwrap();
    let t = f
        .entries
        .iter()
        .map(|(k, e)| (k.clone(), (e.shape.clone(), f.to_f64(k).unwrap())))
        .collect();
    (t, f.metadata.clone().into_iter().collect())
}

/// The original's output of `case`: `key → (shape, values)` and its summary entry.
#[allow(clippy::type_complexity)]
fn original(case: &str) -> (BTreeMap<String, (Vec<usize>, Vec<f64>)>, serde_json::Value) {
    let (all, _) = read_all(&dir().join("original.safetensors"));
    let prefix = format!("{case}/");
    let mine = all
        .into_iter()
        .filter_map(|(k, v)| k.strip_prefix(&prefix).map(|k| (k.to_string(), v)))
        .collect();
    (mine, read_json(dir().join("original.json"))[case].clone())
}

/// Max |ours − original| over every tensor; the key sets and shapes must be equal, and the
/// `{component}:{i}:rank` entries equal the ranks of the written tensors.
fn compare(case: &str, ours: &Path) -> f64 {
    let (want, summary) = original(case);
    let (got, meta) = read_all(ours);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "{case}: tensor names differ from the original's"
    );
    let mut worst: f64 = 0.0;
    for (k, (shape, w)) in &want {
        let (gs, g) = &got[k];
        assert_eq!(gs, shape, "{case} {k}: shape");
        for (a, b) in g.iter().zip(w) {
            worst = worst.max((a - b).abs());
        }
        if let Some(layer) = k.strip_suffix(":down") {
            assert_eq!(
                meta[&format!("{layer}:rank")],
                shape[0].to_string(),
                "{case} {layer}: rank entry"
            );
            if let Some(r) = summary["metadata"].get(format!("{layer}:rank")) {
                assert_eq!(
                    r.as_str().unwrap(),
                    shape[0].to_string(),
                    "{case} {layer}: the original's rank entry"
                );
            }
        }
    }
    eprintln!(
        "{case}: {} tensors, max |ours − original lora_add| = {worst:.3e}",
        want.len()
    );
    worst
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn lpl_and_ljl_equal_the_original_lora_add_in_both_spellings() {
    let tmp = tempfile::tempdir().unwrap();
    let out = |n: &str| s(&tmp.path().join(format!("{n}.safetensors"))).to_string();
    let (a, b, r1) = (
        input("te_a.safetensors"),
        input("te_b.safetensors"),
        input("te_r1.safetensors"),
    );
    let cases: Vec<(&str, Vec<String>)> = vec![
        // Later code, python-fire positions: add(path_1, path_2, output_path, alpha_1, alpha_2).
        (
            "lpl_alpha_1_2",
            vec![
                a.clone(),
                b.clone(),
                out("lpl_alpha_1_2"),
                "--alpha_1".into(),
                "0.8".into(),
                "--alpha_2".into(),
                "0.4".into(),
            ],
        ),
        // No weights: the original's defaults 0.5 and 0.5.
        (
            "lpl_defaults",
            strings(&[
                "--path_1",
                &a,
                "--path_2",
                &b,
                "--output_path",
                &out("lpl_defaults"),
            ]),
        ),
        // Rank 1 with rank 4, flags mixed with positions (fire fills the free positions in order).
        (
            "lpl_rank1_rank4",
            strings(&[
                &r1,
                "--path_2",
                &a,
                &out("lpl_rank1_rank4"),
                "--alpha_1=0.6",
                "--alpha-2",
                "0.5",
                "--mode",
                "lpl",
            ]),
        ),
        // The join: ΔW₁ + ΔW₂ at rank 4 + 1 (the original ignores the weights).
        (
            "ljl",
            strings(&["--mode", "ljl", &a, &r1, "--output_path", &out("ljl")]),
        ),
        // The seed's spelling on .pt lists with their text-encoder files.
        (
            "seed_lpl_alpha",
            strings(&[
                "--path_1",
                &input("seed_a.pt"),
                "--path_2",
                &input("seed_b.pt"),
                "--mode",
                "lpl",
                "--alpha",
                "0.3",
                "--output_path",
                &out("seed_lpl_alpha"),
                "--with_text_lora",
            ]),
        ),
    ];
    let summary = read_json(dir().join("original.json"));
    assert_eq!(summary.as_object().unwrap().len(), cases.len());
    for (case, args) in &cases {
        let o = run_cloneofsimo(args);
        expect_success(&o);
        let worst = compare(case, &tmp.path().join(format!("{case}.safetensors")));
        assert!(
            worst <= 1e-6,
            "{case}: differs from the original by {worst}"
        );
        let stdout = String::from_utf8_lossy(&o.stdout);
        if *case == "lpl_rank1_rank4" {
            assert!(
                stdout.contains("12 layers had rank 1 on one side"),
                "{stdout}"
            );
        }
    }
    // The seed case holds both components; the text-encoder layers came from the .text_encoder.pt.
    let (want, _) = original("seed_lpl_alpha");
    assert_eq!(
        want.keys()
            .filter(|k| k.starts_with("text_encoder:"))
            .count(),
        24
    );
    assert_eq!(want.keys().filter(|k| k.starts_with("unet:")).count(), 176);
}

#[test]
fn ljl_weights_scale_each_side_and_alpha_means_a_and_one_minus_a() {
    let tmp = tempfile::tempdir().unwrap();
    let (want, _) = original("ljl");
    let (a, r1) = (input("te_a.safetensors"), input("te_r1.safetensors"));
    for (name, weights, w1, w2) in [
        ("w", vec!["--alpha_1", "0.5", "--alpha_2", "2"], 0.5, 2.0),
        ("only2", vec!["--alpha_2", "-1.5"], 1.0, -1.5),
        ("seed", vec!["--alpha", "0.25"], 0.25, 0.75),
    ] {
        let out = tmp.path().join(format!("{name}.safetensors"));
        let mut args = strings(&[&a, &r1, s(&out), "--mode", "ljl"]);
        args.extend(strings(&weights));
        expect_success(&run_cloneofsimo(&args));
        let (got, _) = read_all(&out);
        let mut worst: f64 = 0.0;
        for (k, (shape, w)) in &want {
            let g = &got[k].1;
            if k.ends_with(":up") {
                // up = [w₁·up₁ (4 columns), w₂·up₂ (1 column)], down = [down₁; down₂].
                let cols = shape[1];
                for (i, (g, w)) in g.iter().zip(w).enumerate() {
                    let f = if i % cols < 4 { w1 } else { w2 };
                    worst = worst.max((g - f * w).abs());
                }
            } else {
                for (g, w) in g.iter().zip(w) {
                    worst = worst.max((g - w).abs());
                }
            }
        }
        eprintln!("ljl weights {w1}, {w2}: max |ours − weighted original join| = {worst:.3e}");
        assert!(worst <= 1e-6, "{name}: {worst}");
    }
}

#[test]
fn with_text_lora_decides_whether_the_text_encoder_pt_is_read() {
    let tmp = tempfile::tempdir().unwrap();
    let (want, _) = original("seed_lpl_alpha");
    for (name, flag) in [("without", None), ("false", Some("--with_text_lora=False"))] {
        let out = tmp.path().join(format!("{name}.safetensors"));
        let mut args = strings(&[
            &input("seed_a.pt"),
            &input("seed_b.pt"),
            s(&out),
            "--alpha",
            "0.3",
        ]);
        args.extend(flag.map(String::from));
        let o = run_cloneofsimo(&args);
        expect_success(&o);
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(
            stdout.contains("seed_a.text_encoder.pt (12 layers) is left out")
                && stdout.contains("--with_text_lora"),
            "{stdout}"
        );
        let (got, _) = read_all(&out);
        assert!(got.keys().all(|k| k.starts_with("unet:")), "{name}");
        assert_eq!(got.len(), 176);
        let worst = got
            .iter()
            .flat_map(|(k, (_, g))| g.iter().zip(&want[k].1).map(|(a, b)| (a - b).abs()))
            .fold(0.0, f64::max);
        assert!(worst <= 1e-6, "{name}: {worst}");
    }
    // Only one input has a text-encoder file: the text encoder is skipped, as the original does.
    let one = tmp.path().join("one");
    std::fs::create_dir(&one).unwrap();
    std::fs::copy(dir().join("seed_b.pt"), one.join("b.pt")).unwrap();
    let out = tmp.path().join("one.safetensors");
    let o = run_cloneofsimo(&strings(&[
        &input("seed_a.pt"),
        s(&one.join("b.pt")),
        s(&out),
        "--with_text_lora",
    ]));
    expect_success(&o);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("no text-encoder LoRA beside") && stdout.contains("b.pt"),
        "{stdout}"
    );
    assert!(read_all(&out).0.keys().all(|k| k.starts_with("unet:")));
}

#[test]
fn upl_takes_alpha_or_alpha_1_as_the_multiplier_in_either_argument_form() {
    let tmp = tempfile::tempdir().unwrap();
    let lora = lora_fixture("kohya.safetensors");
    let (x, y) = (tmp.path().join("x"), tmp.path().join("y"));
    let m = model();
    expect_success(&lora_add(&[
        "--path_1",
        &m,
        "--path_2",
        s(&lora),
        "--mode",
        "upl",
        "--alpha",
        "0.7",
        "--output_path",
        s(&x),
    ]));
    expect_success(&lora_add(&[
        &m,
        s(&lora),
        s(&y),
        "--mode=upl",
        "--alpha_1",
        "0.7",
    ]));
    for rel in [
        "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    ] {
        let (a, b) = (
            std::fs::read(x.join(rel)).unwrap(),
            std::fs::read(y.join(rel)).unwrap(),
        );
        assert!(a == b, "{rel}: --alpha 0.7 and --alpha_1 0.7 differ");
        let input = std::fs::read(fixtures().join("sd1-tiny").join(rel)).unwrap();
        assert!(a != input, "{rel}: nothing fused");
    }
}

#[test]
fn bad_arguments_give_clear_errors_and_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let out = s(&d.join("out.safetensors")).to_string();
    let pt = s(&d.join("merged.pt")).to_string();
    let (a, b) = (input("te_a.safetensors"), input("te_b.safetensors"));
    let m = model();
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            vec![&a, &b, &out, "--alpha", "0.3", "--alpha_1", "0.5"],
            vec!["--alpha 0.3", "--alpha_1 0.5", "not both"],
        ),
        (
            vec![&a, &b, &out, "--alpha_2", "0.1", "--alpha", "0.3"],
            vec!["--alpha 0.3", "--alpha_2 0.1"],
        ),
        (vec![&a, &b], vec!["missing OUTPUT_PATH", "--output_path"]),
        (
            vec!["--path_1", &a, "--output_path", &out],
            vec!["missing PATH_2", "second positional"],
        ),
        (
            vec![&a, &b, &out, "0.3"],
            vec!["unexpected positional argument \"0.3\"", "--alpha"],
        ),
        (
            vec![&m, &b, &out, "--mode", "upl", "--alpha_2", "0.5"],
            vec!["--alpha_2 0.5", "upl", "--alpha_1"],
        ),
        (
            vec![&a, &b, &out, "--alpha", "NaN"],
            vec!["--alpha NaN", "finite"],
        ),
        (
            vec![&a, &b, &pt, "--model", &m],
            vec!["merged.pt", ".safetensors", "--format cloneofsimo"],
        ),
    ];
    for (args, needles) in cases {
        let err = expect_failure(&lora_add(&args), &needles);
        eprintln!("{}", err.trim_end());
        assert!(names_in(d).is_empty(), "{args:?} left files behind");
    }
}

#[test]
fn lpl_of_ranks_that_do_not_broadcast_names_the_layer_and_ranks() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model();
    let arch = common::tiny_arch("sd1-tiny");
    let a =
        lora_diffusion::formats::read_with(&dir().join("te_a.safetensors"), Some(&arch)).unwrap();
    let (r2, _) = lora_diffusion::lora::combine::compress(&a, 2).unwrap();
    let p2 = tmp.path().join("r2.safetensors");
    lora_diffusion::formats::write(
        &r2,
        &p2,
        lora_diffusion::formats::Format::Ours,
        &Default::default(),
    )
    .unwrap();
    let before = names_in(tmp.path());
    let out = tmp.path().join("out.safetensors");
    let err = expect_failure(
        &lora_add(&[&input("te_a.safetensors"), s(&p2), s(&out), "--model", &m]),
        &[
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj: rank 4 vs 2",
            "neither is 1",
            "--mode ljl",
        ],
    );
    eprintln!("{}", err.trim_end());
    assert_eq!(names_in(tmp.path()), before);
}

#[test]
fn help_documents_both_spellings_with_examples() {
    let o = lora_add(&["--help"]);
    expect_success(&o);
    let help = String::from_utf8_lossy(&o.stdout);
    for needle in [
        "PATH_1 PATH_2 OUTPUT_PATH",
        "--alpha <A>",
        "--alpha_1",
        "--alpha_2",
        "--with_text_lora",
        "upl-ckpt-v2",
        "ljl",
        "--path_1 a.safetensors --path_2 b.safetensors --mode lpl --alpha 0.3",
        "lora_add a.safetensors b.safetensors c.safetensors --alpha_1 0.8 --alpha_2 0.4",
    ] {
        assert!(help.contains(needle), "--help lacks {needle:?}:\n{help}");
    }
}
