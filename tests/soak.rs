//! Soak: 100 queued jobs with the tiny model through the engine worker (as the app drives it),
//! every tenth cancelled while it runs. No job is lost or doubled, and resident memory stays
//! flat. Its own test binary, so no other test shares the process whose memory it reads.
// Test code: a failed unwrap is the test failing, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use engine::backend::BackendRequest;
use engine::pipelines::{CommonRequest, GenerationRequest, Task};
use engine::worker::{EngineEvent, EngineHandle, EngineSettings, JobId};

const JOBS: usize = 100;
/// Resident memory may grow this much from the 20th finished job to the last: allocator slack,
/// not a leak (a leaked 64² image per job would be small, a leaked pass's activations or a model
/// copy per job would not).
const ALLOWED_GROWTH_BYTES: u64 = 48 * 1024 * 1024;

/// This process's resident set size, from `/proc/self/status` (Linux).
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kb * 1024
}

#[derive(Debug, Default, Clone, PartialEq)]
struct Outcome {
    started: usize,
    finished: usize,
    cancelled: usize,
    failed: usize,
}

#[test]
fn a_hundred_jobs_with_cancels_lose_nothing_and_memory_stays_flat() {
    let fixture = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny-sd");
    let mut engine = EngineHandle::spawn(
        EngineSettings {
            backend: BackendRequest::Cpu,
            ..Default::default()
        },
        || {},
    )
    .unwrap();
    engine.load_model(fixture.to_str().unwrap());
    let mut ids: Vec<JobId> = Vec::with_capacity(JOBS);
    for i in 0..JOBS {
        ids.push(engine.generate(GenerationRequest {
            common: CommonRequest {
                prompt: format!("a castle, take {i}"),
                steps: 2,
                width: 64,
                height: 64,
                seed: i as u64,
                ..Default::default()
            },
            task: Task::Txt2Img,
        }));
    }
    let index: BTreeMap<JobId, usize> = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    let mut outcomes: BTreeMap<JobId, Outcome> = BTreeMap::new();
    let mut ended = 0;
    let (mut rss_first, mut rss_last) = (None, 0);
    let start = Instant::now();
    while ended < JOBS {
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "timed out after {ended} jobs: {outcomes:?}"
        );
        let Some(event) = engine.recv_timeout(Duration::from_millis(200)) else {
            continue;
        };
        let (job, end) = match event {
            EngineEvent::JobStarted { job } => {
                outcomes.entry(job).or_default().started += 1;
                // Every tenth job is cancelled while it runs.
                if index.get(&job).is_some_and(|i| i % 10 == 9) {
                    engine.cancel(job);
                }
                continue;
            }
            EngineEvent::Finished { job, images, .. } => {
                assert_eq!(images.shape, vec![1, 64, 64, 3]);
                outcomes.entry(job).or_default().finished += 1;
                (job, true)
            }
            EngineEvent::Cancelled { job } => {
                outcomes.entry(job).or_default().cancelled += 1;
                (job, true)
            }
            EngineEvent::Failed {
                job: Some(job),
                error,
            } => {
                panic!("job {job:?} failed: {error}")
            }
            EngineEvent::Failed { job: None, error } => panic!("the engine failed: {error}"),
            _ => continue,
        };
        assert!(
            index.contains_key(&job),
            "an end for a job never queued: {job:?}"
        );
        if end {
            ended += 1;
            if ended == 20 {
                rss_first = Some(rss_bytes());
            }
            rss_last = rss_bytes();
        }
    }
    // Nothing more arrives: no job ends twice.
    let late = Instant::now();
    while late.elapsed() < Duration::from_millis(500) {
        if let Some(event) = engine.recv_timeout(Duration::from_millis(100)) {
            assert!(
                !matches!(
                    event,
                    EngineEvent::Finished { .. } | EngineEvent::Cancelled { .. }
                ),
                "an end after all {JOBS} jobs ended: {event:?}"
            );
        }
    }
    let mut cancelled = 0;
    for (i, id) in ids.iter().enumerate() {
        let o = outcomes.get(id).cloned().unwrap_or_default();
        assert_eq!(o.finished + o.cancelled, 1, "job {i} ended {o:?}");
        assert!(o.started <= 1, "job {i} started twice: {o:?}");
        if i % 10 == 9 {
            cancelled += o.cancelled;
        } else {
            assert_eq!(
                o.finished, 1,
                "job {i} was not cancelled but did not finish: {o:?}"
            );
        }
    }
    // A cancel can only lose the race against a job's last step; most must land.
    assert!(cancelled >= 5, "only {cancelled} of 10 cancels took effect");
    let rss_first = rss_first.expect("20 jobs ended");
    eprintln!(
        "soak: {JOBS} jobs ({cancelled} cancelled) in {:.1} s; RSS after 20 jobs {:.1} MiB, after \
         {JOBS} {:.1} MiB",
        start.elapsed().as_secs_f64(),
        rss_first as f64 / 1048576.0,
        rss_last as f64 / 1048576.0
    );
    assert!(
        rss_last <= rss_first + ALLOWED_GROWTH_BYTES,
        "resident memory grew from {rss_first} to {rss_last} bytes"
    );
}
