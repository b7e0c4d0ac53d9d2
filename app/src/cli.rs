//! The headless CLI: `brushfire generate` (docs/cli.md, a public contract: keep flags stable).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use engine::backend::{self, BackendRequest, ExecutionOptions};
use engine::models::{AttnProcessor, MemoryFormat};
use engine::noise::{NoiseSource, NoiseTape};
use engine::pipelines::control_preprocess::Canny;
use engine::pipelines::{
    CancelToken, CommonRequest, ControlNetInput, GenerationRequest, Img2ImgInput, InpaintInput,
    PipelineKind, PromptEmbeds, StepProgress, Task, UpscaleInput, UpscaleSource,
};
use engine::schedulers::SchedulerKind;
use engine::session::Session;
use engine::tensor_io::{HostTensor, read_safetensors, read_tensor, write_safetensors};
use engine::worker::EngineSettings;

use crate::exit::BadArgument;
use crate::image_files::{read_mask, read_rgb, to_u8};
use crate::png_meta::{ControlNetParameters, GenerationParameters, write_png};

/// On/off switches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    On,
    Off,
}

/// Precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Precision {
    F32,
    F16,
}

/// `brushfire generate` flags.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// A diffusers folder or a hub id (`org/name`, downloaded into the HF cache).
    #[arg(long)]
    pub model: String,
    /// The prompt (required unless --prompt-embeds is given).
    #[arg(long)]
    pub prompt: Option<String>,
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// txt2img | img2img | inpaint | controlnet | if | if-stage2 | upscale
    #[arg(long, default_value = "txt2img")]
    pub pipeline: String,
    // Numbers take a leading `-` as a value (`--height -64` is then "invalid value '-64' for
    // '--height'", not "unexpected argument '-6'").
    #[arg(long, default_value_t = 50, allow_negative_numbers = true)]
    pub steps: usize,
    #[arg(long, default_value_t = 7.5, allow_negative_numbers = true)]
    pub guidance: f64,
    /// Default: the UNet's sample_size × the VAE factor (512 for SD 1.5).
    #[arg(long, allow_negative_numbers = true)]
    pub width: Option<usize>,
    #[arg(long, allow_negative_numbers = true)]
    pub height: Option<usize>,
    /// Images per prompt.
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    pub batch: usize,
    /// Seed of the torch-compatible CPU generator (random when absent; printed).
    #[arg(long, allow_negative_numbers = true)]
    pub seed: Option<u64>,
    /// pndm | ddim | euler | euler-a | dpm++2m | ddpm (default: the model's scheduler).
    #[arg(long)]
    pub scheduler: Option<String>,
    /// A diffusers scheduler_config.json; its `_class_name` picks the scheduler.
    #[arg(long)]
    pub scheduler_config: Option<PathBuf>,
    /// img2img/inpaint init image (PNG/JPEG). img2img works at its size (rounded down to a
    /// multiple of 8) unless --width/--height say otherwise; inpaint at the model's default size.
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Inpainting mask (PNG/JPEG, the image's size): white = repaint, black = keep.
    #[arg(long)]
    pub mask: Option<PathBuf>,
    /// img2img/inpaint strength in [0, 1] (default 0.8 for img2img, 1.0 for inpaint).
    #[arg(long, allow_negative_numbers = true)]
    pub strength: Option<f64>,
    /// Inpaint: Gaussian blur radius of the mask, in pixels (0 = none).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub mask_blur: f64,
    /// Inpaint "only masked": work on the mask's box grown by N pixels, at full resolution, and
    /// paste it back (diffusers' padding_mask_crop).
    #[arg(long, allow_negative_numbers = true)]
    pub padding_mask_crop: Option<usize>,
    /// The ControlNet of `--pipeline controlnet`: a diffusers folder, a hub id, or a
    /// single-file `.safetensors` checkpoint (original `control_model.` layout).
    #[arg(long)]
    pub controlnet: Option<String>,
    /// The control image (PNG/JPEG): used as given (e.g. a canny edge map), or preprocessed
    /// with `--control-preprocess`.
    #[arg(long)]
    pub control_image: Option<PathBuf>,
    /// Turn the control image into a control map first: `canny` (edges, 3 channels) or `none`.
    #[arg(long, value_parser = ["none", "canny"])]
    pub control_preprocess: Option<String>,
    /// Canny's low hysteresis threshold (default 100; OpenCV's scale).
    #[arg(long, allow_negative_numbers = true)]
    pub canny_low: Option<f32>,
    /// Canny's high hysteresis threshold (default 200).
    #[arg(long, allow_negative_numbers = true)]
    pub canny_high: Option<f32>,
    /// controlnet_conditioning_scale (default 1.0).
    #[arg(long, allow_negative_numbers = true)]
    pub controlnet_scale: Option<f64>,
    /// The fraction of the steps where the ControlNet starts acting (default 0).
    #[arg(long, allow_negative_numbers = true)]
    pub control_guidance_start: Option<f64>,
    /// The fraction of the steps where it stops (default 1).
    #[arg(long, allow_negative_numbers = true)]
    pub control_guidance_end: Option<f64>,
    /// Guess mode: the ControlNet sees only the conditional batch.
    #[arg(long)]
    pub guess_mode: bool,
    /// The noise added to the input of `if-stage2` (default 250) and `upscale` (default 20).
    #[arg(long, allow_negative_numbers = true)]
    pub noise_level: Option<usize>,
    /// The input of `if-stage2` / `upscale` as a tensor `image` [B,3,H,W] in [-1,1] (a file
    /// written by --save-array, whose `image_pt` tensor is that, works too).
    #[arg(long)]
    pub image_array: Option<PathBuf>,
    /// Tensors `prompt_embeds` (and optionally `negative_prompt_embeds`).
    #[arg(long)]
    pub prompt_embeds: Option<PathBuf>,
    /// Tensor `latents`: the initial latents before init_noise_sigma scaling.
    #[arg(long)]
    pub latents: Option<PathBuf>,
    /// Tensors `rng.tape.0`, `rng.tape.1`, … replayed in place of every Gaussian draw.
    #[arg(long)]
    pub noise_tape: Option<PathBuf>,
    /// Encode and decode with the VAE in overlapping tiles of its sample_size (diffusers'
    /// `vae.enable_tiling()`): for pictures too large to decode whole (the x4 upscaler's
    /// output, SD beyond 512²); the pixels differ slightly from an untiled decode.
    #[arg(long, value_enum, default_value = "off")]
    pub vae_tiling: Switch,
    /// PNG to write (`name-<i>.png` per image when the batch is larger than one).
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Tensor `image` [B,H,W,3] f32 in [0,1] (diffusers' output_type="np"); IF stages also
    /// write `image_pt` [B,3,H,W] in [-1,1] (output_type="pt", the next stage's input) and the
    /// T5 embeddings `prompt_embeds`/`negative_prompt_embeds` (the next stage's --prompt-embeds).
    #[arg(long)]
    pub save_array: Option<PathBuf>,
    /// auto | cuda | wgpu | cpu
    #[arg(long, default_value = "auto")]
    pub backend: String,
    /// vanilla | fused | sliced
    #[arg(long, default_value = "fused")]
    pub attention: String,
    #[arg(long, value_enum, default_value = "on")]
    pub fusion: Switch,
    #[arg(long, value_enum, default_value = "off")]
    pub channels_last: Switch,
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: Precision,
}

/// Everything validated from the flags, before any model is loaded.
struct Job {
    model_dir: PathBuf,
    /// The ControlNet's folder (`--controlnet`), resolved.
    controlnet_dir: Option<PathBuf>,
    /// The ControlNet unit for the PNG's parameters.
    controlnet_params: Option<ControlNetParameters>,
    model_name: String,
    request: GenerationRequest,
    attention: AttnProcessor,
    memory_format: MemoryFormat,
    tape: Option<NoiseTape>,
    output: Option<PathBuf>,
    save_array: Option<PathBuf>,
}

/// Which pipeline-specific flags were given. Each pipeline's task takes the ones it uses
/// ([`Flags::take`]); one given but taken by no part of the task is refused by name, so the
/// refusals follow from what each task is built from, not from a table kept beside it.
struct Flags<'a> {
    args: &'a GenerateArgs,
    taken: Vec<&'static str>,
}

