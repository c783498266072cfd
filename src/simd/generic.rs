//! The streaming kernels, written once over a vector of f32 lanes ([`F32Vec`]); `avx2.rs` and
//! `neon.rs` implement the vector and [`isa_kernels!`] instantiates every kernel under each
//! ISA's `#[target_feature]`, which makes its table (memchr's `Vector` and `generic/`).
//!
//! Every reduction has ggml's shape (`ggml-cpu/vec.h`, `simd-mappings.h`), in [`fold`]:
//!
//! ```text
//! np = n & !(STEP - 1)                 STEP = ARR·EPR
//! for i in (0..np).step_by(STEP):      ARR independent registers of EPR lanes
//!     acc[j] = op(acc[j], x[i + j*EPR ..], y[i + j*EPR ..])   j in 0..ARR
//! sum = reduce_sum(acc)                the ISA's fixed order, see its `reduce_sum`
//! // leftovers: i in np..n, one element at a time, added onto the reduced sum
//! ```
//!
//! A slice shorter than one step has no vector part: its sum is the scalar chain from +0, the
//! bits of the scalar reference. The order is fixed, so a reduction's result depends only on
//! its inputs and the table. Element-wise kernels ([`zip_map`]: axpy, the conversions) are
//! bit-identical to `scalar.rs` (both use fused multiply-add; F16C and `fcvtn` round to
//! nearest even like `half`; bf16 uses ggml's integer rounding and, like `half`, quiets NaNs
//! when widening).
//!
//! Nothing here carries `#[target_feature]`: every function is `#[inline(always)]` and only
//! called from an ISA entry, so it is compiled with that entry's features.

use half::{bf16, f16};

use super::{scalar, QK_PANEL};

/// Independent registers per loop step (ggml `GGML_F32_ARR`).
pub(crate) const ARR: usize = 4;

/// A register of f32 lanes, the one thing an ISA gives the kernels below.
///
/// # Safety
/// Every method needs the ISA's features enabled (call only from an entry compiled with
/// them); a method with a pointer reads or writes `EPR` elements there, unaligned.
pub(crate) trait F32Vec: Copy {
    /// f32 lanes per register (ggml `GGML_F32_EPR`).
    const EPR: usize;
    /// Elements per loop step (ggml `GGML_F32_STEP`).
    const STEP: usize = ARR * Self::EPR;

    /// Every lane `x`.
    unsafe fn splat(x: f32) -> Self;
    unsafe fn loadu(p: *const f32) -> Self;
    /// f16 bit patterns, widened exactly.
    unsafe fn load_f16(p: *const u16) -> Self;
    /// bf16 bit patterns, widened exactly, NaNs made quiet (as `half`).
    unsafe fn load_bf16(p: *const u16) -> Self;
    unsafe fn storeu(self, p: *mut f32);
    /// Narrowed to f16 bit patterns, round to nearest even.
    unsafe fn store_f16(self, p: *mut u16);
    /// Narrowed to bf16 with ggml's rounding (nearest even, NaN made quiet).
    unsafe fn store_bf16(self, p: *mut u16);
    /// `self·b + c`, rounded once, per lane.
    unsafe fn mul_add(self, b: Self, c: Self) -> Self;
    unsafe fn sub(self, b: Self) -> Self;
    /// The sum of all lanes of the `ARR` accumulators, in the ISA's fixed order.
    unsafe fn reduce_sum(acc: [Self; ARR]) -> f32;
}

/// A row element the kernels read where it lies: f32 as it is, f16 widened exactly on load.
/// A kernel over f16 rows therefore gives the bits of the same kernel over the rows decoded
/// to f32 first, without the decode's pass over memory and its f32 copy.
pub(crate) trait Elem: Copy {
    /// `EPR` elements at `p` as f32 lanes.
    ///
    /// # Safety
    /// `V`'s features are enabled and `EPR` elements are readable at `p`.
    unsafe fn load<V: F32Vec>(p: *const Self) -> V;
    /// One element as f32 (the scalar leftovers).
    fn wide(self) -> f32;
}

impl Elem for f32 {
    #[inline(always)]
    unsafe fn load<V: F32Vec>(p: *const f32) -> V {
        // SAFETY: forwarded from the caller.
        unsafe { V::loadu(p) }
    }
    #[inline(always)]
    fn wide(self) -> f32 {
        self
    }
}

impl Elem for f16 {
    #[inline(always)]
    unsafe fn load<V: F32Vec>(p: *const f16) -> V {
        // SAFETY: forwarded from the caller; `f16` is a transparent `u16`.
        unsafe { V::load_f16(p.cast()) }
    }
    #[inline(always)]
    fn wide(self) -> f32 {
        self.to_f32()
    }
}

