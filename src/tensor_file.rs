//! The one safetensors reader and writer below the model loader: the header (names, dtypes,
//! shapes, metadata) with clear errors for truncated or corrupt files, memory-mapped tensor
//! bytes and f64 views of float tensors, and a byte-deterministic writer (the same tensors and
//! metadata always give the same file) that streams, so untouched tensors of a large model are
//! copied byte for byte next to rewritten ones.

use anyhow::{anyhow, bail, Context};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use safetensors::Dtype;
use serde::Serialize;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// One tensor entry of a safetensors header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
}

/// The header of a safetensors file: every tensor's dtype and shape, and the metadata.
#[derive(Debug, Clone, Default)]
pub struct Header {
    /// Every tensor by name.
    pub entries: BTreeMap<String, Entry>,
    /// The `__metadata__` map (empty when the file has none).
    pub metadata: BTreeMap<String, String>,
}

/// Largest header accepted (the format's own limit is 100 MB).
const MAX_HEADER: u64 = 100_000_000;

/// Reads and checks the header of the safetensors file `path`, without touching tensor data;
/// errors name the file and what is wrong with it.
pub fn read_header(path: &Path) -> anyhow::Result<Header> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|_| {
        anyhow!(
            "{} is not a valid safetensors file: {len} bytes, too short for a header (truncated?)",
            path.display()
        )
    })?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER || n + 8 > len {
        bail!(
            "{} is not a valid safetensors file: its header claims {n} bytes but the file has {len} (truncated or corrupt)",
            path.display()
        );
    }
    let mut text = vec![0u8; n as usize];
    f.read_exact(&mut text)
        .with_context(|| format!("cannot read the header of {}", path.display()))?;
    let json: serde_json::Value = serde_json::from_slice(&text).map_err(|e| {
        anyhow!(
            "{} is not a valid safetensors file: header is not JSON ({e})",
            path.display()
        )
    })?;
    let serde_json::Value::Object(obj) = json else {
        bail!(
            "{} is not a valid safetensors file: header is not a JSON object",
            path.display()
        );
    };
    let mut header = Header::default();
    for (name, v) in obj {
        if name == "__metadata__" {
            header.metadata = serde_json::from_value(v)
                .with_context(|| format!("{}: __metadata__ is not a string map", path.display()))?;
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
        header.entries.insert(name, Entry { dtype, shape });
    }
    Ok(header)
}

/// A memory-mapped safetensors file with its parsed header.
pub struct TensorFile {
    /// Where it lives.
    pub path: PathBuf,
    /// Every tensor by name.
    pub entries: BTreeMap<String, Entry>,
    /// The `__metadata__` map (empty when the file has none).
    pub metadata: BTreeMap<String, String>,
    mmap: MmapedSafetensors,
}

