//! 2-D convolution as the models call it.
//!
//! On GPU backends this is Burn's `conv2d` (CubeCL's implicit-GEMM kernels). On Burn's CPU
//! backend (flex) it is ours: flex 0.21 converts every input to NHWC and re-flattens the weights
//! on each call in single-threaded loops, then runs one small GEMM per 512-pixel tile. Ours keeps
//! the PyTorch layout end to end (`im2col` rows built in parallel straight from NCHW, the OIHW
//! weight used as the GEMM's left matrix as stored, the result written in NCHW) and runs one
//! large multi-threaded GEMM per tile of output rows, so the whole machine works on the
//! arithmetic. Profile and numbers: `tests/python/RESULTS.md`.

use burn::backend::flex::{FlexTensor, Layout};
use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;
use burn::tensor::{Bytes, DType, Shape, Tensor, backend::Backend};
use rayon::prelude::*;

use super::flex::{as_flex, from_flex};
use super::layout::MemoryFormat;

/// Largest `im2col` buffer built at once, in elements (64 MiB of f32): the output is processed
/// in tiles of whole rows so the VAE's 512×512 layers do not need gigabytes.
const MAX_COLUMN_ELEMENTS: usize = 16 << 20;

/// The `[h, w]` a convolution makes of an input of `[h, w]` (dilation 1).
pub fn conv2d_output_size<B: Backend>(conv: &Conv2d<B>, [h, w]: [usize; 2]) -> [usize; 2] {
    let ([kh, kw], [sh, sw]) = (conv.kernel_size, conv.stride);
    let [top, left, bottom, right] = match conv.padding {
        PaddingConfig2d::Explicit(t, l, b, r) => [t, l, b, r],
        PaddingConfig2d::Valid => [0; 4],
        PaddingConfig2d::Same => return [h.div_ceil(sh.max(1)), w.div_ceil(sw.max(1))],
    };
    let side = |n: usize, k: usize, s: usize, a: usize, b: usize| {
        (n + a + b).saturating_sub(k) / s.max(1) + 1
    };
    [side(h, kh, sh, top, bottom), side(w, kw, sw, left, right)]
}

/// `conv.forward(x)`, with the CPU backend's fast path.
pub fn conv2d_forward<B: Backend>(conv: &Conv2d<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    match flex_conv2d(conv, &x) {
        Some(out) => out,
        None => conv.forward(x),
    }
}

/// `conv.forward` on a feature map in `format`, the result in the same format.
///
/// Channels-last on GPU backends: Burn's convolution permutes its input to NHWC and its
/// output back, both views; handing it the NCHW view of an NHWC tensor makes both permutes
/// land on contiguous memory. On the CPU backend our NHWC kernel runs.
pub fn conv2d_forward_in<B: Backend>(
    conv: &Conv2d<B>,
    x: Tensor<B, 4>,
    format: MemoryFormat,
) -> Tensor<B, 4> {
    match format {
        MemoryFormat::Contiguous => conv2d_forward(conv, x),
        MemoryFormat::ChannelsLast => match flex_conv2d_nhwc(conv, &x) {
            Some(out) => out,
            None => conv.forward(x.permute([0, 3, 1, 2])).permute([0, 2, 3, 1]),
        },
    }
}

/// The geometry of one convolution, checked against the tensors it will read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeometry {
    /// Batch size.
    pub batch: usize,
    /// Input channels.
    pub c_in: usize,
    /// Input height and width.
    pub in_hw: [usize; 2],
    /// Output channels.
    pub c_out: usize,
    /// Kernel height and width.
    pub kernel: [usize; 2],
    /// Stride (rows, columns).
    pub stride: [usize; 2],
    /// Zero padding (top, left, bottom, right).
    pub padding: [usize; 4],
}

impl ConvGeometry {
    /// Output height and width (PyTorch's formula), or `None` when the kernel does not fit.
    pub fn out_hw(&self) -> Option<[usize; 2]> {
        let h = self.in_hw[0] + self.padding[0] + self.padding[2];
        let w = self.in_hw[1] + self.padding[1] + self.padding[3];
        if h < self.kernel[0] || w < self.kernel[1] || self.stride.contains(&0) {
            return None;
        }
        Some([
            (h - self.kernel[0]) / self.stride[0] + 1,
            (w - self.kernel[1]) / self.stride[1] + 1,
        ])
    }

