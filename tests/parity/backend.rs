//! Backend selection: never panics, never picks a software wgpu adapter unless asked.

use engine::EngineError;
use engine::backend::{BackendKind, BackendRequest, select_backend};

#[test]
fn cpu_is_always_available() {
    let selected = select_backend(BackendRequest::Cpu).unwrap();
    assert_eq!(selected.kind, BackendKind::Cpu);
    assert!(
        selected.to_string().starts_with("cpu (Burn flex"),
        "{selected}"
    );
}

#[test]
fn auto_prefers_hardware_and_never_a_software_adapter() {
    let selected = select_backend(BackendRequest::Auto).unwrap();
    eprintln!("auto selected: {selected}");
    assert!(
        !selected.software,
        "auto must not pick a software adapter: {selected}"
    );
}

#[test]
fn cuda_without_a_driver_is_an_error_not_a_panic() {
    match select_backend(BackendRequest::Cuda) {
        Ok(selected) => assert_eq!(selected.kind, BackendKind::Cuda),
        Err(err) => assert!(matches!(err, EngineError::Backend(_)), "{err}"),
    }
}

#[test]
fn backend_names_parse() {
    for (name, expected) in [
        ("auto", BackendRequest::Auto),
        ("cuda", BackendRequest::Cuda),
        ("wgpu", BackendRequest::Wgpu),
        ("cpu", BackendRequest::Cpu),
    ] {
        assert_eq!(name.parse::<BackendRequest>().unwrap(), expected);
    }
    let err = "metal".parse::<BackendRequest>().unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::InvalidInput {
                field: "backend",
                ..
            }
        ),
        "{err}"
    );
}
