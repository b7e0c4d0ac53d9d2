//! What a request's attention will hold, checked against what the device can give before any
//! tensor work.
//!
//! Vanilla attention materialises `batch × heads` score matrices of `queries × keys`: at SD's
//! 64×64 latent level that is 4096 × 4096 per head, 32 GiB in f32 for 16 images with CFG. On the
//! CPU backend a process that asks for more than the machine has is killed by the kernel, taking
//! the user's unsaved work with it; on a GPU a tensor larger than the memory pool's largest page
//! fails inside a kernel with a message about pages. Both are knowable up front from the model's
//! structure, so pipelines refuse such a request with the numbers and what would fit instead.
//!
//! The models list their attention calls for a given input (`attention_calls`); the processor
//! turns one call into bytes ([`AttnProcessor::footprint`]); a [`MemoryBudget`] says what the
//! device has. [`record_attention_calls`] records what the processors were really given, which
//! is how the tests hold the models' lists to the truth.

use std::cell::RefCell;
use std::fmt;

use crate::error::{EngineError, Result};
use crate::models::AttnProcessor;

/// One attention call's score matrices: `batch × heads` of `queries × keys`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ScoreShape {
    pub batch: usize,
    pub heads: usize,
    pub queries: usize,
    pub keys: usize,
    /// Scores and softmax in f32 whatever the model's float type (`upcast_attention`/`softmax`).
    pub upcast: bool,
}

impl ScoreShape {
    /// How many scores the call computes.
    pub fn elements(&self) -> u64 {
        [self.batch, self.heads, self.queries, self.keys]
            .iter()
            .map(|&n| n as u64)
            .product()
    }
}

impl fmt::Display for ScoreShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} × {} matrices of {} × {}",
            self.batch, self.heads, self.queries, self.keys
        )
    }
}

/// The memory an attention call holds beyond its inputs and output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Footprint {
    /// Everything it holds at once (the scores and the softmax's result).
    pub total: u64,
    /// Its largest single tensor (one allocation).
    pub largest: u64,
}

impl AttnProcessor {
    /// What one call of `shape` holds when the model computes in floats of `float_bytes`.
    /// Vanilla holds the scores and the softmax's copy of them (plus a cast back when the
    /// scores were upcast); on the CPU backend the softmax works in the scores' buffer, so there
    /// this errs one matrix on the safe side. Sliced holds that for `slice_size` matrices at a
    /// time; fused holds a block of rows at most (flash kernels on GPUs, our blocked kernel on
    /// the CPU), which is counted as nothing.
    pub fn footprint(self, shape: &ScoreShape, float_bytes: u64) -> Footprint {
        let score_bytes = if shape.upcast {
            float_bytes.max(4)
        } else {
            float_bytes
        };
        let matrices = match self {
            Self::Fused => return Footprint::default(),
            Self::Vanilla => (shape.batch * shape.heads) as u64,
            Self::Sliced { slice_size } => slice_size.clamp(1, shape.batch * shape.heads) as u64,
        };
        let elements = matrices * shape.queries as u64 * shape.keys as u64;
        let one = elements * score_bytes;
        let cast_back = if score_bytes == float_bytes {
            0
        } else {
            elements * float_bytes
        };
        Footprint {
            total: 2 * one + cast_back,
            largest: one,
        }
    }
}

/// The attention calls of one model run (a UNet step, a VAE decode), named for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelCalls {
    /// "UNet", "VAE decoder", ...
    pub model: &'static str,
    /// The size of the model's floats (4 for f32, 2 for f16).
    pub float_bytes: u64,
    pub calls: Vec<ScoreShape>,
}

/// The most a request's attention holds at once with one processor, and the call that holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionNeed {
    pub processor: AttnProcessor,
    pub footprint: Footprint,
    /// The call with the largest total, and its model.
    pub call: Option<(&'static str, ScoreShape)>,
}

impl AttentionNeed {
    /// The largest footprint over `models`' calls with `processor`.
    pub fn of(processor: AttnProcessor, models: &[ModelCalls]) -> Self {
        let mut need = Self {
            processor,
            footprint: Footprint::default(),
            call: None,
        };
        for m in models {
            for shape in &m.calls {
                let f = processor.footprint(shape, m.float_bytes);
                need.footprint.largest = need.footprint.largest.max(f.largest);
                if need.call.is_none() || f.total > need.footprint.total {
                    need.footprint.total = f.total;
                    need.call = Some((m.model, *shape));
                }
            }
        }
        need
    }
}

