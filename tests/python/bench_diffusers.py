#!/usr/bin/env python3
"""The seed's benchmark protocol in diffusers, to run beside `brushfire bench` on one machine.

Same as Brushfire's (engine/src/bench.rs, docs/architecture.md §1): every model built from its real config
(assets/models/) with random weights, the scheduler from its config, CFG batch of 2 × batch,
random text embeddings in place of the text encoder, it/s = UNet evaluations per second of the
denoising loop (the pipeline's progress-bar rate), device synchronised inside the timed region,
warm run of `--runs` reported, peak memory as torch's max reserved bytes (Brushfire reports its
pool's reserved bytes; on the CPU neither is shown here).

Rows (`--pipelines`), each the loop of its diffusers pipeline:
  sd-txt2img     PNDM 50 steps (51 evaluations)
  sd-img2img     strength 0.8: the schedule's last 40 steps from noised random image latents
  sd-inpaint     the 9-channel inpainting UNet (SD 1.5's config, in_channels 9), mask and
                 masked-image latents random
  sd-controlnet  sd-controlnet-canny's architecture (ControlNetModel.from_unet), a random control
                 image in [0, 1], scale 1.0, run beside the UNet at every step
  if             IF-I-M (64², the batch, 2× steps, CFG 7) / IF-II-M (256², batch 1, CFG 4, noise
                 level 250) / the x4 upscaler (256² → 1024², batch 1, 1.5× steps, CFG 9, noise level
                 100); random (·, 2, 4096) embeddings in place of T5 (77 CLIP-wide for the x4);
                 three rates per cell, the models built one after another

Columns, as the seed's table:
  baseline       vanilla attention (AttnProcessor / AttnAddedKVProcessor), eager
  fused          SDPA (AttnProcessor2_0 / AttnAddedKVProcessor2_0), eager
  fusion         SDPA + torch.compile(mode="reduce-overhead", fullgraph=True) of the UNet (and
                 the ControlNet)
  channels-last  SDPA + compile + .to(memory_format=torch.channels_last)

    python tests/python/bench_diffusers.py --device cuda --dtype f16 --batch 1,16 --size 512
    python tests/python/bench_diffusers.py --pipelines sd-txt2img,sd-img2img,sd-inpaint,sd-controlnet,if
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import pathlib
import sys
import time

import diffusers
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.models.attention_processor import (
    Attention,
    AttnAddedKVProcessor,
    AttnAddedKVProcessor2_0,
    AttnProcessor,
    AttnProcessor2_0,
)

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODELS = ROOT / "assets" / "models"
SD15 = MODELS / "stable-diffusion-v1-5"
IF_SEED = (MODELS / "IF-I-M-v1.0", MODELS / "IF-II-M-v1.0", MODELS / "stable-diffusion-x4-upscaler")

PIPELINES = ["sd-txt2img", "sd-img2img", "sd-inpaint", "sd-controlnet", "if"]
LABELS = {
    "baseline": "baseline (vanilla attention)",
    "fused": "fused attention",
    "fusion": "fused + fusion",
    "channels-last": "fused + fusion + channels-last",
}
PROMPT_TOKENS = 77

# The IF row's stages (engine/src/bench.rs `CASCADE`): steps factor, CFG, noise level, text tokens.
STAGES = [
    dict(stage="stage I", steps_factor=2.0, guidance=7.0, noise_level=None, tokens=2),
    dict(stage="stage II", steps_factor=1.0, guidance=4.0, noise_level=250, tokens=2),
    dict(stage="x4", steps_factor=1.5, guidance=9.0, noise_level=100, tokens=PROMPT_TOKENS),
]


class Settings:
    def __init__(self, column: str, device: str, dtype: torch.dtype):
        self.column = column
        self.device = device
        self.dtype = dtype

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """Random weights on the device with the column's attention, layout and compilation."""
        model = model.to(device=self.device, dtype=self.dtype).eval()
        vanilla = self.column == "baseline"
        for module in model.modules():
            if isinstance(module, Attention):
                if module.added_kv_proj_dim is not None:  # IF's attention over text + image keys
                    module.set_processor(AttnAddedKVProcessor() if vanilla else AttnAddedKVProcessor2_0())
                else:
                    module.set_processor(AttnProcessor() if vanilla else AttnProcessor2_0())
        if self.column == "channels-last":
            model = model.to(memory_format=torch.channels_last)
        if self.column in ("fusion", "channels-last"):
            model = torch.compile(model, mode="reduce-overhead", fullgraph=True)
        return model


def unet_config(folder: pathlib.Path) -> dict:
    return dict(UNet2DConditionModel.load_config(folder / "unet"))


