//! Fused ("flash") attention: `softmax(q kᵀ · scale) v` without materialising the scores.
//!
//! One cube computes 64 query rows of one (batch, head) pair and walks the keys in tiles of 32,
//! keeping a running row maximum and row sum (the online softmax of FlashAttention, Dao et al.
//! 2022, algorithm 1). Scores and the output accumulate in f32 whatever the storage type, so the
//! kernel is as exact in f16 as the f16 inputs allow and matches the materialised maths to
//! rounding in f32. Only a `[64, 32]` score tile ever exists, so memory stays linear in the
//! sequence length: at SD 1.5's 64×64 latents (4096 tokens) the materialised path holds
//! `batch × heads × 4096 × 4096` scores per attention call, this kernel none.
//!
//! A cube is 16 × 16 units. For the scores each unit owns a 4 × 2 block of the 64 × 32 tile
//! (q and k staged through shared memory a chunk of head dimensions at a time, see [`Tiling`];
//! a head that fits one chunk, like SD 1.5's 40-wide ones, keeps q's block for every key tile);
//! for the softmax four units share a row; for the output each unit owns 4 rows × every 16th
//! column, in registers, with `v` staged through shared memory a few rows at a time. A key tile
//! costs six barriers when head and v fit one block each (nine before q stayed put and the
//! softmax's maxima and sums got arrays of their own: ptxas then also needs 80 registers per
//! unit instead of 128 for SD's 40-wide heads on sm_80–sm_90, three cubes per SM instead of two).
//!
//! Inputs are read through their strides (a heads-split view needs no copy first); the output
//! is a new contiguous `[n, heads, lq, dv]` tensor of the inputs' float type.
//!
//! The plain-tensor definition it is tested against is [`flash_attention_reference`].

use burn::tensor::{DType, Shape, Tensor, activation::softmax, backend::Backend};
use burn_cubecl::CubeRuntime;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::{CubeCount, CubeDim};

use crate::ShaderError;

/// Query rows per cube.
const ROWS: usize = 64;
/// Keys per tile.
const KEYS: usize = 32;
/// Shared memory the tiling plans for, in f32s: 32 KiB, what Metal and Mesa's lavapipe give a
/// cube (CUDA gives 48 KiB).
const SHARED_BUDGET: usize = 8192;
/// Head-dimension chunks of the `q kᵀ` product (held in shared memory at once) to choose from:
/// multiples of 8, so the cube's 256 units load the q and k chunks in equal shares.
const DEPTH_CHUNKS: [usize; 5] = [48, 40, 32, 24, 16];
/// Units per cube along x (score columns, output columns) and y (rows).
pub(crate) const UNITS_X: usize = 16;
pub(crate) const UNITS_Y: usize = 16;
/// Rows each unit owns in the score and output tiles (`ROWS / UNITS_Y`).
const ROWS_PER_UNIT: usize = 4;
/// Score columns each unit owns (`KEYS / UNITS_X`).
const KEYS_PER_UNIT: usize = 2;
/// Units sharing one row in the softmax step (`UNITS_X · UNITS_Y / ROWS`), and the scores each
/// of them takes.
const PARTS: usize = 4;
const KEYS_PER_PART: usize = KEYS / PARTS;
/// Row stride of the score tile in shared memory (one float of padding, see the kernel).
const SCORE_STRIDE: usize = KEYS + 1;
/// The largest value head dimension the kernel takes: each unit keeps
/// `ROWS_PER_UNIT × ⌈dv / 16⌉` f32 accumulators in registers (128 at 512, the VAE's
/// single-head attention).
pub const MAX_VALUE_DIM: usize = 512;
/// Stand-in for −∞ in the running maximum (WGSL has no infinity literal); `exp` of anything
/// this far below a real score is exactly 0.
const NEG_LARGE: f32 = -1.0e30;

/// How the kernel stages its operands through shared memory (compile-time constants of the
/// kernel: one compiled variant per distinct tiling).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tiling {
    /// Head dimensions of q and k staged at once (SD 1.5's 40/80/160 heads: 40, one to four
    /// chunks).
    pub depth_chunk: usize,
    /// Rows of v staged at once (a power of two ≤ 32).
    pub value_rows: usize,
    /// The head fits one chunk (`depth ≤ depth_chunk`): q's tile is staged once per cube, not
    /// once per key tile.
    pub single_chunk: bool,
}

