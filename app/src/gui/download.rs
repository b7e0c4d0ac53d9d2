//! A model download in progress, as the model box and the ControlNet panel show it.

use std::time::Instant;

/// A download in progress.
#[derive(Debug, Clone, PartialEq)]
pub struct DownloadState {
    pub file: String,
    pub done_bytes: usize,
    pub total_bytes: usize,
    /// When this file started.
    pub started: Instant,
}

impl DownloadState {
    /// Bytes per second so far.
    pub fn rate(&self) -> f64 {
        self.done_bytes as f64 / self.started.elapsed().as_secs_f64().max(1e-3)
    }

    /// Seconds left at the current rate.
    pub fn eta_secs(&self) -> f64 {
        self.total_bytes.saturating_sub(self.done_bytes) as f64 / self.rate().max(1.0)
    }

    /// Fraction done.
    pub fn fraction(&self) -> f32 {
        if self.total_bytes == 0 {
            0.0
        } else {
            self.done_bytes as f32 / self.total_bytes as f32
        }
    }
}
