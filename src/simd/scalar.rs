//! Scalar reference kernels: written for clarity, always compiled, the yardstick of the
//! property tests. Accumulation order: one f32 accumulator, front to back.
//!
//! They are `unsafe fn` only so that they fit the same table slots as the ISA kernels; none
//! of them has a safety precondition.

use half::{bf16, f16};

use super::QK_PANEL;

/// Σ a·b, front to back.
pub(crate) unsafe fn dot_f32_scalar(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0.0f32, |s, (x, y)| x.mul_add(*y, s))
}

/// Per head `h` of two rows of `dk`-wide heads: `dot[h] = x_h·y_h`, `nx[h] = x_h·x_h`, each
/// computed by the table's own `dot` so the results are its `dot_f32` bits. One call covers a
/// whole row: with heads of 64 channels, a call per dot cost as much as the dots themselves.
#[inline(always)]
pub(crate) fn head_dots_body(
    x: &[f32],
    y: &[f32],
    dk: usize,
    dot: &mut [f32],
    nx: &mut [f32],
    f: impl Fn(&[f32], &[f32]) -> f32,
) {
    for ((xh, yh), (d, n)) in x
        .chunks_exact(dk)
        .zip(y.chunks_exact(dk))
        .zip(dot.iter_mut().zip(nx.iter_mut()))
    {
        *d = f(xh, yh);
        *n = f(xh, xh);
    }
}

/// `out`, `n_head = out.len() / d` heads of `d`, gets per head `h` the weighted sum
/// `Σ_j w[h·m + j] · rows[j·W + h·d ..]` of the `m = w.len() / n_head` member rows of `rows`
/// (`W = out.len()` wide each): `out` zeroed, then one `axpy` per member in member order, so
/// every element is the same chain of fused multiply-adds whatever the table.
#[inline(always)]
pub(crate) fn weighted_heads_body(
    rows: &[f32],
    d: usize,
    w: &[f32],
    out: &mut [f32],
    axpy: impl Fn(&mut [f32], f32, &[f32]),
) {
    let width = out.len();
    let n_head = width / d;
    let m = w.len() / n_head;
    out.iter_mut().for_each(|x| *x = 0.0);
    for h in 0..n_head {
        let o = &mut out[h * d..(h + 1) * d];
        for j in 0..m {
            axpy(
                o,
                w[h * m + j],
                &rows[j * width + h * d..j * width + (h + 1) * d],
            );
        }
    }
}

/// `d2[h·m + j] = sqdist(rows_jp_h, rows_j_h)` for every head `h` (of `d`) and member `j` of
/// the `m = rows.len() / width` rows, each by the table's own `sqdist`.
#[inline(always)]
pub(crate) fn head_sqdists_body(
    rows: &[f32],
    width: usize,
    d: usize,
    jp: usize,
    d2: &mut [f32],
    sqdist: impl Fn(&[f32], &[f32]) -> f32,
) {
    let m = rows.len() / width;
    let n_head = width / d;
    for h in 0..n_head {
        let head = |j: usize| &rows[j * width + h * d..j * width + (h + 1) * d];
        for j in 0..m {
            d2[h * m + j] = sqdist(head(jp), head(j));
        }
    }
}

/// [`weighted_heads_body`] on [`axpy_f32_scalar`].
pub(crate) unsafe fn weighted_heads_f32_scalar(rows: &[f32], d: usize, w: &[f32], out: &mut [f32]) {
    // SAFETY: the scalar kernel has no precondition.
    weighted_heads_body(rows, d, w, out, |y, a, x| unsafe {
        axpy_f32_scalar(y, a, x)
    });
}

/// [`head_sqdists_body`] on [`sqdist_f32_scalar`].
pub(crate) unsafe fn head_sqdists_f32_scalar(
    rows: &[f32],
    width: usize,
    d: usize,
    jp: usize,
    d2: &mut [f32],
) {
    // SAFETY: the scalar kernel has no precondition.
    head_sqdists_body(rows, width, d, jp, d2, |a, b| unsafe {
        sqdist_f32_scalar(a, b)
    });
}

