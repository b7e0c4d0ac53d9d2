//! Download progress on the terminal (the GUI shows its own bar).

use std::time::Instant;

use engine::loading::DownloadProgress;

/// Prints bytes, rate and ETA of the current file to stderr.
#[derive(Debug, Default)]
pub struct TerminalDownload {
    file: String,
    total: usize,
    done: usize,
    start: Option<Instant>,
}

impl DownloadProgress for TerminalDownload {
    fn start(&mut self, file: &str, total_bytes: usize) {
        self.file = file.to_string();
        self.total = total_bytes;
        self.done = 0;
        self.start = Some(Instant::now());
    }

    fn advance(&mut self, bytes: usize) {
        self.done += bytes;
        let secs = self
            .start
            .map_or(0.0, |s| s.elapsed().as_secs_f64())
            .max(1e-3);
        let rate = self.done as f64 / secs;
        let eta = (self.total.saturating_sub(self.done)) as f64 / rate.max(1.0);
        eprint!(
            "\r{}: {:.1}/{:.1} MB  {:.1} MB/s  ETA {:.0}s   ",
            self.file,
            self.done as f64 / 1e6,
            self.total as f64 / 1e6,
            rate / 1e6,
            eta
        );
    }

    fn finish(&mut self) {
        eprintln!();
    }
}
