//! `scripts/gpu-check.sh stage` / `unstage` on a scratch git repository: after staging only the
//! entry point is tracked, every other tracked file is excluded (neither tracked nor
//! untracked-not-ignored) yet still on disk, the files the run reads are packed into the bundle's
//! tree.tar.xz, the printed size is the bytes that travel, and unstage restores the index and the
//! exclude file byte for byte. Also: the paths the script says the run reads cover every
//! repository path tests/device.rs and the run itself name. Skipped (printed) without bash, git,
//! tar or xz.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn script() -> PathBuf {
    repo().join("scripts/gpu-check.sh")
}

fn missing_tools() -> Vec<&'static str> {
    ["bash", "git", "tar", "xz"]
        .into_iter()
        .filter(|t| Command::new(t).arg("--version").output().is_err())
        .collect()
}

/// The paths `gpu-check.sh needs` lists.
fn needs() -> Vec<String> {
    let out = Command::new("bash")
        .arg(script())
        .arg("needs")
        .output()
        .unwrap();
    assert!(out.status.success(), "needs: {}", text(&out.stderr));
    text(&out.stdout).lines().map(str::to_string).collect()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Bytes that xz cannot shrink much (a fixed linear congruential sequence).
fn bytes(n: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2654435761).wrapping_add(1);
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(1664525).wrapping_add(1013904223);
            (x >> 24) as u8
        })
        .collect()
}

fn write(root: &Path, rel: &str, data: &[u8]) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
}

/// A scratch checkout: git commands and the script run in `root` with no user or system config.
struct Scratch {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    home: PathBuf,
}

impl Scratch {
    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.current_dir(&self.root)
            .env("HOME", &self.home)
            .env("XDG_CONFIG_HOME", &self.home)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env_remove("GIT_DIR")
            .env_remove("GIT_INDEX_FILE")
            .env_remove("GIT_WORK_TREE")
            .env_remove("GPU_CHECK_TRAVEL_LIMIT");
        c
    }

    fn git(&self, args: &[&str]) -> String {
        let out = self.cmd("git").args(args).output().unwrap();
        assert!(out.status.success(), "git {args:?}: {}", text(&out.stderr));
        text(&out.stdout)
    }

    fn gpu_check(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut c = self.cmd("bash");
        c.arg("scripts/gpu-check.sh").args(args);
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    }

    fn exclude(&self) -> String {
        std::fs::read_to_string(self.root.join(".git/info/exclude")).unwrap()
    }

    fn size(&self, rel: &str) -> u64 {
        std::fs::metadata(self.root.join(rel)).unwrap().len()
    }
}

const OWN_EXCLUDE: &str = "# the user's own lines\n*.log\n";

/// A committed checkout holding one file under each needed path, a few other tracked files (one
/// with glob characters in its name), an untracked file, and a bundle in `.gpu`. Returns it and
/// the needed files.
fn scratch() -> (Scratch, BTreeSet<String>) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("repo");
    let home = tmp.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let s = Scratch {
        _tmp: tmp,
        root: root.clone(),
        home,
    };
    write(
        &root,
        "scripts/gpu-check.sh",
        &std::fs::read(script()).unwrap(),
    );
    let mut needed = BTreeSet::new();
    for (i, p) in needs().iter().enumerate() {
        let file = if repo().join(p).is_dir() {
            format!("{p}/part-{i}.bin")
        } else {
            p.clone()
        };
        if !repo().join(p).exists() {
            panic!("gpu-check.sh needs {p}, which this repository lacks");
        }
        write(&root, &file, &bytes(100 + i, i as u32));
        needed.insert(file);
    }
    write(&root, "README.md", &bytes(2000, 1000));
    write(&root, "tests/fixtures/other/big.bin", &bytes(50_000, 1001));
    write(&root, "docs/weird [x]*?.txt", &bytes(300, 1002));
    s.git(&["init", "-q"]);
    write(&root, ".git/info/exclude", OWN_EXCLUDE.as_bytes());
    s.git(&["add", "-A"]);
    s.git(&[
        "-c",
        "user.name=t",
        "-c",
        "user.email=t@t",
        "commit",
        "-qm",
        "scratch",
    ]);
    write(&root, "notes.txt", &bytes(123, 1003));
    write(&root, ".gpu/binaries.tar.xz", &bytes(40_000, 1004));
    write(&root, ".gpu/wheels/a-1-py3-none-any.whl", &bytes(500, 1005));
    (s, needed)
}

/// The byte count of the script's "travelling with DIR: N bytes" line.
fn printed_bytes(stderr: &str) -> u64 {
    let line = stderr
        .lines()
        .find(|l| l.contains("travelling with .gpu: "))
        .unwrap_or_else(|| panic!("no travelling line in:\n{stderr}"));
    let rest = line.split("travelling with .gpu: ").nth(1).unwrap();
    rest.split(' ').next().unwrap().parse().unwrap()
}