    /// Weights per output channel: `c_in · kh · kw` (the GEMM's inner dimension).
    fn taps(&self) -> usize {
        self.c_in * self.kernel[0] * self.kernel[1]
    }

    /// The output size, when the input, weight and bias slices have this geometry's lengths
    /// (in either layout: the lengths are the same).
    fn check_slices(
        &self,
        input: &[f32],
        weight: &[f32],
        bias: Option<&[f32]>,
    ) -> Option<[usize; 2]> {
        let [h, w] = self.in_hw;
        let fits = input.len() == self.batch * self.c_in * h * w
            && weight.len() == self.c_out * self.taps()
            && bias.is_none_or(|b| b.len() == self.c_out);
        if fits { self.out_hw() } else { None }
    }

    fn is_pointwise(&self) -> bool {
        self.kernel == [1, 1] && self.stride == [1, 1] && self.padding == [0; 4]
    }
}

/// Runs the convolution on flex's own buffers when `B` is flex, the tensors are f32 and the
/// convolution is one our kernel covers (no groups, no dilation, explicit or no padding).
fn flex_conv2d<B: Backend>(conv: &Conv2d<B>, x: &Tensor<B, 4>) -> Option<Tensor<B, 4>> {
    let [batch, c_in, h, w] = x.dims();
    let FlexConv {
        geometry,
        input,
        weight,
        bias,
    } = FlexConv::new(conv, x, batch, c_in, [h, w])?;
    let [oh, ow] = geometry.out_hw()?;
    let weight = weight.to_contiguous();
    let out = conv2d_nchw_f32(
        &geometry,
        input.storage::<f32>(),
        weight.storage::<f32>(),
        bias.as_ref().map(|b| b.storage::<f32>()),
    )?;
    flex_output([batch, geometry.c_out, oh, ow], out)
}

/// The NHWC twin of [`flex_conv2d`]: `x` is `[batch, h, w, c_in]`, the result
/// `[batch, oh, ow, c_out]`; the weight is read OHWI (no copy when stored so).
fn flex_conv2d_nhwc<B: Backend>(conv: &Conv2d<B>, x: &Tensor<B, 4>) -> Option<Tensor<B, 4>> {
    let [batch, h, w, c_in] = x.dims();
    let FlexConv {
        geometry,
        input,
        weight,
        bias,
    } = FlexConv::new(conv, x, batch, c_in, [h, w])?;
    let [oh, ow] = geometry.out_hw()?;
    let weight = weight.permute(&[0, 2, 3, 1]).to_contiguous();
    let out = conv2d_nhwc_f32(
        &geometry,
        input.storage::<f32>(),
        weight.storage::<f32>(),
        bias.as_ref().map(|b| b.storage::<f32>()),
    )?;
    flex_output([batch, oh, ow, geometry.c_out], out)
}

/// A convolution our flex kernels cover, its tensors as contiguous flex buffers (the weight as
/// stored, OIHW-shaped).
struct FlexConv {
    geometry: ConvGeometry,
    input: FlexTensor,
    weight: FlexTensor,
    bias: Option<FlexTensor>,
}

impl FlexConv {
    /// `None` unless `B` is flex, everything is f32, and the convolution has no groups, no
    /// dilation and explicit (or no) padding.
    fn new<B: Backend>(
        conv: &Conv2d<B>,
        x: &Tensor<B, 4>,
        batch: usize,
        c_in: usize,
        in_hw: [usize; 2],
    ) -> Option<Self> {
        if conv.groups != 1 || conv.dilation != [1, 1] || x.dtype() != DType::F32 {
            return None;
        }
        let padding = match conv.padding {
            PaddingConfig2d::Valid => [0; 4],
            PaddingConfig2d::Explicit(top, left, bottom, right) => [top, left, bottom, right],
            PaddingConfig2d::Same => return None,
        };
        let input = as_flex(x.clone())?;
        let weight = as_flex(conv.weight.val())?;
        let bias = match &conv.bias {
            Some(bias) => Some(as_flex(bias.val())?.to_contiguous()),
            None => None,
        };
        let w_dims = conv.weight.dims();
        if w_dims[1] != c_in || weight.dtype() != DType::F32 {
            return None;
        }
        Some(Self {
            geometry: ConvGeometry {
                batch,
                c_in,
                in_hw,
                c_out: w_dims[0],
                kernel: [w_dims[2], w_dims[3]],
                stride: conv.stride,
                padding,
            },
            input: input.to_contiguous(),
            weight,
            bias,
        })
    }
}

