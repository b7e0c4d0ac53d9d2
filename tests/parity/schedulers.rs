//! Scheduler parity with diffusers on Burn's CPU backend (flex), against
//! tests/fixtures/refs/schedulers/*.safetensors (written by tests/fixtures/gen_schedulers.py,
//! whose docstring describes every tensor): timesteps, init_noise_sigma, a rollout of
//! `scale_model_input` + `step` (teacher-forced: each step starts from diffusers' previous
//! sample), the stochastic ones with both a torch-seeded generator and the recorded noise tape,
//! and `add_noise`. Also `from_config_json`'s class selection and unknown-key warnings.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use burn::backend::Flex;
use burn::tensor::{Tensor, TensorData};
use engine::noise::{NoiseSource, NoiseTape, TorchGenerator};
use engine::schedulers::{Scheduler, SchedulerKind, from_config_json, unknown_config_keys};
use safetensors::SafeTensors;
use serde_json::{Value, json};

type B = Flex;

/// diffusers computes in f32 (coefficients included); we compute coefficients in f64.
const TOLERANCE: f32 = 1e-4;

fn fixture_path(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/refs/schedulers")
        .join(format!("{case}.safetensors"))
}

struct Fixture {
    path: PathBuf,
    bytes: Vec<u8>,
    metadata: std::collections::HashMap<String, String>,
}

impl Fixture {
    fn load(case: &str) -> Self {
        let path = fixture_path(case);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (run python tests/fixtures/gen_schedulers.py)",
                path.display()
            )
        });
        let (_, meta) = SafeTensors::read_metadata(&bytes).expect("safetensors header");
        let metadata = meta.metadata().clone().expect("fixture metadata");
        Self {
            path,
            bytes,
            metadata,
        }
    }

    fn file(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("safetensors")
    }

    fn meta(&self, key: &str) -> &str {
        self.metadata
            .get(key)
            .unwrap_or_else(|| panic!("metadata `{key}`"))
    }

    fn has(&self, name: &str) -> bool {
        self.file().names().contains(&name)
    }

    fn f64s(&self, name: &str) -> Vec<f64> {
        let file = self.file();
        let view = file
            .tensor(name)
            .unwrap_or_else(|e| panic!("`{name}`: {e}"));
        assert_eq!(view.dtype(), safetensors::Dtype::F64, "{name}");
        view.data()
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
            .collect()
    }

    fn tensor(&self, name: &str) -> Tensor<B, 4> {
        let file = self.file();
        let view = file
            .tensor(name)
            .unwrap_or_else(|e| panic!("`{name}`: {e}"));
        assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
        let shape: [usize; 4] = view.shape().try_into().expect("4-d tensor");
        let values: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect();
        Tensor::from_data(TensorData::new(values, shape), &Default::default())
    }

    fn kind(&self) -> SchedulerKind {
        self.meta("kind").parse().expect("kind")
    }

    fn config(&self) -> Value {
        serde_json::from_str(self.meta("config")).expect("config json")
    }

    fn scheduler(&self) -> Box<dyn Scheduler<B>> {
        let mut scheduler =
            from_config_json::<B>(&self.config(), Some(self.kind())).expect("build scheduler");
        scheduler.set_eta(self.meta("eta").parse().expect("eta"));
        scheduler
    }
}

/// The largest |ours − diffusers| / max(1, |diffusers|), with its element index.
fn worst_error(what: &str, ours: Tensor<B, 4>, expected: Tensor<B, 4>) -> (usize, f32, f32, f32) {
    assert_eq!(ours.dims(), expected.dims(), "{what}: shape");
    let a = ours.into_data().to_vec::<f32>().expect("f32 data");
    let b = expected.into_data().to_vec::<f32>().expect("f32 data");
    let mut worst = (0usize, 0f32, 0f32, 0f32);
    for (i, (&x, &y)) in a.iter().zip(&b).enumerate() {
        let err = (x - y).abs() / y.abs().max(1.0);
        assert!(!err.is_nan(), "{what}[{i}]: ours {x}, diffusers {y}");
        if err > worst.1 {
            worst = (i, err, x, y);
        }
    }
    worst
}

