//! A bounded reader for the pickles PyTorch writes (`torch.save` zip files: `.pt`, `.bin`,
//! `.ckpt`). It interprets the opcode subset of protocols 2–5 with an explicit stack (no
//! recursion), never executes anything, accepts only an allow-list of globals, and checks
//! every length, count and depth against its [`Limits`] before allocating. Memo references
//! share one object in an arena instead of copying it. Errors name the file, the byte offset
//! and the opcode.
//!
//! This module is a bottom layer: it uses only std, candle_core, zip and anyhow.

mod globals;
mod machine;
mod objects;
mod opcodes;
mod torch;
mod walk;

pub use globals::{lookup_global, Global, GlobalKind};
pub use machine::parse;
pub use torch::{read_state_dict, read_tensor_info, read_tensor_list, TensorInfo, TorchFile};

/// True when `path` names a PyTorch pickle by its extension (`.pt`, `.pth`, `.bin`, `.ckpt`).
pub fn is_pickle_name(path: &std::path::Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("pt") | Some("pth") | Some("bin") | Some("ckpt")
    )
}

use std::rc::Rc;

/// Index of an object in a [`Pickle`]'s arena.
pub type ObjId = usize;

/// One pickled value; containers and objects live in the arena and are referenced by id, so a
/// memo entry used many times is one shared object.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Python `None`.
    None,
    /// A bool.
    Bool(bool),
    /// An integer that fits in 64 bits.
    Int(i64),
    /// A wider integer, as its little-endian two's-complement bytes.
    BigInt(Rc<[u8]>),
    /// A float.
    Float(f64),
    /// A text string.
    Str(Rc<str>),
    /// A byte string.
    Bytes(Rc<[u8]>),
    /// A container or object in the arena.
    Obj(ObjId),
}

/// The element type of a PyTorch storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageDtype {
    /// float32.
    F32,
    /// float16.
    F16,
    /// bfloat16.
    BF16,
    /// float64.
    F64,
    /// int64.
    I64,
    /// int32.
    I32,
    /// int16.
    I16,
    /// int8 (read as i16, which candle can hold).
    I8,
    /// uint8.
    U8,
    /// bool (read as u8 0/1).
    Bool,
}

impl StorageDtype {
    /// Bytes per element in the file.
    pub fn size(self) -> usize {
        match self {
            Self::F64 | Self::I64 => 8,
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::BF16 | Self::I16 => 2,
            Self::I8 | Self::U8 | Self::Bool => 1,
        }
    }

    /// The candle dtype the values are loaded as.
    pub fn candle(self) -> candle_core::DType {
        use candle_core::DType;
        match self {
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::BF16 => DType::BF16,
            Self::F64 => DType::F64,
            Self::I64 => DType::I64,
            Self::I32 => DType::I32,
            Self::I16 | Self::I8 => DType::I16,
            Self::U8 | Self::Bool => DType::U8,
        }
    }
}

/// A storage named by a persistent id: zip entry `data/<key>` holding `numel` values.
#[derive(Debug, Clone, PartialEq)]
pub struct StorageRef {
    /// The key (file name under `data/`).
    pub key: Rc<str>,
    /// Element type.
    pub dtype: StorageDtype,
    /// Number of elements.
    pub numel: u64,
}

/// A tensor view of a storage, checked to lie inside it.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorView {
    /// The storage object (an [`Object::Storage`]).
    pub storage: ObjId,
    /// Offset of the first element, in elements.
    pub offset: usize,
    /// Shape.
    pub shape: Vec<usize>,
    /// Strides in elements.
    pub stride: Vec<usize>,
}

/// An arena object.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    /// A list.
    List(Vec<Value>),
    /// A tuple.
    Tuple(Vec<Value>),
    /// A dict (or OrderedDict), in insertion order.
    Dict(Vec<(Value, Value)>),
    /// A set or frozenset.
    Set(Vec<Value>),
    /// A reference to an allowed global.
    Global(Global),
    /// An allowed but uninterpreted object: the global called, its arguments and BUILD state.
    Opaque {
        /// The global that made it.
        global: Global,
        /// Its arguments.
        args: Value,
        /// The state BUILD gave it.
        state: Option<Value>,
    },
    /// A storage.
    Storage(StorageRef),
    /// A tensor.
    Tensor(TensorView),
}

impl Object {
    /// A short description for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::List(_) => "a list",
            Self::Tuple(_) => "a tuple",
            Self::Dict(_) => "a dict",
            Self::Set(_) => "a set",
            Self::Global(_) => "a global",
            Self::Opaque { .. } => "an object",
            Self::Storage(_) => "a storage",
            Self::Tensor(_) => "a tensor",
        }
    }
}

/// A parsed pickle: the root value and the arena it refers to.
#[derive(Debug, Clone)]
pub struct Pickle {
    /// The value STOP returned.
    pub root: Value,
    /// Every container and object.
    pub objects: Vec<Object>,
}

impl Pickle {
    /// The object `v` refers to, if it is one.
    pub fn object(&self, v: &Value) -> Option<&Object> {
        match v {
            Value::Obj(id) => self.objects.get(*id),
            _ => None,
        }
    }

    /// A short description of `v` for error messages.
    pub fn kind(&self, v: &Value) -> &'static str {
        kind_in(&self.objects, v)
    }

    /// The tensor view `v` refers to, if it is a tensor.
    pub fn tensor(&self, v: &Value) -> Option<&TensorView> {
        match self.object(v) {
            Some(Object::Tensor(t)) => Some(t),
            _ => None,
        }
    }

    /// The storage of a tensor view.
    pub fn storage(&self, t: &TensorView) -> Option<&StorageRef> {
        match self.objects.get(t.storage) {
            Some(Object::Storage(s)) => Some(s),
            _ => None,
        }
    }
}

/// Resource limits, all checked before the memory they guard is allocated.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Deepest nesting of containers (and of MARKs).
    pub max_depth: usize,
    /// Most values the pickle may create (pushes and container items together).
    pub max_values: usize,
    /// Most memo entries.
    pub max_memo: usize,
    /// Largest `data.pkl` read, in bytes.
    pub max_pickle_bytes: u64,
    /// Most container visits when walking the parsed tree (state dicts, tensor lists).
    pub max_visits: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_depth: 512,
            max_values: 10_000_000,
            max_memo: 2_000_000,
            max_pickle_bytes: 1 << 30,
            max_visits: 1_000_000,
        }
    }
}

/// A short description of `v`, whose objects live in `objects`, for error messages.
fn kind_in(objects: &[Object], v: &Value) -> &'static str {
    match v {
        Value::None => "None",
        Value::Bool(_) => "a bool",
        Value::Int(_) | Value::BigInt(_) => "an int",
        Value::Float(_) => "a float",
        Value::Str(_) => "a string",
        Value::Bytes(_) => "bytes",
        Value::Obj(id) => objects
            .get(*id)
            .map_or("a dangling reference", Object::kind),
    }
}
