//! `brushfire generate` end to end on the tiny fixture: `--latents … --save-array …` equals
//! diffusers' `output_type="np"` image (docs/cli.md), and bad flags fail with a clear message.
// Test code: a failed unwrap is the test failing, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;

use engine::tensor_io::read_safetensors;

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(rel)
}

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("brushfire-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn brushfire(args: &[&str]) -> std::process::Output {
    brushfire_with_env(args, &[])
}

fn brushfire_with_env(args: &[&str], env: &[(&str, PathBuf)]) -> std::process::Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_brushfire"));
    command.args(args).env("HF_HUB_OFFLINE", "1");
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().expect("run brushfire")
}

fn generate_matches(reference: &str, scheduler: &str, extra: &[&str]) {
    generate_from_matches(&fixture("tiny-sd"), &[], reference, scheduler, extra);
}

/// `brushfire generate` of `model` with the reference request equals diffusers' image.
fn generate_from_matches(
    model: &std::path::Path,
    env: &[(&str, PathBuf)],
    reference: &str,
    scheduler: &str,
    extra: &[&str],
) {
    let refs = fixture(&format!("refs/{reference}.safetensors"));
    let tag = model.file_stem().unwrap().to_string_lossy().into_owned();
    let out = temp(&format!("{reference}-{tag}.safetensors"));
    let png = temp(&format!("{reference}-{tag}.png"));
    let mut args = vec![
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a photo of an astronaut riding a horse on mars",
        "--negative-prompt",
        "blurry",
        "--steps",
        "5",
        "--guidance",
        "7.5",
        "--width",
        "128",
        "--height",
        "64",
        "--batch",
        "2",
        "--scheduler",
        scheduler,
        "--latents",
        refs.to_str().unwrap(),
        "--save-array",
        out.to_str().unwrap(),
        "--output",
        png.to_str().unwrap(),
        "--backend",
        "cpu",
    ];
    args.extend_from_slice(extra);
    let output = brushfire_with_env(&args, env);
    assert!(
        output.status.success(),
        "brushfire failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let ours = &read_safetensors(&out).unwrap()["image"];
    let theirs = &read_safetensors(&refs).unwrap()["image"];
    assert_eq!(ours.shape, theirs.shape);
    let worst = ours
        .values
        .iter()
        .zip(&theirs.values)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst <= 1e-4, "{scheduler}: max |diff| {worst}");
    // One PNG per image, each with the A1111 parameters chunk.
    for i in 0..2 {
        let file = png.with_file_name(format!("{reference}-{tag}-{i}.png"));
        let img = image::open(&file).unwrap();
        assert_eq!((img.width(), img.height()), (128, 64));
    }
}

#[test]
fn generate_pndm_equals_diffusers() {
    generate_matches("txt2img_pndm", "pndm", &["--seed", "1234"]);
}

#[test]
fn generate_ddim_equals_diffusers() {
    // With the channels-last switch and the vanilla processor: the same image.
    generate_matches(
        "txt2img_ddim",
        "ddim",
        &[
            "--seed",
            "1234",
            "--channels-last",
            "on",
            "--attention",
            "vanilla",
        ],
    );
}

#[test]
fn generate_euler_equals_diffusers() {
    generate_matches("txt2img_euler", "euler", &["--seed", "1234"]);
}

#[test]
fn generate_euler_ancestral_with_seed_equals_diffusers() {
    // Diffusers drew the per-step noise from torch.Generator("cpu").manual_seed(1234).
    generate_matches("txt2img_euler_a", "euler-a", &["--seed", "1234"]);
}

#[test]
fn noise_tape_replaces_the_generator() {
    // The recorded draws of diffusers' run, with a seed that would give other noise.
    let tape = fixture("refs/txt2img_euler_a_tape.safetensors");
    generate_matches(
        "txt2img_euler_a",
        "euler-a",
        &["--seed", "7", "--noise-tape", tape.to_str().unwrap()],
    );
    let tape = fixture("refs/txt2img_ddpm_tape.safetensors");
    generate_matches(
        "txt2img_ddpm",
        "ddpm",
        &["--seed", "7", "--noise-tape", tape.to_str().unwrap()],
    );
}

