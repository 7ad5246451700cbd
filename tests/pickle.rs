//! The bounded pickle reader: one test per input class that crashed or misbehaved with
//! candle's reader (short REDUCE/BUILD arguments, deep nesting, a memo entry reused many times,
//! many views of one storage, a 4 GiB string length in a tiny file, a disallowed global), the
//! dtypes and layouts PyTorch writes, and parity with candle on the torch-written fixtures.

mod common;
mod pickle_bytes;

use candle_core::{DType, Tensor};
use common::{fixtures, lora_fixture};
use lora_diffusion::pickle::{self, Limits, TorchFile};
use pickle_bytes::{f32_bytes, strides, torch_zip, P};
use std::path::{Path, PathBuf};

fn write(dir: &Path, name: &str, pkl: &[u8], storages: &[(&str, Vec<u8>)]) -> PathBuf {
    let p = dir.join(name);
    torch_zip(&p, pkl, storages);
    p
}

fn err_of<T>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

/// The error names the file, a byte offset and the opcode.
fn assert_names(e: &str, file: &Path, opcode: &str) {
    assert!(e.contains(&file.display().to_string()), "{e}");
    assert!(e.contains("pickle byte "), "{e}");
    assert!(e.contains(&format!("opcode {opcode}")), "{e}");
}

/// True when candle's reader panics on `path` (the crash this reader replaces).
fn candle_panics(path: &Path) -> bool {
    let p = path.to_path_buf();
    std::panic::catch_unwind(move || {
        let _ = candle_core::pickle::read_all(&p);
    })
    .is_err()
}

fn float_storage(p: P) -> P {
    p.storage("FloatStorage", "0", 6)
}

#[test]
fn short_reduce_and_build_arguments_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let data = vec![("0", f32_bytes(&[0.; 6]))];
    // _rebuild_tensor_v2(storage, 0): size and stride missing.
    let short_tensor = P::new()
        .op(b'}')
        .s("w")
        .global("torch._utils", "_rebuild_tensor_v2")
        .op(b'(');
    let short_tensor = float_storage(short_tensor)
        .int(0)
        .op(b't')
        .op(b'R')
        .op(b's')
        .stop();
    // _rebuild_parameter(): no tensor.
    let short_param = P::new()
        .op(b'}')
        .s("w")
        .global("torch._utils", "_rebuild_parameter")
        .op(b')')
        .op(b'R')
        .op(b's')
        .stop();
    // _rebuild_from_type_v2(f): type and arguments missing.
    let short_type = P::new()
        .op(b'}')
        .s("w")
        .global("torch._tensor", "_rebuild_from_type_v2")
        .global("torch._utils", "_rebuild_tensor_v2")
        .op(0x85)
        .op(b'R')
        .op(b's')
        .stop();
    // A persistent id with 3 of its 5 fields.
    let short_pid = P::new()
        .op(b'}')
        .s("w")
        .global("torch._utils", "_rebuild_tensor_v2")
        .op(b'(')
        .op(b'(')
        .s("storage")
        .global("torch", "FloatStorage")
        .s("0")
        .op(b't')
        .op(b'Q')
        .int(0)
        .ints(&[2, 3])
        .ints(&[3, 1])
        .op(b't')
        .op(b'R')
        .op(b's')
        .stop();
    let cases = [
        (
            "tensor.pt",
            short_tensor,
            "REDUCE",
            "needs at least 4 arguments",
        ),
        ("param.pt", short_param, "REDUCE", "got no arguments"),
        ("type.pt", short_type, "REDUCE", "needs 3 arguments"),
        ("pid.pt", short_pid, "BINPERSID", "has 3 fields"),
    ];
    for (name, pkl, opcode, what) in cases {
        let p = write(dir.path(), name, &pkl, &data);
        let e = err_of(TorchFile::open(&p));
        eprintln!("{e}");
        assert_names(&e, &p, opcode);
        assert!(e.contains(what), "{e}");
        assert!(candle_panics(&p), "candle's reader did not panic on {name}");
    }
    // BUILD with only its state on the stack.
    let p = write(
        dir.path(),
        "build.pt",
        &P::new().op(b'}').op(b'b').stop(),
        &[],
    );
    let e = err_of(TorchFile::open(&p));
    assert_names(&e, &p, "BUILD");
    assert!(e.contains("stack underflow"), "{e}");
}

