//! The opcode interpreter: a loop over the bytes with an explicit value stack and MARK
//! frames, building objects in an arena. Nothing is executed; REDUCE of an allowed global
//! either rebuilds a tensor view, makes a dict, or records an opaque object.

use super::opcodes::op_name;
use super::{Limits, Object, Pickle, Value};
use anyhow::{anyhow, bail, Result};
use std::collections::HashMap;
use std::rc::Rc;

/// Parses one pickle from `data`; `file` names it in every error.
pub fn parse(data: &[u8], file: &str, limits: &Limits) -> Result<Pickle> {
    Machine {
        data,
        pos: 0,
        file,
        limits,
        stack: Vec::new(),
        frames: Vec::new(),
        memo: HashMap::new(),
        objects: Vec::new(),
        depth: Vec::new(),
        values: 0,
        at: 0,
        op: 0,
    }
    .run()
}

pub(super) struct Machine<'a> {
    pub(super) data: &'a [u8],
    pub(super) pos: usize,
    pub(super) file: &'a str,
    pub(super) limits: &'a Limits,
    pub(super) stack: Vec<Value>,
    pub(super) frames: Vec<Vec<Value>>,
    pub(super) memo: HashMap<u32, Value>,
    pub(super) objects: Vec<Object>,
    pub(super) depth: Vec<u32>,
    pub(super) values: usize,
    pub(super) at: usize,
    pub(super) op: u8,
}

impl<'a> Machine<'a> {
    pub(super) fn err(&self, msg: impl std::fmt::Display) -> anyhow::Error {
        anyhow!(
            "{}: pickle byte {} (opcode {}): {msg}",
            self.file,
            self.at,
            op_name(self.op)
        )
    }

    pub(super) fn left(&self) -> usize {
        self.data.len() - self.pos
    }