impl<'a> Flags<'a> {
    fn new(args: &'a GenerateArgs) -> Self {
        Self {
            args,
            taken: Vec::new(),
        }
    }

    /// The value of `flag`, marked as used by the pipeline.
    fn take<T: Clone>(&mut self, flag: &'static str, value: &Option<T>) -> Option<T> {
        self.taken.push(flag);
        value.clone()
    }

    /// Marks a flag that has a default value (not an `Option`) as used by the pipeline.
    fn mark(&mut self, flag: &'static str) {
        self.taken.push(flag);
    }

    /// The value of a flag the pipeline cannot run without.
    fn require<T: Clone>(&mut self, flag: &'static str, value: &Option<T>) -> Result<T> {
        self.take(flag, value)
            .with_context(|| format!("the {} pipeline needs {flag}", self.args.pipeline))
    }

    /// Refuses the first given flag no part of the task took.
    fn refuse_the_rest(&self) -> Result<()> {
        let a = self.args;
        let given: [(&str, bool); 17] = [
            ("--image", a.image.is_some()),
            ("--strength", a.strength.is_some()),
            ("--mask", a.mask.is_some()),
            ("--mask-blur", a.mask_blur != 0.0),
            ("--padding-mask-crop", a.padding_mask_crop.is_some()),
            ("--latents", a.latents.is_some()),
            ("--controlnet", a.controlnet.is_some()),
            ("--control-image", a.control_image.is_some()),
            ("--control-preprocess", a.control_preprocess.is_some()),
            ("--canny-low", a.canny_low.is_some()),
            ("--canny-high", a.canny_high.is_some()),
            ("--controlnet-scale", a.controlnet_scale.is_some()),
            (
                "--control-guidance-start",
                a.control_guidance_start.is_some(),
            ),
            ("--control-guidance-end", a.control_guidance_end.is_some()),
            ("--guess-mode", a.guess_mode),
            ("--noise-level", a.noise_level.is_some()),
            ("--image-array", a.image_array.is_some()),
        ];
        let Some((flag, _)) = given
            .iter()
            .find(|(flag, given)| *given && !self.taken.contains(flag))
        else {
            return Ok(());
        };
        if flag.starts_with("--canny") && self.taken.contains(&"--control-preprocess") {
            bail!("{flag} needs --control-preprocess canny");
        }
        bail!("{flag} is not used by the {} pipeline", a.pipeline);
    }
}