fn flex_output<B: Backend>(dims: [usize; 4], out: Vec<f32>) -> Option<Tensor<B, 4>> {
    let out = FlexTensor::new(
        Bytes::from_elems(out),
        Layout::contiguous(Shape::from(dims.to_vec())),
        DType::F32,
    );
    from_flex(out)
}

/// Convolution of a contiguous NCHW f32 input with a contiguous OIHW weight, result NCHW.
///
/// Per batch item and tile of output rows: the `im2col` matrix `[c_in·kh·kw, pixels]` is built
/// in parallel (one matrix row per input channel and kernel tap, copied row by row from the
/// input), then `out[:, pixels] = bias + W[c_out, c_in·kh·kw] · col` is one GEMM on all
/// threads. A 1×1, stride-1, unpadded convolution skips `im2col` (the input is the matrix).
///
/// Returns `None` when the slices do not match the geometry.
pub fn conv2d_nchw_f32(
    g: &ConvGeometry,
    input: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
) -> Option<Vec<f32>> {
    conv2d_nchw_f32_tiled(g, input, weight, bias, MAX_COLUMN_ELEMENTS)
}

fn conv2d_nchw_f32_tiled(
    g: &ConvGeometry,
    input: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    max_column_elements: usize,
) -> Option<Vec<f32>> {
    let [oh, ow] = g.check_slices(input, weight, bias)?;
    let k = g.taps();
    let pixels = oh * ow;
    let mut out = vec![0f32; g.batch * g.c_out * pixels];
    if out.is_empty() {
        return Some(out);
    }
    // The GEMM accumulates into the output: start from the bias.
    if let Some(bias) = bias {
        out.par_chunks_mut(pixels)
            .enumerate()
            .for_each(|(row, chunk)| chunk.fill(bias[row % g.c_out]));
    }
    let rows_per_tile = (max_column_elements / (k * ow).max(1)).clamp(1, oh);
    let mut column = if g.is_pointwise() {
        Vec::new()
    } else {
        vec![0f32; k * rows_per_tile * ow]
    };
    for b in 0..g.batch {
        let plane = g.c_in * g.in_hw[0] * g.in_hw[1];
        let image = &input[b * plane..(b + 1) * plane];
        let out_image = &mut out[b * g.c_out * pixels..(b + 1) * g.c_out * pixels];
        if g.is_pointwise() {
            gemm_accumulate(
                out_image,
                pixels,
                weight,
                image,
                Rhs::KByN,
                g.c_out,
                k,
                pixels,
            );
            continue;
        }
        let mut row0 = 0;
        while row0 < oh {
            let rows = rows_per_tile.min(oh - row0);
            let tile_pixels = rows * ow;
            let column = &mut column[..k * tile_pixels];
            im2col_rows(g, image, row0, rows, ow, column);
            let dst = &mut out_image[row0 * ow..];
            gemm_accumulate(
                dst,
                pixels,
                weight,
                column,
                Rhs::KByN,
                g.c_out,
                k,
                tile_pixels,
            );
            row0 += rows;
        }
    }
    Some(out)
}

/// Fills `column[(ci·kh + ky)·kw + kx][p]` for the output pixels of rows `row0..row0+rows`.
fn im2col_rows(
    g: &ConvGeometry,
    image: &[f32],
    row0: usize,
    rows: usize,
    ow: usize,
    column: &mut [f32],
) {
    let [h, w] = g.in_hw;
    let [kh, kw] = g.kernel;
    let [sy, sx] = g.stride;
    let [pad_top, pad_left, _, _] = g.padding;
    let tile_pixels = rows * ow;
    column
        .par_chunks_mut(tile_pixels)
        .enumerate()
        .for_each(|(r, dst)| {
            let ci = r / (kh * kw);
            let ky = (r / kw) % kh;
            let kx = r % kw;
            let plane = &image[ci * h * w..(ci + 1) * h * w];
            for (i, dst_row) in dst.chunks_mut(ow).enumerate() {
                let iy = ((row0 + i) * sy + ky)
                    .checked_sub(pad_top)
                    .filter(|&y| y < h);
                let Some(iy) = iy else {
                    dst_row.fill(0.0);
                    continue;
                };
                let src = &plane[iy * w..(iy + 1) * w];
                if sx == 1 {
                    // Output columns whose input column lies inside the image form one run.
                    let first = pad_left.saturating_sub(kx).min(ow);
                    let last = (w + pad_left).saturating_sub(kx).min(ow).max(first);
                    dst_row[..first].fill(0.0);
                    dst_row[last..].fill(0.0);
                    if last > first {
                        let start = first + kx - pad_left;
                        dst_row[first..last].copy_from_slice(&src[start..start + last - first]);
                    }
                } else {
                    for (ox, v) in dst_row.iter_mut().enumerate() {
                        *v = (ox * sx + kx)
                            .checked_sub(pad_left)
                            .and_then(|x| src.get(x))
                            .copied()
                            .unwrap_or(0.0);
                    }
                }
            }
        });
}