/// [`head_dots_body`] on [`dot_f32_scalar`].
pub(crate) unsafe fn head_dots_f32_scalar(
    x: &[f32],
    y: &[f32],
    dk: usize,
    dot: &mut [f32],
    nx: &mut [f32],
) {
    // SAFETY: the scalar kernel has no precondition.
    head_dots_body(x, y, dk, dot, nx, |a, b| unsafe { dot_f32_scalar(a, b) });
}

/// Rows of f16, widened into one f32 buffer, the way a host decodes them before an f32 kernel.
fn widen_rows(rows: &[&[f16]]) -> Vec<f32> {
    rows.iter()
        .flat_map(|r| r.iter().map(|x| x.to_f32()))
        .collect()
}

/// The f16 kernels' reference: the rows decoded, then the f32 kernel (the ISA kernels read
/// f16 in place and must give these bits).
pub(crate) unsafe fn head_dots_f16_scalar(
    x: &[f16],
    y: &[f16],
    dk: usize,
    dot: &mut [f32],
    nx: &mut [f32],
) {
    let (x, y) = (widen_rows(&[x]), widen_rows(&[y]));
    // SAFETY: the scalar kernel has no precondition.
    unsafe { head_dots_f32_scalar(&x, &y, dk, dot, nx) }
}

/// See [`head_dots_f16_scalar`]: two calls of the f32 kernel.
pub(crate) unsafe fn head_dots2_f16_scalar(
    x: &[f16],
    y: &[f16],
    z: &[f16],
    dk: usize,
    dy: &mut [f32],
    dz: &mut [f32],
    nx: &mut [f32],
) {
    let (x, y, z) = (widen_rows(&[x]), widen_rows(&[y]), widen_rows(&[z]));
    // SAFETY: the scalar kernel has no precondition.
    unsafe {
        head_dots_f32_scalar(&x, &y, dk, dy, nx);
        head_dots_f32_scalar(&x, &z, dk, dz, nx);
    }
}

/// See [`head_dots_f16_scalar`]: the norms of the f32 kernel.
pub(crate) unsafe fn head_norms_f16_scalar(x: &[f16], dk: usize, nx: &mut [f32]) {
    let x = widen_rows(&[x]);
    let mut dot = vec![0f32; nx.len()];
    // SAFETY: the scalar kernel has no precondition.
    unsafe { head_dots_f32_scalar(&x, &x, dk, &mut dot, nx) }
}

/// See [`head_dots_f16_scalar`].
pub(crate) unsafe fn head_sqdists_f16_scalar(rows: &[&[f16]], d: usize, jp: usize, d2: &mut [f32]) {
    // SAFETY: the scalar kernel has no precondition.
    unsafe { head_sqdists_f32_scalar(&widen_rows(rows), rows[0].len(), d, jp, d2) }
}

/// See [`head_dots_f16_scalar`]; each row is cut to `out.len()`.
pub(crate) unsafe fn weighted_heads_f16_scalar(
    rows: &[&[f16]],
    d: usize,
    w: &[f32],
    out: &mut [f32],
) {
    let cut: Vec<&[f16]> = rows.iter().map(|r| &r[..out.len()]).collect();
    // SAFETY: the scalar kernel has no precondition.
    unsafe { weighted_heads_f32_scalar(&widen_rows(&cut), d, w, out) }
}

/// Queries against keys packed in panels (see [`Kernels::qk_t_f32`](super::Kernels::qk_t_f32)):
/// each output is one fused multiply-add chain over the channels, front to back; the ISA
/// kernels run the same chain in each lane, so every table gives the same bits.
pub(crate) unsafe fn qk_t_f32_scalar(q: &[f32], d: usize, kt: &[f32], out: &mut [f32]) {
    // `d`, `m` and `n` are non-zero and `kt` holds every panel: the table's wrapper checked.
    let n = out.len() / (q.len() / d);
    for (qr, o) in q.chunks_exact(d).zip(out.chunks_exact_mut(n)) {
        for (oc, panel) in o.chunks_mut(QK_PANEL).zip(kt.chunks_exact(QK_PANEL * d)) {
            oc.fill(0.0);
            for (&qj, kr) in qr.iter().zip(panel.chunks_exact(QK_PANEL)) {
                for (oi, &k) in oc.iter_mut().zip(kr) {
                    *oi = qj.mul_add(k, *oi);
                }
            }
        }
    }
}