/// What the device can give a request, read when the request is checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum MemoryBudget {
    /// Nothing is checked (a library caller that did not say where the model runs).
    #[default]
    Unchecked,
    /// The CPU backend: the host's available memory (Linux `MemAvailable`, within the process's
    /// cgroup limit), read at each check; unchecked where the system does not say.
    Host,
    /// A GPU: the largest allocation its memory pool makes (CubeCL's page size). Running out of
    /// total device memory is a recoverable error there, so only the allocation is checked.
    Device { max_allocation: u64 },
    /// Fixed limits: a user's cap, or a test's.
    Fixed {
        available: Option<u64>,
        max_allocation: Option<u64>,
    },
}

impl MemoryBudget {
    /// `(available bytes, largest allocation)`, each `None` where unknown or unlimited.
    pub fn limits(&self) -> (Option<u64>, Option<u64>) {
        match self {
            Self::Unchecked => (None, None),
            Self::Host => (host_available_memory(), None),
            Self::Device { max_allocation } => (None, Some(*max_allocation)),
            Self::Fixed {
                available,
                max_allocation,
            } => (*available, *max_allocation),
        }
    }

    /// Refuses `need` when it does not fit, naming the numbers and what else would: `need_of`
    /// gives the same request's need with another processor.
    pub fn check(
        &self,
        need: &AttentionNeed,
        need_of: impl Fn(AttnProcessor) -> AttentionNeed,
    ) -> Result<()> {
        self.check_with(need, need_of, &[])
    }

    /// [`Self::check`], also offering `others`: the same request changed another way (e.g.
    /// "VAE tiling"), each named, with its need, offered where it fits.
    pub fn check_with(
        &self,
        need: &AttentionNeed,
        need_of: impl Fn(AttnProcessor) -> AttentionNeed,
        others: &[(&str, AttentionNeed)],
    ) -> Result<()> {
        let (available, max_allocation) = self.limits();
        let Some((model, shape)) = need.call else {
            return Ok(());
        };
        let problem = if let Some(available) =
            available.filter(|&available| need.footprint.total > available)
        {
            format!(
                "{} attention needs about {} for its score matrices ({shape} in the {model}), \
                 and this machine has {} available",
                need.processor.name(),
                gib(need.footprint.total),
                gib(available),
            )
        } else if let Some(max) = max_allocation.filter(|&max| need.footprint.largest > max) {
            format!(
                "{} attention needs one score tensor of about {} ({shape} in the {model}), \
                 larger than the {} the GPU's memory pool allocates at most",
                need.processor.name(),
                gib(need.footprint.largest),
                gib(max),
            )
        } else {
            return Ok(());
        };
        let fits = |n: &AttentionNeed| {
            available.is_none_or(|a| n.footprint.total <= a)
                && max_allocation.is_none_or(|m| n.footprint.largest <= m)
        };
        let mut instead = Vec::new();
        for other in [
            AttnProcessor::Fused,
            AttnProcessor::Sliced { slice_size: 1 },
        ] {
            if other == need.processor {
                continue;
            }
            let n = need_of(other);
            if fits(&n) {
                instead.push(match other {
                    AttnProcessor::Fused => "fused attention holds no score matrix".to_string(),
                    _ => format!(
                        "sliced attention needs about {}",
                        gib(n.footprint.total.max(n.footprint.largest))
                    ),
                });
            }
        }
        for (what, n) in others {
            if fits(n) {
                instead.push(format!(
                    "{what} needs about {}",
                    gib(n.footprint.total.max(n.footprint.largest))
                ));
            }
        }
        let advice = if instead.is_empty() {
            "lower the batch size or the image size".to_string()
        } else {
            format!(
                "{}; or lower the batch size or the image size",
                instead.join(", ")
            )
        };
        Err(EngineError::OutOfMemory(format!("{problem}: {advice}")))
    }
}

/// A model's largest feature map in one pass, for the memory check (attention's score matrices
/// aside, the tensors that grow with the picture; the VAE's, at full resolution, are the
/// largest of a run).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeatureMap {
    /// "VAE decoder", ...
    pub model: &'static str,
    /// `[batch, channels, height, width]`
    pub shape: [usize; 4],
    /// The size of the model's floats (4 for f32, 2 for f16).
    pub float_bytes: u64,
    /// What the pass holds beside its own maps for its whole length, and its bytes (a
    /// ControlNet's residuals, beside the UNet's pass).
    pub held: Option<(&'static str, u64)>,
}