/// The task `--pipeline` names, built from the flags it uses (the files they name are read
/// here); any other pipeline flag given is refused.
fn task(args: &GenerateArgs, pipeline: PipelineKind) -> Result<Task> {
    let mut flags = Flags::new(args);
    // Every pipeline but img2img takes initial latents (img2img's are the noised image).
    if pipeline != PipelineKind::Img2Img {
        flags.take("--latents", &args.latents);
    }
    let task = match pipeline {
        PipelineKind::Txt2Img => Task::Txt2Img,
        PipelineKind::If => Task::If,
        PipelineKind::Img2Img => Task::Img2Img(Img2ImgInput {
            image: read_rgb(&flags.require("--image", &args.image)?)?,
            strength: flags.take("--strength", &args.strength),
        }),
        PipelineKind::Inpaint => {
            let image = flags.require("--image", &args.image)?;
            let mask = flags.require("--mask", &args.mask)?;
            flags.mark("--mask-blur");
            Task::Inpaint(InpaintInput {
                image: read_rgb(&image)?,
                mask: read_mask(&mask)?,
                strength: flags.take("--strength", &args.strength),
                mask_blur: args.mask_blur,
                padding_mask_crop: flags.take("--padding-mask-crop", &args.padding_mask_crop),
            })
        }
        PipelineKind::ControlNet => {
            let (Some(_), Some(path)) = (
                flags.take("--controlnet", &args.controlnet),
                flags.take("--control-image", &args.control_image),
            ) else {
                bail!("the controlnet pipeline needs --controlnet and --control-image");
            };
            let preprocess = flags.take("--control-preprocess", &args.control_preprocess);
            let canny = match preprocess.as_deref() {
                None | Some("none") => None,
                Some("canny") => {
                    let defaults = Canny::default();
                    Some(Canny {
                        low: flags
                            .take("--canny-low", &args.canny_low)
                            .unwrap_or(defaults.low),
                        high: flags
                            .take("--canny-high", &args.canny_high)
                            .unwrap_or(defaults.high),
                    })
                }
                Some(other) => bail!("--control-preprocess `{other}` is not one of: none, canny"),
            };
            let start = flags.take("--control-guidance-start", &args.control_guidance_start);
            let end = flags.take("--control-guidance-end", &args.control_guidance_end);
            flags.mark("--guess-mode");
            Task::ControlNet(ControlNetInput {
                image: control_map(&path, canny)?,
                scale: flags
                    .take("--controlnet-scale", &args.controlnet_scale)
                    .unwrap_or(1.0),
                guidance: (start.unwrap_or(0.0), end.unwrap_or(1.0)),
                guess_mode: args.guess_mode,
            })
        }
        PipelineKind::IfStage2 | PipelineKind::Upscale => {
            let source = match (
                flags.take("--image", &args.image),
                flags.take("--image-array", &args.image_array),
            ) {
                (Some(path), None) => UpscaleSource::Image(read_rgb(&path)?),
                (None, Some(path)) => UpscaleSource::Array(read_image_array(&path)?),
                _ => bail!(
                    "the {} pipeline needs its input as --image or as --image-array (one of them)",
                    args.pipeline
                ),
            };
            let input = UpscaleInput {
                source,
                noise_level: flags.take("--noise-level", &args.noise_level),
            };
            if pipeline == PipelineKind::IfStage2 {
                Task::IfStage2(input)
            } else {
                Task::Upscale(input)
            }
        }
    };
    flags.refuse_the_rest()?;
    Ok(task)
}