#[test]
fn deep_nesting_is_an_error_not_a_stack_overflow() {
    let dir = tempfile::tempdir().unwrap();
    // 1,000,000 nested 1-tuples in 1 MB, and 100,000 nested MARK frames.
    let tuples = P::new().op(b'N').raw(&vec![0x85; 1_000_000]).stop();
    let marks = P::new().raw(&vec![b'('; 100_000]).stop();
    let lists = P::new()
        .raw(&vec![b']'; 100_000])
        .raw(&vec![b'a'; 99_999])
        .stop();
    for (name, pkl, opcode) in [
        ("tuples.pt", &tuples, "TUPLE1"),
        ("marks.pt", &marks, "MARK"),
        ("lists.pt", &lists, "APPEND"),
    ] {
        let p = write(dir.path(), name, pkl, &[]);
        let e = err_of(TorchFile::open(&p));
        eprintln!("{e}");
        assert_names(&e, &p, opcode);
        assert!(e.contains("deeper than 512"), "{e}");
    }
    // Without the depth limit the same input parses and drops without recursion.
    let limits = Limits {
        max_depth: usize::MAX,
        ..Limits::default()
    };
    let parsed = pickle::parse(&tuples, "tuples", &limits).unwrap();
    assert_eq!(parsed.objects.len(), 1_000_000);
    assert!(parsed
        .tensor_list()
        .unwrap_err()
        .contains("item 0 is a tuple"));
    drop(parsed);
}

#[test]
fn a_memo_entry_reused_many_times_is_shared_not_copied() {
    // Each list holds the previous one twice: 2^60 leaves in a few hundred bytes.
    let mut p = P::new().op(b']').bput(0);
    for i in 0..60 {
        p = p.op(b'(').bget(i).bget(i).op(b'l').bput(i + 1);
    }
    let lists = p.stop();
    assert!(lists.len() < 500, "{}", lists.len());
    let parsed = pickle::parse(&lists, "lists", &Limits::default()).unwrap();
    assert_eq!(parsed.objects.len(), 61);
    assert!(parsed
        .tensor_list()
        .unwrap_err()
        .contains("item 0 is a list"));
    // The same with dicts: walking it for tensors stops at the visit limit.
    let mut p = P::new().op(b'}').put(0);
    for i in 0..60 {
        p = p
            .op(b'}')
            .put(i + 1)
            .op(b'(')
            .s("a")
            .get(i)
            .s("b")
            .get(i)
            .op(b'u');
    }
    let dicts = p.stop();
    let parsed = pickle::parse(&dicts, "dicts", &Limits::default()).unwrap();
    assert_eq!(parsed.objects.len(), 61);
    let limits = Limits {
        max_visits: 100_000,
        ..Limits::default()
    };
    let e = parsed.flat_tensors(".", &limits).unwrap_err();
    assert!(e.contains("more than 100000 steps"), "{e}");
    // Through a file, with the default limits.
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "dicts.bin", &dicts, &[]);
    let e = err_of(pickle::read_state_dict(&f));
    assert!(
        e.contains(&f.display().to_string()) && e.contains("steps"),
        "{e}"
    );
}

#[test]
fn many_views_of_one_storage_read_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let n = 1000;
    let values: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let mut p = P::new().op(b'}').op(b'(');
    for i in 0..500 {
        let storage = move |p: P| {
            if i == 0 {
                p.storage("FloatStorage", "0", n).put(1)
            } else {
                p.get(1)
            }
        };
        p = p.s(&format!("w{i}")).tensor(storage, i, &[2, 2], &[2, 1]);
    }
    let pkl = p.op(b'u').stop();
    let f = write(dir.path(), "views.bin", &pkl, &[("0", f32_bytes(&values))]);
    let file = TorchFile::open(&f).unwrap();
    let info = file.state_dict_info().unwrap();
    assert_eq!(info.len(), 500);
    assert_eq!(file.storages_read(), 0, "tensor info reads no storage");
    let t = file.state_dict().unwrap();
    assert_eq!(file.storages_read(), 1);
    for (i, (name, t)) in t.iter().enumerate() {
        assert_eq!(name, &format!("w{i}"));
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let i = i as f32;
        assert_eq!(v, [i, i + 1., i + 2., i + 3.]);
    }
}

#[test]
fn a_4_gib_string_length_in_a_tiny_file_is_checked_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, Vec<u8>, &str); 3] = [
        (
            "unicode.pt",
            vec![b'X', 0xff, 0xff, 0xff, 0xff],
            "BINUNICODE",
        ),
        (
            "unicode8.pt",
            [&[0x8d][..], &[0xff; 8]].concat(),
            "BINUNICODE8",
        ),
        ("bytes8.pt", [&[0x8e][..], &[0xff; 8]].concat(), "BINBYTES8"),
    ];
    for (name, head, opcode) in cases {
        let pkl = P::new().raw(&head).raw(b"abc").stop();
        let f = write(dir.path(), name, &pkl, &[]);
        let e = err_of(TorchFile::open(&f));
        eprintln!("{e}");
        assert_names(&e, &f, opcode);
        assert!(e.contains("only 4 are left"), "{e}");
    }
}