/// Keys as f16 bit patterns, widened exactly, into one panel of the layout
/// [`Kernels::qk_t_f32`](super::Kernels::qk_t_f32) reads: channel `j` of row `i` goes to
/// `panel[j·QK_PANEL + i]`. Columns past `rows.len()` (a last panel's padding) are left as
/// they were.
pub(crate) unsafe fn pack_keys_f16_scalar(rows: &[&[u16]], panel: &mut [f32]) {
    pack_keys_f16_cols_at(rows, 0, 0, panel);
}

/// [`pack_keys_f16_scalar`] for `rows` placed from panel column `i0` on, channels `j0..`:
/// the ISA kernels' leftovers.
#[inline(always)]
pub(crate) fn pack_keys_f16_cols_at(rows: &[&[u16]], i0: usize, j0: usize, panel: &mut [f32]) {
    for (i, r) in rows.iter().enumerate() {
        for (j, &h) in r.iter().enumerate().skip(j0) {
            panel[j * QK_PANEL + i0 + i] = f16::from_bits(h).to_f32();
        }
    }
}

/// `acc += softmax(kq_scale·logit + bias)`; `logit` is overwritten.
pub(crate) unsafe fn softmax_acc_scalar(
    logit: &mut [f32],
    kq_scale: f32,
    bias: Option<&[f32]>,
    acc: &mut [f32],
) {
    softmax_acc_body(logit, kq_scale, bias, acc);
}

/// Lanes of the partial maxima and sums in [`softmax_acc_body`]: a fixed split the compiler
/// turns into vector registers of any width, the same on every machine.
const LANES: usize = 8;

/// The softmax of [`Kernels::softmax_acc`](super::Kernels::softmax_acc), shared by every
/// table: the ISA entries inline it under their `#[target_feature]`, where the compiler
/// vectorizes each pass to the full register width. It uses no fused multiply-add, so the
/// wider code computes the same bits as the scalar build.
///
/// Separate passes, none with a serial dependency (maxima and sums in LANES partial lanes
/// combined in a fixed order). A NaN logit counts as masked (−∞), so one broken entry does
/// not poison the row; a row with nothing finite adds nothing.
#[inline(always)]
pub(crate) fn softmax_acc_body(
    logit: &mut [f32],
    kq_scale: f32,
    bias: Option<&[f32]>,
    acc: &mut [f32],
) {
    let unmask = |l: f32| if l.is_nan() { f32::NEG_INFINITY } else { l };
    match bias {
        Some(b) => logit
            .iter_mut()
            .zip(b)
            .for_each(|(l, b)| *l = unmask(kq_scale * *l + b)),
        None => logit.iter_mut().for_each(|l| *l = unmask(*l * kq_scale)),
    }
    let mx = lane_fold(logit, f32::NEG_INFINITY, |m, x| if x > m { x } else { m });
    if !mx.is_finite() {
        return;
    }
    logit.iter_mut().for_each(|x| *x = exp_approx(*x - mx));
    let sum = lane_fold(logit, 0.0, |s, x| s + x);
    let inv = 1.0 / sum;
    for (a, x) in acc.iter_mut().zip(logit.iter()) {
        *a += x * inv;
    }
}

/// `f` folded over `x` in LANES interleaved partial results, then over the lanes in order and
/// the tail: a fixed order that needs no reassociation to vectorize.
#[inline(always)]
fn lane_fold(x: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut lanes = [init; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = f(*l, v);
        }
    }
    let r = lanes.into_iter().fold(init, &f);
    tail.iter().fold(r, |r, &v| f(r, v))
}

