//! Every kernel table against the scalar reference and against f64 references.
//!
//! `simd_props!` is instantiated once per table (scalar, AVX2 on x86_64, NEON on aarch64),
//! like memchr's `define_memchr_quickcheck!`; a table the CPU cannot run is skipped with a
//! note. Each instantiation has
//! - a deterministic sweep over every length 0..=300 (all tails) at several start offsets,
//! - proptest cases with random lengths, start offsets 0..32 into a larger buffer
//!   (misalignment), random values and f16/bf16/f32 special values.
//!
//! Tolerances: conversions are bit-exact, except that f32 -> f16 of a NaN only has to be a NaN
//! (and that widening a NaN sets its quiet bit, as `half` does);
//! dot/sqdist must be within 1e-5 · Σ|terms| of an f64 reference; axpy within half an ulp
//! (one fused multiply-add) of its f64 reference. Output kernels must not write outside the
//! destination slice (checked with guard elements on both sides).

use half::{bf16, f16};
use kvmerger::simd::{Kernels, QK_PANEL};
use proptest::prelude::*;
use proptest::sample::select;

/// Guard elements written before and after every destination slice.
const GUARD: usize = 8;
/// Largest length tested.
const MAX_LEN: usize = 300;

//////////////////////////////// special values ////////////////////////////////

const F16_SPECIALS: &[u16] = &[
    0x0000, 0x8000, // ±0
    0x0001, 0x8001, 0x0200, 0x03ff, 0x83ff, // subnormals (min, mid, max)
    0x0400, 0x8400, // min normal
    0x7bff, 0xfbff, // ±max
    0x7c00, 0xfc00, // ±inf
    0x7e00, 0xfe00, 0x7c01, 0xfc01, 0x7dff, 0x7fff, // quiet and signalling NaNs
    0x3c00, 0x3bff, 0x3c01, 0xbc00, // around ±1
];

const BF16_SPECIALS: &[u16] = &[
    0x0000, 0x8000, 0x0001, 0x8001, 0x007f, 0x0080, 0x7f7f, 0xff7f, 0x7f80, 0xff80, 0x7fc0, 0xffc0,
    0x7f81, 0xff81, 0x7fff, 0x3f80, 0xbf80,
];

const F32_SPECIAL_BITS: &[u32] = &[
    0x0000_0000,
    0x8000_0000, // ±0
    0x0000_0001,
    0x807f_ffff,
    0x0080_0000, // f32 subnormal, min normal
    0x7f7f_ffff,
    0xff7f_ffff, // ±max (-> f16 inf; bf16 rounds to inf)
    0x7f80_0000,
    0xff80_0000, // ±inf
    0x7fc0_0000,
    0xffc0_0000,
    0x7f80_0001,
    0xff80_0001,
    0x7fbf_ffff,
    0xffff_ffff, // NaNs
    0x477f_e000, // 65504 = f16 max
    0x477f_efff,
    0x477f_f000, // just below / at the f16 overflow tie (65520)
    0x3380_0000,
    0x3380_0001,
    0x3300_0000,
    0x3300_0001, // f16 min subnormal, half of it
    0x3f80_1000,
    0x3f80_3000, // f16 ties at 1.0: to even down, to even up
    0x3f80_8000,
    0x3f81_8000,
    0x3f80_8001, // bf16 ties and just above
    0x7f7f_8000,
    0x7f7f_7fff, // bf16 overflow tie, just below
];

fn f32_specials() -> Vec<f32> {
    F32_SPECIAL_BITS
        .iter()
        .map(|&b| f32::from_bits(b))
        .collect()
}

/////////////////////////////////// strategies ///////////////////////////////////

fn arith_f32() -> impl Strategy<Value = f32> + Clone {
    prop_oneof![4 => -1.0f32..1.0, 4 => -1000.0f32..1000.0, 1 => -1e-20f32..1e-20, 1 => Just(0.0f32)]
}

fn f16_bits() -> impl Strategy<Value = u16> + Clone {
    prop_oneof![3 => any::<u16>(), 1 => select(F16_SPECIALS)]
}

fn bf16_bits() -> impl Strategy<Value = u16> + Clone {
    prop_oneof![3 => any::<u16>(), 1 => select(BF16_SPECIALS)]
}

/// f32 inputs for the narrowing conversions: any bit pattern, the f16 range, f16 ties
/// (an f16 value plus exactly half an f16 ulp) and the special list.
fn conv_f32() -> impl Strategy<Value = f32> + Clone {
    prop_oneof![
        3 => any::<u32>().prop_map(f32::from_bits),
        2 => -70000.0f32..70000.0,
        1 => -1e-4f32..1e-4,
        1 => (0x0400u16..0x7c00, any::<bool>())
            .prop_map(|(h, neg)| {
                let x = f16::from_bits(h).to_f32().to_bits() + (1 << 12);
                f32::from_bits(x | if neg { 0x8000_0000 } else { 0 })
            }),
        1 => select(f32_specials()),
    ]
}

