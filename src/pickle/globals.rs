//! The allow-list of globals a pickle may name. None is ever imported or called: the
//! tensor-rebuild functions and OrderedDict are interpreted, the rest become opaque values.

use super::StorageDtype;
use std::rc::Rc;

/// What an allowed global means to the reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GlobalKind {
    /// `torch._utils._rebuild_tensor_v2`.
    RebuildTensor,
    /// `torch._utils._rebuild_parameter` (and `_rebuild_parameter_with_state`).
    RebuildParameter,
    /// `torch._tensor._rebuild_from_type_v2`.
    RebuildFromType,
    /// `collections.OrderedDict`.
    OrderedDict,
    /// A typed storage class such as `torch.FloatStorage`.
    Storage(StorageDtype),
    /// A harmless global kept as an uninterpreted value.
    Opaque,
}

/// An allowed global: its module, name and meaning.
#[derive(Debug, Clone, PartialEq)]
pub struct Global {
    /// Module path.
    pub module: Rc<str>,
    /// Name inside the module.
    pub name: Rc<str>,
    /// Its meaning.
    pub kind: GlobalKind,
}

/// Harmless globals that real checkpoints contain (Lightning, numpy scalars, version objects).
const OPAQUE: &[(&str, &str)] = &[
    ("torch", "Size"),
    ("torch", "Tensor"),
    ("torch", "device"),
    ("torch", "float32"),
    ("torch", "float16"),
    ("torch", "bfloat16"),
    ("torch.nn.parameter", "Parameter"),
    ("torch.nn.modules.container", "ParameterDict"),
    ("torch.torch_version", "TorchVersion"),
    (
        "pytorch_lightning.callbacks.model_checkpoint",
        "ModelCheckpoint",
    ),
    ("pytorch_lightning.callbacks", "model_checkpoint"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    ("_codecs", "encode"),
    ("builtins", "set"),
    ("__builtin__", "set"),
];

/// The meaning of `module.name`, or `None` when it is not allowed.
pub fn lookup_global(module: &str, name: &str) -> Option<GlobalKind> {
    let kind = match (module, name) {
        ("torch._utils", "_rebuild_tensor_v2") => GlobalKind::RebuildTensor,
        ("torch._utils", "_rebuild_parameter")
        | ("torch._utils", "_rebuild_parameter_with_state") => GlobalKind::RebuildParameter,
        ("torch._tensor", "_rebuild_from_type_v2") => GlobalKind::RebuildFromType,
        ("collections", "OrderedDict") | ("typing", "OrderedDict") => GlobalKind::OrderedDict,
        ("torch", storage) => match storage {
            "FloatStorage" => GlobalKind::Storage(StorageDtype::F32),
            "HalfStorage" => GlobalKind::Storage(StorageDtype::F16),
            "BFloat16Storage" => GlobalKind::Storage(StorageDtype::BF16),
            "DoubleStorage" => GlobalKind::Storage(StorageDtype::F64),
            "LongStorage" => GlobalKind::Storage(StorageDtype::I64),
            "IntStorage" => GlobalKind::Storage(StorageDtype::I32),
            "ShortStorage" => GlobalKind::Storage(StorageDtype::I16),
            "CharStorage" => GlobalKind::Storage(StorageDtype::I8),
            "ByteStorage" => GlobalKind::Storage(StorageDtype::U8),
            "BoolStorage" => GlobalKind::Storage(StorageDtype::Bool),
            _ if OPAQUE.contains(&(module, name)) => GlobalKind::Opaque,
            _ => return None,
        },
        _ if OPAQUE.contains(&(module, name)) => GlobalKind::Opaque,
        _ => return None,
    };
    Some(kind)
}
