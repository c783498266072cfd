//! The hot loops, in one table of kernels chosen once per process.
//!
//! Every kernel exists as a scalar reference (`scalar.rs`, always compiled) and, where the CPU
//! has them, as AVX2+FMA+F16C (`avx2.rs`) or NEON (`neon.rs`) versions: each kernel is written
//! once (`generic.rs`) over a vector of f32 lanes that the ISA modules implement, and
//! instantiated per ISA under its `#[target_feature]`. [`kernels()`] picks the
//! best table once (runtime CPUID on x86_64; NEON is the aarch64 baseline, so it is chosen by
//! `cfg`) and every caller goes through the safe methods of [`Kernels`]. Tests build a specific
//! table with [`Kernels::scalar`] / [`Kernels::avx2`] / [`Kernels::neon`] and compare.
//!
//! Reductions use a fixed accumulation order per table, so a result never depends on how
//! rayon split the work, only on which table the CPU selected.

use std::sync::OnceLock;

use half::f16;

/// Keys per panel of [`Kernels::qk_t_f32`]'s packed layout.
pub const QK_PANEL: usize = 16;

#[macro_use]
mod generic;

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
#[cfg(target_arch = "aarch64")]
pub(crate) mod neon;
pub(crate) mod scalar;

/// `(logit, kq_scale, bias, acc)`, see [`Kernels::softmax_acc`].
type SoftmaxAcc = unsafe fn(&mut [f32], f32, Option<&[f32]>, &mut [f32]);

/// `(x, y, dk, dot, nx)`, see [`Kernels::head_dots_f32`].
type HeadDots = unsafe fn(&[f32], &[f32], usize, &mut [f32], &mut [f32]);

/// `(rows, width, d, jp, d2)`, see [`Kernels::head_sqdists_f32`].
type HeadSqdists = unsafe fn(&[f32], usize, usize, usize, &mut [f32]);

/// `(x, y, dk, dot, nx)` over f16 rows, see [`Kernels::head_dots_f16`].
type HeadDotsF16 = unsafe fn(&[f16], &[f16], usize, &mut [f32], &mut [f32]);

/// `(rows, d, jp, d2)` over f16 rows, see [`Kernels::head_sqdists_f16`].
type HeadSqdistsF16 = unsafe fn(&[&[f16]], usize, usize, &mut [f32]);

/// `(rows, d, w, out)` over f16 rows, see [`Kernels::weighted_heads_f16`].
type WeightedRowsF16 = unsafe fn(&[&[f16]], usize, &[f32], &mut [f32]);

/// `(x, y, z, dk, dy, dz, nx)`, see [`Kernels::head_dots2_f16`].
type HeadDots2F16 = unsafe fn(&[f16], &[f16], &[f16], usize, &mut [f32], &mut [f32], &mut [f32]);

/// Function pointers of one implementation. The pointers are `unsafe fn` because the ISA
/// versions carry `#[target_feature]`; a table is only constructed after its features were
/// detected, which is what makes the safe wrappers below sound.
#[derive(Clone, Copy)]
pub struct Kernels {
    pub name: &'static str,
    dot_f32: unsafe fn(&[f32], &[f32]) -> f32,
    head_dots_f32: HeadDots,
    head_dots_f16: HeadDotsF16,
    head_dots2_f16: HeadDots2F16,
    head_norms_f16: unsafe fn(&[f16], usize, &mut [f32]),
    qk_t_f32: unsafe fn(&[f32], usize, &[f32], &mut [f32]),
    pack_keys_f16: unsafe fn(&[&[u16]], &mut [f32]),
    softmax_acc: SoftmaxAcc,
    dot_f16: unsafe fn(&[u16], &[u16]) -> f32,
    sqdist_f32: unsafe fn(&[f32], &[f32]) -> f32,
    head_sqdists_f32: HeadSqdists,
    head_sqdists_f16: HeadSqdistsF16,
    axpy_f32: unsafe fn(&mut [f32], f32, &[f32]),
    weighted_heads_f32: unsafe fn(&[f32], usize, &[f32], &mut [f32]),
    weighted_heads_f16: WeightedRowsF16,
    f16_to_f32: unsafe fn(&[u16], &mut [f32]),
    f32_to_f16: unsafe fn(&[f32], &mut [u16]),
    bf16_to_f32: unsafe fn(&[u16], &mut [f32]),
    f32_to_bf16: unsafe fn(&[f32], &mut [u16]),
}