/// Two buffers of `off + n` elements; the kernels see `[off..]`.
fn pair<T: std::fmt::Debug + Clone>(
    s: impl Strategy<Value = T> + Clone,
) -> impl Strategy<Value = (Vec<T>, Vec<T>, usize)> {
    (0usize..=MAX_LEN, 0usize..32).prop_flat_map(move |(n, off)| {
        (
            prop::collection::vec(s.clone(), n + off),
            prop::collection::vec(s.clone(), n + off),
            Just(off),
        )
    })
}

//////////////////////////////////// checks ////////////////////////////////////

/// A reduction result against its f64 reference, NaN and infinity included.
fn check_reduction(
    what: &str,
    got: f32,
    exact: f64,
    magnitude: f64,
    n: usize,
) -> Result<(), TestCaseError> {
    if exact.is_nan() {
        prop_assert!(got.is_nan(), "{what} n={n}: got {got}, want NaN");
    } else if exact.is_infinite() {
        prop_assert_eq!(f64::from(got), exact, "{} n={}", what, n);
    } else {
        let err = (f64::from(got) - exact).abs();
        let tol = 1e-5 * magnitude + 1e-30;
        prop_assert!(
            err <= tol,
            "{what} n={n}: got {got}, f64 {exact}, err {err} > {tol}"
        );
    }
    Ok(())
}

fn check_dot_f32(k: &Kernels, a: &[f32], b: &[f32]) -> Result<(), TestCaseError> {
    let exact: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let mag: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) * f64::from(*y)).abs())
        .sum();
    check_reduction("dot_f32", k.dot_f32(a, b), exact, mag, a.len())
}

/// Per-head dots of two rows: every head's `dot` and `nx` must be the bits of the table's own
/// `dot_f32` on that head (the link scores rely on it), and so within the reduction tolerance
/// of f64; heads of every width `dk` that divides the row, tails included.
fn check_head_dots_f32(k: &Kernels, x: &[f32], y: &[f32], dk: usize) -> Result<(), TestCaseError> {
    let nh = x.len() / dk;
    let (x, y) = (&x[..nh * dk], &y[..nh * dk]);
    let mut dot = vec![f32::NAN; nh];
    let mut nx = vec![f32::NAN; nh];
    k.head_dots_f32(x, y, dk, &mut dot, &mut nx);
    for h in 0..nh {
        let (xh, yh) = (&x[h * dk..(h + 1) * dk], &y[h * dk..(h + 1) * dk]);
        for (got, with, what) in [(dot[h], yh, "dot"), (nx[h], xh, "norm")] {
            prop_assert_eq!(
                got.to_bits(),
                k.dot_f32(xh, with).to_bits(),
                "{} {} head {}/{} dk {}",
                k.name,
                what,
                h,
                nh,
                dk
            );
        }
        check_dot_f32(k, xh, yh)?;
    }
    Ok(())
}

/// Queries against packed keys. `kt` comes as `d` rows of `n` (one per channel) and is packed
/// here into the kernels' panels, the padding poisoned with NaN (it must never be read). Keys
/// of every count `n` test the full panels and the 8- and 4-key blocks and single keys of the
/// last one; 1..=7 query rows test the 4-row blocks and their tails. Each output must be
/// bit-identical to the scalar table (one fused chain per lane), the scalar within the
/// reduction tolerance of the f64 sum, and nothing may be written outside `out`.
fn check_qk_t_f32(
    k: &Kernels,
    q: &[f32],
    d: usize,
    kt: &[f32],
    off: usize,
) -> Result<(), TestCaseError> {
    let (m, n) = (q.len() / d, kt.len() / d);
    let mut packed = vec![f32::NAN; off + n.div_ceil(QK_PANEL) * QK_PANEL * d];
    for i in 0..n {
        for j in 0..d {
            packed[off + (i / QK_PANEL) * QK_PANEL * d + j * QK_PANEL + i % QK_PANEL] =
                kt[j * n + i];
        }
    }
    let packed = &packed[off..];
    let got = guarded(&vec![f32::NAN; m * n], off, -2.5f32, |o| {
        k.qk_t_f32(q, d, packed, o)
    })?;
    let mut want = vec![f32::NAN; m * n];
    Kernels::scalar().qk_t_f32(q, d, packed, &mut want);
    for r in 0..m {
        for i in 0..n {
            let (g, w) = (got[r * n + i], want[r * n + i]);
            prop_assert!(
                g.to_bits() == w.to_bits(),
                "qk_t_f32 m={m} d={d} n={n} ({r},{i}): {g} vs scalar {w}"
            );
            let terms = (0..d).map(|j| f64::from(q[r * d + j]) * f64::from(kt[j * n + i]));
            let exact: f64 = terms.clone().sum();
            let mag: f64 = terms.map(f64::abs).sum();
            check_reduction("qk_t_f32", w, exact, mag, d)?;
        }
    }
    Ok(())
}

