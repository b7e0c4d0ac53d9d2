//! A port of PyTorch's CPU random generator, so that a seed gives the same noise as
//! `torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))` (what diffusers,
//! A1111 and ComfyUI do by default).
//!
//! Mirrors (in behaviour, not code) these ATen files:
//! - `aten/src/ATen/core/MT19937RNGEngine.h`: `at::mt19937`, a plain MT19937 seeded with the low
//!   32 bits of the seed; `random64()` is two 32-bit draws, the first one the high half.
//! - `aten/src/ATen/CPUGeneratorImpl.cpp`: `manual_seed` also clears the cached second
//!   Box–Muller sample.
//! - `aten/src/ATen/core/DistributionsHelper.h` / `TransformationHelper.h`: uniform floats are
//!   `(u32 & (2²⁴-1)) · 2⁻²⁴`, uniform doubles `(u64 & (2⁵³-1)) · 2⁻⁵³`; `normal_distribution`
//!   is Box–Muller in f64 that caches its second (sine) sample in the generator.
//! - `aten/src/ATen/native/cpu/DistributionTemplates.h`: `normal_kernel`. A contiguous f32
//!   tensor with at least 16 elements takes `normal_fill`: all uniforms are drawn first, then
//!   converted 16 at a time by Box–Muller on the pairs (j, j+8); when the size is not a multiple
//!   of 16 the last 16 values are drawn again and recomputed. Smaller tensors take the serial
//!   path, one `normal_distribution<double>` sample per element, which uses (and leaves behind)
//!   the generator's cached sample.
//! - `aten/src/ATen/native/cpu/avx_mathfun.h`: x86 builds of PyTorch run `normal_fill` through
//!   `normal_fill_AVX2`, whose `log256_ps` / `sincos256_ps` are Cephes f32 polynomials compiled
//!   with FMA contraction. libm's `logf`/`cosf` differ from them by an ulp or more (up to ~1e-4
//!   relative near the zeros of cos/sin), so those polynomials are reproduced lane by lane here.

use super::NoiseSource;
use crate::error::Result;

const MT_N: usize = 624;
const MT_M: usize = 397;

/// `at::mt19937`: the standard 32-bit Mersenne Twister.
#[derive(Clone)]
struct Mt19937 {
    state: Box<[u32; MT_N]>,
    /// Index of the next state word to temper; `MT_N` means "twist first".
    next: usize,
}

impl Mt19937 {
    fn new(seed: u64) -> Self {
        let mut state = Box::new([0u32; MT_N]);
        // ATen keeps only the low 32 bits of the 64-bit seed.
        state[0] = seed as u32;
        for i in 1..MT_N {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        Self { state, next: MT_N }
    }

    fn twist(&mut self) {
        for i in 0..MT_N {
            let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % MT_N] & 0x7fff_ffff);
            let mag = if y & 1 == 1 { 0x9908_b0df } else { 0 };
            self.state[i] = self.state[(i + MT_M) % MT_N] ^ (y >> 1) ^ mag;
        }
        self.next = 0;
    }

    fn next_u32(&mut self) -> u32 {
        if self.next >= MT_N {
            self.twist();
        }
        let mut y = self.state[self.next];
        self.next += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }
}

/// `torch.Generator("cpu")` after `manual_seed(seed)`.
///
/// [`TorchGenerator::randn`] reproduces `torch.randn(shape, dtype=torch.float32)` on that
/// generator, including the state carried from one call to the next, so a sequence of calls
/// gives the same values as the same sequence in PyTorch.
#[derive(Clone)]
pub struct TorchGenerator {
    engine: Mt19937,
    seed: u64,
    /// Box–Muller's second sample, kept by `normal_distribution<double>` for its next call.
    next_double_normal: Option<f64>,
}

impl std::fmt::Debug for TorchGenerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TorchGenerator")
            .field("seed", &self.seed)
            .finish_non_exhaustive()
    }
}

impl TorchGenerator {
    /// A generator seeded as `torch.Generator("cpu").manual_seed(seed)`. Python's negative
    /// seeds are their two's-complement `u64` (as PyTorch converts them).
    pub fn new(seed: u64) -> Self {
        Self {
            engine: Mt19937::new(seed),
            seed,
            next_double_normal: None,
        }
    }

