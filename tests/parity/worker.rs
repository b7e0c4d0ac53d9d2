//! The engine worker thread: load, queue, progress, cancel, errors — as the UI drives it.

use std::time::{Duration, Instant};

use engine::backend::BackendRequest;
use engine::pipelines::{CommonRequest, ControlNetInput, GenerationRequest, Task};
use engine::worker::{EngineEvent, EngineHandle, EngineSettings, JobId};

use crate::common::fixture;

const TIMEOUT: Duration = Duration::from_secs(120);

fn settings() -> EngineSettings {
    EngineSettings {
        backend: BackendRequest::Cpu,
        ..Default::default()
    }
}

fn request() -> GenerationRequest {
    GenerationRequest {
        common: CommonRequest {
            prompt: "a castle".into(),
            steps: 3,
            width: 64,
            height: 64,
            seed: 3,
            ..Default::default()
        },
        task: Task::Txt2Img,
    }
}

/// Collects events until `done` says stop.
fn until(engine: &EngineHandle, mut done: impl FnMut(&EngineEvent) -> bool) -> Vec<EngineEvent> {
    let start = Instant::now();
    let mut seen = Vec::new();
    while start.elapsed() < TIMEOUT {
        if let Some(event) = engine.recv_timeout(Duration::from_millis(100)) {
            let stop = done(&event);
            seen.push(event);
            if stop {
                return seen;
            }
        }
    }
    panic!("timed out; events so far: {seen:?}");
}

fn loaded(engine: &EngineHandle) {
    engine.load_model(fixture("tiny-sd").to_str().unwrap());
    let events = until(engine, |e| {
        matches!(
            e,
            EngineEvent::ModelLoaded { .. } | EngineEvent::Failed { .. }
        )
    });
    assert!(
        matches!(events.last(), Some(EngineEvent::ModelLoaded { .. })),
        "{events:?}"
    );
}

#[test]
fn the_backend_is_announced_before_any_model_loads() {
    let engine = EngineHandle::spawn(settings(), || {}).unwrap();
    let events = until(&engine, |e| matches!(e, EngineEvent::Backend(_)));
    match events.last() {
        Some(EngineEvent::Backend(b)) => assert_eq!(b.kind, engine::backend::BackendKind::Cpu),
        other => panic!("expected the backend, got {other:?}"),
    }
}

fn is_end_of(job: JobId) -> impl FnMut(&EngineEvent) -> bool {
    move |e| match e {
        EngineEvent::Finished { job: j, .. } | EngineEvent::Cancelled { job: j } => *j == job,
        EngineEvent::Failed { job: Some(j), .. } => *j == job,
        _ => false,
    }
}

#[test]
fn generate_reports_progress_then_images() {
    let wakes = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let w = wakes.clone();
    let mut engine = EngineHandle::spawn(settings(), move || {
        w.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    })
    .unwrap();
    loaded(&engine);
    let job = engine.generate(request());
    let events = until(&engine, is_end_of(job));
    let steps: Vec<usize> = events
        .iter()
        .filter_map(|e| match e {
            EngineEvent::Progress { job: j, progress } if *j == job => Some(progress.step),
            _ => None,
        })
        .collect();
    // PNDM with skip_prk_steps makes one more UNet call than steps.
    assert_eq!(steps, vec![1, 2, 3, 4]);
    // A live preview after every step but the last, at latent size.
    let previews: Vec<(usize, Vec<usize>)> = events
        .iter()
        .filter_map(|e| match e {
            EngineEvent::Preview {
                job: j,
                step,
                image,
            } if *j == job => Some((*step, image.shape.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        previews,
        (1..4).map(|s| (s, vec![8, 8, 3])).collect::<Vec<_>>()
    );
    match events.last() {
        Some(EngineEvent::Finished { images, .. }) => assert_eq!(images.shape, vec![1, 64, 64, 3]),
        other => panic!("expected Finished, got {other:?}"),
    }
    assert!(wakes.load(std::sync::atomic::Ordering::SeqCst) >= events.len());
}

#[test]
fn queued_job_can_be_cancelled_and_the_other_still_runs() {
    let mut engine = EngineHandle::spawn(settings(), || {}).unwrap();
    loaded(&engine);
    let first = engine.generate(request());
    let second = engine.generate(request());
    engine.cancel(second);
    let events = until(&engine, is_end_of(second));
    assert!(
        events
            .iter()
            .any(|e| matches!(e, EngineEvent::Finished { job, .. } if *job == first))
    );
    assert!(matches!(events.last(), Some(EngineEvent::Cancelled { job }) if *job == second));
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, EngineEvent::JobStarted { job } if *job == second)),
        "a cancelled queued job never starts"
    );
}