/// 0 stands for "the default size" inside a request; on the command line it is a mistake.
fn reject_zero_size(args: &GenerateArgs) -> Result<()> {
    for (flag, value) in [("width", args.width), ("height", args.height)] {
        if value == Some(0) {
            bail!(
                "invalid {flag}: 0 must be a positive multiple of 8 (leave --{flag} out for the default)"
            );
        }
    }
    Ok(())
}

/// The ControlNet unit for the PNG's parameters (controlnet runs only).
fn controlnet_parameters(
    args: &GenerateArgs,
    request: &GenerationRequest,
) -> Option<ControlNetParameters> {
    let model = args.controlnet.clone()?;
    let Task::ControlNet(control) = &request.task else {
        return None;
    };
    let canny = (args.control_preprocess.as_deref() == Some("canny")).then(|| {
        let defaults = Canny::default();
        (
            args.canny_low.unwrap_or(defaults.low),
            args.canny_high.unwrap_or(defaults.high),
        )
    });
    Some(ControlNetParameters {
        model,
        canny,
        weight: control.scale,
        guidance_start: control.guidance.0,
        guidance_end: control.guidance.1,
        guess_mode: control.guess_mode,
    })
}

/// The control image as the ControlNet gets it: as given, or its Canny edges.
fn control_map(path: &Path, canny: Option<Canny>) -> Result<HostTensor> {
    let image = read_rgb(path)?;
    let Some(canny) = canny else {
        return Ok(image);
    };
    canny
        .control_map(&image)
        .with_context(|| format!("Canny edges of {}", path.display()))
}

