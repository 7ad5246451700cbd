//! No file the tool writes holds a local path: every command that writes files runs with
//! absolute input paths, and the bytes of everything it wrote are searched for the temporary
//! folder, the working directory, the model folder and the data folder.

mod common;

use common::{expect_success, fixtures, lora, lora_add, repo, s};
use std::path::{Path, PathBuf};

fn all_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(all_files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn no_written_file_holds_a_local_path() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path().canonicalize().unwrap();
    let model = fixtures().join("sd1-tiny").canonicalize().unwrap();
    let data = repo()
        .join("tests/fixtures/train-data")
        .canonicalize()
        .unwrap();
    let (m, d) = (s(&model), s(&data));
    let p = |name: &str| t.join(name).to_string_lossy().to_string();
    let train = |dir: &str, extra: &[&str]| {
        let mut args = vec![
            "train",
            "--model",
            m,
            "--instance-data-dir",
            d,
            "--instance-prompt",
            "a photo of sks toy",
            "--resolution",
            "16",
            "--max-train-steps",
            "2",
            "--output-dir",
        ];
        let out = p(dir);
        args.push(&out);
        args.extend_from_slice(extra);
        expect_success(&lora(&args));
    };
    train(
        "train",
        &[
            "--train-text-encoder",
            "--save-steps",
            "1",
            "--sample-prompt",
            "a photo of sks toy",
            "--sample-every",
            "2",
            "--sample-steps",
            "2",
            "--cache-latents",
        ],
    );
    for f in ["diffusers", "peft", "ours"] {
        train(&format!("train_{f}"), &["--save-format", f]);
    }
    let trained = p("train/lora.safetensors");
    for f in ["kohya", "diffusers", "peft", "ours", "cloneofsimo"] {
        let out = p(&format!("convert_{f}.safetensors"));
        expect_success(&lora(&[
            "convert", &trained, "--to", f, "--model", m, "--out", &out,
        ]));
    }
    let per_layer = p("convert_kohya_per_layer.safetensors");
    expect_success(&lora(&[
        "convert",
        &trained,
        "--to",
        "kohya",
        "--per-layer-alpha",
        "--model",
        m,
        "--out",
        &per_layer,
    ]));
    let upl = p("upl");
    expect_success(&lora_add(&[
        "--path_1",
        m,
        "--path_2",
        &trained,
        "--mode",
        "upl",
        "--alpha",
        "1",
        "--output_path",
        &upl,
    ]));
    let kohya = p("convert_kohya.safetensors");
    for mode in ["lpl", "ljl"] {
        let out = p(&format!("{mode}.safetensors"));
        expect_success(&lora_add(&[
            "--path_1",
            &trained,
            "--path_2",
            &kohya,
            "--mode",
            mode,
            "--alpha",
            "0.5",
            "--output_path",
            &out,
        ]));
    }
    let extracted = p("extract.safetensors");
    expect_success(&lora(&[
        "extract", "--base", m, "--tuned", &upl, "--rank", "2", "--out", &extracted, "--format",
        "kohya",
    ]));
    let lora_arg = format!("{trained}:0.8");
    let gen = p("generate.png");
    expect_success(&lora(&[
        "generate",
        "--model",
        m,
        "--prompt",
        "a photo of sks toy",
        "--steps",
        "2",
        "--lora",
        &lora_arg,
        "--out",
        &gen,
    ]));
    let sweep = p("sweep.png");
    expect_success(&lora(&[
        "sweep",
        "--model",
        m,
        "--prompt",
        "a photo of sks toy",
        "--steps",
        "2",
        "--lora",
        &trained,
        "--alphas",
        "0,1",
        "--out",
        &sweep,
    ]));
    let demo = p("demo");
    expect_success(&lora(&["demo", "--out-dir", &demo, "--steps", "2"]));

    let cwd = std::env::current_dir().unwrap().canonicalize().unwrap();
    let needles = [s(&t), s(&cwd), m, d];
    let files = all_files(&t);
    let mut leaks = vec![];
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        for n in needles {
            if contains(&bytes, n.as_bytes()) {
                leaks.push(format!("{} holds {n}", f.display()));
            }
        }
    }
    eprintln!("{} files written, searched for {needles:?}", files.len());
    for want in [
        "train/lora.safetensors",
        "train/checkpoint-1/lora.safetensors",
        "train/checkpoint-1/trainer_state.json",
        "train/samples/step-000002.png",
        "train_ours/lora.safetensors",
        "upl/unet/diffusion_pytorch_model.safetensors",
        "sweep.gif",
        "demo/lora/lora.safetensors",
        "demo/sweep.gif",
    ] {
        assert!(t.join(want).is_file(), "{want} was not written");
    }
    assert!(files.len() > 30, "{} files", files.len());
    assert!(
        leaks.is_empty(),
        "local paths in written files:\n{}",
        leaks.join("\n")
    );
}
