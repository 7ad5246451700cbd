//! Writing outputs so that no half-written file or folder is ever left: files and folders are
//! written beside their destination under a hidden temporary name, then renamed into place.
//! An existing destination is replaced only with `force`, and only once the new one is
//! complete; on any error the temporary file or folder is removed.

use anyhow::{bail, Context};
use std::path::{Path, PathBuf};

/// The folder `path` lives in (`.` for a bare file name); an error when it does not exist.
fn parent_dir(path: &Path) -> anyhow::Result<PathBuf> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        bail!(
            "cannot write {}: folder {} does not exist",
            path.display(),
            dir.display()
        );
    }
    Ok(dir)
}

/// The file name of `path` as text.
fn file_name(path: &Path) -> anyhow::Result<String> {
    Ok(path
        .file_name()
        .with_context(|| format!("{} is not a file path", path.display()))?
        .to_string_lossy()
        .to_string())
}

/// The temporary file beside `path` that [`write_file`] writes first; errors when `path`
/// exists (unless `force`) or its folder does not.
fn temp_file(path: &Path, force: bool) -> anyhow::Result<PathBuf> {
    if path.exists() && !force {
        bail!(
            "{} already exists; pass --force to overwrite it",
            path.display()
        );
    }
    let dir = parent_dir(path)?;
    let name = file_name(path)?;
    Ok(dir.join(format!(".{name}.{}.tmp", std::process::id())))
}

/// Writes `path` through a temporary file in the same folder (`write` fills it), then renames
/// it. Refuses to replace an existing file unless `force`.
pub fn write_file(
    path: &Path,
    force: bool,
    write: impl FnOnce(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let tmp = temp_file(path, force)?;
    let result = write(&tmp).and_then(|_| {
        std::fs::rename(&tmp, path)
            .with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Checks early (before any long work) that `path` can be created: its folder exists and is
/// writable, and it does not exist unless `force`. Leaves nothing behind.
pub fn check_writable(path: &Path, force: bool) -> anyhow::Result<()> {
    let tmp = temp_file(path, force)?;
    std::fs::write(&tmp, b"").with_context(|| format!("cannot write output {}", path.display()))?;
    std::fs::remove_file(&tmp).ok();
    Ok(())
}

/// Creates a fresh, empty temporary folder beside `output` (a stale one of this process is
/// removed first). Fill it, then call [`replace_dir`].
pub fn temp_dir(output: &Path) -> anyhow::Result<PathBuf> {
    let dir = parent_dir(output)?;
    let name = file_name(output)?;
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .with_context(|| format!("cannot remove stale {}", tmp.display()))?;
    }
    std::fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    Ok(tmp)
}

/// Moves the finished temporary folder `tmp` to `output`, replacing what is there only once
/// the new folder is in place (the old one is moved aside first and restored on failure).
pub fn replace_dir(tmp: &Path, output: &Path) -> anyhow::Result<()> {
    let old = if output.exists() || output.is_symlink() {
        let name = file_name(output).unwrap_or_default();
        let old = output.with_file_name(format!(".{name}.old-{}", std::process::id()));
        std::fs::rename(output, &old)
            .with_context(|| format!("cannot move the existing {} aside", output.display()))?;
        Some(old)
    } else {
        None
    };
    if let Err(e) = std::fs::rename(tmp, output) {
        if let Some(old) = &old {
            let _ = std::fs::rename(old, output);
        }
        let _ = std::fs::remove_dir_all(tmp);
        return Err(e)
            .with_context(|| format!("cannot move {} to {}", tmp.display(), output.display()));
    }
    if let Some(old) = old {
        let r = if old.is_dir() {
            std::fs::remove_dir_all(&old)
        } else {
            std::fs::remove_file(&old)
        };
        r.with_context(|| {
            format!(
                "wrote {} but cannot remove the replaced copy {}",
                output.display(),
                old.display()
            )
        })?;
    }
    Ok(())
}

/// Writes the folder `output` through a temporary folder (`fill` writes its files), then puts
/// it in place with [`replace_dir`]; on any error the temporary folder is removed.
pub fn write_dir<T>(
    output: &Path,
    fill: impl FnOnce(&Path) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let tmp = temp_dir(output)?;
    match fill(&tmp) {
        Ok(v) => {
            replace_dir(&tmp, output)?;
            Ok(v)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_folder_write_leaves_nothing_and_keeps_the_old_folder() {
        let root = std::env::temp_dir().join(format!("atomic-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("out")).unwrap();
        std::fs::write(root.join("out/old.txt"), b"old").unwrap();
        let r: anyhow::Result<()> = write_dir(&root.join("out"), |tmp| {
            std::fs::write(tmp.join("half.txt"), b"half")?;
            bail!("disk full")
        });
        assert!(r.unwrap_err().to_string().contains("disk full"));
        let names: Vec<String> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        assert_eq!(names, ["out"]);
        assert_eq!(std::fs::read(root.join("out/old.txt")).unwrap(), b"old");
        write_dir(&root.join("out"), |tmp| {
            Ok(std::fs::write(tmp.join("new.txt"), b"new")?)
        })
        .unwrap();
        assert!(!root.join("out/old.txt").exists());
        assert_eq!(std::fs::read(root.join("out/new.txt")).unwrap(), b"new");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
