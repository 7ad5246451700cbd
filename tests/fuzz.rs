//! Seeded, bounded fuzzing of every file reader: byte mutations (bit flips, inserts, deletes,
//! truncation, splices, boundary integers) of valid safetensors files, PyTorch pickles (the
//! zip bytes and the `data.pkl` inside), model and scheduler configs, tokenizer files and every
//! LoRA format fixture. Each reader runs in a child process (this test binary re-executed)
//! under a memory cap; the child catches panics, and checks that every error names the file;
//! the parent asserts each child exited 0, so an abort (stack overflow, allocation failure)
//! fails the test too. `FUZZ_ITERS`, `FUZZ_SEED` and `FUZZ_READERS` (comma-separated) override the defaults;
//! `FUZZ_READERS=candle_pickle` runs candle's pickle reader instead, as a check that this
//! harness catches its crashes.

mod common;
mod pickle_bytes;

use common::{fixtures, lora_fixture};
use std::io::{Read, Write};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Instant;

const READERS: &[&str] = &[
    "safetensors",
    "pickle_zip",
    "pickle_data",
    "config",
    "tokenizer",
    "lora_formats",
];
const DEFAULT_ITERS: usize = 2000;
/// Address-space cap of a child process.
const MEMORY_CAP: u64 = 3 << 30;

/// splitmix64: a small deterministic generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

const BOUNDARY: &[u64] = &[
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0x7fff,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    i64::MAX as u64,
    u64::MAX,
];
const BOUNDARY_TEXT: &[&str] = &[
    "0",
    "-1",
    "4294967296",
    "1000000000",
    "18446744073709551616",
    "1e308",
    "NaN",
    "99999999999999999999999",
];

/// One random mutation of `data`; `other` is a splice source.
fn mutate(rng: &mut Rng, data: &mut Vec<u8>, other: &[u8]) -> &'static str {
    let len = data.len();
    match rng.below(7) {
        0 => {
            for _ in 0..1 + rng.below(4) {
                if !data.is_empty() {
                    let i = rng.below(data.len());
                    data[i] ^= 1 << rng.below(8);
                }
            }
            "flip"
        }
        1 => {
            let at = rng.below(len + 1);
            let n = 1 + rng.below(16);
            let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            data.splice(at..at, bytes);
            "insert"
        }
        2 => {
            let at = rng.below(len);
            let n = (1 + rng.below(64)).min(len - at.min(len));
            data.drain(at..at + n);
            "delete"
        }
        3 => {
            data.truncate(rng.below(len));
            "truncate"
        }
        4 => {
            if other.is_empty() {
                return "splice (empty)";
            }
            let from = rng.below(other.len());
            let n = (1 + rng.below(256)).min(other.len() - from);
            let at = rng.below(len + 1);
            let end = (at + n).min(len);
            data.splice(at..end, other[from..from + n].iter().copied());
            "splice"
        }
        5 => {
            let v = BOUNDARY[rng.below(BOUNDARY.len())];
            let width = [1, 2, 4, 8][rng.below(4)];
            let bytes = if rng.below(2) == 0 {
                v.to_le_bytes()
            } else {
                v.to_be_bytes()
            };
            let at = rng.below(len);
            for (k, b) in bytes[..width].iter().enumerate() {
                if let Some(d) = data.get_mut(at + k) {
                    *d = *b;
                }
            }
            "boundary int"
        }
        _ => {
            // A run of ASCII digits replaced by a boundary number (text formats).
            let start = rng.below(len);
            let Some(i) = (start..len).find(|&i| data[i].is_ascii_digit()) else {
                return "boundary text (no digits)";
            };
            let j = (i..len).find(|&j| !data[j].is_ascii_digit()).unwrap_or(len);
            let t = BOUNDARY_TEXT[rng.below(BOUNDARY_TEXT.len())];
            data.splice(i..j, t.bytes());
            "boundary text"
        }
    }
}

