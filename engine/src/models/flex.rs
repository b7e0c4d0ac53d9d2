//! Kernels of our own for Burn's CPU backend (flex), used where flex's generic ones leave the
//! machine idle: attention here, convolution in [`super::conv`]. Each runs on flex's buffers
//! directly (the tensor is recognised by downcasting Burn's primitive, so models stay generic
//! over the backend) and falls back to Burn's op for anything it does not cover.

use std::any::Any;

use burn::backend::flex::{FlexTensor, Layout};
use burn::tensor::activation::softmax;
use burn::tensor::{Bytes, DType, Shape, Tensor, TensorPrimitive, backend::Backend};
use rayon::prelude::*;

/// Query rows per attention task: small enough to spread a 64×64 latent's attention over many
/// threads, large enough for the GEMMs to run at full speed.
const QUERY_BLOCK: usize = 64;

/// The flex tensor behind `tensor`, when `B` is flex.
pub(crate) fn as_flex<B: Backend, const D: usize>(tensor: Tensor<B, D>) -> Option<FlexTensor> {
    match tensor.into_primitive() {
        TensorPrimitive::Float(primitive) => {
            let any: Box<dyn Any> = Box::new(primitive);
            any.downcast::<FlexTensor>().ok().map(|t| *t)
        }
        TensorPrimitive::QFloat(_) => None,
    }
}

/// A flex tensor as `B`'s tensor, when `B` is flex.
pub(crate) fn from_flex<B: Backend, const D: usize>(tensor: FlexTensor) -> Option<Tensor<B, D>> {
    let any: Box<dyn Any> = Box::new(tensor);
    let primitive = any.downcast::<B::FloatTensorPrimitive>().ok()?;
    Some(Tensor::from_primitive(TensorPrimitive::Float(*primitive)))
}

/// A 4-D f32 view: its buffer, offset and (non-negative) strides.
struct View<'a> {
    data: &'a [f32],
    offset: usize,
    strides: [usize; 4],
    dims: [usize; 4],
}

impl<'a> View<'a> {
    fn of(t: &'a FlexTensor) -> Option<Self> {
        let layout = t.layout();
        let dims: [usize; 4] = layout.shape().to_vec().try_into().ok()?;
        let strides: Vec<usize> = layout
            .strides()
            .iter()
            .map(|&s| usize::try_from(s).ok())
            .collect::<Option<_>>()?;
        let strides: [usize; 4] = strides.try_into().ok()?;
        let data = t.storage::<f32>();
        let offset = layout.start_offset();
        // Every element the kernels read lies inside the buffer.
        let last = dims
            .iter()
            .zip(&strides)
            .map(|(&d, &s)| d.saturating_sub(1) * s)
            .sum::<usize>();
        if dims.contains(&0) || offset + last >= data.len() {
            return None;
        }
        Some(Self {
            data,
            offset,
            strides,
            dims,
        })
    }

    /// Pointer to element `[b, h, row, 0]`.
    fn at(&self, b: usize, h: usize, row: usize) -> *const f32 {
        let i = self.offset + b * self.strides[0] + h * self.strides[1] + row * self.strides[2];
        self.data[i..].as_ptr()
    }
}