/// `t` keys of `d` f16 channels (row-major in `src`, which may start misaligned) packed into
/// one panel: bit-identical to the scalar table, which must equal `half`'s widening at
/// `panel[j·QK_PANEL + i]`; the padding columns (`i >= t`) and everything around the panel
/// keep their old contents.
fn check_pack_keys_f16(
    k: &Kernels,
    src: &[u16],
    t: usize,
    d: usize,
    off: usize,
) -> Result<(), TestCaseError> {
    let rows: Vec<&[u16]> = src.chunks_exact(d).take(t).collect();
    let init = vec![-2.5f32; QK_PANEL * d];
    let got = guarded(&init, off, -3.5f32, |p| k.pack_keys_f16(&rows, p))?;
    let mut want = init.clone();
    Kernels::scalar().pack_keys_f16(&rows, &mut want);
    for j in 0..d {
        for i in 0..QK_PANEL {
            let (g, w) = (got[j * QK_PANEL + i], want[j * QK_PANEL + i]);
            prop_assert!(
                g.to_bits() == w.to_bits(),
                "pack t={t} d={d} ({i},{j}): {g} vs {w}"
            );
            let exact = if i < t {
                f16::from_bits(rows[i][j]).to_f32()
            } else {
                -2.5
            };
            prop_assert!(
                w.to_bits() == exact.to_bits() || (w.is_nan() && exact.is_nan()),
                "scalar pack t={t} d={d} ({i},{j}): {w} vs {exact}"
            );
        }
    }
    Ok(())
}

/// `acc += softmax(kq_scale·logit + bias)`: bit-identical to the scalar table, and the scalar
/// within 2e-6 + 1e-5·p (plus the f32 rounding of the sum) of the f64 softmax that treats NaN logits as masked; a row with no
/// finite logit leaves `acc` alone.
fn check_softmax_acc(
    k: &Kernels,
    logit: &[f32],
    kq_scale: f32,
    bias: Option<&[f32]>,
    acc0: &[f32],
) -> Result<(), TestCaseError> {
    let n = logit.len();
    let run = |t: &Kernels| {
        let mut l = logit.to_vec();
        let mut a = acc0.to_vec();
        t.softmax_acc(&mut l, kq_scale, bias, &mut a);
        a
    };
    let (got, want) = (run(k), run(Kernels::scalar()));
    let z: Vec<f64> = (0..n)
        .map(|i| {
            // the scaled logit as the kernel rounds it to f32; the rest in f64
            let x = f64::from(kq_scale * logit[i] + bias.map_or(0.0, |b| b[i]));
            if x.is_nan() {
                f64::NEG_INFINITY
            } else {
                x
            }
        })
        .collect();
    let mx = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = z.iter().map(|x| (x - mx).exp()).sum();
    for i in 0..n {
        prop_assert!(
            got[i].to_bits() == want[i].to_bits(),
            "softmax_acc n={n} [{i}]: {} vs scalar {}",
            got[i],
            want[i]
        );
        let p = if mx.is_finite() {
            (z[i] - mx).exp() / sum
        } else {
            0.0
        };
        let exact = f64::from(acc0[i]) + p;
        prop_assert!(
            (f64::from(want[i]) - exact).abs()
                <= 2e-6 + 1e-5 * p + f64::from(f32::EPSILON) * exact.abs(),
            "softmax_acc n={n} [{i}]: {} vs f64 {exact}",
            want[i]
        );
    }
    Ok(())
}

fn check_dot_f16(k: &Kernels, a: &[u16], b: &[u16]) -> Result<(), TestCaseError> {
    let w = |h: &u16| f64::from(f16::from_bits(*h).to_f32());
    let exact: f64 = a.iter().zip(b).map(|(x, y)| w(x) * w(y)).sum();
    let mag: f64 = a.iter().zip(b).map(|(x, y)| (w(x) * w(y)).abs()).sum();
    check_reduction("dot_f16", k.dot_f16(a, b), exact, mag, a.len())
}

fn check_sqdist_f32(k: &Kernels, a: &[f32], b: &[f32]) -> Result<(), TestCaseError> {
    let d = |x: &f32, y: &f32| f64::from(*x) - f64::from(*y);
    let exact: f64 = a.iter().zip(b).map(|(x, y)| d(x, y) * d(x, y)).sum();
    // `a - b` is rounded to f32 before squaring: a relative error of 2·2⁻²⁴ per term.
    check_reduction("sqdist_f32", k.sqdist_f32(a, b), exact, exact, a.len())
}