/// A seed file: where it goes in the case directory and its bytes.
struct Seed {
    rel: String,
    bytes: Vec<u8>,
}

fn seed(rel: &str, path: &Path) -> Seed {
    Seed {
        rel: rel.to_string(),
        bytes: std::fs::read(path).unwrap(),
    }
}

/// A small but valid CLIP tokenizer folder: the first 1000 ids of the real vocabulary, the
/// merges that make them, and the special tokens.
fn small_tokenizer() -> Vec<Seed> {
    let dir = fixtures().join("sd1-tiny").join("tokenizer");
    let vocab: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&std::fs::read(dir.join("vocab.json")).unwrap()).unwrap();
    let small: serde_json::Map<String, serde_json::Value> = vocab
        .into_iter()
        .filter(|(_, id)| id.as_u64().is_some_and(|i| !(1000..49406).contains(&i)))
        .collect();
    let merges = std::fs::read_to_string(dir.join("merges.txt")).unwrap();
    let merges: Vec<&str> = merges.lines().take(1 + 1000 - 512).collect();
    let mut seeds = vec![
        Seed {
            rel: "vocab.json".into(),
            bytes: serde_json::to_vec(&small).unwrap(),
        },
        Seed {
            rel: "merges.txt".into(),
            bytes: (merges.join("\n") + "\n").into_bytes(),
        },
    ];
    for f in ["tokenizer_config.json", "special_tokens_map.json"] {
        seeds.push(seed(f, &dir.join(f)));
    }
    seeds
}

/// The seeds of one reader. Readers that take a folder (tokenizer) get all seeds at once.
fn seeds(reader: &str) -> Vec<Seed> {
    let weights = fixtures().join("weights");
    let sd1 = fixtures().join("sd1-tiny");
    let pickles = [
        ("tiny.bin", weights.join("tiny.bin")),
        ("te.pt", lora_fixture("cloneofsimo.text_encoder.pt")),
        ("unet.bin", lora_fixture("diffusers_old_unet.bin")),
    ];
    match reader {
        "safetensors" => vec![
            seed("tiny.safetensors", &weights.join("tiny.safetensors")),
            seed("kohya.safetensors", &lora_fixture("kohya.safetensors")),
        ],
        "pickle_zip" | "pickle_data" | "candle_pickle" => {
            pickles.iter().map(|(r, p)| seed(r, p)).collect()
        }
        "config" => vec![
            seed("unet.json", &sd1.join("unet/config.json")),
            seed("text_encoder.json", &sd1.join("text_encoder/config.json")),
            seed("vae.json", &sd1.join("vae/config.json")),
            seed(
                "scheduler.json",
                &sd1.join("scheduler/scheduler_config.json"),
            ),
        ],
        "tokenizer" => small_tokenizer(),
        "lora_formats" => {
            let mut v: Vec<Seed> = std::fs::read_dir(fixtures().join("lora_formats"))
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| {
                    let name = p.file_name().unwrap().to_str().unwrap();
                    !name.starts_with("expected")
                        && [".safetensors", ".pt", ".bin"]
                            .iter()
                            .any(|e| name.ends_with(e))
                })
                .map(|p| seed(p.file_name().unwrap().to_str().unwrap(), &p))
                .collect();
            v.sort_by(|a, b| a.rel.cmp(&b.rel));
            v
        }
        other => panic!("unknown reader {other}"),
    }
}

/// The `data.pkl` bytes and the other entries of a torch zip.
fn unzip(bytes: &[u8]) -> (Vec<u8>, Vec<(String, Vec<u8>)>) {
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
    let mut pkl = Vec::new();
    let mut rest = Vec::new();
    for i in 0..z.len() {
        let mut f = z.by_index(i).unwrap();
        let name = f.name().unwrap().to_string();
        let mut b = Vec::new();
        f.read_to_end(&mut b).unwrap();
        match name.split_once("/data/") {
            _ if name.ends_with("data.pkl") => pkl = b,
            Some((_, key)) => rest.push((key.to_string(), b)),
            None => {}
        }
    }
    (pkl, rest)
}