fn prepare(args: &GenerateArgs) -> Result<Job> {
    let pipeline: PipelineKind = args.pipeline.parse()?;
    reject_zero_size(args)?;
    let task = task(args, pipeline)?;
    // Outputs are checked first: a run that could not write its result is refused before it
    // starts, not after.
    if let Some(path) = &args.save_array {
        check_output("--save-array", path)?;
    }
    for i in 0..args.batch.max(1) {
        if let Some(path) = &args.output {
            check_output("--output", &numbered(path, i, args.batch))?;
        }
    }
    let attention = AttnProcessor::from_name(&args.attention)?;
    let scheduler = args
        .scheduler
        .as_deref()
        .map(str::parse::<SchedulerKind>)
        .transpose()?;
    let scheduler_config = args
        .scheduler_config
        .as_ref()
        .map(|p| -> Result<serde_json::Value> {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            serde_json::from_str(&text)
                .with_context(|| format!("{} is not valid JSON", p.display()))
        })
        .transpose()?;
    let prompt_embeds = args
        .prompt_embeds
        .as_ref()
        .map(|p| -> Result<PromptEmbeds> {
            let mut tensors = read_safetensors(p)?;
            let prompt_embeds = tensors
                .remove("prompt_embeds")
                .with_context(|| format!("{} has no tensor `prompt_embeds`", p.display()))?;
            Ok(PromptEmbeds {
                prompt_embeds,
                negative_prompt_embeds: tensors.remove("negative_prompt_embeds"),
            })
        })
        .transpose()?;
    let prompt = match (&args.prompt, &prompt_embeds) {
        (Some(p), _) => p.clone(),
        (None, Some(_)) => String::new(),
        (None, None) => bail!("--prompt is required unless --prompt-embeds is given"),
    };
    let latents = args
        .latents
        .as_ref()
        .map(|p| read_tensor(p, "latents"))
        .transpose()?;
    // An array of several images is one output each.
    let batch = match task.upscale_input().map(|input| &input.source) {
        Some(UpscaleSource::Array(a)) if args.batch == 1 && a.shape.len() == 4 => a.shape[0].max(1),
        _ => args.batch,
    };
    let tape = args.noise_tape.as_ref().map(NoiseTape::load).transpose()?;
    let seed = args.seed.unwrap_or_else(engine::noise::random_seed);
    let mut progress = crate::progress::TerminalDownload::default();
    let variant = match args.dtype {
        Precision::F32 => backend::Precision::F32,
        Precision::F16 => backend::Precision::F16,
    }
    .weights_variant();
    let model_dir = engine::loading::resolve_model(&args.model, variant, &mut progress)?;
    let controlnet_dir = args
        .controlnet
        .as_deref()
        .map(|spec| engine::loading::resolve_controlnet(spec, variant, &mut progress))
        .transpose()?;
    let request = GenerationRequest {
        common: CommonRequest {
            prompt,
            negative_prompt: args.negative_prompt.clone(),
            prompt_embeds,
            steps: args.steps,
            guidance_scale: args.guidance,
            // Filled from the model when absent (see `Session::generate`).
            width: args.width.unwrap_or(0),
            height: args.height.unwrap_or(0),
            batch,
            seed,
            scheduler,
            scheduler_config,
            latents,
            vae_tiling: args.vae_tiling == Switch::On,
        },
        task,
    };
    Ok(Job {
        model_name: model_name(&args.model),
        model_dir,
        controlnet_params: controlnet_parameters(args, &request),
        request,
        controlnet_dir,
        attention,
        memory_format: MemoryFormat::from_channels_last(args.channels_last == Switch::On),
        tape,
        output: args.output.clone(),
        save_array: args.save_array.clone(),
    })
}

/// `--image-array`: tensor `image` [B,3,H,W], or the `image_pt` a --save-array file of an IF
/// stage holds.
fn read_image_array(path: &Path) -> Result<HostTensor> {
    let mut tensors = read_safetensors(path)?;
    match (tensors.remove("image"), tensors.remove("image_pt")) {
        (Some(image), _) if image.shape.len() == 4 && image.shape[1] == 3 => Ok(image),
        (_, Some(pt)) => Ok(pt),
        (Some(image), None) => Ok(image),
        (None, None) => bail!("{} has no tensor `image`", path.display()),
    }
}

