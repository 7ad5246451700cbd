//! The factor kinds of one adapted layer besides plain LoRA: LyCORIS LoHa (Hadamard product of
//! two low-rank products), LyCORIS LoKr (Kronecker product, either side full or low-rank), and
//! the DoRA magnitude that can sit on top of any kind.
//!
//! | kind | tensors (LyCORIS names) | ΔW |
//! |---|---|---|
//! | LoHa | `hada_w1_a` [out, r], `hada_w1_b` [r, in·k·k], `hada_w2_a`, `hada_w2_b` | (w1_a·w1_b) ⊙ (w2_a·w2_b) · alpha/r |
//! | LoHa, Tucker (conv) | `hada_t1` [r, r, k, k], `hada_w1_a` [r, out], `hada_w1_b` [r, in], same for 2 | rebuild(t1, w1_a, w1_b) ⊙ rebuild(t2, w2_a, w2_b) · alpha/r |
//! | LoKr | `lokr_w1` [a, c] or `lokr_w1_a`·`lokr_w1_b`; `lokr_w2` [b, d(, k, k)] or `lokr_w2_a` [b, r]·`lokr_w2_b` [r, d·k·k] or Tucker `lokr_t2` [r, r, k, k], `lokr_w2_a` [r, b], `lokr_w2_b` [r, d] | kron(w1, w2) · alpha/r, scale 1 when both sides are full |
//!
//! rebuild(t, a, b)[o, c, …] = Σᵢⱼ t[i, j, …] · a[i, o] · b[j, c] (LyCORIS `rebuild_tucker`).
//! The rank r is the row count of the low-rank side's second factor (`w1_b` / `w2_b`), as
//! LyCORIS and ComfyUI take it.
//!
//! DoRA (`dora_scale` in LyCORIS files, `lora_magnitude_vector` in PEFT / diffusers files) keeps
//! one magnitude per output row (PEFT; LyCORIS `wd_on_out`) or per input column (LyCORIS
//! without `wd_on_out`); [`DoraStyle`] records whose rule applies (see `merge::merged_weight`).

use candle_core::{DType, Result, Tensor};

/// The name of one tensor of a layer, as LyCORIS / PEFT spell its key suffix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FactorName {
    /// LoHa `hada_w1_a`.
    HadaW1A,
    /// LoHa `hada_w1_b`.
    HadaW1B,
    /// LoHa `hada_w2_a`.
    HadaW2A,
    /// LoHa `hada_w2_b`.
    HadaW2B,
    /// LoHa Tucker core `hada_t1`.
    HadaT1,
    /// LoHa Tucker core `hada_t2`.
    HadaT2,
    /// LoKr full first factor `lokr_w1`.
    LokrW1,
    /// LoKr `lokr_w1_a`.
    LokrW1A,
    /// LoKr `lokr_w1_b`.
    LokrW1B,
    /// LoKr full second factor `lokr_w2`.
    LokrW2,
    /// LoKr `lokr_w2_a`.
    LokrW2A,
    /// LoKr `lokr_w2_b`.
    LokrW2B,
    /// LoKr Tucker core `lokr_t2`.
    LokrT2,
    /// DoRA magnitude in LyCORIS / kohya files (`dora_scale`).
    DoraScale,
    /// DoRA magnitude in PEFT / diffusers files (`lora_magnitude_vector`).
    Magnitude,
}

impl FactorName {
    /// Every name, in the order LyCORIS writes a layer's tensors.
    pub const ALL: [FactorName; 15] = [
        FactorName::HadaW1A,
        FactorName::HadaW1B,
        FactorName::HadaW2A,
        FactorName::HadaW2B,
        FactorName::HadaT1,
        FactorName::HadaT2,
        FactorName::LokrW1,
        FactorName::LokrW1A,
        FactorName::LokrW1B,
        FactorName::LokrW2,
        FactorName::LokrW2A,
        FactorName::LokrW2B,
        FactorName::LokrT2,
        FactorName::DoraScale,
        FactorName::Magnitude,
    ];