#[test]
fn prompt_embeds_replace_the_text_encoder() {
    // diffusers' CFG embeddings are [negative × 2; positive × 2]; given as tensors, no prompt
    // text is needed.
    let refs = read_safetensors(&fixture("refs/txt2img_pndm.safetensors")).unwrap();
    let all = &refs["prompt_embeds"];
    let per = all.values.len() / 4;
    let take = |row: usize| engine::tensor_io::HostTensor {
        shape: vec![1, all.shape[1], all.shape[2]],
        values: all.values[row * per..(row + 1) * per].to_vec(),
    };
    let (negative, positive) = (take(0), take(2));
    let file = temp("embeds.safetensors");
    engine::tensor_io::write_safetensors(
        &file,
        &[
            ("prompt_embeds", &positive),
            ("negative_prompt_embeds", &negative),
        ],
    )
    .unwrap();
    let model = fixture("tiny-sd");
    let out = temp("embeds-out.safetensors");
    let latents = fixture("refs/txt2img_pndm.safetensors");
    let output = brushfire(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt-embeds",
        file.to_str().unwrap(),
        "--steps",
        "5",
        "--guidance",
        "7.5",
        "--width",
        "128",
        "--height",
        "64",
        "--batch",
        "2",
        "--latents",
        latents.to_str().unwrap(),
        "--save-array",
        out.to_str().unwrap(),
        "--backend",
        "cpu",
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let ours = &read_safetensors(&out).unwrap()["image"];
    let worst = ours
        .values
        .iter()
        .zip(&refs["image"].values)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst <= 1e-4, "max |diff| {worst}");
}