impl FeatureMap {
    pub fn bytes(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product::<u64>() * self.float_bytes
    }

    /// What a pass holds at its peak: about [`PEAK_PER_FEATURE_MAP`] of its largest map, and
    /// what it holds beside them.
    pub fn pass_peak(&self) -> u64 {
        PEAK_PER_FEATURE_MAP * self.bytes() + self.held.map_or(0, |(_, bytes)| bytes)
    }

    /// This map, with `what` (`bytes` of it) held beside the pass.
    fn holding(self, what: &'static str, bytes: u64) -> Self {
        Self {
            held: Some((what, bytes)),
            ..self
        }
    }

    /// This map with a ControlNet's residuals held beside the pass: `per_image` elements
    /// (`ControlNetModel::residual_elements`) for each image of the map's batch, in its floats.
    pub fn holding_control_residuals(self, per_image: usize) -> Self {
        let bytes = (per_image * self.shape[0]) as u64 * self.float_bytes;
        self.holding("the ControlNet's residuals", bytes)
    }
}

/// A pass's peak over its largest feature map (a map, the next one, and a norm's or conv's
/// working copy; in a UNet, the skips held too). Measured on the CPU backend (`VmHWM`):
/// - SD 1.5's VAE decoder at 1024², largest map 1 GiB: ~2.9 GiB above the weights;
/// - SD 1.5's UNet at 512² with fused attention, largest map the first level's feed-forward
///   projection `[2·batch, 2560, 64, 64]`: 0.8 GiB above the weights at batch 4 (map 0.31 GiB),
///   3.1 GiB at batch 16 (map 1.25 GiB); at 768², batch 2: 0.93 GiB (map 0.35 GiB);
/// - with a ControlNet at 512², batch 4: 1.07 GiB above both models' weights, the UNet's 0.84
///   and its residuals' 0.2, which [`FeatureMap::held`] adds
///   (tests/python/RESULTS.md, sessions 11, 13 and 14).
pub const PEAK_PER_FEATURE_MAP: u64 = 3;

impl MemoryBudget {
    /// Refuses `map` when it cannot fit: a pass that holds about three of it needs more than
    /// the memory available, or the map alone is larger than the GPU pool's largest
    /// allocation. `instead` is the same pass done another way (e.g. "VAE tiling"), offered
    /// where it fits.
    pub fn check_feature_map(
        &self,
        map: &FeatureMap,
        instead: Option<(&str, FeatureMap)>,
    ) -> Result<()> {
        let (available, max_allocation) = self.limits();
        let fits = |m: &FeatureMap| {
            available.is_none_or(|a| m.pass_peak() <= a)
                && max_allocation.is_none_or(|x| m.bytes() <= x)
        };
        if fits(map) {
            return Ok(());
        }
        let shape = |m: &FeatureMap| {
            format!(
                "{:?} in {}",
                m.shape,
                if m.float_bytes == 2 { "f16" } else { "f32" }
            )
        };
        let problem = match available.filter(|&a| map.pass_peak() > a) {
            Some(available) => format!(
                "the {}'s largest feature map is {}, about {}, and a pass holds about \
                 {PEAK_PER_FEATURE_MAP} of them{} ({}) where this machine has {} available",
                map.model,
                shape(map),
                gib(map.bytes()),
                map.held
                    .map(|(what, bytes)| format!(" and {what}, {}", gib(bytes)))
                    .unwrap_or_default(),
                gib(map.pass_peak()),
                gib(available),
            ),
            None => format!(
                "the {}'s largest feature map, {}, is about {}, larger than the {} the GPU's \
                 memory pool allocates at most",
                map.model,
                shape(map),
                gib(map.bytes()),
                gib(max_allocation.unwrap_or_default()),
            ),
        };
        let advice = match instead.filter(|(_, m)| fits(m)) {
            Some((what, m)) => format!(
                "{what} brings it to {}, about {}; or lower the image size",
                shape(&m),
                gib(m.bytes())
            ),
            None if map.shape[0] > 1 => "lower the batch size or the image size".to_string(),
            None => "lower the image size".to_string(),
        };
        Err(EngineError::OutOfMemory(format!("{problem}: {advice}")))
    }