    /// The key suffix (without the leading dot).
    pub fn file_name(self) -> &'static str {
        match self {
            FactorName::HadaW1A => "hada_w1_a",
            FactorName::HadaW1B => "hada_w1_b",
            FactorName::HadaW2A => "hada_w2_a",
            FactorName::HadaW2B => "hada_w2_b",
            FactorName::HadaT1 => "hada_t1",
            FactorName::HadaT2 => "hada_t2",
            FactorName::LokrW1 => "lokr_w1",
            FactorName::LokrW1A => "lokr_w1_a",
            FactorName::LokrW1B => "lokr_w1_b",
            FactorName::LokrW2 => "lokr_w2",
            FactorName::LokrW2A => "lokr_w2_a",
            FactorName::LokrW2B => "lokr_w2_b",
            FactorName::LokrT2 => "lokr_t2",
            FactorName::DoraScale => "dora_scale",
            FactorName::Magnitude => "lora_magnitude_vector",
        }
    }

    /// Whether the name belongs to LoHa.
    pub fn is_loha(self) -> bool {
        self.file_name().starts_with("hada_")
    }

    /// Whether the name belongs to LoKr.
    pub fn is_lokr(self) -> bool {
        self.file_name().starts_with("lokr_")
    }
}

/// LoHa factors (see the module docs); `t1`/`t2` both present for the Tucker form.
#[derive(Debug, Clone)]
pub struct LoHa {
    /// `hada_w1_a`.
    pub w1_a: Tensor,
    /// `hada_w1_b`.
    pub w1_b: Tensor,
    /// `hada_w2_a`.
    pub w2_a: Tensor,
    /// `hada_w2_b`.
    pub w2_b: Tensor,
    /// `hada_t1` (Tucker form).
    pub t1: Option<Tensor>,
    /// `hada_t2` (Tucker form).
    pub t2: Option<Tensor>,
}

/// One side of a LoKr Kronecker product: a full matrix or a low-rank product `a · b`.
#[derive(Debug, Clone)]
pub enum KronFactor {
    /// The full factor (`lokr_w1` / `lokr_w2`).
    Full(Tensor),
    /// `a · b` (`lokr_wN_a`, `lokr_wN_b`).
    Product(Tensor, Tensor),
}

/// LoKr factors (see the module docs); `t2` is the Tucker core of a low-rank `w2`.
#[derive(Debug, Clone)]
pub struct LoKr {
    /// The smaller side.
    pub w1: KronFactor,
    /// The larger side.
    pub w2: KronFactor,
    /// `lokr_t2` (Tucker form of `w2`).
    pub t2: Option<Tensor>,
}

/// Whose DoRA rule a magnitude follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DoraStyle {
    /// PEFT `use_dora`: W' = m ⊙ V / ‖V‖ with V = W + s·ΔW, s the full scale (multiplier
    /// included), norm per output row, no epsilon.
    Peft,
    /// LyCORIS `dora_wd`: V = W + (alpha/r)·ΔW, k = m / (‖V‖ + ε) per output row (`on_out`)
    /// or per input column, W' = V ⊙ (multiplier·(k − 1) + 1).
    Lycoris {
        /// Norm per output row (`wd_on_out`, magnitude [out, 1, …]); else per input column
        /// (magnitude [1, in, …]).
        on_out: bool,
    },
}

/// A DoRA magnitude with its rule.
#[derive(Debug, Clone)]
pub struct Dora {
    /// The magnitude as stored in the file.
    pub magnitude: Tensor,
    /// The rule it follows.
    pub style: DoraStyle,
}

/// The factors of one layer.
#[derive(Debug, Clone)]
pub enum Factors {
    /// Plain LoRA: `down` [r, in(, k, k)], `up` [out, r(, 1, 1)].
    LowRank {
        /// The down projection.
        down: Tensor,
        /// The up projection.
        up: Tensor,
    },
    /// LyCORIS LoHa.
    LoHa(LoHa),
    /// LyCORIS LoKr.
    LoKr(LoKr),
}

/// The kind of a layer's factors, for listings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LoraKind {
    /// Plain LoRA.
    Lora,
    /// LyCORIS LoHa.
    LoHa,
    /// LyCORIS LoKr.
    LoKr,
}

impl LoraKind {
    /// The kind's usual name.
    pub fn name(self) -> &'static str {
        match self {
            LoraKind::Lora => "LoRA",
            LoraKind::LoHa => "LoHa",
            LoraKind::LoKr => "LoKr",
        }
    }
}

fn dims_err(what: &str, t: &Tensor, want: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("{what} has shape {:?}, expected {want}", t.dims()))
}