    /// The next `n` bytes, checked against what is left before anything is allocated.
    pub(super) fn take(&mut self, n: u64) -> Result<&'a [u8]> {
        if n > self.left() as u64 {
            return Err(self.err(format!(
                "needs {n} bytes but only {} are left in the pickle (truncated or corrupt)",
                self.left()
            )));
        }
        let s = &self.data[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    pub(super) fn fixed<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N as u64)?);
        Ok(a)
    }

    pub(super) fn u8(&mut self) -> Result<u8> {
        Ok(self.fixed::<1>()?[0])
    }

    pub(super) fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.fixed()?))
    }

    pub(super) fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.fixed()?))
    }

    fn i32_len(&mut self) -> Result<u64> {
        let n = i32::from_le_bytes(self.fixed()?);
        u64::try_from(n).map_err(|_| self.err(format!("negative length {n}")))
    }

    fn count_value(&mut self) -> Result<()> {
        self.values += 1;
        if self.values > self.limits.max_values {
            return Err(self.err(format!(
                "the pickle builds more than {} values (limit)",
                self.limits.max_values
            )));
        }
        Ok(())
    }

    fn push(&mut self, v: Value) -> Result<()> {
        self.count_value()?;
        self.stack.push(v);
        Ok(())
    }

    fn pop(&mut self) -> Result<Value> {
        self.stack
            .pop()
            .ok_or_else(|| self.err("the stack is empty (stack underflow)"))
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let below = self
            .frames
            .pop()
            .ok_or_else(|| self.err("no MARK to pop to"))?;
        Ok(std::mem::replace(&mut self.stack, below))
    }

    pub(super) fn depth_of(&self, v: &Value) -> u32 {
        match v {
            Value::Obj(id) => self.depth[*id],
            _ => 0,
        }
    }

    pub(super) fn check_depth(&self, d: u32) -> Result<()> {
        if d as usize > self.limits.max_depth {
            return Err(self.err(format!(
                "containers nest deeper than {} levels (limit)",
                self.limits.max_depth
            )));
        }
        Ok(())
    }

    /// Adds `o` to the arena; `children` gives its nesting depth.
    pub(super) fn new_obj(&mut self, o: Object, children: &[&Value]) -> Result<Value> {
        let d = 1 + children.iter().map(|c| self.depth_of(c)).max().unwrap_or(0);
        self.check_depth(d)?;
        self.objects.push(o);
        self.depth.push(d);
        Ok(Value::Obj(self.objects.len() - 1))
    }

    fn new_seq(&mut self, items: Vec<Value>, make: fn(Vec<Value>) -> Object) -> Result<Value> {
        let d = 1 + items.iter().map(|c| self.depth_of(c)).max().unwrap_or(0);
        self.check_depth(d)?;
        self.objects.push(make(items));
        self.depth.push(d);
        Ok(Value::Obj(self.objects.len() - 1))
    }

    pub(super) fn text(&self, b: &[u8]) -> Result<Rc<str>> {
        std::str::from_utf8(b)
            .map(Rc::from)
            .map_err(|e| self.err(format!("string is not valid UTF-8: {e}")))
    }

    fn int_from_le(b: &[u8]) -> Value {
        if b.is_empty() {
            return Value::Int(0);
        }
        if b.len() > 8 {
            return Value::BigInt(Rc::from(b));
        }
        let fill = if b[b.len() - 1] & 0x80 != 0 { 0xff } else { 0 };
        let mut a = [fill; 8];
        a[..b.len()].copy_from_slice(b);
        Value::Int(i64::from_le_bytes(a))
    }

    fn run(mut self) -> Result<Pickle> {
        loop {
            self.at = self.pos;
            let Some(&op) = self.data.get(self.pos) else {
                bail!(
                    "{}: the pickle ends at byte {} without a STOP opcode (truncated?)",
                    self.file,
                    self.pos
                );
            };
            self.pos += 1;
            self.op = op;
            if op == b'.' {
                let root = self.pop()?;
                return Ok(Pickle {
                    root,
                    objects: self.objects,
                });
            }
            self.step(op)?;
        }
    }

    fn step(&mut self, op: u8) -> Result<()> {
        match op {
            0x80 => {
                let v = self.u8()?;
                if v > 5 {
                    return Err(self.err(format!("protocol {v} is newer than 5")));
                }
            }
            0x95 => {
                let n = self.u64()?;
                if n > self.left() as u64 {
                    return Err(self.err(format!(
                        "frame of {n} bytes but only {} are left (truncated?)",
                        self.left()
                    )));
                }
            }
            b'(' => {
                if self.frames.len() >= self.limits.max_depth {
                    return Err(self.err(format!(
                        "MARKs nest deeper than {} levels (limit)",
                        self.limits.max_depth
                    )));
                }
                let s = std::mem::take(&mut self.stack);
                self.frames.push(s);
            }
            b'0' => {
                if self.stack.pop().is_none() {
                    self.pop_mark()?;
                }
            }
            b'1' => {
                self.pop_mark()?;
            }
            b'2' => {
                let v = self
                    .stack
                    .last()
                    .cloned()
                    .ok_or_else(|| self.err("the stack is empty (stack underflow)"))?;
                self.push(v)?;
            }
            b'N' => self.push(Value::None)?,
            0x88 => self.push(Value::Bool(true))?,
            0x89 => self.push(Value::Bool(false))?,
            b'K' => {
                let v = self.u8()?;
                self.push(Value::Int(v as i64))?
            }
            b'M' => {
                let v = u16::from_le_bytes(self.fixed()?);
                self.push(Value::Int(v as i64))?
            }
            b'J' => {
                let v = i32::from_le_bytes(self.fixed()?);
                self.push(Value::Int(v as i64))?
            }
            0x8a | 0x8b => {
                let n = if op == 0x8a {
                    self.u8()? as u64
                } else {
                    self.i32_len()?
                };
                let b = self.take(n)?;
                self.push(Self::int_from_le(b))?
            }
            b'G' => {
                let v = f64::from_be_bytes(self.fixed()?);
                self.push(Value::Float(v))?
            }
            b'X' | 0x8c | 0x8d => {
                let n = match op {
                    b'X' => self.u32()? as u64,
                    0x8c => self.u8()? as u64,
                    _ => self.u64()?,
                };
                let b = self.take(n)?;
                let s = self.text(b)?;
                self.push(Value::Str(s))?
            }
            b'T' | b'U' => {
                let n = if op == b'T' {
                    self.i32_len()?
                } else {
                    self.u8()? as u64
                };
                let b = self.take(n)?;
                let v = match std::str::from_utf8(b) {
                    Ok(s) => Value::Str(Rc::from(s)),
                    Err(_) => Value::Bytes(Rc::from(b)),
                };
                self.push(v)?
            }
            b'B' | b'C' | 0x8e | 0x96 => {
                let n = match op {
                    b'B' => self.u32()? as u64,
                    b'C' => self.u8()? as u64,
                    _ => self.u64()?,
                };
                let b = self.take(n)?;
                self.push(Value::Bytes(Rc::from(b)))?
            }
            b']' => {
                let v = self.new_seq(Vec::new(), Object::List)?;
                self.push(v)?
            }
            b'}' => {
                let v = self.new_obj(Object::Dict(Vec::new()), &[])?;
                self.push(v)?
            }
            b')' => {
                let v = self.new_seq(Vec::new(), Object::Tuple)?;
                self.push(v)?
            }
            0x8f => {
                let v = self.new_seq(Vec::new(), Object::Set)?;
                self.push(v)?
            }
            b'l' | b't' | 0x91 => {
                let items = self.pop_mark()?;
                let make = match op {
                    b'l' => Object::List,
                    b't' => Object::Tuple,
                    _ => Object::Set,
                };
                let v = self.new_seq(items, make)?;
                self.push(v)?
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if self.stack.len() < n {
                    return Err(self.err(format!(
                        "needs {n} values on the stack, found {}",
                        self.stack.len()
                    )));
                }
                let items = self.stack.split_off(self.stack.len() - n);
                let v = self.new_seq(items, Object::Tuple)?;
                self.push(v)?
            }
            b'd' => {
                let items = self.pop_mark()?;
                let pairs = self.pairs(items)?;
                let v = self.new_obj(Object::Dict(Vec::new()), &[])?;
                self.extend_target(&v, pairs)?;
                self.push(v)?
            }
            b'a' | b'e' | 0x90 => {
                let items = if op == b'a' {
                    vec![self.pop()?]
                } else {
                    self.pop_mark()?
                };
                let target = self
                    .stack
                    .last()
                    .cloned()
                    .ok_or_else(|| self.err("no list or set below the items"))?;
                self.extend_target(&target, Items::Seq(items))?
            }
            b's' | b'u' => {
                let items = if op == b's' {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    vec![k, v]
                } else {
                    self.pop_mark()?
                };
                let pairs = self.pairs(items)?;
                let target = self
                    .stack
                    .last()
                    .cloned()
                    .ok_or_else(|| self.err("no dict below the items"))?;
                self.extend_target(&target, pairs)?
            }
            b'q' | b'r' | 0x94 => {
                let idx = match op {
                    b'q' => self.u8()? as u32,
                    b'r' => self.u32()?,
                    _ => {
                        u32::try_from(self.memo.len()).map_err(|_| self.err("the memo is full"))?
                    }
                };
                let v = self
                    .stack
                    .last()
                    .cloned()
                    .ok_or_else(|| self.err("nothing on the stack to memoize"))?;
                if !self.memo.contains_key(&idx) && self.memo.len() >= self.limits.max_memo {
                    return Err(self.err(format!(
                        "more than {} memo entries (limit)",
                        self.limits.max_memo
                    )));
                }
                self.memo.insert(idx, v);
            }
            b'h' | b'j' => {
                let idx = if op == b'h' {
                    self.u8()? as u32
                } else {
                    self.u32()?
                };
                let v = self
                    .memo
                    .get(&idx)
                    .cloned()
                    .ok_or_else(|| self.err(format!("memo entry {idx} was never stored")))?;
                self.push(v)?
            }
            b'c' => {
                let module = self.line()?;
                let name = self.line()?;
                let v = self.global(module, name)?;
                self.push(v)?
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                let (Value::Str(module), Value::Str(name)) = (module, name) else {
                    return Err(self.err("STACK_GLOBAL needs two strings (module, name)"));
                };
                let v = self.global(module, name)?;
                self.push(v)?
            }
            b'R' | 0x81 | 0x92 => {
                if op == 0x92 {
                    self.pop()?;
                }
                let args = self.pop()?;
                let callable = self.pop()?;
                let global = match self.object(&callable) {
                    Some(Object::Global(g)) => g.clone(),
                    _ => {
                        let kind = self.kind(&callable);
                        return Err(self.err(format!("calls {kind}, not an allowed global")));
                    }
                };
                let v = self.call(&global, &args, true)?;
                self.push(v)?
            }
            b'b' => {
                let state = self.pop()?;
                let target = self.pop()?;
                self.build(&target, state)?;
                self.push(target)?
            }
            b'Q' => {
                let pid = self.pop()?;
                let v = self.persistent(&pid)?;
                self.push(v)?
            }
            0x98 => {
                if self.stack.is_empty() {
                    return Err(self.err("the stack is empty (stack underflow)"));
                }
            }
            _ => return Err(self.err("opcode not supported by this reader")),
        }
        Ok(())
    }
}

pub(super) enum Items {
    Seq(Vec<Value>),
    Pairs(Vec<(Value, Value)>),
}