/// `e^x` for `x <= 0` (softmax after subtracting the maximum), relative error below 4e-7,
/// 0 for `x <= -87` and for −∞, NaN for NaN. Only selects, bit operations and plain
/// arithmetic, so loops that call it vectorize; libm's `expf` was most of the scoring time.
#[inline(always)]
pub(crate) fn exp_approx(x: f32) -> f32 {
    // NaN fails the comparison too; it is given back as NaN at the end.
    let xc = if x > -87.0 { x } else { -87.0 };
    // x = n·ln2 + r, |r| <= ln2/2, with ln2 split in two for the reduction. Adding 1.5·2²³
    // rounds x·log2(e) to an integer n (exact for |n| < 2²²) and leaves n in the low mantissa
    // bits: no float-to-int conversion, which would keep the loop scalar.
    const MAGIC: f32 = 12_582_912.0;
    let nm = xc * std::f32::consts::LOG2_E + MAGIC;
    let n = nm - MAGIC;
    let r = xc - n * 0.693_359_4 - n * -2.121_944_4e-4;
    // e^r by its Taylor/minimax polynomial (Cephes expf coefficients).
    let p = 1.987_569_1e-4f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 5e-1;
    let e = p * r * r + r + 1.0;
    // 2^n through the exponent bits: nm's bits are 0x4B40_0000 + n, and n is in [-126, 0].
    let scale = f32::from_bits(((nm.to_bits() as i32 - 0x4B40_0000 + 127) << 23) as u32);
    if x > -87.0 {
        e * scale
    } else if x.is_nan() {
        f32::NAN
    } else {
        0.0
    }
}

/// Σ a·b over f16 bit patterns, each widened exactly to f32.
pub(crate) unsafe fn dot_f16_scalar(a: &[u16], b: &[u16]) -> f32 {
    a.iter().zip(b).fold(0.0f32, |s, (x, y)| {
        f16::from_bits(*x)
            .to_f32()
            .mul_add(f16::from_bits(*y).to_f32(), s)
    })
}

/// Σ (a−b)², front to back.
pub(crate) unsafe fn sqdist_f32_scalar(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0.0f32, |s, (x, y)| {
        let d = x - y;
        d.mul_add(d, s)
    })
}

/// y += a·x.
pub(crate) unsafe fn axpy_f32_scalar(y: &mut [f32], a: f32, x: &[f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi = a.mul_add(*xi, *yi);
    }
}

pub(crate) unsafe fn f16_to_f32_scalar(src: &[u16], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f16::from_bits(*s).to_f32();
    }
}

/// Round to nearest even, like F16C's `vcvtps2ph` with imm 0 and ggml's software path.
pub(crate) unsafe fn f32_to_f16_scalar(src: &[f32], dst: &mut [u16]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f16::from_f32(*s).to_bits();
    }
}

pub(crate) unsafe fn bf16_to_f32_scalar(src: &[u16], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = bf16::from_bits(*s).to_f32();
    }
}

/// ggml's `ggml_compute_fp32_to_bf16`: NaN keeps its sign and high payload and is made quiet;
/// everything else rounds to nearest even (subnormals included, no flush).
pub(crate) unsafe fn f32_to_bf16_scalar(src: &[f32], dst: &mut [u16]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f32_to_bf16_one(*s);
    }
}

#[inline]
pub(crate) fn f32_to_bf16_one(x: f32) -> u16 {
    let u = x.to_bits();
    if (u & 0x7fff_ffff) > 0x7f80_0000 {
        return ((u >> 16) | 64) as u16;
    }
    ((u + (0x7fff + ((u >> 16) & 1))) >> 16) as u16
}

#[cfg(test)]
mod tests {
    use super::exp_approx;

    #[test]
    fn exp_approx_matches_libm() {
        let mut worst = 0f64;
        let mut x = -86.9f32;
        while x <= 0.0 {
            let want = (x as f64).exp();
            let got = exp_approx(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
        assert_eq!(exp_approx(0.0), 1.0);
        assert_eq!(exp_approx(-87.0), 0.0);
        assert_eq!(exp_approx(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_approx(-1000.0), 0.0);
        assert!(exp_approx(f32::NAN).is_nan());
    }
}
