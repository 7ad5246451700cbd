//! Raw access to model weight files for rewriting them: the safetensors header (names, dtypes,
//! shapes, metadata), memory-mapped tensor bytes, f64 views of float tensors, and a writer
//! that stores untouched tensors byte for byte next to rewritten ones.

use anyhow::{bail, Context};
use candle_core::safetensors::MmapedSafetensors;
use safetensors::Dtype;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

/// One tensor entry of a safetensors header.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
}

/// A memory-mapped safetensors file with its parsed header.
pub struct TensorFile {
    /// Where it lives.
    pub path: PathBuf,
    /// Every tensor by name.
    pub entries: BTreeMap<String, Entry>,
    /// The `__metadata__` map, when present.
    pub metadata: Option<HashMap<String, String>>,
    mmap: MmapedSafetensors,
}

/// Largest header accepted (the format's own limit is 100 MB).
const MAX_HEADER: u64 = 100_000_000;

impl TensorFile {
    /// Opens and validates `path`; errors name the file and what is wrong with it.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let mut f =
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let mut n = [0u8; 8];
        f.read_exact(&mut n).map_err(|_| {
            anyhow::anyhow!(
                "{} is not a safetensors file: {len} bytes, too short for a header",
                path.display()
            )
        })?;
        let n = u64::from_le_bytes(n);
        if n > MAX_HEADER || 8 + n > len {
            bail!(
                "{} is not a valid safetensors file (corrupt or truncated?): header of {n} bytes in a file of {len} bytes",
                path.display()
            );
        }
        let mut header = vec![0u8; n as usize];
        f.read_exact(&mut header)
            .with_context(|| format!("cannot read the header of {}", path.display()))?;
        let json: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
            .with_context(|| {
                format!(
                    "{}: the safetensors header is not a JSON object",
                    path.display()
                )
            })?;
        let mut entries = BTreeMap::new();
        let mut metadata = None;
        for (name, v) in json {
            if name == "__metadata__" {
                metadata = Some(serde_json::from_value(v).with_context(|| {
                    format!("{}: __metadata__ is not a string map", path.display())
                })?);
                continue;
            }
            let dtype: Dtype = v
                .get("dtype")
                .cloned()
                .and_then(|d| serde_json::from_value(d).ok())
                .with_context(|| format!("{}: tensor {name} has no known dtype", path.display()))?;
            let shape: Vec<usize> = v
                .get("shape")
                .cloned()
                .and_then(|s| serde_json::from_value(s).ok())
                .with_context(|| format!("{}: tensor {name} has no shape", path.display()))?;
            entries.insert(name, Entry { dtype, shape });
        }
        // SAFETY: mapped read-only; like every mmap user we assume the file is not modified
        // while it is open. The mapping also checks every tensor's offsets against the size.
        let mmap = unsafe { MmapedSafetensors::new(path) }.map_err(|e| {
            anyhow::anyhow!(
                "cannot read safetensors {} (corrupt or truncated?): {e}",
                path.display()
            )
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            entries,
            metadata,
            mmap,
        })
    }

    /// The stored bytes of tensor `name` (little endian).
    pub fn bytes(&self, name: &str) -> anyhow::Result<&[u8]> {
        let view = self
            .mmap
            .get(name)
            .with_context(|| format!("{}: no tensor {name}", self.path.display()))?;
        Ok(view.data())
    }

    /// Tensor `name` as f64 values (float dtypes only).
    pub fn to_f64(&self, name: &str) -> anyhow::Result<Vec<f64>> {
        let e = self
            .entries
            .get(name)
            .with_context(|| format!("{}: no tensor {name}", self.path.display()))?;
        decode_f64(self.bytes(name)?, e.dtype)
            .with_context(|| format!("{}: tensor {name}", self.path.display()))
    }
}

/// Little-endian bytes of a float dtype to f64.
pub fn decode_f64(bytes: &[u8], dtype: Dtype) -> anyhow::Result<Vec<f64>> {
    Ok(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect(),
        other => bail!("dtype {other:?} is not a float type (expected F32, F16, BF16 or F64)"),
    })
}

/// f64 values to little-endian bytes of a float dtype (round to nearest).
pub fn encode_f64(values: &[f64], dtype: Dtype) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(values.len() * 4);
    match dtype {
        Dtype::F32 => values
            .iter()
            .for_each(|&v| out.extend((v as f32).to_le_bytes())),
        Dtype::F16 => values
            .iter()
            .for_each(|&v| out.extend(half::f16::from_f64(v).to_le_bytes())),
        Dtype::BF16 => values
            .iter()
            .for_each(|&v| out.extend(half::bf16::from_f64(v).to_le_bytes())),
        Dtype::F64 => values.iter().for_each(|&v| out.extend(v.to_le_bytes())),
        other => bail!("dtype {other:?} is not a float type (expected F32, F16, BF16 or F64)"),
    }
    Ok(out)
}

/// A tensor to write: borrowed bytes (unchanged) or owned ones (rewritten).
pub struct OutTensor<'a> {
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Little-endian bytes.
    pub data: Cow<'a, [u8]>,
}

impl safetensors::View for OutTensor<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Writes `tensors` (with `metadata`) as a safetensors file at `path`.
pub fn write(
    path: &Path,
    tensors: Vec<(String, OutTensor<'_>)>,
    metadata: Option<HashMap<String, String>>,
) -> anyhow::Result<()> {
    safetensors::serialize_to_file(tensors, metadata, path)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))
}

/// Copies `src` into `dst`, replacing the tensors in `replace` (name → new bytes, already
/// encoded in the tensor's own dtype, see [`encode_f64`]); every other tensor and the
/// metadata are kept byte for byte.
pub fn rewrite(
    src: &TensorFile,
    dst: &Path,
    replace: &HashMap<String, Vec<u8>>,
) -> anyhow::Result<()> {
    let mut out = Vec::with_capacity(src.entries.len());
    for (name, e) in &src.entries {
        let old = src.bytes(name)?;
        let data = match replace.get(name) {
            Some(bytes) if bytes.len() != old.len() => bail!(
                "{}: new bytes for {name} have length {}, the tensor {}",
                src.path.display(),
                bytes.len(),
                old.len()
            ),
            Some(bytes) => Cow::Borrowed(bytes.as_slice()),
            None => Cow::Borrowed(old),
        };
        out.push((
            name.clone(),
            OutTensor {
                dtype: e.dtype,
                shape: e.shape.clone(),
                data,
            },
        ));
    }
    write(dst, out, src.metadata.clone())
}