/// An ISA's kernel table: one `#[target_feature]` entry per slot that instantiates the kernel
/// of this module with the ISA's vector (`qk_t_f32` with whole panels of `qk_panel_regs`
/// registers, `pack_keys_f16` with the ISA's [`PackBlock`]), and `static TABLE`. Defined
/// before the ISA modules, so that they see it.
macro_rules! isa_kernels {
    (
        name: $name:literal,
        features: $feat:literal,
        vector: $V:ty,
        qk_panel_regs: $nv:literal,
        pack: $pack:ty,
        entries: {
            dot_f32: $dot_f32:ident,
            head_dots_f32: $head_dots_f32:ident,
            head_dots_f16: $head_dots_f16:ident,
            head_dots2_f16: $head_dots2_f16:ident,
            head_norms_f16: $head_norms_f16:ident,
            qk_t_f32: $qk_t_f32:ident,
            pack_keys_f16: $pack_keys_f16:ident,
            softmax_acc: $softmax_acc:ident,
            dot_f16: $dot_f16:ident,
            sqdist_f32: $sqdist_f32:ident,
            head_sqdists_f32: $head_sqdists_f32:ident,
            head_sqdists_f16: $head_sqdists_f16:ident,
            axpy_f32: $axpy_f32:ident,
            weighted_heads_f32: $weighted_heads_f32:ident,
            weighted_heads_f16: $weighted_heads_f16:ident,
            f16_to_f32: $f16_to_f32:ident,
            f32_to_f16: $f32_to_f16:ident,
            bf16_to_f32: $bf16_to_f32:ident,
            f32_to_bf16: $f32_to_bf16:ident $(,)?
        } $(,)?
    ) => {
        /// This ISA's table; hand it out only where the CPU has `features`.
        static TABLE: $crate::simd::Kernels = $crate::simd::Kernels {
            name: $name,
            dot_f32: $dot_f32,
            head_dots_f32: $head_dots_f32,
            head_dots_f16: $head_dots_f16,
            head_dots2_f16: $head_dots2_f16,
            head_norms_f16: $head_norms_f16,
            qk_t_f32: $qk_t_f32,
            pack_keys_f16: $pack_keys_f16,
            softmax_acc: $softmax_acc,
            dot_f16: $dot_f16,
            sqdist_f32: $sqdist_f32,
            head_sqdists_f32: $head_sqdists_f32,
            head_sqdists_f16: $head_sqdists_f16,
            axpy_f32: $axpy_f32,
            weighted_heads_f32: $weighted_heads_f32,
            weighted_heads_f16: $weighted_heads_f16,
            f16_to_f32: $f16_to_f32,
            f32_to_f16: $f32_to_f16,
            bf16_to_f32: $bf16_to_f32,
            f32_to_bf16: $f32_to_bf16,
        };
        isa_kernels!(@entry $feat, $dot_f32(a: &[f32], b: &[f32]) -> f32
            = dot_f32::<$V>);
        isa_kernels!(@entry $feat,
            $head_dots_f32(x: &[f32], y: &[f32], dk: usize, dot: &mut [f32], nx: &mut [f32])
            = head_dots::<$V, f32>);
        isa_kernels!(@entry $feat,
            $head_dots_f16(x: &[::half::f16], y: &[::half::f16], dk: usize, dot: &mut [f32],
                nx: &mut [f32])
            = head_dots::<$V, ::half::f16>);
        isa_kernels!(@entry $feat,
            $head_dots2_f16(x: &[::half::f16], y: &[::half::f16], z: &[::half::f16], dk: usize,
                dy: &mut [f32], dz: &mut [f32], nx: &mut [f32])
            = head_dots2::<$V, ::half::f16>);
        isa_kernels!(@entry $feat,
            $head_norms_f16(x: &[::half::f16], dk: usize, nx: &mut [f32])
            = head_norms::<$V, ::half::f16>);
        isa_kernels!(@entry $feat, $qk_t_f32(q: &[f32], d: usize, kt: &[f32], out: &mut [f32])
            = qk_t_f32::<$V, $nv>);
        isa_kernels!(@entry $feat, $pack_keys_f16(rows: &[&[u16]], panel: &mut [f32])
            = pack_keys_f16::<$pack>);
        isa_kernels!(@entry $feat,
            $softmax_acc(logit: &mut [f32], kq_scale: f32, bias: Option<&[f32]>, acc: &mut [f32])
            = softmax_acc);
        isa_kernels!(@entry $feat, $dot_f16(a: &[u16], b: &[u16]) -> f32 = dot_f16::<$V>);
        isa_kernels!(@entry $feat, $sqdist_f32(a: &[f32], b: &[f32]) -> f32
            = sqdist_f32::<$V>);
        isa_kernels!(@entry $feat,
            $head_sqdists_f32(rows: &[f32], width: usize, d: usize, jp: usize, d2: &mut [f32])
            = head_sqdists_f32::<$V>);
        isa_kernels!(@entry $feat,
            $head_sqdists_f16(rows: &[&[::half::f16]], d: usize, jp: usize, d2: &mut [f32])
            = head_sqdists_rows::<$V, ::half::f16>);
        isa_kernels!(@entry $feat, $axpy_f32(y: &mut [f32], a: f32, x: &[f32])
            = axpy_f32::<$V>);
        isa_kernels!(@entry $feat,
            $weighted_heads_f32(rows: &[f32], d: usize, w: &[f32], out: &mut [f32])
            = weighted_heads_f32::<$V>);
        isa_kernels!(@entry $feat,
            $weighted_heads_f16(rows: &[&[::half::f16]], d: usize, w: &[f32], out: &mut [f32])
            = weighted_heads_rows::<$V, ::half::f16>);
        isa_kernels!(@entry $feat, $f16_to_f32(src: &[u16], dst: &mut [f32])
            = f16_to_f32::<$V>);
        isa_kernels!(@entry $feat, $f32_to_f16(src: &[f32], dst: &mut [u16])
            = f32_to_f16::<$V>);
        isa_kernels!(@entry $feat, $bf16_to_f32(src: &[u16], dst: &mut [f32])
            = bf16_to_f32::<$V>);
        isa_kernels!(@entry $feat, $f32_to_bf16(src: &[f32], dst: &mut [u16])
            = f32_to_bf16::<$V>);
    };
    (@entry $feat:literal, $entry:ident($($arg:ident: $t:ty),*) $(-> $ret:ty)?
        = $($kernel:tt)+) => {
        #[doc = concat!("`generic::", stringify!($($kernel)+), "` compiled with `", $feat, "`.")]
        ///
        /// # Safety
        /// The CPU has these features (the table is handed out only then); the shapes are the
        /// table wrapper's, which checked them.
        #[target_feature(enable = $feat)]
        unsafe fn $entry($($arg: $t),*) $(-> $ret)? {
            // SAFETY: the features are enabled in this function, the shapes were checked.
            unsafe { $crate::simd::generic::$($kernel)+($($arg),*) }
        }
    };
}