impl Tiling {
    /// The tiling for head dimensions `depth` (q, k) and `value_dim` (v): the depth chunk that
    /// pads the head dimension least (the larger on a tie), then as many rows of v as fit the
    /// shared-memory budget.
    pub fn for_dims(depth: usize, value_dim: usize) -> Self {
        let padded = |chunk: usize| depth.max(1).div_ceil(chunk) * chunk;
        let depth_chunk = DEPTH_CHUNKS
            .into_iter()
            .min_by_key(|&chunk| (padded(chunk), usize::MAX - chunk))
            .unwrap_or(DEPTH_CHUNKS[0]);
        let fixed = Self {
            depth_chunk,
            value_rows: 0,
            single_chunk: false,
        }
        .shared_floats(value_dim);
        let room = SHARED_BUDGET.saturating_sub(fixed);
        let mut value_rows = KEYS;
        while value_rows > 1 && value_rows * value_dim > room {
            value_rows /= 2;
        }
        Self {
            depth_chunk,
            value_rows,
            single_chunk: depth <= depth_chunk,
        }
    }

    fn shared_floats(self, value_dim: usize) -> usize {
        (ROWS + KEYS) * (self.depth_chunk + 1)
            + ROWS * SCORE_STRIDE
            + self.value_rows * value_dim
            + 3 * ROWS
            + 2 * UNITS_X * UNITS_Y
    }

    /// Bytes of shared memory one cube uses with this tiling.
    pub fn shared_memory_bytes(self, value_dim: usize) -> usize {
        self.shared_floats(value_dim) * std::mem::size_of::<f32>()
    }
}

/// The kernel, in CubeCL's dialect of Rust (its `Tensor` is a device buffer with strides).
pub(crate) mod kernel {
    use cubecl::prelude::*;

    use super::{
        KEYS, KEYS_PER_PART, KEYS_PER_UNIT, NEG_LARGE, PARTS, ROWS, ROWS_PER_UNIT, SCORE_STRIDE,
        UNITS_X, UNITS_Y,
    };

    /// Stages a `rows × depth_chunk` block of `src` (rows from `first_row`, head dimensions from
    /// `d0`; zeros past `row_count` rows and `depth` dimensions) into `tile`, whose rows are
    /// `depth_chunk + 1` floats. Every unit of the cube takes an equal share.
    #[cube]
    #[allow(clippy::too_many_arguments)]
    fn stage_chunk<F: Float>(
        src: &Tensor<F>,
        tile: &mut SharedMemory<f32>,
        base: usize,
        first_row: usize,
        row_count: usize,
        d0: usize,
        tid: usize,
        #[comptime] rows: usize,
        #[comptime] depth_chunk: usize,
    ) {
        let depth = src.shape(3);
        let (row_stride, col_stride) = (src.stride(2), src.stride(3));
        let chunk_stride = comptime!(depth_chunk + 1);
        #[unroll]
        for i in 0..comptime!(rows * depth_chunk / (UNITS_X * UNITS_Y)) {
            let e = tid + UNITS_X * UNITS_Y * i;
            let (r, c) = (e / depth_chunk, e % depth_chunk);
            let (row, col) = (first_row + r, d0 + c);
            let mut value = 0.0;
            if row < row_count && col < depth {
                value = f32::cast_from(src[base + row * row_stride + col * col_stride]);
            }
            tile[r * chunk_stride + c] = value;
        }
    }

