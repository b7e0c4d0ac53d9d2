//! A recorded noise tape (docs/cli.md, `--noise-tape`): the Gaussian draws of a diffusers run,
//! saved as tensors `rng.tape.0`, `rng.tape.1`, … and replayed in order in place of every draw
//! the pipeline makes. Diffusers has no such file; it is how a run there is reproduced here.

use std::path::{Path, PathBuf};

use burn::tensor::{bf16, f16};
use safetensors::{Dtype, SafeTensors};

use super::NoiseSource;
use crate::error::{EngineError, Result};

/// The key prefix of the tape's tensors in the safetensors file.
pub const TAPE_PREFIX: &str = "rng.tape.";

/// One recorded draw.
#[derive(Debug, Clone)]
struct Draw {
    shape: Vec<usize>,
    values: Vec<f32>,
}

/// Replays recorded draws in order; each [`NoiseSource::randn`] call takes the next one and
/// checks that it has the shape asked for.
#[derive(Debug, Clone)]
pub struct NoiseTape {
    draws: Vec<Draw>,
    next: usize,
    /// Where the tape came from, for error messages.
    origin: String,
}

impl NoiseTape {
    /// Loads `rng.tape.0`, `rng.tape.1`, … from a safetensors file (f32, f16, bf16 or f64;
    /// converted to f32). The numbering must be contiguous from 0; other tensors are ignored.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| EngineError::io(path, e))?;
        Self::from_safetensors_bytes(&bytes, path)
    }

    /// As [`NoiseTape::load`], from the bytes of a safetensors file; `path` names it in errors.
    pub fn from_safetensors_bytes(bytes: &[u8], path: &Path) -> Result<Self> {
        let st_err = |message: String| EngineError::Safetensors {
            file: PathBuf::from(path),
            message,
        };
        let file = SafeTensors::deserialize(bytes).map_err(|e| st_err(e.to_string()))?;
        let mut indices = Vec::new();
        for name in file.names() {
            if let Some(index) = name.strip_prefix(TAPE_PREFIX) {
                let index: usize = index
                    .parse()
                    .map_err(|_| st_err(format!("tensor `{name}` is not `{TAPE_PREFIX}<n>`")))?;
                indices.push(index);
            }
        }
        indices.sort_unstable();
        if let Some(missing) = indices.iter().enumerate().find(|(i, n)| i != *n) {
            return Err(st_err(format!(
                "noise tape numbering has a gap: `{TAPE_PREFIX}{}` is missing",
                missing.0
            )));
        }
        let mut draws = Vec::with_capacity(indices.len());
        for index in indices {
            let name = format!("{TAPE_PREFIX}{index}");
            let view = file.tensor(&name).map_err(|e| st_err(e.to_string()))?;
            let values = to_f32(view.dtype(), view.data()).ok_or_else(|| {
                st_err(format!(
                    "tensor `{name}` has dtype {:?}, expected a float type",
                    view.dtype()
                ))
            })?;
            draws.push(Draw {
                shape: view.shape().to_vec(),
                values,
            });
        }
        if draws.is_empty() {
            return Err(st_err(format!(
                "no `{TAPE_PREFIX}<n>` tensors: not a noise tape"
            )));
        }
        Ok(Self {
            draws,
            next: 0,
            origin: path.display().to_string(),
        })
    }

    /// A tape of in-memory draws `(shape, values)`, replayed in order.
    pub fn from_tensors(draws: Vec<(Vec<usize>, Vec<f32>)>) -> Result<Self> {
        let draws = draws
            .into_iter()
            .enumerate()
            .map(|(index, (shape, values))| {
                let numel: usize = shape.iter().product();
                if numel == values.len() {
                    Ok(Draw { shape, values })
                } else {
                    Err(EngineError::NoiseTape(format!(
                        "draw {index}: shape {shape:?} needs {numel} values, got {}",
                        values.len()
                    )))
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            draws,
            next: 0,
            origin: "in-memory tape".to_owned(),
        })
    }

    /// How many draws the tape holds.
    pub fn len(&self) -> usize {
        self.draws.len()
    }

    /// Whether the tape holds no draws.
    pub fn is_empty(&self) -> bool {
        self.draws.is_empty()
    }

    /// How many draws have not been replayed yet.
    pub fn remaining(&self) -> usize {
        self.draws.len() - self.next
    }
}

impl NoiseSource for NoiseTape {
    fn randn(&mut self, shape: &[usize]) -> Result<Vec<f32>> {
        let index = self.next;
        let Some(draw) = self.draws.get(index) else {
            return Err(EngineError::NoiseTape(format!(
                "{}: draw {index} of shape {shape:?} asked for, but the tape holds only {} draws",
                self.origin,
                self.draws.len()
            )));
        };
        // The exact shape, not just the element count: a tape recorded for another image size
        // or batch must not replay silently.
        if draw.shape != shape {
            return Err(EngineError::NoiseTape(format!(
                "{}: draw {index} expected shape {shape:?}, found `{TAPE_PREFIX}{index}` with shape {:?}",
                self.origin, draw.shape
            )));
        }
        self.next += 1;
        Ok(draw.values.clone())
    }
}

/// Little-endian float bytes of `dtype` to f32; `None` for non-float dtypes.
fn to_f32(dtype: Dtype, data: &[u8]) -> Option<Vec<f32>> {
    let values = match dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F64 => data
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32)
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => return None,
    };
    Some(values)
}