/// How the GEMM's right-hand matrix is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rhs {
    /// `[k × n]`, row-major.
    KByN,
    /// `[n × k]`, row-major (the product uses its transpose).
    NByK,
}

/// `dst[m][0..n] += lhs[m × k] · rhs`, `dst` rows `dst_row_stride` apart, on all threads.
#[allow(clippy::too_many_arguments)]
fn gemm_accumulate(
    dst: &mut [f32],
    dst_row_stride: usize,
    lhs: &[f32],
    rhs: &[f32],
    rhs_layout: Rhs,
    m: usize,
    k: usize,
    n: usize,
) {
    assert!(m == 0 || dst.len() >= (m - 1) * dst_row_stride + n);
    assert!(lhs.len() >= m * k && rhs.len() >= k * n);
    // Element (p, j) of the right-hand matrix is rhs[p·rhs_rs + j·rhs_cs].
    let (rhs_cs, rhs_rs) = match rhs_layout {
        Rhs::KByN => (1, n as isize),
        Rhs::NByK => (k as isize, 1),
    };
    // SAFETY: the asserts above keep every index the GEMM touches inside the three slices:
    // dst[i·dst_row_stride + j] (i < m, j < n), lhs[i·k + p] (p < k), rhs[p·n + j] or
    // rhs[j·k + p], all below k·n; `dst` is borrowed mutably, so it does not alias the inputs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_row_stride as isize,
            true,
            lhs.as_ptr(),
            1,
            k as isize,
            rhs.as_ptr(),
            rhs_cs,
            rhs_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        );
    }
}

/// Convolution of a contiguous NHWC f32 input with a contiguous OHWI weight, result NHWC.
///
/// Output pixels are the GEMM's rows: per tile of pixels, the `im2col` matrix
/// `[pixels, kh·kw·c_in]` is gathered in parallel (each row is `kh·kw` contiguous channel runs of
/// the input), then `out[pixels, c_out] = bias + col · Wᵀ` is one GEMM on all threads. A 1×1,
/// stride-1, unpadded convolution is a single GEMM on the input as it is.
///
/// Returns `None` when the slices do not match the geometry.
pub fn conv2d_nhwc_f32(
    g: &ConvGeometry,
    input: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
) -> Option<Vec<f32>> {
    conv2d_nhwc_f32_tiled(g, input, weight, bias, MAX_COLUMN_ELEMENTS)
}

fn conv2d_nhwc_f32_tiled(
    g: &ConvGeometry,
    input: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    max_column_elements: usize,
) -> Option<Vec<f32>> {
    let [oh, ow] = g.check_slices(input, weight, bias)?;
    let k = g.taps();
    let pixels = g.batch * oh * ow;
    let mut out = vec![0f32; pixels * g.c_out];
    if out.is_empty() {
        return Some(out);
    }
    if let Some(bias) = bias {
        out.par_chunks_mut(g.c_out)
            .for_each(|row| row.copy_from_slice(bias));
    }
    if g.is_pointwise() {
        gemm_accumulate(
            &mut out,
            g.c_out,
            input,
            weight,
            Rhs::NByK,
            pixels,
            k,
            g.c_out,
        );
        return Some(out);
    }
    let tile = (max_column_elements / k.max(1)).clamp(1, pixels);
    let mut column = vec![0f32; tile * k];
    let mut p0 = 0;
    while p0 < pixels {
        let rows = tile.min(pixels - p0);
        let column = &mut column[..rows * k];
        im2col_nhwc(g, input, [oh, ow], p0, column);
        let dst = &mut out[p0 * g.c_out..(p0 + rows) * g.c_out];
        gemm_accumulate(dst, g.c_out, column, weight, Rhs::NByK, rows, k, g.c_out);
        p0 += rows;
    }
    Some(out)
}

