//! The desktop app driven through egui_kittest: the real app state and engine worker, on the
//! tiny fixture model and the CPU backend.
// Test code: a failed unwrap is the test failing, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use app::gui::command::Command;
use app::gui::control_input::{DEFAULT_CONTROLNET, MapSource};
use app::gui::{BenchForm, BrushfireApp, ModelStatus, Persisted, Setting, View};
use eframe::egui;
use eframe::egui::accesskit::Role;
use egui_kittest::Harness;
use egui_kittest::kittest::{NodeT, Queryable};
use engine::backend::{BackendRequest, Precision};
use engine::bench::{BenchColumn, BenchModels, BenchPipeline, CellOutcome};
use engine::models::{AttnProcessor, MemoryFormat};
use engine::pipelines::Task;
use engine::pipelines::control_preprocess::Canny;
use engine::schedulers::SchedulerKind;

mod support;
use support::{copy_dir, fixture, png_header_only, scratch};

fn app() -> BrushfireApp {
    let mut app = BrushfireApp::new(fixture("tiny-sd").to_string_lossy().into_owned());
    app.state.setup.settings.backend = BackendRequest::Cpu;
    app.state.output_dir = None;
    app.state.form.width = 64;
    app.state.form.height = 64;
    app.state.form.steps = 3;
    app
}

fn harness(app: BrushfireApp) -> Harness<'static, BrushfireApp> {
    Harness::builder()
        .with_size(egui::vec2(1200.0, 800.0))
        .build_ui_state(
            |ui, app: &mut BrushfireApp| {
                app.logic(ui.ctx());
                app.root_ui(ui);
            },
            app,
        )
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
    type_prompt(&mut h, "a castle on a hill");
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

