//! Shared helpers for the parity tests: fixture paths, reference tensors, tolerant comparison.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use burn::tensor::{Tensor, TensorData};
use engine::tensor_io::{HostTensor, read_safetensors};

/// The CPU backend every numerics test runs on.
pub type Cpu = burn::backend::Flex;

/// `tests/fixtures/<rel>` in the workspace.
pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(rel)
}

/// All tensors of `tests/fixtures/refs/<name>.safetensors`.
pub fn refs(name: &str) -> HashMap<String, HostTensor> {
    read_safetensors(&fixture(&format!("refs/{name}.safetensors"))).expect("reference file")
}

/// A reference tensor uploaded to the CPU backend.
pub fn tensor<const D: usize>(refs: &HashMap<String, HostTensor>, name: &str) -> Tensor<Cpu, D> {
    let t = &refs[name];
    Tensor::from_data(
        TensorData::new(t.values.clone(), t.shape.clone()),
        &Default::default(),
    )
}

/// Asserts `actual` equals `expected` elementwise within `atol + rtol·|expected|`, and that the
/// shapes agree. Reports the worst element.
pub fn assert_close(actual: &HostTensor, expected: &HostTensor, atol: f32, rtol: f32, what: &str) {
    assert_eq!(actual.shape, expected.shape, "{what}: shape");
    let mut worst = (0usize, 0f32);
    for (i, (a, e)) in actual.values.iter().zip(&expected.values).enumerate() {
        let err = (a - e).abs();
        let allowed = atol + rtol * e.abs();
        assert!(
            a.is_finite() && err <= allowed,
            "{what}: element {i}: got {a}, expected {e} (|diff| {err} > {allowed})"
        );
        if err > worst.1 {
            worst = (i, err);
        }
    }
    eprintln!("{what}: max |diff| {:.3e} at {}", worst.1, worst.0);
}

/// The parity bound for f32 when the reference itself is more accurate than it (the project's
/// rule, docs/architecture.md §5: within 1e-4 in f32): no parity test allows less.
pub const PARITY_FLOOR: f32 = 1e-4;

/// How many times the reference's own float32 error a parity test allows. Two float32
/// computations of the same maths differ by at most the sum of their errors against the exact
/// result; the reference's error is measured (`refs/float_error.json`), and ours is allowed up
/// to twice it (other summation orders: flex's AVX2 and AVX-512 kernels block differently, and
/// neither sums as PyTorch's oneDNN does). 1 + 2 = 3.
pub const FLOAT_ERROR_MARGIN: f32 = 3.0;

/// `refs/float_error.json` (written by `tests/fixtures/gen_float_error.py`): per reference file
/// and tensor, the float32 reference's distance from a float64 run of the same generator.
fn float_errors() -> &'static serde_json::Value {
    static ERRORS: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();
    ERRORS.get_or_init(|| {
        let text = std::fs::read_to_string(fixture("refs/float_error.json"))
            .expect("refs/float_error.json (tests/fixtures/gen_float_error.py)");
        serde_json::from_str(&text).expect("float_error.json is JSON")
    })
}

/// The absolute tolerance for tensor `tensor` of reference `file` (`refs/<file>.safetensors`):
/// [`FLOAT_ERROR_MARGIN`] times the reference's measured float32 error, and never below
/// [`PARITY_FLOOR`]. A reference without a measured error is a test bug, not a pass.
pub fn parity_tolerance(file: &str, tensor: &str) -> f32 {
    let measured = float_errors()[format!("{file}.safetensors")][tensor]["f32_error"]
        .as_f64()
        .unwrap_or_else(|| {
            panic!("no measured float32 error for {file}/{tensor} in refs/float_error.json")
        }) as f32;
    PARITY_FLOOR.max(FLOAT_ERROR_MARGIN * measured)
}

/// Asserts `actual` equals tensor `tensor` of `refs/<file>.safetensors` within
/// [`parity_tolerance`] (plus 1e-4 relative), reporting the tolerance used.
pub fn assert_parity(actual: &HostTensor, file: &str, tensor: &str, what: &str) {
    let atol = parity_tolerance(file, tensor);
    eprintln!("{what}: tolerance {atol:.2e} ({file}/{tensor})");
    assert_close(actual, &refs(file)[tensor], atol, PARITY_FLOOR, what);
}

/// Downloads a tensor for comparison.
pub fn host<const D: usize>(t: Tensor<Cpu, D>) -> HostTensor {
    HostTensor::from_tensor(t).expect("download")
}

/// A fixture PNG as `[h, w, 3]` in [0, 1] (how the CLI and the app read images).
pub fn rgb_png(rel: &str) -> HostTensor {
    let img = image::open(fixture(rel)).unwrap().to_rgb8();
    HostTensor {
        shape: vec![img.height() as usize, img.width() as usize, 3],
        values: img.as_raw().iter().map(|&v| f32::from(v) / 255.0).collect(),
    }
}
