//! TorchGenerator against torch's own `randn` (tests/fixtures/refs/randn.safetensors, written by
//! tests/fixtures/gen_randn.py), and NoiseTape's replay and errors.

use std::path::PathBuf;

use engine::EngineError;
use engine::noise::{NoiseSource, NoiseTape, TorchGenerator};
use safetensors::SafeTensors;

fn refs_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/refs")
}

/// The f32 tensor `name` of a safetensors file, with its shape.
fn tensor(file: &SafeTensors<'_>, name: &str) -> (Vec<usize>, Vec<f32>) {
    let view = file
        .tensor(name)
        .unwrap_or_else(|e| panic!("missing `{name}`: {e}"));
    assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
    let values = view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    (view.shape().to_vec(), values)
}

/// Torch runs Box–Muller through its own f32 polynomials; we reproduce them, so the numbers
/// should agree to the last bit. Allow 1e-6 relative (the contract) and report bit-exactness.
fn assert_close(name: &str, ours: &[f32], torch: &[f32]) {
    assert_eq!(ours.len(), torch.len(), "{name}: length");
    let mut inexact = 0;
    for (i, (&a, &b)) in ours.iter().zip(torch).enumerate() {
        if a.to_bits() != b.to_bits() {
            inexact += 1;
        }
        let tol = 1e-6 * b.abs().max(1e-3);
        assert!(
            (a - b).abs() <= tol,
            "{name}[{i}]: ours {a} vs torch {b} (diff {})",
            (a - b).abs()
        );
    }
    assert_eq!(
        inexact, 0,
        "{name}: {inexact} values not bit-identical to torch"
    );
}

fn load_randn_refs() -> Vec<u8> {
    let path = refs_dir().join("randn.safetensors");
    std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run tests/fixtures/generate.py)", path.display()))
}

#[test]
fn randn_matches_torch_for_every_seed_and_shape() {
    let bytes = load_randn_refs();
    let file = SafeTensors::deserialize(&bytes).expect("randn.safetensors");
    let shapes: [&[usize]; 5] = [&[5], &[16], &[17], &[1, 4, 8, 16], &[3, 7, 11]];
    for seed in [0u64, 42, 1234] {
        for shape in shapes {
            let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
            let name = format!("seed{seed}_shape{}", dims.join("x"));
            let (ref_shape, expected) = tensor(&file, &name);
            assert_eq!(ref_shape, shape, "{name}");
            let ours = TorchGenerator::new(seed).randn(shape);
            assert_close(&name, &ours, &expected);
        }
    }
}

#[test]
fn randn_sequences_carry_generator_state() {
    let bytes = load_randn_refs();
    let file = SafeTensors::deserialize(&bytes).expect("randn.safetensors");
    let big: &[usize] = &[2, 4, 8, 16];
    let cases: [(&str, Vec<&[usize]>); 3] = [
        ("seq_seed7", vec![&[10], big]),
        ("seq2_seed7", vec![big, &[10]]),
        // The small draw's spare Box–Muller sample survives the big draw in between.
        ("seq3_seed7", vec![&[5], &[20], &[1]]),
    ];
    for (name, draws) in cases {
        let mut generator = TorchGenerator::new(7);
        let ours: Vec<f32> = draws
            .iter()
            .flat_map(|shape| generator.randn(shape))
            .collect();
        let (_, expected) = tensor(&file, name);
        assert_close(name, &ours, &expected);
    }
}

#[test]
fn generator_is_a_noise_source() {
    let mut direct = TorchGenerator::new(3);
    let mut source: Box<dyn NoiseSource> = Box::new(TorchGenerator::new(3));
    let shape = [1, 4, 8, 8];
    assert_eq!(source.randn(&shape).expect("draw"), direct.randn(&shape));
}

#[test]
fn tape_replays_draws_in_order() {
    let mut tape = NoiseTape::from_tensors(vec![
        (vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]),
        (vec![3], vec![5.0, 6.0, 7.0]),
    ])
    .expect("tape");
    assert_eq!(tape.len(), 2);
    assert_eq!(tape.randn(&[2, 2]).expect("draw 0"), [1.0, 2.0, 3.0, 4.0]);
    assert_eq!(tape.remaining(), 1);
    assert_eq!(tape.randn(&[3]).expect("draw 1"), [5.0, 6.0, 7.0]);
    assert_eq!(tape.remaining(), 0);
}