/// A prompt with a typographic apostrophe, CJK and an emoji is saved and reads back equal; the
/// gallery never overwrites a file already in its folder; and a folder that cannot be written
/// keeps the image in the gallery and says so.
#[test]
fn unicode_prompts_save_and_no_image_is_overwritten_or_lost() {
    let dir = std::env::temp_dir().join(format!("brushfire-gui-save-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut app = app();
    app.state.output_dir = Some(dir.clone());
    app.state.form.seed = 11;
    app.state.form.seed_locked = true;
    let prompt = "a fox’s den — 猫 🎨";
    app.state.form.prompt = prompt.into();
    // Someone else's picture under the name the gallery would pick first.
    let taken = dir.join("00000-11-0.png");
    std::fs::write(&taken, b"not ours").unwrap();
    let mut h = harness(app);
    h.step();
    wait(&mut h, "the model", |a| a.state.model_ready());
    h.get_by_label("Generate").click();
    // Written on the saver thread: the gallery shows the image first, then learns its file.
    wait(&mut h, "the image, saved", |a| {
        a.state.gallery.first().is_some_and(|g| !g.saving())
    });
    let saved = h.state().state.gallery[0].path.clone().expect("saved");
    assert_ne!(saved, taken);
    assert_eq!(std::fs::read(&taken).unwrap(), b"not ours");
    let text = app::png_meta::read_parameters_text(&saved)
        .unwrap()
        .unwrap();
    assert_eq!(app::png_meta::ParsedParameters::parse(&text).prompt, prompt);
    assert!(
        h.state().state.error.is_none(),
        "{:?}",
        h.state().state.error
    );

    // The output "folder" is a file now: the image stays in the gallery, unsaved, and the
    // error says where it is.
    let blocked = dir.join("not-a-folder");
    std::fs::write(&blocked, b"x").unwrap();
    h.state_mut()
        .state
        .apply(Command::SetOutputDir(Some(blocked)));
    h.get_by_label("Generate").click();
    wait(&mut h, "the second image's save", |a| {
        a.state.gallery.get(1).is_some_and(|g| !g.saving())
    });
    let state = &h.state().state;
    assert!(state.gallery[1].path.is_none());
    assert_eq!(state.gallery[1].params.prompt, prompt);
    let error = state.error.clone().expect("an error");
    assert!(
        error.contains("not-a-folder") && error.contains("stays in the gallery"),
        "{error}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn vae_tiling_reaches_every_request_and_the_tiled_image_comes_back() {
    let mut h = harness(app());
    h.step();
    wait(&mut h, "the model", |a| a.state.model_ready());
    h.get_by_label("VAE tiling").click();
    h.run_steps(2);
    assert!(h.state().state.setup.vae_tiling);
    // 128 px is two of the tiny VAE's 64 px tiles.
    set_number(&h, "Width", 128.0);
    type_prompt(&mut h, "a castle on a hill");
    assert_eq!(h.state().state.form.width, 128, "set through the field");
    h.get_by_label("Generate").click();
    h.run_steps(2);
    assert!(h.state().state.jobs[0].request.vae_tiling);
    wait(&mut h, "the image", |a| !a.state.gallery.is_empty());
    let app = h.state();
    assert!(app.state.error.is_none(), "{:?}", app.state.error);
    assert_eq!(
        (app.state.gallery[0].width, app.state.gallery[0].height),
        (128, 64)
    );
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
fn a_request_too_big_for_memory_says_why_in_full_and_dismiss_stays_on_screen() {
    let mut a = app();
    a.state.setup.settings.attention = AttnProcessor::Vanilla;
    (a.state.form.width, a.state.form.height) = (8192, 8192);
    a.state.form.prompt = "keep me".into();
    let mut h = harness(a);
    h.step();
    wait(&mut h, "the model", |a| a.state.model_ready());
    h.get_by_label("Generate").click();
    h.run_steps(2);
    wait(&mut h, "the error", |a| a.state.error.is_some());
    h.run_steps(2);
    let error = h.state().state.error.clone().unwrap_or_default();
    assert!(error.contains("not enough memory"), "{error}");
    // The whole reason is on screen, wrapped inside the window, with its Dismiss button.
    let window = egui::vec2(1200.0, 800.0);
    let text = h.get_by_label_contains("fused attention holds no score matrix");
    let r = text.rect();
    assert!(r.right() <= window.x && r.bottom() <= window.y, "{r:?}");
    assert!(r.height() > 20.0, "wrapped over lines: {r:?}");
    let dismiss = h.get_by_label("Dismiss");
    assert!(dismiss.rect().right() <= window.x, "{:?}", dismiss.rect());
    dismiss.click();
    h.run_steps(2);
    assert!(h.state().state.error.is_none());
    assert_eq!(h.state().state.form.prompt, "keep me");
}

#[test]
fn queue_two_jobs_and_cancel_one() {
    let mut a = app();
    a.state.form.prompt = "two".into();
    let mut h = harness(a);
    h.step();
    wait(&mut h, "the model", |a| a.state.model_ready());
    h.state_mut().state.apply(Command::Generate);
    h.state_mut().state.apply(Command::Generate);
    let second = h.state().state.jobs[1].id;
    h.state_mut().state.apply(Command::Cancel(second));
    wait(&mut h, "the queue to empty", |a| a.state.jobs.is_empty());
    assert_eq!(
        h.state().state.gallery.len(),
        1,
        "only the first job made an image"
    );
}

/// A panic on the engine's thread in the middle of a job (raised here by the waker the app passes
/// the engine, from inside the denoising loop) does not take the window down: that job leaves the
/// queue, the message is shown, and the next job makes its image.
#[test]
fn a_panic_inside_a_job_fails_it_and_the_next_job_runs() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let armed = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicUsize::new(0));
    let (trigger, counter) = (Arc::clone(&armed), Arc::clone(&calls));
    let mut a = app();
    let engine = engine::worker::EngineHandle::spawn(a.state.setup.settings, move || {
        counter.fetch_add(1, Ordering::SeqCst);
        if trigger.swap(false, Ordering::SeqCst) {
            panic!("the waker broke");
        }
    })
    .unwrap();
    a.state.use_engine(engine);
    a.state.form.prompt = "two".into();
    let mut h = harness(a);
    h.step();
    wait(&mut h, "the model", |a| a.state.model_ready());
    // The worker calls the waker just after sending each event: once the calls stop for a while
    // after the model is ready, the worker is idle and its next event belongs to the first job.
    // (Armed too early, the load would fail instead, and this test with it: never a false pass.)
    let (mut seen, mut quiet) = (calls.load(Ordering::SeqCst), 0);
    let start = Instant::now();
    while quiet < 10 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the engine stays busy"
        );
        std::thread::sleep(Duration::from_millis(20));
        h.step();
        let now = calls.load(Ordering::SeqCst);
        quiet = if now == seen { quiet + 1 } else { 0 };
        seen = now;
    }
    armed.store(true, Ordering::SeqCst);
    h.state_mut().state.apply(Command::Generate);
    h.state_mut().state.apply(Command::Generate);
    let first = h.state().state.jobs[0].id;
    wait(&mut h, "the first job to fail", |a| {
        a.state.jobs.iter().all(|j| j.id != first)
    });
    let error = h.state().state.error.clone().unwrap_or_default();
    assert!(
        error.contains("internal error") && error.contains("the waker broke"),
        "{error:?}"
    );
    wait(&mut h, "the queue to empty", |a| a.state.jobs.is_empty());
    assert_eq!(
        h.state().state.gallery.len(),
        1,
        "the second job made its image"
    );
    h.run_steps(2);
    h.get_by_label_contains("the waker broke");
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
            .setup
            .confirmed
            .is_some_and(|s| s.attention == AttnProcessor::Vanilla)
    });
    h.get_by_label("Sliced").click();
    h.run_steps(2);
    wait(&mut h, "sliced attention in the engine", |a| {
        a.state
            .setup
            .confirmed
            .is_some_and(|s| matches!(s.attention, AttnProcessor::Sliced { .. }))
    });
    h.get_by_label("Live preview").click();
    h.run_steps(2);
    wait(&mut h, "previews off in the engine", |a| {
        a.state.setup.confirmed.is_some_and(|s| !s.preview)
    });
    h.get_by_label("Channels-last").click();
    h.run_steps(2);
    wait(&mut h, "channels-last in the engine", |a| {
        a.state
            .setup
            .confirmed
            .is_some_and(|s| s.memory_format == MemoryFormat::ChannelsLast)
    });
    // On the CPU backend fusion and f16 cannot be chosen.
    h.get_by_label("Kernel fusion (\"compile\")").click();
    h.get_by_label("f16").click();
    h.run_steps(3);
    let state = &h.state().state;
    assert!(
        state.setup.settings.execution.fusion,
        "fusion stays as it was"
    );
    // ... and shows off, as nothing is fused here.
    assert_eq!(
        h.get_by_label("Kernel fusion (\"compile\")")
            .accesskit_node()
            .toggled(),
        Some(egui::accesskit::Toggled::False)
    );
    assert_eq!(state.setup.settings.execution.precision, Precision::F32);
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
                 Size: 640x384, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, \
                 Denoising strength: 0.45, ControlNet 0: \"Module: canny, Model: \
                 control_v11p_sd15_canny [d14c016b], Weight: 0.65, Resize Mode: Crop and Resize, \
                 Threshold A: 80, Threshold B: 160, Guidance Start: 0.1, Guidance End: 0.8, \
                 Control Mode: ControlNet is more important\", Version: v1.10.1"
                    .into(),
            )
            .unwrap();
        let mut writer = encoder.write_header().unwrap();
        writer.write_image_data(&[0; 12]).unwrap();
    }
    std::fs::write(&png, bytes).unwrap();

    let mut h = harness(app());
    h.step();
    // Loaded first: the engine's "ready" and "loaded" lines would otherwise replace the status
    // line this test reads, whenever the load happens to end during the drop's frames.
    wait(&mut h, "the model", |a| a.state.model_ready());
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
    // The img2img strength and the ControlNet unit; A1111's model name is no model here, so the
    // page keeps its ControlNet and the status bar says so.
    let state = &h.state().state;
    assert_eq!(state.inputs.strength, 0.45);
    let c = &state.control;
    assert_eq!((c.canny.low, c.canny.high, c.scale), (80.0, 160.0, 0.65));
    assert_eq!(
        (c.guidance_start, c.guidance_end, c.guess_mode),
        (0.1, 0.8, true)
    );
    assert_eq!(c.controlnet_spec, DEFAULT_CONTROLNET);
    assert!(
        state.status.contains(
            "ControlNet `control_v11p_sd15_canny [d14c016b]` is not a hub id (a path in a \
             picture's metadata is not followed)"
        ),
        "{}",
        state.status
    );

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
    // The user changes the form through its fields.
    type_prompt(&mut h, ", something else");
    set_number(&h, "Seed", 1.0);
    set_number(&h, "Steps", 9.0);
    h.run_steps(2);
    if h.state().state.form.seed_locked {
        h.get_by_label("Lock").click();
        h.run_steps(2);
    }
    let form = &h.state().state.form;
    assert_eq!(
        (
            form.prompt.as_str(),
            form.seed,
            form.steps,
            form.seed_locked
        ),
        ("reuse me, something else", 1, 9, false)
    );
    h.get_by_label("Reuse seed").click();
    h.run_steps(2);
    let form = &h.state().state.form;
    assert_eq!((form.seed, form.seed_locked), (made.seed, true));
    assert_eq!(form.prompt, "reuse me, something else", "only the seed");
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
    a.state.setup.settings.attention = AttnProcessor::Sliced { slice_size: 1 };
    a.state.setup.settings.preview = false;
    a.state.setup.settings.memory_format = MemoryFormat::ChannelsLast;
    a.state.setup.vae_tiling = true;
    a.state.model.recent = vec!["org/a".into(), "org/b".into()];
    let stored = serde_json::to_string(&a.state.to_persisted()).unwrap();
    let back: Persisted = serde_json::from_str(&stored).unwrap();
    let restored = BrushfireApp::restored(&back, None);
    assert_eq!(restored.state.to_persisted(), a.state.to_persisted());
    assert_eq!(restored.state.form.prompt, "remember me");
    assert_eq!(
        restored.state.setup.settings.memory_format,
        MemoryFormat::ChannelsLast
    );
    assert_eq!(restored.state.model.spec, a.state.model.spec);
    assert!(restored.state.setup.vae_tiling);
    // A model named on the command line wins; unknown stored values fall back to defaults.
    let restored = BrushfireApp::restored(&back, Some("org/other".into()));
    assert_eq!(restored.state.model.spec, "org/other");
    let odd: Persisted =
        serde_json::from_str(r#"{"engine": {"attention": "warp"}, "form": {"steps": 0}}"#).unwrap();
    let restored = BrushfireApp::restored(&odd, None);
    assert_eq!(
        restored.state.setup.settings.attention,
        AttnProcessor::default()
    );
    assert_eq!(restored.state.form.steps, 1);
}

