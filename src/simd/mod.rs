//! The hot loops, in one table of kernels chosen once per process.
//!
//! Every kernel exists as a scalar reference (`scalar.rs`, always compiled) and, where the CPU
//! has them, as AVX2+FMA+F16C (`avx2.rs`) or NEON (`neon.rs`) versions. [`kernels()`] picks the
//! best table once (runtime CPUID on x86_64; NEON is the aarch64 baseline, so it is chosen by
//! `cfg`) and every caller goes through the safe methods of [`Kernels`]. Tests build a specific
//! table with [`Kernels::scalar`] / [`Kernels::avx2`] / [`Kernels::neon`] and compare.
//!
//! Reductions use a fixed accumulation order per table, so a result never depends on how
//! rayon split the work, only on which table the CPU selected.

use std::sync::OnceLock;

/// Keys per panel of [`Kernels::qk_t_f32`]'s packed layout.
pub const QK_PANEL: usize = 16;

/// An ISA's [`QkBlocks`]: its `qk_block` with a whole panel being `$nv` registers wide.
/// (Before the ISA modules, so that they see it.)
macro_rules! qk_blocks {
    ($name:ident, $nv:literal) => {
        /// This ISA's blocks for the shared driver.
        struct $name;

        impl super::QkBlocks for $name {
            const EPR: usize = EPR;
            #[inline(always)]
            unsafe fn block<const MQ: usize, const WHOLE: bool>(at: QkAt, out: &mut [f32]) {
                // SAFETY: the driver's bounds; a whole panel is $nv registers wide.
                unsafe {
                    if WHOLE {
                        qk_block::<MQ, $nv>(at, out)
                    } else {
                        qk_block::<MQ, 1>(at, out)
                    }
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
#[cfg(target_arch = "aarch64")]
pub(crate) mod neon;
pub(crate) mod scalar;

/// Where one register block of a `qk_t_f32` kernel works: query rows `r0..` of `q` (`d`
/// wide), columns `ko..` of `panel`, output cells `(r0+a)·n + i0 + ko..` of `out`.
#[derive(Clone, Copy)]
pub(crate) struct QkAt<'a> {
    pub q: &'a [f32],
    pub d: usize,
    pub panel: &'a [f32],
    pub n: usize,
    pub r0: usize,
    pub i0: usize,
    pub ko: usize,
}

/// The register blocks of one ISA's `qk_t_f32`, for the shared [`qk_t_driver`].
pub(crate) trait QkBlocks {
    /// f32 lanes per register.
    const EPR: usize;
    /// `MQ` query rows × a whole panel (`WHOLE`, from column 0) or × one register of keys.
    ///
    /// # Safety
    /// The ISA's features are enabled (call only from an entry compiled with them); rows
    /// `r0..r0+MQ` exist, the keys `ko..` of the block are inside the panel's valid columns
    /// and `out` holds the block's cells.
    unsafe fn block<const MQ: usize, const WHOLE: bool>(at: QkAt, out: &mut [f32]);
}

/// The loop of every ISA's `qk_t_f32` around its register blocks: one panel (16 keys,
/// `16·d` contiguous floats) at a time goes through every query row, 4 rows per block, while
/// it sits in L1; a last, partial panel goes one register of keys at a time, then key by key
/// with the scalar chain. Inlined into each entry, so it is compiled with the entry's features.
///
/// # Safety
/// `B`'s features are enabled; `d`, `m = q.len()/d` and `n = out.len()/m` are non-zero and
/// `kt` holds every panel (the table's wrapper checked).
#[inline(always)]
pub(crate) unsafe fn qk_t_driver<B: QkBlocks>(q: &[f32], d: usize, kt: &[f32], out: &mut [f32]) {
    let m = q.len() / d;
    let n = out.len() / m;
    for (p, panel) in kt
        .chunks_exact(QK_PANEL * d)
        .take(n.div_ceil(QK_PANEL))
        .enumerate()
    {
        let i0 = p * QK_PANEL;
        let w = (n - i0).min(QK_PANEL);
        let mut at = QkAt {
            q,
            d,
            panel,
            n,
            r0: 0,
            i0,
            ko: 0,
        };
        // Every block: features by the caller; r0 + MQ <= m and ko + keys <= w <= P.
        macro_rules! rows {
            ($whole:literal) => {
                at.r0 = 0;
                while at.r0 + 4 <= m {
                    // SAFETY: see above.
                    unsafe { B::block::<4, $whole>(at, out) };
                    at.r0 += 4;
                }
                while at.r0 < m {
                    // SAFETY: see above.
                    unsafe { B::block::<1, $whole>(at, out) };
                    at.r0 += 1;
                }
            };
        }
        if w == QK_PANEL {
            rows!(true);
            at.ko = QK_PANEL;
        }
        while at.ko + B::EPR <= w {
            rows!(false);
            at.ko += B::EPR;
        }
        let ko = at.ko;
        // the last panel's leftover keys: the same chain, one at a time
        for r in 0..m {
            for c in ko..w {
                let mut s = 0f32;
                for j in 0..d {
                    s = q[r * d + j].mul_add(panel[j * QK_PANEL + c], s);
                }
                out[r * n + i0 + c] = s;
            }
        }
    }
}

/// The register block of one ISA's `pack_keys_f16`, for the shared [`pack_keys_f16_driver`].
pub(crate) trait PackBlock {
    /// Rows and channels per block (the block is square).
    const W: usize;
    /// Channels `j..j+W` of the `W` rows of `block`, widened and transposed into panel columns
    /// `g..g+W` (`panel[(j+c)·QK_PANEL + g + i]`).
    ///
    /// # Safety
    /// The ISA's features are enabled; `block` has `W` rows of at least `j + W` channels,
    /// `g + W <= QK_PANEL` and `panel` holds channel `j + W - 1`'s row of the panel.
    unsafe fn block(block: &[&[u16]], j: usize, panel: &mut [f32], g: usize);
}

/// The loop of every ISA's `pack_keys_f16` around its block: whole `W × W` blocks of rows and
/// channels in registers, the leftover channels and rows with the scalar code. Inlined into
/// each entry, so it is compiled with the entry's features.
///
/// # Safety
/// `B`'s features are enabled; `rows.len() <= QK_PANEL` and every row holds
/// `panel.len() / QK_PANEL` channels (the table's wrapper checked).
#[inline(always)]
pub(crate) unsafe fn pack_keys_f16_driver<B: PackBlock>(rows: &[&[u16]], panel: &mut [f32]) {
    let d = panel.len() / QK_PANEL;
    let dw = d - d % B::W;
    let full = rows.len() - rows.len() % B::W;
    for g in (0..full).step_by(B::W) {
        let block = &rows[g..g + B::W];
        for j in (0..dw).step_by(B::W) {
            // SAFETY: features by the caller; j + W <= dw <= d channels per row, g + W <= full
            // <= QK_PANEL.
            unsafe { B::block(block, j, panel, g) };
        }
        scalar::pack_keys_f16_cols_at(block, g, dw, panel);
    }
    scalar::pack_keys_f16_cols_at(&rows[full..], full, 0, panel);
}

/// `(logit, kq_scale, bias, acc)`, see [`Kernels::softmax_acc`].
type SoftmaxAcc = unsafe fn(&mut [f32], f32, Option<&[f32]>, &mut [f32]);

/// `(x, y, dk, dot, nx)`, see [`Kernels::head_dots_f32`].
type HeadDots = unsafe fn(&[f32], &[f32], usize, &mut [f32], &mut [f32]);

/// `(rows, width, d, jp, d2)`, see [`Kernels::head_sqdists_f32`].
type HeadSqdists = unsafe fn(&[f32], usize, usize, usize, &mut [f32]);

/// Function pointers of one implementation. The pointers are `unsafe fn` because the ISA
/// versions carry `#[target_feature]`; a table is only constructed after its features were
/// detected, which is what makes the safe wrappers below sound.
#[derive(Clone, Copy)]
pub struct Kernels {
    pub name: &'static str,
    dot_f32: unsafe fn(&[f32], &[f32]) -> f32,
    head_dots_f32: HeadDots,
    qk_t_f32: unsafe fn(&[f32], usize, &[f32], &mut [f32]),
    pack_keys_f16: unsafe fn(&[&[u16]], &mut [f32]),
    softmax_acc: SoftmaxAcc,
    dot_f16: unsafe fn(&[u16], &[u16]) -> f32,
    sqdist_f32: unsafe fn(&[f32], &[f32]) -> f32,
    head_sqdists_f32: HeadSqdists,
    axpy_f32: unsafe fn(&mut [f32], f32, &[f32]),
    weighted_heads_f32: unsafe fn(&[f32], usize, &[f32], &mut [f32]),
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
            qk_t_f32: scalar::qk_t_f32_scalar,
            pack_keys_f16: scalar::pack_keys_f16_scalar,
            softmax_acc: scalar::softmax_acc_scalar,
            dot_f16: scalar::dot_f16_scalar,
            sqdist_f32: scalar::sqdist_f32_scalar,
            head_sqdists_f32: scalar::head_sqdists_f32_scalar,
            axpy_f32: scalar::axpy_f32_scalar,
            weighted_heads_f32: scalar::weighted_heads_f32_scalar,
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