def make_scheduler(folder: pathlib.Path):
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    return getattr(diffusers, config["_class_name"]).from_config(config)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def randn(shape, generator, settings: Settings) -> torch.Tensor:
    return torch.randn(shape, generator=generator).to(settings.device, settings.dtype)


def timed(settings: Settings, loop) -> float:
    sync(settings.device)
    start = time.perf_counter()
    loop()
    sync(settings.device)
    return time.perf_counter() - start


class SdModels:
    """One SD row's models for one column (kept across sizes and batches)."""

    def __init__(self, pipeline: str, folder: pathlib.Path, settings: Settings):
        torch.manual_seed(0)
        config = unet_config(folder)
        self.latent_channels = config["out_channels"]
        if pipeline == "sd-inpaint":
            # stable-diffusion-inpainting's UNet: SD 1.5's config with latents + mask +
            # masked-image latents in.
            config["in_channels"] = 2 * self.latent_channels + 1
        elif config["in_channels"] != self.latent_channels:
            raise ValueError(f"the {pipeline} row needs a UNet with {self.latent_channels} input channels")
        unet = UNet2DConditionModel.from_config(config)
        self.controlnet = None
        if pipeline == "sd-controlnet":
            self.controlnet = settings.prepare(ControlNetModel.from_unet(unet))
        self.unet = settings.prepare(unet)
        cross = config["cross_attention_dim"]
        self.text_width = cross[0] if isinstance(cross, (list, tuple)) else cross
        self.in_channels = config["in_channels"]


