//! DeepFloyd IF pipelines against diffusers (`tests/fixtures/gen_if.py`): stage I
//! (`IFPipeline`) from a prompt, then stage II (`IFSuperResolutionPipeline`) on stage I's
//! output, each replaying diffusers' noise tape (initial images, stage II's image noise, DDPM's
//! variance noise at every step but the last).

use crate::common::{Cpu, assert_parity, fixture, refs};
use engine::noise::{NoiseSource, NoiseTape};
use engine::pipelines::deepfloyd_if::{IFPipeline, T5Residency, is_if_folder};
use engine::pipelines::stable_diffusion::LoadOptions;
use engine::pipelines::{
    CancelToken, CommonRequest, GenerationRequest, PipelineKind, PromptEmbeds, StepProgress, Task,
    UpscaleInput, UpscaleSource,
};

fn meta() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("refs/if.json")).unwrap()).unwrap()
}

fn load(folder: &str) -> IFPipeline<Cpu> {
    IFPipeline::load(
        &fixture(folder),
        &LoadOptions::default(),
        &Default::default(),
    )
    .expect("load IF")
}

fn stage1_request() -> GenerationRequest {
    let m = meta();
    let s = &m["stage1"];
    GenerationRequest {
        common: CommonRequest {
            prompt: m["prompt"].as_str().unwrap().into(),
            negative_prompt: m["negative_prompt"].as_str().unwrap().into(),
            steps: s["num_inference_steps"].as_u64().unwrap() as usize,
            guidance_scale: s["guidance_scale"].as_f64().unwrap(),
            width: 16,
            height: 16,
            batch: 2,
            seed: s["seed"].as_u64().unwrap(),
            ..Default::default()
        },
        task: Task::If,
    }
}

fn stage2_request() -> GenerationRequest {
    let m = meta();
    let s = &m["stage2"];
    GenerationRequest {
        common: CommonRequest {
            prompt: m["prompt"].as_str().unwrap().into(),
            negative_prompt: m["negative_prompt"].as_str().unwrap().into(),
            steps: s["num_inference_steps"].as_u64().unwrap() as usize,
            guidance_scale: s["guidance_scale"].as_f64().unwrap(),
            width: 32,
            height: 32,
            batch: 2,
            seed: s["seed"].as_u64().unwrap(),
            ..Default::default()
        },
        task: Task::IfStage2(UpscaleInput {
            source: UpscaleSource::Array(refs("if_stage1")["image_pt"].clone()),
            noise_level: Some(s["noise_level"].as_u64().unwrap() as usize),
        }),
    }
}

fn stage2_input(req: &mut GenerationRequest) -> &mut UpscaleInput {
    match &mut req.task {
        Task::IfStage2(input) => input,
        other => panic!("{other:?}"),
    }
}

fn run(
    pipe: &IFPipeline<Cpu>,
    request: &GenerationRequest,
    tape: &str,
) -> engine::pipelines::stable_diffusion::GenerationOutput {
    let mut tape = NoiseTape::load(fixture(&format!("refs/{tape}_tape.safetensors"))).unwrap();
    let out = pipe
        .generate(
            request,
            Some(&mut tape as &mut dyn NoiseSource),
            &CancelToken::new(),
            &mut |_: &StepProgress| {},
        )
        .expect("generate");
    assert_eq!(
        tape.remaining(),
        0,
        "{tape:?}: every draw of the tape is used"
    );
    out
}

#[test]
fn if_stage_i_matches_diffusers() {
    let pipe = load("tiny-if");
    assert!(is_if_folder(&fixture("tiny-if")) && !is_if_folder(&fixture("tiny-sd")));
    assert_eq!(pipe.stage(), PipelineKind::If);
    let out = run(&pipe, &stage1_request(), "if_stage1");
    assert_parity(&out.images, "if_stage1", "image", "stage I image");
    assert_parity(
        out.raw.as_ref().unwrap(),
        "if_stage1",
        "image_pt",
        "stage I output_type=pt",
    );
    // T5 is freed after encoding by default.
    assert!(!pipe.t5_loaded());
    assert!(
        out.notes.iter().all(|n| !n.contains("dropped")),
        "{:?}",
        out.notes
    );
}

/// A prompt longer than T5's 77 tokens loses its end, as in diffusers, and the images come with a
/// note saying how many tokens were dropped (the negative prompt fits: no note for it).
#[test]
fn an_if_prompt_too_long_for_t5_says_how_much_was_dropped() {
    let pipe = load("tiny-if");
    let mut request = stage1_request();
    request.prompt = "a fox in the snow, ".repeat(30);
    request.steps = 1;
    request.batch = 1;
    let tokenizer = engine::models::text_encoders::t5_tokenizer::T5Tokenizer::load(&fixture(
        "tiny-if/tokenizer",
    ))
    .unwrap();
    let dropped = tokenizer.encode(&[&request.prompt]).unwrap().dropped[0];
    assert!(dropped > 100, "{dropped}");
    let out = pipe
        .generate(
            &request,
            None,
            &CancelToken::new(),
            &mut |_: &StepProgress| {},
        )
        .expect("generate");
    let notes: Vec<&String> = out.notes.iter().filter(|n| n.contains("dropped")).collect();
    assert_eq!(
        notes,
        [&format!(
            "the prompt's last {dropped} tokens were dropped: the text encoder reads 77 (long \
             prompts are not split into chunks yet)"
        )]
    );
}

