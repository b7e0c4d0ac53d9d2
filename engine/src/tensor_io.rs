//! Host tensors in safetensors files: the CLI's `--latents`, `--prompt-embeds`, `--image-array`
//! inputs and `--save-array` output (docs/cli.md), and test references.

use std::collections::HashMap;
use std::path::Path;

use burn::tensor::{Tensor, TensorData, backend::Backend, bf16, f16};
use safetensors::{Dtype, SafeTensors, serialize};

pub use crate::atomic_file::write_atomic;
use crate::error::{EngineError, Result};

/// A float tensor on the host: row-major values and a shape.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

impl HostTensor {
    /// Uploads to `device` as a rank-`D` tensor, checking the rank.
    pub fn to_tensor<B: Backend, const D: usize>(
        &self,
        name: &str,
        device: &B::Device,
    ) -> Result<Tensor<B, D>> {
        if self.shape.len() != D {
            return Err(EngineError::invalid(
                "tensor",
                format!(
                    "`{name}` has shape {:?}, expected {D} dimensions",
                    self.shape
                ),
            ));
        }
        Ok(Tensor::from_data(
            TensorData::new(self.values.clone(), self.shape.clone()),
            device,
        ))
    }

    /// Downloads a tensor (converted to f32).
    pub fn from_tensor<B: Backend, const D: usize>(t: Tensor<B, D>) -> Result<Self> {
        let shape = t.dims().to_vec();
        let data = t
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(|e| EngineError::Backend(format!("reading a tensor back: {e:?}")))?;
        Ok(Self {
            shape,
            values: data,
        })
    }
}

/// Every tensor of a safetensors file, converted to f32 (f16, bf16, f64 and integer tensors too).
pub fn read_safetensors(path: &Path) -> Result<HashMap<String, HostTensor>> {
    let bytes = std::fs::read(path).map_err(|e| EngineError::io(path, e))?;
    let file = SafeTensors::deserialize(&bytes).map_err(|e| EngineError::Safetensors {
        file: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let mut out = HashMap::new();
    for (name, view) in file.tensors() {
        let values = to_f32(view.dtype(), view.data()).ok_or_else(|| EngineError::Safetensors {
            file: path.to_path_buf(),
            message: format!("tensor `{name}` has unsupported dtype {:?}", view.dtype()),
        })?;
        out.insert(
            name,
            HostTensor {
                shape: view.shape().to_vec(),
                values,
            },
        );
    }
    Ok(out)
}

/// The tensor names of a safetensors file, read from its header only (a 4 GB checkpoint is not
/// read to list its keys).
pub fn read_safetensors_keys(path: &Path) -> Result<Vec<String>> {
    Ok(read_safetensors_shapes(path)?
        .into_iter()
        .map(|(k, _)| k)
        .collect())
}

/// The tensor names and shapes of a safetensors file, from its header only, after checking the
/// header against the file: every tensor's byte range inside the data that follows the header,
/// and as long as its dtype and shape say. A file cut short (an interrupted copy of a 4 GB
/// checkpoint) or a header that does not match its data is an error naming the file and the
/// tensor, before anything maps the data (burn-store's memory-mapped reader trusts the header).
pub fn read_safetensors_shapes(path: &Path) -> Result<Vec<(String, Vec<usize>)>> {
    Ok(read_safetensors_header(path)?
        .into_iter()
        .map(|t| (t.name, t.shape))
        .collect())
}

/// One tensor as a safetensors header describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderTensor {
    pub name: String,
    pub shape: Vec<usize>,
    /// The header's dtype name (`F32`, `F16`, `BF16`, `I64`, …).
    pub dtype: String,
}

/// The tensors of a safetensors file from its header, checked against the file as
/// [`read_safetensors_shapes`] says.
pub fn read_safetensors_header(path: &Path) -> Result<Vec<HeaderTensor>> {
    use std::io::Read;
    let bad = |message: String| EngineError::Safetensors {
        file: path.to_path_buf(),
        message,
    };
    let mut file = std::fs::File::open(path).map_err(|e| EngineError::io(path, e))?;
    let file_len = file.metadata().map_err(|e| EngineError::io(path, e))?.len();
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|e| bad(format!("no safetensors header: {e}")))?;
    let len = u64::from_le_bytes(len);
    if len > 100 * 1024 * 1024 {
        return Err(bad(format!(
            "header of {len} bytes: not a safetensors file"
        )));
    }
    let data_len = file_len.checked_sub(8 + len).ok_or_else(|| {
        bad(format!(
            "the header claims {len} bytes but the file has {file_len}: cut short, or not a \
             safetensors file"
        ))
    })?;
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header)
        .map_err(|e| bad(format!("truncated header: {e}")))?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| bad(format!("header is not JSON: {e}")))?;
    header
        .into_iter()
        .filter(|(k, _)| k != "__metadata__")
        .map(|(k, v)| {
            let shape: Vec<usize> = v
                .get("shape")
                .and_then(|s| s.as_array())
                .and_then(|dims| {
                    dims.iter()
                        .map(|d| d.as_u64().map(|d| d as usize))
                        .collect()
                })
                .ok_or_else(|| bad(format!("`{k}` has no shape in the header")))?;
            let offsets: Vec<u64> = v
                .get("data_offsets")
                .and_then(|o| o.as_array())
                .and_then(|o| o.iter().map(serde_json::Value::as_u64).collect())
                .filter(|o: &Vec<u64>| o.len() == 2)
                .ok_or_else(|| bad(format!("`{k}` has no data_offsets in the header")))?;
            let (start, end) = (offsets[0], offsets[1]);
            if start > end || end > data_len {
                return Err(bad(format!(
                    "tensor `{k}` lies at bytes {start}..{end} of {data_len} bytes of data: the \
                     file is cut short or its header is wrong"
                )));
            }
            let dtype = v
                .get("dtype")
                .and_then(|d| d.as_str())
                .ok_or_else(|| bad(format!("`{k}` has no dtype in the header")))?
                .to_string();
            let element_bytes = dtype_bytes(&dtype);
            let elements = shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d as u64));
            if let (Some(size), Some(elements)) = (element_bytes, elements)
                && elements.checked_mul(size) != Some(end - start)
            {
                return Err(bad(format!(
                    "tensor `{k}` of shape {shape:?} takes {} bytes in the header: its dtype and \
                     shape say otherwise",
                    end - start
                )));
            }
            Ok(HeaderTensor {
                name: k,
                shape,
                dtype,
            })
        })
        .collect()
}