/// Fills `column[p][(ky·kw + kx)·c_in + ci]` for output pixels `p0..p0 + column.len()/k`
/// (pixels numbered over the whole batch, row-major).
fn im2col_nhwc(g: &ConvGeometry, input: &[f32], out_hw: [usize; 2], p0: usize, column: &mut [f32]) {
    let [h, w] = g.in_hw;
    let [oh, ow] = out_hw;
    let [kh, kw] = g.kernel;
    let [sy, sx] = g.stride;
    let [pad_top, pad_left, _, _] = g.padding;
    let c = g.c_in;
    column
        .par_chunks_mut(c * kh * kw)
        .enumerate()
        .for_each(|(i, row)| {
            let p = p0 + i;
            let (b, oy, ox) = (p / (oh * ow), (p / ow) % oh, p % ow);
            for (tap, dst) in row.chunks_mut(c).enumerate() {
                let (ky, kx) = (tap / kw, tap % kw);
                let iy = (oy * sy + ky).checked_sub(pad_top).filter(|&y| y < h);
                let ix = (ox * sx + kx).checked_sub(pad_left).filter(|&x| x < w);
                match (iy, ix) {
                    (Some(iy), Some(ix)) => {
                        let start = ((b * h + iy) * w + ix) * c;
                        dst.copy_from_slice(&input[start..start + c]);
                    }
                    _ => dst.fill(0.0),
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct loops: the definition of a convolution.
    fn conv_reference(g: &ConvGeometry, x: &[f32], wt: &[f32], bias: &[f32]) -> Vec<f32> {
        let [oh, ow] = g.out_hw().expect("geometry");
        let [h, w] = g.in_hw;
        let [kh, kw] = g.kernel;
        let mut out = vec![0f32; g.batch * g.c_out * oh * ow];
        for b in 0..g.batch {
            for co in 0..g.c_out {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut acc = bias[co] as f64;
                        for ci in 0..g.c_in {
                            for ky in 0..kh {
                                for kx in 0..kw {
                                    let iy =
                                        (oy * g.stride[0] + ky) as isize - g.padding[0] as isize;
                                    let ix =
                                        (ox * g.stride[1] + kx) as isize - g.padding[1] as isize;
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                        continue;
                                    }
                                    let xv =
                                        x[((b * g.c_in + ci) * h + iy as usize) * w + ix as usize];
                                    let wv = wt[((co * g.c_in + ci) * kh + ky) * kw + kx];
                                    acc += xv as f64 * wv as f64;
                                }
                            }
                        }
                        out[((b * g.c_out + co) * oh + oy) * ow + ox] = acc as f32;
                    }
                }
            }
        }
        out
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 2001) as f32
                    / 1000.0
                    - 1.0
            })
            .collect()
    }

    #[test]
    fn matches_direct_convolution() {
        let cases = [
            // 3×3 same padding, stride 1 (ResNet), odd sizes.
            ([2, 3, 7, 5, 4], [3, 3], [1, 1], [1, 1, 1, 1]),
            // Stride 2, symmetric padding (UNet downsample).
            ([1, 4, 9, 8, 3], [3, 3], [2, 2], [1, 1, 1, 1]),
            // Stride 2, no padding after an asymmetric pad (VAE downsample).
            ([2, 2, 8, 9, 5], [3, 3], [2, 2], [0, 0, 0, 0]),
            // Pointwise (shortcuts, attention projections).
            ([2, 6, 4, 5, 3], [1, 1], [1, 1], [0, 0, 0, 0]),
            // Asymmetric padding, wide kernel.
            ([1, 2, 6, 11, 2], [3, 5], [1, 1], [0, 2, 2, 1]),
        ];
        for ([batch, c_in, h, w, c_out], kernel, stride, padding) in cases {
            let g = ConvGeometry {
                batch,
                c_in,
                in_hw: [h, w],
                c_out,
                kernel,
                stride,
                padding,
            };
            let x = values(batch * c_in * h * w, 1);
            let wt = values(c_out * c_in * kernel[0] * kernel[1], 7);
            let bias = values(c_out, 3);
            let got = conv2d_nchw_f32(&g, &x, &wt, Some(&bias)).expect("conv");
            let want = conv_reference(&g, &x, &wt, &bias);
            assert_eq!(got.len(), want.len());
            let diff = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-5, "{g:?}: max diff {diff}");
        }
    }

    #[test]
    fn tiles_of_rows_give_the_same_result() {
        // A geometry whose im2col exceeds one tile: several row tiles per image.
        let g = ConvGeometry {
            batch: 1,
            c_in: 2,
            in_hw: [6, 4],
            c_out: 3,
            kernel: [3, 3],
            stride: [1, 1],
            padding: [1, 1, 1, 1],
        };
        let x = values(2 * 6 * 4, 5);
        let wt = values(3 * 2 * 9, 9);
        let zero = vec![0.0; 3];
        let want = conv_reference(&g, &x, &wt, &zero);
        // k·ow = 72 elements per output row: a budget of 144 makes tiles of 2 rows.
        let got = conv2d_nchw_f32_tiled(&g, &x, &wt, None, 144).expect("conv");
        let diff = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-5, "max diff {diff}");
    }

    /// `[a, b, c, d]` row-major → `[a, c, d, b]` (NCHW → NHWC, OIHW → OHWI).
    fn channels_last(x: &[f32], [a, b, c, d]: [usize; 4]) -> Vec<f32> {
        let mut out = vec![0f32; x.len()];
        for i in 0..a {
            for j in 0..b {
                for k in 0..c {
                    for l in 0..d {
                        out[((i * c + k) * d + l) * b + j] = x[((i * b + j) * c + k) * d + l];
                    }
                }
            }
        }
        out
    }

    #[test]
    fn nhwc_matches_direct_convolution() {
        let cases = [
            ([2, 3, 7, 5, 4], [3, 3], [1, 1], [1, 1, 1, 1], usize::MAX),
            ([1, 4, 9, 8, 3], [3, 3], [2, 2], [1, 1, 1, 1], usize::MAX),
            ([2, 2, 8, 9, 5], [3, 3], [2, 2], [0, 0, 1, 1], usize::MAX),
            ([2, 6, 4, 5, 3], [1, 1], [1, 1], [0, 0, 0, 0], usize::MAX),
            ([1, 2, 6, 11, 2], [3, 5], [1, 1], [0, 2, 2, 1], usize::MAX),
            // Tiles of 7 pixels (k = 18): tiles straddle rows and batch items.
            ([2, 2, 5, 4, 3], [3, 3], [1, 1], [1, 1, 1, 1], 7 * 18),
        ];
        for ([batch, c_in, h, w, c_out], kernel, stride, padding, budget) in cases {
            let g = ConvGeometry {
                batch,
                c_in,
                in_hw: [h, w],
                c_out,
                kernel,
                stride,
                padding,
            };
            let [oh, ow] = g.out_hw().expect("geometry");
            let x = values(batch * c_in * h * w, 1);
            let wt = values(c_out * c_in * kernel[0] * kernel[1], 7);
            let bias = values(c_out, 3);
            let want = channels_last(&conv_reference(&g, &x, &wt, &bias), [batch, c_out, oh, ow]);
            let got = conv2d_nhwc_f32_tiled(
                &g,
                &channels_last(&x, [batch, c_in, h, w]),
                &channels_last(&wt, [c_out, c_in, kernel[0], kernel[1]]),
                Some(&bias),
                budget,
            )
            .expect("conv");
            assert_eq!(got.len(), want.len());
            let diff = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-5, "{g:?}: max diff {diff}");
        }
        let g = ConvGeometry {
            batch: 1,
            c_in: 2,
            in_hw: [4, 4],
            c_out: 3,
            kernel: [3, 3],
            stride: [1, 1],
            padding: [1, 1, 1, 1],
        };
        assert!(conv2d_nhwc_f32(&g, &[0.0; 31], &[0.0; 54], None).is_none());
    }

    #[test]
    fn mismatched_slices_are_refused() {
        let g = ConvGeometry {
            batch: 1,
            c_in: 2,
            in_hw: [4, 4],
            c_out: 3,
            kernel: [3, 3],
            stride: [1, 1],
            padding: [1, 1, 1, 1],
        };
        assert!(conv2d_nchw_f32(&g, &[0.0; 31], &[0.0; 54], None).is_none());
        assert!(conv2d_nchw_f32(&g, &[0.0; 32], &[0.0; 54], Some(&[0.0; 2])).is_none());
    }
}
