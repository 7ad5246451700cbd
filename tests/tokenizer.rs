//! CLIP tokenizer parity with transformers' slow `CLIPTokenizer` (tests/fixtures/tokenizer.json).

mod common;

use common::fixtures;
use lora_diffusion::tokenizer::ClipTokenizer;
use std::path::{Path, PathBuf};

/// `(prompts, sd1 ids, sd2 ids)` from the fixture file.
fn load_fixture(path: &Path) -> (Vec<String>, Vec<Vec<u32>>, Vec<Vec<u32>>) {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("fixture {} missing: {e}", path.display()));
    let v: serde_json::Value = serde_json::from_str(&text).expect("fixture is JSON");
    let prompts: Vec<String> = serde_json::from_value(v["prompts"].clone()).expect("prompts");
    let ids = |k: &str| -> Vec<Vec<u32>> {
        let raw: Vec<Vec<i64>> = serde_json::from_value(v[k].clone()).expect("id lists");
        raw.into_iter()
            .map(|r| r.into_iter().map(|x| x as u32).collect())
            .collect()
    };
    let (sd1, sd2) = (ids("sd1"), ids("sd2"));
    assert_eq!(prompts.len(), sd1.len());
    assert_eq!(prompts.len(), sd2.len());
    (prompts, sd1, sd2)
}

/// Encodes every prompt and asserts exact equality, reporting all mismatching prompts.
fn check_ids(tok: &ClipTokenizer, prompts: &[String], expected: &[Vec<u32>], label: &str) {
    let mut bad = Vec::new();
    for (p, want) in prompts.iter().zip(expected) {
        let got = tok.encode(p).expect("encode");
        assert_eq!(got.len(), 77, "{label}: length for {p:?}");
        if &got != want {
            bad.push(format!("{p:?}\n  got  {got:?}\n  want {want:?}"));
        }
    }
    eprintln!(
        "{label}: {} prompts, {} mismatches",
        prompts.len(),
        bad.len()
    );
    assert!(bad.is_empty(), "{label} mismatches:\n{}", bad.join("\n"));
}

fn tokenizer_dir(model: &str) -> PathBuf {
    fixtures().join(model).join("tokenizer")
}

#[test]
fn sd1_ids_equal_transformers() {
    let (prompts, sd1, _) = load_fixture(&fixtures().join("tokenizer.json"));
    let tok = ClipTokenizer::from_dir(&tokenizer_dir("sd1-tiny")).expect("load sd1 tokenizer");
    assert_eq!(tok.pad_token_id(), 49407);
    assert_eq!(tok.bos_token_id(), 49406);
    assert_eq!(tok.eos_token_id(), 49407);
    assert_eq!(tok.max_length(), 77);
    check_ids(&tok, &prompts, &sd1, "sd1 vocab+merges");
}

#[test]
fn sd2_ids_equal_transformers() {
    let (prompts, _, sd2) = load_fixture(&fixtures().join("tokenizer.json"));
    let tok = ClipTokenizer::from_dir(&tokenizer_dir("sd2-tiny")).expect("load sd2 tokenizer");
    assert_eq!(tok.pad_token_id(), 0, "SD2 pads with '!'");
    assert_eq!(tok.max_length(), 77);
    check_ids(&tok, &prompts, &sd2, "sd2 vocab+merges");
}

#[test]
fn encode_shape_truncation_and_batch() {
    let tok = ClipTokenizer::from_dir(&tokenizer_dir("sd1-tiny")).expect("load sd1 tokenizer");
    let long = "cat ".repeat(200);
    let ids = tok.encode(&long).expect("encode");
    assert_eq!(ids.len(), 77);
    assert_eq!(ids[0], 49406);
    assert_eq!(ids[76], 49407, "eos survives truncation");
    let cat = tok.tokenize("cat").expect("tokenize");
    assert_eq!(cat.len(), 1);
    assert!(ids[1..76].iter().all(|&i| i == cat[0]));
    let empty = tok.encode("").expect("encode");
    assert_eq!(&empty[..2], &[49406, 49407]);
    assert!(empty[2..].iter().all(|&i| i == tok.pad_token_id()));
    let prompts = ["a dog", "", "a photo of a cat"];
    let batch = tok.encode_batch(&prompts).expect("batch");
    for (p, ids) in prompts.iter().zip(&batch) {
        assert_eq!(ids, &tok.encode(p).expect("encode"));
    }
}