    /// Refuses to load `what` when its weights, `params` f32 floats, would not fit the memory
    /// available. Only the CPU backend's host memory is known, and it holds weights in f32; a
    /// GPU's total is not checked. Called after the model is built (lazily, nothing allocated)
    /// and before any weight is read, so a model too large for the machine fails with the
    /// numbers instead of the process being killed.
    pub fn check_weights(&self, what: &str, params: usize) -> Result<()> {
        let params = params as u64;
        let bytes = params * 4;
        match self.limits().0 {
            Some(available) if bytes > available => Err(EngineError::OutOfMemory(format!(
                "loading {what} needs about {} for its {} weights, and this machine has {} \
                 available: close other programs, or use a GPU",
                gib(bytes),
                count(params),
                gib(available),
            ))),
            _ => Ok(()),
        }
    }
}

/// Checks what `models`' calls hold with `processor` against `budget` (see
/// [`MemoryBudget::check`]).
pub fn check_attention(
    budget: &MemoryBudget,
    processor: AttnProcessor,
    models: &[ModelCalls],
) -> Result<()> {
    if *budget == MemoryBudget::Unchecked {
        return Ok(());
    }
    budget.check(&AttentionNeed::of(processor, models), |p| {
        AttentionNeed::of(p, models)
    })
}

/// A parameter count in words: "4.76 billion", "123 million", "5120".
fn count(n: u64) -> String {
    match n {
        1_000_000_000.. => format!("{:.2} billion", n as f64 / 1e9),
        1_000_000.. => format!("{:.0} million", n as f64 / 1e6),
        _ => n.to_string(),
    }
}

/// Bytes in GiB with one decimal, or whole MiB / KiB below 1 GiB / 1 MiB.
fn gib(bytes: u64) -> String {
    let b = bytes as f64;
    if bytes >= 1 << 30 {
        format!("{:.1} GiB", b / (1u64 << 30) as f64)
    } else if bytes >= 1 << 20 {
        format!("{:.0} MiB", b / (1u64 << 20) as f64)
    } else {
        format!("{:.0} KiB", (b / 1024.0).max(1.0))
    }
}