fn model_name(spec: &str) -> String {
    Path::new(spec)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| spec.to_string())
}

/// Runs `brushfire generate`.
pub fn generate(args: &GenerateArgs) -> Result<()> {
    let backend_request: BackendRequest = args.backend.parse().map_err(bad_argument)?;
    let job = prepare(args).map_err(BadArgument::unless_download)?;
    let mut session = Session::new(EngineSettings {
        backend: backend_request,
        attention: job.attention,
        memory_format: job.memory_format,
        execution: ExecutionOptions {
            fusion: args.fusion == Switch::On,
            precision: match args.dtype {
                Precision::F32 => backend::Precision::F32,
                Precision::F16 => backend::Precision::F16,
            },
        },
        preview: false,
    });
    let selected = session.check_settings()?;
    let settings = session.settings();
    eprintln!(
        "backend: {selected}, {}, fusion {}, channels-last {}",
        settings.execution.precision,
        if settings.execution.fusion {
            "on"
        } else {
            "off"
        },
        if job.memory_format.is_channels_last() {
            "on"
        } else {
            "off"
        }
    );
    let Job {
        model_dir,
        controlnet_dir,
        controlnet_params,
        model_name,
        request,
        mut tape,
        output,
        save_array,
        ..
    } = job;
    let load_start = std::time::Instant::now();
    session
        .load_dir(&args.model, model_dir.clone())
        .with_context(|| format!("loading {}", model_dir.display()))?;
    if let (Some(dir), Some(spec)) = (&controlnet_dir, &args.controlnet) {
        session
            .load_controlnet_path(spec, dir)
            .with_context(|| format!("loading the ControlNet {}", dir.display()))?;
    }
    eprintln!(
        "loaded {} in {:.1}s",
        model_dir.display(),
        load_start.elapsed().as_secs_f64()
    );
    let cancel = CancelToken::new();
    let mut observer = |p: &StepProgress| {
        eprint!(
            "\rstep {}/{}  {:.2} it/s  {:.1}s   ",
            p.step, p.total, p.it_per_sec, p.elapsed_secs
        );
    };
    let noise = tape.as_mut().map(|t| t as &mut dyn NoiseSource);
    let out = session.generate(None, &request, noise, &cancel, &mut observer)?;
    eprintln!();
    for note in &out.notes {
        eprintln!("note: {note}");
    }
    if let Some(t) = &tape
        && t.remaining() > 0
    {
        eprintln!(
            "warning: {} draws of the noise tape were not used",
            t.remaining()
        );
    }
    let mut saved = SavedOutputs::default();
    if let Some(path) = &save_array {
        let mut tensors = vec![("image", &out.images)];
        if let Some(raw) = &out.raw {
            tensors.push(("image_pt", raw));
        }
        if let Some(embeds) = &out.prompt_embeds {
            tensors.push(("prompt_embeds", &embeds.prompt_embeds));
            if let Some(neg) = &embeds.negative_prompt_embeds {
                tensors.push(("negative_prompt_embeds", neg));
            }
        }
        saved.keep(path, |p| write_safetensors(p, &tensors).map_err(Into::into));
    }
    let output = output.or_else(|| {
        save_array
            .is_none()
            .then(|| PathBuf::from(format!("brushfire-{}.png", request.seed)))
    });
    if let Some(path) = output {
        // "Only masked" inpainting returns the original image's size.
        let (height, width) = (out.images.shape[1], out.images.shape[2]);
        let params = GenerationParameters {
            prompt: request.prompt.clone(),
            negative_prompt: request.negative_prompt.clone(),
            steps: request.steps,
            sampler: out.scheduler.to_string(),
            cfg_scale: request.guidance_scale,
            seed: request.seed,
            width,
            height,
            model: model_name,
            denoising_strength: request.denoising_strength(),
            controlnet: controlnet_params,
        };
        for (i, rgb) in to_rgb8(&out.images).iter().enumerate() {
            let file = numbered(&path, i, request.batch);
            saved.keep(&file, |p| {
                let metadata = write_png(p, width, height, rgb, &params)?;
                if let Some(warning) = metadata.warning(p) {
                    eprintln!("warning: {warning}");
                }
                Ok(())
            });
        }
    }
    saved.finish()
}