    #[cube(launch_unchecked)]
    #[allow(clippy::too_many_arguments)]
    pub fn flash_attention_kernel<F: Float>(
        q: &Tensor<F>,
        k: &Tensor<F>,
        v: &Tensor<F>,
        out: &mut Tensor<F>,
        scale: f32,
        #[comptime] value_dim: usize,
        #[comptime] depth_chunk: usize,
        #[comptime] value_rows: usize,
        #[comptime] single_chunk: bool,
        #[define(F)] _dtype: StorageType,
    ) {
        let tx = UNIT_POS_X as usize;
        let ty = UNIT_POS_Y as usize;
        let tid = ty * UNITS_X + tx;
        let units = UNITS_X * UNITS_Y;

        let heads = q.shape(1);
        let pair = CUBE_POS_Y as usize;
        let batch = pair / heads;
        let head = pair % heads;
        let lq = q.shape(2);
        let lk = k.shape(2);
        let depth = q.shape(3);
        let row0 = CUBE_POS_X as usize * ROWS;

        let q_base = batch * q.stride(0) + head * q.stride(1);
        let k_base = batch * k.stride(0) + head * k.stride(1);
        let v_base = batch * v.stride(0) + head * v.stride(1);
        let o_base = batch * out.stride(0) + head * out.stride(1);
        let (v_row, v_col) = (v.stride(2), v.stride(3));
        let (o_row, o_col) = (out.stride(2), out.stride(3));

        // Rows of the staged tiles are one float longer than their data, so that the units of a
        // warp reading down a column (k in the scores, a row's scores in the softmax) hit
        // different shared-memory banks.
        let chunk_stride = comptime!(depth_chunk + 1);
        let mut q_tile = SharedMemory::<f32>::new(ROWS * chunk_stride);
        let mut k_tile = SharedMemory::<f32>::new(KEYS * chunk_stride);
        let mut scores = SharedMemory::<f32>::new(ROWS * SCORE_STRIDE);
        let mut v_tile = SharedMemory::<f32>::new(value_rows * value_dim);
        let mut row_max = SharedMemory::<f32>::new(ROWS);
        let mut row_sum = SharedMemory::<f32>::new(ROWS);
        let mut row_rescale = SharedMemory::<f32>::new(ROWS);
        // The softmax's per-part maxima and sums, in two arrays so the sums need not wait for
        // every unit to have read the maxima.
        let mut part_max = SharedMemory::<f32>::new(UNITS_X * UNITS_Y);
        let mut part_sum = SharedMemory::<f32>::new(UNITS_X * UNITS_Y);

        if tid < ROWS {
            row_max[tid] = f32::new(NEG_LARGE);
            row_sum[tid] = 0.0;
        }
        // A head that fits one chunk: q's block stays in shared memory for every key tile (the
        // first tile's barrier publishes it).
        if comptime!(single_chunk) {
            stage_chunk::<F>(q, &mut q_tile, q_base, row0, lq, 0, tid, ROWS, depth_chunk);
        }

        let cols = comptime!(value_dim.div_ceil(UNITS_X));
        let mut acc = Array::<f32>::new(ROWS_PER_UNIT * cols);
        #[unroll]
        for i in 0..ROWS_PER_UNIT * cols {
            acc[i] = 0.0;
        }
        let mut s = Array::<f32>::new(ROWS_PER_UNIT * KEYS_PER_UNIT);
        let mut qv = Array::<f32>::new(ROWS_PER_UNIT);
        let mut kv = Array::<f32>::new(KEYS_PER_UNIT);

        // Barriers per key tile: after staging q/k (and between head chunks), after the scores,
        // the maxima, the sums and the row statistics, and around each block of v but the
        // last. Each guards a buffer some unit writes next against units still reading it; the
        // next tile's first barrier guards this tile's last reads of the scores and v.
        let mut key0 = 0;
        while key0 < lk {
            // Scores of this key tile: s = q kᵀ over the head dimension, a chunk at a time.
            #[unroll]
            for i in 0..ROWS_PER_UNIT * KEYS_PER_UNIT {
                s[i] = 0.0;
            }
            let mut d0 = 0;
            while d0 < depth {
                if comptime!(!single_chunk) {
                    stage_chunk::<F>(q, &mut q_tile, q_base, row0, lq, d0, tid, ROWS, depth_chunk);
                }
                stage_chunk::<F>(k, &mut k_tile, k_base, key0, lk, d0, tid, KEYS, depth_chunk);
                sync_cube();
                // The outer loops over the chunk and over v's rows are left to the shader
                // compiler to unroll (constant trip counts): unrolled here they made every
                // variant ~10 s to compile on lavapipe and longer on NVRTC.
                for c in 0..depth_chunk {
                    #[unroll]
                    for i in 0..ROWS_PER_UNIT {
                        qv[i] = q_tile[(ty * ROWS_PER_UNIT + i) * chunk_stride + c];
                    }
                    #[unroll]
                    for j in 0..KEYS_PER_UNIT {
                        kv[j] = k_tile[(tx * KEYS_PER_UNIT + j) * chunk_stride + c];
                    }
                    #[unroll]
                    for i in 0..ROWS_PER_UNIT {
                        #[unroll]
                        for j in 0..KEYS_PER_UNIT {
                            s[i * KEYS_PER_UNIT + j] += qv[i] * kv[j];
                        }
                    }
                }
                // The next chunk overwrites the q and k tiles; after the last one only the
                // scores are written, which nobody reads until the barrier below.
                if comptime!(!single_chunk) {
                    sync_cube();
                }
                d0 += depth_chunk;
            }
            #[unroll]
            for i in 0..ROWS_PER_UNIT {
                #[unroll]
                for j in 0..KEYS_PER_UNIT {
                    let col = tx * KEYS_PER_UNIT + j;
                    let mut value = f32::new(NEG_LARGE);
                    if key0 + col < lk {
                        value = s[i * KEYS_PER_UNIT + j] * scale;
                    }
                    scores[(ty * ROWS_PER_UNIT + i) * SCORE_STRIDE + col] = value;
                }
            }
            sync_cube();

            // Online softmax, PARTS units per row (KEYS_PER_PART of its scores each): the new
            // running maximum, the tile's probabilities (in place of its scores), and the factor
            // that rescales what was accumulated so far.
            let srow = tid / PARTS;
            let part = tid % PARTS;
            let base = srow * SCORE_STRIDE + part * KEYS_PER_PART;
            let mut tile_max = f32::new(NEG_LARGE);
            #[unroll]
            for c in 0..KEYS_PER_PART {
                tile_max = max(tile_max, scores[base + c]);
            }
            part_max[tid] = tile_max;
            sync_cube();
            let old_max = row_max[srow];
            let mut new_max = old_max;
            #[unroll]
            for p in 0..PARTS {
                new_max = max(new_max, part_max[srow * PARTS + p]);
            }
            let mut sum = 0.0;
            #[unroll]
            for c in 0..KEYS_PER_PART {
                let p = (scores[base + c] - new_max).exp();
                scores[base + c] = p;
                sum += p;
            }
            part_sum[tid] = sum;
            sync_cube();
            if part == 0 {
                let mut total = 0.0;
                #[unroll]
                for p in 0..PARTS {
                    total += part_sum[srow * PARTS + p];
                }
                let rescale = (old_max - new_max).exp();
                row_rescale[srow] = rescale;
                row_sum[srow] = row_sum[srow] * rescale + total;
                row_max[srow] = new_max;
            }
            sync_cube();

            #[unroll]
            for i in 0..ROWS_PER_UNIT {
                let rescale = row_rescale[ty * ROWS_PER_UNIT + i];
                #[unroll]
                for j in 0..cols {
                    acc[i * cols + j] *= rescale;
                }
            }

            // acc += p v over the tile's keys, `value_rows` rows of v at a time.
            let mut r0 = 0;
            while r0 < KEYS {
                let mut e = tid;
                while e < value_rows * value_dim {
                    let key = key0 + r0 + e / value_dim;
                    let col = e % value_dim;
                    let mut value = 0.0;
                    if key < lk {
                        value = f32::cast_from(v[v_base + key * v_row + col * v_col]);
                    }
                    v_tile[e] = value;
                    e += units;
                }
                sync_cube();
                for r in 0..value_rows {
                    #[unroll]
                    for i in 0..ROWS_PER_UNIT {
                        qv[i] = scores[(ty * ROWS_PER_UNIT + i) * SCORE_STRIDE + r0 + r];
                    }
                    #[unroll]
                    for j in 0..cols {
                        let col = tx + UNITS_X * j;
                        if col < value_dim {
                            let value = v_tile[r * value_dim + col];
                            #[unroll]
                            for i in 0..ROWS_PER_UNIT {
                                acc[i * cols + j] += qv[i] * value;
                            }
                        }
                    }
                }
                // The next block of v overwrites this one; after the last block the next key
                // tile's first barrier comes before anything these reads use is written.
                if comptime!(value_rows < KEYS) {
                    sync_cube();
                }
                r0 += value_rows;
            }
            key0 += KEYS;
        }

        #[unroll]
        for i in 0..ROWS_PER_UNIT {
            let local = ty * ROWS_PER_UNIT + i;
            let row = row0 + local;
            if row < lq {
                let inverse = 1.0 / row_sum[local];
                #[unroll]
                for j in 0..cols {
                    let col = tx + UNITS_X * j;
                    if col < value_dim {
                        out[o_base + row * o_row + col * o_col] =
                            F::cast_from(acc[i * cols + j] * inverse);
                    }
                }
            }
        }
    }
}