#[test]
fn stage_keeps_only_the_entry_point_and_unstage_restores_the_checkout() {
    let missing = missing_tools();
    if !missing.is_empty() {
        eprintln!("skipped: no {missing:?} on this machine");
        return;
    }
    let (s, needed) = scratch();
    let tracked_before = s.git(&["ls-files"]);

    let out = s.gpu_check(&["stage", ".gpu"], &[]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "stage failed:\n{stderr}");
    assert!(stdout.contains("carry: [\".gpu\"]"), "{stdout}");
    assert!(
        stdout.contains("command: scripts/gpu-check.sh \"$OUT\" --bundle .gpu"),
        "{stdout}"
    );
    assert_eq!(s.git(&["ls-files"]), "scripts/gpu-check.sh\n");
    assert_eq!(
        s.git(&["ls-files", "--others", "--exclude-standard"]),
        "notes.txt\n"
    );
    for f in tracked_before.lines() {
        assert!(s.root.join(f).is_file(), "{f} left the disk");
    }
    let listing = s
        .cmd("tar")
        .args(["-tJf", ".gpu/tree.tar.xz"])
        .output()
        .unwrap();
    assert!(listing.status.success());
    let packed: BTreeSet<String> = text(&listing.stdout).lines().map(String::from).collect();
    assert_eq!(packed, needed);

    let expected = ["scripts/gpu-check.sh", "notes.txt"]
        .iter()
        .chain(&[
            ".gpu/binaries.tar.xz",
            ".gpu/wheels/a-1-py3-none-any.whl",
            ".gpu/tree.tar.xz",
        ])
        .map(|f| s.size(f))
        .sum::<u64>();
    assert_eq!(printed_bytes(&stderr), expected);

    let again = s.gpu_check(&["stage", ".gpu"], &[]);
    assert!(!again.status.success());
    assert!(text(&again.stderr).contains("already staged"));

    let un = s.gpu_check(&["unstage"], &[]);
    assert!(un.status.success(), "unstage failed:\n{}", text(&un.stderr));
    assert_eq!(s.git(&["ls-files"]), tracked_before);
    assert_eq!(
        s.git(&["status", "--porcelain", "--untracked-files=no"]),
        ""
    );
    assert_eq!(s.exclude(), OWN_EXCLUDE);
    let twice = s.gpu_check(&["unstage"], &[]);
    assert!(twice.status.success());
    assert!(text(&twice.stderr).contains("nothing staged"));
    assert_eq!(s.exclude(), OWN_EXCLUDE);
}

#[test]
fn stage_refuses_changes_and_an_oversized_tree_leaving_the_checkout_as_it_was() {
    let missing = missing_tools();
    if !missing.is_empty() {
        eprintln!("skipped: no {missing:?} on this machine");
        return;
    }
    let (s, _) = scratch();
    let tracked_before = s.git(&["ls-files"]);

    write(&s.root, "README.md", b"changed");
    let dirty = s.gpu_check(&["stage", ".gpu"], &[]);
    assert!(!dirty.status.success());
    let err = text(&dirty.stderr);
    assert!(
        err.contains("uncommitted changes") && err.contains("README.md"),
        "{err}"
    );
    assert_eq!(s.exclude(), OWN_EXCLUDE);
    assert_eq!(s.git(&["ls-files"]), tracked_before);
    s.git(&["checkout", "-q", "--", "README.md"]);

    let over = s.gpu_check(&["stage", ".gpu"], &[("GPU_CHECK_TRAVEL_LIMIT", "10000")]);
    assert!(!over.status.success());
    let err = text(&over.stderr);
    assert!(err.contains("over the limit by"), "{err}");
    let biggest = err
        .lines()
        .skip_while(|l| !l.contains("the biggest files"))
        .nth(1)
        .unwrap_or_default();
    assert!(biggest.ends_with("\t.gpu/binaries.tar.xz"), "{err}");
    assert!(biggest.trim_start().starts_with("40000\t"), "{err}");
    assert_eq!(s.exclude(), OWN_EXCLUDE);
    assert_eq!(s.git(&["ls-files"]), tracked_before);
    assert_eq!(
        s.git(&["status", "--porcelain", "--untracked-files=no"]),
        ""
    );
}

/// Whether `path` is a needed path, lies under one, or is a folder holding some.
fn covered(path: &str, needed: &[String]) -> bool {
    needed.iter().any(|n| {
        path == n || path.starts_with(&format!("{n}/")) || n.starts_with(&format!("{path}/"))
    })
}

/// The string literals that follow `prefix` in `source` (`prefix` ends with a quote).
fn literals_after<'a>(source: &'a str, prefix: &str) -> Vec<&'a str> {
    source
        .split(prefix)
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .collect()
}

#[test]
fn needs_covers_every_path_the_run_names() {
    if Command::new("bash").arg("--version").output().is_err() {
        eprintln!("skipped: no bash on this machine");
        return;
    }
    let needed = needs();
    let device = std::fs::read_to_string(repo().join("tests/device.rs")).unwrap();
    let check = std::fs::read_to_string(script()).unwrap();
    let mut named: Vec<String> = literals_after(&device, "fixtures().join(\"")
        .into_iter()
        .map(|p| format!("tests/fixtures/{p}"))
        .collect();
    named.extend(
        literals_after(&device, "repo().join(\"")
            .into_iter()
            .map(String::from),
    );
    named.extend(
        literals_after(&check, "\"$data/")
            .into_iter()
            .map(String::from),
    );
    assert!(named.len() >= 8, "found only {named:?}");
    for p in &named {
        assert!(covered(p, &needed), "the run reads {p}; `needs` lacks it");
        assert!(repo().join(p).exists(), "{p} is not in the repository");
    }
}