/// |ours − diffusers| ≤ TOLERANCE · max(1, |diffusers|), element-wise.
fn assert_close(what: &str, ours: Tensor<B, 4>, expected: Tensor<B, 4>) {
    let (i, err, x, y) = worst_error(what, ours, expected);
    assert!(
        err <= TOLERANCE,
        "{what}: element {i}: ours {x} vs diffusers {y} (relative error {err:e})"
    );
}

fn check_timesteps(fx: &Fixture, case: &str) {
    for n in [5usize, 10, 50] {
        let mut scheduler = fx.scheduler();
        scheduler.set_timesteps(n).expect("set_timesteps");
        let expected = fx.f64s(&format!("timesteps_{n}"));
        assert_eq!(
            scheduler.timesteps().len(),
            expected.len(),
            "{case}: number of timesteps for {n} steps: {:?} vs {expected:?}",
            scheduler.timesteps()
        );
        for (ours, theirs) in scheduler.timesteps().iter().zip(&expected) {
            assert!(
                (ours - theirs).abs() <= 1e-3,
                "{case}: timesteps for {n} steps: {:?} vs {expected:?}",
                scheduler.timesteps()
            );
        }
        let sigma = fx.f64s(&format!("init_noise_sigma_{n}"))[0];
        let ours = scheduler.init_noise_sigma();
        assert!(
            (ours - sigma).abs() <= 1e-5 * sigma.abs().max(1.0),
            "{case}: init_noise_sigma for {n} steps: {ours} vs {sigma}"
        );
    }
}

/// Steps through the schedule from the fixture's inputs, comparing every output.
fn check_rollout(fx: &Fixture, case: &str, noise: &mut dyn NoiseSource) {
    let steps: usize = fx.meta("rollout_steps").parse().expect("rollout_steps");
    let mut scheduler = fx.scheduler();
    scheduler.set_timesteps(steps).expect("set_timesteps");
    let mut sample = fx.tensor("sample");
    for k in 0..scheduler.timesteps().len() {
        let scaled = scheduler.scale_model_input(sample.clone(), k);
        let scaled_name = format!("scaled_{k}");
        let expected_scaled = if fx.has(&scaled_name) {
            fx.tensor(&scaled_name)
        } else {
            sample.clone()
        };
        assert_close(&format!("{case}: {scaled_name}"), scaled, expected_scaled);
        let model_output = fx.tensor(&format!("model_output_{k}"));
        let prev = scheduler
            .step(model_output, k, sample, noise)
            .unwrap_or_else(|e| panic!("{case}: step {k}: {e}"));
        let expected = fx.tensor(&format!("prev_{k}"));
        assert_close(&format!("{case}: prev_{k}"), prev, expected.clone());
        sample = expected;
    }
}

fn check_add_noise(fx: &Fixture, case: &str) {
    let steps: usize = fx.meta("rollout_steps").parse().expect("rollout_steps");
    let mut scheduler = fx.scheduler();
    scheduler.set_timesteps(steps).expect("set_timesteps");
    let indices: Vec<usize> = serde_json::from_str(fx.meta("add_noise_steps")).expect("steps");
    let original = fx.tensor("add_noise_original");
    let noise = fx.tensor("add_noise_noise");
    for i in indices {
        let ours = scheduler.add_noise(original.clone(), noise.clone(), i);
        assert_close(
            &format!("{case}: add_noise_{i}"),
            ours,
            fx.tensor(&format!("add_noise_{i}")),
        );
    }
}

fn check_case(case: &str) {
    let fx = Fixture::load(case);
    check_timesteps(&fx, case);
    let seed: u64 = fx.meta("noise_seed").parse().expect("noise_seed");
    let mut generator = TorchGenerator::new(seed);
    check_rollout(&fx, case, &mut generator);
    if fx.has("rng.tape.0") {
        // The same rollout replaying the draws diffusers recorded.
        let mut tape = NoiseTape::load(&fx.path).expect("noise tape");
        check_rollout(&fx, &format!("{case} (noise tape)"), &mut tape);
        assert_eq!(tape.remaining(), 0, "{case}: draws left on the tape");
    }
    check_add_noise(&fx, case);
}