////////////////////////////////// drivers //////////////////////////////////

/// The reduction skeleton (module comment) over `n` elements, for `K` sums at once: `step`
/// adds the `EPR` elements at offset `o` to its accumulator of each sum, `one` element `i`
/// of the leftovers to each sum. The `K` chains are independent, so each has the bits a
/// reduction of its own would have, while their multiply-adds overlap.
///
/// # Safety
/// `V`'s features are enabled. `fold` calls `step` only with `o + EPR <= n`.
#[inline(always)]
unsafe fn fold<V: F32Vec, const K: usize>(
    n: usize,
    step: impl Fn(&mut [V; K], usize),
    one: impl Fn(&mut [f32; K], usize),
) -> [f32; K] {
    let np = n & !(V::STEP - 1);
    let mut sums = [0f32; K];
    if np > 0 {
        // SAFETY: features by the caller; register arithmetic only.
        let mut acc = [[unsafe { V::splat(0.0) }; K]; ARR];
        let mut i = 0;
        while i < np {
            for (j, a) in acc.iter_mut().enumerate() {
                step(a, i + j * V::EPR);
            }
            i += V::STEP;
        }
        for (k, s) in sums.iter_mut().enumerate() {
            // SAFETY: as above.
            *s = unsafe { V::reduce_sum(std::array::from_fn(|j| acc[j][k])) };
        }
    }
    // leftovers (all of a slice shorter than one step: the scalar chain from +0)
    for i in np..n {
        one(&mut sums, i);
    }
    sums
}

/// The element-wise skeleton over `n = min(src.len(), dst.len())` elements: `step` maps the
/// `EPR` elements at `src + o` onto `dst + o` in whole steps, `one` each leftover element
/// (given its source and its old destination value).
///
/// # Safety
/// `V`'s features are enabled. `zip_map` calls `step` only with pointers to `EPR` elements
/// of `src` and of `dst` (exclusively borrowed).
#[inline(always)]
unsafe fn zip_map<V: F32Vec, S: Copy, D: Copy>(
    src: &[S],
    dst: &mut [D],
    step: impl Fn(*const S, *mut D),
    one: impl Fn(S, D) -> D,
) {
    let n = src.len().min(dst.len());
    let np = n & !(V::STEP - 1);
    let (ps, pd) = (src.as_ptr(), dst.as_mut_ptr());
    let mut i = 0;
    while i < np {
        for j in 0..ARR {
            let o = i + j * V::EPR;
            // SAFETY: o + EPR <= np <= n elements of both slices.
            step(unsafe { ps.add(o) }, unsafe { pd.add(o) });
        }
        i += V::STEP;
    }
    // leftovers
    for i in np..n {
        dst[i] = one(src[i], dst[i]);
    }
}