#[test]
fn a_disallowed_global_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let os = P::new()
        .global("os", "system")
        .s("echo pwned")
        .op(0x85)
        .op(b'R')
        .stop();
    let f = write(dir.path(), "os.pt", &os, &[]);
    let e = err_of(TorchFile::open(&f));
    assert_names(&e, &f, "GLOBAL");
    assert!(
        e.contains("`os.system` is not allowed") && e.contains("byte 2 "),
        "{e}"
    );
    let eval = P::new().s("builtins").s("eval").op(0x93).stop();
    let f = write(dir.path(), "eval.pt", &eval, &[]);
    let e = err_of(TorchFile::open(&f));
    assert_names(&e, &f, "STACK_GLOBAL");
    assert!(e.contains("`builtins.eval` is not allowed"), "{e}");
    // Harmless checkpoint globals are kept as opaque values.
    let ok = P::new()
        .op(b'}')
        .s("callbacks")
        .global(
            "pytorch_lightning.callbacks.model_checkpoint",
            "ModelCheckpoint",
        )
        .op(b')')
        .op(0x81)
        .op(b'}')
        .op(b'b')
        .op(b's')
        .stop();
    let f = write(dir.path(), "ok.ckpt", &ok, &[]);
    assert!(pickle::read_state_dict(&f).unwrap().is_empty());
}

#[test]
fn dtypes_layouts_and_nested_state_dicts() {
    let dir = tempfile::tempdir().unwrap();
    let six: Vec<f32> = (0..6).map(|i| i as f32).collect();
    let tensor = |p: P, class: &str, key: &str, shape: &[usize], stride: &[usize]| {
        let numel = 6;
        let (class, key) = (class.to_string(), key.to_string());
        p.tensor(move |p| p.storage(&class, &key, numel), 0, shape, stride)
    };
    let inner = P::new().op(b'}').s("state_dict").op(b'}').op(b'(');
    let inner = tensor(inner.s("f32"), "FloatStorage", "0", &[2, 3], &[3, 1]);
    let inner = tensor(inner.s("t"), "FloatStorage", "0", &[3, 2], &[1, 3]);
    let inner = tensor(inner.s("odd"), "FloatStorage", "0", &[2, 2], &[3, 1]);
    let inner = tensor(inner.s("i8"), "CharStorage", "1", &[6], &[1]);
    let inner = tensor(inner.s("b"), "BoolStorage", "2", &[6], &[1]);
    let inner = tensor(inner.s("f16"), "HalfStorage", "3", &[6], &[1]);
    let inner = tensor(inner.s("sub.scalar"), "FloatStorage", "0", &[], &[]);
    let pkl = inner
        .s("epoch")
        .int(3)
        .op(b'u')
        .op(b's')
        .s("epoch")
        .int(3)
        .op(b's')
        .stop();
    let f16: Vec<u8> = six
        .iter()
        .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
        .collect();
    let storages = [
        ("0", f32_bytes(&six)),
        ("1", vec![0, 1, 2, 0xff, 0x80, 7]),
        ("2", vec![0, 1, 0, 5, 1, 0]),
        ("3", f16),
    ];
    let f = write(dir.path(), "model.ckpt", &pkl, &storages);
    let t: std::collections::BTreeMap<String, Tensor> =
        pickle::read_state_dict(&f).unwrap().into_iter().collect();
    let v = |k: &str| {
        t[k].flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
    };
    assert_eq!(v("f32"), [0., 1., 2., 3., 4., 5.]);
    assert_eq!(v("t"), [0., 3., 1., 4., 2., 5.]);
    assert_eq!(v("odd"), [0., 1., 3., 4.]);
    assert_eq!(v("i8"), [0., 1., 2., -1., -128., 7.]);
    assert_eq!(t["i8"].dtype(), DType::I16);
    assert_eq!(v("b"), [0., 1., 0., 1., 1., 0.]);
    assert_eq!(t["b"].dtype(), DType::U8);
    assert_eq!(v("f16"), [0., 1., 2., 3., 4., 5.]);
    assert_eq!(t["sub.scalar"].dims(), &[] as &[usize]);
    assert_eq!(t.len(), 7, "{:?}", t.keys());
    // A view past the end of its storage is an error when parsing.
    let over = P::new().op(b'}').s("w");
    let over = tensor(over, "FloatStorage", "0", &[3, 3], &strides(&[3, 3]))
        .op(b's')
        .stop();
    let f = write(dir.path(), "over.bin", &over, &[("0", f32_bytes(&six))]);
    let e = err_of(TorchFile::open(&f));
    assert_names(&e, &f, "REDUCE");
    assert!(e.contains("does not fit its storage of 6 elements"), "{e}");
    // A storage shorter than its element count says, and names the entry.
    let short = P::new().op(b'}').s("w");
    let short = tensor(short, "FloatStorage", "0", &[6], &[1])
        .op(b's')
        .stop();
    let f = write(
        dir.path(),
        "short.bin",
        &short,
        &[("0", f32_bytes(&six[..5]))],
    );
    let e = err_of(pickle::read_state_dict(&f));
    assert!(
        e.contains("archive/data/0 has 20 bytes") && e.contains("truncated"),
        "{e}"
    );
}

