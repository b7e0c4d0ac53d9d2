//! The desktop app driven through egui_kittest: the real app state and engine worker, on the
//! tiny fixture model and the CPU backend.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use app::gui::{BenchForm, BrushfireApp, ModelStatus, Persisted, Setting, View};
use eframe::egui;
use eframe::egui::accesskit::Role;
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use engine::backend::{BackendRequest, Precision};
use engine::bench::{BenchColumn, BenchModels, BenchPipeline, CellOutcome};
use engine::models::{AttnProcessor, MemoryFormat};
use engine::schedulers::SchedulerKind;

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(rel)
}

fn app() -> BrushfireApp {
    let mut app = BrushfireApp::new(fixture("tiny-sd").to_string_lossy().into_owned());
    app.state.settings.backend = BackendRequest::Cpu;
    app.state.output_dir = None;
    app.state.form.width = 64;
    app.state.form.height = 64;
    app.state.form.steps = 3;
    app
}

fn harness(app: BrushfireApp) -> Harness<'static, BrushfireApp> {
    Harness::builder()
        .with_size(egui::vec2(1200.0, 800.0))
        .build_ui_state(|ui, app: &mut BrushfireApp| app.root_ui(ui), app)
}

/// Steps the UI until `done` holds (the engine works on its own thread meanwhile).
fn wait(h: &mut Harness<'static, BrushfireApp>, what: &str, done: impl Fn(&BrushfireApp) -> bool) {
    let start = Instant::now();
    while !done(h.state()) {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
        h.step();
    }
}

#[test]
fn type_a_prompt_press_generate_and_get_an_image() {
    let mut h = harness(app());
    h.step();
    wait(&mut h, "the model", |a| a.state.model_ready());
    h.get_by_role_and_label(Role::MultilineTextInput, "Prompt")
        .focus();
    h.run_steps(2);
    h.get_by_role_and_label(Role::MultilineTextInput, "Prompt")
        .type_text("a castle on a hill");
    h.run_steps(2);
    assert_eq!(h.state().state.form.prompt, "a castle on a hill");
    h.get_by_label("Generate").click();
    h.run_steps(2);
    assert_eq!(h.state().state.jobs.len(), 1, "the job is queued");
    wait(&mut h, "the image", |a| !a.state.gallery.is_empty());
    let app = h.state();
    assert_eq!(app.state.gallery.len(), 1);
    assert_eq!(
        (app.state.gallery[0].width, app.state.gallery[0].height),
        (64, 64)
    );
    assert_eq!(app.state.gallery[0].params.prompt, "a castle on a hill");
    assert!(app.state.jobs.is_empty());
    assert!(app.state.error.is_none(), "{:?}", app.state.error);
}

#[test]
fn an_invalid_size_shows_an_error_and_keeps_the_prompt() {
    let mut a = app();
    a.state.form.width = 60;
    a.state.form.prompt = "keep me".into();
    let mut h = harness(a);
    h.step();
    wait(&mut h, "the model", |a| a.state.model_ready());
    h.get_by_label("Generate").click();
    h.run_steps(2);
    wait(&mut h, "the error", |a| a.state.error.is_some());
    let state = &h.state().state;
    assert!(
        state.error.as_deref().unwrap_or_default().contains("width"),
        "{:?}",
        state.error
    );
    assert_eq!(state.form.prompt, "keep me");
    assert!(state.jobs.is_empty());
}

#[test]
fn queue_two_jobs_and_cancel_one() {
    let mut a = app();
    a.state.form.prompt = "two".into();
    let mut h = harness(a);
    h.step();
    wait(&mut h, "the model", |a| a.state.model_ready());
    h.state_mut().state.queue_generation();
    h.state_mut().state.queue_generation();
    let second = h.state().state.jobs[1].id;
    h.state_mut().state.cancel(second);
    wait(&mut h, "the queue to empty", |a| a.state.jobs.is_empty());
    assert_eq!(
        h.state().state.gallery.len(),
        1,
        "only the first job made an image"
    );
}