/// Runs the reader on `path` (a file, or the tokenizer folder).
fn read(
    reader: &str,
    path: &Path,
    arch: &lora_diffusion::formats::Architecture,
) -> anyhow::Result<()> {
    use lora_diffusion::pickle::TorchFile;
    match reader {
        "safetensors" => {
            let f = lora_diffusion::tensor_file::TensorFile::open(path)?;
            for name in f.entries.keys() {
                f.load(name, &candle_core::Device::Cpu)?;
            }
            lora_diffusion::models::weights::ModelWeights::from_files("fuzz", &[path])?
                .load_all()?;
        }
        "pickle_zip" | "pickle_data" => {
            let f = TorchFile::open(path)?;
            if f.pickle().root_is_list() {
                f.tensor_list()?;
            } else {
                f.state_dict_info()?;
                f.state_dict()?;
            }
            lora_diffusion::formats::io::read_file(path)?;
        }
        "candle_pickle" => {
            candle_core::pickle::read_all(path)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        }
        "config" => {
            let name = path.file_name().unwrap().to_str().unwrap();
            match name {
                "unet.json" => {
                    lora_diffusion::models::unet::UNet2DConditionConfig::from_file(path)?;
                }
                "text_encoder.json" => {
                    lora_diffusion::models::clip::ClipTextConfig::from_file(path)?;
                }
                "vae.json" => {
                    lora_diffusion::models::vae::AutoencoderKLConfig::from_file(path)?;
                }
                _ => {
                    lora_diffusion::schedulers::SchedulerConfig::from_file(path)?;
                }
            }
        }
        "tokenizer" => {
            let t = lora_diffusion::tokenizer::ClipTokenizer::from_dir(path)?;
            t.encode_batch(&["a photo of sks toy", ""])?;
        }
        _ => {
            lora_diffusion::formats::read_with(path, Some(arch))?;
            lora_diffusion::formats::summary::summarize(path, Some(arch))?;
        }
    }
    Ok(())
}

static PANIC: Mutex<Option<String>> = Mutex::new(None);