/// The problem's sizes, checked: `[n, heads, lq, lk, d, dv]`.
fn check_shapes(q: &Shape, k: &Shape, v: &Shape) -> Result<[usize; 6], ShaderError> {
    let dims = |name: &'static str, shape: &Shape| -> Result<[usize; 4], ShaderError> {
        let dims: [usize; 4] = shape.to_vec().try_into().map_err(|_| ShaderError::Shape {
            what: format!(
                "{name} has rank {}, expected 4 ([n, heads, tokens, dim])",
                shape.num_dims()
            ),
        })?;
        if dims.contains(&0) {
            return Err(ShaderError::Shape {
                what: format!("{name} {dims:?} has an empty dimension"),
            });
        }
        Ok(dims)
    };
    let [n, heads, lq, d] = dims("q", q)?;
    let [kn, kh, lk, kd] = dims("k", k)?;
    let [vn, vh, lv, dv] = dims("v", v)?;
    if [kn, vn] != [n, n] || [kh, vh] != [heads, heads] {
        return Err(ShaderError::Shape {
            what: format!(
                "q, k, v disagree on [n, heads]: {:?}, {:?}, {:?}",
                [n, heads],
                [kn, kh],
                [vn, vh]
            ),
        });
    }
    if kd != d {
        return Err(ShaderError::Shape {
            what: format!("q's head dimension {d} differs from k's {kd}"),
        });
    }
    if lv != lk {
        return Err(ShaderError::Shape {
            what: format!("k has {lk} tokens but v has {lv}"),
        });
    }
    Ok([n, heads, lq, lk, d, dv])
}