#[test]
fn attention_that_cannot_fit_fails_the_job_before_any_work_and_the_worker_lives_on() {
    let settings = EngineSettings {
        attention: engine::models::AttnProcessor::Vanilla,
        ..settings()
    };
    let mut engine = EngineHandle::spawn(settings, || {}).unwrap();
    loaded(&engine);
    // 8192² with vanilla attention: a million latent tokens per image, terabytes of scores.
    // Checked against this machine's available memory, not allocated and killed.
    let mut huge = request();
    (huge.width, huge.height) = (8192, 8192);
    let job = engine.generate(huge);
    let events = until(&engine, is_end_of(job));
    match events.last() {
        Some(EngineEvent::Failed { error, .. }) => {
            assert!(error.contains("not enough memory"), "{error}");
            assert!(error.contains("this machine has"), "{error}");
            assert!(
                error.contains("fused attention holds no score matrix"),
                "{error}"
            );
        }
        other => panic!("the 8192² request did not fail: {other:?}"),
    }
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, EngineEvent::Progress { .. })),
        "no step ran: {events:?}"
    );
    let job = engine.generate(request());
    let events = until(&engine, is_end_of(job));
    assert!(
        matches!(events.last(), Some(EngineEvent::Finished { .. })),
        "{events:?}"
    );
}

#[test]
fn bad_input_fails_the_job_and_the_worker_lives_on() {
    let mut engine = EngineHandle::spawn(settings(), || {}).unwrap();
    // No model yet.
    let job = engine.generate(request());
    let events = until(&engine, is_end_of(job));
    assert!(
        matches!(events.last(), Some(EngineEvent::Failed { error, .. }) if error.contains("no model")),
        "{events:?}"
    );
    loaded(&engine);
    let mut bad = request();
    bad.width = 30;
    let job = engine.generate(bad);
    let events = until(&engine, is_end_of(job));
    assert!(
        matches!(events.last(), Some(EngineEvent::Failed { error, .. }) if error.contains("width")),
        "{events:?}"
    );
    // Still serving.
    let job = engine.generate(request());
    let events = until(&engine, is_end_of(job));
    assert!(matches!(events.last(), Some(EngineEvent::Finished { .. })));
}

#[test]
fn a_missing_model_folder_is_a_readable_error() {
    let engine = EngineHandle::spawn(settings(), || {}).unwrap();
    engine.load_model(fixture("does-not-exist").to_str().unwrap());
    let events = until(&engine, |e| {
        matches!(
            e,
            EngineEvent::Failed { .. } | EngineEvent::ModelLoaded { .. }
        )
    });
    assert!(
        matches!(events.last(), Some(EngineEvent::Failed { job: None, .. })),
        "{events:?}"
    );
}

#[test]
fn settings_apply_to_the_loaded_model() {
    let engine = EngineHandle::spawn(settings(), || {}).unwrap();
    loaded(&engine);
    let mut next = settings();
    next.attention = engine::models::AttnProcessor::Vanilla;
    engine.apply_settings(next);
    let events = until(&engine, |e| {
        matches!(
            e,
            EngineEvent::SettingsApplied(_) | EngineEvent::Failed { .. }
        )
    });
    assert!(
        matches!(events.last(), Some(EngineEvent::SettingsApplied(s)) if *s == next),
        "{events:?}"
    );
}

#[test]
fn previews_are_not_made_when_switched_off() {
    let mut engine = EngineHandle::spawn(
        EngineSettings {
            preview: false,
            ..settings()
        },
        || {},
    )
    .unwrap();
    loaded(&engine);
    let job = engine.generate(request());
    let events = until(&engine, is_end_of(job));
    assert!(matches!(events.last(), Some(EngineEvent::Finished { .. })));
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, EngineEvent::Preview { .. })),
        "{events:?}"
    );
}

#[test]
fn an_impossible_setting_is_refused_and_the_model_keeps_working() {
    let mut engine = EngineHandle::spawn(settings(), || {}).unwrap();
    loaded(&engine);
    let mut f16 = settings();
    f16.execution.precision = engine::backend::Precision::F16;
    engine.apply_settings(f16);
    let events = until(&engine, |e| matches!(e, EngineEvent::Failed { .. }));
    assert!(
        matches!(events.last(), Some(EngineEvent::Failed { job: None, error }) if error.contains("GPU")),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| matches!(e, EngineEvent::SettingsApplied(s) if *s == settings())),
        "the engine says which settings stay in effect: {events:?}"
    );
    let job = engine.generate(request());
    let events = until(&engine, is_end_of(job));
    assert!(
        matches!(events.last(), Some(EngineEvent::Finished { .. })),
        "{events:?}"
    );
}

#[test]
fn switching_fusion_rebuilds_the_model() {
    let mut engine = EngineHandle::spawn(settings(), || {}).unwrap();
    loaded(&engine);
    let mut next = settings();
    next.execution.fusion = false;
    engine.apply_settings(next);
    let events = until(&engine, |e| {
        matches!(
            e,
            EngineEvent::SettingsApplied(_) | EngineEvent::Failed { .. }
        )
    });
    assert!(
        events
            .iter()
            .any(|e| matches!(e, EngineEvent::ModelLoaded { .. })),
        "the model is rebuilt for the other backend type: {events:?}"
    );
    assert!(
        matches!(events.last(), Some(EngineEvent::SettingsApplied(s)) if *s == next),
        "{events:?}"
    );
    let job = engine.generate(request());
    let events = until(&engine, is_end_of(job));
    assert!(
        matches!(events.last(), Some(EngineEvent::Finished { .. })),
        "{events:?}"
    );
}

