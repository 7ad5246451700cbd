//! Learned tokens: tokenizer ids equal transformers' `add_tokens`, images equal diffusers'
//! `load_textual_inversion` and cloneofsimo's pivotal-tuning application (emulated, see
//! scripts/fixture_embeddings.py), readers / writers of every format keep them bit-identical.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{
    err_text, expect_failure, expect_success, fixture_params, fixtures, identical, lora,
    max_abs_diff, png_levels, read_json, s,
};
use lora_diffusion::formats::embeddings::{read_standalone, EmbeddingSpec};
use lora_diffusion::formats::{self, Format, WriteOptions};
use lora_diffusion::hub::ModelSource;
use lora_diffusion::lora::combine::{ljl, lpl};
use lora_diffusion::lora::{LearnedToken, LoraSet};
use lora_diffusion::pipeline::embeddings::{collect_tokens, SourcedToken};
use lora_diffusion::pipeline::lora::{read_loras, LoraSpec};
use lora_diffusion::pipeline::StableDiffusion;
use lora_diffusion::tokenizer::ClipTokenizer;
use std::path::{Path, PathBuf};

fn emb(name: &str) -> PathBuf {
    fixtures().join("embeddings").join(name)
}

fn expected() -> serde_json::Value {
    read_json(emb("expected.json"))
}

fn image(name: &str) -> (Tensor, Tensor) {
    let t = common::load_tensors(emb("expected.safetensors"));
    (
        t[&format!("{name}.image")].clone(),
        t[&format!("{name}.image_u8")].clone(),
    )
}

fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn model() -> ModelSource {
    ModelSource::Local(fixtures().join("sd1-tiny"))
}

fn tokenizer() -> ClipTokenizer {
    ClipTokenizer::from_dir(&fixtures().join("sd1-tiny").join("tokenizer")).unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

fn same_tokens(a: &[LearnedToken], b: &[LearnedToken]) {
    let names = |v: &[LearnedToken]| v.iter().map(|e| e.token.clone()).collect::<Vec<_>>();
    assert_eq!(names(a), names(b));
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.vectors.dims(), y.vectors.dims(), "{}", x.token);
        assert_eq!(x.vectors.dtype(), y.vectors.dtype(), "{}", x.token);
        assert_eq!(bits(&x.vectors), bits(&y.vectors), "{}: vectors", x.token);
    }
}

#[test]
fn token_ids_equal_transformers_add_tokens() {
    let want = expected();
    let mut tok = tokenizer();
    assert_eq!(tok.len() as u64, want["vocab_len"].as_u64().unwrap());
    let a = tok.add_learned_token(&["<s1>".into()]).unwrap();
    let b = tok.add_learned_token(&["<s2>".into()]).unwrap();
    assert_eq!((a[0], b[0]), (49408, 49409));
    let cases = want["token_ids"].as_object().unwrap();
    assert!(cases.len() >= 5);
    for (prompt, ids) in cases {
        let ours = tok.encode(prompt).unwrap();
        assert_eq!(ours, ids_of(ids), "prompt {prompt:?}");
    }
    let e = err_text(tok.add_learned_token(&["<s1>".into()]));
    assert!(e.contains("\"<s1>\"") && e.contains("already"), "{e}");
}

#[test]
fn a1111_multi_vector_expands_to_token_token_1() {
    let want = expected();
    let t = read_standalone(&emb("a1111.pt"), None).unwrap();
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].token, "mvtok");
    assert_eq!((t[0].count(), t[0].width()), (3, 32));
    assert_eq!(t[0].token_names(), ["mvtok", "mvtok_1", "mvtok_2"]);
    let mut tok = tokenizer();
    let ids = tok.add_learned_token(&t[0].token_names()).unwrap();
    assert_eq!(ids, [49408, 49409, 49410]);
    let prompt = want["a1111_prompt"].as_str().unwrap();
    assert_eq!(tok.encode(prompt).unwrap(), ids_of(&want["a1111_ids"]));
    // diffusers' converted spelling is no input form here: each written `mvtok_i` adds its id again.
    let converted = want["a1111_converted"].as_str().unwrap();
    let c = tok.encode(converted).unwrap();
    assert_ne!(
        c,
        ids_of(&want["a1111_ids"]),
        "each mvtok_i in the text adds its ids again"
    );
    // A1111 safetensors (emb_params): named by FILE:TOKEN, else by the file name.
    let named = read_standalone(&emb("a1111.safetensors"), Some("<x>")).unwrap();
    assert_eq!((named[0].token.as_str(), named[0].count()), ("<x>", 2));
    let stem = read_standalone(&emb("a1111.safetensors"), None).unwrap();
    assert_eq!(stem[0].token, "a1111");
    same_tokens(
        &[LearnedToken::new("<x>", stem[0].vectors.clone()).unwrap()],
        &named,
    );
}

