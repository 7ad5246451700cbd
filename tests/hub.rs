//! `--model owner/name` through the Hugging Face cache, offline: what is cached loads, what is not
//! gives an error that says what to download.

mod common;

use common::{expect_failure, expect_success, fixtures, hf_cache_model};
use std::process::Command;

#[test]
fn hub_ids_resolve_from_the_offline_cache() {
    let home = tempfile::tempdir().unwrap();
    let snapshot = hf_cache_model(
        home.path(),
        "tiny-org/sd1-tiny",
        "0123abcd",
        &fixtures().join("sd1-tiny"),
    );
    let out = home.path().join("img.png");
    let run = |model: &str| {
        Command::new(env!("CARGO_BIN_EXE_lora"))
            .args([
                "generate", "--model", model, "--prompt", "a cat", "--steps", "2",
            ])
            .args(["--out", out.to_str().unwrap(), "--force"])
            .env("HF_HOME", home.path())
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap()
    };
    expect_success(&run("tiny-org/sd1-tiny"));
    assert_eq!(image::open(&out).unwrap().width(), 16);

    let err = expect_failure(
        &run("tiny-org/not-cached"),
        &[
            "tiny-org/not-cached",
            "huggingface-cli download",
            "HF_HUB_OFFLINE",
        ],
    );
    eprintln!("{err}");

    // A cached model with a component missing names that file.
    std::fs::remove_dir_all(snapshot.join("vae")).unwrap();
    expect_failure(&run("tiny-org/sd1-tiny"), &["vae/"]);
}