#[test]
fn each_setting_reaches_the_engine_and_cpu_only_greys_out_the_rest() {
    let mut h = harness(app());
    h.step();
    wait(&mut h, "the model", |a| a.state.model_ready());
    h.get_by_label("Vanilla").click();
    h.run_steps(2);
    wait(&mut h, "vanilla attention in the engine", |a| {
        a.state
            .engine_settings
            .is_some_and(|s| s.attention == AttnProcessor::Vanilla)
    });
    h.get_by_label("Sliced").click();
    h.run_steps(2);
    wait(&mut h, "sliced attention in the engine", |a| {
        a.state
            .engine_settings
            .is_some_and(|s| matches!(s.attention, AttnProcessor::Sliced { .. }))
    });
    h.get_by_label("Live preview").click();
    h.run_steps(2);
    wait(&mut h, "previews off in the engine", |a| {
        a.state.engine_settings.is_some_and(|s| !s.preview)
    });
    h.get_by_label("Channels-last").click();
    h.run_steps(2);
    wait(&mut h, "channels-last in the engine", |a| {
        a.state
            .engine_settings
            .is_some_and(|s| s.memory_format == MemoryFormat::ChannelsLast)
    });
    // On the CPU backend fusion and f16 cannot be chosen.
    h.get_by_label("Kernel fusion (\"compile\")").click();
    h.get_by_label("f16").click();
    h.run_steps(3);
    let state = &h.state().state;
    assert!(state.settings.execution.fusion, "fusion stays as it was");
    assert_eq!(state.settings.execution.precision, Precision::F32);
    for setting in [Setting::Fusion, Setting::Precision(Precision::F16)] {
        assert!(state.unavailable_reason(setting).is_some(), "{setting:?}");
    }
    assert!(state.unavailable_reason(Setting::ChannelsLast).is_none());
    assert!(
        state
            .unavailable_reason(Setting::Precision(Precision::F32))
            .is_none()
    );
    assert!(state.error.is_none(), "{:?}", state.error);
}