////////////////////////////////// kernels //////////////////////////////////

/// Σ a·b over `min(a.len(), b.len())` elements (the table's wrapper asserts equal lengths).
///
/// # Safety
/// `V`'s features are enabled.
#[inline(always)]
pub(crate) unsafe fn dot_f32<V: F32Vec>(a: &[f32], b: &[f32]) -> f32 {
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    // SAFETY: features by the caller; `fold` gives o + EPR <= n: both loads inside.
    let step = |[acc]: &mut [V; 1], o| unsafe {
        *acc = V::loadu(pa.add(o)).mul_add(V::loadu(pb.add(o)), *acc);
    };
    let one = |[s]: &mut [f32; 1], i: usize| *s = a[i].mul_add(b[i], *s);
    // SAFETY: features by the caller.
    unsafe { fold::<V, 1>(a.len().min(b.len()), step, one)[0] }
}

/// Per head of `dk`: `dot[h] = x_h·y_h` and `nx[h] = x_h·x_h`, each the bits [`dot_f32`]
/// gives on the head (decoded, for f16 rows), with both chains in one loop so that their
/// multiply-adds overlap.
///
/// # Safety
/// `V`'s features are enabled; `x` and `y` hold `dot.len()` heads of `dk`.
#[inline(always)]
pub(crate) unsafe fn head_dots<V: F32Vec, E: Elem>(
    x: &[E],
    y: &[E],
    dk: usize,
    dot: &mut [f32],
    nx: &mut [f32],
) {
    for (h, (d, n)) in dot.iter_mut().zip(nx.iter_mut()).enumerate() {
        let (xh, yh) = (&x[h * dk..(h + 1) * dk], &y[h * dk..(h + 1) * dk]);
        let (px, py) = (xh.as_ptr(), yh.as_ptr());
        // SAFETY: features by the caller; `fold` gives o + EPR <= dk: loads inside the heads.
        let step = |[ad, an]: &mut [V; 2], o| unsafe {
            let vx = E::load::<V>(px.add(o));
            *ad = vx.mul_add(E::load::<V>(py.add(o)), *ad);
            *an = vx.mul_add(vx, *an);
        };
        let one = |[sd, sn]: &mut [f32; 2], i: usize| {
            let (a, b) = (xh[i].wide(), yh[i].wide());
            *sd = a.mul_add(b, *sd);
            *sn = a.mul_add(a, *sn);
        };
        // SAFETY: features by the caller.
        [*d, *n] = unsafe { fold::<V, 2>(dk, step, one) };
    }
}

/// [`head_dots`] of one row against two: `dy[h] = x_h·y_h`, `dz[h] = x_h·z_h` and
/// `nx[h] = x_h·x_h`, three independent chains in one loop, so `x` is loaded once; each has
/// the bits [`dot_f32`] gives on the head.
///
/// # Safety
/// `V`'s features are enabled; `x`, `y` and `z` hold `nx.len()` heads of `dk`.
#[inline(always)]
pub(crate) unsafe fn head_dots2<V: F32Vec, E: Elem>(
    x: &[E],
    y: &[E],
    z: &[E],
    dk: usize,
    dy: &mut [f32],
    dz: &mut [f32],
    nx: &mut [f32],
) {
    for h in 0..nx.len() {
        let r = h * dk..(h + 1) * dk;
        let (xh, yh, zh) = (&x[r.clone()], &y[r.clone()], &z[r]);
        let (px, py, pz) = (xh.as_ptr(), yh.as_ptr(), zh.as_ptr());
        // SAFETY: features by the caller; `fold` gives o + EPR <= dk: loads inside the heads.
        let step = |[ay, az, an]: &mut [V; 3], o| unsafe {
            let vx = E::load::<V>(px.add(o));
            *ay = vx.mul_add(E::load::<V>(py.add(o)), *ay);
            *az = vx.mul_add(E::load::<V>(pz.add(o)), *az);
            *an = vx.mul_add(vx, *an);
        };
        let one = |[sy, sz, sn]: &mut [f32; 3], i: usize| {
            let a = xh[i].wide();
            *sy = a.mul_add(yh[i].wide(), *sy);
            *sz = a.mul_add(zh[i].wide(), *sz);
            *sn = a.mul_add(a, *sn);
        };
        // SAFETY: features by the caller.
        [dy[h], dz[h], nx[h]] = unsafe { fold::<V, 3>(dk, step, one) };
    }
}