impl Kernels {
    /// The scalar reference table; always available.
    pub fn scalar() -> &'static Kernels {
        static T: Kernels = Kernels {
            name: "scalar",
            dot_f32: scalar::dot_f32_scalar,
            head_dots_f32: scalar::head_dots_f32_scalar,
            head_dots_f16: scalar::head_dots_f16_scalar,
            head_dots2_f16: scalar::head_dots2_f16_scalar,
            head_norms_f16: scalar::head_norms_f16_scalar,
            qk_t_f32: scalar::qk_t_f32_scalar,
            pack_keys_f16: scalar::pack_keys_f16_scalar,
            softmax_acc: scalar::softmax_acc_scalar,
            dot_f16: scalar::dot_f16_scalar,
            sqdist_f32: scalar::sqdist_f32_scalar,
            head_sqdists_f32: scalar::head_sqdists_f32_scalar,
            head_sqdists_f16: scalar::head_sqdists_f16_scalar,
            axpy_f32: scalar::axpy_f32_scalar,
            weighted_heads_f32: scalar::weighted_heads_f32_scalar,
            weighted_heads_f16: scalar::weighted_heads_f16_scalar,
            f16_to_f32: scalar::f16_to_f32_scalar,
            f32_to_f16: scalar::f32_to_f16_scalar,
            bf16_to_f32: scalar::bf16_to_f32_scalar,
            f32_to_bf16: scalar::f32_to_bf16_scalar,
        };
        &T
    }

    /// The AVX2+FMA+F16C table, or `None` when this CPU lacks one of the three.
    #[cfg(target_arch = "x86_64")]
    pub fn avx2() -> Option<&'static Kernels> {
        avx2::table()
    }

    /// The NEON table (aarch64 baseline, so always `Some` there).
    #[cfg(target_arch = "aarch64")]
    pub fn neon() -> Option<&'static Kernels> {
        neon::table()
    }

    /// Every table this CPU can run, scalar first; for tests and benches.
    pub fn all_available() -> Vec<&'static Kernels> {
        #[allow(unused_mut)]
        let mut v = vec![Kernels::scalar()];
        #[cfg(target_arch = "x86_64")]
        v.extend(Kernels::avx2());
        #[cfg(target_arch = "aarch64")]
        v.extend(Kernels::neon());
        v
    }

    /// Σ a·b.
    #[inline]
    pub fn dot_f32(&self, a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        // SAFETY: the table was built only after its CPU features were detected.
        unsafe { (self.dot_f32)(a, b) }
    }

    /// Per head of two rows split into heads of `dk`: `dot[h] = x_h·y_h` and `nx[h] = x_h·x_h`,
    /// bit for bit what [`Kernels::dot_f32`] gives on each head, in one call per row.
    #[inline]
    pub fn head_dots_f32(&self, x: &[f32], y: &[f32], dk: usize, dot: &mut [f32], nx: &mut [f32]) {
        assert!(dk > 0, "dk is 0");
        assert_eq!(x.len(), y.len());
        assert_eq!(x.len(), dk * dot.len());
        assert_eq!(nx.len(), dot.len());
        // SAFETY: the table was built only after its CPU features were detected.
        unsafe { (self.head_dots_f32)(x, y, dk, dot, nx) }
    }

    /// [`Self::head_dots_f32`] on f16 rows read in place: the bits it gives on the rows
    /// decoded (the widening is exact), without their f32 copies.
    #[inline]
    pub fn head_dots_f16(&self, x: &[f16], y: &[f16], dk: usize, dot: &mut [f32], nx: &mut [f32]) {
        assert!(dk > 0, "dk is 0");
        assert_eq!(x.len(), y.len());
        assert_eq!(x.len(), dk * dot.len());
        assert_eq!(nx.len(), dot.len());
        // SAFETY: the table was built only after its CPU features were detected.
        unsafe { (self.head_dots_f16)(x, y, dk, dot, nx) }
    }

    /// One f16 row against two, read in place: `dy`, `dz` and `nx` are the `dot` of
    /// [`Self::head_dots_f16`]`(x, y)`, its `dot` with `(x, z)` and its `nx`, bit for bit, with
    /// `x` loaded once.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    pub fn head_dots2_f16(
        &self,
        x: &[f16],
        y: &[f16],
        z: &[f16],
        dk: usize,
        dy: &mut [f32],
        dz: &mut [f32],
        nx: &mut [f32],
    ) {
        assert!(dk > 0, "dk is 0");
        assert!(x.len() == y.len() && x.len() == z.len());
        assert_eq!(x.len(), dk * nx.len());
        assert!(dy.len() == nx.len() && dz.len() == nx.len());
        // SAFETY: the table was built only after its CPU features were detected.
        unsafe { (self.head_dots2_f16)(x, y, z, dk, dy, dz, nx) }
    }

    /// Per head of an f16 row read in place, its squared norm: the `nx` of
    /// [`Self::head_dots_f16`], bit for bit, at half the work.
    #[inline]
    pub fn head_norms_f16(&self, x: &[f16], dk: usize, nx: &mut [f32]) {
        assert!(dk > 0, "dk is 0");
        assert_eq!(x.len(), dk * nx.len());
        // SAFETY: the table was built only after its CPU features were detected.
        unsafe { (self.head_norms_f16)(x, dk, nx) }
    }

    /// Queries against packed keys: `out[r·n + i] = q_r · k_i` for the `m = q.len()/d` query
    /// rows of `q` and the `n = out.len()/m` keys of `kt`. `kt` holds the keys transposed in
    /// panels of [`QK_PANEL`]: channel `j` of key `i` at
    /// `(i / QK_PANEL)·QK_PANEL·d + j·QK_PANEL + i % QK_PANEL`, the last panel padded (its
    /// padding is never read). One panel is a small contiguous matrix that stays in L1 while
    /// every query passes over it, and no dot needs a horizontal sum. Every table gives the
    /// same bits: one fused multiply-add chain over `j` per output.
    #[inline]
    pub fn qk_t_f32(&self, q: &[f32], d: usize, kt: &[f32], out: &mut [f32]) {
        assert!(d > 0 && q.len() % d == 0, "q is not whole rows of d = {d}");
        let m = q.len() / d;
        if m == 0 || out.is_empty() {
            assert!(out.is_empty());
            return;
        }
        assert_eq!(out.len() % m, 0);
        let n = out.len() / m;
        assert!(
            kt.len() >= n.div_ceil(QK_PANEL) * QK_PANEL * d,
            "kt shorter than its panels"
        );
        // SAFETY: as in `dot_f32`; the shapes were checked above.
        unsafe { (self.qk_t_f32)(q, d, kt, out) }
    }

    /// Up to [`QK_PANEL`] keys given as f16 bit patterns (`d = panel.len() / QK_PANEL`
    /// channels each), widened exactly, into one panel of the layout [`Self::qk_t_f32`] reads:
    /// channel `j` of `rows[i]` at `panel[j·QK_PANEL + i]`. Columns past `rows.len()` are left
    /// as they were. Every table gives the same bits.
    #[inline]
    pub fn pack_keys_f16(&self, rows: &[&[u16]], panel: &mut [f32]) {
        assert!(
            rows.len() <= QK_PANEL && panel.len() % QK_PANEL == 0,
            "more than QK_PANEL rows, or a panel that is not QK_PANEL columns wide"
        );
        let d = panel.len() / QK_PANEL;
        assert!(
            rows.iter().all(|r| r.len() == d),
            "a row is not d = {d} wide"
        );
        // SAFETY: as in `dot_f32`; the shapes were checked above.
        unsafe { (self.pack_keys_f16)(rows, panel) }
    }

    /// `acc[i] += softmax(kq_scale·logit + bias)[i]`, `logit` overwritten. NaN logits count as
    /// masked (−∞); a row with no finite logit adds nothing (it is no evidence). `e^x` has a
    /// relative error below 4e-7; every table gives the same bits.
    #[inline]
    pub fn softmax_acc(
        &self,
        logit: &mut [f32],
        kq_scale: f32,
        bias: Option<&[f32]>,
        acc: &mut [f32],
    ) {
        assert_eq!(logit.len(), acc.len());
        assert!(bias.is_none_or(|b| b.len() == logit.len()));
        // SAFETY: as in `dot_f32`.
        unsafe { (self.softmax_acc)(logit, kq_scale, bias, acc) }
    }

    /// Σ a·b over f16 bit patterns, accumulated in f32.
    #[inline]
    pub fn dot_f16(&self, a: &[u16], b: &[u16]) -> f32 {
        assert_eq!(a.len(), b.len());
        // SAFETY: as in `dot_f32`.
        unsafe { (self.dot_f16)(a, b) }
    }

    /// Σ (a−b)².
    #[inline]
    pub fn sqdist_f32(&self, a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        // SAFETY: as in `dot_f32`.
        unsafe { (self.sqdist_f32)(a, b) }
    }

    /// For `m = rows.len() / width` rows of `width = n_head·d` and each head `h` and row `j`:
    /// `d2[h·m + j] = Σ (rows_jp,h − rows_j,h)²`, bit for bit [`Self::sqdist_f32`] on the two
    /// heads, in one call.
    #[inline]
    pub fn head_sqdists_f32(
        &self,
        rows: &[f32],
        width: usize,
        d: usize,
        jp: usize,
        d2: &mut [f32],
    ) {
        assert!(
            d > 0 && width % d == 0,
            "width is not whole heads of d = {d}"
        );
        assert!(
            width > 0 && rows.len() % width == 0,
            "rows are not whole rows"
        );
        let m = rows.len() / width;
        assert!(jp < m, "pivot row {jp} of {m}");
        assert_eq!(d2.len(), m * (width / d));
        // SAFETY: as in `dot_f32`; the shapes were checked above.
        unsafe { (self.head_sqdists_f32)(rows, width, d, jp, d2) }
    }

    /// [`Self::head_sqdists_f32`] on the `m = rows.len()` rows of f16 given one slice each
    /// (each `width = rows[0].len()` wide) and read in place: the bits it gives on the rows
    /// decoded into one buffer.
    #[inline]
    pub fn head_sqdists_f16(&self, rows: &[&[f16]], d: usize, jp: usize, d2: &mut [f32]) {
        let m = rows.len();
        assert!(jp < m, "pivot row {jp} of {m}");
        let width = rows[0].len();
        assert!(
            d > 0 && width > 0 && width % d == 0,
            "width is not whole heads of d = {d}"
        );
        assert!(
            rows.iter().all(|r| r.len() == width),
            "rows differ in width"
        );
        assert_eq!(d2.len(), m * (width / d));
        // SAFETY: as in `dot_f32`; the shapes were checked above.
        unsafe { (self.head_sqdists_f16)(rows, d, jp, d2) }
    }

    /// [`Self::weighted_heads_f32`] on the `m = w.len() / n_head` rows of f16 given one slice
    /// each (each at least `out.len()` wide) and read in place: the bits it gives on the rows
    /// decoded into one buffer.
    #[inline]
    pub fn weighted_heads_f16(&self, rows: &[&[f16]], d: usize, w: &[f32], out: &mut [f32]) {
        assert!(
            d > 0 && out.len() % d == 0,
            "out is not whole heads of d = {d}"
        );
        let n_head = out.len() / d;
        assert!(n_head > 0 && w.len() % n_head == 0, "w is not whole heads");
        assert!(rows.len() >= w.len() / n_head, "fewer rows than weights");
        assert!(
            rows.iter().all(|r| r.len() >= out.len()),
            "a row is narrower than out"
        );
        // SAFETY: as in `dot_f32`; the shapes were checked above.
        unsafe { (self.weighted_heads_f16)(rows, d, w, out) }
    }

    /// Per head `h` (of `d`) of `out`: `out_h = Σ_j w[h·m + j] · rows_j,h` over the
    /// `m = w.len() / n_head` rows of `rows`, each `out.len()` wide; bit for bit `out` zeroed
    /// and one [`Self::axpy_f32`] per head and row, rows in order.
    #[inline]
    pub fn weighted_heads_f32(&self, rows: &[f32], d: usize, w: &[f32], out: &mut [f32]) {
        assert!(
            d > 0 && out.len() % d == 0,
            "out is not whole heads of d = {d}"
        );
        let n_head = out.len() / d;
        assert!(n_head > 0 && w.len() % n_head == 0, "w is not whole heads");
        assert!(
            rows.len() >= w.len() / n_head * out.len(),
            "fewer rows than weights"
        );
        // SAFETY: as in `dot_f32`; the shapes were checked above.
        unsafe { (self.weighted_heads_f32)(rows, d, w, out) }
    }

    /// y += a·x.
    #[inline]
    pub fn axpy_f32(&self, y: &mut [f32], a: f32, x: &[f32]) {
        assert_eq!(y.len(), x.len());
        // SAFETY: as in `dot_f32`.
        unsafe { (self.axpy_f32)(y, a, x) }
    }

    /// f16 bit patterns to f32 (exact).
    #[inline]
    pub fn f16_to_f32(&self, src: &[u16], dst: &mut [f32]) {
        assert_eq!(src.len(), dst.len());
        // SAFETY: as in `dot_f32`.
        unsafe { (self.f16_to_f32)(src, dst) }
    }

    /// f32 to f16 bit patterns, round to nearest even (ggml's `GGML_FP32_TO_FP16`).
    #[inline]
    pub fn f32_to_f16(&self, src: &[f32], dst: &mut [u16]) {
        assert_eq!(src.len(), dst.len());
        // SAFETY: as in `dot_f32`.
        unsafe { (self.f32_to_f16)(src, dst) }
    }

    /// bf16 bit patterns to f32 (exact).
    #[inline]
    pub fn bf16_to_f32(&self, src: &[u16], dst: &mut [f32]) {
        assert_eq!(src.len(), dst.len());
        // SAFETY: as in `dot_f32`.
        unsafe { (self.bf16_to_f32)(src, dst) }
    }

    /// f32 to bf16, round to nearest even, NaN made quiet (ggml's `ggml_compute_fp32_to_bf16`).
    #[inline]
    pub fn f32_to_bf16(&self, src: &[f32], dst: &mut [u16]) {
        assert_eq!(src.len(), dst.len());
        // SAFETY: as in `dot_f32`.
        unsafe { (self.f32_to_bf16)(src, dst) }
    }
}

/// The best table for this CPU, detected once.
pub fn kernels() -> &'static Kernels {
    static BEST: OnceLock<&'static Kernels> = OnceLock::new();
    BEST.get_or_init(|| {
        if std::env::var_os("KVM_FORCE_SCALAR").is_some() {
            return Kernels::scalar();
        }
        #[cfg(target_arch = "x86_64")]
        if let Some(t) = Kernels::avx2() {
            return t;
        }
        #[cfg(target_arch = "aarch64")]
        if let Some(t) = Kernels::neon() {
            return t;
        }
        Kernels::scalar()
    })
}