/// `rebuild(t, a, b)` of the module docs: t [i, j, s…], a [i, o], b [j, c] → [o, c, s…].
fn rebuild_tucker(t: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let td = t.dims().to_vec();
    let (i, j) = (td[0], td[1]);
    let s: usize = td[2..].iter().product();
    let (o, c) = (a.dims()[1], b.dims()[1]);
    // [o, i] · [i, j·s] → [o, j, s] → [o, s, j] · [j, c] → [o, s, c] → [o, c, s].
    let x = a.t()?.matmul(&t.reshape((i, j * s))?)?;
    let x = x.reshape((o, j, s))?.transpose(1, 2)?.reshape((o * s, j))?;
    let x = x
        .matmul(b)?
        .reshape((o, s, c))?
        .transpose(1, 2)?
        .contiguous()?;
    let mut shape = vec![o, c];
    shape.extend_from_slice(&td[2..]);
    x.reshape(shape)
}

impl LoHa {
    /// The tensors with their names, in LyCORIS order.
    pub fn tensors(&self) -> Vec<(FactorName, &Tensor)> {
        let mut v = vec![
            (FactorName::HadaW1A, &self.w1_a),
            (FactorName::HadaW1B, &self.w1_b),
            (FactorName::HadaW2A, &self.w2_a),
            (FactorName::HadaW2B, &self.w2_b),
        ];
        if let (Some(t1), Some(t2)) = (&self.t1, &self.t2) {
            v.push((FactorName::HadaT1, t1));
            v.push((FactorName::HadaT2, t2));
        }
        v
    }

    /// The rank (rows of `hada_w1_b`).
    pub fn rank(&self) -> usize {
        self.w1_b.dims()[0]
    }

    /// Checks the factor shapes against the weight `shape`.
    pub fn check(&self, shape: &[usize]) -> Result<()> {
        let out = shape[0];
        let inner: usize = shape[1..].iter().product();
        match (&self.t1, &self.t2) {
            (Some(t1), Some(t2)) => {
                let r = self.w1_a.dims()[0];
                if shape.len() != 4 {
                    candle_core::bail!("a Tucker LoHa needs a convolution weight, got {shape:?}");
                }
                for (n, t) in [("hada_t1", t1), ("hada_t2", t2)] {
                    if t.dims() != [r, r, shape[2], shape[3]] {
                        return Err(dims_err(
                            n,
                            t,
                            &format!("[{r}, {r}, {}, {}]", shape[2], shape[3]),
                        ));
                    }
                }
                for (n, t, want) in [
                    ("hada_w1_a", &self.w1_a, [r, out]),
                    ("hada_w1_b", &self.w1_b, [r, shape[1]]),
                    ("hada_w2_a", &self.w2_a, [r, out]),
                    ("hada_w2_b", &self.w2_b, [r, shape[1]]),
                ] {
                    if t.dims() != want {
                        return Err(dims_err(n, t, &format!("{want:?}")));
                    }
                }
            }
            (None, None) => {
                let r = self.rank();
                for (n, t, want) in [
                    ("hada_w1_a", &self.w1_a, [out, r]),
                    ("hada_w1_b", &self.w1_b, [r, inner]),
                    ("hada_w2_a", &self.w2_a, [out, r]),
                    ("hada_w2_b", &self.w2_b, [r, inner]),
                ] {
                    let flat = t.dims().len() >= 2
                        && t.dims()[0] == want[0]
                        && t.dims()[1..].iter().product::<usize>() == want[1];
                    if !flat {
                        return Err(dims_err(n, t, &format!("{want:?}")));
                    }
                }
            }
            _ => candle_core::bail!("a Tucker LoHa needs both hada_t1 and hada_t2"),
        }
        Ok(())
    }

    /// ΔW without the scale, shaped `shape`, in `dtype`.
    pub fn product(&self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let c = |t: &Tensor| t.to_dtype(dtype);
        let (a1, b1, a2, b2) = (
            c(&self.w1_a)?,
            c(&self.w1_b)?,
            c(&self.w2_a)?,
            c(&self.w2_b)?,
        );
        let w = match (&self.t1, &self.t2) {
            (Some(t1), Some(t2)) => {
                (rebuild_tucker(&c(t1)?, &a1, &b1)? * rebuild_tucker(&c(t2)?, &a2, &b2)?)?
            }
            _ => {
                let flat = |t: Tensor| {
                    let r = t.dims()[0];
                    t.reshape((r, ()))
                };
                (a1.matmul(&flat(b1)?)? * a2.matmul(&flat(b2)?)?)?
            }
        };
        w.reshape(shape)
    }
}