/// A ControlNet attaches to the loaded model (a single-file checkpoint here), stays attached
/// when the model reloads, and one that does not fit is refused with the old one kept.
#[test]
fn a_controlnet_attaches_and_survives_a_model_reload() {
    let mut engine = EngineHandle::spawn(settings(), || {}).unwrap();
    // Before any model: refused, nothing attached.
    engine.load_controlnet(fixture("tiny-controlnet").to_str().unwrap());
    let events = until(&engine, |e| {
        matches!(e, EngineEvent::ControlNetFailed { .. })
    });
    match events.last() {
        Some(EngineEvent::ControlNetFailed {
            error, attached, ..
        }) => {
            assert!(error.contains("load a model"), "{error}");
            assert!(attached.is_none());
        }
        other => panic!("{other:?}"),
    }
    loaded(&engine);
    let single = fixture("tiny-controlnet-single-file.safetensors");
    let single = single.to_str().unwrap();
    engine.load_controlnet(single);
    let events = until(&engine, |e| {
        matches!(
            e,
            EngineEvent::ControlNetLoaded { .. } | EngineEvent::ControlNetFailed { .. }
        )
    });
    assert!(
        matches!(events.last(), Some(EngineEvent::ControlNetLoaded { spec, .. }) if spec == single),
        "{events:?}"
    );
    let control = GenerationRequest {
        task: Task::ControlNet(ControlNetInput::new(engine::tensor_io::HostTensor {
            shape: vec![64, 64, 3],
            values: (0..64 * 64 * 3).map(|i| (i % 7) as f32 / 6.0).collect(),
        })),
        ..request()
    };
    let job = engine.generate(control.clone());
    let events = until(&engine, is_end_of(job));
    assert!(
        matches!(events.last(), Some(EngineEvent::Finished { .. })),
        "{events:?}"
    );

    // The model loads again: the ControlNet comes back with it, and still runs.
    loaded(&engine);
    let events = until(&engine, |e| {
        matches!(
            e,
            EngineEvent::ControlNetLoaded { .. } | EngineEvent::ControlNetFailed { .. }
        )
    });
    assert!(
        matches!(events.last(), Some(EngineEvent::ControlNetLoaded { .. })),
        "{events:?}"
    );
    let job = engine.generate(control);
    let events = until(&engine, is_end_of(job));
    assert!(
        matches!(events.last(), Some(EngineEvent::Finished { .. })),
        "{events:?}"
    );

    // Not a ControlNet: refused, and the one attached stays.
    engine.load_controlnet(fixture("tiny-sd-single-file.safetensors").to_str().unwrap());
    let events = until(&engine, |e| {
        matches!(e, EngineEvent::ControlNetFailed { .. })
    });
    match events.last() {
        Some(EngineEvent::ControlNetFailed {
            error, attached, ..
        }) => {
            assert!(error.contains("not a ControlNet"), "{error}");
            assert_eq!(attached.as_deref(), Some(single));
        }
        other => panic!("{other:?}"),
    }
}

/// A panic on the worker thread in the middle of a job (here raised by the waker the UI passes in,
/// from inside the denoising loop's progress callback) fails that job with its message; the worker,
/// its loaded model and the queue behind the job carry on.
#[test]
fn a_panic_inside_a_job_fails_that_job_and_the_next_one_runs() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let armed = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicUsize::new(0));
    let (trigger, counter) = (Arc::clone(&armed), Arc::clone(&calls));
    let mut engine = EngineHandle::spawn(settings(), move || {
        counter.fetch_add(1, Ordering::SeqCst);
        if trigger.swap(false, Ordering::SeqCst) {
            panic!("the waker broke");
        }
    })
    .unwrap();
    engine.load_model(fixture("tiny-sd").to_str().unwrap());
    let events = until(&engine, |e| matches!(e, EngineEvent::ModelLoaded { .. }));
    // Each event is sent, then the waker called: once it has been called for every event
    // received, the worker is idle and the next event it emits belongs to the first job.
    let start = Instant::now();
    while calls.load(Ordering::SeqCst) < events.len() {
        assert!(start.elapsed() < TIMEOUT, "the waker was not called");
        std::thread::sleep(Duration::from_millis(1));
    }
    armed.store(true, Ordering::SeqCst);
    let first = engine.generate(request());
    let second = engine.generate(request());
    let events = until(&engine, is_end_of(first));
    assert!(
        matches!(
            events.last(),
            Some(EngineEvent::Failed { job: Some(j), error })
                if *j == first && error.contains("internal error") && error.contains("the waker broke")
        ),
        "{events:?}"
    );
    assert!(!armed.load(Ordering::SeqCst), "the panic was raised");
    let events = until(&engine, is_end_of(second));
    match events.last() {
        Some(EngineEvent::Finished { job, images, .. }) => {
            assert_eq!(*job, second);
            assert_eq!(images.shape[0], 1);
        }
        other => panic!("the job after the panic did not finish: {other:?} in {events:?}"),
    }
}