/// `m` rows of `n_head` heads of `d` from `a`, weights from `b`: one call against `out` zeroed
/// and an `axpy_f32` per head and row, bit for bit, and against the scalar table.
fn check_weighted_heads_f32(
    k: &Kernels,
    a: &[f32],
    b: &[f32],
    d: usize,
    m: usize,
) -> Result<(), TestCaseError> {
    let n_head = a.len() / (m * d);
    if n_head == 0 || b.is_empty() {
        return Ok(());
    }
    let width = n_head * d;
    let rows = &a[..m * width];
    let w: Vec<f32> = b.iter().cycle().take(n_head * m).copied().collect();
    let mut want = vec![0f32; width];
    for h in 0..n_head {
        for j in 0..m {
            let x = &rows[j * width + h * d..j * width + (h + 1) * d];
            k.axpy_f32(&mut want[h * d..(h + 1) * d], w[h * m + j], x);
        }
    }
    for t in [k, Kernels::scalar()] {
        let got = guarded(&vec![f32::NAN; width], 3, -1.25f32, |out| {
            t.weighted_heads_f32(rows, d, &w, out)
        })?;
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        prop_assert_eq!(bits(&got), bits(&want), "{} d {} m {}", t.name, d, m);
    }
    Ok(())
}

/// `m` rows of `n_head` heads of `d` from `a`: every head's squared distance to the pivot
/// row's, against `sqdist_f32` bit for bit.
fn check_head_sqdists_f32(k: &Kernels, a: &[f32], d: usize, m: usize) -> Result<(), TestCaseError> {
    let n_head = a.len() / (m * d);
    if n_head == 0 {
        return Ok(());
    }
    let width = n_head * d;
    let rows = &a[..m * width];
    for jp in [0, m - 1] {
        let mut got = vec![f32::NAN; n_head * m];
        k.head_sqdists_f32(rows, width, d, jp, &mut got);
        for h in 0..n_head {
            let head = |j: usize| &rows[j * width + h * d..j * width + (h + 1) * d];
            for j in 0..m {
                prop_assert_eq!(
                    got[h * m + j].to_bits(),
                    k.sqdist_f32(head(jp), head(j)).to_bits(),
                    "{} head {} row {} pivot {} d {}",
                    k.name,
                    h,
                    j,
                    jp,
                    d
                );
            }
        }
    }
    Ok(())
}

/// `dst` embedded between guards, run `f` on it, check the guards, return the slice.
fn guarded<T: Copy + PartialEq + std::fmt::Debug>(
    init: &[T],
    off: usize,
    guard: T,
    f: impl FnOnce(&mut [T]),
) -> Result<Vec<T>, TestCaseError> {
    let n = init.len();
    let mut buf = vec![guard; off + n + GUARD];
    buf[off..off + n].copy_from_slice(init);
    f(&mut buf[off..off + n]);
    prop_assert!(
        buf[..off].iter().all(|g| *g == guard),
        "write before the slice"
    );
    prop_assert!(
        buf[off + n..].iter().all(|g| *g == guard),
        "write after the slice"
    );
    Ok(buf[off..off + n].to_vec())
}

fn check_axpy_f32(
    k: &Kernels,
    y: &[f32],
    a: f32,
    x: &[f32],
    off: usize,
) -> Result<(), TestCaseError> {
    let got = guarded(y, off, -1.25f32, |dst| k.axpy_f32(dst, a, x))?;
    for i in 0..y.len() {
        let ax = f64::from(a) * f64::from(x[i]);
        let exact = f64::from(y[i]) + ax;
        let tol = 6e-8 * (f64::from(y[i]).abs() + ax.abs()) + 1e-38;
        let err = (f64::from(got[i]) - exact).abs();
        prop_assert!(
            err <= tol,
            "axpy n={} i={i}: got {}, f64 {exact}",
            y.len(),
            got[i]
        );
    }
    Ok(())
}

fn check_f16_to_f32(k: &Kernels, src: &[u16], off: usize) -> Result<(), TestCaseError> {
    let zero = vec![0.0f32; src.len()];
    let got = guarded(&zero, off, -1.5f32, |dst| k.f16_to_f32(src, dst))?;
    let mut want = zero.clone();
    Kernels::scalar().f16_to_f32(src, &mut want);
    for i in 0..src.len() {
        prop_assert_eq!(got[i].to_bits(), want[i].to_bits(), "f16 {:#06x}", src[i]);
    }
    Ok(())
}

fn check_f32_to_f16(k: &Kernels, src: &[f32], off: usize) -> Result<(), TestCaseError> {
    let zero = vec![0u16; src.len()];
    let got = guarded(&zero, off, 0xabcd, |dst| k.f32_to_f16(src, dst))?;
    let mut want = zero.clone();
    Kernels::scalar().f32_to_f16(src, &mut want);
    for i in 0..src.len() {
        if src[i].is_nan() {
            prop_assert!(
                f16::from_bits(got[i]).is_nan(),
                "NaN {:#010x} -> {:#06x}",
                src[i].to_bits(),
                got[i]
            );
        } else {
            prop_assert_eq!(got[i], want[i], "f32 {:#010x}", src[i].to_bits());
        }
    }
    Ok(())
}

fn check_bf16_to_f32(k: &Kernels, src: &[u16], off: usize) -> Result<(), TestCaseError> {
    let zero = vec![0.0f32; src.len()];
    let got = guarded(&zero, off, -1.5f32, |dst| k.bf16_to_f32(src, dst))?;
    for i in 0..src.len() {
        // Exact widening: the bf16 bits are the high half of the f32; a NaN keeps sign and
        // payload and gets the quiet bit, as in `half` (the scalar reference).
        let h = bf16_quiet(src[i]);
        prop_assert_eq!(got[i].to_bits(), u32::from(h) << 16, "bf16 {:#06x}", src[i]);
        prop_assert_eq!(got[i].to_bits(), bf16::from_bits(src[i]).to_f32().to_bits());
    }
    Ok(())
}

