//! `brushfire`: local image generation with diffusion models.
//!
//! With no subcommand it opens the desktop app; `generate` and `bench` run headless.

use std::process::ExitCode;

use app::{bench_cli, cli, exit, gui};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "brushfire",
    version,
    about = "Local image generation with diffusion models"
)]
struct Cli {
    /// The model the window loads at start: a diffusers folder or a hub id (default: the one
    /// used last, else stable-diffusion-v1-5/stable-diffusion-v1-5).
    #[arg(long)]
    model: Option<String>,
    /// Images to open (what the desktop entry's "Open with" passes): the last one becomes the
    /// image-to-image / inpainting source, and a Brushfire or A1111 PNG also restores its
    /// generation parameters.
    files: Vec<std::path::PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate images from the command line.
    Generate(Box<cli::GenerateArgs>),
    /// Measure it/s per pipeline × batch × settings (the seed's benchmark table).
    Bench(Box<bench_cli::BenchArgs>),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    // A malformed command line: clap prints why and exits with 2.
    let cli = Cli::parse();
    // Before any backend starts: compiled kernels and autotune results persist across runs.
    engine::backend::configure_kernel_cache();
    let result = match cli.command {
        Some(Command::Generate(args)) => cli::generate(&args),
        Some(Command::Bench(args)) => bench_cli::bench(&args),
        None => gui::run(cli.model, cli.files),
    };
    // A user error is its message chain and an exit code: never a backtrace (`exit`).
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => exit::report(&e),
    }
}