#[test]
fn pndm_plms_matches_diffusers() {
    check_case("pndm");
}

#[test]
fn pndm_prk_matches_diffusers() {
    check_case("pndm_prk");
}

#[test]
fn ddim_matches_diffusers() {
    check_case("ddim");
}

#[test]
fn ddim_eta_v_prediction_matches_diffusers() {
    check_case("ddim_eta_vpred");
}

#[test]
fn euler_matches_diffusers() {
    check_case("euler");
}

#[test]
fn euler_leading_matches_diffusers() {
    check_case("euler_leading");
}

#[test]
fn euler_karras_matches_diffusers() {
    check_case("euler_karras");
}

#[test]
fn euler_ancestral_matches_diffusers() {
    check_case("euler_a");
}

#[test]
fn dpmpp_2m_matches_diffusers() {
    check_case("dpmpp_2m");
}

#[test]
fn dpmpp_2m_karras_matches_diffusers() {
    check_case("dpmpp_2m_karras");
}

#[test]
fn dpmpp_2m_leading_matches_diffusers() {
    check_case("dpmpp_2m_leading");
}

#[test]
fn ddpm_matches_diffusers() {
    check_case("ddpm");
}

#[test]
fn ddpm_learned_range_thresholding_matches_diffusers() {
    check_case("ddpm_if");
}

/// The parity checks can fail: the DDIM v-prediction rollout with the wrong prediction type,
/// or with another noise seed, does not match.
#[test]
fn parity_checks_catch_a_wrong_scheduler() {
    let fx = Fixture::load("ddim_eta_vpred");
    let run = |config: Value, seed: u64| {
        let mut scheduler =
            from_config_json::<B>(&config, Some(SchedulerKind::Ddim)).expect("build");
        scheduler.set_eta(0.5);
        scheduler.set_timesteps(6).expect("set_timesteps");
        let mut generator = TorchGenerator::new(seed);
        let prev = scheduler
            .step(
                fx.tensor("model_output_0"),
                0,
                fx.tensor("sample"),
                &mut generator,
            )
            .expect("step");
        worst_error("ddim", prev, fx.tensor("prev_0")).1 <= TOLERANCE
    };
    let seed: u64 = fx.meta("noise_seed").parse().expect("seed");
    assert!(
        run(fx.config(), seed),
        "the fixture's own config must match"
    );
    let mut epsilon = fx.config();
    epsilon["prediction_type"] = json!("epsilon");
    assert!(
        !run(epsilon, seed),
        "epsilon instead of v_prediction went unnoticed"
    );
    assert!(
        !run(fx.config(), seed + 1),
        "a different noise seed went unnoticed"
    );
}

fn sd15_config() -> Value {
    json!({
        "_class_name": "PNDMScheduler",
        "_diffusers_version": "0.6.0",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "num_train_timesteps": 1000,
        "set_alpha_to_one": false,
        "skip_prk_steps": true,
        "steps_offset": 1,
        "trained_betas": null,
        "clip_sample": false
    })
}

#[test]
fn class_name_picks_the_scheduler_unless_overridden() {
    let mut config = sd15_config();
    let pndm = from_config_json::<B>(&config, None).expect("pndm");
    assert_eq!(pndm.name(), "PLMS");
    config["_class_name"] = json!("EulerAncestralDiscreteScheduler");
    let euler_a = from_config_json::<B>(&config, None).expect("euler a");
    assert_eq!(euler_a.name(), "Euler a");
    let ddim = from_config_json::<B>(&config, Some(SchedulerKind::Ddim)).expect("ddim");
    assert_eq!(ddim.name(), "DDIM");

    config["_class_name"] = json!("HeunDiscreteScheduler");
    assert!(
        from_config_json::<B>(&config, None).is_err(),
        "unported class"
    );
    assert!(from_config_json::<B>(&config, Some(SchedulerKind::Euler)).is_ok());
    let no_class = json!({ "beta_schedule": "scaled_linear" });
    assert!(
        from_config_json::<B>(&no_class, None).is_err(),
        "no _class_name"
    );
}

