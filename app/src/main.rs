//! `brushfire`: local image generation with diffusion models.
//!
//! With no subcommand it will open the desktop app (a later issue); `generate` and `bench` run
//! headless.

mod cli;
mod png_meta;
mod progress;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "brushfire",
    version,
    about = "Local image generation with diffusion models"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate images from the command line.
    Generate(Box<cli::GenerateArgs>),
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Generate(args)) => cli::generate(&args),
        None => {
            use clap::CommandFactory;
            Cli::command().print_help()?;
            println!("\n\nThe desktop app is not built yet; use `brushfire generate`.");
            Ok(())
        }
    }
}