#[test]
fn diffusers_ti_safetensors_and_bin_agree() {
    let a = read_standalone(&emb("learned_embeds.safetensors"), None).unwrap();
    let b = read_standalone(&emb("learned_embeds.bin"), None).unwrap();
    assert_eq!(a[0].token, "<cat-toy>");
    same_tokens(&a, &b);
}

fn generate_with(
    loras: &[(&str, f64)],
    embeddings: &[EmbeddingSpec],
    prompt: &str,
    fuse: bool,
) -> Tensor {
    let specs: Vec<LoraSpec> = loras
        .iter()
        .map(|(f, scale)| LoraSpec {
            path: emb(f),
            scale: *scale,
        })
        .collect();
    let sets = read_loras(&model(), &specs).unwrap();
    let fused = if fuse { sets.clone() } else { vec![] };
    let mut sd = StableDiffusion::load_fused(&model(), DType::F32, &Device::Cpu, &fused).unwrap();
    if !fuse {
        for (set, scale) in &sets {
            sd.add_lora(set, *scale).unwrap();
        }
    }
    let sources: Vec<(&Path, &LoraSet)> = specs
        .iter()
        .zip(&sets)
        .map(|(s, (set, _))| (s.path.as_path(), set))
        .collect();
    let tokens = collect_tokens(&sources, embeddings).unwrap();
    sd.add_learned_tokens(&tokens).unwrap();
    assert!(sd.absent_tokens(&tokens, &[prompt]).unwrap().is_empty());
    let mut params = fixture_params("sd1");
    params.prompt = prompt.into();
    sd.generate(&params, &mut |_, _| {}).unwrap()
}

#[test]
fn textual_inversion_image_matches_diffusers_load_textual_inversion() {
    let want = expected();
    let (img, img_u8) = image("ti");
    let spec = EmbeddingSpec {
        path: emb("learned_embeds.safetensors"),
        token: None,
    };
    let ours = generate_with(&[], &[spec], want["ti_prompt"].as_str().unwrap(), false);
    let d = max_abs_diff(&ours, &img);
    let l = png_levels(&ours, &img_u8);
    let plain = common::load_tensors(emb("expected.safetensors"))["plain.image"].clone();
    let moved = max_abs_diff(&img, &plain);
    eprintln!("TI: max abs {d:.2e}, {l} levels; the token moved the image by {moved:.3}");
    assert!(d < 1e-4, "{d}");
    assert!(l <= 1.0, "{l} levels");
    assert!(
        moved > 0.05,
        "the learned token barely changes the image ({moved})"
    );
}

#[test]
fn pivotal_tuning_file_matches_cloneofsimo_application() {
    let want = expected();
    let (img, img_u8) = image("pti");
    let prompt = want["pti_prompt"].as_str().unwrap();
    let ours = generate_with(&[("pti.safetensors", 1.0)], &[], prompt, true);
    let d = max_abs_diff(&ours, &img);
    let l = png_levels(&ours, &img_u8);
    // Run-time adapters: the same image within PNG rounding.
    let adapters = generate_with(&[("pti.safetensors", 1.0)], &[], prompt, false);
    let da = max_abs_diff(&adapters, &img);
    let la = png_levels(&adapters, &img_u8);
    eprintln!("PTI adapters: max abs {da:.2e}, {la} levels");
    assert!(da < 1.5e-3, "adapters: {da}");
    assert!(la <= 1.0, "adapters: {la} levels");
    // Without the tokens (the bug: `<s1><s2>` as ordinary BPE pieces) the image differs.
    let specs = [LoraSpec {
        path: emb("pti.safetensors"),
        scale: 1.0,
    }];
    let sets = read_loras(&model(), &specs).unwrap();
    let sd = StableDiffusion::load(&model(), DType::F32, &Device::Cpu).unwrap();
    sd.add_lora(&sets[0].0, 1.0).unwrap();
    let mut params = fixture_params("sd1");
    params.prompt = want["pti_prompt"].as_str().unwrap().into();
    let untokened = sd.generate(&params, &mut |_, _| {}).unwrap();
    let moved = max_abs_diff(&untokened, &img);
    eprintln!("PTI: max abs {d:.2e}, {l} levels; without the tokens off by {moved:.3}");
    // This prompt's large token vectors make the image sensitive to summation order: diffusers'
    // own image moves by 3e-4 between 1 and 2 torch threads (measured), so the bound is 1.5e-3.
    assert!(d < 1.5e-3, "{d}");
    assert!(l <= 1.0, "{l} levels");
    assert!(moved > 0.05, "{moved}");
}