impl KronFactor {
    /// The factor as a matrix [rows, cols] (Product: a · b).
    fn matrix(&self, dtype: DType) -> Result<Tensor> {
        match self {
            KronFactor::Full(w) => {
                let r = w.dims()[0];
                w.to_dtype(dtype)?.reshape((r, ()))
            }
            KronFactor::Product(a, b) => {
                let r = b.dims()[0];
                a.to_dtype(dtype)?
                    .matmul(&b.to_dtype(dtype)?.reshape((r, ()))?)
            }
        }
    }

    /// The rank of a Product side.
    fn rank(&self) -> Option<usize> {
        match self {
            KronFactor::Full(_) => None,
            KronFactor::Product(_, b) => Some(b.dims()[0]),
        }
    }
}

impl LoKr {
    /// The tensors with their names, in LyCORIS order.
    pub fn tensors(&self) -> Vec<(FactorName, &Tensor)> {
        let mut v = vec![];
        match &self.w1 {
            KronFactor::Full(w) => v.push((FactorName::LokrW1, w)),
            KronFactor::Product(a, b) => {
                v.push((FactorName::LokrW1A, a));
                v.push((FactorName::LokrW1B, b));
            }
        }
        match &self.w2 {
            KronFactor::Full(w) => v.push((FactorName::LokrW2, w)),
            KronFactor::Product(a, b) => {
                v.push((FactorName::LokrW2A, a));
                v.push((FactorName::LokrW2B, b));
            }
        }
        if let Some(t) = &self.t2 {
            v.push((FactorName::LokrT2, t));
        }
        v
    }

    /// The rank of the low-rank side (w1 first, as LyCORIS), `None` when both sides are full.
    pub fn rank(&self) -> Option<usize> {
        self.w1.rank().or(self.w2.rank())
    }

    /// `(rows, cols)` of w1 and of w2 (cols of w2 with its kernel, flattened).
    fn sides(&self) -> Result<((usize, usize), (usize, usize))> {
        let side = |f: &KronFactor, n: &str| -> Result<(usize, usize)> {
            match f {
                KronFactor::Full(w) if w.rank() >= 2 => {
                    Ok((w.dims()[0], w.dims()[1..].iter().product()))
                }
                KronFactor::Product(a, b) if a.rank() == 2 && b.rank() >= 2 => {
                    if a.dims()[1] != b.dims()[0] {
                        candle_core::bail!(
                            "lokr_{n}_a {:?} and lokr_{n}_b {:?} do not chain (a's columns = b's rows)",
                            a.dims(),
                            b.dims()
                        );
                    }
                    Ok((a.dims()[0], b.dims()[1..].iter().product()))
                }
                _ => candle_core::bail!("lokr_{n} factors must be matrices"),
            }
        };
        let w1 = side(&self.w1, "w1")?;
        let w2 = match (&self.t2, &self.w2) {
            (Some(t), KronFactor::Product(a, b)) => {
                let r = t.dims()[0];
                if t.rank() != 4 || t.dims()[1] != r || a.dims()[0] != r || b.dims()[0] != r {
                    candle_core::bail!(
                        "Tucker LoKr: lokr_t2 {:?}, lokr_w2_a {:?}, lokr_w2_b {:?} do not form \
                         [r, r, k, k], [r, b], [r, d]",
                        t.dims(),
                        a.dims(),
                        b.dims()
                    );
                }
                (a.dims()[1], b.dims()[1] * t.dims()[2] * t.dims()[3])
            }
            (Some(_), KronFactor::Full(_)) => {
                candle_core::bail!("lokr_t2 needs lokr_w2_a and lokr_w2_b, not lokr_w2")
            }
            (None, f) => side(f, "w2")?,
        };
        Ok((w1, w2))
    }

    /// Checks the factor shapes against the weight `shape`.
    pub fn check(&self, shape: &[usize]) -> Result<()> {
        let ((a, c), (b, q)) = self.sides()?;
        let inner: usize = shape[1..].iter().product();
        if a * b != shape[0] || c * q != inner {
            candle_core::bail!(
                "kron(w1 [{a}, {c}], w2 [{b}, {q}]) gives [{}, {}], the weight {shape:?} needs \
                 [{}, {inner}]",
                a * b,
                c * q,
                shape[0]
            );
        }
        Ok(())
    }

