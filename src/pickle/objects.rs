//! What the interpreter's object opcodes do: globals checked against the allow-list, calls
//! (REDUCE / NEWOBJ) of the tensor-rebuild functions and OrderedDict, BUILD, persistent ids
//! naming storages, and items added to lists, sets and dicts.

use super::machine::{Items, Machine};
use super::{lookup_global, Global, GlobalKind, Object, StorageRef, TensorView, Value};
use anyhow::Result;
use std::rc::Rc;

/// Most dimensions a tensor view may have.
const MAX_DIMS: usize = 64;
/// Longest line a GLOBAL opcode may hold.
const MAX_GLOBAL_LINE: usize = 1024;
/// Most elements a view may have beyond its storage's (stride-0 views repeat values).
const MAX_REPEATED_ELEMENTS: usize = 1 << 24;

impl Machine<'_> {
    pub(super) fn object(&self, v: &Value) -> Option<&Object> {
        match v {
            Value::Obj(id) => self.objects.get(*id),
            _ => None,
        }
    }

    pub(super) fn kind(&self, v: &Value) -> &'static str {
        super::kind_in(&self.objects, v)
    }

    pub(super) fn line(&mut self) -> Result<Rc<str>> {
        let rest = &self.data[self.pos..];
        let end = rest
            .iter()
            .take(MAX_GLOBAL_LINE)
            .position(|&b| b == b'\n')
            .ok_or_else(|| {
                self.err(format!(
                    "no end of line within {MAX_GLOBAL_LINE} bytes (truncated or corrupt)"
                ))
            })?;
        let s = self.text(&rest[..end])?;
        self.pos += end + 1;
        Ok(s)
    }

    pub(super) fn global(&mut self, module: Rc<str>, name: Rc<str>) -> Result<Value> {
        let kind = lookup_global(&module, &name).ok_or_else(|| {
            self.err(format!(
                "global `{module}.{name}` is not allowed (only tensors, storages, dicts and known checkpoint metadata are read)"
            ))
        })?;
        self.new_obj(Object::Global(Global { module, name, kind }), &[])
    }

    pub(super) fn pairs(&self, items: Vec<Value>) -> Result<Items> {
        if !items.len().is_multiple_of(2) {
            return Err(self.err(format!(
                "{} values cannot form key/value pairs",
                items.len()
            )));
        }
        let mut pairs = Vec::with_capacity(items.len() / 2);
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            pairs.push((k, v));
        }
        Ok(Items::Pairs(pairs))
    }

    /// Adds items to the list, set or dict `target`; opaque objects drop them.
    pub(super) fn extend_target(&mut self, target: &Value, items: Items) -> Result<()> {
        let Value::Obj(id) = *target else {
            let kind = self.kind(target);
            return Err(self.err(format!("cannot add items to {kind}")));
        };
        let d = match &items {
            Items::Seq(s) => s.iter().map(|v| self.depth_of(v)).max(),
            Items::Pairs(p) => p
                .iter()
                .map(|(k, v)| self.depth_of(k).max(self.depth_of(v)))
                .max(),
        };
        let d = (1 + d.unwrap_or(0)).max(self.depth[id]);
        self.check_depth(d)?;
        self.depth[id] = d;
        match (&mut self.objects[id], items) {
            (Object::List(l) | Object::Set(l), Items::Seq(s)) => l.extend(s),
            (Object::Dict(m), Items::Pairs(p)) => m.extend(p),
            (Object::Opaque { .. }, _) => {}
            (o, _) => {
                let kind = o.kind();
                return Err(self.err(format!("cannot add these items to {kind}")));
            }
        }
        Ok(())
    }

    /// The first items of a tuple or list (at most one more than [`MAX_DIMS`], all any caller
    /// needs), so that a huge memoized tuple is never copied whole.
    fn items_of(&self, v: &Value, what: &str) -> Result<Vec<Value>> {
        match self.object(v) {
            Some(Object::Tuple(t) | Object::List(t)) => Ok(t[..t.len().min(MAX_DIMS + 1)].to_vec()),
            _ => Err(self.err(format!("{what} is {}, not a tuple", self.kind(v)))),
        }
    }

    pub(super) fn call(&mut self, g: &Global, args: &Value, nested: bool) -> Result<Value> {
        let what = format!("the arguments of {}.{}", g.module, g.name);
        match g.kind {
            GlobalKind::RebuildTensor => self.rebuild_tensor(g, args),
            GlobalKind::RebuildParameter => {
                let items = self.items_of(args, &what)?;
                let Some(t) = items.first() else {
                    return Err(self.err(format!("{}.{} got no arguments", g.module, g.name)));
                };
                if !matches!(self.object(t), Some(Object::Tensor(_))) {
                    let kind = self.kind(t);
                    return Err(self.err(format!(
                        "{}.{} wraps {kind}, not a tensor",
                        g.module, g.name
                    )));
                }
                Ok(t.clone())
            }
            GlobalKind::RebuildFromType => {
                let items = self.items_of(args, &what)?;
                if items.len() < 3 {
                    return Err(self.err(format!(
                        "{}.{} needs 3 arguments (function, type, arguments), got {}",
                        g.module,
                        g.name,
                        items.len()
                    )));
                }
                let inner = match self.object(&items[0]) {
                    Some(Object::Global(f)) if nested && f.kind != GlobalKind::RebuildFromType => {
                        f.clone()
                    }
                    _ => {
                        return Err(self.err(format!(
                            "{}.{} must wrap a tensor rebuild function",
                            g.module, g.name
                        )))
                    }
                };
                self.call(&inner, &items[2], false)
            }
            GlobalKind::OrderedDict => self.new_obj(Object::Dict(Vec::new()), &[]),
            GlobalKind::Storage(_) | GlobalKind::Opaque => {
                let o = Object::Opaque {
                    global: g.clone(),
                    args: args.clone(),
                    state: None,
                };
                self.new_obj(o, &[args])
            }
        }
    }

    fn usize_of(&self, v: &Value, what: &str) -> Result<usize> {
        match v {
            Value::Int(i) if *i >= 0 => usize::try_from(*i)
                .map_err(|_| self.err(format!("{what} {i} does not fit in memory"))),
            _ => Err(self.err(format!(
                "{what} is {}, not a non-negative int",
                self.kind(v)
            ))),
        }
    }

    fn dims(&self, v: &Value, what: &str) -> Result<Vec<usize>> {
        let items = self.items_of(v, what)?;
        if items.len() > MAX_DIMS {
            return Err(self.err(format!("{what} has more than {MAX_DIMS} dimensions")));
        }
        items.iter().map(|i| self.usize_of(i, what)).collect()
    }

    fn rebuild_tensor(&mut self, g: &Global, args: &Value) -> Result<Value> {
        let items = self.items_of(args, &format!("the arguments of {}.{}", g.module, g.name))?;
        if items.len() < 4 {
            return Err(self.err(format!(
                "{}.{} needs at least 4 arguments (storage, offset, size, stride), got {}",
                g.module,
                g.name,
                items.len()
            )));
        }
        let (storage, numel) = match (&items[0], self.object(&items[0])) {
            (Value::Obj(id), Some(Object::Storage(s))) => (*id, s.numel),
            _ => {
                let kind = self.kind(&items[0]);
                return Err(self.err(format!("tensor storage is {kind}, not a storage")));
            }
        };
        let offset = self.usize_of(&items[1], "tensor storage offset")?;
        let shape = self.dims(&items[2], "tensor size")?;
        let stride = self.dims(&items[3], "tensor stride")?;
        if shape.len() != stride.len() {
            return Err(self.err(format!(
                "tensor size {shape:?} and stride {stride:?} differ in length"
            )));
        }
        let bad = || {
            self.err(format!(
                "tensor view {shape:?} with strides {stride:?} at offset {offset} does not fit its storage of {numel} elements"
            ))
        };
        let count = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(bad)?;
        if count == 0 {
            if offset as u64 > numel {
                return Err(bad());
            }
        } else {
            let last = shape
                .iter()
                .zip(&stride)
                .try_fold(offset, |a, (&d, &s)| a.checked_add((d - 1).checked_mul(s)?))
                .ok_or_else(bad)?;
            if last as u64 >= numel || count > (numel as usize).max(MAX_REPEATED_ELEMENTS) {
                return Err(bad());
            }
        }
        let view = TensorView {
            storage,
            offset,
            shape,
            stride,
        };
        self.new_obj(Object::Tensor(view), &[])
    }

    pub(super) fn build(&mut self, target: &Value, state: Value) -> Result<()> {
        let Value::Obj(id) = *target else {
            let kind = self.kind(target);
            return Err(self.err(format!("BUILD sets the state of {kind}")));
        };
        if matches!(self.objects[id], Object::Opaque { .. }) {
            let d = (1 + self.depth_of(&state)).max(self.depth[id]);
            self.check_depth(d)?;
            self.depth[id] = d;
            if let Object::Opaque { state: s, .. } = &mut self.objects[id] {
                *s = Some(state);
            }
        }
        Ok(())
    }

    pub(super) fn persistent(&mut self, pid: &Value) -> Result<Value> {
        let items = self.items_of(pid, "the persistent id")?;
        if items.len() < 5 {
            return Err(self.err(format!(
                "persistent id has {} fields, a storage id needs 5 ('storage', type, key, location, size)",
                items.len()
            )));
        }
        if !matches!(&items[0], Value::Str(s) if &**s == "storage") {
            return Err(self.err("persistent id does not name a storage"));
        }
        let dtype = match self.object(&items[1]) {
            Some(Object::Global(Global {
                kind: GlobalKind::Storage(d),
                ..
            })) => *d,
            _ => {
                let kind = self.kind(&items[1]);
                return Err(self.err(format!("storage type is {kind}, not a storage class")));
            }
        };
        let key = match &items[2] {
            Value::Str(s) if !s.is_empty() && !s.contains('/') && !s.contains("..") => s.clone(),
            Value::Int(i) if *i >= 0 => Rc::from(i.to_string()),
            other => {
                let kind = self.kind(other);
                return Err(self.err(format!("storage key is {kind}, not a plain name")));
            }
        };
        let numel = self.usize_of(&items[4], "storage size")? as u64;
        self.new_obj(Object::Storage(StorageRef { key, dtype, numel }), &[])
    }
}
