//! A tiny deterministic generator for the unit tests' inputs (a 64-bit LCG
//! with Knuth's MMIX constants), shared so each test does not carry its own.

pub(crate) struct Lcg(pub u64);

impl Lcg {
    /// The whole 64-bit state after one step: tests take bits from where
    /// they like (the high ones are the best).
    pub fn bits(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0
    }

    /// 31 high bits of the next state.
    pub fn next(&mut self) -> u64 {
        self.bits() >> 33
    }

    /// Uniform in [0, 1) with 24 bits.
    pub fn unit(&mut self) -> f32 {
        (self.next() >> 7) as f32 / (1u64 << 24) as f32
    }
}
