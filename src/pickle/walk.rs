//! Walks of a parsed pickle, iterative and bounded: the tensors of a (possibly nested) state
//! dict with their joined key paths, and the items of a flat list of tensors.

use super::{Limits, ObjId, Object, Pickle, Value};

impl Pickle {
    /// The dict holding the weights: the root dict, or its `state_dict` entry when that is a
    /// dict (Lightning / SD `.ckpt` files).
    pub fn state_dict_root(&self) -> Option<ObjId> {
        let Value::Obj(root) = self.root else {
            return None;
        };
        let Object::Dict(items) = &self.objects[root] else {
            return None;
        };
        for (k, v) in items {
            if matches!(k, Value::Str(s) if &**s == "state_dict") {
                if let (Value::Obj(id), Some(Object::Dict(_))) = (v, self.object(v)) {
                    return Some(*id);
                }
            }
        }
        Some(root)
    }

    /// True when the root is a list or tuple.
    pub fn root_is_list(&self) -> bool {
        matches!(
            self.object(&self.root),
            Some(Object::List(_) | Object::Tuple(_))
        )
    }

    /// Every tensor of the state dict in file order, keys of nested dicts joined with `sep`;
    /// entries that are neither tensors nor dicts are skipped. The error text names the key.
    pub fn flat_tensors(&self, sep: &str, limits: &Limits) -> Result<Vec<(String, ObjId)>, String> {
        let Some(root) = self.state_dict_root() else {
            return Err(format!(
                "the pickle holds {}, not a dict of tensors",
                self.kind(&self.root)
            ));
        };
        let mut out = Vec::new();
        let mut visits = 0usize;
        // Each frame: a dict, the key path leading to it, and the next item to look at.
        let mut frames: Vec<(ObjId, String, usize)> = vec![(root, String::new(), 0)];
        while let Some(frame) = frames.last_mut() {
            let (id, i) = (frame.0, frame.2);
            let Object::Dict(items) = &self.objects[id] else {
                frames.pop();
                continue;
            };
            let Some((k, v)) = items.get(i) else {
                frames.pop();
                continue;
            };
            frame.2 += 1;
            let prefix = &frame.1;
            visits += 1;
            if visits > limits.max_visits {
                return Err(format!(
                    "walking the dicts takes more than {} steps (shared or repeated sub-dicts?)",
                    limits.max_visits
                ));
            }
            if !matches!(self.object(v), Some(Object::Tensor(_) | Object::Dict(_))) {
                continue;
            }
            let key = match k {
                Value::Str(s) => s.to_string(),
                Value::Int(n) => n.to_string(),
                _ => {
                    if self.tensor(v).is_none() {
                        continue;
                    }
                    return Err(format!(
                        "a tensor under {:?} has {} as its key, not a string",
                        prefix,
                        self.kind(k)
                    ));
                }
            };
            let name = if prefix.is_empty() {
                key
            } else {
                format!("{prefix}{sep}{key}")
            };
            match (v, self.object(v)) {
                (Value::Obj(t), Some(Object::Tensor(_))) => out.push((name, *t)),
                (Value::Obj(d), Some(Object::Dict(_))) => {
                    if frames.len() >= limits.max_depth {
                        return Err(format!(
                            "dicts nest deeper than {} levels at {name:?}",
                            limits.max_depth
                        ));
                    }
                    frames.push((*d, name, 0));
                }
                _ => {}
            }
        }
        Ok(out)
    }

    /// The tensors of a root list or tuple, in order; any other item is an error naming its
    /// position.
    pub fn tensor_list(&self) -> Result<Vec<ObjId>, String> {
        let items = match self.object(&self.root) {
            Some(Object::List(items) | Object::Tuple(items)) => items,
            _ => {
                return Err(format!(
                    "the pickle holds {}, not a list of tensors",
                    self.kind(&self.root)
                ))
            }
        };
        items
            .iter()
            .enumerate()
            .map(|(i, v)| match (v, self.object(v)) {
                (Value::Obj(t), Some(Object::Tensor(_))) => Ok(*t),
                _ => Err(format!("item {i} is {}, not a tensor", self.kind(v))),
            })
            .collect()
    }
}
