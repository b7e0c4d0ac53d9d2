//! Brushfire's front ends: the desktop app ([`gui`]) and the headless CLI ([`cli`]). Neither
//! touches a tensor: the engine does the work.

pub mod bench_cli;
pub mod cli;
pub mod exit;
pub mod gui;
pub mod image_files;
pub mod png_meta;
pub mod progress;