fn check_f32_to_bf16(k: &Kernels, src: &[f32], off: usize) -> Result<(), TestCaseError> {
    let zero = vec![0u16; src.len()];
    let got = guarded(&zero, off, 0xabcd, |dst| k.f32_to_bf16(src, dst))?;
    let mut want = zero.clone();
    Kernels::scalar().f32_to_bf16(src, &mut want);
    for i in 0..src.len() {
        prop_assert_eq!(got[i], want[i], "f32 {:#010x}", src[i].to_bits());
    }
    Ok(())
}

/// The kernels that read f16 rows in place against the table's own f32 kernels on the rows
/// decoded (exact), bit for bit: per-head dots (one row against one and against two), norms,
/// squared distances to a pivot row and weighted sums, on heads of `d` and `m` rows cut from
/// `a` (and `b`, and `a` reversed, for the second and third rows of the dots).
fn check_f16_in_place(
    k: &Kernels,
    a: &[u16],
    b: &[u16],
    d: usize,
    m: usize,
) -> Result<(), TestCaseError> {
    use half::slice::HalfBitsSliceExt;
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let wide = |v: &[f16]| v.iter().map(|x| x.to_f32()).collect::<Vec<f32>>();
    let nh = a.len().min(b.len()) / d;
    if nh > 0 {
        let rev: Vec<u16> = a[..nh * d].iter().rev().copied().collect();
        let (x, y, z): (&[f16], &[f16], &[f16]) = (
            a[..nh * d].reinterpret_cast(),
            b[..nh * d].reinterpret_cast(),
            rev.reinterpret_cast(),
        );
        let (wx, wy, wz) = (wide(x), wide(y), wide(z));
        let (mut dot, mut nx) = (vec![f32::NAN; nh], vec![f32::NAN; nh]);
        k.head_dots_f32(&wx, &wy, d, &mut dot, &mut nx);
        let (mut dz, mut nz) = (vec![f32::NAN; nh], vec![f32::NAN; nh]);
        k.head_dots_f32(&wx, &wz, d, &mut dz, &mut nz);
        let (mut g_dot, mut g_nx) = (vec![f32::NAN; nh], vec![f32::NAN; nh]);
        k.head_dots_f16(x, y, d, &mut g_dot, &mut g_nx);
        prop_assert_eq!(
            bits(&g_dot),
            bits(&dot),
            "{} head_dots_f16 dot d {}",
            k.name,
            d
        );
        prop_assert_eq!(
            bits(&g_nx),
            bits(&nx),
            "{} head_dots_f16 nx d {}",
            k.name,
            d
        );
        let (mut g_dy, mut g_dz, mut g_n2) =
            (vec![f32::NAN; nh], vec![f32::NAN; nh], vec![f32::NAN; nh]);
        k.head_dots2_f16(x, y, z, d, &mut g_dy, &mut g_dz, &mut g_n2);
        prop_assert_eq!(
            bits(&g_dy),
            bits(&dot),
            "{} head_dots2_f16 dy d {}",
            k.name,
            d
        );
        prop_assert_eq!(
            bits(&g_dz),
            bits(&dz),
            "{} head_dots2_f16 dz d {}",
            k.name,
            d
        );
        prop_assert_eq!(
            bits(&g_n2),
            bits(&nx),
            "{} head_dots2_f16 nx d {}",
            k.name,
            d
        );
        let mut g_norm = vec![f32::NAN; nh];
        k.head_norms_f16(x, d, &mut g_norm);
        prop_assert_eq!(
            bits(&g_norm),
            bits(&nx),
            "{} head_norms_f16 d {}",
            k.name,
            d
        );
    }
    let n_head = a.len() / (m * d);
    if n_head == 0 || b.is_empty() {
        return Ok(());
    }
    let width = n_head * d;
    let all: &[f16] = a[..m * width].reinterpret_cast();
    let rows: Vec<&[f16]> = all.chunks_exact(width).collect();
    let flat = wide(all);
    for jp in [0, m - 1] {
        let mut want = vec![f32::NAN; n_head * m];
        k.head_sqdists_f32(&flat, width, d, jp, &mut want);
        let mut got = vec![f32::NAN; n_head * m];
        k.head_sqdists_f16(&rows, d, jp, &mut got);
        prop_assert_eq!(
            bits(&got),
            bits(&want),
            "{} head_sqdists_f16 d {} m {}",
            k.name,
            d,
            m
        );
    }
    // weights from `b`, kept finite
    let w: Vec<f32> = b
        .iter()
        .cycle()
        .take(n_head * m)
        .map(|&h| {
            let v = f16::from_bits(h).to_f32();
            if v.is_finite() {
                v
            } else {
                0.5
            }
        })
        .collect();
    let mut want = vec![f32::NAN; width];
    k.weighted_heads_f32(&flat, d, &w, &mut want);
    let mut got = vec![f32::NAN; width];
    k.weighted_heads_f16(&rows, d, &w, &mut got);
    prop_assert_eq!(
        bits(&got),
        bits(&want),
        "{} weighted_heads_f16 d {} m {}",
        k.name,
        d,
        m
    );
    Ok(())
}