/// A settings file naming pictures that are not Brushfire's work pictures (tampered, or from
/// elsewhere) gets them neither read nor, when the page is cleared, removed; the user is told.
#[test]
fn settings_cannot_make_brushfire_read_or_delete_other_files() {
    let dir = std::env::temp_dir().join(format!("brushfire-tampered-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let victim = dir.join("holiday.png");
    let victim_layer = dir.join("holiday-layer.png");
    image::RgbImage::new(8, 8).save(&victim).unwrap();
    image::GrayImage::new(8, 8).save(&victim_layer).unwrap();
    let mut p: Persisted = serde_json::from_str("{}").unwrap();
    p.inpaint_picture = Some(app::gui::work::SavedPicture {
        label: "x".into(),
        image: victim.clone(),
        layer: victim_layer.clone(),
    });
    let mut restored = BrushfireApp::restored(&p, Some("org/model".into()));
    assert!(restored.state.inputs.source.is_none(), "not read");
    let error = restored.state.error.clone().expect("said");
    assert!(
        error.contains("holiday.png") && error.contains("not Brushfire's"),
        "{error}"
    );
    restored.state.work_dir = Some(dir.join("work"));
    restored.state.save_work().unwrap();
    assert!(victim.is_file() && victim_layer.is_file(), "not removed");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A ControlNet named in a dropped or opened picture's metadata is taken as a hub id only,
/// never as a path; a gallery image made here may name the local file it was made with.
#[test]
fn a_controlnet_path_in_png_metadata_is_not_followed() {
    use app::gui::control_input::Origin;
    use app::png_meta::ControlNetParameters;
    let unit = |model: &str| ControlNetParameters {
        model: model.into(),
        canny: None,
        weight: 1.0,
        guidance_start: 0.0,
        guidance_end: 1.0,
        guess_mode: false,
    };
    let mut a = app();
    let existing = std::env::temp_dir().to_string_lossy().into_owned();
    for model in [
        existing.as_str(),
        "../../models/cn",
        "/etc",
        "org/name@../../x",
    ] {
        let notes = a.state.control.apply_unit(&unit(model), Origin::File);
        assert_ne!(a.state.control.controlnet_spec, model);
        assert!(
            notes.iter().any(|n| n.contains("not followed")),
            "{model}: {notes:?}"
        );
    }
    let hub = "lllyasviel/sd-controlnet-canny";
    let notes = a.state.control.apply_unit(&unit(hub), Origin::File);
    assert_eq!(a.state.control.controlnet_spec, hub, "{notes:?}");
    let notes = a
        .state
        .control
        .apply_unit(&unit(&existing), Origin::Gallery);
    assert_eq!(a.state.control.controlnet_spec, existing, "{notes:?}");
}

fn inpaint_source(app: &BrushfireApp) -> &app::gui::image_input::SourceImage {
    app.state
        .inputs
        .source
        .as_ref()
        .expect("the inpainting source")
}

#[test]
fn the_mask_and_the_control_strokes_survive_a_restart() {
    let dir = std::env::temp_dir().join(format!("brushfire-work-gui-{}", std::process::id()));
    let mut a = app();
    a.state.work_dir = Some(dir.clone());
    let photo: Vec<u8> = (0..16 * 8 * 3).map(|v| (v % 251) as u8).collect();
    let mask: Vec<u8> = (0..16 * 8)
        .map(|v| if v % 5 == 0 { 255 } else { 0 })
        .collect();
    let edges: Vec<u8> = (0..8 * 8 * 3).map(|v| (v * 3 % 256) as u8).collect();
    let strokes: Vec<u8> = (0..8 * 8).map(|v| [0, 255, 1][v % 3]).collect();
    a.state
        .inputs
        .set_source("photo.png".into(), 16, 8, photo.clone());
    let source = a.state.inputs.source.as_mut().unwrap();
    source.canvas.replace_layer(mask.clone()).unwrap();
    a.state
        .control
        .set_source("edges.png".into(), 8, 8, edges.clone());
    let control = a.state.control.source.as_mut().unwrap();
    control.canvas.replace_layer(strokes.clone()).unwrap();
    a.state.save_work().unwrap();

    let restart = |a: &BrushfireApp| {
        let stored = serde_json::to_string(&a.state.to_persisted()).unwrap();
        let back: Persisted = serde_json::from_str(&stored).unwrap();
        BrushfireApp::restored(&back, None)
    };
    let b = restart(&a);
    let s = inpaint_source(&b);
    assert_eq!((s.label.as_str(), s.width, s.height), ("photo.png", 16, 8));
    assert_eq!((&s.rgb, s.canvas.layer()), (&photo, &mask[..]));
    assert!(
        !s.canvas.can_undo(),
        "the restored mask is where undo starts"
    );
    let c = b
        .state
        .control
        .source
        .as_ref()
        .expect("the ControlNet source");
    assert_eq!((c.label.as_str(), c.width, c.height), ("edges.png", 8, 8));
    assert_eq!((&c.rgb, c.canvas.layer()), (&edges, &strokes[..]));

    // Unchanged pictures are not written again (their files, removed here, stay gone).
    std::fs::remove_file(dir.join("inpaint.png")).unwrap();
    a.state.save_work().unwrap();
    assert!(!dir.join("inpaint.png").exists());
    // A picture that cannot be read back is left out, and an error (which stays until
    // dismissed, unlike the status line) says which and why.
    let b = restart(&a);
    assert!(b.state.inputs.source.is_none());
    assert!(b.state.control.source.is_some());
    let error = b.state.error.clone().unwrap_or_default();
    assert!(
        error.starts_with("could not restore photo.png from the last session: ")
            && error.contains("inpaint.png"),
        "{error}"
    );
    // A change is written; a page emptied loses its files and is empty at the next start.
    a.state.inputs.source.as_mut().unwrap().canvas.clear();
    a.state.control.source = None;
    a.state.save_work().unwrap();
    assert!(dir.join("inpaint.png").exists());
    assert!(!dir.join("controlnet.png").exists() && !dir.join("controlnet-layer.png").exists());
    let b = restart(&a);
    let s = inpaint_source(&b);
    assert!(s.canvas.layer().iter().all(|&v| v == 0));
    assert!(b.state.control.source.is_none());
    std::fs::remove_dir_all(&dir).unwrap();
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
    a.state.model.spec = "brushfire-test/not-downloaded".into();
    let mut h = harness(a);
    h.run_steps(3);
    assert_eq!(
        h.state().state.model.status,
        ModelStatus::NeedsDownload {
            repo_id: "brushfire-test/not-downloaded".into()
        }
    );
    h.get_by_label("Download");
    assert!(!h.state().state.model_ready());
    // Offline it says so plainly instead.
    unsafe { std::env::set_var("HF_HUB_OFFLINE", "1") };
    h.state_mut().state.apply(Command::LoadModel);
    h.run_steps(2);
    assert!(matches!(
        h.state().state.model.status,
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
    wait(&mut h, "the backend", |a| a.state.setup.backend.is_some());
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
            (
                BenchPipeline::SdImg2Img,
                CellOutcome::Measured {
                    it_per_sec,
                    unet_evals,
                    ..
                },
            ) => {
                assert!(*it_per_sec > 0.0);
                assert_eq!(
                    *unet_evals, 2,
                    "strength 0.8 keeps int(1.6) = 1 of 2 steps: 2 of PNDM's 3 evaluations"
                );
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

/// One cell: txt2img, batch 1, the baseline column, at `size`².
fn txt2img_baseline(size: usize, steps: usize, runs: usize) -> BenchForm {
    BenchForm {
        pipelines: vec![BenchPipeline::SdTxt2Img],
        batches: vec![1],
        size,
        columns: vec![BenchColumn::Baseline],
        precision: None,
        steps,
        runs,
    }
}

#[test]
fn a_benchmark_cell_too_big_for_memory_shows_why_on_hover() {
    // 8192² with vanilla attention on the tiny configs: terabytes of scores, refused up front.
    let mut h = start_benchmark(txt2img_baseline(8192, 1, 1));
    wait(&mut h, "the report", |a| a.state.bench.report.is_some());
    let reason = match &h.state().state.bench.cells[0].outcome {
        CellOutcome::Failed { reason } => reason.clone(),
        other => panic!("8192² vanilla ran: {other:?}"),
    };
    assert!(
        reason.starts_with("not enough memory: vanilla attention"),
        "{reason}"
    );
    h.run_steps(2);
    let cell = h.get_by_label("not run: not enough memory");
    assert!(cell.rect().right() <= 1200.0, "{:?}", cell.rect());
    cell.hover();
    h.run_steps(3);
    h.get_by_label_contains("fused attention holds no score matrix");
}

#[test]
fn a_running_benchmark_can_be_cancelled() {
    let mut h = start_benchmark(txt2img_baseline(256, 200, 10));
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

/// The app on the inpaint page with a `w × h` grey source image, the canvas at `zoom` with
/// the image's top-left `pan` points into the viewport.
fn inpaint_harness(
    w: usize,
    h: usize,
    zoom: f32,
    pan: egui::Vec2,
) -> Harness<'static, BrushfireApp> {
    let mut app = app();
    app.state.view = View::Inpaint;
    app.state
        .inputs
        .set_source("grey.png".into(), w, h, vec![128; w * h * 3]);
    let mut h = harness(app);
    h.run_steps(2);
    set_view(&mut h, zoom, pan);
    h
}

fn set_view(h: &mut Harness<'static, BrushfireApp>, zoom: f32, pan: egui::Vec2) {
    let canvas = &mut h.state_mut().state.inputs.source.as_mut().unwrap().canvas;
    canvas.fit_pending = false;
    canvas.zoom = zoom;
    canvas.pan = pan;
    h.run_steps(2);
}

fn canvas<'h>(h: &'h Harness<'static, BrushfireApp>) -> &'h app::gui::canvas::PaintCanvas {
    &h.state().state.inputs.source.as_ref().unwrap().canvas
}

/// Drags through `points` (image pixels) on the inpainting canvas, one frame per point.
fn drag_through(h: &mut Harness<'static, BrushfireApp>, points: &[egui::Pos2]) {
    drag_through_on(h, canvas, points);
}

/// Drags through `points` (image pixels) on the canvas `on` picks, one frame per point.
fn drag_through_on(
    h: &mut Harness<'static, BrushfireApp>,
    on: for<'h> fn(&'h Harness<'static, BrushfireApp>) -> &'h app::gui::canvas::PaintCanvas,
    points: &[egui::Pos2],
) {
    let screen: Vec<egui::Pos2> = points.iter().map(|&p| on(h).image_to_screen(p)).collect();
    h.hover_at(screen[0]);
    h.step();
    h.drag_at(screen[0]);
    h.step();
    for &p in &screen[1..] {
        h.hover_at(p);
        h.step();
    }
    h.drop_at(*screen.last().unwrap());
    h.run_steps(2);
}

/// Distance from pixel `(x, y)`'s centre to the polyline through `points`.
fn distance_to_stroke(x: usize, y: usize, points: &[egui::Pos2]) -> f32 {
    let c = egui::pos2(x as f32 + 0.5, y as f32 + 0.5);
    let mut best = f32::INFINITY;
    for pair in points.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        let ab = b - a;
        let t = ((c - a).dot(ab) / ab.length_sq()).clamp(0.0, 1.0);
        best = best.min((a + ab * t - c).length());
    }
    best
}

/// Every pixel well inside the brush's reach along `points` is `inside`, every pixel well
/// outside it is `outside` (pixels within 0.02 px of the edge may go either way).
fn assert_stroke(
    layer: &[u8],
    width: usize,
    points: &[egui::Pos2],
    radius: f32,
    inside: u8,
    outside: impl Fn(usize) -> u8,
) {
    let mut counted = 0;
    for (i, &v) in layer.iter().enumerate() {
        let d = distance_to_stroke(i % width, i / width, points);
        if d < radius - 0.02 {
            assert_eq!(
                v,
                inside,
                "pixel ({}, {}) at {d} from the stroke",
                i % width,
                i / width
            );
            counted += 1;
        } else if d > radius + 0.02 {
            assert_eq!(
                v,
                outside(i),
                "pixel ({}, {}) at {d} from the stroke",
                i % width,
                i / width
            );
        }
    }
    assert!(counted > 50, "the stroke covers pixels ({counted})");
}

#[test]
fn a_drag_paints_exactly_the_brush_pixels_at_any_zoom_and_pan() {
    for (zoom, pan) in [
        (1.0, egui::Vec2::ZERO),
        (2.5, egui::vec2(-31.0, 17.0)),
        (2.5, egui::vec2(40.0, -9.0)),
    ] {
        let mut h = inpaint_harness(96, 64, zoom, pan);
        let radius = 4.3;
        h.state_mut()
            .state
            .inputs
            .source
            .as_mut()
            .unwrap()
            .canvas
            .brush_radius = radius;
        let points = [
            egui::pos2(20.2, 12.7),
            egui::pos2(44.6, 30.1),
            egui::pos2(70.3, 33.9),
        ];
        drag_through(&mut h, &points);
        let c = canvas(&h);
        assert_stroke(c.layer(), 96, &points, radius, 255, |_| 0);
        assert!(
            c.can_undo() && !c.stroke_active(),
            "zoom {zoom}: one finished stroke"
        );
    }
}

#[test]
fn eraser_undo_redo_and_brush_keys_on_the_canvas() {
    let mut h = inpaint_harness(80, 60, 2.0, egui::vec2(10.0, 10.0));
    h.state_mut()
        .state
        .inputs
        .source
        .as_mut()
        .unwrap()
        .canvas
        .brush_radius = 6.0;
    let paint = [egui::pos2(10.5, 30.5), egui::pos2(70.5, 30.5)];
    drag_through(&mut h, &paint);
    let painted = canvas(&h).layer().to_vec();
    assert!(canvas(&h).painted_pixels() > 500);

    h.get_by_label("Eraser").click();
    h.run_steps(2);
    h.state_mut()
        .state
        .inputs
        .source
        .as_mut()
        .unwrap()
        .canvas
        .brush_radius = 3.0;
    let erase = [egui::pos2(40.2, 20.3), egui::pos2(40.7, 40.1)];
    drag_through(&mut h, &erase);
    assert_stroke(canvas(&h).layer(), 80, &erase, 3.0, 0, |i| painted[i]);
    let erased = canvas(&h).layer().to_vec();

    // Ctrl+Z undoes the eraser stroke, then the brush stroke; Ctrl+Shift+Z redoes them.
    h.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::Z);
    h.run_steps(2);
    assert_eq!(canvas(&h).layer(), &painted[..]);
    h.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::Z);
    h.run_steps(2);
    assert!(canvas(&h).is_empty());
    h.key_press_modifiers(
        egui::Modifiers::COMMAND | egui::Modifiers::SHIFT,
        egui::Key::Z,
    );
    h.run_steps(2);
    assert_eq!(canvas(&h).layer(), &painted[..]);
    h.key_press_modifiers(
        egui::Modifiers::COMMAND | egui::Modifiers::SHIFT,
        egui::Key::Z,
    );
    h.run_steps(2);
    assert_eq!(canvas(&h).layer(), &erased[..]);

    // [ and ] change the brush size; the Invert and Clear buttons are undoable too.
    h.key_press(egui::Key::CloseBracket);
    h.run_steps(2);
    assert_eq!(canvas(&h).brush_radius, 4.0);
    h.key_press(egui::Key::OpenBracket);
    h.key_press(egui::Key::OpenBracket);
    h.run_steps(2);
    assert_eq!(canvas(&h).brush_radius, 2.0);
    h.get_by_label("Invert").click();
    h.run_steps(2);
    assert_eq!(
        canvas(&h).painted_pixels(),
        80 * 60 - erased.iter().filter(|&&v| v > 0).count()
    );
    h.get_by_label("Clear").click();
    h.run_steps(2);
    assert!(canvas(&h).is_empty());
    h.get_by_label("Undo").click();
    h.run_steps(2);
    h.get_by_label("Undo").click();
    h.run_steps(2);
    assert_eq!(canvas(&h).layer(), &erased[..]);
}

#[test]
fn inpaint_and_img2img_generate_from_the_page_and_keep_the_mask() {
    let mut h = inpaint_harness(64, 48, 1.0, egui::Vec2::ZERO);
    wait(&mut h, "the model", |a| a.state.model_ready());
    // An empty mask is refused with a message, before any work.
    h.get_by_label("Generate").click();
    h.run_steps(2);
    let error = h.state().state.error.clone().unwrap_or_default();
    assert!(error.contains("mask is empty"), "{error}");
    assert!(h.state().state.jobs.is_empty());
    h.state_mut().state.apply(Command::DismissError);

    h.state_mut()
        .state
        .inputs
        .source
        .as_mut()
        .unwrap()
        .canvas
        .brush_radius = 8.0;
    drag_through(&mut h, &[egui::pos2(12.0, 12.0), egui::pos2(40.0, 30.0)]);
    let mask = canvas(&h).layer().to_vec();
    h.get_by_label("Generate").click();
    h.run_steps(2);
    let job = &h.state().state.jobs[0].request;
    let Task::Inpaint(inpaint) = &job.task else {
        panic!("{:?}", job.task)
    };
    assert_eq!((job.width, job.height), (64, 48), "the image's size");
    assert_eq!(inpaint.strength, Some(1.0));
    let sent = &inpaint.mask;
    assert_eq!(
        sent.values.iter().filter(|&&v| v == 1.0).count(),
        mask.iter().filter(|&&v| v > 0).count()
    );
    wait(&mut h, "the inpainted image", |a| {
        !a.state.gallery.is_empty()
    });
    assert!(
        h.state().state.error.is_none(),
        "{:?}",
        h.state().state.error
    );
    let img = &h.state().state.gallery[0];
    assert_eq!((img.width, img.height), (64, 48));
    assert_eq!(img.params.denoising_strength, Some(1.0));

    // A request the engine refuses (strength 0.1 of 3 steps leaves none) shows its error and
    // loses nothing.
    set_slider(&h, "Strength", 0.1);
    h.run_steps(2);
    assert_eq!(h.state().state.inputs.inpaint_strength, 0.1);
    h.get_by_label("Generate").click();
    wait(&mut h, "the refusal", |a| {
        a.state.error.is_some() && a.state.jobs.is_empty()
    });
    let error = h.state().state.error.clone().unwrap();
    assert!(error.contains("strength"), "{error}");
    assert_eq!(canvas(&h).layer(), &mask[..]);
    assert_eq!(h.state().state.gallery.len(), 1);
    h.get_by_label("Dismiss").click();
    h.run_steps(2);
    assert!(h.state().state.error.is_none());
    set_slider(&h, "Strength", 1.0);
    h.run_steps(2);

    // Another page and back: the mask is still there.
    h.get_by_label("🎨 Image to image").click();
    h.run_steps(2);
    h.get_by_label("✏ Inpaint").click();
    h.run_steps(2);
    assert_eq!(canvas(&h).layer(), &mask[..]);

    // Send the result to img2img and run it at strength 0.5.
    h.state_mut().state.apply(Command::SendTo(0, View::Img2Img));
    h.run_steps(2);
    set_slider(&h, "Strength", 0.5);
    h.run_steps(2);
    h.get_by_label("Generate").click();
    h.run_steps(2);
    let job = &h.state().state.jobs[0].request;
    let Task::Img2Img(img2img) = &job.task else {
        panic!("{:?}", job.task)
    };
    assert_eq!(img2img.strength, Some(0.5));
    wait(&mut h, "the img2img image", |a| a.state.gallery.len() == 2);
    assert!(
        h.state().state.error.is_none(),
        "{:?}",
        h.state().state.error
    );
    assert_eq!(
        canvas(&h).layer(),
        &mask[..],
        "same size: the mask stays with the new source"
    );
}

#[test]
fn wheel_zooms_about_the_cursor_and_space_drag_pans_without_painting() {
    let mut h = inpaint_harness(64, 64, 2.0, egui::vec2(20.0, 20.0));
    let target = egui::pos2(30.5, 12.5);
    let cursor = canvas(&h).image_to_screen(target);
    h.hover_at(cursor);
    h.step();
    h.event(egui::Event::MouseWheel {
        unit: egui::MouseWheelUnit::Line,
        delta: egui::vec2(0.0, 3.0),
        phase: egui::TouchPhase::Move,
        modifiers: egui::Modifiers::NONE,
    });
    h.run_steps(2);
    let c = canvas(&h);
    assert!(c.zoom > 2.0 * 1.3, "zoomed in: {}", c.zoom);
    assert!(
        (c.screen_to_image(cursor) - target).length() < 1e-3,
        "the pixel under the cursor stays there"
    );

    // Space + drag pans by the pointer's movement and paints nothing; the middle button too.
    let pan = canvas(&h).pan;
    h.key_down(egui::Key::Space);
    h.step();
    h.drag_at(cursor);
    h.step();
    h.hover_at(cursor + egui::vec2(25.0, -10.0));
    h.step();
    h.drop_at(cursor + egui::vec2(25.0, -10.0));
    h.key_up(egui::Key::Space);
    h.run_steps(2);
    let moved = canvas(&h).pan - pan;
    assert!(
        (moved - egui::vec2(25.0, -10.0)).length() < 1e-3,
        "panned by {moved:?}"
    );
    assert!(canvas(&h).is_empty(), "panning does not paint");
    assert!(!canvas(&h).can_undo());

    let pan = canvas(&h).pan;
    let start = canvas(&h).image_to_screen(egui::pos2(20.0, 20.0));
    h.hover_at(start);
    h.step();
    h.event(egui::Event::PointerButton {
        pos: start,
        button: egui::PointerButton::Middle,
        pressed: true,
        modifiers: egui::Modifiers::NONE,
    });
    h.step();
    h.hover_at(start + egui::vec2(-12.0, 30.0));
    h.step();
    h.event(egui::Event::PointerButton {
        pos: start + egui::vec2(-12.0, 30.0),
        button: egui::PointerButton::Middle,
        pressed: false,
        modifiers: egui::Modifiers::NONE,
    });
    h.run_steps(2);
    let moved = canvas(&h).pan - pan;
    assert!(
        (moved - egui::vec2(-12.0, 30.0)).length() < 1e-3,
        "panned by {moved:?}"
    );
    assert!(canvas(&h).is_empty());
}

#[test]
fn an_image_given_at_start_opens_as_the_img2img_source() {
    // What "Open with Brushfire" passes (the desktop entry's %F).
    let mut a = app();
    a.state
        .open_files(&[fixture("refs/mask.png"), fixture("refs/init.png")]);
    assert_eq!(a.state.view, View::Img2Img);
    let source = a.state.inputs.source.as_ref().unwrap();
    assert_eq!((source.width, source.height), (128, 64));
    assert_eq!(source.label, "init.png");
    a.state.open_files(&[fixture("refs/missing.png")]);
    let error = a.state.error.clone().unwrap();
    assert!(error.contains("missing.png"), "{error}");
    assert_eq!(
        a.state.inputs.source.as_ref().unwrap().label,
        "init.png",
        "kept"
    );
    // The app reopens on the page it was closed on; a file given then goes to that page.
    let mut persisted = a.state.to_persisted();
    persisted.view = "controlnet".into();
    let mut b = BrushfireApp::restored(&persisted, None);
    assert_eq!(b.state.view, View::ControlNet);
    b.state.open_files(&[fixture("refs/canny/coffee.png")]);
    assert_eq!(b.state.view, View::ControlNet);
    assert_eq!(b.state.control.source.as_ref().unwrap().label, "coffee.png");
    assert!(b.state.inputs.source.is_none());
}

fn control_canvas<'h>(h: &'h Harness<'static, BrushfireApp>) -> &'h app::gui::canvas::PaintCanvas {
    &h.state().state.control.source.as_ref().unwrap().canvas
}

/// Types `text` into the prompt field, as a user would.
fn type_prompt(h: &mut Harness<'static, BrushfireApp>, text: &str) {
    h.get_by_role_and_label(Role::MultilineTextInput, "Prompt")
        .focus();
    h.run_steps(2);
    h.get_by_role_and_label(Role::MultilineTextInput, "Prompt")
        .type_text(text);
    h.run_steps(2);
}

/// Sets a slider through accesskit, as a screen reader would.
fn set_slider(h: &Harness<'static, BrushfireApp>, label: &str, value: f64) {
    set_value(h, Role::Slider, label, value);
}

/// Sets the number field (a `DragValue`) labelled `label` as a screen reader would.
fn set_number(h: &Harness<'static, BrushfireApp>, label: &str, value: f64) {
    set_value(h, Role::SpinButton, label, value);
}

fn set_value(h: &Harness<'static, BrushfireApp>, role: Role, label: &str, value: f64) {
    use egui::accesskit::{Action, ActionData, ActionRequest};
    use egui_kittest::kittest::NodeT;
    let node = h.get_by_role_and_label(role, label);
    let (target_node, target_tree) = node.accesskit_node().locate();
    h.event(egui::Event::AccessKitActionRequest(ActionRequest {
        action: Action::SetValue,
        target_node,
        target_tree,
        data: Some(ActionData::NumericValue(value)),
    }));
}

fn white(map: &[u8]) -> usize {
    map.chunks(3).filter(|p| p[0] == 255).count()
}

#[test]
fn controlnet_page_live_canny_drawing_and_the_request() {
    let mut app = app();
    app.state.view = View::ControlNet;
    app.state.control.controlnet_spec = fixture("tiny-controlnet-single-file.safetensors")
        .to_string_lossy()
        .into_owned();
    app.state
        .control
        .open(&fixture("refs/canny/chelsea.png"))
        .unwrap();
    let mut h = harness(app);
    wait(&mut h, "the model", |a| a.state.model_ready());

    // No ControlNet yet: Generate says so and sends nothing.
    h.get_by_label("Generate").click();
    h.run_steps(2);
    let error = h.state_mut().state.error.take().unwrap_or_default();
    assert!(error.contains("load a ControlNet"), "{error}");
    assert!(h.state().state.jobs.is_empty());
    h.get_by_label("Load ControlNet").click();
    wait(&mut h, "the ControlNet", |a| {
        a.state.control.loaded.is_some()
    });
    assert!(
        h.state().state.error.is_none(),
        "{:?}",
        h.state().state.error
    );

    // The preview follows the thresholds: a higher pair keeps fewer edges, and the canvas
    // shows the new map.
    let control = &mut h.state_mut().state.control;
    let default_edges = white(control.base_map().unwrap());
    assert!(default_edges > 500, "{default_edges}");
    set_slider(&h, "High", 600.0);
    h.run_steps(2);
    let control = &mut h.state_mut().state.control;
    assert_eq!(control.canny.high, 600.0);
    assert!(control.map_texture_is_current());
    let fewer = white(control.base_map().unwrap());
    assert!(fewer < default_edges, "{fewer} < {default_edges}");
    set_slider(&h, "Low", 700.0);
    h.run_steps(2);
    let canny = h.state().state.control.canny;
    assert_eq!(
        (canny.low, canny.high),
        (700.0, 700.0),
        "low pushes high up"
    );
    set_slider(&h, "High", 200.0);
    set_slider(&h, "Low", 100.0);
    h.run_steps(2);
    let control = &mut h.state_mut().state.control;
    assert!(control.map_texture_is_current());
    assert_eq!(white(control.base_map().unwrap()), default_edges);

    // Drawing changes the map: the pen adds white, the eraser blacks out, Ctrl+Z undoes.
    let canvas = &mut h.state_mut().state.control.source.as_mut().unwrap().canvas;
    canvas.fit_pending = false;
    canvas.zoom = 1.0;
    canvas.pan = egui::Vec2::ZERO;
    canvas.brush_radius = 2.0;
    h.run_steps(2);
    let before = h.state_mut().state.control.control_map().unwrap();
    drag_through_on(
        &mut h,
        control_canvas,
        &[egui::pos2(10.0, 200.0), egui::pos2(300.0, 200.0)],
    );
    let drawn = h.state_mut().state.control.control_map().unwrap();
    assert!(white(&drawn) > white(&before) + 250, "a 290 px line");
    let at = |map: &[u8], x: usize, y: usize| map[(y * 320 + x) * 3];
    assert_eq!(at(&drawn, 150, 200), 255);
    h.state_mut()
        .state
        .control
        .source
        .as_mut()
        .unwrap()
        .canvas
        .tool = app::gui::canvas::Tool::Eraser;
    h.state_mut()
        .state
        .control
        .source
        .as_mut()
        .unwrap()
        .canvas
        .brush_radius = 30.0;
    drag_through_on(&mut h, control_canvas, &[egui::pos2(160.0, 100.0)]);
    let erased = h.state_mut().state.control.control_map().unwrap();
    assert!(
        (140..180).all(|x| (80..120).all(|y| at(&erased, x, y) == 0)),
        "the eraser blacks out edges under it"
    );
    assert!(white(&erased) < white(&drawn));
    h.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::Z);
    h.run_steps(2);
    assert_eq!(h.state_mut().state.control.control_map().unwrap(), drawn);

    // Scale and window go into the request with the map; the run finishes.
    set_slider(&h, "Scale", 0.6);
    set_slider(&h, "Start", 0.1);
    set_slider(&h, "End", 0.9);
    h.run_steps(2);
    h.get_by_label("Generate").click();
    h.run_steps(2);
    let job = &h.state().state.jobs[0].request;
    let Task::ControlNet(control) = &job.task else {
        panic!("{:?}", job.task)
    };
    assert!((control.scale - 0.6).abs() < 1e-9);
    assert!((control.guidance.0 - 0.1).abs() < 1e-9);
    assert!((control.guidance.1 - 0.9).abs() < 1e-9);
    assert_eq!(
        (job.width, job.height),
        (320, 208),
        "the map's size, to multiples of 8"
    );
    let sent = &control.image;
    assert_eq!(sent.shape, vec![213, 320, 3]);
    let sent_u8: Vec<u8> = sent
        .values
        .iter()
        .map(|&v| (v * 255.0).round() as u8)
        .collect();
    assert_eq!(sent_u8, drawn);
    wait(&mut h, "the ControlNet image", |a| {
        !a.state.gallery.is_empty()
    });
    assert!(
        h.state().state.error.is_none(),
        "{:?}",
        h.state().state.error
    );
    let img = &h.state().state.gallery[0];
    assert_eq!((img.width, img.height), (320, 208));
    // Its parameters record the ControlNet unit as A1111's extension does.
    let unit = img.params.controlnet.as_ref().expect("a ControlNet unit");
    assert_eq!(unit.canny, Some((100.0, 200.0)));
    assert!((unit.weight - 0.6).abs() < 1e-9);
    assert!(
        unit.model
            .ends_with("tiny-controlnet-single-file.safetensors")
    );
    assert!(
        img.params
            .to_a1111()
            .contains("ControlNet 0: \"Module: canny")
    );

    // "Reuse parameters" puts the unit back on the page, the ControlNet too.
    let unit = unit.clone();
    let spec = h.state().state.control.controlnet_spec.clone();
    {
        let c = &mut h.state_mut().state.control;
        c.scale = 1.5;
        c.canny = Canny {
            low: 10.0,
            high: 20.0,
        };
        c.map_source = MapSource::AsIs;
        c.guidance_end = 0.5;
        c.guess_mode = true;
        c.controlnet_spec = "org/another-controlnet".into();
    }
    h.get_by_label("Reuse parameters").click();
    h.run_steps(2);
    let c = &h.state().state.control;
    assert!((c.scale - 0.6).abs() < 1e-9);
    assert_eq!((c.canny.low, c.canny.high), (100.0, 200.0));
    assert_eq!(c.map_source, MapSource::Canny);
    assert_eq!(
        (c.guidance_start, c.guidance_end, c.guess_mode),
        (unit.guidance_start, unit.guidance_end, unit.guess_mode)
    );
    assert_eq!(c.guidance_end, 0.9, "the window this test set earlier");
    assert_eq!(c.controlnet_spec, spec);
}

#[test]
fn if_page_runs_the_cascade_and_a_gallery_image_upscales_x4() {
    let mut app = app();
    app.state.view = View::Cascade;
    app.state.form.batch = 2;
    app.state.form.prompt = "a corgi in a red hat".into();
    // The tiny stage I works at 16² (the real ones at 64²): 16² → 64² → 256².
    app.state.cascade.stage1_side = 16;
    for (i, dir) in ["tiny-if", "tiny-if-ii", "tiny-sd-x4"].iter().enumerate() {
        app.state.cascade.stages[i].model = fixture(dir).to_string_lossy().into_owned();
        app.state.cascade.stages[i].steps = 2;
    }
    let mut h = harness(app);
    h.step();
    wait(&mut h, "the model", |a| a.state.model_ready());
    // Stage II has no input yet: its button does nothing.
    h.get_by_label("Run Stage II").click();
    h.run_steps(2);
    assert!(h.state().state.jobs.is_empty());
    h.get_by_label("▶ Run all stages").click();
    h.run_steps(2);
    assert_eq!(h.state().state.cascade.running.map(|(s, _)| s), Some(0));
    wait(&mut h, "the three stages", |a| {
        a.state.cascade.results[2].is_some() || a.state.error.is_some()
    });
    let app = h.state();
    assert!(app.state.error.is_none(), "{:?}", app.state.error);
    let results: Vec<((usize, usize), usize)> = app
        .state
        .cascade
        .results
        .iter()
        .map(|r| {
            let r = r.as_ref().unwrap();
            assert!(r.it_per_sec > 0.0 && r.elapsed_secs > 0.0);
            (r.size(), r.count())
        })
        .collect();
    assert_eq!(results, vec![((16, 16), 2), ((64, 64), 2), ((256, 256), 2)]);
    assert!(app.state.cascade.running.is_none() && !app.state.cascade.chain);
    // Every stage's images are in the gallery, labelled with their model.
    assert_eq!(app.state.gallery.len(), 6);
    assert_eq!(app.state.gallery[2].params.model, "tiny-if-ii");
    assert_eq!(app.state.gallery[5].width, 256);
    // The main model is still the SD one.
    assert!(matches!(&app.state.model.status, ModelStatus::Loaded(m) if m.ends_with("tiny-sd")));

    // "Upscale ×4" on stage I's first image (16²) gives a 64² image from the x4 upscaler.
    h.state_mut().state.view = View::Generate;
    h.state_mut().state.gallery.selected = Some(0);
    h.run_steps(2);
    h.get_by_label("Upscale ×4").click();
    h.run_steps(2);
    wait(&mut h, "the upscaled image", |a| a.state.gallery.len() == 7);
    let last = &h.state().state.gallery[6];
    assert_eq!((last.width, last.height), (64, 64));
    assert_eq!(last.params.model, "tiny-sd-x4");
    assert_eq!(last.params.prompt, "a corgi in a red hat");
}

/// A precision the GPU could not switch to in this process waits for the next start; the
/// settings panel says so and offers to restart (the session is saved as the window closes).
#[test]
fn a_precision_waiting_for_a_restart_offers_restart_now() {
    let mut h = harness(app());
    h.step();
    wait(&mut h, "the model", |a| a.state.model_ready());
    let mut wanted = h.state().state.setup.settings;
    wanted.execution.precision = Precision::F16;
    h.state_mut().state.setup.restart_for = Some(wanted);
    h.run_steps(2);
    h.get_by_label("f16 from the next start");
    assert!(!app::gui::restart_requested());
    h.get_by_label("Restart now").click();
    h.run_steps(2);
    assert!(
        app::gui::restart_requested(),
        "the window closes and Brushfire starts again"
    );
    assert_eq!(
        h.state().state.to_persisted().engine.precision,
        "f16",
        "what the next start reads"
    );
}

/// Waits for the model load the app has asked for to end: `Ok(spec)` loaded, `Err(message)`.
fn load_outcome(
    h: &mut Harness<'static, BrushfireApp>,
    spec: &std::path::Path,
) -> Result<(), String> {
    h.state_mut().state.model.spec = spec.to_string_lossy().into_owned();
    h.state_mut().state.apply(Command::LoadModel);
    wait(h, "the load to end", |a| {
        matches!(
            a.state.model.status,
            ModelStatus::Loaded(_) | ModelStatus::Failed(_)
        )
    });
    match &h.state().state.model.status {
        ModelStatus::Failed(e) => Err(e.clone()),
        _ => Ok(()),
    }
}

/// The bad-input battery (docs/reliability.md) through the app, where it takes the same input as
/// the CLI: broken model folders picked in the model box, and pictures opened on the image pages.
/// Each gets a message naming what is wrong; none panics; the app keeps working after all of them.
#[test]
fn the_bad_input_battery_through_the_app() {
    let dir = scratch("gui-battery");
    let mut h = harness(app());
    h.step();
    wait(&mut h, "the model", |a| a.state.model_ready());

    // Model folders.
    let broken = |name: &str, change: &dyn Fn(&std::path::Path)| {
        let folder = dir.join(name);
        copy_dir(&fixture("tiny-sd"), &folder);
        change(&folder);
        folder
    };
    let empty = dir.join("empty-folder");
    std::fs::create_dir_all(&empty).unwrap();
    let cases: Vec<(std::path::PathBuf, Vec<&str>)> = vec![
        (dir.join("no-such-model"), vec!["no-such-model"]),
        (
            empty.clone(),
            vec!["empty-folder", "the folder is empty", "model_index.json"],
        ),
        (
            broken("no-unet", &|f| {
                std::fs::remove_dir_all(f.join("unet")).unwrap()
            }),
            vec!["the `unet` component is missing"],
        ),
        (
            broken("unknown-class", &|f| {
                let index = f.join("model_index.json");
                let text = std::fs::read_to_string(&index).unwrap();
                let text = text.replace("StableDiffusionPipeline", "StableDiffusionXLPipeline");
                std::fs::write(&index, text).unwrap();
            }),
            vec!["StableDiffusionXLPipeline"],
        ),
        (
            broken("bad-config", &|f| {
                std::fs::write(f.join("unet/config.json"), "{\"in_channels\": \"four\"}").unwrap()
            }),
            vec!["config.json"],
        ),
        (
            broken("cut-weights", &|f| {
                let file = f.join("unet/diffusion_pytorch_model.safetensors");
                let bytes = std::fs::read(&file).unwrap();
                std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
            }),
            vec!["diffusion_pytorch_model.safetensors"],
        ),
    ];
    for (folder, needles) in cases {
        let error = load_outcome(&mut h, &folder).expect_err("a broken model is refused");
        for needle in needles {
            assert!(
                error.contains(needle),
                "{}: `{needle}` not in: {error}",
                folder.display()
            );
        }
        h.run_steps(2);
        let shown: String = error.chars().take(40).collect();
        assert!(
            h.query_all_by_label_contains(&shown).next().is_some(),
            "shown: {error}"
        );
    }
    load_outcome(&mut h, &fixture("tiny-sd")).expect("the good model loads after them all");

    // Pictures on the image to image page.
    let state = |h: &Harness<'static, BrushfireApp>| {
        let s = &h.state().state;
        (s.error.clone(), s.status.clone())
    };
    let text = dir.join("notes.png");
    std::fs::write(&text, "this is not a picture").unwrap();
    let zero = dir.join("empty.png");
    std::fs::write(&zero, png_header_only(0, 0)).unwrap();
    let huge = dir.join("huge.png");
    std::fs::write(&huge, png_header_only(20000, 20000)).unwrap();
    for (file, needle) in [
        (&text, "Invalid PNG signature"),
        (&zero, "Invalid image dimensions"),
        (&huge, "20000×20000"),
    ] {
        h.state_mut().state.apply(Command::DismissError);
        h.state_mut()
            .state
            .apply(Command::OpenSource(file.to_path_buf()));
        let (error, _) = state(&h);
        let error = error.expect("refused");
        assert!(
            error.contains(file.file_name().unwrap().to_str().unwrap()) && error.contains(needle),
            "{error}"
        );
    }
    let rgb = image::open(fixture("refs/init.png")).unwrap();
    for (name, picture) in [
        ("rgb16.png", image::DynamicImage::ImageRgb16(rgb.to_rgb16())),
        ("grey.png", image::DynamicImage::ImageLuma8(rgb.to_luma8())),
        ("rgba.png", image::DynamicImage::ImageRgba8(rgb.to_rgba8())),
    ] {
        let file = dir.join(name);
        picture.save(&file).unwrap();
        h.state_mut().state.apply(Command::DismissError);
        h.state_mut().state.apply(Command::OpenSource(file.clone()));
        let (error, status) = state(&h);
        assert_eq!(error, None, "{name}");
        assert!(status.contains(name), "{status}");
    }
    // A mask of another size than the image.
    let small = dir.join("small-mask.png");
    image::GrayImage::new(8, 8).save(&small).unwrap();
    let err = h
        .state_mut()
        .state
        .inputs
        .load_mask(&small)
        .expect_err("another size is refused");
    assert!(format!("{err:#}").contains("small-mask.png"), "{err:#}");

    // Still working: an image from the good model.
    h.state_mut().state.view = View::Generate;
    h.state_mut().state.apply(Command::Generate);
    wait(&mut h, "the image", |a| !a.state.gallery.is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A minimised window draws no UI; eframe still calls `App::logic` whenever the engine wakes it.
/// Through `logic` alone, a finished image is saved to the output folder and "Run all stages"
/// goes through all three IF stages.
#[test]
fn a_minimised_window_still_saves_images_and_advances_the_if_chain() {
    let dir = scratch("minimised");
    let mut a = app();
    a.state.output_dir = Some(dir.clone());
    a.state.form.prompt = "a corgi in a red hat".into();
    a.state.cascade.stage1_side = 16;
    for (i, folder) in ["tiny-if", "tiny-if-ii", "tiny-sd-x4"].iter().enumerate() {
        a.state.cascade.stages[i].model = fixture(folder).to_string_lossy().into_owned();
        a.state.cascade.stages[i].steps = 2;
    }
    let ctx = egui::Context::default();
    let logic_until = |a: &mut BrushfireApp, what: &str, done: &dyn Fn(&BrushfireApp) -> bool| {
        let start = Instant::now();
        while !done(a) {
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "timed out waiting for {what}; error: {:?}",
                a.state.error
            );
            std::thread::sleep(Duration::from_millis(20));
            a.logic(&ctx);
        }
    };
    logic_until(&mut a, "the model", &|a| a.state.model_ready());
    a.state.apply(Command::Generate);
    logic_until(&mut a, "the image, saved", &|a| {
        a.state.gallery.first().is_some_and(|g| !g.saving())
    });
    let saved = a.state.gallery[0]
        .path
        .clone()
        .expect("saved while minimised");
    assert!(saved.starts_with(&dir) && saved.is_file());
    a.state.apply(Command::RunAllStages);
    logic_until(&mut a, "the three stages", &|a| {
        a.state.cascade.results[2].is_some() || a.state.error.is_some()
    });
    assert!(a.state.error.is_none(), "{:?}", a.state.error);
    assert!(!a.state.cascade.chain && a.state.cascade.running.is_none());
    assert_eq!(a.state.gallery.len(), 4, "one image, then one per stage");
    // The last stage's image may still be on the saver thread: every image ends up on disk.
    logic_until(&mut a, "every image, saved", &|a| {
        a.state.gallery.iter().all(|g| !g.saving())
    });
    assert!(
        a.state
            .gallery
            .iter()
            .all(|g| g.path.as_ref().is_some_and(|p| p.is_file())),
        "every image saved while minimised"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