/// `softmax(q kᵀ · scale) v` in one kernel on a CubeCL runtime (CUDA, wgpu, ...).
///
/// # Shapes
/// - q `[n, heads, lq, d]`, k `[n, heads, lk, d]`, v `[n, heads, lk, dv]` → `[n, heads, lq, dv]`
///
/// # Errors
/// [`ShaderError::Shape`] for inconsistent shapes, [`ShaderError::Unsupported`] for a float
/// type other than f32/f16/bf16, mixed types, `dv > MAX_VALUE_DIM`, or a device whose shared
/// memory or grid is too small. Nothing is launched then.
pub fn flash_attention<R: CubeRuntime>(
    q: CubeTensor<R>,
    k: CubeTensor<R>,
    v: CubeTensor<R>,
    scale: f32,
) -> Result<CubeTensor<R>, ShaderError> {
    let [n, heads, lq, _, depth, dv] =
        check_shapes(q.meta.shape(), k.meta.shape(), v.meta.shape())?;
    let dtype = q.dtype;
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Err(ShaderError::Unsupported {
            what: format!("float type {dtype:?} (f32, f16 and bf16 are)"),
        });
    }
    if k.dtype != dtype || v.dtype != dtype {
        return Err(ShaderError::Unsupported {
            what: format!("mixed types q {dtype:?}, k {:?}, v {:?}", k.dtype, v.dtype),
        });
    }
    if dv > MAX_VALUE_DIM {
        return Err(ShaderError::Unsupported {
            what: format!("value head dimension {dv} (at most {MAX_VALUE_DIM})"),
        });
    }
    let hardware = &q.client.properties().hardware;
    let tiling = Tiling::for_dims(depth, dv);
    let shared = tiling.shared_memory_bytes(dv);
    if shared > hardware.max_shared_memory_size {
        return Err(ShaderError::Unsupported {
            what: format!(
                "{shared} bytes of shared memory per cube (the device has {})",
                hardware.max_shared_memory_size
            ),
        });
    }
    let blocks = lq.div_ceil(ROWS);
    let pairs = n * heads;
    let (max_x, max_y, _) = hardware.max_cube_count;
    if blocks > max_x as usize || pairs > max_y as usize {
        return Err(ShaderError::Unsupported {
            what: format!(
                "a grid of {blocks} × {pairs} cubes (the device allows {max_x} × {max_y})"
            ),
        });
    }

    let client = q.client.clone();
    let out = empty_device_dtype(
        client.clone(),
        q.device.clone(),
        Shape::new([n, heads, lq, dv]),
        dtype,
    );
    // SAFETY: every global read and write is guarded by the row, key and column bounds of the
    // checked shapes; every shared-memory index is below the size it was allocated with (q/k
    // chunks: row < ROWS or KEYS, column < depth_chunk; scores: row < ROWS, key < KEYS; v:
    // index < value_rows·dv; row statistics: row < ROWS); the loops end (`key0`, `d0`, `r0` and
    // `e` grow to fixed bounds).
    unsafe {
        kernel::flash_attention_kernel::launch_unchecked::<R>(
            &client,
            CubeCount::Static(blocks as u32, pairs as u32, 1),
            CubeDim::new_2d(UNITS_X as u32, UNITS_Y as u32),
            q.into_tensor_arg(),
            k.into_tensor_arg(),
            v.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            scale,
            dv,
            tiling.depth_chunk,
            tiling.value_rows,
            tiling.single_chunk,
            dtype.into(),
        );
    }
    Ok(out)
}