#[test]
fn invalid_values_are_errors_not_panics() {
    let mut config = sd15_config();
    config["timestep_spacing"] = json!("sideways");
    assert!(from_config_json::<B>(&config, None).is_err());
    let mut scheduler = from_config_json::<B>(&sd15_config(), None).expect("pndm");
    assert!(scheduler.set_timesteps(0).is_err());
    assert!(scheduler.set_timesteps(1001).is_err());
    let sample = Tensor::<B, 4>::zeros([1, 4, 2, 2], &Default::default());
    let mut generator = TorchGenerator::new(0);
    // Stepping before set_timesteps, or past the end, is an error.
    assert!(
        scheduler
            .step(sample.clone(), 0, sample.clone(), &mut generator)
            .is_err()
    );
    scheduler.set_timesteps(2).expect("set_timesteps");
    assert!(
        scheduler
            .step(sample.clone(), 99, sample, &mut generator)
            .is_err()
    );
}

/// Collects the messages of WARN-level events.
struct WarnCollector(Arc<Mutex<Vec<String>>>);

struct MessageVisitor<'a>(&'a mut String);

impl tracing::field::Visit for MessageVisitor<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0.push_str(&format!("{value:?}"));
        }
    }
}

impl tracing::Subscriber for WarnCollector {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        if *event.metadata().level() == tracing::Level::WARN {
            let mut message = String::new();
            event.record(&mut MessageVisitor(&mut message));
            self.0.lock().expect("lock").push(message);
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[test]
fn unknown_keys_warn_but_do_not_fail() {
    let mut config = sd15_config();
    config["my_custom_knob"] = json!(3);
    // Keys of other diffusers schedulers and private keys are ignored quietly.
    config["use_karras_sigmas"] = json!(true);
    config["_use_default_values"] = json!(["timestep_spacing"]);

    let warnings = Arc::new(Mutex::new(Vec::new()));
    let collector = WarnCollector(warnings.clone());
    let built = tracing::subscriber::with_default(collector, || {
        from_config_json::<B>(&config, Some(SchedulerKind::Ddim)).map(|s| s.name())
    });
    assert_eq!(built.ok(), Some("DDIM"));
    let warnings = warnings.lock().expect("lock").clone();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("my_custom_knob"), "{warnings:?}");
    assert_eq!(
        unknown_config_keys(&config, Some(SchedulerKind::Ddim)).expect("keys"),
        ["my_custom_knob"]
    );
    // For Euler `use_karras_sigmas` is its own key: it is read, and still nothing else warns.
    assert_eq!(
        unknown_config_keys(&config, Some(SchedulerKind::Euler)).expect("keys"),
        ["my_custom_knob"]
    );
}

#[test]
fn euler_init_noise_sigma_follows_the_spacing() {
    // docs/architecture.md §4: sqrt(σmax² + 1) with leading spacing; σmax with SD 1.5's file as is
    // (no timestep_spacing there, so Euler's own default, linspace).
    let mut config = sd15_config();
    let mut linspace = from_config_json::<B>(&config, Some(SchedulerKind::Euler)).expect("euler");
    linspace.set_timesteps(50).expect("set_timesteps");
    config["timestep_spacing"] = json!("leading");
    let mut leading = from_config_json::<B>(&config, Some(SchedulerKind::Euler)).expect("euler");
    leading.set_timesteps(50).expect("set_timesteps");
    // diffusers 0.42: 14.6146 (σ at t=999) and 13.1585 = √(13.1204² + 1) (σ at t=981).
    let (sigma_max, sigma_leading) = (linspace.init_noise_sigma(), leading.init_noise_sigma());
    assert!((sigma_max - 14.6146).abs() < 1e-3, "{sigma_max}");
    assert!((sigma_leading - 13.1585).abs() < 1e-3, "{sigma_leading}");
}
