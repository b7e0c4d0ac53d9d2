//! VAE tiling (diffusers' `AutoencoderKL.enable_tiling`, the pipelines' `enable_vae_tiling`):
//! the encoder and decoder run on overlapping tiles of the config's `sample_size`, and each tile
//! is blended into its upper and left neighbours over a quarter of a tile. A tile's activations
//! and attention no longer grow with the image, so large pictures (the x4 upscaler's output,
//! SD beyond 512²) fit; the picture differs slightly from an untiled one, as in diffusers.

use burn::tensor::{Tensor, TensorData, backend::Backend};

use crate::error::{EngineError, Result};

/// The tile geometry of one VAE (diffusers' `tile_sample_min_size`, `tile_latent_min_size`
/// and `tile_overlap_factor`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VaeTiling {
    /// A tile's side in pixels: the config's `sample_size`.
    pub sample_tile: usize,
    /// A tile's side in latents: `sample_size / 2^(blocks - 1)`.
    pub latent_tile: usize,
    /// The fraction of a tile that neighbouring tiles share.
    pub overlap: f64,
}

impl VaeTiling {
    /// Diffusers' geometry for a VAE whose config has `sample_size` and whose image is
    /// `scale_factor` times its latents: tiles of `sample_size`, overlap 0.25
    /// (`AutoencoderKLConfig::tiling`).
    pub fn new(sample_size: usize, scale_factor: usize) -> Result<Self> {
        let tiling = Self {
            sample_tile: sample_size,
            latent_tile: sample_size / scale_factor.max(1),
            overlap: 0.25,
        };
        for grid in [tiling.encode_grid(), tiling.decode_grid()] {
            if grid.stride == 0 || grid.keep == 0 {
                return Err(EngineError::Unsupported(format!(
                    "VAE tiling with a sample_size of {sample_size} (tiles would not advance)"
                )));
            }
        }
        Ok(tiling)
    }

    /// Whether latents of `[h, w]` are decoded in tiles (diffusers: when a side exceeds a tile).
    pub fn tiles_decode(&self, [h, w]: [usize; 2]) -> bool {
        h > self.latent_tile || w > self.latent_tile
    }

    /// Whether images of `[h, w]` are encoded in tiles.
    pub fn tiles_encode(&self, [h, w]: [usize; 2]) -> bool {
        h > self.sample_tile || w > self.sample_tile
    }

    /// Decoding: latent tiles in, pixel tiles out.
    pub(crate) fn decode_grid(&self) -> TileGrid {
        TileGrid::new(self.latent_tile, self.sample_tile, self.overlap)
    }

    /// Encoding: pixel tiles in, latent (moment) tiles out.
    pub(crate) fn encode_grid(&self) -> TileGrid {
        TileGrid::new(self.sample_tile, self.latent_tile, self.overlap)
    }
}

/// How one direction (encode or decode) cuts its input and puts its output together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TileGrid {
    /// An input tile's side.
    pub input_tile: usize,
    /// The distance between neighbouring input tiles.
    pub stride: usize,
    /// Output rows / columns blended into the neighbour above / to the left.
    pub blend: usize,
    /// Output rows / columns each tile contributes.
    pub keep: usize,
}

impl TileGrid {
    fn new(input_tile: usize, output_tile: usize, overlap: f64) -> Self {
        // Python's `int(...)` of the same float products.
        let blend = (output_tile as f64 * overlap) as usize;
        Self {
            input_tile,
            stride: (input_tile as f64 * (1.0 - overlap)) as usize,
            blend,
            keep: output_tile.saturating_sub(blend),
        }
    }

    /// The input tiles along an axis of `len`: `(start, length)`, the last ones cut short.
    pub fn spans(&self, len: usize) -> Vec<(usize, usize)> {
        (0..len)
            .step_by(self.stride.max(1))
            .map(|start| (start, self.input_tile.min(len - start)))
            .collect()
    }

    /// The `[h, w]` of the input tiles, in the order they run.
    pub fn tile_sizes(&self, [h, w]: [usize; 2]) -> Vec<[usize; 2]> {
        let cols = self.spans(w);
        self.spans(h)
            .into_iter()
            .flat_map(|(_, th)| cols.iter().map(move |&(_, tw)| [th, tw]))
            .collect()
    }

