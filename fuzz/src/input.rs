//! Turning fuzz bytes into structure. Every draw goes through `arbitrary::Unstructured` and
//! falls back to zero when the bytes run out, so any input (the empty one too) is a complete
//! case and the fuzzer can grow a case a byte at a time.

use arbitrary::Unstructured;

pub struct In<'a>(pub Unstructured<'a>);

impl<'a> In<'a> {
    pub fn new(data: &'a [u8]) -> In<'a> {
        In(Unstructured::new(data))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn u8(&mut self) -> u8 {
        self.0.arbitrary().unwrap_or(0)
    }

    pub fn u16(&mut self) -> u16 {
        self.0.arbitrary().unwrap_or(0)
    }

    pub fn u32(&mut self) -> u32 {
        self.0.arbitrary().unwrap_or(0)
    }

    pub fn u64(&mut self) -> u64 {
        self.0.arbitrary().unwrap_or(0)
    }

    pub fn i64(&mut self) -> i64 {
        self.0.arbitrary().unwrap_or(0)
    }

    pub fn f32(&mut self) -> f32 {
        self.0.arbitrary().unwrap_or(0.0)
    }

    pub fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }

    /// Uniform-ish in `0..n` (0 when `n == 0`).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            self.u8() as usize % n
        }
    }

    /// Mostly a value from `nice` (the ones the library treats specially), now and then any
    /// f32, NaN and infinities included: refusals need the odd value, coverage the usual one.
    pub fn pick_f32(&mut self, nice: &[f32]) -> f32 {
        let b = self.u8();
        if b < 224 {
            nice[b as usize % nice.len()]
        } else {
            self.f32()
        }
    }

    /// Mostly `0..small`, now and then any u32 (overflow of sums and products).
    pub fn small_u32(&mut self, small: u32) -> u32 {
        let b = self.u8();
        if b < 240 {
            b as u32 % small.max(1)
        } else {
            [u32::MAX, u32::MAX - 1, 1 << 31, self.u32()][b as usize % 4]
        }
    }

    /// An enum field: one of `0..n` almost always, else a value none of the enums holds.
    pub fn enum_i32(&mut self, n: i32) -> i32 {
        let b = self.u8();
        if b < 250 {
            b as i32 % n
        } else {
            [-1, n, 99, i32::MIN, i32::MAX, n + 1][(b - 250) as usize]
        }
    }
}

/// Bulk contents (cache rows, queries) come from a seed so inputs stay small; the tests'
/// splitmix64.
pub use crate::common::Rng;

/// Values the kernels treat specially; `Fill::Specials` mixes them into rows.
pub const SPECIALS: [f32; 10] = [
    f32::NAN,
    f32::INFINITY,
    f32::NEG_INFINITY,
    0.0,
    -0.0,
    1e-40,
    65504.0,
    -70000.0,
    3.0e38,
    1e-8,
];
