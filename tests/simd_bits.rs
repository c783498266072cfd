//! Each kernel table's exact output bits, pinned.
//!
//! `simd_props.rs` holds the reductions of the ISA tables to a tolerance, because their
//! accumulation order (ggml's STEP/EPR/ARR registers, then a fixed reduction) differs from the
//! scalar chain. That order is part of the contract all the same: a merge's result must not
//! change when the kernels are rewritten. So every kernel of every table runs here on fixed
//! inputs (every length 0..=300 at several offsets, and head shapes around the register
//! widths), and a hash of all output bits is compared with the value the kernels gave when
//! they were written out per ISA (commit 9aaed28). A change of accumulation order, rounding
//! or tail handling shows as a different hash; update a value only for an intended change.
//!
//! `KVM_PRINT_BITS=1 cargo test --test simd_bits -- --nocapture` prints the hashes.

use half::f16;
use kvmerger::simd::{Kernels, QK_PANEL};

/// The hash of every table this build can run, by table name.
const EXPECTED: &[(&str, u64)] = &[
    ("scalar", 0xb18a7b11697ce948),
    ("avx2", 0x12e045da0ff1e389),
    ("neon", 0x40d6c82b3289ec74),
];

/// splitmix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Values of varied magnitude (2^-8 .. 2^8) and sign, so sums round in many places.
    fn f32(&mut self) -> f32 {
        let r = self.next();
        let m = (r >> 40) as f32 / (1u64 << 24) as f32 + 0.5;
        let e = ((r >> 8) % 17) as i32 - 8;
        let s = if r & 1 == 0 { 1.0 } else { -1.0 };
        s * m * 2f32.powi(e)
    }

    fn f32s(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f32()).collect()
    }

    /// Any finite f16 bit pattern: an infinity would make NaNs, whose sign and payload are
    /// the hardware's business (x86 and ARM differ), not the kernels'.
    fn f16_bits(&mut self) -> u16 {
        loop {
            let b = self.next() as u16;
            if f16::from_bits(b).is_finite() {
                return b;
            }
        }
    }

    /// Any bf16 bit pattern (NaN quieting is exact integer work in every table).
    fn bf16_bits(&mut self) -> u16 {
        self.next() as u16
    }
}

/// FNV-1a over 32-bit words.
struct Hash(u64);

impl Hash {
    fn word(&mut self, w: u32) {
        for b in w.to_le_bytes() {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    fn f32s(&mut self, x: &[f32]) {
        x.iter().for_each(|v| self.word(v.to_bits()));
    }
    fn u16s(&mut self, x: &[u16]) {
        x.iter().for_each(|&v| self.word(v as u32));
    }
}

/// Every kernel of `k` on the fixed inputs, hashed.
fn table_hash(k: &Kernels) -> u64 {
    let mut g = Rng(0x1234_5678_9abc_def0);
    let mut h = Hash(0xcbf2_9ce4_8422_2325);
    for n in 0..=300usize {
        for off in [0usize, 1, 3] {
            let a = g.f32s(n + off);
            let b = g.f32s(n + off);
            let (a, b) = (&a[off..], &b[off..]);
            h.word(k.dot_f32(a, b).to_bits());
            h.word(k.sqdist_f32(a, b).to_bits());
            let ha: Vec<u16> = (0..n).map(|_| g.f16_bits()).collect();
            let hb: Vec<u16> = (0..n).map(|_| g.f16_bits()).collect();
            h.word(k.dot_f16(&ha, &hb).to_bits());

            let mut y = b.to_vec();
            k.axpy_f32(&mut y, g.f32(), a);
            h.f32s(&y);

            let mut w = vec![0f32; n];
            k.f16_to_f32(&ha, &mut w);
            h.f32s(&w);
            let mut hw = vec![0u16; n];
            k.f32_to_f16(a, &mut hw);
            h.u16s(&hw);
            let bb: Vec<u16> = (0..n).map(|_| g.bf16_bits()).collect();
            k.bf16_to_f32(&bb, &mut w);
            h.f32s(&w);
            // f32 to bf16 of any bit pattern, NaNs included (integer rounding everywhere)
            let raw: Vec<f32> = (0..n).map(|_| f32::from_bits(g.next() as u32)).collect();
            k.f32_to_bf16(&raw, &mut hw);
            h.u16s(&hw);

            let mut logit = a.to_vec();
            let mut acc = b.to_vec();
            k.softmax_acc(&mut logit, 0.125, Some(b), &mut acc);
            h.f32s(&acc);
        }
    }
    for n_head in 1..=3usize {
        for d in [
            1usize, 3, 4, 7, 8, 9, 15, 16, 17, 31, 32, 33, 40, 64, 65, 80, 128,
        ] {
            let width = n_head * d;
            let x = g.f32s(width);
            let y = g.f32s(width);
            let mut dot = vec![0f32; n_head];
            let mut nx = vec![0f32; n_head];
            k.head_dots_f32(&x, &y, d, &mut dot, &mut nx);
            h.f32s(&dot);
            h.f32s(&nx);
            for m in 1..=5usize {
                let rows = g.f32s(m * width);
                let mut d2 = vec![0f32; n_head * m];
                k.head_sqdists_f32(&rows, width, d, m / 2, &mut d2);
                h.f32s(&d2);
                let wts = g.f32s(n_head * m);
                let mut out = g.f32s(width);
                k.weighted_heads_f32(&rows, d, &wts, &mut out);
                h.f32s(&out);
            }
        }
    }
    for d in [1usize, 4, 7, 8, 9, 16, 33, 64] {
        for nk in [1usize, 3, 8, 15, 16, 17, 33, 40] {
            let np = nk.div_ceil(QK_PANEL);
            let mut kt = vec![0f32; np * QK_PANEL * d];
            let keys: Vec<Vec<u16>> = (0..nk)
                .map(|_| (0..d).map(|_| g.f16_bits()).collect())
                .collect();
            for (p, panel) in kt.chunks_exact_mut(QK_PANEL * d).enumerate() {
                let rows: Vec<&[u16]> = keys[p * QK_PANEL..nk.min((p + 1) * QK_PANEL)]
                    .iter()
                    .map(|r| r.as_slice())
                    .collect();
                k.pack_keys_f16(&rows, panel);
            }
            h.f32s(&kt);
            for m in [1usize, 3, 4, 5, 9] {
                let q = g.f32s(m * d);
                let mut out = vec![0f32; m * nk];
                k.qk_t_f32(&q, d, &kt, &mut out);
                h.f32s(&out);
            }
        }
    }
    h.0
}

#[test]
fn every_table_gives_its_pinned_bits() {
    let got: Vec<(&str, u64)> = Kernels::all_available()
        .into_iter()
        .map(|k| (k.name, table_hash(k)))
        .collect();
    if std::env::var_os("KVM_PRINT_BITS").is_some() {
        for (name, h) in &got {
            eprintln!("    (\"{name}\", {h:#018x}),");
        }
    }
    for (name, h) in got {
        let want = EXPECTED
            .iter()
            .find(|(n, _)| *n == name)
            .map(|e| e.1)
            .unwrap_or_else(|| panic!("no pinned hash for table {name}"));
        assert_eq!(h, want, "table {name}: bits changed ({h:#018x})");
    }
}