/// `h` with the quiet bit set if it is a NaN.
fn bf16_quiet(h: u16) -> u16 {
    if bf16::from_bits(h).is_nan() {
        h | 0x40
    } else {
        h
    }
}

/// Runs every check once on the given buffers (used by the deterministic sweep).
fn check_all(k: &Kernels, g: &mut XorShift, n: usize, off: usize) -> Result<(), TestCaseError> {
    let fa: Vec<f32> = (0..n).map(|_| g.arith()).collect();
    let fb: Vec<f32> = (0..n).map(|_| g.arith()).collect();
    let ha: Vec<u16> = (0..n).map(|_| g.f16()).collect();
    let hb: Vec<u16> = (0..n).map(|_| g.f16()).collect();
    let bb: Vec<u16> = (0..n).map(|_| g.next() as u16).collect();
    let cf: Vec<f32> = (0..n).map(|_| g.conv()).collect();
    // Pad the inputs too, so they start `off` elements into their allocation.
    let pad = |v: &[f32]| [vec![0.5f32; off], v.to_vec()].concat();
    let padh = |v: &[u16]| [vec![0x3c00u16; off], v.to_vec()].concat();
    let (pfa, pfb, pha, phb) = (pad(&fa), pad(&fb), padh(&ha), padh(&hb));
    let (pbb, pcf) = (padh(&bb), pad(&cf));
    check_dot_f32(k, &pfa[off..], &pfb[off..])?;
    // the row split into heads of 1..=n channels (a last partial head is not a head)
    check_head_dots_f32(k, &pfa[off..], &pfb[off..], 1 + n % 70)?;
    // the same kernels reading f16 rows in place, heads of 1..=70, 1..=4 rows
    check_f16_in_place(k, &pha[off..], &phb[off..], 1 + n % 70, 1 + n % 4)?;
    // n keys of 3 channels (rows b, a, a reversed) against 1..=5 query rows
    let kt: Vec<f32> = [fb.clone(), fa.clone(), fa.iter().rev().copied().collect()].concat();
    let q: Vec<f32> = (0..3 * (1 + n % 7)).map(|_| g.arith()).collect();
    check_qk_t_f32(k, &q, 3, &kt, off)?;
    // 0..=16 keys of 1..=73 channels, rows from a misaligned start
    let (t, d) = (n % (QK_PANEL + 1), 1 + n % 73);
    let hk: Vec<u16> = (0..off + t * d).map(|_| g.f16()).collect();
    check_pack_keys_f16(k, &hk[off..], t, d, off)?;
    // logits of the arithmetic range with masked (−∞) and broken (NaN) entries, a bias on
    // odd lengths
    let lg: Vec<f32> = fa
        .iter()
        .enumerate()
        .map(|(i, &x)| match i % 23 {
            5 => f32::NEG_INFINITY,
            17 => f32::NAN,
            _ => x,
        })
        .collect();
    let bias: Vec<f32> = fb.iter().map(|x| x / 50.0).collect();
    check_softmax_acc(k, &lg, 0.125, (n % 2 == 1).then_some(&bias[..]), &fb)?;
    check_softmax_acc(k, &vec![f32::NEG_INFINITY; n], 1.0, None, &fa)?;
    check_sqdist_f32(k, &pfa[off..], &pfb[off..])?;
    check_dot_f16(k, &pha[off..], &phb[off..])?;
    check_axpy_f32(k, &fa, g.arith(), &pfb[off..], off)?;
    check_f16_to_f32(k, &pha[off..], off)?;
    check_f32_to_f16(k, &pcf[off..], off)?;
    check_bf16_to_f32(k, &pbb[off..], off)?;
    check_f32_to_bf16(k, &pcf[off..], off)?;
    Ok(())
}