/// Per head of `dk`: `nx[h] = x_h·x_h`, the bits [`dot_f32`] gives on the head.
///
/// # Safety
/// `V`'s features are enabled; `x` holds `nx.len()` heads of `dk`.
#[inline(always)]
pub(crate) unsafe fn head_norms<V: F32Vec, E: Elem>(x: &[E], dk: usize, nx: &mut [f32]) {
    for (h, n) in nx.iter_mut().enumerate() {
        let xh = &x[h * dk..(h + 1) * dk];
        let px = xh.as_ptr();
        // SAFETY: features by the caller; `fold` gives o + EPR <= dk: loads inside the head.
        let step = |[an]: &mut [V; 1], o| unsafe {
            let vx = E::load::<V>(px.add(o));
            *an = vx.mul_add(vx, *an);
        };
        let one = |[sn]: &mut [f32; 1], i: usize| {
            let a = xh[i].wide();
            *sn = a.mul_add(a, *sn);
        };
        // SAFETY: features by the caller.
        [*n] = unsafe { fold::<V, 1>(dk, step, one) };
    }
}

/// Σ a·b over f16 bit patterns, each widened exactly, accumulated in f32.
///
/// # Safety
/// `V`'s features are enabled.
#[inline(always)]
pub(crate) unsafe fn dot_f16<V: F32Vec>(a: &[u16], b: &[u16]) -> f32 {
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let wide = |h: u16| f16::from_bits(h).to_f32();
    // SAFETY: features by the caller; `fold` gives o + EPR <= n: both loads inside.
    let step = |[acc]: &mut [V; 1], o| unsafe {
        *acc = V::load_f16(pa.add(o)).mul_add(V::load_f16(pb.add(o)), *acc);
    };
    let one = |[s]: &mut [f32; 1], i: usize| *s = wide(a[i]).mul_add(wide(b[i]), *s);
    // SAFETY: features by the caller.
    unsafe { fold::<V, 1>(a.len().min(b.len()), step, one)[0] }
}

/// Σ (a−b)².
///
/// # Safety
/// `V`'s features are enabled.
#[inline(always)]
pub(crate) unsafe fn sqdist_f32<V: F32Vec>(a: &[f32], b: &[f32]) -> f32 {
    // SAFETY: forwarded.
    unsafe { sqdist::<V, f32, f32>(a, b) }
}

/// Σ (a−b)² over `min(a.len(), b.len())` elements, each side of either element type.
///
/// # Safety
/// `V`'s features are enabled.
#[inline(always)]
unsafe fn sqdist<V: F32Vec, A: Elem, B: Elem>(a: &[A], b: &[B]) -> f32 {
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    // SAFETY: features by the caller; `fold` gives o + EPR <= n: both loads inside.
    let step = |[acc]: &mut [V; 1], o| unsafe {
        let d = A::load::<V>(pa.add(o)).sub(B::load::<V>(pb.add(o)));
        *acc = d.mul_add(d, *acc);
    };
    let one = |[s]: &mut [f32; 1], i: usize| {
        let d = a[i].wide() - b[i].wide();
        *s = d.mul_add(d, *s);
    };
    // SAFETY: features by the caller.
    unsafe { fold::<V, 1>(a.len().min(b.len()), step, one)[0] }
}

/// `src` widened to f32 into `dst` (as long), exactly.
///
/// # Safety
/// `V`'s features are enabled.
#[inline(always)]
unsafe fn widen<V: F32Vec, E: Elem>(src: &[E], dst: &mut [f32]) {
    // SAFETY: features by the caller; `zip_map` gives EPR elements of `src` and `dst`.
    let step = |s, d| unsafe { E::load::<V>(s).storeu(d) };
    // SAFETY: features by the caller.
    unsafe { zip_map::<V, E, f32>(src, dst, step, |s, _| s.wide()) }
}

/// [`super::Kernels::head_sqdists_f16`]: for each head `h` (of `d`) and row `j` of `rows`,
/// `d2[h·m + j] = Σ (rows[jp]_h − rows[j]_h)²`, read in place; the bits of
/// [`head_sqdists_f32`] on the rows decoded into one buffer.
///
/// # Safety
/// `V`'s features are enabled; the shapes of [`super::Kernels::head_sqdists_f16`].
#[inline(always)]
pub(crate) unsafe fn head_sqdists_rows<V: F32Vec, E: Elem>(
    rows: &[&[E]],
    d: usize,
    jp: usize,
    d2: &mut [f32],
) {
    let m = rows.len();
    let n_head = rows[0].len() / d;
    // The pivot's head is widened once and read as f32 against every member: the widening is
    // exact, so each distance has the bits of the one between the two rows as they lie, and
    // the pivot is not converted again per member.
    let mut piv = vec![0f32; d];
    for h in 0..n_head {
        let head = |j: usize| &rows[j][h * d..(h + 1) * d];
        // SAFETY: features by the caller.
        unsafe { widen::<V, E>(head(jp), &mut piv) };
        for j in 0..m {
            // SAFETY: features by the caller.
            d2[h * m + j] = unsafe { sqdist::<V, f32, E>(&piv, head(j)) };
        }
    }
}