#[test]
fn tape_shape_mismatch_names_the_draw() {
    let mut tape =
        NoiseTape::from_tensors(vec![(vec![4], vec![0.0; 4]), (vec![2, 3], vec![0.0; 6])])
            .expect("tape");
    tape.randn(&[4]).expect("draw 0");
    // Same element count, different shape: still an error.
    let err = tape.randn(&[3, 2]).expect_err("shape mismatch");
    let message = err.to_string();
    assert!(matches!(err, EngineError::NoiseTape(_)), "{err:?}");
    assert!(message.contains("draw 1"), "{message}");
    assert!(
        message.contains("[3, 2]") && message.contains("[2, 3]"),
        "{message}"
    );
    // A failed draw is not consumed.
    assert_eq!(tape.randn(&[2, 3]).expect("draw 1 again").len(), 6);
}

#[test]
fn tape_exhaustion_is_an_error() {
    let mut tape = NoiseTape::from_tensors(vec![(vec![1], vec![0.5])]).expect("tape");
    tape.randn(&[1]).expect("draw 0");
    let err = tape.randn(&[1]).expect_err("exhausted");
    let message = err.to_string();
    assert!(
        message.contains("draw 1") && message.contains("only 1"),
        "{message}"
    );
}

#[test]
fn tape_rejects_values_that_do_not_fill_the_shape() {
    assert!(NoiseTape::from_tensors(vec![(vec![2, 2], vec![0.0; 3])]).is_err());
}

fn write_safetensors(
    path: &std::path::Path,
    tensors: &[(&str, safetensors::Dtype, Vec<usize>, Vec<u8>)],
) {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(name, dtype, shape, data)| {
            let view =
                safetensors::tensor::TensorView::new(*dtype, shape.clone(), data).expect("view");
            (name.to_string(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).expect("write safetensors");
}

#[test]
fn tape_loads_from_safetensors_converting_dtypes() {
    let dir = std::env::temp_dir().join(format!("brushfire-tape-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("tape.safetensors");
    let f32s: Vec<u8> = [1.5f32, -2.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let f64s: Vec<u8> = [0.25f64].iter().flat_map(|v| v.to_le_bytes()).collect();
    // 1.0 as f16 (0x3c00) and as bf16 (0x3f80).
    let f16s: Vec<u8> = 0x3c00u16.to_le_bytes().to_vec();
    let bf16s: Vec<u8> = 0x3f80u16.to_le_bytes().to_vec();
    write_safetensors(
        &path,
        &[
            ("rng.tape.0", safetensors::Dtype::F32, vec![2], f32s),
            ("rng.tape.1", safetensors::Dtype::F64, vec![1, 1], f64s),
            ("rng.tape.2", safetensors::Dtype::F16, vec![1], f16s),
            ("rng.tape.3", safetensors::Dtype::BF16, vec![1], bf16s),
            (
                "unrelated",
                safetensors::Dtype::F32,
                vec![1],
                0f32.to_le_bytes().to_vec(),
            ),
        ],
    );
    let mut tape = NoiseTape::load(&path).expect("load tape");
    assert_eq!(tape.len(), 4);
    assert_eq!(tape.randn(&[2]).expect("0"), [1.5, -2.0]);
    assert_eq!(tape.randn(&[1, 1]).expect("1"), [0.25]);
    assert_eq!(tape.randn(&[1]).expect("2"), [1.0]);
    assert_eq!(tape.randn(&[1]).expect("3"), [1.0]);

    // A gap in the numbering is refused.
    let gap = dir.join("gap.safetensors");
    write_safetensors(
        &gap,
        &[
            (
                "rng.tape.0",
                safetensors::Dtype::F32,
                vec![1],
                0f32.to_le_bytes().to_vec(),
            ),
            (
                "rng.tape.2",
                safetensors::Dtype::F32,
                vec![1],
                0f32.to_le_bytes().to_vec(),
            ),
        ],
    );
    let err = NoiseTape::load(&gap).expect_err("gap");
    assert!(err.to_string().contains("rng.tape.1"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