/// A tiny deterministic generator for the sweep (proptest covers the random side).
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn arith(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 200.0
    }
    fn f16(&mut self) -> u16 {
        let r = self.next();
        if r & 7 == 0 {
            F16_SPECIALS[(r >> 8) as usize % F16_SPECIALS.len()]
        } else {
            (r >> 16) as u16
        }
    }
    fn conv(&mut self) -> f32 {
        let r = self.next();
        match r % 4 {
            0 => f32::from_bits((r >> 32) as u32),
            1 => f32::from_bits(F32_SPECIAL_BITS[(r >> 8) as usize % F32_SPECIAL_BITS.len()]),
            _ => ((r >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 140_000.0,
        }
    }
}

//////////////////////////////// per-table tests ////////////////////////////////

macro_rules! simd_props {
    ($name:ident, $table:expr) => {
        mod $name {
            use super::*;

            /// The table under test, or `None` (with a note, printed once) when unavailable.
            fn table() -> Option<&'static Kernels> {
                static NOTE: std::sync::Once = std::sync::Once::new();
                let t: Option<&'static Kernels> = $table;
                if t.is_none() {
                    NOTE.call_once(|| {
                        eprintln!(
                            "note: {} table not available on this CPU, its tests are skipped",
                            stringify!($name)
                        )
                    });
                }
                t
            }

            #[test]
            fn every_length_and_offset() {
                let Some(k) = table() else { return };
                let mut g = XorShift(0x9e37_79b9_7f4a_7c15);
                for n in 0..=MAX_LEN {
                    for off in [0, 1, 2, 3, 5, 7, 8, 13, 16, 31] {
                        if let Err(e) = check_all(k, &mut g, n, off) {
                            panic!("{} n={n} off={off}: {e}", k.name);
                        }
                    }
                }
            }

            proptest! {
                #![proptest_config(ProptestConfig::with_cases(256))]

                #[test]
                fn dot_f32((a, b, off) in pair(arith_f32())) {
                    let Some(k) = table() else { return Ok(()) };
                    check_dot_f32(k, &a[off..], &b[off..])?;
                }

                #[test]
                fn head_dots_f32((a, b, off) in pair(arith_f32()), dk in 1usize..=80) {
                    let Some(k) = table() else { return Ok(()) };
                    check_head_dots_f32(k, &a[off..], &b[off..], dk)?;
                }

                #[test]
                fn qk_t_f32((a, b, off) in pair(arith_f32()), q in prop::collection::vec(arith_f32(), 2..=14)) {
                    let Some(k) = table() else { return Ok(()) };
                    // keys: the channel rows a and b; queries: pairs of q
                    let kt = [&a[off..], &b[off..]].concat();
                    check_qk_t_f32(k, &q[..q.len() / 2 * 2], 2, &kt, off)?;
                }

                #[test]
                fn pack_keys_f16((src, _, off) in pair(f16_bits()), t in 0usize..=QK_PANEL, d in 1usize..=80) {
                    let Some(k) = table() else { return Ok(()) };
                    let src: Vec<u16> = src.iter().cycle().take(off + t * d).copied().collect();
                    if src.len() == off + t * d {
                        check_pack_keys_f16(k, &src[off..], t, d, off)?;
                    }
                }

                #[test]
                fn softmax_acc((l, a, off) in pair(arith_f32()), scale in 0.01f32..2.0, with_bias in any::<bool>()) {
                    let Some(k) = table() else { return Ok(()) };
                    let bias: Vec<f32> = a[off..].iter().map(|x| x.clamp(-5.0, 5.0)).collect();
                    check_softmax_acc(k, &l[off..], scale, with_bias.then_some(&bias[..]), &a[off..])?;
                }

                #[test]
                fn sqdist_f32((a, b, off) in pair(arith_f32())) {
                    let Some(k) = table() else { return Ok(()) };
                    check_sqdist_f32(k, &a[off..], &b[off..])?;
                }

                #[test]
                fn weighted_heads_f32((a, b, off) in pair(arith_f32()), d in 1usize..=80, m in 1usize..=4) {
                    let Some(k) = table() else { return Ok(()) };
                    check_weighted_heads_f32(k, &a[off..], &b[off..], d, m)?;
                }

                #[test]
                fn head_sqdists_f32((a, _, off) in pair(arith_f32()), d in 1usize..=80, m in 1usize..=4) {
                    let Some(k) = table() else { return Ok(()) };
                    check_head_sqdists_f32(k, &a[off..], d, m)?;
                }

                #[test]
                fn f16_in_place((a, b, off) in pair(f16_bits()), d in 1usize..=80, m in 1usize..=4) {
                    let Some(k) = table() else { return Ok(()) };
                    check_f16_in_place(k, &a[off..], &b[off..], d, m)?;
                }

                #[test]
                fn dot_f16((a, b, off) in pair(f16_bits())) {
                    let Some(k) = table() else { return Ok(()) };
                    check_dot_f16(k, &a[off..], &b[off..])?;
                }

                #[test]
                fn axpy_f32((y, x, off) in pair(arith_f32()), a in arith_f32()) {
                    let Some(k) = table() else { return Ok(()) };
                    check_axpy_f32(k, &y[off..], a, &x[off..], off)?;
                }

                #[test]
                fn f16_to_f32((src, _, off) in pair(f16_bits())) {
                    let Some(k) = table() else { return Ok(()) };
                    check_f16_to_f32(k, &src[off..], off)?;
                }

                #[test]
                fn f32_to_f16((src, _, off) in pair(conv_f32())) {
                    let Some(k) = table() else { return Ok(()) };
                    check_f32_to_f16(k, &src[off..], off)?;
                }

                #[test]
                fn bf16_to_f32((src, _, off) in pair(bf16_bits())) {
                    let Some(k) = table() else { return Ok(()) };
                    check_bf16_to_f32(k, &src[off..], off)?;
                }

                #[test]
                fn f32_to_bf16((src, _, off) in pair(conv_f32())) {
                    let Some(k) = table() else { return Ok(()) };
                    check_f32_to_bf16(k, &src[off..], off)?;
                }
            }
        }
    };
}