/// [`scalar::head_sqdists_body`] on [`sqdist_f32`].
///
/// # Safety
/// `V`'s features are enabled; the shapes of [`super::Kernels::head_sqdists_f32`].
#[inline(always)]
pub(crate) unsafe fn head_sqdists_f32<V: F32Vec>(
    rows: &[f32],
    width: usize,
    d: usize,
    jp: usize,
    d2: &mut [f32],
) {
    // SAFETY: features by the caller.
    scalar::head_sqdists_body(rows, width, d, jp, d2, |a, b| unsafe {
        sqdist_f32::<V>(a, b)
    });
}

/// y += a·x, one fused multiply-add per element (bit-identical to the scalar kernel).
///
/// # Safety
/// `V`'s features are enabled.
#[inline(always)]
pub(crate) unsafe fn axpy_f32<V: F32Vec>(y: &mut [f32], a: f32, x: &[f32]) {
    // SAFETY: features by the caller.
    let va = unsafe { V::splat(a) };
    // SAFETY: features by the caller; `zip_map` gives EPR elements of `x` and `y`.
    let step = |px, py: *mut f32| unsafe { va.mul_add(V::loadu(px), V::loadu(py)).storeu(py) };
    // SAFETY: features by the caller.
    unsafe { zip_map::<V, f32, f32>(x, y, step, |xi, yi| a.mul_add(xi, yi)) }
}

/// Per head `h` (of `d`) of `out`: `out_h = Σ_j w[h·m + j] · rows_j,h`, each block of `STEP`
/// outputs kept in registers over all members: the same fused multiply-add per element and
/// member, in member order from +0, as `out` zeroed and one [`axpy_f32`] per member
/// ([`scalar::weighted_heads_body`]), without loading and storing `out` once per member.
///
/// # Safety
/// `V`'s features are enabled; the shapes of [`super::Kernels::weighted_heads_f32`].
#[inline(always)]
pub(crate) unsafe fn weighted_heads_f32<V: F32Vec>(
    rows: &[f32],
    d: usize,
    w: &[f32],
    out: &mut [f32],
) {
    let width = out.len();
    // SAFETY: forwarded; row j is `rows[j·width ..]`, which the wrapper checked.
    unsafe { weighted_heads::<V, f32>(|j| &rows[j * width..(j + 1) * width], d, w, out) }
}

/// [`weighted_heads_f32`] over rows given one slice each, read in place (f16 widened as
/// loaded): the bits of the f32 kernel on the rows decoded into one buffer.
///
/// # Safety
/// `V`'s features are enabled; the shapes of [`super::Kernels::weighted_heads_f16`].
#[inline(always)]
pub(crate) unsafe fn weighted_heads_rows<V: F32Vec, E: Elem>(
    rows: &[&[E]],
    d: usize,
    w: &[f32],
    out: &mut [f32],
) {
    // SAFETY: forwarded.
    unsafe { weighted_heads::<V, E>(|j| rows[j], d, w, out) }
}

/// One step (`STEP` outputs) at `at` (row offset): `out[at..] = Σ_j wh[j] · row(j)[at..]`,
/// one fused multiply-add chain per element in member order from +0.
///
/// # Safety
/// `V`'s features are enabled; every `row(j)` and `out` hold `at + STEP` elements.
#[inline(always)]
unsafe fn weighted_block<'r, V: F32Vec, E: Elem + 'r>(
    row: &impl Fn(usize) -> &'r [E],
    wh: &[f32],
    at: usize,
    po: *mut f32,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        let mut acc = [V::splat(0.0); ARR];
        for (j, &wj) in wh.iter().enumerate() {
            let vw = V::splat(wj);
            let src = row(j).as_ptr().add(at);
            for (k, a) in acc.iter_mut().enumerate() {
                *a = vw.mul_add(E::load::<V>(src.add(k * V::EPR)), *a);
            }
        }
        for (k, a) in acc.iter().enumerate() {
            a.storeu(po.add(at + k * V::EPR));
        }
    }
}

