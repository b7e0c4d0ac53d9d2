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
