//! Brushfire's own CubeCL kernels, each beside the plain-tensor definition (`*_reference`) it is
//! tested against.
//!
//! - [`attention::flash_attention`]: fused attention with f32 accumulation for any float type,
//!   scale and strides (the fused processor's kernel where Burn's flash kernels do not apply).

pub mod attention;
#[cfg(test)]
mod nvrtc_check;

pub use attention::{flash_attention, flash_attention_reference};

/// Why a kernel was not launched.
#[derive(Debug, thiserror::Error)]
pub enum ShaderError {
    /// The inputs' shapes do not fit together.
    #[error("invalid attention inputs: {what}")]
    Shape {
        /// What was wrong.
        what: String,
    },
    /// The problem is valid but this kernel or this device does not take it.
    #[error("the kernel does not support {what}")]
    Unsupported {
        /// What is not supported.
        what: String,
    },
}