/// The body of both: `row(j)` is member `j`'s row, at least `out.len()` wide.
///
/// # Safety
/// `V`'s features are enabled; `w` holds `m` weights per head of `out` and `row(j)` is at
/// least `out.len()` long for every `j < m`.
#[inline(always)]
unsafe fn weighted_heads<'r, V: F32Vec, E: Elem + 'r>(
    row: impl Fn(usize) -> &'r [E],
    d: usize,
    w: &[f32],
    out: &mut [f32],
) {
    let width = out.len();
    let n_head = width / d;
    let m = w.len() / n_head;
    let np = d & !(V::STEP - 1);
    let po = out.as_mut_ptr();
    for h in 0..n_head {
        let wh = &w[h * m..(h + 1) * m];
        let mut i = 0;
        while i < np {
            // SAFETY: features by the caller; the block ends at i + STEP <= np <= d inside head
            // h, and every row and `out` are at least `width` long (the caller's contract).
            unsafe { weighted_block::<V, E>(&row, wh, h * d + i, po) };
            i += V::STEP;
        }
        // leftovers
        for i in np..d {
            let mut s = 0f32;
            for (j, &wj) in wh.iter().enumerate() {
                s = wj.mul_add(row(j)[h * d + i].wide(), s);
            }
            out[h * d + i] = s;
        }
    }
}

/// f16 bit patterns to f32, exact (a signalling NaN comes out quiet, as in `half`).
///
/// # Safety
/// `V`'s features are enabled.
#[inline(always)]
pub(crate) unsafe fn f16_to_f32<V: F32Vec>(src: &[u16], dst: &mut [f32]) {
    // SAFETY: features by the caller; `zip_map` gives EPR elements of `src` and `dst`.
    let step = |s, d| unsafe { V::load_f16(s).storeu(d) };
    // SAFETY: features by the caller.
    unsafe { zip_map::<V, u16, f32>(src, dst, step, |s, _| f16::from_bits(s).to_f32()) }
}

/// f32 to f16 bit patterns, round to nearest even (ggml's `GGML_CPU_FP32_TO_FP16`); equal to
/// `half::f16::from_f32` for every non-NaN input.
///
/// # Safety
/// `V`'s features are enabled.
#[inline(always)]
pub(crate) unsafe fn f32_to_f16<V: F32Vec>(src: &[f32], dst: &mut [u16]) {
    // SAFETY: features by the caller; `zip_map` gives EPR elements of `src` and `dst`.
    let step = |s, d| unsafe { V::loadu(s).store_f16(d) };
    // SAFETY: features by the caller.
    unsafe { zip_map::<V, f32, u16>(src, dst, step, |s, _| f16::from_f32(s).to_bits()) }
}

/// bf16 bit patterns to f32, exact: the 16 bits become the high half of the f32. A NaN also
/// gets its quiet bit set, as `half::bf16::to_f32` (the scalar reference) does; ggml's plain
/// shift would keep a signalling NaN signalling.
///
/// # Safety
/// `V`'s features are enabled.
#[inline(always)]
pub(crate) unsafe fn bf16_to_f32<V: F32Vec>(src: &[u16], dst: &mut [f32]) {
    // SAFETY: features by the caller; `zip_map` gives EPR elements of `src` and `dst`.
    let step = |s, d| unsafe { V::load_bf16(s).storeu(d) };
    // SAFETY: features by the caller.
    unsafe { zip_map::<V, u16, f32>(src, dst, step, |s, _| bf16::from_bits(s).to_f32()) }
}

/// f32 to bf16 with ggml's rounding (nearest even, NaN made quiet); bit-identical to
/// `scalar::f32_to_bf16_one` for every input.
///
/// # Safety
/// `V`'s features are enabled.
#[inline(always)]
pub(crate) unsafe fn f32_to_bf16<V: F32Vec>(src: &[f32], dst: &mut [u16]) {
    // SAFETY: features by the caller; `zip_map` gives EPR elements of `src` and `dst`.
    let step = |s, d| unsafe { V::loadu(s).store_bf16(d) };
    // SAFETY: features by the caller.
    unsafe { zip_map::<V, f32, u16>(src, dst, step, |s, _| scalar::f32_to_bf16_one(s)) }
}

/// `acc += softmax(kq_scale·logit + bias)`: the scalar table's code, compiled under the
/// entry's features, where each pass runs a register of lanes per instruction; the same bits
/// (it has no multiply-add to contract).
///
/// # Safety
/// None; `unsafe` to fit the entries.
#[inline(always)]
pub(crate) unsafe fn softmax_acc(
    logit: &mut [f32],
    kq_scale: f32,
    bias: Option<&[f32]>,
    acc: &mut [f32],
) {
    scalar::softmax_acc_body(logit, kq_scale, bias, acc);
}

////////////////////////////////// qk_t_f32 //////////////////////////////////