/// Bytes per element of a safetensors dtype name (`None` for ones we never read).
fn dtype_bytes(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" => 1,
        _ => return None,
    })
}

/// One named tensor of a safetensors file.
pub fn read_tensor(path: &Path, name: &str) -> Result<HostTensor> {
    read_safetensors(path)?
        .remove(name)
        .ok_or_else(|| EngineError::MissingTensor {
            key: name.to_string(),
            file: path.to_path_buf(),
        })
}

fn to_f32(dtype: Dtype, data: &[u8]) -> Option<Vec<f32>> {
    fn chunks<const N: usize>(data: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
        data.chunks_exact(N).map(|c| {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            a
        })
    }
    Some(match dtype {
        Dtype::F32 => chunks::<4>(data).map(f32::from_le_bytes).collect(),
        Dtype::F16 => chunks::<2>(data)
            .map(|b| f16::from_le_bytes(b).to_f32())
            .collect(),
        Dtype::BF16 => chunks::<2>(data)
            .map(|b| bf16::from_le_bytes(b).to_f32())
            .collect(),
        Dtype::F64 => chunks::<8>(data)
            .map(|b| f64::from_le_bytes(b) as f32)
            .collect(),
        Dtype::I64 => chunks::<8>(data)
            .map(|b| i64::from_le_bytes(b) as f32)
            .collect(),
        Dtype::I32 => chunks::<4>(data)
            .map(|b| i32::from_le_bytes(b) as f32)
            .collect(),
        _ => return None,
    })
}

/// Writes f32 tensors to a safetensors file, atomically (temp file + rename).
pub fn write_safetensors(path: &Path, tensors: &[(&str, &HostTensor)]) -> Result<()> {
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(name, t)| {
            let raw = t.values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (name.to_string(), raw, t.shape.clone())
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(name, raw, shape)| {
            safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), raw)
                .map(|v| (name.clone(), v))
                .map_err(|e| EngineError::Safetensors {
                    file: path.to_path_buf(),
                    message: e.to_string(),
                })
        })
        .collect::<Result<_>>()?;
    let data = serialize(views, None).map_err(|e| EngineError::Safetensors {
        file: path.to_path_buf(),
        message: e.to_string(),
    })?;
    write_atomic(path, &data)
}