    /// ΔW without the scale, shaped `shape`, in `dtype`.
    pub fn product(&self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let w1 = self.w1.matrix(dtype)?;
        let w2 = match (&self.t2, &self.w2) {
            (Some(t), KronFactor::Product(a, b)) => {
                let r = rebuild_tucker(
                    &t.to_dtype(dtype)?,
                    &a.to_dtype(dtype)?,
                    &b.to_dtype(dtype)?,
                )?;
                let rows = r.dims()[0];
                r.reshape((rows, ()))?
            }
            _ => self.w2.matrix(dtype)?,
        };
        let (a, c) = w1.dims2()?;
        let (b, q) = w2.dims2()?;
        let k = w1
            .reshape((a, 1, c, 1))?
            .broadcast_mul(&w2.reshape((1, b, 1, q))?)?;
        k.reshape((a * b, c * q))?.reshape(shape)
    }
}

impl Factors {
    /// The kind.
    pub fn kind(&self) -> LoraKind {
        match self {
            Factors::LowRank { .. } => LoraKind::Lora,
            Factors::LoHa(_) => LoraKind::LoHa,
            Factors::LoKr(_) => LoraKind::LoKr,
        }
    }

    /// Every tensor of the factors (no names; plain LoRA: down, up).
    pub fn all(&self) -> Vec<&Tensor> {
        match self {
            Factors::LowRank { down, up } => vec![down, up],
            Factors::LoHa(h) => h.tensors().into_iter().map(|(_, t)| t).collect(),
            Factors::LoKr(k) => k.tensors().into_iter().map(|(_, t)| t).collect(),
        }
    }

    /// The same kind with every tensor mapped by `f`.
    pub fn map(&self, f: &mut dyn FnMut(&Tensor) -> Result<Tensor>) -> Result<Factors> {
        let mut opt = |t: &Option<Tensor>| t.as_ref().map(&mut *f).transpose();
        Ok(match self {
            Factors::LowRank { down, up } => Factors::LowRank {
                down: f(down)?,
                up: f(up)?,
            },
            Factors::LoHa(h) => {
                let (t1, t2) = (opt(&h.t1)?, opt(&h.t2)?);
                Factors::LoHa(LoHa {
                    w1_a: f(&h.w1_a)?,
                    w1_b: f(&h.w1_b)?,
                    w2_a: f(&h.w2_a)?,
                    w2_b: f(&h.w2_b)?,
                    t1,
                    t2,
                })
            }
            Factors::LoKr(k) => {
                let t2 = opt(&k.t2)?;
                let mut side = |s: &KronFactor| -> Result<KronFactor> {
                    Ok(match s {
                        KronFactor::Full(w) => KronFactor::Full(f(w)?),
                        KronFactor::Product(a, b) => KronFactor::Product(f(a)?, f(b)?),
                    })
                };
                Factors::LoKr(LoKr {
                    w1: side(&k.w1)?,
                    w2: side(&k.w2)?,
                    t2,
                })
            }
        })
    }
}

impl Dora {
    /// Checks the magnitude's shape against the weight `shape` for its style.
    pub fn check(&self, shape: &[usize]) -> Result<()> {
        let m = self.magnitude.dims();
        let ok = match self.style {
            DoraStyle::Peft => self.magnitude.elem_count() == shape[0],
            // The norm over everything but the output row does not depend on the layout, so a
            // [out, 1, 1, 1] magnitude also fits a flattened [out, in·k·k] weight.
            DoraStyle::Lycoris { on_out: true } => {
                m.len() >= 2 && m[0] == shape[0] && m[1..].iter().all(|&d| d == 1)
            }
            DoraStyle::Lycoris { on_out: false } => {
                m.len() == shape.len()
                    && m[0] == 1
                    && m[1] == shape[1]
                    && m[2..].iter().all(|&d| d == 1)
            }
        };
        if !ok {
            let want = match self.style {
                DoraStyle::Peft => format!("{} values (one per output row)", shape[0]),
                DoraStyle::Lycoris { on_out: true } => {
                    let mut s = vec![1; shape.len()];
                    s[0] = shape[0];
                    format!("{s:?}")
                }
                DoraStyle::Lycoris { on_out: false } => {
                    let mut s = vec![1; shape.len()];
                    s[1] = shape[1];
                    format!("{s:?}")
                }
            };
            candle_core::bail!(
                "DoRA magnitude has shape {m:?}; for the weight {shape:?} it needs {want}"
            );
        }
        Ok(())
    }

    /// The LyCORIS style a `dora_scale` of this shape has on a weight of `shape` (output rows
    /// when its first dimension is the weight's), as ComfyUI tells it.
    pub fn lycoris_style(magnitude: &Tensor, shape: &[usize]) -> DoraStyle {
        let on_out = magnitude.dims().first() == shape.first() && shape[0] != 1;
        DoraStyle::Lycoris { on_out }
    }
}