    /// The seed this generator was created with (`initial_seed()`).
    pub fn initial_seed(&self) -> u64 {
        self.seed
    }

    /// One 32-bit draw (`CPUGeneratorImpl::random`).
    pub fn random_u32(&mut self) -> u32 {
        self.engine.next_u32()
    }

    /// One 64-bit draw (`CPUGeneratorImpl::random64`): the first 32-bit draw is the high half.
    pub fn random_u64(&mut self) -> u64 {
        let hi = u64::from(self.engine.next_u32());
        let lo = u64::from(self.engine.next_u32());
        (hi << 32) | lo
    }

    /// `uniform_real_distribution<float>(0, 1)`: 24 random bits.
    fn uniform_f32(&mut self) -> f32 {
        (self.random_u32() & 0x00ff_ffff) as f32 * (1.0 / 16_777_216.0)
    }

    /// `uniform_real_distribution<double>(0, 1)`: 53 random bits.
    fn uniform_f64(&mut self) -> f64 {
        (self.random_u64() & ((1u64 << 53) - 1)) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }

    /// `normal_distribution<double>(0, 1)`, with the generator's cached second sample.
    fn normal_f64(&mut self) -> f64 {
        if let Some(cached) = self.next_double_normal.take() {
            return cached;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let radius = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.next_double_normal = Some(radius * theta.sin());
        radius * theta.cos()
    }

    /// `torch.randn(shape, generator=self, dtype=torch.float32)`, flattened in row-major order.
    pub fn randn(&mut self, shape: &[usize]) -> Vec<f32> {
        let numel: usize = shape.iter().product();
        if numel >= 16 {
            self.normal_fill(numel)
        } else {
            // The serial kernel narrows each f64 sample to f32.
            (0..numel).map(|_| self.normal_f64() as f32).collect()
        }
    }

    /// ATen's `normal_fill` (its AVX2 variant) for `numel >= 16`.
    fn normal_fill(&mut self, numel: usize) -> Vec<f32> {
        let mut data: Vec<f32> = (0..numel).map(|_| self.uniform_f32()).collect();
        for chunk in data.chunks_exact_mut(16) {
            box_muller_16(chunk);
        }
        if !numel.is_multiple_of(16) {
            // The partial last chunk is redrawn as the full last 16 values, overlapping
            // (and overwriting) normals already computed by the previous chunk.
            let tail = &mut data[numel - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform_f32();
            }
            box_muller_16(tail);
        }
        data
    }
}

impl NoiseSource for TorchGenerator {
    fn randn(&mut self, shape: &[usize]) -> Result<Vec<f32>> {
        Ok(TorchGenerator::randn(self, shape))
    }
}

/// `normal_fill_16_AVX2` with mean 0 and std 1, one lane at a time: uniforms in `[0, 1)` at
/// `j` and `j + 8` become the cosine and sine normals of one Box–Muller pair.
fn box_muller_16(data: &mut [f32]) {
    // `_mm256_set1_ps(2.0f * c10::pi<double>)`: 2π rounded once to f32.
    let two_pi = (2.0 * std::f64::consts::PI) as f32;
    for j in 0..8 {
        let u1 = 1.0 - data[j]; // (0, 1], safe for log
        let u2 = data[j + 8];
        let radius = (-2.0 * cephes_logf(u1)).sqrt();
        let (sin, cos) = cephes_sincosf(two_pi * u2);
        // `_mm256_fmadd_ps(n, std, mean)` with std 1 and mean 0 is just `n`.
        data[j] = radius * cos;
        data[j + 8] = radius * sin;
    }
}

/// One lane of avx_mathfun's `log256_ps` (Cephes `logf`), for the inputs Box–Muller gives it:
/// finite and in `(0, 1]`. Where GCC contracts a multiply and an add into one FMA, `mul_add`
/// does the same; which product it fuses was checked against PyTorch's output.
fn cephes_logf(x: f32) -> f32 {
    const SQRTHF: f32 = std::f32::consts::FRAC_1_SQRT_2;
    // Polynomial coefficients, highest degree first.
    const P: [f32; 9] = [
        7.037_683_6e-2,
        -1.151_461e-1,
        1.167_699_84e-1,
        -1.242_014_1e-1,
        1.424_932_3e-1,
        -1.666_805_7e-1,
        2.000_071_4e-1,
        -2.499_999_4e-1,
        3.333_333e-1,
    ];
    const Q1: f32 = -2.121_944_4e-4;
    const Q2: f32 = 0.693_359_4;

    let bits = x.max(f32::MIN_POSITIVE).to_bits();
    // Split into exponent and a mantissa in [0.5, 1).
    let mut e = ((bits >> 23) as i32 - 0x7f) as f32 + 1.0;
    let mut m = f32::from_bits((bits & !0x7f80_0000) | 0x3f00_0000);
    if m < SQRTHF {
        e -= 1.0;
        m = (m - 1.0) + m;
    } else {
        m -= 1.0;
    }
    let z = m * m;
    let mut y = P[0];
    for &p in &P[1..] {
        y = y.mul_add(m, p);
    }
    y *= m;
    y = y.mul_add(z, e * Q1);
    y = (-z).mul_add(0.5, y);
    e.mul_add(Q2, m + y)
}

/// One lane of avx_mathfun's `sincos256_ps` (Cephes `sinf`/`cosf` with the extended-precision
/// reduction by π/4), for the finite, non-negative angles Box–Muller gives it. Returns
/// `(sin, cos)`.
fn cephes_sincosf(angle: f32) -> (f32, f32) {
    const FOUR_OVER_PI: f32 = 1.273_239_5;
    const DP1: f32 = -0.785_156_25;
    const DP2: f32 = -2.418_756_5e-4;
    const DP3: f32 = -3.774_895e-8;
    const SIN_P: [f32; 3] = [-1.951_529_6e-4, 8.332_161e-3, -1.666_665_5e-1];
    const COS_P: [f32; 3] = [2.443_315_7e-5, -1.388_731_6e-3, 4.166_664_6e-2];

    let sign_in = angle.to_bits() & 0x8000_0000;
    let mut x = angle.abs();
    // Octant index, rounded up to even (`j = (j + 1) & ~1` in Cephes).
    let octant = (((x * FOUR_OVER_PI) as i32) + 1) & !1;
    let y = octant as f32;
    let sin_sign = sign_in ^ (((octant & 4) as u32) << 29);
    let cos_sign = ((!(octant - 2) & 4) as u32) << 29;
    let use_sin_poly_for_sin = octant & 2 == 0;

    x = y.mul_add(DP1, x);
    x = y.mul_add(DP2, x);
    x = y.mul_add(DP3, x);
    let z = x * x;

    let mut cos_poly = COS_P[0];
    cos_poly = cos_poly.mul_add(z, COS_P[1]);
    cos_poly = cos_poly.mul_add(z, COS_P[2]);
    cos_poly *= z;
    cos_poly = cos_poly.mul_add(z, -(z * 0.5));
    cos_poly += 1.0;

    let mut sin_poly = SIN_P[0];
    sin_poly = sin_poly.mul_add(z, SIN_P[1]);
    sin_poly = sin_poly.mul_add(z, SIN_P[2]);
    sin_poly *= z;
    sin_poly = sin_poly.mul_add(x, x);

    let (sin, cos) = if use_sin_poly_for_sin {
        (sin_poly, cos_poly)
    } else {
        (cos_poly, sin_poly)
    };
    (
        f32::from_bits(sin.to_bits() ^ sin_sign),
        f32::from_bits(cos.to_bits() ^ cos_sign),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_matches_the_reference_stream() {
        // The 10000th output of std::mt19937 default-seeded with 5489 (C++11 [rand.predef]).
        let mut engine = Mt19937::new(5489);
        let mut last = 0;
        for _ in 0..10_000 {
            last = engine.next_u32();
        }
        assert_eq!(last, 4_123_659_995);
    }

    #[test]
    fn seed_uses_low_32_bits() {
        let mut a = TorchGenerator::new(5);
        let mut b = TorchGenerator::new((1u64 << 32) + 5);
        assert_eq!(a.random_u32(), b.random_u32());
    }

    #[test]
    fn small_draws_share_the_cached_sample() {
        // randn(1) twice uses one Box–Muller pair: the second value is the cached sine sample.
        let mut split = TorchGenerator::new(3);
        let first = split.randn(&[1]);
        let second = split.randn(&[1]);
        let mut joint = TorchGenerator::new(3);
        assert_eq!(joint.randn(&[2]), [first[0], second[0]]);
    }
}
