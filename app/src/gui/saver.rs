//! Finished images are encoded and written on their own thread, never inside a frame: a PNG of
//! a large image takes tens of milliseconds to encode, and a slow or network disk can take
//! seconds to write it. The gallery shows the image at once and learns its path when
//! [`ImageSaver::try_results`] hands the outcome back (applied in `App::logic`).

use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;

use anyhow::Context as _;

use crate::png_meta::{GenerationParameters, png_bytes};

/// One image to write into `dir` under a fresh name.
#[derive(Debug, Clone)]
pub struct SaveRequest {
    /// Names the gallery image the outcome belongs to.
    pub id: u64,
    pub dir: PathBuf,
    /// The first number tried in the file name (the gallery's length when it finished).
    pub number: usize,
    /// The image's place in its batch.
    pub index: usize,
    pub width: usize,
    pub height: usize,
    pub rgb: Vec<u8>,
    pub params: GenerationParameters,
}

/// Where a [`SaveRequest`] was written, with the warning the user should see (the parameters
/// could not be embedded), or why it could not be written.
#[derive(Debug)]
pub struct Saved {
    pub id: u64,
    pub result: Result<(PathBuf, Option<String>), String>,
}

/// The saver thread (started on first use) and the outcomes not yet collected.
pub struct ImageSaver {
    requests: Option<Sender<SaveRequest>>,
    results: Receiver<Saved>,
    /// Outcomes written on the calling thread, when the saver thread could not take them.
    direct: Vec<Saved>,
    pending: usize,
    thread: Option<JoinHandle<()>>,
}

impl ImageSaver {
    /// Starts the thread; `waker` is called after every image (the UI's `request_repaint`).
    pub fn spawn(waker: impl Fn() + Send + 'static) -> Self {
        let (requests, request_rx) = channel::<SaveRequest>();
        let (result_tx, results) = channel();
        let thread = std::thread::Builder::new()
            .name("brushfire-saver".into())
            .spawn(move || {
                for request in request_rx {
                    let saved = write(&request);
                    if result_tx.send(saved).is_err() {
                        break;
                    }
                    waker();
                }
            });
        let (requests, thread) = match thread {
            Ok(thread) => (Some(requests), Some(thread)),
            Err(e) => {
                tracing::warn!("no saver thread ({e}); images are written in the frame");
                (None, None)
            }
        };
        Self {
            requests,
            results,
            direct: Vec::new(),
            pending: 0,
            thread,
        }
    }

    /// Queues `request`; its outcome comes back from [`Self::try_results`].
    pub fn save(&mut self, request: SaveRequest) {
        let unsent = match &self.requests {
            Some(tx) => tx.send(request).err().map(|e| e.0),
            None => Some(request),
        };
        match unsent {
            None => self.pending += 1,
            // The thread is gone: the image is still written, here.
            Some(request) => self.direct.push(write(&request)),
        }
    }

    /// The outcomes that arrived since the last call, without waiting.
    pub fn try_results(&mut self) -> Vec<Saved> {
        let mut out = std::mem::take(&mut self.direct);
        while let Ok(saved) = self.results.try_recv() {
            self.pending -= 1;
            out.push(saved);
        }
        out
    }

    /// Waits for every queued image (before a restart, or before the session names them).
    pub fn finish(&mut self) -> Vec<Saved> {
        let mut out = std::mem::take(&mut self.direct);
        while self.pending > 0 {
            match self.results.recv() {
                Ok(saved) => {
                    self.pending -= 1;
                    out.push(saved);
                }
                Err(_) => {
                    // The thread ended (a panic): what it had not written is lost to it.
                    tracing::warn!("the saver thread stopped with {} images", self.pending);
                    self.pending = 0;
                }
            }
        }
        out
    }
}

impl Drop for ImageSaver {
    /// Writes every queued image before the window goes.
    fn drop(&mut self) {
        self.requests = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn write(request: &SaveRequest) -> Saved {
    Saved {
        id: request.id,
        result: write_new_png(request).map_err(|e| format!("{e:#}")),
    }
}

/// Writes the image into its folder under a fresh name: an existing file is never replaced,
/// even by another Brushfire writing the same folder.
fn write_new_png(request: &SaveRequest) -> anyhow::Result<(PathBuf, Option<String>)> {
    let SaveRequest {
        dir,
        number,
        index,
        width,
        height,
        rgb,
        params,
        ..
    } = request;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (bytes, metadata) = png_bytes(*width, *height, rgb, params)?;
    let mut number = *number;
    loop {
        let path = free_path(dir, number, params.seed, *index);
        match engine::atomic_file::write_atomic_new(&path, &bytes) {
            Ok(()) => {
                let warning = metadata.warning(&path);
                return Ok((path, warning));
            }
            Err(engine::EngineError::Io { error, .. })
                if error.kind() == std::io::ErrorKind::AlreadyExists =>
            {
                number += 1;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The first `{number:05}-{seed}-{index}.png` from `number` on that is not taken in `dir`.
pub fn free_path(dir: &Path, number: usize, seed: u64, index: usize) -> PathBuf {
    let mut n = number;
    loop {
        let path = dir.join(format!("{n:05}-{seed}-{index}.png"));
        if !path.exists() {
            return path;
        }
        n += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(id: u64, dir: &Path) -> SaveRequest {
        SaveRequest {
            id,
            dir: dir.to_path_buf(),
            number: 0,
            index: 0,
            width: 2,
            height: 1,
            rgb: vec![255, 0, 0, 0, 0, 255],
            params: GenerationParameters {
                prompt: "a fox".into(),
                negative_prompt: String::new(),
                steps: 2,
                sampler: "PNDM".into(),
                cfg_scale: 7.5,
                seed: 9,
                width: 2,
                height: 1,
                model: "tiny-sd".into(),
                denoising_strength: None,
                controlnet: None,
            },
        }
    }

    #[test]
    fn images_are_written_off_the_calling_thread_and_never_over_each_other() {
        let dir = std::env::temp_dir().join(format!("brushfire-saver-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // A "folder" that is a file: that image's outcome is an error naming it, not a panic.
        let blocked = dir.join("blocked");
        std::fs::write(&blocked, b"x").unwrap();
        let woken = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = woken.clone();
        let mut saver = ImageSaver::spawn(move || {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        });
        saver.save(request(1, &dir));
        saver.save(request(2, &dir));
        saver.save(request(3, &blocked.join("inside")));
        let mut saved = saver.finish();
        assert!(saver.try_results().is_empty(), "all collected");
        saved.sort_by_key(|s| s.id);
        assert_eq!(saved.iter().map(|s| s.id).collect::<Vec<_>>(), [1, 2, 3]);
        let first = saved[0].result.as_ref().unwrap().0.clone();
        let second = saved[1].result.as_ref().unwrap().0.clone();
        assert_ne!(first, second, "same seed and number: a second name");
        assert!(first.is_file() && second.is_file());
        let text = crate::png_meta::read_parameters_text(&first)
            .unwrap()
            .unwrap();
        assert!(text.starts_with("a fox"), "{text}");
        let error = saved[2].result.as_ref().unwrap_err();
        assert!(error.contains("blocked"), "{error}");
        // The waker runs after each outcome is sent: join the thread before counting.
        drop(saver);
        assert_eq!(woken.load(std::sync::atomic::Ordering::SeqCst), 3);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