/// The memory the host can give this process now: `MemAvailable`, capped by the cgroup's
/// limit less its usage (containers). `None` where neither is known (not Linux).
pub fn host_available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| meminfo_available(&t));
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let cgroup = cgroup_headroom(
        read("/sys/fs/cgroup/memory.max").as_deref(),
        read("/sys/fs/cgroup/memory.current").as_deref(),
    )
    .or_else(|| {
        cgroup_headroom(
            read("/sys/fs/cgroup/memory/memory.limit_in_bytes").as_deref(),
            read("/sys/fs/cgroup/memory/memory.usage_in_bytes").as_deref(),
        )
    });
    match (meminfo, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// `MemAvailable` of a `/proc/meminfo` text, in bytes.
pub fn meminfo_available(meminfo: &str) -> Option<u64> {
    proc_kib_field(meminfo, "MemAvailable")
}

/// The `key:  N kB` line of a `/proc` text (`meminfo`, `self/status`), in bytes.
pub(crate) fn proc_kib_field(text: &str, key: &str) -> Option<u64> {
    let value = text
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?;
    let kib: u64 = value.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

/// A cgroup's limit less its usage; `None` without a limit (`max`, or v1's huge sentinel).
pub fn cgroup_headroom(limit: Option<&str>, usage: Option<&str>) -> Option<u64> {
    let limit: u64 = limit?.trim().parse().ok()?;
    if limit >= 1 << 60 {
        return None;
    }
    let usage: u64 = usage?.trim().parse().ok()?;
    Some(limit.saturating_sub(usage))
}

thread_local! {
    static RECORDING: RefCell<Option<Vec<ScoreShape>>> = const { RefCell::new(None) };
}

/// Runs `f` and returns, with its result, every attention call the processors were given on
/// this thread meanwhile, in order (for tests and diagnostics; nothing is kept otherwise).
pub fn record_attention_calls<R>(f: impl FnOnce() -> R) -> (R, Vec<ScoreShape>) {
    let outer = RECORDING.with(|r| r.borrow_mut().replace(Vec::new()));
    let result = f();
    let calls = RECORDING.with(|r| std::mem::replace(&mut *r.borrow_mut(), outer));
    (result, calls.unwrap_or_default())
}

/// Notes a call of the processor (a no-op unless [`record_attention_calls`] is running).
pub(crate) fn note_attention_call(shape: ScoreShape) {
    RECORDING.with(|r| {
        if let Some(calls) = r.borrow_mut().as_mut() {
            calls.push(shape);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    /// SD 1.5's VAE decoding one 2048² picture (the x4 upscaler's output size).
    fn decoder_2048() -> FeatureMap {
        FeatureMap {
            model: "VAE decoder",
            shape: [1, 256, 2048, 2048],
            float_bytes: 4,
            held: None,
        }
    }

    fn a_tile() -> FeatureMap {
        FeatureMap {
            shape: [1, 256, 512, 512],
            ..decoder_2048()
        }
    }

    #[test]
    fn weights_larger_than_the_host_can_hold_are_refused_with_the_numbers() {
        let host = MemoryBudget::Fixed {
            available: Some(16 * GIB),
            max_allocation: None,
        };
        // T5-XXL's encoder, 4.76 billion weights, in f32.
        let text = host
            .check_weights("the T5 text encoder", 4_762_310_656)
            .expect_err("17.7 GiB in 16")
            .to_string();
        assert_eq!(
            text,
            "not enough memory: loading the T5 text encoder needs about 17.7 GiB for its 4.76 \
             billion weights, and this machine has 16.0 GiB available: close other programs, \
             or use a GPU"
        );
        host.check_weights("SD 1.5", 1_066_235_307)
            .expect("4 GiB fits in 16");
        // A GPU pool says nothing of the device's total.
        MemoryBudget::Device {
            max_allocation: GIB,
        }
        .check_weights("the T5 text encoder", 4_762_310_656)
        .expect("unchecked on a GPU");
    }

    #[test]
    fn a_feature_map_too_large_for_the_pool_or_the_host_is_refused_with_tiling_offered() {
        let pool = MemoryBudget::Device {
            max_allocation: 2 * GIB,
        };
        let text = pool
            .check_feature_map(&decoder_2048(), Some(("VAE tiling", a_tile())))
            .expect_err("4 GiB in 2 GiB pages")
            .to_string();
        assert_eq!(
            text,
            "not enough memory: the VAE decoder's largest feature map, [1, 256, 2048, 2048] in \
             f32, is about 4.0 GiB, larger than the 2.0 GiB the GPU's memory pool allocates at \
             most: VAE tiling brings it to [1, 256, 512, 512] in f32, about 256 MiB; or lower \
             the image size"
        );
        pool.check_feature_map(&a_tile(), None)
            .expect("a tile fits");

        let host = MemoryBudget::Fixed {
            available: Some(10 * GIB),
            max_allocation: None,
        };
        let text = host
            .check_feature_map(&decoder_2048(), None)
            .expect_err("3 × 4 GiB in 10")
            .to_string();
        assert!(text.contains("about 3 of them (12.0 GiB)"), "{text}");
        assert!(text.contains("has 10.0 GiB available"), "{text}");
        assert!(text.ends_with(": lower the image size"), "{text}");
        // A tiling that does not fit either is not offered.
        let tiny_host = MemoryBudget::Fixed {
            available: Some(GIB / 2),
            max_allocation: None,
        };
        let text = tiny_host
            .check_feature_map(&decoder_2048(), Some(("VAE tiling", a_tile())))
            .expect_err("nothing fits")
            .to_string();
        assert!(!text.contains("VAE tiling"), "{text}");
        MemoryBudget::Unchecked
            .check_feature_map(&decoder_2048(), None)
            .expect("unchecked");
    }

    /// SD 1.5's first-level self-attention at 512×512 with CFG at batch 16.
    fn sd_level0(batch: usize) -> ScoreShape {
        ScoreShape {
            batch: 2 * batch,
            heads: 8,
            queries: 4096,
            keys: 4096,
            upcast: false,
        }
    }

    #[test]
    fn footprints_follow_each_processor() {
        let s = sd_level0(16);
        let v = AttnProcessor::Vanilla.footprint(&s, 4);
        assert_eq!(v.largest, 16 * GIB);
        assert_eq!(v.total, 32 * GIB);
        let sliced = AttnProcessor::Sliced { slice_size: 1 }.footprint(&s, 4);
        assert_eq!(sliced.largest, 64 << 20);
        assert_eq!(AttnProcessor::Fused.footprint(&s, 4), Footprint::default());
        // f16 with upcast: f32 scores and softmax, then the f16 copy.
        let up = ScoreShape { upcast: true, ..s };
        let h = AttnProcessor::Vanilla.footprint(&up, 2);
        assert_eq!(h.total, 32 * GIB + 8 * GIB);
        assert_eq!(AttnProcessor::Vanilla.footprint(&s, 2).total, 16 * GIB);
    }

    #[test]
    fn a_need_that_does_not_fit_names_the_numbers_and_what_would() {
        let models = [ModelCalls {
            model: "UNet",
            float_bytes: 4,
            calls: vec![
                ScoreShape {
                    keys: 77,
                    ..sd_level0(16)
                },
                sd_level0(16),
            ],
        }];
        let need_of = |p| AttentionNeed::of(p, &models);
        let budget = MemoryBudget::Fixed {
            available: Some(20 * GIB),
            max_allocation: None,
        };
        let err = budget
            .check(&need_of(AttnProcessor::Vanilla), need_of)
            .expect_err("32 GiB does not fit in 20");
        let text = err.to_string();
        assert!(
            text.contains("vanilla attention needs about 32.0 GiB"),
            "{text}"
        );
        assert!(
            text.contains("32 × 8 matrices of 4096 × 4096 in the UNet"),
            "{text}"
        );
        assert!(
            text.contains("this machine has 20.0 GiB available"),
            "{text}"
        );
        assert!(
            text.contains("fused attention holds no score matrix"),
            "{text}"
        );
        assert!(
            text.contains("sliced attention needs about 128 MiB"),
            "{text}"
        );
        budget
            .check(&need_of(AttnProcessor::Fused), need_of)
            .expect("fused fits");
        budget
            .check(&need_of(AttnProcessor::Sliced { slice_size: 1 }), need_of)
            .expect("sliced fits");

        let gpu = MemoryBudget::Device {
            max_allocation: 4 * GIB,
        };
        let text = gpu
            .check(&need_of(AttnProcessor::Vanilla), need_of)
            .expect_err("a 16 GiB tensor is larger than a 4 GiB page")
            .to_string();
        assert!(
            text.contains("one score tensor of about 16.0 GiB"),
            "{text}"
        );
        assert!(text.contains("the 4.0 GiB the GPU's memory pool"), "{text}");
        assert!(
            MemoryBudget::Unchecked
                .check(&need_of(AttnProcessor::Vanilla), need_of)
                .is_ok()
        );
    }

    #[test]
    fn host_memory_is_read_from_meminfo_and_the_cgroup() {
        let meminfo = "MemTotal:       24000000 kB\nMemFree:         1000 kB\n\
                       MemAvailable:   20000000 kB\n";
        assert_eq!(meminfo_available(meminfo), Some(20_000_000 * 1024));
        assert_eq!(meminfo_available("MemTotal: 5 kB\n"), None);
        // `/proc/self/status` spells it with a tab; a longer key is not a match.
        let status = "VmHWMx:\t 1 kB\nVmHWM:\t  3072 kB\nVmRSS:\t 1024 kB\n";
        assert_eq!(proc_kib_field(status, "VmHWM"), Some(3072 * 1024));
        assert_eq!(proc_kib_field(status, "VmSwap"), None);
        assert_eq!(cgroup_headroom(Some("max\n"), Some("100\n")), None);
        assert_eq!(
            cgroup_headroom(Some("9223372036854771712\n"), Some("1")),
            None
        );
        assert_eq!(cgroup_headroom(Some("1000\n"), Some("300\n")), Some(700));
        assert_eq!(cgroup_headroom(Some("1000"), Some("3000")), Some(0));
        if cfg!(target_os = "linux") {
            let a = host_available_memory().expect("Linux says how much memory is available");
            assert!(a > 0);
        }
    }

    #[test]
    fn recording_keeps_the_calls_of_its_closure_only() {
        let shape = sd_level0(1);
        note_attention_call(shape);
        let ((), calls) = record_attention_calls(|| {
            note_attention_call(shape);
            let ((), inner) = record_attention_calls(|| note_attention_call(sd_level0(2)));
            assert_eq!(inner, vec![sd_level0(2)]);
            note_attention_call(shape);
        });
        assert_eq!(calls, vec![shape, shape]);
    }
}