/// Where one register block of [`qk_t_f32`] works: query rows `r0..` of `q` (`d` wide),
/// columns `ko..` of `panel`, output cells `(r0+a)·n + i0 + ko..` of `out`.
#[derive(Clone, Copy)]
struct QkAt<'a> {
    q: &'a [f32],
    d: usize,
    panel: &'a [f32],
    n: usize,
    r0: usize,
    i0: usize,
    ko: usize,
}

/// One block of `MQ` queries × `NV` registers of keys: query rows `r0..`, panel columns
/// `ko..` (output columns `i0 + ko..`). The `MQ·NV` accumulators stay in registers for the
/// whole channel loop, so each key register loaded serves `MQ` queries and nothing is reduced
/// horizontally; each lane runs the scalar's fused chain over the channels.
///
/// # Safety
/// `V`'s features are enabled; rows `r0..r0+MQ` of `q` exist, `panel` is one whole panel
/// (`QK_PANEL·d` floats), `ko + NV·EPR <= QK_PANEL` and `out` has the cells
/// `(r0+a)·n + i0 + ko ..+NV·EPR`.
#[inline(always)]
unsafe fn qk_block<V: F32Vec, const MQ: usize, const NV: usize>(at: QkAt, out: &mut [f32]) {
    let (d, n, r0, i0, ko) = (at.d, at.n, at.r0, at.i0, at.ko);
    let (pq, pk, po) = (at.q.as_ptr(), at.panel.as_ptr(), out.as_mut_ptr());
    // SAFETY: features by the caller; every load reads panel[j·P + ko + v·EPR ..+EPR]
    // with ko + NV·EPR <= P, every q read one float of rows r0..r0+MQ, every store EPR
    // floats of out inside the caller's bounds; unaligned loads and stores are fine.
    unsafe {
        let mut acc = [[V::splat(0.0); NV]; MQ];
        for j in 0..d {
            let mut k = [V::splat(0.0); NV];
            for (v, kv) in k.iter_mut().enumerate() {
                *kv = V::loadu(pk.add(j * QK_PANEL + ko + v * V::EPR));
            }
            for (a, row) in acc.iter_mut().enumerate() {
                let qb = V::splat(*pq.add((r0 + a) * d + j));
                for (s, kv) in row.iter_mut().zip(&k) {
                    *s = qb.mul_add(*kv, *s);
                }
            }
        }
        for (a, row) in acc.iter().enumerate() {
            for (v, s) in row.iter().enumerate() {
                s.storeu(po.add((r0 + a) * n + i0 + ko + v * V::EPR));
            }
        }
    }
}

/// Queries against keys packed in panels (see [`super::Kernels::qk_t_f32`]), bit-identical
/// to `qk_t_f32_scalar`: one panel (16 keys, `16·d` contiguous floats) at a time goes through
/// every query row, 4 rows per block, while it sits in L1; a whole panel is `NV` registers
/// wide, a last, partial panel goes one register of keys at a time, then key by key with the
/// scalar chain.
///
/// # Safety
/// `V`'s features are enabled; `NV·EPR == QK_PANEL`; `d`, `m = q.len()/d` and
/// `n = out.len()/m` are non-zero and `kt` holds every panel (the table's wrapper checked).
#[inline(always)]
pub(crate) unsafe fn qk_t_f32<V: F32Vec, const NV: usize>(
    q: &[f32],
    d: usize,
    kt: &[f32],
    out: &mut [f32],
) {
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
            ($nv:tt) => {
                at.r0 = 0;
                while at.r0 + 4 <= m {
                    // SAFETY: see above.
                    unsafe { qk_block::<V, 4, $nv>(at, out) };
                    at.r0 += 4;
                }
                while at.r0 < m {
                    // SAFETY: see above.
                    unsafe { qk_block::<V, 1, $nv>(at, out) };
                    at.r0 += 1;
                }
            };
        }
        if w == QK_PANEL {
            rows!(NV);
            at.ko = QK_PANEL;
        }
        while at.ko + V::EPR <= w {
            rows!(1);
            at.ko += V::EPR;
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

/// The register block of one ISA's `pack_keys_f16` (a transpose, which the ISAs write
/// differently), for [`pack_keys_f16`].
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

/// f16 keys into one panel (see `pack_keys_f16_scalar`), bit-identical to it: whole `W × W`
/// blocks of rows and channels in registers, the leftover channels and rows with the scalar
/// code.
///
/// # Safety
/// `B`'s features are enabled; `rows.len() <= QK_PANEL` and every row holds
/// `panel.len() / QK_PANEL` channels (the table's wrapper checked).
#[inline(always)]
pub(crate) unsafe fn pack_keys_f16<B: PackBlock>(rows: &[&[u16]], panel: &mut [f32]) {
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
