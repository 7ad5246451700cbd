//! A small writer of pickle opcodes and `torch.save`-style zip files, for building valid and
//! malformed PyTorch files in tests without Python.
#![allow(dead_code)]

use std::io::Write;
use std::path::Path;

/// Pickle bytes under construction (protocol 2 header included).
#[derive(Clone)]
pub struct P(pub Vec<u8>);

impl Default for P {
    fn default() -> Self {
        Self::new()
    }
}

impl P {
    /// A pickle starting with `PROTO 2`.
    pub fn new() -> Self {
        P(vec![0x80, 2])
    }
    /// One opcode byte.
    pub fn op(mut self, b: u8) -> Self {
        self.0.push(b);
        self
    }
    /// Raw bytes.
    pub fn raw(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
    /// BINUNICODE.
    pub fn s(mut self, s: &str) -> Self {
        self.0.push(b'X');
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
        self
    }
    /// BININT.
    pub fn int(mut self, i: i32) -> Self {
        self.0.push(b'J');
        self.0.extend_from_slice(&i.to_le_bytes());
        self
    }
    /// GLOBAL module\nname\n.
    pub fn global(mut self, module: &str, name: &str) -> Self {
        self.0.push(b'c');
        self.0
            .extend_from_slice(format!("{module}\n{name}\n").as_bytes());
        self
    }
    /// LONG_BINPUT.
    pub fn put(mut self, i: u32) -> Self {
        self.0.push(b'r');
        self.0.extend_from_slice(&i.to_le_bytes());
        self
    }
    /// LONG_BINGET.
    pub fn get(mut self, i: u32) -> Self {
        self.0.push(b'j');
        self.0.extend_from_slice(&i.to_le_bytes());
        self
    }
    /// BINPUT.
    pub fn bput(self, i: u8) -> Self {
        self.op(b'q').raw(&[i])
    }
    /// BINGET.
    pub fn bget(self, i: u8) -> Self {
        self.op(b'h').raw(&[i])
    }
    /// A tuple of ints: MARK ints TUPLE.
    pub fn ints(self, v: &[usize]) -> Self {
        let mut p = self.op(b'(');
        for &i in v {
            p = p.int(i as i32);
        }
        p.op(b't')
    }
    /// The persistent id of a storage: ('storage', torch.<class>, key, 'cpu', numel) BINPERSID.
    pub fn storage(self, class: &str, key: &str, numel: usize) -> Self {
        self.op(b'(')
            .s("storage")
            .global("torch", class)
            .s(key)
            .s("cpu")
            .int(numel as i32)
            .op(b't')
            .op(b'Q')
    }
    /// `_rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())` where `storage`
    /// pushes the storage.
    pub fn tensor(
        self,
        storage: impl FnOnce(P) -> P,
        offset: usize,
        shape: &[usize],
        stride: &[usize],
    ) -> Self {
        let p = self.global("torch._utils", "_rebuild_tensor_v2").op(b'(');
        storage(p)
            .int(offset as i32)
            .ints(shape)
            .ints(stride)
            .op(0x89)
            .global("collections", "OrderedDict")
            .op(b')')
            .op(b'R')
            .op(b't')
            .op(b'R')
    }
    /// STOP, returning the bytes.
    pub fn stop(self) -> Vec<u8> {
        self.op(b'.').0
    }
}

/// Row-major strides of `shape`.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        s[d] = s[d + 1] * shape[d + 1];
    }
    s
}

/// Writes a `torch.save`-layout zip: `archive/data.pkl`, `archive/byteorder` and
/// `archive/data/<key>` for each storage.
pub fn torch_zip(path: &Path, pkl: &[u8], storages: &[(&str, Vec<u8>)]) {
    let f = std::fs::File::create(path).unwrap();
    let mut z = zip::ZipWriter::new(f);
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    z.start_file("archive/data.pkl", opts).unwrap();
    z.write_all(pkl).unwrap();
    z.start_file("archive/byteorder", opts).unwrap();
    z.write_all(b"little").unwrap();
    for (k, b) in storages {
        z.start_file(format!("archive/data/{k}"), opts).unwrap();
        z.write_all(b).unwrap();
    }
    z.finish().unwrap();
}

/// Little-endian bytes of f32 values.
pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