/// What a finished run wrote. An output that cannot be written where asked (the folder went
/// away, the disk filled) is written to a fallback folder instead and both are named: the
/// result of a long run is never lost for its path. The run then ends in an error (exit 1).
#[derive(Default)]
struct SavedOutputs {
    /// `(asked for, written to instead, why)`.
    moved: Vec<(PathBuf, PathBuf, String)>,
    /// Outputs written nowhere, with why.
    lost: Vec<(PathBuf, String)>,
}

impl SavedOutputs {
    /// Writes `path` with `write`, or its file name in the fallback folder when that fails.
    fn keep(&mut self, path: &Path, write: impl Fn(&Path) -> Result<()>) {
        let error = match write(path) {
            Ok(()) => {
                eprintln!("wrote {}", path.display());
                return;
            }
            Err(e) => format!("{e:#}"),
        };
        eprintln!("error: could not write {}: {error}", path.display());
        match fallback_path(path).and_then(|fallback| write(&fallback).map(|()| fallback)) {
            Ok(fallback) => {
                eprintln!("  saved to {} instead", fallback.display());
                self.moved.push((path.to_path_buf(), fallback, error));
            }
            Err(e) => {
                eprintln!("  and not to the fallback folder either: {e:#}");
                self.lost
                    .push((path.to_path_buf(), format!("{error}; fallback: {e:#}")));
            }
        }
    }

    fn finish(self) -> Result<()> {
        if self.moved.is_empty() && self.lost.is_empty() {
            return Ok(());
        }
        let mut lines: Vec<String> = self
            .moved
            .iter()
            .map(|(asked, fallback, why)| {
                format!(
                    "{} could not be written ({why}); it is in {}",
                    asked.display(),
                    fallback.display()
                )
            })
            .collect();
        lines.extend(
            self.lost
                .iter()
                .map(|(asked, why)| format!("{} could not be written: {why}", asked.display())),
        );
        bail!("{}", lines.join("; "))
    }
}

/// Where an output that could not be written goes: `unsaved/` in Brushfire's cache folder (where
/// the app keeps unsaved images too), else the system's temporary folder; a fresh name, so
/// nothing there is replaced.
fn fallback_path(asked: &Path) -> Result<PathBuf> {
    let dir = engine::backend::cache_dir()
        .map(|c| c.join("unsaved"))
        .filter(|d| std::fs::create_dir_all(d).is_ok())
        .unwrap_or_else(std::env::temp_dir);
    let name = asked
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "brushfire-output".into());
    for n in 0..10_000 {
        let candidate = if n == 0 {
            dir.join(&name)
        } else {
            dir.join(format!("{n}-{name}"))
        };
        if std::fs::symlink_metadata(&candidate).is_err() {
            return Ok(candidate);
        }
    }
    bail!("no free file name for {name} in {}", dir.display())
}

/// Refuses an output path the run could not write, naming the flag.
fn check_output(flag: &str, path: &Path) -> Result<()> {
    engine::atomic_file::check_writable(path)
        .map(drop)
        .with_context(|| format!("{flag} {}", path.display()))
}

/// An error in the command line's values.
fn bad_argument(error: impl Into<anyhow::Error>) -> anyhow::Error {
    BadArgument(error.into()).into()
}

/// `[b, h, w, 3]` floats in [0, 1] → one RGB8 buffer per image (rounded as diffusers' `numpy_to_pil`).
fn to_rgb8(images: &HostTensor) -> Vec<Vec<u8>> {
    let per = images.shape[1..].iter().product::<usize>();
    images.values.chunks(per.max(1)).map(to_u8).collect()
}

fn numbered(path: &Path, i: usize, batch: usize) -> PathBuf {
    if batch <= 1 {
        return path.to_path_buf();
    }
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().into_owned())
        .unwrap_or_else(|| "png".into());
    path.with_file_name(format!("{stem}-{i}.{ext}"))
}
