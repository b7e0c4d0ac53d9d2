//! The benchmark panel's state: the plan the user picks, the run's progress, and the table of
//! results as cells arrive. The engine runs the benchmark on its worker (queued like a job, so
//! it never shares the device with a generation); this module only turns events into state.

use std::path::Path;

use anyhow::{Context as _, Result};
use engine::backend::{BackendKind, Precision};
use engine::bench::{
    BenchCell, BenchColumn, BenchModels, BenchPipeline, BenchPlan, BenchReport, CellOutcome,
    CellSpec, default_precision,
};
use engine::pipelines::StepProgress;
use engine::worker::{EngineEvent, JobId};

/// The batch sizes of the seed's tables.
pub const BENCH_BATCHES: [usize; 3] = [1, 4, 16];
/// Square sizes offered (the seed's tables use 512).
pub const BENCH_SIZES: [usize; 4] = [256, 512, 768, 1024];

/// What the panel's controls hold.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchForm {
    pub pipelines: Vec<BenchPipeline>,
    pub batches: Vec<usize>,
    /// Square image side in pixels.
    pub size: usize,
    pub columns: Vec<BenchColumn>,
    /// `None`: the precision the app runs in (Burn fixes a device's float type for the whole
    /// process, so another one can only be measured with `brushfire bench --dtype`).
    pub precision: Option<Precision>,
    pub steps: usize,
    pub runs: usize,
}

impl Default for BenchForm {
    /// The seed's protocol, minus the pipelines this build cannot run yet.
    fn default() -> Self {
        let plan = BenchPlan::default();
        Self {
            pipelines: vec![BenchPipeline::SdTxt2Img],
            batches: plan.batches,
            size: 512,
            columns: plan.columns,
            precision: None,
            steps: plan.steps,
            runs: plan.runs,
        }
    }
}

impl BenchForm {
    /// Toggles `item` in `list`, keeping `order`'s order.
    pub fn toggle<T: Copy + PartialEq>(list: &mut Vec<T>, item: T, on: bool, order: &[T]) {
        list.retain(|x| *x != item);
        if on {
            list.push(item);
            list.sort_by_key(|x| order.iter().position(|o| o == x));
        }
    }

    /// The plan to run on a backend of `kind` while the app computes in `current` (checked by
    /// the engine before anything runs).
    pub fn plan(&self, kind: Option<BackendKind>, current: Option<Precision>) -> BenchPlan {
        let precision = self
            .precision
            .or(current)
            .unwrap_or_else(|| kind.map_or(Precision::F32, default_precision));
        BenchPlan {
            pipelines: self.pipelines.clone(),
            batches: self.batches.clone(),
            sizes: vec![(self.size, self.size)],
            columns: self.columns.clone(),
            precision,
            steps: self.steps,
            runs: self.runs,
        }
    }
}

/// The running benchmark.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchRun {
    pub job: JobId,
    pub plan: BenchPlan,
    /// The cell now running: `(index, total, spec)`.
    pub cell: Option<(usize, usize, CellSpec)>,
    /// The last step of that cell: `(run, progress)`.
    pub step: Option<(usize, StepProgress)>,
}

impl BenchRun {
    /// Fraction of the whole benchmark done, for the progress bar.
    pub fn fraction(&self) -> f32 {
        let Some((index, total, _)) = self.cell else {
            return 0.0;
        };
        let within = match self.step {
            Some((run, p)) if self.plan.runs > 0 && p.total > 0 => {
                (run as f32 + p.step as f32 / p.total as f32) / self.plan.runs as f32
            }
            _ => 0.0,
        };
        ((index as f32 + within) / total.max(1) as f32).clamp(0.0, 1.0)
    }
}

/// The benchmark panel.
#[derive(Debug, Clone, Default)]
pub struct BenchState {
    pub form: BenchForm,
    pub running: Option<BenchRun>,
    /// Cells of the current or last run, in plan order as they finish.
    pub cells: Vec<BenchCell>,
    /// The last complete run.
    pub report: Option<BenchReport>,
    /// The last thing the panel did (export written, run cancelled).
    pub status: Option<String>,
    /// Whose configs the random-weight models are built from (SD 1.5's shipped ones).
    pub models: Option<BenchModels>,
}

