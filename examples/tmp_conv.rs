use candle_core::{Device, Tensor};
use lora_diffusion::ops::{self, Conv2dParams};
use std::time::Instant;

unsafe fn g(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    drs: isize,
    dcs: isize,
    acc: bool,
    lhs: *const f32,
    lrs: isize,
    lcs: isize,
    rhs: *const f32,
    rrs: isize,
    rcs: isize,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        dcs,
        drs,
        acc,
        lhs,
        lcs,
        lrs,
        rhs,
        rcs,
        rrs,
        1.0f32,
        1.0f32,
        false,
        false,
        false,
        gemm::Parallelism::Rayon(2),
    );
}

fn shift_fwd(x: &[f32], w: &[f32], cin: usize, cout: usize, h: usize, wd: usize) -> Vec<f32> {
    let (hp, wp) = (h + 2, wd + 2);
    let plane = hp * wp + 4;
    let mut xp = vec![0f32; cin * plane];
    for c in 0..cin {
        for y in 0..h {
            xp[c * plane + (y + 1) * wp + 1..c * plane + (y + 1) * wp + 1 + wd]
                .copy_from_slice(&x[(c * h + y) * wd..(c * h + y + 1) * wd]);
        }
    }
    let n = h * wp;
    let mut out = vec![0f32; cout * n];
    let mut wk = vec![0f32; 9 * cout * cin];
    for o in 0..cout {
        for c in 0..cin {
            for kk in 0..9 {
                wk[(kk * cout + o) * cin + c] = w[(o * cin + c) * 9 + kk];
            }
        }
    }
    for ky in 0..3 {
        for kx in 0..3 {
            let kk = ky * 3 + kx;
            let off = ky * wp + kx;
            unsafe {
                g(
                    cout,
                    n,
                    cin,
                    out.as_mut_ptr(),
                    n as isize,
                    1,
                    kk > 0,
                    wk.as_ptr().add(kk * cout * cin),
                    cin as isize,
                    1,
                    xp.as_ptr().add(off),
                    plane as isize,
                    1,
                );
            }
        }
    }
    let mut o = vec![0f32; cout * h * wd];
    for c in 0..cout {
        for y in 0..h {
            o[(c * h + y) * wd..(c * h + y + 1) * wd]
                .copy_from_slice(&out[c * n + y * wp..c * n + y * wp + wd]);
        }
    }
    o
}

fn shift_bwd(gr: &[f32], w: &[f32], cin: usize, cout: usize, h: usize, wd: usize) -> Vec<f32> {
    let (hp, wp) = (h + 2, wd + 2);
    let plane = hp * wp + 4;
    let n = h * wp;
    let mut gp = vec![0f32; cout * n];
    for c in 0..cout {
        for y in 0..h {
            gp[c * n + y * wp..c * n + y * wp + wd]
                .copy_from_slice(&gr[(c * h + y) * wd..(c * h + y + 1) * wd]);
        }
    }
    let mut dxp = vec![0f32; cin * plane];
    let mut wk = vec![0f32; 9 * cout * cin];
    for o in 0..cout {
        for c in 0..cin {
            for kk in 0..9 {
                wk[(kk * cout + o) * cin + c] = w[(o * cin + c) * 9 + kk];
            }
        }
    }
    for ky in 0..3 {
        for kx in 0..3 {
            let kk = ky * 3 + kx;
            let off = ky * wp + kx;
            unsafe {
                g(
                    cin,
                    n,
                    cout,
                    dxp.as_mut_ptr().add(off),
                    plane as isize,
                    1,
                    true,
                    wk.as_ptr().add(kk * cout * cin),
                    1,
                    cin as isize,
                    gp.as_ptr(),
                    n as isize,
                    1,
                );
            }
        }
    }
    let mut o = vec![0f32; cin * h * wd];
    for c in 0..cin {
        for y in 0..h {
            o[(c * h + y) * wd..(c * h + y + 1) * wd].copy_from_slice(
                &dxp[c * plane + (y + 1) * wp + 1..c * plane + (y + 1) * wp + 1 + wd],
            );
        }
    }
    o
}

fn main() -> candle_core::Result<()> {
    let d = Device::Cpu;
    for (c, hw) in [(320usize, 64usize), (640, 32), (1280, 16), (1280, 8)] {
        let x = Tensor::randn(0f32, 1., (1, c, hw, hw), &d)?;
        let w = (Tensor::randn(0f32, 1., (c, c, 3, 3), &d)? * 0.02)?;
        let gy = Tensor::randn(0f32, 1., (1, c, hw, hw), &d)?;
        let p = Conv2dParams {
            padding: 1,
            ..Default::default()
        };
        let reps = 10;
        let y0 = ops::frozen_conv2d(&x, &w, None, 1, 1, 1, 1)?;
        let t = Instant::now();
        for _ in 0..reps {
            ops::frozen_conv2d(&x, &w, None, 1, 1, 1, 1)?;
        }
        let tf = t.elapsed().as_secs_f64() / reps as f64;
        let dx0 = ops::conv2d_input_grad(&gy, &w, (hw, hw), &p)?;
        let t = Instant::now();
        for _ in 0..reps {
            ops::conv2d_input_grad(&gy, &w, (hw, hw), &p)?;
        }
        let tb = t.elapsed().as_secs_f64() / reps as f64;
        let (xv, wv, gv) = (
            x.flatten_all()?.to_vec1::<f32>()?,
            w.flatten_all()?.to_vec1::<f32>()?,
            gy.flatten_all()?.to_vec1::<f32>()?,
        );
        let y1 = shift_fwd(&xv, &wv, c, c, hw, hw);
        let t = Instant::now();
        for _ in 0..reps {
            shift_fwd(&xv, &wv, c, c, hw, hw);
        }
        let sf = t.elapsed().as_secs_f64() / reps as f64;
        let dx1 = shift_bwd(&gv, &wv, c, c, hw, hw);
        let t = Instant::now();
        for _ in 0..reps {
            shift_bwd(&gv, &wv, c, c, hw, hw);
        }
        let sb = t.elapsed().as_secs_f64() / reps as f64;
        let e1 = (Tensor::from_vec(y1, y0.shape(), &d)? - &y0)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        let e2 = (Tensor::from_vec(dx1, dx0.shape(), &d)? - &dx0)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        let gf = 2.0 * (c * c * 9 * hw * hw) as f64 / 1e9;
        println!("c {c} hw {hw}: im2col fwd {:.1} ms ({:.0} GF/s) bwd {:.1} ms | shift fwd {:.1} ms ({:.0} GF/s) bwd {:.1} ms | err {e1:.1e} {e2:.1e}",
            tf * 1e3, gf / tf, tb * 1e3, sf * 1e3, gf / sf, sb * 1e3);
    }
    Ok(())
}
