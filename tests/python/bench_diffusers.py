#!/usr/bin/env python3
"""The seed's benchmark protocol in diffusers, to run beside `brushfire bench` on one machine.

Same as Brushfire's (engine/src/bench.rs, DESIGN.md §1): SD 1.5's UNet built from its real
config (assets/models/stable-diffusion-v1-5) with random weights, PNDM from its scheduler config
(50 steps = 51 UNet evaluations), CFG batch of 2 × batch, random (2·batch, 77, 768) text
embeddings, it/s = UNet evaluations per second of the denoising loop (the pipeline's progress-bar
rate), device synchronised inside the timed region, warm run of `--runs` reported, peak memory
as torch's max reserved bytes (Brushfire reports its pool's reserved bytes).

Columns, as the seed's table:
  baseline       vanilla attention (AttnProcessor), eager
  fused          SDPA (AttnProcessor2_0), eager
  fusion         SDPA + torch.compile(unet, mode="reduce-overhead", fullgraph=True)
  channels-last  SDPA + compile + unet.to(memory_format=torch.channels_last)

    python tests/python/bench_diffusers.py --device cuda --dtype f16 --batch 1,16 --size 512
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import pathlib
import sys
import time

import torch
from diffusers import PNDMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

ROOT = pathlib.Path(__file__).resolve().parents[2]
SD15 = ROOT / "assets" / "models" / "stable-diffusion-v1-5"

LABELS = {
    "baseline": "baseline (vanilla attention)",
    "fused": "fused attention",
    "fusion": "fused + fusion",
    "channels-last": "fused + fusion + channels-last",
}


def build_unet(column: str, device: str, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    config = UNet2DConditionModel.load_config(SD15 / "unet")
    unet = UNet2DConditionModel.from_config(config).to(device=device, dtype=dtype).eval()
    unet.set_attn_processor(AttnProcessor() if column == "baseline" else AttnProcessor2_0())
    if column == "channels-last":
        unet = unet.to(memory_format=torch.channels_last)
    if column in ("fusion", "channels-last"):
        unet = torch.compile(unet, mode="reduce-overhead", fullgraph=True)
    return unet


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def run_cell(unet, batch: int, width: int, height: int, steps: int, runs: int, device, dtype):
    generator = torch.Generator("cpu").manual_seed(0)
    context = torch.randn((2 * batch, 77, 768), generator=generator).to(device, dtype)
    times = []
    evals = 0
    for _ in range(runs):
        scheduler = PNDMScheduler.from_pretrained(SD15 / "scheduler")
        scheduler.set_timesteps(steps, device=device)
        latents = torch.randn((batch, 4, height // 8, width // 8), generator=generator)
        latents = (latents * scheduler.init_noise_sigma).to(device, dtype)
        evals = len(scheduler.timesteps)
        sync(device)
        start = time.perf_counter()
        for t in scheduler.timesteps:
            model_input = torch.cat([latents] * 2)
            model_input = scheduler.scale_model_input(model_input, t)
            noise_pred = unet(model_input, t, encoder_hidden_states=context).sample
            uncond, text = noise_pred.chunk(2)
            noise_pred = uncond + 7.5 * (text - uncond)
            latents = scheduler.step(noise_pred, t, latents).prev_sample
        sync(device)
        times.append(time.perf_counter() - start)
    return evals, times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["f16", "f32"], default=None)
    parser.add_argument("--batch", default="1,4,16")
    parser.add_argument("--size", default="512")
    parser.add_argument("--columns", default="baseline,fused,fusion,channels-last")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--markdown")
    parser.add_argument("--csv")
    parser.add_argument("--json")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype_name = args.dtype or ("f16" if args.device == "cuda" else "f32")
    dtype = torch.float16 if dtype_name == "f16" else torch.float32
    batches = [int(b) for b in args.batch.split(",")]
    sizes = []
    for s in args.size.split(","):
        w, _, h = s.partition("x")
        sizes.append((int(w), int(h or w)))
    columns = args.columns.split(",")
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"

    import diffusers

    cells = []
    for column in columns:
        unet = None
        for width, height in sizes:
            for batch in batches:
                cell = dict(pipeline="sd-txt2img", width=width, height=height, batch=batch, column=column)
                print(f"[diffusers] {width}x{height} batch {batch} [{column}]", file=sys.stderr, flush=True)
                try:
                    if unet is None:
                        unet = build_unet(column, args.device, dtype)
                    if args.device == "cuda":
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats()
                    evals, times = run_cell(unet, batch, width, height, args.steps, args.runs, args.device, dtype)
                    cell.update(
                        status="measured",
                        it_per_sec=evals / times[-1],
                        unet_evals=evals,
                        run_secs=times,
                        peak_reserved_bytes=torch.cuda.max_memory_reserved() if args.device == "cuda" else None,
                        peak_allocated_bytes=torch.cuda.max_memory_allocated() if args.device == "cuda" else None,
                    )
                    print(f"  {cell['it_per_sec']:.2f} it/s  runs {[round(t, 2) for t in times]}", file=sys.stderr, flush=True)
                except Exception as e:  # a failed cell (OOM, compile error) is reported, not fatal
                    cell.update(status="failed", reason=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                    print(f"  failed: {cell['reason']}", file=sys.stderr, flush=True)
                    if args.device == "cuda":
                        torch.cuda.empty_cache()
                cells.append(cell)
        del unet
        if args.device == "cuda":
            torch.cuda.empty_cache()

    header = (
        f"diffusers {diffusers.__version__} / torch {torch.__version__}: {args.device} ({device_name}), {dtype_name}, "
        f"PNDM {args.steps} steps, CFG, it/s = UNet evaluations per second (run {args.runs} of {args.runs}), "
        "random weights from SD 1.5's configs.\n"
    )
    out = [header]
    for width, height in sizes:
        for batch in batches:
            out.append(f"### {width}×{height}, batch {batch}\n")
            out.append("| pipeline | " + " | ".join(LABELS[c] for c in columns) + " |")
            out.append("|---|" + "---:|" * len(columns))
            row = []
            for c in columns:
                cell = next(x for x in cells if (x["width"], x["height"], x["batch"], x["column"]) == (width, height, batch, c))
                if cell["status"] == "measured":
                    mem = cell["peak_reserved_bytes"]
                    row.append(f"{cell['it_per_sec']:.2f} it/s" + (f" ({mem / 2**30:.2f} GiB)" if mem else ""))
                else:
                    row.append("not run: " + cell["reason"].replace("|", "/"))
            out.append("| sd-txt2img | " + " | ".join(row) + " |\n")
    markdown = "\n".join(out)
    print(markdown)
    if args.markdown:
        pathlib.Path(args.markdown).write_text(markdown)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(dict(backend=f"{args.device} ({device_name})", precision=dtype_name, steps=args.steps, runs=args.runs, cells=cells), indent=2))
    if args.csv:
        buf = io.StringIO()
        fields = ["pipeline", "width", "height", "batch", "column", "status", "it_per_sec", "unet_evals", "peak_reserved_bytes", "peak_allocated_bytes", "reason"]
        w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for cell in cells:
            w.writerow(cell)
        pathlib.Path(args.csv).write_text(buf.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