#[test]
fn if_stage_ii_matches_diffusers() {
    let pipe = load("tiny-if-ii");
    assert_eq!(pipe.stage(), PipelineKind::IfStage2);
    let out = run(&pipe, &stage2_request(), "if_stage2");
    assert_parity(&out.images, "if_stage2", "image", "stage II image");
    assert_parity(
        out.raw.as_ref().unwrap(),
        "if_stage2",
        "image_pt",
        "stage II output_type=pt",
    );
}

/// Stage II fed stage I's T5 embeddings (what the app and `--save-array` hand on) gives
/// diffusers' stage II images without running T5 itself.
#[test]
fn if_stage_ii_takes_stage_is_embeddings() {
    let one = load("tiny-if");
    let first = run(&one, &stage1_request(), "if_stage1");
    let embeds = first.prompt_embeds.expect("stage I returns its embeddings");
    assert_eq!(embeds.prompt_embeds.shape, vec![1, 77, 16]);
    let mut two = load("tiny-if-ii");
    two.set_t5_residency(T5Residency::KeepLoaded);
    let mut request = stage2_request();
    request.prompt_embeds = Some(embeds);
    let out = run(&two, &request, "if_stage2");
    assert!(!two.t5_loaded(), "stage II did not load T5");
    assert_parity(
        &out.images,
        "if_stage2",
        "image",
        "stage II from stage I's embeddings",
    );
}

/// Prompt embeddings given as tensors (the seed benchmark's way) give the same images as the
/// prompt encoded by T5, and then T5 is never loaded.
#[test]
fn if_prompt_embeds_stand_in_for_t5() {
    let mut pipe = load("tiny-if");
    pipe.set_t5_residency(T5Residency::KeepLoaded);
    let request = stage1_request();
    let both = pipe
        .encode_texts(&[&request.negative_prompt, &request.prompt])
        .unwrap();
    assert!(pipe.t5_loaded(), "kept loaded");
    let host =
        |t: burn::tensor::Tensor<Cpu, 3>| engine::tensor_io::HostTensor::from_tensor(t).unwrap();
    let embeds = PromptEmbeds {
        prompt_embeds: host(both.clone().narrow(0, 1, 1)),
        negative_prompt_embeds: Some(host(both.narrow(0, 0, 1))),
    };
    let fresh = load("tiny-if");
    let mut request = stage1_request();
    request.prompt = String::new();
    request.prompt_embeds = Some(embeds);
    let out = run(&fresh, &request, "if_stage1");
    assert!(!fresh.t5_loaded(), "T5 not needed");
    assert_parity(&out.images, "if_stage1", "image", "from embeds");
}

#[test]
fn if_requests_are_checked_before_any_tensor_work() {
    let one = load("tiny-if");
    let two = load("tiny-if-ii");
    let err = |pipe: &IFPipeline<Cpu>, req: &GenerationRequest| match pipe.generate(
        req,
        None,
        &CancelToken::new(),
        &mut |_: &StepProgress| {},
    ) {
        Ok(_) => panic!("{:?} was accepted", req.pipeline()),
        Err(e) => e.to_string(),
    };
    let mut req = stage1_request();
    req.task = Task::Txt2Img;
    assert!(
        err(&one, &req).contains("runs the if pipeline"),
        "{}",
        err(&one, &req)
    );
    let mut req = stage1_request();
    req.task = Task::If;
    assert!(
        err(&two, &req).contains("runs the if-stage2 pipeline"),
        "{}",
        err(&two, &req)
    );
    let mut req = stage2_request();
    stage2_input(&mut req).source = UpscaleSource::Image(engine::tensor_io::HostTensor {
        shape: vec![32, 32],
        values: vec![0.0; 32 * 32],
    });
    assert!(err(&two, &req).contains("image"), "{}", err(&two, &req));
    let mut req = stage2_request();
    stage2_input(&mut req).noise_level = Some(1000);
    assert!(err(&two, &req).contains("noise_level"));
    let mut req = stage2_request();
    if let UpscaleSource::Array(a) = &mut stage2_input(&mut req).source {
        a.shape = vec![2, 4, 16, 12]; // as many values, but 4 channels
    }
    assert!(err(&two, &req).contains("image_array"));
    let mut req = stage1_request();
    req.prompt_embeds = Some(PromptEmbeds {
        prompt_embeds: engine::tensor_io::HostTensor {
            shape: vec![1, 4, 5],
            values: vec![0.0; 20],
        },
        negative_prompt_embeds: None,
    });
    assert!(err(&one, &req).contains("prompt_embeds"));
}