/// Writes a `tokenizer.json` equivalent to transformers' `CLIPConverter` output, built
/// from the fixture's vocab.json + merges.txt with the `tokenizers` crate.
fn write_tokenizer_json(src: &Path, dst: &Path) {
    use tokenizers::models::bpe::BPE;
    use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormSeq, NFC};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::pre_tokenizers::sequence::Sequence as PreSeq;
    use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
    use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

    let vocab = src.join("vocab.json");
    let merges = src.join("merges.txt");
    let bpe = BPE::from_file(vocab.to_str().unwrap(), merges.to_str().unwrap())
        .end_of_word_suffix("</w>".to_string())
        .unk_token("<|endoftext|>".to_string())
        .build()
        .expect("BPE from vocab/merges");
    let mut t = Tokenizer::new(bpe);
    let normalizer = NormSeq::new(vec![
        NFC.into(),
        Replace::new(
            tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
            " ",
        )
        .expect("replace")
        .into(),
        Lowercase.into(),
    ]);
    t.with_normalizer(Some(normalizer)).expect("normalizer");
    let split = Split::new(
        SplitPattern::Regex(
            r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+".to_string(),
        ),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .expect("split");
    let pre = PreSeq::new(vec![
        split.into(),
        ByteLevel::new(false, true, false).into(),
    ]);
    t.with_pre_tokenizer(Some(pre));
    t.add_special_tokens([
        AddedToken::from("<|startoftext|>", true),
        AddedToken::from("<|endoftext|>", true),
    ])
    .expect("add special tokens");
    t.save(dst.join("tokenizer.json"), false)
        .expect("save tokenizer.json");
    for f in ["tokenizer_config.json", "special_tokens_map.json"] {
        if src.join(f).is_file() {
            std::fs::copy(src.join(f), dst.join(f)).expect("copy config");
        }
    }
}

#[test]
fn tokenizer_json_engine_gives_same_ids() {
    let (prompts, sd1, sd2) = load_fixture(&fixtures().join("tokenizer.json"));
    for (model, expected) in [("sd1-tiny", &sd1), ("sd2-tiny", &sd2)] {
        let src = tokenizer_dir(model);
        let tmp = tempfile::tempdir().expect("tempdir");
        write_tokenizer_json(&src, tmp.path());
        let fast = ClipTokenizer::from_dir(tmp.path()).expect("load tokenizer.json");
        assert!(fast.source().ends_with("tokenizer.json"));
        let slow = ClipTokenizer::from_dir(&src).expect("load vocab+merges");
        assert_eq!(fast.pad_token_id(), slow.pad_token_id());
        for p in &prompts {
            assert_eq!(
                fast.encode(p).unwrap(),
                slow.encode(p).unwrap(),
                "{model}: tokenizer.json vs vocab+merges for {p:?}"
            );
        }
        check_ids(
            &fast,
            &prompts,
            expected,
            &format!("{model} tokenizer.json"),
        );
    }
}

#[test]
fn missing_dir_is_an_error_naming_it() {
    let msg = load_error(Path::new("/nonexistent/tokenizer-dir"));
    assert!(msg.contains("/nonexistent/tokenizer-dir"), "{msg}");
}

/// The error (with its causes) of loading a tokenizer from `dir`, which must fail.
fn load_error(dir: &Path) -> String {
    format!(
        "{:#}",
        ClipTokenizer::from_dir(dir).err().expect("must fail")
    )
}

#[test]
fn corrupt_files_are_errors_naming_the_file() {
    let src = tokenizer_dir("sd1-tiny");
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::copy(src.join("merges.txt"), tmp.path().join("merges.txt")).unwrap();
    std::fs::write(tmp.path().join("vocab.json"), "{\"a\": 1, \"b\": ").unwrap();
    let msg = load_error(tmp.path());
    assert!(msg.contains("vocab.json"), "{msg}");

    std::fs::write(tmp.path().join("vocab.json"), "[1, 2, 3]").unwrap();
    let msg = load_error(tmp.path());
    assert!(msg.contains("vocab.json"), "{msg}");

    std::fs::copy(src.join("vocab.json"), tmp.path().join("vocab.json")).unwrap();
    std::fs::remove_file(tmp.path().join("merges.txt")).unwrap();
    let msg = load_error(tmp.path());
    assert!(msg.contains("merges.txt"), "{msg}");

    std::fs::write(
        tmp.path().join("merges.txt"),
        "#version: 0.2\ni n\nthree parts here\n",
    )
    .unwrap();
    let msg = load_error(tmp.path());
    assert!(
        msg.contains("merges.txt") && msg.contains("line 3"),
        "{msg}"
    );

    std::fs::write(tmp.path().join("tokenizer.json"), "not json").unwrap();
    let msg = load_error(tmp.path());
    assert!(msg.contains("tokenizer.json"), "{msg}");

    std::fs::remove_file(tmp.path().join("tokenizer.json")).unwrap();
    std::fs::copy(src.join("merges.txt"), tmp.path().join("merges.txt")).unwrap();
    std::fs::write(tmp.path().join("tokenizer_config.json"), "{\"pad_token\": ").unwrap();
    let msg = load_error(tmp.path());
    assert!(msg.contains("tokenizer_config.json"), "{msg}");

    std::fs::write(
        tmp.path().join("tokenizer_config.json"),
        "{\"pad_token\": \"<|no-such|>\"}",
    )
    .unwrap();
    let msg = load_error(tmp.path());
    assert!(msg.contains("<|no-such|>"), "{msg}");
}