    /// Runs `f` on every tile of `x` (`[b, c, h, w]`), row by row, and blends the outputs
    /// together. Only the previous row's outputs are kept alive, not the whole grid.
    pub fn run<B: Backend>(
        &self,
        x: Tensor<B, 4>,
        mut f: impl FnMut(Tensor<B, 4>) -> Tensor<B, 4>,
    ) -> Tensor<B, 4> {
        let [_, _, h, w] = x.dims();
        let cols = self.spans(w);
        let mut above: Vec<Tensor<B, 4>> = Vec::new();
        let mut rows = Vec::new();
        for (top, th) in self.spans(h) {
            let mut row: Vec<Tensor<B, 4>> = Vec::with_capacity(cols.len());
            let mut pieces = Vec::with_capacity(cols.len());
            for (j, &(left, tw)) in cols.iter().enumerate() {
                let mut tile = f(x.clone().narrow(2, top, th).narrow(3, left, tw));
                // Diffusers blends in place, so the neighbours are already blended tiles.
                if let Some(up) = above.get(j) {
                    tile = blend(up, tile, 2, self.blend);
                }
                if let Some(prev) = row.last() {
                    tile = blend(prev, tile, 3, self.blend);
                }
                let [_, _, oh, ow] = tile.dims();
                pieces.push(tile.clone().narrow(2, 0, oh.min(self.keep)).narrow(
                    3,
                    0,
                    ow.min(self.keep),
                ));
                row.push(tile);
            }
            rows.push(Tensor::cat(pieces, 3));
            above = row;
        }
        Tensor::cat(rows, 2)
    }
}

/// Diffusers' `blend_v` (`axis` 2) / `blend_h` (`axis` 3): the first `extent` rows (columns) of
/// `b` fade in from `a`'s last ones, linearly, `a`'s weight going from 1 to `1/extent`.
fn blend<B: Backend>(
    a: &Tensor<B, 4>,
    b: Tensor<B, 4>,
    axis: usize,
    extent: usize,
) -> Tensor<B, 4> {
    let (len_a, len_b) = (a.dims()[axis], b.dims()[axis]);
    let extent = extent.min(len_a).min(len_b);
    if extent == 0 {
        return b;
    }
    let mut shape = [1; 4];
    shape[axis] = extent;
    let (device, dtype) = (b.device(), b.dtype());
    let weights = |f: fn(f64) -> f64| {
        let values: Vec<f32> = (0..extent)
            .map(|i| f(i as f64 / extent as f64) as f32)
            .collect();
        Tensor::<B, 4>::from_data(TensorData::new(values, shape), (&device, dtype))
    };
    let mixed = a.clone().narrow(axis, len_a - extent, extent) * weights(|t| 1.0 - t)
        + b.clone().narrow(axis, 0, extent) * weights(|t| t);
    if extent == len_b {
        mixed
    } else {
        Tensor::cat(vec![mixed, b.narrow(axis, extent, len_b - extent)], axis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SD 1.5's VAE: `sample_size` 512, four blocks (a factor of 8).
    fn sd15() -> VaeTiling {
        VaeTiling::new(512, 8).expect("geometry")
    }

    #[test]
    fn sd15_geometry_is_diffusers() {
        let tiling = sd15();
        assert_eq!((tiling.sample_tile, tiling.latent_tile), (512, 64));
        assert_eq!(
            tiling.decode_grid(),
            TileGrid {
                input_tile: 64,
                stride: 48,
                blend: 128,
                keep: 384
            }
        );
        assert_eq!(
            tiling.encode_grid(),
            TileGrid {
                input_tile: 512,
                stride: 384,
                blend: 16,
                keep: 48
            }
        );
        assert!(!tiling.tiles_decode([64, 64]));
        assert!(tiling.tiles_decode([64, 65]));
        assert!(!tiling.tiles_encode([512, 512]));
        assert!(tiling.tiles_encode([520, 512]));
    }

    #[test]
    fn spans_cover_the_axis_with_thin_last_tiles() {
        let grid = sd15().decode_grid();
        // 96 latents (768 px): tiles at 0 and 48, the second one 48 long.
        assert_eq!(grid.spans(96), vec![(0, 64), (48, 48)]);
        // 97: a third tile of one latent.
        assert_eq!(grid.spans(97), vec![(0, 64), (48, 49), (96, 1)]);
        assert_eq!(grid.tile_sizes([97, 40]), vec![[64, 40], [49, 40], [1, 40]]);
    }

    #[test]
    fn a_sample_size_too_small_to_advance_is_refused() {
        let err = VaeTiling::new(8, 8).expect_err("1-latent tiles");
        assert!(err.to_string().contains("sample_size of 8"), "{err}");
    }
}
