//! `brushfire bench`: the seed's benchmark table (docs/architecture.md §1) from the command line.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use engine::backend::{BackendRequest, Precision};
use engine::bench::{
    BenchCell, BenchColumn, BenchModels, BenchObserver, BenchPipeline, BenchPlan, CascadeModels,
    CellOutcome, CellSpec, default_precision,
};
use engine::pipelines::{CancelToken, StepProgress};
use engine::session::Session;
use engine::tensor_io::write_atomic;
use engine::worker::EngineSettings;

use crate::exit::BadArgument;

/// `brushfire bench` flags.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Comma-separated: sd-txt2img, sd-img2img, sd-inpaint, sd-controlnet, if.
    #[arg(long, value_delimiter = ',', default_value = "sd-txt2img")]
    pub pipelines: Vec<String>,
    /// Images per prompt, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    pub batch: Vec<usize>,
    /// Image sizes, comma-separated: `512` or `768x512` (width x height).
    #[arg(long, value_delimiter = ',', default_value = "512")]
    pub size: Vec<String>,
    /// Settings columns, comma-separated: baseline, fused, fusion, channels-last.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "baseline,fused,fusion,channels-last"
    )]
    pub columns: Vec<String>,
    /// Scheduler steps (PNDM: 50 steps = 51 UNet evaluations).
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// Runs per cell; the last (warm) one is reported.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Build the random-weight models from this diffusers folder's configs instead of
    /// SD 1.5's (shipped in assets/models/stable-diffusion-v1-5).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The IF row's stage I, stage II and x4 upscaler folders, comma-separated, whose
    /// `unet/` and `scheduler/` configs replace the shipped IF-I-M, IF-II-M and x4 configs.
    #[arg(long, value_delimiter = ',')]
    pub if_models: Vec<PathBuf>,
    /// auto | cuda | wgpu | cpu
    #[arg(long, default_value = "auto")]
    pub backend: String,
    /// f32 | f16 (default: f16 on GPUs as the seed, f32 on the CPU backend).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Also write the markdown table here.
    #[arg(long)]
    pub markdown: Option<PathBuf>,
    /// Write one CSV line per cell here.
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// Write the whole report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Parses `512` or `768x512`.
pub fn parse_size(text: &str) -> Result<(usize, usize)> {
    let parse = |s: &str| -> Result<usize> {
        s.trim()
            .parse()
            .with_context(|| format!("--size `{text}`: `{s}` is not a number"))
    };
    match text.split_once(['x', 'X', '×']) {
        Some((w, h)) => Ok((parse(w)?, parse(h)?)),
        None => {
            let side = parse(text)?;
            Ok((side, side))
        }
    }
}

/// Builds the plan from the flags (everything validated before a backend starts).
pub fn plan_from_args(args: &BenchArgs, default_dtype: Precision) -> Result<BenchPlan> {
    let pipelines = args
        .pipelines
        .iter()
        .map(|p| p.parse::<BenchPipeline>())
        .collect::<Result<Vec<_>, _>>()?;
    let columns = args
        .columns
        .iter()
        .map(|c| c.parse::<BenchColumn>())
        .collect::<Result<Vec<_>, _>>()?;
    let sizes = args
        .size
        .iter()
        .map(|s| parse_size(s))
        .collect::<Result<Vec<_>>>()?;
    let precision = match &args.dtype {
        Some(d) => d.parse()?,
        None => default_dtype,
    };
    let plan = BenchPlan {
        pipelines,
        batches: args.batch.clone(),
        sizes,
        columns,
        precision,
        steps: args.steps,
        runs: args.runs,
    };
    plan.validate()?;
    Ok(plan)
}

/// The configs the flags name (SD's and the IF cascade's), read before a backend starts.
pub fn bench_models(args: &BenchArgs) -> Result<BenchModels> {
    let mut models = match &args.model {
        Some(dir) => BenchModels::from_dir(dir)?,
        None => BenchModels::sd15(),
    };
    match args.if_models.as_slice() {
        [] => {}
        [stage1, stage2, upscaler] => {
            models.cascade = Some(CascadeModels::from_dirs(stage1, stage2, upscaler)?);
        }
        other => bail!(
            "--if-models takes three folders (stage I, stage II, x4 upscaler), not {}",
            other.len()
        ),
    }
    Ok(models)
}

/// Prints each cell as it finishes, with a per-step progress line.
struct TerminalBench {
    total: usize,
}

impl BenchObserver for TerminalBench {
    fn cell_started(&mut self, index: usize, total: usize, spec: &CellSpec) {
        self.total = total;
        eprintln!("[{}/{}] {spec}", index + 1, total);
    }

    fn step(&mut self, run: usize, p: &StepProgress) {
        eprint!(
            "\r  run {}: step {}/{}  {:.2} it/s   ",
            run + 1,
            p.step,
            p.total,
            p.it_per_sec
        );
        let _ = std::io::stderr().flush();
    }

    fn cell_finished(&mut self, _index: usize, cell: &BenchCell) {
        match &cell.outcome {
            CellOutcome::Measured { run_secs, .. } => {
                let runs: Vec<String> = run_secs.iter().map(|s| format!("{s:.2}s")).collect();
                eprintln!(
                    "\r  {}  (runs: {})              ",
                    cell.outcome.cell_text(),
                    runs.join(", ")
                );
            }
            CellOutcome::Failed { .. } => eprintln!("\r  {}", cell.outcome.cell_text()),
        }
    }
}

/// Runs `brushfire bench`.
pub fn bench(args: &BenchArgs) -> Result<()> {
    // Validate the flags before the backend starts (a CUDA probe can take seconds); what is
    // wrong with them is a bad argument (exit 2).
    let checked = || -> Result<_> {
        let backend_request: BackendRequest = args.backend.parse()?;
        plan_from_args(args, Precision::F32)?;
        // A table that could not be written is refused before hours of measuring, not after.
        for (flag, path) in [
            ("--markdown", &args.markdown),
            ("--csv", &args.csv),
            ("--json", &args.json),
        ] {
            if let Some(path) = path {
                engine::atomic_file::check_writable(path)
                    .with_context(|| format!("{flag} {}", path.display()))?;
            }
        }
        Ok((backend_request, bench_models(args)?))
    };
    let (backend_request, models) = checked().map_err(BadArgument::unless_download)?;
    let mut session = Session::new(EngineSettings {
        backend: backend_request,
        ..EngineSettings::default()
    });
    let selected = session.select_backend()?;
    let plan = plan_from_args(args, default_precision(selected.kind))?;
    eprintln!("backend: {selected}, {}", plan.precision);
    let mut observer = TerminalBench { total: 0 };
    let report = session.bench(&plan, &models, &CancelToken::new(), &mut observer)?;
    let markdown = report.to_markdown();
    println!("{markdown}");
    if let Some(path) = &args.markdown {
        write_atomic(path, markdown.as_bytes())?;
    }
    if let Some(path) = &args.csv {
        write_atomic(path, report.to_csv().as_bytes())?;
    }
    if let Some(path) = &args.json {
        write_atomic(path, report.to_json()?.as_bytes())?;
    }
    if report
        .cells
        .iter()
        .all(|c| matches!(c.outcome, CellOutcome::Failed { .. }))
    {
        bail!("no cell of the benchmark ran");
    }
    Ok(())
}