@torch.no_grad()
def run_sd(pipeline, models: SdModels, folder, batch, width, height, steps, runs, settings):
    generator = torch.Generator("cpu").manual_seed(0)
    context = randn((2 * batch, PROMPT_TOKENS, models.text_width), generator, settings)
    latent_shape = (batch, models.latent_channels, height // 8, width // 8)
    extra = None
    if pipeline == "sd-inpaint":
        extra_channels = models.in_channels - models.latent_channels
        extra = randn((2 * batch, extra_channels, height // 8, width // 8), generator, settings)
    control_image = None
    if pipeline == "sd-controlnet":
        control_image = randn((2 * batch, 3, height, width), generator, settings).abs().clamp(max=1.0)
    strength = 0.8 if pipeline == "sd-img2img" else 1.0
    times, evals = [], 0
    for _ in range(runs):
        scheduler = make_scheduler(folder)
        scheduler.set_timesteps(steps, device=settings.device)
        # StableDiffusionImg2ImgPipeline.get_timesteps: the schedule's tail.
        init_timestep = min(int(steps * strength), steps)
        t_start = max(steps - init_timestep, 0)
        timesteps = scheduler.timesteps[t_start * scheduler.order :]
        evals = len(timesteps)
        noise = randn(latent_shape, generator, settings)
        if t_start > 0:
            image_latents = randn(latent_shape, generator, settings)
            latents = scheduler.add_noise(image_latents, noise, timesteps[:1].repeat(batch))
        else:
            latents = noise * scheduler.init_noise_sigma

        def loop():
            nonlocal latents
            for t in timesteps:
                model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
                down, mid = None, None
                if models.controlnet is not None:
                    down, mid = models.controlnet(
                        model_input, t, encoder_hidden_states=context, controlnet_cond=control_image,
                        conditioning_scale=1.0, return_dict=False,
                    )
                if extra is not None:
                    model_input = torch.cat([model_input, extra], dim=1)
                noise_pred = models.unet(
                    model_input, t, encoder_hidden_states=context,
                    down_block_additional_residuals=down, mid_block_additional_residual=mid,
                ).sample
                uncond, text = noise_pred.chunk(2)
                noise_pred = uncond + 7.5 * (text - uncond)
                latents = scheduler.step(noise_pred, t, latents).prev_sample

        times.append(timed(settings, loop))
    return dict(unet_evals=evals, run_secs=times, it_per_sec=evals / times[-1])


@torch.no_grad()
def run_if(folders, batch, steps, runs, settings):
    """The IF row: the three stages one after another, each model dropped before the next."""
    generator = torch.Generator("cpu").manual_seed(0)
    stages = []
    side = 0
    for i, (plan, folder) in enumerate(zip(STAGES, folders)):
        torch.manual_seed(0)
        config = unet_config(folder)
        unet = settings.prepare(UNet2DConditionModel.from_config(config))
        stage_batch = batch if i == 0 else 1
        if i < 2:
            side = config.get("sample_size") or 64
        cross = config["cross_attention_dim"]
        text_width = config.get("encoder_hid_dim") or (cross[0] if isinstance(cross, (list, tuple)) else cross)
        context = randn((2 * stage_batch, plan["tokens"], text_width), generator, settings)
        image_channels = [0, config["in_channels"] // 2, config["in_channels"] - config["out_channels"]][i]
        latent_channels = config["in_channels"] - image_channels
        image = None
        if image_channels:
            image = randn((2 * stage_batch, image_channels, side, side), generator, settings)
        labels = None
        if plan["noise_level"] is not None:
            labels = torch.full((2 * stage_batch,), plan["noise_level"], dtype=torch.long, device=settings.device)
        stage_steps = max(1, math.floor(steps * plan["steps_factor"] + 0.5))
        times, evals = [], 0
        for _ in range(runs):
            scheduler = make_scheduler(folder)
            scheduler.set_timesteps(stage_steps, device=settings.device)
            timesteps = scheduler.timesteps
            evals = len(timesteps)
            latents = randn((stage_batch, latent_channels, side, side), generator, settings) * scheduler.init_noise_sigma

            def loop():
                nonlocal latents
                for t in timesteps:
                    if i == 1:  # IFSuperResolutionPipeline: the image joins before scaling
                        model_input = scheduler.scale_model_input(torch.cat([torch.cat([latents] * 2), image], dim=1), t)
                    else:
                        model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
                        if image is not None:  # the x4 upscaler: after scaling
                            model_input = torch.cat([model_input, image], dim=1)
                    noise_pred = unet(model_input, t, encoder_hidden_states=context, class_labels=labels).sample
                    uncond, text = noise_pred.chunk(2)
                    if noise_pred.shape[1] == 2 * latent_channels:  # IF: learned variance in the second half
                        uncond, _ = uncond.split(latent_channels, dim=1)
                        text, variance = text.split(latent_channels, dim=1)
                        noise_pred = torch.cat([uncond + plan["guidance"] * (text - uncond), variance], dim=1)
                        if scheduler.config.get("variance_type") not in ("learned", "learned_range"):
                            noise_pred = noise_pred[:, :latent_channels]
                    else:
                        noise_pred = uncond + plan["guidance"] * (text - uncond)
                    latents = scheduler.step(noise_pred, t, latents, generator=generator).prev_sample

            times.append(timed(settings, loop))
        scale = 4 if i == 2 else 1
        stages.append(dict(stage=plan["stage"], it_per_sec=evals / times[-1], unet_evals=evals,
                           width=side * scale, height=side * scale, batch=stage_batch, run_secs=times))
        del unet
        if settings.device == "cuda":
            torch.cuda.empty_cache()
    first = stages[0]
    return dict(unet_evals=first["unet_evals"], run_secs=first["run_secs"], it_per_sec=first["it_per_sec"], stages=stages)


def rate_text(rate: float) -> str:
    """Two decimals; three significant digits below 1 (CPU rates), as Brushfire's table."""
    if abs(rate) >= 1.0 or rate == 0.0:
        return f"{rate:.2f}"
    decimals = int(min(6, max(2, 2 - math.floor(math.log10(abs(rate))))))
    return f"{rate:.{decimals}f}"


def cell_text(cell: dict) -> str:
    if cell["status"] != "measured":
        return "not run: " + cell["reason"].replace("|", "/")
    stages = cell.get("stages")
    rate = " / ".join(rate_text(s["it_per_sec"]) for s in stages) if stages else rate_text(cell["it_per_sec"])
    mem = cell.get("peak_reserved_bytes")
    return f"{rate} it/s" + (f" ({mem / 2**30:.2f} GiB)" if mem else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["f16", "f32"], default=None)
    parser.add_argument("--pipelines", default="sd-txt2img", help="comma-separated: " + ", ".join(PIPELINES))
    parser.add_argument("--batch", default="1,4,16")
    parser.add_argument("--size", default="512")
    parser.add_argument("--columns", default="baseline,fused,fusion,channels-last")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--model", type=pathlib.Path, default=SD15, help="diffusers folder whose unet/ and scheduler/ configs the SD rows use")
    parser.add_argument("--if-models", default=None, help="stage I, stage II and x4 upscaler folders, comma-separated (default: the shipped IF-I-M, IF-II-M, x4)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--markdown")
    parser.add_argument("--csv")
    parser.add_argument("--json")
    args = parser.parse_args()

    # Casting a from_config model with `.to(dtype)` warns once per model; the cast is intended.
    diffusers.utils.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype_name = args.dtype or ("f16" if args.device == "cuda" else "f32")
    settings_dtype = torch.float16 if dtype_name == "f16" else torch.float32
    pipelines = args.pipelines.split(",")
    columns = args.columns.split(",")
    for p in pipelines:
        if p not in PIPELINES:
            parser.error(f"--pipelines: `{p}` is not one of {', '.join(PIPELINES)}")
    for c in columns:
        if c not in LABELS:
            parser.error(f"--columns: `{c}` is not one of {', '.join(LABELS)}")
    if_folders = IF_SEED
    if args.if_models:
        if_folders = tuple(pathlib.Path(p) for p in args.if_models.split(","))
        if len(if_folders) != 3:
            parser.error("--if-models takes three folders: stage I, stage II, x4 upscaler")
    batches = [int(b) for b in args.batch.split(",")]
    sizes = []
    for s in args.size.split(","):
        w, _, h = s.partition("x")
        sizes.append((int(w), int(h or w)))
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"

    cells = []
    for pipeline in pipelines:
        for column in columns:
            settings = Settings(column, args.device, settings_dtype)
            models = None
            for width, height in sizes:
                for batch in batches:
                    cell = dict(pipeline=pipeline, width=width, height=height, batch=batch, column=column)
                    print(f"[diffusers] {pipeline} {width}x{height} batch {batch} [{column}]", file=sys.stderr, flush=True)
                    try:
                        if args.device == "cuda":
                            torch.cuda.empty_cache()
                            torch.cuda.reset_peak_memory_stats()
                        if pipeline == "if":
                            measured = run_if(if_folders, batch, args.steps, args.runs, settings)
                        else:
                            if models is None:
                                models = SdModels(pipeline, args.model, settings)
                            measured = run_sd(pipeline, models, args.model, batch, width, height, args.steps, args.runs, settings)
                        cell.update(
                            status="measured",
                            peak_reserved_bytes=torch.cuda.max_memory_reserved() if args.device == "cuda" else None,
                            peak_allocated_bytes=torch.cuda.max_memory_allocated() if args.device == "cuda" else None,
                            **measured,
                        )
                        print(f"  {cell_text(cell)}  runs {[round(t, 2) for t in cell['run_secs']]}", file=sys.stderr, flush=True)
                    except Exception as e:  # a failed cell (OOM, compile error) is reported, not fatal
                        cell.update(status="failed", reason=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                        print(f"  failed: {cell['reason']}", file=sys.stderr, flush=True)
                        if args.device == "cuda":
                            torch.cuda.empty_cache()
                    cells.append(cell)
            del models
            if args.device == "cuda":
                torch.cuda.empty_cache()

    out = [
        f"diffusers {diffusers.__version__} / torch {torch.__version__}: {args.device} ({device_name}), {dtype_name}, "
        f"PNDM {args.steps} steps, CFG, it/s = UNet evaluations per second (run {args.runs} of {args.runs}), "
        f"random weights from {args.model.name}'s configs.\n"
    ]
    if_cell = next((c for c in cells if c.get("stages")), None)
    if if_cell:
        parts = ", ".join(f"{s['stage']} {s['width']}×{s['height']} ({s['unet_evals']} UNet evaluations)" for s in if_cell["stages"])
        out.append(
            f"The if row is the IF cascade at its own sizes, whatever the table's: {parts}; stages II and x4 "
            "at batch 1; random (·, 2, 4096) prompt embeddings in place of T5.\n"
        )
    for width, height in sizes:
        for batch in batches:
            out.append(f"### {width}×{height}, batch {batch}\n")
            out.append("| pipeline | " + " | ".join(LABELS[c] for c in columns) + " |")
            out.append("|---|" + "---:|" * len(columns))
            for pipeline in pipelines:
                row = []
                for c in columns:
                    cell = next(x for x in cells if (x["pipeline"], x["width"], x["height"], x["batch"], x["column"]) == (pipeline, width, height, batch, c))
                    row.append(cell_text(cell))
                out.append(f"| {pipeline} | " + " | ".join(row) + " |")
            out.append("")
    markdown = "\n".join(out)
    print(markdown)
    if args.markdown:
        pathlib.Path(args.markdown).write_text(markdown)
    if args.json:
        report = dict(backend=f"{args.device} ({device_name})", precision=dtype_name, steps=args.steps, runs=args.runs, cells=cells)
        pathlib.Path(args.json).write_text(json.dumps(report, indent=2))
    if args.csv:
        buf = io.StringIO()
        fields = ["pipeline", "width", "height", "batch", "column", "status", "it_per_sec", "unet_evals", "peak_reserved_bytes", "peak_allocated_bytes", "reason", "stages"]
        w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for cell in cells:
            row = dict(cell)
            if cell.get("stages"):
                row["stages"] = "; ".join(f"{s['stage']} {s['it_per_sec']:.4f} it/s" for s in cell["stages"])
            w.writerow(row)
        pathlib.Path(args.csv).write_text(buf.getvalue())
    return 0 if any(c["status"] == "measured" for c in cells) else 1


if __name__ == "__main__":
    sys.exit(main())