/// The tensors of a torch-written flat list, read with candle's `Stack` API as before.
fn candle_list(path: &Path) -> Vec<Tensor> {
    use candle_core::pickle::{Object, Stack};
    use std::io::Read;
    let mut zip = zip::ZipArchive::new(std::fs::File::open(path).unwrap()).unwrap();
    let pkl = zip
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .find(|n| n.ends_with("data.pkl"))
        .unwrap();
    let dir = PathBuf::from(pkl.trim_end_matches(".pkl"));
    let mut stack = Stack::empty();
    stack
        .read_loop(&mut std::io::BufReader::new(zip.by_name(&pkl).unwrap()))
        .unwrap();
    let Object::List(items) = stack.finalize().unwrap() else {
        panic!("not a list")
    };
    items
        .into_iter()
        .enumerate()
        .map(|(i, o)| {
            let info = o
                .into_tensor_info(Object::Unicode(i.to_string()), &dir)
                .unwrap()
                .unwrap();
            let mut r = zip.by_name(&info.path).unwrap();
            let mut bytes = Vec::new();
            r.read_to_end(&mut bytes).unwrap();
            let size = info.dtype.size_in_bytes();
            let start = info.layout.start_offset() * size;
            let n = info.layout.shape().elem_count() * size;
            let shape = info.layout.shape().clone();
            Tensor::from_raw_buffer(
                &bytes[start..start + n],
                info.dtype,
                shape.dims(),
                &candle_core::Device::Cpu,
            )
            .unwrap()
        })
        .collect()
}

fn same(a: &Tensor, b: &Tensor) -> bool {
    let f = |t: &Tensor| {
        t.flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
    };
    a.dims() == b.dims() && a.dtype() == b.dtype() && f(a) == f(b)
}

#[test]
fn torch_written_fixtures_give_the_same_tensors_as_candle() {
    for path in [
        lora_fixture("diffusers_old_unet.bin"),
        fixtures().join("weights").join("tiny.bin"),
    ] {
        let t0 = std::time::Instant::now();
        let ours = pickle::read_state_dict(&path).unwrap();
        let t1 = std::time::Instant::now();
        let theirs: std::collections::HashMap<String, Tensor> =
            candle_core::pickle::read_all(&path)
                .unwrap()
                .into_iter()
                .collect();
        let t2 = std::time::Instant::now();
        eprintln!(
            "{}: {} tensors, ours {:?}, candle {:?}",
            path.display(),
            ours.len(),
            t1 - t0,
            t2 - t1
        );
        assert_eq!(ours.len(), theirs.len());
        for (k, t) in &ours {
            assert!(same(t, &theirs[k]), "{k}");
        }
        let info = pickle::read_tensor_info(&path).unwrap();
        assert_eq!(info.len(), ours.len());
        for (i, (k, t)) in info.iter().zip(&ours) {
            assert_eq!((&i.name, &i.shape[..], i.dtype), (k, t.dims(), t.dtype()));
        }
    }
    for name in ["cloneofsimo.pt", "cloneofsimo.text_encoder.pt"] {
        let path = lora_fixture(name);
        let t0 = std::time::Instant::now();
        let ours = pickle::read_tensor_list(&path).unwrap();
        let t1 = std::time::Instant::now();
        let theirs = candle_list(&path);
        let t2 = std::time::Instant::now();
        eprintln!(
            "{name}: {} tensors, ours {:?}, candle {:?}",
            ours.len(),
            t1 - t0,
            t2 - t1
        );
        assert!(!ours.is_empty());
        assert_eq!(ours.len(), theirs.len());
        for (a, b) in ours.iter().zip(&theirs) {
            assert!(same(a, b));
        }
    }
}