#[test]
fn dropping_an_a1111_png_fills_the_form() {
    let dir = std::env::temp_dir().join(format!("brushfire-drop-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let png = dir.join("a1111.png");
    let mut bytes = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut bytes, 2, 2);
        encoder.set_color(png::ColorType::Rgb);
        encoder
            .add_text_chunk(
                "parameters".into(),
                "a lighthouse at dusk, oil painting\nNegative prompt: people\nSteps: 31, \
                 Sampler: DDIM, Schedule type: Automatic, CFG scale: 5.5, Seed: 987654321, \
                 Size: 640x384, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.10.1"
                    .into(),
            )
            .unwrap();
        let mut writer = encoder.write_header().unwrap();
        writer.write_image_data(&[0; 12]).unwrap();
    }
    std::fs::write(&png, bytes).unwrap();

    let mut h = harness(app());
    h.step();
    h.input_mut().dropped_files.push(egui::DroppedFile {
        path: Some(png.clone()),
        ..Default::default()
    });
    h.run_steps(2);
    let form = &h.state().state.form;
    assert_eq!(form.prompt, "a lighthouse at dusk, oil painting");
    assert_eq!(form.negative_prompt, "people");
    assert_eq!(
        (form.steps, form.guidance, form.seed),
        (31, 5.5, 987_654_321)
    );
    assert!(form.seed_locked, "a restored seed is kept for the next run");
    assert_eq!((form.width, form.height), (640, 384));
    assert_eq!(form.scheduler, Some(SchedulerKind::Ddim));

    // A PNG without parameters is an error message, and the form is untouched.
    let plain = dir.join("plain.png");
    image::RgbImage::new(2, 2).save(&plain).unwrap();
    h.input_mut().dropped_files.push(egui::DroppedFile {
        path: Some(plain),
        ..Default::default()
    });
    h.run_steps(2);
    let state = &h.state().state;
    assert!(
        state
            .error
            .as_deref()
            .unwrap_or_default()
            .contains("no generation parameters"),
        "{:?}",
        state.error
    );
    assert_eq!(state.form.prompt, "a lighthouse at dusk, oil painting");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn gallery_reuse_puts_seed_and_parameters_back() {
    let mut a = app();
    a.state.form.prompt = "reuse me".into();
    a.state.form.negative_prompt = "not this".into();
    let mut h = harness(a);
    h.step();
    wait(&mut h, "the model", |a| a.state.model_ready());
    h.get_by_label("Generate").click();
    h.run_steps(2);
    wait(&mut h, "the image", |a| !a.state.gallery.is_empty());
    let made = h.state().state.gallery[0].params.clone();
    {
        let form = &mut h.state_mut().state.form;
        form.prompt = "something else".into();
        form.seed = 1;
        form.steps = 9;
        form.seed_locked = false;
    }
    h.get_by_label("Reuse seed").click();
    h.run_steps(2);
    let form = &h.state().state.form;
    assert_eq!((form.seed, form.seed_locked), (made.seed, true));
    assert_eq!(form.prompt, "something else", "only the seed");
    h.get_by_label("Reuse parameters").click();
    h.run_steps(2);
    let form = &h.state().state.form;
    assert_eq!(form.prompt, "reuse me");
    assert_eq!(form.negative_prompt, "not this");
    assert_eq!(form.steps, made.steps);
    assert_eq!((form.width, form.height), (64, 64));
}

#[test]
fn the_form_and_settings_survive_a_restart() {
    let mut a = app();
    a.state.form.prompt = "remember me".into();
    a.state.form.steps = 42;
    a.state.form.scheduler = Some(SchedulerKind::EulerAncestral);
    a.state.settings.attention = AttnProcessor::Sliced { slice_size: 1 };
    a.state.settings.preview = false;
    a.state.settings.memory_format = MemoryFormat::ChannelsLast;
    a.state.recent_models = vec!["org/a".into(), "org/b".into()];
    let stored = serde_json::to_string(&a.state.to_persisted()).unwrap();
    let back: Persisted = serde_json::from_str(&stored).unwrap();
    let restored = BrushfireApp::restored(&back, None);
    assert_eq!(restored.state.to_persisted(), a.state.to_persisted());
    assert_eq!(restored.state.form.prompt, "remember me");
    assert_eq!(
        restored.state.settings.memory_format,
        MemoryFormat::ChannelsLast
    );
    assert_eq!(restored.state.model_spec, a.state.model_spec);
    // A model named on the command line wins; unknown stored values fall back to defaults.
    let restored = BrushfireApp::restored(&back, Some("org/other".into()));
    assert_eq!(restored.state.model_spec, "org/other");
    let odd: Persisted = serde_json::from_str(r#"{"attention": "warp", "steps": 0}"#).unwrap();
    let restored = BrushfireApp::restored(&odd, None);
    assert_eq!(restored.state.settings.attention, AttnProcessor::default());
    assert_eq!(restored.state.form.steps, 1);
}

#[test]
fn a_model_not_downloaded_is_offered_not_fetched() {
    let home = std::env::temp_dir().join(format!("brushfire-gui-hf-{}", std::process::id()));
    std::fs::create_dir_all(&home).unwrap();
    // SAFETY: only this test reads the HF variables (the others load local folders).
    unsafe {
        std::env::set_var("HF_HOME", &home);
        std::env::remove_var("HF_HUB_OFFLINE");
    }
    let mut a = app();
    a.state.model_spec = "brushfire-test/not-downloaded".into();
    let mut h = harness(a);
    h.run_steps(3);
    assert_eq!(
        h.state().state.model_status,
        ModelStatus::NeedsDownload {
            repo_id: "brushfire-test/not-downloaded".into()
        }
    );
    h.get_by_label("Download");
    assert!(!h.state().state.model_ready());
    // Offline it says so plainly instead.
    unsafe { std::env::set_var("HF_HUB_OFFLINE", "1") };
    h.state_mut().state.load_model();
    h.run_steps(2);
    assert!(matches!(
        h.state().state.model_status,
        ModelStatus::Offline { .. }
    ));
    h.get_by_label_contains("HF_HUB_OFFLINE");
    unsafe { std::env::remove_var("HF_HUB_OFFLINE") };
}

/// The app on the Benchmark page with `form` set (tiny model configs), its Run button pressed.
fn start_benchmark(form: BenchForm) -> Harness<'static, BrushfireApp> {
    let mut a = app();
    a.state.bench.models =
        Some(BenchModels::from_dir(&fixture("tiny-sd")).expect("tiny model configs"));
    let mut h = harness(a);
    h.step();
    wait(&mut h, "the backend", |a| a.state.backend.is_some());
    h.get_by_label("⏱ Benchmark").click();
    h.run_steps(2);
    assert_eq!(h.state().state.view, View::Benchmark);
    h.state_mut().state.bench.form = form;
    // New widgets take a frame to be laid out before they take clicks.
    h.run_steps(3);
    h.get_by_label("▶ Run benchmark").click();
    h.run_steps(1);
    assert!(
        h.state().state.bench.running.is_some(),
        "the run started: {:?}",
        h.state().state.error
    );
    h
}

#[test]
fn the_benchmark_panel_runs_a_plan_shows_the_table_and_exports_it() {
    let mut h = start_benchmark(BenchForm {
        pipelines: vec![BenchPipeline::SdTxt2Img, BenchPipeline::SdImg2Img],
        batches: vec![1],
        size: 256,
        columns: vec![BenchColumn::Baseline, BenchColumn::Fused],
        precision: None,
        steps: 2,
        runs: 1,
    });
    wait(&mut h, "the report", |a| a.state.bench.report.is_some());
    let bench = &h.state().state.bench;
    assert!(bench.running.is_none());
    assert_eq!(bench.cells.len(), 4, "2 pipelines × 2 columns");
    for cell in &bench.cells {
        match (&cell.spec.pipeline, &cell.outcome) {
            (
                BenchPipeline::SdTxt2Img,
                CellOutcome::Measured {
                    it_per_sec,
                    unet_evals,
                    ..
                },
            ) => {
                assert!(*it_per_sec > 0.0);
                assert_eq!(*unet_evals, 3, "PNDM: 2 steps are 3 UNet evaluations");
            }
            (BenchPipeline::SdImg2Img, CellOutcome::Failed { reason }) => {
                assert!(reason.contains("not implemented"), "{reason}");
            }
            other => panic!("unexpected cell {other:?}"),
        }
    }
    assert!(
        h.state().state.error.is_none(),
        "{:?}",
        h.state().state.error
    );
    // The table and the chart are on screen.
    h.run_steps(2);
    h.get_by_label("sd-txt2img 256² ×1");
    h.get_by_label("Copy markdown");
    // Export (the file dialog itself cannot be driven; this is what it calls).
    let dir = std::env::temp_dir().join(format!("brushfire-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let csv = dir.join("bench.csv");
    h.state_mut().state.bench.export(&csv).expect("csv export");
    let text = std::fs::read_to_string(&csv).expect("csv written");
    assert_eq!(text.lines().count(), 5, "header + 4 cells:\n{text}");
    let md = dir.join("bench.md");
    h.state_mut()
        .state
        .bench
        .export(&md)
        .expect("markdown export");
    assert!(
        std::fs::read_to_string(&md)
            .expect("md")
            .contains("| sd-txt2img |")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_running_benchmark_can_be_cancelled() {
    let mut h = start_benchmark(BenchForm {
        pipelines: vec![BenchPipeline::SdTxt2Img],
        batches: vec![1],
        size: 256,
        columns: vec![BenchColumn::Baseline],
        precision: None,
        steps: 200,
        runs: 10,
    });
    wait(&mut h, "the first step (or an early end)", |a| {
        a.state
            .bench
            .running
            .as_ref()
            .is_none_or(|r| r.step.is_some())
    });
    assert!(
        h.state().state.bench.running.is_some(),
        "the run ended early: {:?} {:?}",
        h.state().state.bench.status,
        h.state().state.error
    );
    h.get_by_label("Cancel benchmark").click();
    wait(&mut h, "the cancellation", |a| {
        a.state.bench.running.is_none()
    });
    let bench = &h.state().state.bench;
    assert!(bench.report.is_none());
    assert!(
        bench
            .status
            .as_deref()
            .is_some_and(|s| s.contains("cancelled")),
        "{:?}",
        bench.status
    );
    assert!(
        h.state().state.error.is_none(),
        "{:?}",
        h.state().state.error
    );
}