/// softmax(q kᵀ · scale) v for q `[n, heads, lq, d]`, k `[n, heads, lk, d]`, v
/// `[n, heads, lk, dv]` on flex, f32: per batch item and block of query rows, all heads, the
/// scores of the block only (`[64, lk]`, never the whole `[lq, lk]` matrix), softmax in place,
/// then the block's output, written straight into `[n, lq, heads, dv]` memory so merging the
/// heads afterwards costs nothing. Blocks run in parallel.
///
/// `None` (use Burn's op) when `B` is not flex, a tensor is not f32, or the shapes disagree.
pub fn flex_attention<B: Backend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    scale: f64,
) -> Option<Tensor<B, 4>> {
    if [q.dtype(), k.dtype(), v.dtype()] != [DType::F32; 3] {
        return None;
    }
    let (qt, kt, vt) = (
        as_flex(q.clone())?,
        as_flex(k.clone())?,
        as_flex(v.clone())?,
    );
    let (q, k, v) = (View::of(&qt)?, View::of(&kt)?, View::of(&vt)?);
    let [n, heads, lq, d] = q.dims;
    let [_, _, lk, dv] = v.dims;
    if k.dims != [n, heads, lk, d] || v.dims[..2] != [n, heads] {
        return None;
    }
    let mut out = vec![0f32; n * lq * heads * dv];
    let row_len = heads * dv;
    let blocks = out
        .par_chunks_mut(lq * row_len)
        .enumerate()
        .flat_map(|(b, item)| {
            item.par_chunks_mut(QUERY_BLOCK * row_len)
                .enumerate()
                .map(move |(block, chunk)| (b, block, chunk))
        });
    blocks.for_each(|(b, block, chunk)| {
        let q0 = block * QUERY_BLOCK;
        let rows = chunk.len() / row_len;
        let mut scores = vec![0f32; rows * lk];
        for h in 0..heads {
            // scores = scale · q_block · kᵀ
            // SAFETY: `View::of` checked that every [b, h, row, col] of q/k/v is inside its
            // buffer; q rows q0..q0+rows < lq; `scores` is rows × lk; the output block is
            // `chunk` (rows × heads·dv), head h's columns h·dv..(h+1)·dv.
            unsafe {
                gemm::gemm(
                    rows,
                    lk,
                    d,
                    scores.as_mut_ptr(),
                    1,
                    lk as isize,
                    false,
                    q.at(b, h, q0),
                    q.strides[3] as isize,
                    q.strides[2] as isize,
                    k.at(b, h, 0),
                    k.strides[2] as isize,
                    k.strides[3] as isize,
                    0.0,
                    scale as f32,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            for row in scores.chunks_mut(lk) {
                softmax_in_place(row);
            }
            // SAFETY: as above.
            unsafe {
                gemm::gemm(
                    rows,
                    dv,
                    lk,
                    chunk[h * dv..].as_mut_ptr(),
                    1,
                    row_len as isize,
                    false,
                    scores.as_ptr(),
                    1,
                    lk as isize,
                    v.at(b, h, 0),
                    v.strides[3] as isize,
                    v.strides[2] as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        }
    });
    // `[n, lq, heads, dv]` memory seen as `[n, heads, lq, dv]`.
    let layout = Layout::new(
        Shape::from(vec![n, heads, lq, dv]),
        vec![(lq * row_len) as isize, dv as isize, row_len as isize, 1],
        0,
    );
    from_flex(FlexTensor::new(Bytes::from_elems(out), layout, DType::F32))
}

/// Softmax over the last dimension. On flex in f32: rows in parallel with a vectorised `exp`,
/// in place when `x` holds its buffer alone (attention's freshly made scores: no second score
/// matrix, no copy; a shared buffer is copied first). Anything else: Burn's softmax.
pub fn flex_softmax_last_dim<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let dim = D.saturating_sub(1);
    if x.dtype() != DType::F32 {
        return softmax(x, dim);
    }
    let mut primitive = match x.into_primitive() {
        TensorPrimitive::Float(p) => p,
        q @ TensorPrimitive::QFloat(_) => return softmax(Tensor::from_primitive(q), dim),
    };
    let Some(t) = (&mut primitive as &mut dyn Any).downcast_mut::<FlexTensor>() else {
        return softmax(
            Tensor::from_primitive(TensorPrimitive::Float(primitive)),
            dim,
        );
    };
    // A contiguous tensor comes back sharing the buffer, and the old handle is dropped.
    *t = t.to_contiguous();
    let shape = t.layout().shape().clone();
    let n = shape.num_elements();
    if let Some(&row_len) = shape.to_vec().last().filter(|&&len| len > 0) {
        // Copy-on-write: in place unless another tensor shares the buffer.
        t.storage_mut::<f32>()[..n]
            .par_chunks_mut(row_len)
            .for_each(softmax_in_place);
    }
    Tensor::from_primitive(TensorPrimitive::Float(primitive))
}

/// GroupNorm over a contiguous `[batch, h, w, channels]` f32 tensor on flex: per batch item,
/// per-channel sums and sums of squares in f64 over row chunks in parallel, group statistics from
/// them, then `y = x·scale + shift` with per-channel scale = γ·rstd and shift = β − mean·scale,
/// rows in parallel. `None` (use the generic ops) when `B` is not flex or anything is not f32.
pub fn flex_group_norm_nhwc<B: Backend>(
    x: &Tensor<B, 4>,
    groups: usize,
    epsilon: f64,
    gamma: Option<Tensor<B, 1>>,
    beta: Option<Tensor<B, 1>>,
) -> Option<Tensor<B, 4>> {
    let [batch, h, w, c] = x.dims();
    if x.dtype() != DType::F32 || groups == 0 || c % groups != 0 {
        return None;
    }
    let input = as_flex(x.clone())?.to_contiguous();
    let affine = |p: Option<Tensor<B, 1>>, default: f32| -> Option<Vec<f32>> {
        match p {
            Some(p) if p.dtype() == DType::F32 => {
                Some(as_flex(p)?.to_contiguous().storage::<f32>().to_vec())
            }
            Some(_) => None,
            None => Some(vec![default; c]),
        }
    };
    let (gamma, beta) = (affine(gamma, 1.0)?, affine(beta, 0.0)?);
    if gamma.len() != c || beta.len() != c {
        return None;
    }
    let data = input.storage::<f32>();
    let pixels = h * w;
    let per_group = c / groups;
    let count = (pixels * per_group) as f64;
    let mut out = vec![0f32; data.len()];
    if out.is_empty() {
        return from_flex(FlexTensor::new(
            Bytes::from_elems(out),
            Layout::contiguous(Shape::from(vec![batch, h, w, c])),
            DType::F32,
        ));
    }
    let rows_per_task = (4096 / c).max(1);
    for (item, dst) in data.chunks(pixels * c).zip(out.chunks_mut(pixels * c)) {
        let (sum, sum_sq) = item
            .par_chunks(rows_per_task * c)
            .map(|rows| {
                let mut s = vec![0f64; c];
                let mut q = vec![0f64; c];
                for row in rows.chunks(c) {
                    for ((s, q), &v) in s.iter_mut().zip(q.iter_mut()).zip(row) {
                        let v = v as f64;
                        *s += v;
                        *q += v * v;
                    }
                }
                (s, q)
            })
            .reduce(
                || (vec![0f64; c], vec![0f64; c]),
                |(mut s, mut q), (s2, q2)| {
                    s.iter_mut().zip(&s2).for_each(|(a, b)| *a += b);
                    q.iter_mut().zip(&q2).for_each(|(a, b)| *a += b);
                    (s, q)
                },
            );
        let mut scale = vec![0f32; c];
        let mut shift = vec![0f32; c];
        for g in 0..groups {
            let span = g * per_group..(g + 1) * per_group;
            let mean = sum[span.clone()].iter().sum::<f64>() / count;
            let var = (sum_sq[span.clone()].iter().sum::<f64>() / count - mean * mean).max(0.0);
            let rstd = 1.0 / (var + epsilon).sqrt();
            for ch in span {
                let s = gamma[ch] as f64 * rstd;
                scale[ch] = s as f32;
                shift[ch] = (beta[ch] as f64 - mean * s) as f32;
            }
        }
        dst.par_chunks_mut(rows_per_task * c)
            .zip(item.par_chunks(rows_per_task * c))
            .for_each(|(dst, src)| {
                for (dst, src) in dst.chunks_mut(c).zip(src.chunks(c)) {
                    for (((y, &x), &a), &b) in dst.iter_mut().zip(src).zip(&scale).zip(&shift) {
                        *y = x * a + b;
                    }
                }
            });
    }
    from_flex(FlexTensor::new(
        Bytes::from_elems(out),
        Layout::contiguous(Shape::from(vec![batch, h, w, c])),
        DType::F32,
    ))
}

/// Numerically stable softmax of one row, in place.
fn softmax_in_place(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for x in row.iter_mut() {
        *x = exp_nonpositive(*x - max);
    }
    let inv = 1.0 / row.iter().sum::<f32>();
    for x in row.iter_mut() {
        *x *= inv;
    }
}

/// `eˣ` for `x ≤ 0` (softmax's shifted scores), branch-free so the loop above vectorises
/// (libm's `expf` is a call per element and was a fifth of a 512² UNet step).
/// `eˣ = 2ⁿ · eᶠ` with `n = round(x·log₂e)`, `|f| ≤ ½ ln 2`, `eᶠ` by its degree-7 Taylor series
/// (truncation < 1e-8; the result is within a few f32 ulps); arguments under -87 give 0's neighbourhood
/// (≤ 1.7e-38), as they should.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2²³: adding and subtracting rounds to integer.
    // ln 2 in two parts (Cody–Waite): n·LN2_HI is exact, so f keeps its low bits.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.max(-87.0);
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let f = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + f * (1.0
            + f * (1.0 / 2.0
                + f * (1.0 / 6.0
                    + f * (1.0 / 24.0
                        + f * (1.0 / 120.0 + f * (1.0 / 720.0 + f * (1.0 / 5040.0)))))));
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocked_attention_equals_the_materialised_one() {
        use burn::tensor::{Distribution, activation::softmax};
        type F = burn::backend::Flex;
        let device = Default::default();
        let normal = Distribution::Normal(0.0, 1.0);
        // Odd sizes: query blocks straddling nothing, cross-attention (lk ≠ lq), a strided q
        // laid out as the heads split of `[n, t, h·d]`.
        for (n, h, lq, lk, d, dv) in [
            (2, 3, 70, 77, 8, 8),
            (3, 2, 5, 5, 4, 6),
            (1, 1, 130, 64, 16, 16),
        ] {
            let q = Tensor::<F, 4>::random([n, lq, h, d], normal, &device).swap_dims(1, 2);
            let k = Tensor::<F, 4>::random([n, h, lk, d], normal, &device);
            let v = Tensor::<F, 4>::random([n, h, lk, dv], normal, &device);
            let got = flex_attention(&q, &k, &v, 0.3).expect("flex tensors");
            assert_eq!(got.dims(), [n, h, lq, dv]);
            let want = softmax(q.mul_scalar(0.3).matmul(k.swap_dims(2, 3)), 3).matmul(v);
            let diff: f32 = (got - want).abs().max().into_scalar();
            assert!(diff < 1e-5, "{:?}: max diff {diff}", (n, h, lq, lk, d, dv));
        }
    }

    #[test]
    fn row_softmax_equals_burns() {
        use burn::tensor::{Distribution, activation::softmax};
        type F = burn::backend::Flex;
        let x = Tensor::<F, 3>::random(
            [2, 3, 33],
            Distribution::Normal(0.0, 3.0),
            &Default::default(),
        );
        // Shared with `x` (copied first), then alone (in place), then a transposed view.
        let want = softmax(x.clone(), 2);
        let shared = flex_softmax_last_dim(x.clone());
        let diff: f32 = (shared - want.clone()).abs().max().into_scalar();
        assert!(diff < 1e-6, "max diff {diff}");
        let want_t = softmax(x.clone().swap_dims(1, 2), 2);
        let transposed = flex_softmax_last_dim(x.clone().swap_dims(1, 2));
        let diff: f32 = (transposed - want_t).abs().max().into_scalar();
        assert!(diff < 1e-6, "max diff {diff}");
        let alone = flex_softmax_last_dim(x.clone().mul_scalar(1.0));
        let diff: f32 = (alone - want).abs().max().into_scalar();
        assert!(diff < 1e-6, "max diff {diff}");
        // `x` itself was not touched by the shared call.
        let again = flex_softmax_last_dim(x.clone());
        let diff: f32 = (again - softmax(x, 2)).abs().max().into_scalar();
        assert!(diff < 1e-6, "max diff {diff}");
    }

    #[test]
    fn fast_exp_matches_libm() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 * i as f32 / 200_000.0;
            let want = (x as f64).exp();
            let got = exp_nonpositive(x) as f64;
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 1e-6, "worst relative error {worst}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert!(exp_nonpositive(-1e4) < 2e-38);
    }

    #[test]
    fn softmax_rows_sum_to_one_and_match_the_definition() {
        let mut row: Vec<f32> = (0..37)
            .map(|i| ((i * 7919) % 23) as f32 * 0.37 - 4.0)
            .collect();
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let denom: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
        let want: Vec<f64> = row
            .iter()
            .map(|&x| (x as f64 - max).exp() / denom)
            .collect();
        softmax_in_place(&mut row);
        for (g, w) in row.iter().zip(&want) {
            assert!((*g as f64 - w).abs() < 1e-7, "{g} vs {w}");
        }
    }
}