impl TensorFile {
    /// Opens and validates `path`; errors name the file and what is wrong with it.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let Header { entries, metadata } = read_header(path)?;
        // SAFETY: mapped read-only; like every mmap user we assume the file is not modified
        // while it is open. The mapping also checks every tensor's offsets against the size.
        let mmap = unsafe { MmapedSafetensors::new(path) }.map_err(|e| {
            anyhow!(
                "{} is not a valid safetensors file ({e}); is it truncated or corrupt?",
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

    /// Tensor `name` as a candle tensor on `device`, in its stored dtype. The tensor owns its
    /// values, so the mapped pages it was read from are given back to the OS at once: a model
    /// being loaded is resident once, not twice (mapped file pages count as resident memory).
    pub fn load(&self, name: &str, device: &Device) -> anyhow::Result<Tensor> {
        let t = self
            .mmap
            .load(name, device)
            .map_err(|e| anyhow!("{}: cannot load tensor {name}: {e}", self.path.display()))?;
        if let Ok(view) = self.mmap.get(name) {
            release_pages(view.data());
        }
        Ok(t)
    }

    /// Every tensor, on `device`, in its stored dtype.
    pub fn load_all(&self, device: &Device) -> anyhow::Result<BTreeMap<String, Tensor>> {
        self.entries
            .keys()
            .map(|k| Ok((k.clone(), self.load(k, device)?)))
            .collect()
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

/// Drops the whole pages of `data` (a view into a read-only file mapping) from this process's
/// resident set; a later read maps them in again from the file, with the same bytes.
fn release_pages(data: &[u8]) {
    #[cfg(unix)]
    {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let Ok(page) = usize::try_from(page) else {
            return;
        };
        if page == 0 {
            return;
        }
        let start = (data.as_ptr() as usize).div_ceil(page) * page;
        let end = (data.as_ptr() as usize + data.len()) / page * page;
        if end > start {
            // SAFETY: [start, end) lies inside `data`, i.e. inside a private read-only mapping
            // of an unmodified file; MADV_DONTNEED there only discards pages that are read back
            // from the file, unchanged, on the next access.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
            }
        }
    }
    #[cfg(not(unix))]
    let _ = data;
}

/// The shards of one model component (`*.safetensors`, or the files of a sharded index),
/// opened together: every tensor name is looked up in the shard that holds it.
pub struct TensorFiles {
    files: Vec<TensorFile>,
    index: BTreeMap<String, usize>,
}

impl TensorFiles {
    /// Opens every file; a tensor name held by two files is an error naming both.
    pub fn open(paths: &[PathBuf]) -> anyhow::Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut index = BTreeMap::new();
        for (i, p) in paths.iter().enumerate() {
            let f = TensorFile::open(p)?;
            for name in f.entries.keys() {
                if let Some(&j) = index.get(name) {
                    let other: &TensorFile = &files[j];
                    bail!(
                        "tensor {name} is in both {} and {}",
                        other.path.display(),
                        p.display()
                    );
                }
                index.insert(name.clone(), i);
            }
            files.push(f);
        }
        Ok(Self { files, index })
    }

    /// `(name, shape)` of every tensor of every shard.
    pub fn shapes(&self) -> impl Iterator<Item = (&str, &[usize])> {
        self.files.iter().flat_map(|f| {
            f.entries
                .iter()
                .map(|(k, e)| (k.as_str(), e.shape.as_slice()))
        })
    }

    /// Tensor `name` on `device`, in its stored dtype.
    pub fn load(&self, name: &str, device: &Device) -> anyhow::Result<Tensor> {
        match self.index.get(name) {
            Some(&i) => self.files[i].load(name, device),
            None => bail!("no shard holds tensor {name}"),
        }
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

impl OutTensor<'static> {
    /// The dtype, shape and little-endian bytes (row-major) of a candle tensor.
    pub fn from_tensor(t: &Tensor) -> anyhow::Result<Self> {
        let flat = t.flatten_all()?.to_device(&Device::Cpu)?;
        fn le<T: candle_core::WithDType, const N: usize>(
            t: &Tensor,
            f: fn(T) -> [u8; N],
        ) -> candle_core::Result<Vec<u8>> {
            Ok(t.to_vec1::<T>()?.into_iter().flat_map(f).collect())
        }
        let (dtype, data) = match t.dtype() {
            DType::F32 => (Dtype::F32, le(&flat, f32::to_le_bytes)?),
            DType::F64 => (Dtype::F64, le(&flat, f64::to_le_bytes)?),
            DType::F16 => (Dtype::F16, le(&flat, half::f16::to_le_bytes)?),
            DType::BF16 => (Dtype::BF16, le(&flat, half::bf16::to_le_bytes)?),
            DType::U8 => (Dtype::U8, flat.to_vec1::<u8>()?),
            DType::U32 => (Dtype::U32, le(&flat, u32::to_le_bytes)?),
            DType::I64 => (Dtype::I64, le(&flat, i64::to_le_bytes)?),
            other => bail!("cannot write a {other:?} tensor to safetensors"),
        };
        Ok(Self {
            dtype,
            shape: t.dims().to_vec(),
            data: Cow::Owned(data),
        })
    }
}

/// Candle tensors as [`OutTensor`]s; errors name the tensor.
pub fn out_tensors<'a>(
    tensors: impl IntoIterator<Item = (&'a String, &'a Tensor)>,
) -> anyhow::Result<Vec<(String, OutTensor<'static>)>> {
    tensors
        .into_iter()
        .map(|(name, t)| {
            let out = OutTensor::from_tensor(t).with_context(|| format!("tensor {name}"))?;
            Ok((name.clone(), out))
        })
        .collect()
}

/// A tensor's header entry; fields in key order, so the JSON is canonical.
#[derive(Serialize)]
struct HeaderEntry<'a> {
    data_offsets: [usize; 2],
    dtype: Dtype,
    shape: &'a [usize],
}

/// Writes a safetensors file holding `tensors` and `metadata` to `w`. Deterministic: the data
/// in the `safetensors` crate's order (descending dtype alignment, then name), the header JSON
/// with sorted keys (metadata left out when empty) padded with spaces to a multiple of 8 bytes.
pub fn write_to(
    w: &mut impl Write,
    mut tensors: Vec<(String, OutTensor<'_>)>,
    metadata: &BTreeMap<String, String>,
) -> anyhow::Result<()> {
    tensors.sort_by(|(a, x), (b, y)| y.dtype.cmp(&x.dtype).then_with(|| a.cmp(b)));
    let mut header: BTreeMap<&str, serde_json::Value> = BTreeMap::new();
    if !metadata.is_empty() {
        header.insert("__metadata__", serde_json::to_value(metadata)?);
    }
    let mut offset = 0;
    for (name, t) in &tensors {
        let want = t.shape.iter().product::<usize>() * t.dtype.bitsize() / 8;
        if t.data.len() != want {
            bail!(
                "tensor {name}: {} bytes for a {:?} tensor of shape {:?} ({want} bytes)",
                t.data.len(),
                t.dtype,
                t.shape
            );
        }
        let entry = HeaderEntry {
            data_offsets: [offset, offset + want],
            dtype: t.dtype,
            shape: &t.shape,
        };
        header.insert(name, serde_json::to_value(entry)?);
        offset += want;
    }
    let mut json = serde_json::to_vec(&header)?;
    json.resize(json.len().next_multiple_of(8), b' ');
    w.write_all(&(json.len() as u64).to_le_bytes())?;
    w.write_all(&json)?;
    for (_, t) in &tensors {
        w.write_all(&t.data)?;
    }
    Ok(())
}

/// The bytes of [`write_to`].
pub fn to_bytes(
    tensors: Vec<(String, OutTensor<'_>)>,
    metadata: &BTreeMap<String, String>,
) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    write_to(&mut out, tensors, metadata)?;
    Ok(out)
}

/// Writes [`write_to`] to `path` atomically (temporary file, then rename), streaming; refuses
/// to replace an existing file unless `force`.
pub fn write(
    path: &Path,
    tensors: Vec<(String, OutTensor<'_>)>,
    metadata: &BTreeMap<String, String>,
    force: bool,
) -> anyhow::Result<()> {
    crate::atomic::write_file(path, force, |tmp| {
        let f = std::fs::File::create(tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut w = std::io::BufWriter::new(f);
        write_to(&mut w, tensors, metadata)
            .and_then(|()| Ok(w.flush()?))
            .with_context(|| format!("cannot write {}", path.display()))
    })
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
    write(dst, out, &src.metadata, true)
}

/// Index of the first value among raw float bits whose exponent bits (`exp_mask`) are all set,
/// i.e. the first NaN / infinity. Scans in blocks without early exit inside a block, so the
/// inner loop vectorises.
fn first_nonfinite_bits<T: Copy + Into<u32>>(bits: &[T], exp_mask: u32) -> Option<usize> {
    const BLOCK: usize = 4096;
    let bad = |x: T| x.into() & exp_mask == exp_mask;
    for (b, chunk) in bits.chunks(BLOCK).enumerate() {
        if chunk.iter().fold(false, |acc, &x| acc | bad(x)) {
            return chunk.iter().position(|&x| bad(x)).map(|j| b * BLOCK + j);
        }
    }
    None
}

/// The raw bits of a slice of a 16- or 32-bit float type, without copying.
fn bits_of<F, B>(v: &[F]) -> &[B] {
    assert_eq!(std::mem::size_of::<F>(), std::mem::size_of::<B>());
    // SAFETY: `F` (f32, half::f16, half::bf16) and `B` (u32, u16) have the same size and
    // alignment, and every bit pattern is a valid unsigned integer.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const B, v.len()) }
}

/// Whether a contiguous CPU float tensor holds a NaN or infinity (`Some(index)`), read from
/// its storage in place; `Err(())` for other tensors (the caller takes the general path).
fn first_nonfinite_in_place(t: &Tensor) -> Result<Option<usize>, ()> {
    use candle_core::{CpuStorage, Storage};
    let (storage, layout) = t.storage_and_layout();
    let (Some((start, end)), Storage::Cpu(cpu)) = (layout.contiguous_offsets(), &*storage) else {
        return Err(());
    };
    Ok(match cpu {
        CpuStorage::F32(v) => first_nonfinite_bits::<u32>(bits_of(&v[start..end]), 0x7f80_0000),
        CpuStorage::F16(v) => first_nonfinite_bits::<u16>(bits_of(&v[start..end]), 0x7c00),
        CpuStorage::BF16(v) => first_nonfinite_bits::<u16>(bits_of(&v[start..end]), 0x7f80),
        _ => return Err(()),
    })
}

/// An error naming `what` when `t` holds a NaN or an infinity (the first one and its index).
pub fn check_finite(t: &Tensor, what: &str) -> anyhow::Result<()> {
    if !t.dtype().is_float() || first_nonfinite_in_place(t) == Ok(None) {
        return Ok(());
    }
    let v: Vec<f32> = t
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    if let Some((i, x)) = v.iter().enumerate().find(|(_, x)| !x.is_finite()) {
        bail!(
            "{what} holds a non-finite value ({x} at flat index {i} of shape {:?})",
            t.dims()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensors() -> anyhow::Result<BTreeMap<String, Tensor>> {
        let dev = Device::Cpu;
        let mut t = BTreeMap::new();
        t.insert("b".into(), Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &dev)?);
        t.insert("a".into(), Tensor::new(0.5f32, &dev)?);
        t.insert(
            "h".into(),
            Tensor::new(&[1f32, 2., 3.], &dev)?.to_dtype(DType::F16)?,
        );
        Ok(t)
    }

    #[test]
    fn layout_roundtrip_and_same_content_same_bytes() -> anyhow::Result<()> {
        let t = tensors()?;
        let meta: BTreeMap<String, String> = (0..20)
            .map(|i| (format!("key{i}"), format!("v{i}")))
            .collect();
        let bytes = to_bytes(out_tensors(&t)?, &meta)?;
        let n = u64::from_le_bytes(bytes[..8].try_into()?) as usize;
        assert_eq!(n % 8, 0);
        assert_eq!(bytes.len(), 8 + n + 4 * 5 + 2 * 3);
        let st = safetensors::SafeTensors::deserialize(&bytes)?;
        assert_eq!(st.names().len(), 3);
        assert_eq!(st.tensor("b")?.shape(), [2, 2]);
        assert_eq!(st.tensor("a")?.data(), 0.5f32.to_le_bytes());
        assert_eq!(st.tensor("h")?.dtype(), Dtype::F16);
        let (_, m) = safetensors::SafeTensors::read_metadata(&bytes)?;
        assert_eq!(m.metadata().as_ref().unwrap().get("key7").unwrap(), "v7");
        // The same layout as the safetensors crate's own writer, with the header keys sorted.
        let crate_bytes = safetensors::serialize(
            t.iter().map(|(k, v)| (k.as_str(), v)),
            Some(meta.clone().into_iter().collect()),
        )?;
        assert_eq!(crate_bytes.len(), bytes.len());
        assert_eq!(crate_bytes[8 + n..], bytes[8 + n..]);
        let json = |b: &[u8]| serde_json::from_slice::<serde_json::Value>(&b[8..8 + n]).unwrap();
        assert_eq!(json(&crate_bytes), json(&bytes));
        for _ in 0..3 {
            assert_eq!(to_bytes(out_tensors(&t)?, &meta)?, bytes);
        }
        Ok(())
    }

    #[test]
    fn header_and_file_roundtrip() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("t.safetensors");
        let t = tensors()?;
        let meta: BTreeMap<String, String> = [("format".to_string(), "pt".to_string())].into();
        write(&p, out_tensors(&t)?, &meta, false)?;
        assert!(write(&p, out_tensors(&t)?, &meta, false).is_err());
        let f = TensorFile::open(&p)?;
        assert_eq!(f.metadata, meta);
        assert_eq!(f.entries["h"].shape, [3]);
        assert_eq!(f.to_f64("b")?, [1., 2., 3., 4.]);
        let copy = dir.path().join("c.safetensors");
        rewrite(&f, &copy, &HashMap::new())?;
        assert_eq!(std::fs::read(&copy)?, std::fs::read(&p)?);
        std::fs::write(&p, &std::fs::read(&copy)?[..5])?;
        let e = format!("{:#}", read_header(&p).unwrap_err());
        assert!(
            e.contains("too short") && e.contains("t.safetensors"),
            "{e}"
        );
        Ok(())
    }
}
