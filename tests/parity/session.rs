//! The engine's one entry point (`engine::session::Session`), as the CLI and the worker use it:
//! default sizes, a failed load that keeps the loaded model, the ControlNet across reloads, and
//! which setting changes rebuild the models.

use engine::backend::{BackendRequest, ExecutionOptions};
use engine::models::AttnProcessor;
use engine::pipelines::{
    CancelToken, CommonRequest, GenerationRequest, Img2ImgInput, StepProgress, Task,
};
use engine::session::{EngineSettings, Session};
use engine::tensor_io::HostTensor;

use crate::common::fixture;

fn cpu_session() -> Session {
    Session::new(EngineSettings {
        backend: BackendRequest::Cpu,
        preview: false,
        ..EngineSettings::default()
    })
}

fn loaded(name: &str) -> Session {
    let mut session = cpu_session();
    let dir = fixture(name);
    session.load_dir(name, dir).unwrap();
    session
}

fn run(session: &Session, request: &GenerationRequest) -> HostTensor {
    session
        .generate(
            None,
            request,
            None,
            &CancelToken::new(),
            &mut |_: &StepProgress| {},
        )
        .unwrap()
        .images
}

/// A request that names no size (0 × 0): the model's default.
fn request() -> GenerationRequest {
    GenerationRequest {
        common: CommonRequest {
            prompt: "a castle".into(),
            steps: 2,
            seed: 5,
            width: 0,
            height: 0,
            ..Default::default()
        },
        task: Task::Txt2Img,
    }
}

#[test]
fn a_request_without_a_size_runs_at_the_models_default() {
    let session = loaded("tiny-sd");
    let unsized_run = run(&session, &request());
    // The UNet's sample_size times the VAE factor, square.
    let [_, h, w, _] = unsized_run.shape[..] else {
        panic!("{:?}", unsized_run.shape)
    };
    assert!(h > 0 && h == w, "{:?}", unsized_run.shape);
    let sized = run(
        &session,
        &GenerationRequest {
            common: CommonRequest {
                width: w,
                height: h,
                ..request().common
            },
            task: Task::Txt2Img,
        },
    );
    assert_eq!(sized, unsized_run, "the default size is the explicit one");

    // img2img without a size: the image's own, rounded down to the VAE factor (17 × 33 →
    // 16 × 32 for a factor of 2, 4 or 8).
    let image = HostTensor {
        shape: vec![17, 33, 3],
        values: vec![0.5; 17 * 33 * 3],
    };
    let out = run(
        &session,
        &GenerationRequest {
            task: Task::Img2Img(Img2ImgInput {
                image,
                strength: None,
            }),
            ..request()
        },
    );
    assert_eq!(out.shape, vec![1, 16, 32, 3]);
}

#[test]
fn a_failed_load_keeps_the_model_that_was_loaded() {
    let mut session = loaded("tiny-sd");
    let missing = fixture("tiny-sd").join("no-such-model");
    let err = session.load_dir("missing", missing).unwrap_err();
    assert!(err.to_string().contains("no-such-model"), "{err}");
    assert_eq!(session.model_spec(), Some("tiny-sd"));
    let out = run(
        &session,
        &GenerationRequest {
            common: CommonRequest {
                width: 16,
                height: 16,
                ..request().common
            },
            task: Task::Txt2Img,
        },
    );
    assert_eq!(out.shape, vec![1, 16, 16, 3]);
}

#[test]
fn a_controlnet_needs_a_model_and_is_attached_again_after_a_reload() {
    let mut session = cpu_session();
    let controlnet = fixture("tiny-controlnet");
    let err = session.load_controlnet_path("cn", &controlnet).unwrap_err();
    assert!(err.to_string().contains("load a model"), "{err}");

    let mut session = loaded("tiny-sd");
    session.load_controlnet_path("cn", &controlnet).unwrap();
    assert_eq!(session.controlnet(), Some("cn"));
    let loaded = session.load_dir("tiny-sd", fixture("tiny-sd")).unwrap();
    let again = loaded.controlnet.expect("the ControlNet is attached again");
    assert_eq!(again.spec, "cn");
    assert!(again.outcome.is_ok(), "{:?}", again.outcome);

    // IF takes no ControlNet: the error says so, and the choice is dropped.
    let loaded = session.load_dir("tiny-if", fixture("tiny-if")).unwrap();
    let dropped = loaded.controlnet.expect("a reattach was tried");
    let err = dropped.outcome.unwrap_err();
    assert!(err.to_string().contains("DeepFloyd IF"), "{err}");
    assert_eq!(session.controlnet(), None);
}

#[test]
fn only_backend_and_execution_changes_rebuild_the_models() {
    let mut session = loaded("tiny-sd");
    let settings = session.settings();
    let attention = EngineSettings {
        attention: AttnProcessor::Vanilla,
        ..settings
    };
    assert!(
        !session.set_settings(attention),
        "attention applies in place"
    );
    assert_eq!(session.model_spec(), Some("tiny-sd"));
    let unfused = EngineSettings {
        execution: ExecutionOptions {
            fusion: !settings.execution.fusion,
            ..settings.execution
        },
        ..attention
    };
    assert!(
        session.set_settings(unfused),
        "fusion is another backend type"
    );
    assert_eq!(session.unload().as_deref(), Some("tiny-sd"));
    assert_eq!(session.model_spec(), None);
}