#[test]
fn bad_flags_fail_with_a_message() {
    let model = fixture("tiny-sd");
    let model = model.to_str().unwrap();
    let init = fixture("refs/init.png").to_string_lossy().into_owned();
    for (args, needle) in [
        (vec!["generate", "--model", model], "--prompt is required"),
        (
            vec![
                "generate",
                "--model",
                model,
                "--prompt",
                "x",
                "--width",
                "100",
                "--backend",
                "cpu",
            ],
            "width",
        ),
        (
            vec![
                "generate",
                "--model",
                model,
                "--prompt",
                "x",
                "--height",
                "0",
                "--backend",
                "cpu",
            ],
            "invalid height: 0",
        ),
        (
            vec![
                "generate",
                "--model",
                model,
                "--prompt",
                "x",
                "--scheduler",
                "heun",
            ],
            "heun",
        ),
        (
            vec![
                "generate",
                "--model",
                model,
                "--prompt",
                "x",
                "--attention",
                "flash",
            ],
            "flash",
        ),
        (
            vec![
                "generate",
                "--model",
                model,
                "--prompt",
                "x",
                "--backend",
                "tpu",
            ],
            "tpu",
        ),
        (
            vec!["generate", "--model", "not/a-cached-model", "--prompt", "x"],
            "HF_HUB_OFFLINE",
        ),
        (
            vec![
                "generate", "--model", model, "--prompt", "x", "--image", "a.png",
            ],
            "--image",
        ),
        (
            vec![
                "generate",
                "--model",
                model,
                "--prompt",
                "x",
                "--pipeline",
                "img2img",
            ],
            "needs --image",
        ),
        (
            vec![
                "generate",
                "--model",
                model,
                "--prompt",
                "x",
                "--pipeline",
                "img2img",
                "--image",
                "/nonexistent/init.png",
            ],
            "/nonexistent/init.png",
        ),
        (
            vec![
                "generate",
                "--model",
                model,
                "--prompt",
                "x",
                "--pipeline",
                "inpaint",
                "--image",
                init.as_str(),
            ],
            "needs --mask",
        ),
        (
            vec![
                "generate",
                "--model",
                model,
                "--prompt",
                "x",
                "--pipeline",
                "img2img",
                "--image",
                init.as_str(),
                "--strength",
                "2",
                "--backend",
                "cpu",
            ],
            "strength",
        ),
        (
            // Terabytes of vanilla attention scores: refused against this machine's memory
            // before any work, not allocated until the kernel kills the process.
            vec![
                "generate",
                "--model",
                model,
                "--prompt",
                "x",
                "--width",
                "8192",
                "--height",
                "8192",
                "--attention",
                "vanilla",
                "--backend",
                "cpu",
            ],
            "not enough memory: vanilla attention needs about",
        ),
    ] {
        let output = brushfire(&args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} should fail");
        assert!(
            stderr.contains(needle),
            "{args:?}: stderr does not mention {needle}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    }
}

#[test]
fn a_single_file_checkpoint_generates_the_same_image() {
    // The tiny model's configs stand in for SD 1.5's.
    generate_from_matches(
        &fixture("tiny-sd-single-file.safetensors"),
        &[("BRUSHFIRE_SD15_CONFIGS", fixture("tiny-sd"))],
        "txt2img_pndm",
        "pndm",
        &["--seed", "1234"],
    );
}

/// `brushfire generate --pipeline img2img|inpaint` with the reference's arguments equals
/// diffusers' images (the PNGs have the working size and record the strength).
fn image_pipeline_matches(model: &str, pipeline: &str, reference: &str, extra: &[&str]) {
    let refs = fixture(&format!("refs/{reference}.safetensors"));
    let out = temp(&format!("{reference}.safetensors"));
    let png = temp(&format!("{reference}.png"));
    let (model, init, mask) = (
        fixture(model),
        fixture("refs/init.png"),
        fixture("refs/mask.png"),
    );
    let mut args = vec![
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--pipeline",
        pipeline,
        "--prompt",
        "a fantasy landscape, trending on artstation",
        "--negative-prompt",
        "blurry",
        "--steps",
        "5",
        "--batch",
        "2",
        "--image",
        init.to_str().unwrap(),
        "--save-array",
        out.to_str().unwrap(),
        "--output",
        png.to_str().unwrap(),
        "--backend",
        "cpu",
    ];
    if pipeline == "inpaint" {
        args.extend([
            "--mask",
            mask.to_str().unwrap(),
            "--width",
            "128",
            "--height",
            "64",
        ]);
    }
    args.extend_from_slice(extra);
    let output = brushfire(&args);
    assert!(
        output.status.success(),
        "brushfire failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let ours = &read_safetensors(&out).unwrap()["image"];
    let theirs = &read_safetensors(&refs).unwrap()["image"];
    assert_eq!(ours.shape, theirs.shape, "{reference}");
    let worst = ours
        .values
        .iter()
        .zip(&theirs.values)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst <= 1e-4, "{reference}: max |diff| {worst}");
    let file = png.with_file_name(format!("{reference}-1.png"));
    let img = image::open(&file).unwrap();
    assert_eq!((img.width(), img.height()), (128, 64));
    let text = app::png_meta::read_parameters_text(&file).unwrap().unwrap();
    assert!(text.contains("Denoising strength: "), "{text}");
}

#[test]
fn img2img_equals_diffusers() {
    // The image's own size (128×64) is the working size, as in diffusers.
    image_pipeline_matches(
        "tiny-sd",
        "img2img",
        "img2img_pndm",
        &["--scheduler", "pndm", "--strength", "0.8", "--seed", "777"],
    );
    let tape = fixture("refs/img2img_ddim_tape.safetensors");
    image_pipeline_matches(
        "tiny-sd",
        "img2img",
        "img2img_ddim",
        &[
            "--scheduler",
            "ddim",
            "--strength",
            "0.6",
            "--noise-tape",
            tape.to_str().unwrap(),
        ],
    );
    // 128 px is two tiles of the tiny VAE's 64: the encode and the decode are tiled.
    image_pipeline_matches(
        "tiny-sd",
        "img2img",
        "vae_tiled_img2img",
        &[
            "--scheduler",
            "pndm",
            "--strength",
            "0.8",
            "--seed",
            "777",
            "--vae-tiling",
            "on",
        ],
    );
}

#[test]
fn inpaint_equals_diffusers() {
    // Default strength 1.0, as diffusers'.
    image_pipeline_matches(
        "tiny-sd-inpaint",
        "inpaint",
        "inpaint_pndm",
        &["--scheduler", "pndm", "--seed", "4321"],
    );
    image_pipeline_matches(
        "tiny-sd",
        "inpaint",
        "inpaint_legacy_ddim",
        &["--scheduler", "ddim", "--strength", "0.8", "--seed", "4321"],
    );
}

#[test]
fn controlnet_equals_diffusers() {
    let refs = fixture("refs/controlnet_pndm.safetensors");
    let out = temp("controlnet_pndm.safetensors");
    let (model, controlnet, control) = (
        fixture("tiny-sd"),
        fixture("tiny-controlnet"),
        fixture("refs/control.png"),
    );
    let output = brushfire(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--pipeline",
        "controlnet",
        "--controlnet",
        controlnet.to_str().unwrap(),
        "--control-image",
        control.to_str().unwrap(),
        "--controlnet-scale",
        "1.0",
        "--prompt",
        "a house on a hill, ghibli style",
        "--negative-prompt",
        "blurry",
        "--steps",
        "5",
        "--width",
        "128",
        "--height",
        "64",
        "--batch",
        "2",
        "--scheduler",
        "pndm",
        "--seed",
        "2468",
        "--save-array",
        out.to_str().unwrap(),
        "--backend",
        "cpu",
    ]);
    assert!(
        output.status.success(),
        "brushfire failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let ours = &read_safetensors(&out).unwrap()["image"];
    let theirs = &read_safetensors(&refs).unwrap()["image"];
    assert_eq!(ours.shape, theirs.shape);
    let worst = ours
        .values
        .iter()
        .zip(&theirs.values)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst <= 1e-4, "controlnet: max |diff| {worst}");
    // Without a control image the run is refused before loading anything.
    let output = brushfire(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--pipeline",
        "controlnet",
        "--controlnet",
        controlnet.to_str().unwrap(),
        "--prompt",
        "x",
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("--control-image"),
        "{stderr}"
    );
}

/// `--control-preprocess canny` gives the run the Canny map of the image: the same image as a
/// run given that map (computed by the engine and saved as a PNG) as its control image. The
/// ControlNet here is the single-file checkpoint (`control_model.` layout).
#[test]
fn controlnet_canny_preprocess_and_single_file() {
    use engine::pipelines::control_preprocess::Canny;
    use engine::tensor_io::HostTensor;

    let photo = fixture("refs/canny/chelsea.png");
    let img = image::open(&photo).unwrap().to_rgb8();
    let host = HostTensor {
        shape: vec![img.height() as usize, img.width() as usize, 3],
        values: img.as_raw().iter().map(|&v| f32::from(v) / 255.0).collect(),
    };
    let map = Canny {
        low: 60.0,
        high: 150.0,
    }
    .control_map(&host)
    .unwrap();
    assert!(map.values.contains(&1.0) && map.values.contains(&0.0));
    let bytes: Vec<u8> = map.values.iter().map(|&v| (v * 255.0) as u8).collect();
    let map_png = temp("chelsea_canny.png");
    image::RgbImage::from_raw(img.width(), img.height(), bytes)
        .unwrap()
        .save(&map_png)
        .unwrap();

    let (model, controlnet) = (
        fixture("tiny-sd"),
        fixture("tiny-controlnet-single-file.safetensors"),
    );
    let run = |control: &PathBuf, extra: &[&str], out: &PathBuf| {
        let mut args = vec![
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--pipeline",
            "controlnet",
            "--controlnet",
            controlnet.to_str().unwrap(),
            "--control-image",
            control.to_str().unwrap(),
            "--prompt",
            "a cat",
            "--steps",
            "3",
            "--width",
            "64",
            "--height",
            "48",
            "--seed",
            "7",
            "--save-array",
            out.to_str().unwrap(),
            "--backend",
            "cpu",
        ];
        args.extend_from_slice(extra);
        let output = brushfire(&args);
        assert!(
            output.status.success(),
            "brushfire failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        read_safetensors(out).unwrap()["image"].clone()
    };
    let (a, b, c) = (
        temp("canny_pre.safetensors"),
        temp("canny_map.safetensors"),
        temp("canny_raw.safetensors"),
    );
    let preprocessed = run(
        &photo,
        &[
            "--control-preprocess",
            "canny",
            "--canny-low",
            "60",
            "--canny-high",
            "150",
        ],
        &a,
    );
    let from_map = run(&map_png, &[], &b);
    let raw = run(&photo, &[], &c);
    assert_eq!(preprocessed.values, from_map.values);
    assert_ne!(
        preprocessed.values, raw.values,
        "the photo itself is another control"
    );

    // Thresholds are checked before anything loads, and only with canny.
    let bad = |extra: &[&str], needle: &str| {
        let mut args = vec![
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--pipeline",
            "controlnet",
            "--controlnet",
            controlnet.to_str().unwrap(),
            "--control-image",
            photo.to_str().unwrap(),
            "--prompt",
            "x",
            "--backend",
            "cpu",
        ];
        args.extend_from_slice(extra);
        let output = brushfire(&args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success() && stderr.contains(needle),
            "{stderr}"
        );
    };
    bad(
        &[
            "--control-preprocess",
            "canny",
            "--canny-low",
            "300",
            "--canny-high",
            "100",
        ],
        "canny_low",
    );
    bad(
        &["--canny-low", "50"],
        "--canny-low needs --control-preprocess canny",
    );
}

/// Runs `brushfire generate` and returns the `--save-array` file's tensors.
fn generate_arrays(
    name: &str,
    args: &[&str],
) -> std::collections::HashMap<String, engine::tensor_io::HostTensor> {
    let out = temp(&format!("{name}.safetensors"));
    let png = temp(&format!("{name}.png"));
    let mut all = vec!["generate"];
    all.extend_from_slice(args);
    all.extend([
        "--save-array",
        out.to_str().unwrap(),
        "--output",
        png.to_str().unwrap(),
        "--backend",
        "cpu",
    ]);
    let output = brushfire(&all);
    assert!(
        output.status.success(),
        "brushfire {name} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    read_safetensors(&out).unwrap()
}

fn assert_same(ours: &engine::tensor_io::HostTensor, reference: &str, key: &str) {
    let theirs =
        &read_safetensors(&fixture(&format!("refs/{reference}.safetensors"))).unwrap()[key];
    assert_eq!(ours.shape, theirs.shape, "{reference}");
    // The parity tests' bound: |diff| ≤ 1e-4 + 1e-4·|expected|.
    for (i, (a, e)) in ours.values.iter().zip(&theirs.values).enumerate() {
        let err = (a - e).abs();
        assert!(
            err <= 1e-4 + 1e-4 * e.abs(),
            "{reference} {key}: element {i}: {a} vs {e}"
        );
    }
}

/// The IF cascade from the command line, seeded as diffusers was (no tapes: the generator is
/// torch's): stage I at its UNet's native size, then stage II on stage I's `--save-array`
/// file (its `image_pt`, one output per image), then the x4 upscaler on a PNG, sized from it.
#[test]
fn if_cascade_and_x4_upscaler_equal_diffusers() {
    let (one, two, x4) = (
        fixture("tiny-if"),
        fixture("tiny-if-ii"),
        fixture("tiny-sd-x4"),
    );
    let prompt = "A Corgi in a Red Hat, oil painting";
    let stage1 = generate_arrays(
        "if-stage1",
        &[
            "--model",
            one.to_str().unwrap(),
            "--pipeline",
            "if",
            "--prompt",
            prompt,
            "--negative-prompt",
            "blurry, low quality",
            "--steps",
            "4",
            "--guidance",
            "7",
            "--batch",
            "2",
            "--seed",
            "2024",
        ],
    );
    assert_same(&stage1["image"], "if_stage1", "image");
    assert_same(&stage1["image_pt"], "if_stage1", "image_pt");
    // Stage II on diffusers' stage I output, as the contract's tensor `image` [B,3,H,W].
    let s1 = temp("if-stage1-reference.safetensors");
    let reference = read_safetensors(&fixture("refs/if_stage1.safetensors")).unwrap();
    engine::tensor_io::write_safetensors(&s1, &[("image", &reference["image_pt"])]).unwrap();
    let stage2 = generate_arrays(
        "if-stage2",
        &[
            "--model",
            two.to_str().unwrap(),
            "--pipeline",
            "if-stage2",
            "--prompt",
            prompt,
            "--negative-prompt",
            "blurry, low quality",
            "--steps",
            "3",
            "--guidance",
            "4",
            "--noise-level",
            "250",
            "--image-array",
            s1.to_str().unwrap(),
            "--seed",
            "2025",
        ],
    );
    assert_same(&stage2["image"], "if_stage2", "image");
    // Our own stage I file chains too (its `image_pt`), one output per image.
    let ours = temp("if-stage1.safetensors");
    let chained = generate_arrays(
        "if-stage2-chained",
        &[
            "--model",
            two.to_str().unwrap(),
            "--pipeline",
            "if-stage2",
            "--prompt",
            prompt,
            "--steps",
            "1",
            "--image-array",
            ours.to_str().unwrap(),
            // Stage I's T5 embeddings, also in its --save-array file.
            "--prompt-embeds",
            ours.to_str().unwrap(),
        ],
    );
    assert_eq!(chained["image"].shape, vec![2, 32, 32, 3]);
    let low = fixture("refs/lowres.png");
    let up = generate_arrays(
        "x4",
        &[
            "--model",
            x4.to_str().unwrap(),
            "--pipeline",
            "upscale",
            "--prompt",
            "a white cat, detailed fur",
            "--negative-prompt",
            "blurry",
            "--steps",
            "4",
            "--guidance",
            "9",
            "--noise-level",
            "30",
            "--batch",
            "2",
            "--seed",
            "2026",
            "--image",
            low.to_str().unwrap(),
        ],
    );
    assert_same(&up["image"], "upscale", "image");
    let img = image::open(temp("x4-1.png")).unwrap();
    assert_eq!((img.width(), img.height()), (128, 64), "4× the input");
}

#[test]
fn cascade_flags_are_checked() {
    let (one, two) = (fixture("tiny-if"), fixture("tiny-if-ii"));
    let low = fixture("refs/lowres.png");
    let fails = |args: &[&str], needle: &str| {
        let mut all = vec!["generate", "--backend", "cpu", "--prompt", "x"];
        all.extend_from_slice(args);
        let output = brushfire(&all);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    };
    fails(
        &[
            "--model",
            one.to_str().unwrap(),
            "--pipeline",
            "if",
            "--noise-level",
            "3",
        ],
        "--noise-level is not used by the if pipeline",
    );
    fails(
        &["--model", two.to_str().unwrap(), "--pipeline", "if-stage2"],
        "needs its input as --image or as --image-array",
    );
    fails(
        &["--model", one.to_str().unwrap(), "--pipeline", "txt2img"],
        "this model runs the if pipeline, not txt2img",
    );
    fails(
        &[
            "--model",
            two.to_str().unwrap(),
            "--pipeline",
            "if-stage2",
            "--image",
            low.to_str().unwrap(),
            "--noise-level",
            "5000",
        ],
        "noise_level",
    );
}

#[test]
fn bench_writes_its_table_for_the_configs_it_is_given() {
    let (markdown, csv, json) = (temp("bench.md"), temp("bench.csv"), temp("bench.json"));
    let tiny_if = [
        fixture("tiny-if"),
        fixture("tiny-if-ii"),
        fixture("tiny-sd-x4"),
    ]
    .map(|p| p.to_string_lossy().into_owned())
    .join(",");
    let out = brushfire(&[
        "bench",
        "--backend",
        "cpu",
        "--pipelines",
        "sd-txt2img,if",
        "--model",
        fixture("tiny-sd").to_str().unwrap(),
        "--if-models",
        &tiny_if,
        "--batch",
        "1",
        "--size",
        "64",
        "--columns",
        "fused",
        "--steps",
        "2",
        "--runs",
        "1",
        "--markdown",
        markdown.to_str().unwrap(),
        "--csv",
        csv.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let cells = report["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 2);
    // The IF row ran the tiny cascade's configs, at their own sizes: 16², 32², 32² → 128².
    let stages = cells[1]["stages"].as_array().unwrap();
    let widths: Vec<u64> = stages
        .iter()
        .map(|s| s["width"].as_u64().unwrap())
        .collect();
    assert_eq!(widths, [16, 32, 128], "{report}");
    let table = std::fs::read_to_string(&markdown).unwrap();
    assert!(
        table.contains("random weights from tiny-sd's configs"),
        "{table}"
    );
    assert!(table.contains("stage I 16×16"), "{table}");
    assert!(table.contains("; stages II and x4 at batch 1;"), "{table}");
    assert!(table.lines().any(|l| l.starts_with("| sd-txt2img | ")));
    assert_eq!(
        std::fs::read_to_string(&csv)
            .unwrap()
            .matches(",measured,")
            .count(),
        2
    );

    // Two folders, or a folder without configs, fail before any backend starts.
    let two = format!(
        "{},{}",
        fixture("tiny-if").display(),
        fixture("tiny-if-ii").display()
    );
    let out = brushfire(&["bench", "--backend", "cpu", "--if-models", &two]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--if-models takes three folders"),
        "{stderr}"
    );
    let missing = format!("{two},/nonexistent/x4");
    let out = brushfire(&["bench", "--backend", "cpu", "--if-models", &missing]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/x4"), "{stderr}");
}