#[test]
fn round_trips_cloneofsimo_ours_kohya_are_bit_identical() {
    let arch = common::tiny_arch("sd1-tiny");
    let src = formats::read_with(&emb("pti.safetensors"), Some(&arch)).unwrap();
    assert_eq!(src.embeddings.len(), 2);
    assert_eq!(src.embeddings[0].token, "<s1>");
    assert_eq!(src.embeddings[1].token, "<s2>");
    let dir = tempfile::tempdir().unwrap();
    let opts = WriteOptions {
        arch: Some(&arch),
        ..Default::default()
    };
    let mut cur = src.clone();
    for (i, f) in [
        Format::Ours,
        Format::Kohya,
        Format::Cloneofsimo,
        Format::Kohya,
        Format::Ours,
        Format::Cloneofsimo,
    ]
    .into_iter()
    .enumerate()
    {
        let p = dir.path().join(format!("{i}-{f}.safetensors"));
        formats::write(&cur, &p, f, &opts).unwrap();
        assert_eq!(formats::detect(&p).unwrap(), f);
        cur = formats::read_with(&p, Some(&arch)).unwrap();
        identical(&src, &cur);
        same_tokens(&src.embeddings, &cur.embeddings);
    }
    // Key spellings of the embeddings per format.
    let keys = |f: &str| {
        lora_diffusion::tensor_file::read_header(&dir.path().join(f))
            .unwrap()
            .entries
            .keys()
            .filter(|k| !k.contains("lora") && !k.contains(':'))
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(
        keys("1-kohya.safetensors"),
        [
            "bundle_emb.<s1>.string_to_param.*",
            "bundle_emb.<s2>.string_to_param.*"
        ]
    );
    assert_eq!(keys("2-cloneofsimo.safetensors"), ["<s1>", "<s2>"]);
    assert!(keys("0-ours.safetensors")
        .iter()
        .all(|k| k.starts_with("learned_embeds.") || k.ends_with(".alpha")));
}

#[test]
fn ours_keeps_token_order_and_multi_vector_tokens() {
    let a1111 = read_standalone(&emb("a1111.pt"), None).unwrap();
    let arch = common::tiny_arch("sd1-tiny");
    let mut set = formats::read_with(&emb("pti.safetensors"), Some(&arch)).unwrap();
    set.embeddings.reverse();
    set.embeddings.extend(a1111.clone());
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("o.safetensors");
    formats::write(&set, &p, Format::Ours, &WriteOptions::default()).unwrap();
    let back = formats::read(&p).unwrap();
    same_tokens(&set.embeddings, &back.embeddings);
    // kohya keeps the multi-vector token whole, cloneofsimo as mvtok, mvtok_1, mvtok_2.
    let k = dir.path().join("k.safetensors");
    formats::write(&set, &k, Format::Kohya, &WriteOptions::default()).unwrap();
    assert_eq!(
        formats::read(&k)
            .unwrap()
            .embedding("mvtok")
            .unwrap()
            .count(),
        3
    );
    let c = dir.path().join("c.safetensors");
    let opts = WriteOptions {
        arch: Some(&arch),
        ..Default::default()
    };
    formats::write(&set, &c, Format::Cloneofsimo, &opts).unwrap();
    let names: Vec<String> = formats::read_with(&c, Some(&arch))
        .unwrap()
        .embeddings
        .iter()
        .map(|e| e.token.clone())
        .collect();
    assert_eq!(names, ["<s1>", "<s2>", "mvtok", "mvtok_1", "mvtok_2"]);
}

#[test]
fn diffusers_and_peft_outputs_write_a_sidecar() {
    let arch = common::tiny_arch("sd1-tiny");
    let set = formats::read_with(&emb("pti.safetensors"), Some(&arch)).unwrap();
    for f in [Format::Diffusers, Format::Peft] {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.safetensors");
        assert_eq!(
            formats::sidecar_for(&set, &p, f),
            Some(dir.path().join("learned_embeds.safetensors"))
        );
        formats::write(&set, &p, f, &WriteOptions::default()).unwrap();
        let side = read_standalone(&dir.path().join("learned_embeds.safetensors"), None).unwrap();
        same_tokens(&set.embeddings, &side);
        // A second write refuses to replace the sidecar without --force.
        std::fs::remove_file(&p).unwrap();
        let e = err_text(formats::write(&set, &p, f, &WriteOptions::default()));
        assert!(
            e.contains("learned_embeds.safetensors") && e.contains("--force"),
            "{e}"
        );
        assert!(!p.exists());
    }
    assert_eq!(
        formats::sidecar_for(&set, Path::new("x.safetensors"), Format::Kohya),
        None
    );
}

fn token(name: &str, v: f32) -> LearnedToken {
    LearnedToken::new(name, Tensor::full(v, 32, &Device::Cpu).unwrap()).unwrap()
}

#[test]
fn joins_keep_embeddings_first_wins() {
    let arch = common::tiny_arch("sd1-tiny");
    let a = formats::read_with(&emb("pti.safetensors"), Some(&arch)).unwrap();
    let mut b = a.clone();
    b.embeddings = vec![token("<s2>", 5.0), token("<s3>", 7.0)];
    let (l, _) = lpl(&a, &b, 0.5, 0.5).unwrap();
    let j = ljl(&a, &b, 0.5, 0.5).unwrap();
    let (sv, _) = lora_diffusion::lora::combine::svd_join(&a, &b, 0.5, 0.5, 2).unwrap();
    for out in [&l, &j, &sv] {
        let names: Vec<&str> = out.embeddings.iter().map(|e| e.token.as_str()).collect();
        assert_eq!(names, ["<s1>", "<s2>", "<s3>"]);
        same_tokens(&out.embeddings[..2], &a.embeddings);
        same_tokens(&out.embeddings[2..], &b.embeddings[1..]);
    }
}

#[test]
fn application_errors_name_file_and_token() {
    let dir = tempfile::tempdir().unwrap();
    let mut sd = StableDiffusion::load(&model(), DType::F32, &Device::Cpu).unwrap();
    let rows = sd.text_encoder().unwrap().token_embedding().dim(0).unwrap();
    // A token of the vocabulary.
    let spec = EmbeddingSpec {
        path: emb("learned_embeds.safetensors"),
        token: Some("castle".into()),
    };
    let t = collect_tokens(&[], &[spec]).unwrap();
    let e = err_text(sd.add_learned_tokens(&t));
    assert!(
        e.contains("\"castle\"") && e.contains("learned_embeds.safetensors"),
        "{e}"
    );
    // A width other than the text encoder's.
    let wide = dir.path().join("wide.safetensors");
    let v = Tensor::zeros(16, DType::F32, &Device::Cpu).unwrap();
    lora_diffusion::tensor_file::write(
        &wide,
        vec![(
            "<w>".to_string(),
            lora_diffusion::tensor_file::OutTensor::from_tensor(&v).unwrap(),
        )],
        &Default::default(),
        false,
    )
    .unwrap();
    let t = collect_tokens(
        &[],
        &[EmbeddingSpec {
            path: wide.clone(),
            token: None,
        }],
    )
    .unwrap();
    let e = err_text(sd.add_learned_tokens(&t));
    assert!(
        e.contains("wide.safetensors")
            && e.contains("\"<w>\"")
            && e.contains("16")
            && e.contains("32"),
        "{e}"
    );
    // Two files defining the same token.
    let spec = |p: &Path| EmbeddingSpec {
        path: p.to_path_buf(),
        token: None,
    };
    let e = err_text(collect_tokens(
        &[],
        &[
            spec(&emb("learned_embeds.safetensors")),
            spec(&emb("learned_embeds.bin")),
        ],
    ));
    assert!(
        e.contains("\"<cat-toy>\"")
            && e.contains("learned_embeds.safetensors")
            && e.contains("learned_embeds.bin"),
        "{e}"
    );
    // Nothing was added by the failed calls.
    assert_eq!(
        sd.text_encoder().unwrap().token_embedding().dim(0).unwrap(),
        rows
    );
    let ok: Vec<SourcedToken> = collect_tokens(&[], &[spec(&emb("a1111.pt"))]).unwrap();
    sd.add_learned_tokens(&ok).unwrap();
    assert_eq!(
        sd.text_encoder().unwrap().token_embedding().dim(0).unwrap(),
        rows + 3
    );
    assert_eq!(sd.absent_tokens(&ok, &["a castle"]).unwrap(), ["mvtok"]);
    assert!(sd
        .absent_tokens(&ok, &["a mvtok castle"])
        .unwrap()
        .is_empty());
}

#[test]
fn inspect_lists_tokens_and_counts_their_parameters() {
    let arch = common::tiny_arch("sd1-tiny");
    let set = formats::read_with(&emb("pti.safetensors"), Some(&arch)).unwrap();
    let factors: usize = set
        .layers
        .values()
        .map(|w| w.down().elem_count() + w.up().elem_count())
        .sum();
    let sum = formats::summary::summarize(&emb("pti.safetensors"), Some(&arch)).unwrap();
    assert_eq!(sum.parameters, factors + 2 * 32);
    assert_eq!(
        sum.tokens,
        [("<s1>".to_string(), 1, 32), ("<s2>".to_string(), 1, 32)]
    );
    let text = sum.to_string();
    assert!(
        text.contains("tokens:      <s1> (1 vector of width 32), <s2> (1 vector of width 32)"),
        "{text}"
    );
}

#[test]
fn cli_generate_embedding_convert_and_warning() {
    let dir = tempfile::tempdir().unwrap();
    let m = fixtures().join("sd1-tiny");
    let out = dir.path().join("a.png");
    let e = format!("{}:<toy>", s(&emb("learned_embeds.safetensors")));
    let args = |prompt: &'static str, out: &Path| {
        vec![
            "generate".to_string(),
            "--model".into(),
            s(&m).into(),
            "--prompt".into(),
            prompt.into(),
            "--steps".into(),
            "1".into(),
            "--embedding".into(),
            e.clone(),
            "--lora".into(),
            s(&emb("pti.safetensors")).into(),
            "--out".into(),
            s(out).into(),
        ]
    };
    let a = args("a <toy> castle", &out);
    let o = lora(&a.iter().map(String::as_str).collect::<Vec<_>>());
    expect_success(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    let warn: Vec<&str> = err.lines().filter(|l| l.starts_with("warning:")).collect();
    assert_eq!(warn.len(), 1, "{err}");
    assert!(
        warn[0].contains("<s1>") && warn[0].contains("<s2>") && !warn[0].contains("<toy>"),
        "{err}"
    );
    // The same token twice: an error naming it.
    let mut b = args("a <toy> castle", &dir.path().join("b.png"));
    b.extend(["--embedding".to_string(), e.clone()]);
    let o = lora(&b.iter().map(String::as_str).collect::<Vec<_>>());
    expect_failure(&o, &["\"<toy>\"", "learned_embeds.safetensors"]);
    // convert keeps the tokens; to diffusers they go to the sidecar.
    let conv = dir.path().join("c.safetensors");
    let o = lora(&[
        "convert",
        s(&emb("pti.safetensors")),
        "--to",
        "ours",
        "--out",
        s(&conv),
        "--model",
        s(&m),
    ]);
    expect_success(&o);
    let back = formats::read(&conv).unwrap();
    assert_eq!(back.embeddings.len(), 2);
    let d = dir.path().join("d.safetensors");
    let o = lora(&[
        "convert",
        s(&emb("pti.safetensors")),
        "--to",
        "diffusers",
        "--out",
        s(&d),
        "--model",
        s(&m),
    ]);
    expect_success(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("learned_embeds.safetensors") && err.contains("<s1>"),
        "{err}"
    );
    assert!(dir.path().join("learned_embeds.safetensors").is_file());
    let o = lora(&["inspect", s(&conv)]);
    expect_success(&o);
    assert!(String::from_utf8_lossy(&o.stdout).contains("tokens:      <s1>"));
}

#[test]
fn cli_lora_add_joins_keep_embeddings() {
    let dir = tempfile::tempdir().unwrap();
    let m = fixtures().join("sd1-tiny");
    let arch = common::tiny_arch("sd1-tiny");
    let a = formats::read_with(&emb("pti.safetensors"), Some(&arch)).unwrap();
    let mut b = a.clone();
    b.embeddings = vec![token("<s2>", 5.0), token("<s3>", 7.0)];
    let p2 = dir.path().join("b.safetensors");
    formats::write(&b, &p2, Format::Ours, &WriteOptions::default()).unwrap();
    for mode in ["lpl", "ljl"] {
        let out = dir.path().join(format!("{mode}.safetensors"));
        let o = common::run_lora_add(
            &emb("pti.safetensors"),
            &p2,
            mode,
            &out,
            &["--model", s(&m)],
        );
        expect_success(&o);
        let got = formats::read_with(&out, Some(&arch)).unwrap();
        let names: Vec<&str> = got.embeddings.iter().map(|e| e.token.as_str()).collect();
        assert_eq!(names, ["<s1>", "<s2>", "<s3>"], "{mode}");
        same_tokens(&got.embeddings[..2], &a.embeddings);
        same_tokens(&got.embeddings[2..], &b.embeddings[1..]);
    }
}
