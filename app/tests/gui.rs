//! The desktop app driven through egui_kittest: the real app state and engine worker, on the
//! tiny fixture model and the CPU backend.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use app::gui::BrushfireApp;
use eframe::egui;
use eframe::egui::accesskit::Role;
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use engine::backend::BackendRequest;

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
    assert_eq!(app.state.gallery[0].prompt, "a castle on a hill");
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