simd_props!(scalar, Some(Kernels::scalar()));
#[cfg(target_arch = "x86_64")]
simd_props!(avx2, Kernels::avx2());
#[cfg(target_arch = "aarch64")]
simd_props!(neon, Kernels::neon());

/////////////////////////////// whole-table tests ///////////////////////////////

/// The SIMD table is really there where the CPU has the features, so the per-ISA tests above
/// are not silently skipped on the machines that matter.
#[test]
fn simd_table_detected() {
    #[cfg(target_arch = "x86_64")]
    {
        let has = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c");
        assert_eq!(Kernels::avx2().is_some(), has);
    }
    #[cfg(target_arch = "aarch64")]
    assert!(Kernels::neon().is_some());
    let names: Vec<_> = Kernels::all_available().iter().map(|k| k.name).collect();
    assert_eq!(names[0], "scalar");
    assert!(names.contains(&kvmerger::simd::kernels().name), "{names:?}");
}

/// All 65536 f16 bit patterns to f32 and back, in one slice (so the vector loop sees them all),
/// for every table: widening bit-identical to scalar, narrowing bit-identical for non-NaN
/// (and then the exact round trip), NaN stays NaN.
#[test]
fn f16_exhaustive_round_trip() {
    let all: Vec<u16> = (0..=u16::MAX).collect();
    let mut want = vec![0.0f32; all.len()];
    Kernels::scalar().f16_to_f32(&all, &mut want);
    for k in Kernels::all_available() {
        let mut wide = vec![0.0f32; all.len()];
        k.f16_to_f32(&all, &mut wide);
        let mut back = vec![0u16; all.len()];
        k.f32_to_f16(&wide, &mut back);
        for (i, &h) in all.iter().enumerate() {
            assert_eq!(
                wide[i].to_bits(),
                want[i].to_bits(),
                "{}: f16 {h:#06x}",
                k.name
            );
            if f16::from_bits(h).is_nan() {
                assert!(wide[i].is_nan(), "{}: f16 {h:#06x}", k.name);
                assert!(f16::from_bits(back[i]).is_nan(), "{}: f16 {h:#06x}", k.name);
            } else {
                assert_eq!(back[i], h, "{}: round trip of {h:#06x}", k.name);
            }
        }
    }
}

/// All 65536 bf16 bit patterns to f32 and back, for every table. bf16 -> f32 is the shift for
/// non-NaN and sets the quiet bit (`| 0x40`) for NaN; the way back is then the identity.
#[test]
fn bf16_exhaustive_round_trip() {
    let all: Vec<u16> = (0..=u16::MAX).collect();
    for k in Kernels::all_available() {
        let mut wide = vec![0.0f32; all.len()];
        k.bf16_to_f32(&all, &mut wide);
        let mut back = vec![0u16; all.len()];
        k.f32_to_bf16(&wide, &mut back);
        for (i, &h) in all.iter().enumerate() {
            let q = bf16_quiet(h);
            assert_eq!(
                wide[i].to_bits(),
                u32::from(q) << 16,
                "{}: bf16 {h:#06x}",
                k.name
            );
            assert_eq!(back[i], q, "{}: round trip of {h:#06x}", k.name);
        }
    }
}

/// A strided sweep of the whole f32 bit space through f32 -> bf16 and f32 -> f16, every table
/// against scalar (proptest samples it randomly; this hits every exponent deterministically).
#[test]
fn f32_strided_narrowing() {
    let src: Vec<f32> = (0..=u32::MAX / 4093)
        .map(|i| f32::from_bits(i.wrapping_mul(4093) ^ (i & 0xfff)))
        .chain(f32_specials())
        .collect();
    let mut want_b = vec![0u16; src.len()];
    let mut want_h = vec![0u16; src.len()];
    Kernels::scalar().f32_to_bf16(&src, &mut want_b);
    Kernels::scalar().f32_to_f16(&src, &mut want_h);
    for k in Kernels::all_available() {
        let mut got_b = vec![0u16; src.len()];
        let mut got_h = vec![0u16; src.len()];
        k.f32_to_bf16(&src, &mut got_b);
        k.f32_to_f16(&src, &mut got_h);
        for i in 0..src.len() {
            let bits = src[i].to_bits();
            assert_eq!(got_b[i], want_b[i], "{}: bf16 of {bits:#010x}", k.name);
            if src[i].is_nan() {
                assert!(
                    f16::from_bits(got_h[i]).is_nan(),
                    "{}: f16 of {bits:#010x}",
                    k.name
                );
            } else {
                assert_eq!(got_h[i], want_h[i], "{}: f16 of {bits:#010x}", k.name);
            }
        }
    }
}