/// The definition [`flash_attention`] computes, in plain tensor ops: the scores materialised and
/// the softmax taken in f32, the result in the inputs' float type.
///
/// # Shapes
/// - q `[n, heads, lq, d]`, k `[n, heads, lk, d]`, v `[n, heads, lk, dv]` → `[n, heads, lq, dv]`
pub fn flash_attention_reference<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    scale: f64,
) -> Tensor<B, 4> {
    let dtype = q.dtype();
    let [q, k, v] = [q, k, v].map(|t| t.cast(DType::F32));
    let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(scale);
    softmax(scores, 3).matmul(v).cast(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tilings_fit_the_budget_and_pad_little() {
        // SD 1.5's heads (40/80/160) in 40-wide chunks with all 32 rows of v (40) or fewer.
        assert_eq!(
            Tiling::for_dims(40, 40),
            Tiling {
                depth_chunk: 40,
                value_rows: 32,
                single_chunk: true,
            }
        );
        assert_eq!(Tiling::for_dims(80, 80).depth_chunk, 40);
        assert!(!Tiling::for_dims(80, 80).single_chunk);
        assert_eq!(Tiling::for_dims(160, 160).depth_chunk, 40);
        // IF's 64-wide heads: two 32-wide chunks, not 48 + a mostly empty 48.
        assert_eq!(Tiling::for_dims(64, 64).depth_chunk, 32);
        for depth in [1, 8, 24, 40, 64, 77, 80, 160, 320, 512] {
            for value_dim in [1, 24, 40, 80, 160, 512] {
                let t = Tiling::for_dims(depth, value_dim);
                assert!(
                    t.shared_memory_bytes(value_dim) <= SHARED_BUDGET * 4,
                    "{depth}/{value_dim}: {t:?}"
                );
                assert!(
                    t.value_rows.is_power_of_two() && t.value_rows <= KEYS,
                    "{t:?}"
                );
                assert_eq!(t.depth_chunk % 8, 0, "{t:?}");
            }
        }
    }
}