impl BenchState {
    /// Takes a benchmark event; returns it back when it is not about the running benchmark.
    pub fn apply_event(&mut self, event: EngineEvent) -> Option<EngineEvent> {
        let job = self.running.as_ref().map(|r| r.job);
        match event {
            EngineEvent::BenchCellStarted {
                job: j,
                index,
                total,
                spec,
            } if Some(j) == job => {
                if let Some(run) = &mut self.running {
                    run.cell = Some((index, total, spec));
                    run.step = None;
                }
            }
            EngineEvent::BenchStep {
                job: j,
                run,
                progress,
            } if Some(j) == job => {
                if let Some(r) = &mut self.running {
                    r.step = Some((run, progress));
                }
            }
            EngineEvent::BenchCellFinished { job: j, cell, .. } if Some(j) == job => {
                self.cells.push(cell);
            }
            EngineEvent::BenchFinished { job: j, report } if Some(j) == job => {
                self.running = None;
                self.cells.clone_from(&report.cells);
                self.status = Some(format!(
                    "benchmark done: {} cells on {}",
                    report.cells.len(),
                    report.backend
                ));
                self.report = Some(report);
            }
            EngineEvent::Cancelled { job: j } if Some(j) == job => {
                self.running = None;
                self.status = Some(format!(
                    "benchmark cancelled after {} of its cells",
                    self.cells.len()
                ));
            }
            EngineEvent::Failed {
                job: Some(j),
                error,
            } if Some(j) == job => {
                self.running = None;
                // The app shows the error; keep the cells that did finish.
                return Some(EngineEvent::Failed {
                    job: None,
                    error: format!("benchmark: {error}"),
                });
            }
            other => return Some(other),
        }
        None
    }

    /// Starts a run (the engine queues it behind any generation).
    pub fn started(&mut self, job: JobId, plan: BenchPlan) {
        self.cells.clear();
        self.status = None;
        self.running = Some(BenchRun {
            job,
            plan,
            cell: None,
            step: None,
        });
    }

    /// The models the benchmark builds (SD 1.5's shipped configs unless set).
    pub fn models(&self) -> BenchModels {
        self.models.clone().unwrap_or_else(BenchModels::sd15)
    }

    /// The table as markdown (the finished report, or the cells so far).
    pub fn markdown(&self) -> Option<String> {
        self.report.as_ref().map(BenchReport::to_markdown)
    }

    /// Writes the last report to `path`, as CSV when the name ends in `.csv`, JSON for
    /// `.json`, markdown otherwise.
    pub fn export(&mut self, path: &Path) -> Result<()> {
        let report = self
            .report
            .as_ref()
            .context("no finished benchmark to export yet")?;
        let text = match path.extension().and_then(|e| e.to_str()) {
            Some("csv") => report.to_csv(),
            Some("json") => report.to_json()?,
            _ => report.to_markdown(),
        };
        engine::tensor_io::write_atomic(path, text.as_bytes())
            .with_context(|| format!("could not write {}", path.display()))?;
        self.status = Some(format!("saved {}", path.display()));
        Ok(())
    }

    /// Rows of the results table: one per (pipeline, size, batch), one entry per column.
    pub fn table(&self) -> Vec<BenchRow<'_>> {
        let mut rows: Vec<BenchRow<'_>> = Vec::new();
        for cell in &self.cells {
            let s = &cell.spec;
            let key = (s.pipeline, s.width, s.height, s.batch);
            match rows.iter_mut().find(|r| r.key == key) {
                Some(row) => row.cells.push(cell),
                None => rows.push(BenchRow {
                    key,
                    cells: vec![cell],
                }),
            }
        }
        rows
    }

    /// The columns present in the results, in run order.
    pub fn columns(&self) -> Vec<BenchColumn> {
        let mut columns = Vec::new();
        for cell in &self.cells {
            if !columns.contains(&cell.spec.column) {
                columns.push(cell.spec.column);
            }
        }
        columns
    }
}

/// One row of the results table.
#[derive(Debug, Clone)]
pub struct BenchRow<'a> {
    /// `(pipeline, width, height, batch)`.
    pub key: (BenchPipeline, usize, usize, usize),
    pub cells: Vec<&'a BenchCell>,
}

impl BenchRow<'_> {
    /// The row's label, e.g. "sd-txt2img 512² ×4".
    pub fn label(&self) -> String {
        let (pipeline, w, h, batch) = self.key;
        if w == h {
            format!("{pipeline} {w}² ×{batch}")
        } else {
            format!("{pipeline} {w}×{h} ×{batch}")
        }
    }

    /// The cell of `column`, if it ran.
    pub fn cell(&self, column: BenchColumn) -> Option<&BenchCell> {
        self.cells.iter().copied().find(|c| c.spec.column == column)
    }
}

/// it/s of a measured cell.
pub fn it_per_sec(cell: &BenchCell) -> Option<f64> {
    match cell.outcome {
        CellOutcome::Measured { it_per_sec, .. } => Some(it_per_sec),
        CellOutcome::Failed { .. } => None,
    }
}