/// The mutation loop of one reader, in the child process.
fn run_child(reader: &str, dir: &Path, iters: usize, seed: u64) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        let lim = libc::rlimit {
            rlim_cur: MEMORY_CAP,
            rlim_max: MEMORY_CAP,
        };
        assert_eq!(libc::setrlimit(libc::RLIMIT_AS, &lim), 0);
    }
    std::panic::set_hook(Box::new(|info| {
        *PANIC.lock().unwrap() = Some(info.to_string());
    }));
    let arch = common::tiny_arch("sd1-tiny");
    let seeds = seeds(reader);
    let case = dir.join(reader);
    std::fs::create_dir_all(&case).unwrap();
    let write_all = |seeds: &[Seed]| {
        for s in seeds {
            std::fs::write(case.join(&s.rel), &s.bytes).unwrap();
        }
    };
    let whole = reader == "tokenizer";
    if whole {
        write_all(&seeds);
        read(reader, &case, &arch).expect("the unmutated tokenizer seed loads");
    }
    let pickled: Vec<_> = if reader == "pickle_data" || reader == "candle_pickle" {
        seeds.iter().map(|s| unzip(&s.bytes)).collect()
    } else {
        vec![]
    };
    let mut rng = Rng(seed
        ^ reader
            .bytes()
            .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64)));
    let (mut errors, mut failures) = (0usize, Vec::<String>::new());
    let mut kinds = std::collections::BTreeMap::<&str, usize>::new();
    for it in 0..iters {
        let k = rng.below(seeds.len());
        let other = &seeds[rng.below(seeds.len())].bytes;
        let target = case.join(&seeds[k].rel);
        let kind = if !pickled.is_empty() {
            let (pkl, storages) = &pickled[k];
            let mut pkl = pkl.clone();
            let j = rng.below(pickled.len());
            let kind = mutate(&mut rng, &mut pkl, &pickled[j].0);
            let st: Vec<(&str, Vec<u8>)> = storages
                .iter()
                .map(|(k, b)| (k.as_str(), b.clone()))
                .collect();
            pickle_bytes::torch_zip(&target, &pkl, &st);
            kind
        } else {
            let mut bytes = seeds[k].bytes.clone();
            let kind = mutate(&mut rng, &mut bytes, other);
            std::fs::write(&target, &bytes).unwrap();
            kind
        };
        *kinds.entry(kind).or_default() += 1;
        let path = if whole { case.clone() } else { target.clone() };
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| read(reader, &path, &arch)));
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                errors += 1;
                let msg = format!("{e:#}");
                if !msg.contains(&path.display().to_string()) {
                    failures.push(format!(
                        "iteration {it} ({kind} of {}): error does not name the file: {msg}",
                        seeds[k].rel
                    ));
                }
            }
            Err(_) => {
                let p = PANIC.lock().unwrap().take().unwrap_or_default();
                let keep = dir.join(format!("panic-{reader}-{it}-{}", seeds[k].rel));
                let _ = std::fs::copy(&target, &keep);
                failures.push(format!(
                    "iteration {it} ({kind} of {}): PANIC {p} (input kept as {})",
                    seeds[k].rel,
                    keep.display()
                ));
            }
        }
        if whole {
            std::fs::write(&target, &seeds[k].bytes).unwrap();
        }
    }
    println!(
        "FUZZ {reader}: {iters} mutations, {errors} errors, {} failures; {kinds:?}",
        failures.len()
    );
    for f in failures.iter().take(20) {
        println!("FUZZ FAILURE {reader}: {f}");
    }
    if !failures.is_empty() {
        std::process::exit(3);
    }
}

/// The child entry point: does nothing unless the parent set `FUZZ_CHILD`.
#[test]
fn fuzz_child() {
    let Ok(reader) = std::env::var("FUZZ_CHILD") else {
        return;
    };
    let dir = PathBuf::from(std::env::var("FUZZ_DIR").unwrap());
    let iters = std::env::var("FUZZ_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_ITERS);
    let seed = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(11);
    run_child(&reader, &dir, iters, seed);
}

#[test]
fn fuzz_every_reader_without_panic_or_abort() {
    if std::env::var("FUZZ_CHILD").is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let start = Instant::now();
    let chosen = std::env::var("FUZZ_READERS").unwrap_or_else(|_| READERS.join(","));
    let readers: Vec<&str> = chosen.split(',').collect();
    let children: Vec<_> = readers
        .iter()
        .map(|r| {
            let child = Command::new(&exe)
                .args(["fuzz_child", "--exact", "--nocapture", "--test-threads=1"])
                .env("FUZZ_CHILD", r)
                .env("FUZZ_DIR", dir.path())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            (r, child)
        })
        .collect();
    let mut bad = Vec::new();
    let mut total = 0usize;
    for (r, child) in children {
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        for line in stdout
            .lines()
            .filter_map(|l| l.find("FUZZ ").map(|i| &l[i..]))
        {
            println!("{line}");
            if let Some(n) = line.split(": ").nth(1).and_then(|s| s.split(' ').next()) {
                total += n.parse::<usize>().unwrap_or(0);
            }
        }
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let tail: String = stderr
                .chars()
                .rev()
                .take(2000)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            bad.push(format!(
                "reader {r}: child exited with {:?}; its last input is in {}\n{tail}",
                out.status,
                dir.path().join(r).display()
            ));
        }
    }
    // Written to the process's stderr directly, so the summary shows without --nocapture.
    let _ = writeln!(
        std::io::stderr(),
        "fuzz: {total} mutations over {} readers in {:.1} s",
        readers.len(),
        start.elapsed().as_secs_f64()
    );
    if !bad.is_empty() {
        let _ = dir.keep();
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}
