//! Choosing where tensors live: CUDA when a device answers, else wgpu on a hardware adapter,
//! else Burn's CPU backend (flex). A software wgpu adapter (lavapipe) is used only when asked for.
//!
//! Code that runs models is generic over `B: Backend`; [`dispatch`] calls it with the concrete
//! backend type the selection made.

use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::str::FromStr;
use std::sync::OnceLock;

use burn::backend::flex::{Flex, FlexDevice};
use burn::backend::wgpu::{RuntimeOptions, WgpuDevice, graphics::AutoGraphicsApi, init_setup};
use burn::backend::{Cuda, Wgpu, cuda::CudaDevice};
use burn::tensor::backend::Backend;

use crate::error::{EngineError, Result};

/// What the user asked for (`--backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendRequest {
    /// CUDA, else a hardware wgpu adapter, else the CPU.
    #[default]
    Auto,
    Cuda,
    Wgpu,
    Cpu,
}

impl FromStr for BackendRequest {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "cuda" => Ok(Self::Cuda),
            "wgpu" => Ok(Self::Wgpu),
            "cpu" => Ok(Self::Cpu),
            other => Err(EngineError::invalid(
                "backend",
                format!("`{other}` is not one of auto, cuda, wgpu, cpu"),
            )),
        }
    }
}

/// The backend in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Cuda,
    Wgpu,
    Cpu,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Cuda => "cuda",
            Self::Wgpu => "wgpu",
            Self::Cpu => "cpu",
        })
    }
}

/// The outcome of backend selection, shown to the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectedBackend {
    pub kind: BackendKind,
    /// The adapter or device name (e.g. "NVIDIA H100", "llvmpipe (LLVM 15.0.6, 256 bits)").
    pub adapter: String,
    /// A software rasteriser pretending to be a GPU.
    pub software: bool,
}

impl fmt::Display for SelectedBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.kind, self.adapter)?;
        if self.software {
            f.write_str(", software adapter")?;
        }
        Ok(())
    }
}

/// Picks the backend for `request`; see the module docs for the order.
pub fn select_backend(request: BackendRequest) -> Result<SelectedBackend> {
    match request {
        BackendRequest::Cpu => Ok(cpu()),
        BackendRequest::Cuda => probe_cuda().ok_or_else(|| {
            EngineError::Backend(
                "no CUDA driver or device found (is the NVIDIA driver installed?)".into(),
            )
        }),
        BackendRequest::Wgpu => probe_wgpu().ok_or_else(|| {
            EngineError::Backend(
                "no wgpu adapter found (install Vulkan drivers, e.g. mesa-vulkan-drivers)".into(),
            )
        }),
        BackendRequest::Auto => {
            if let Some(cuda) = probe_cuda() {
                return Ok(cuda);
            }
            match probe_wgpu() {
                Some(w) if !w.software => Ok(w),
                Some(w) => {
                    tracing::info!(adapter = %w.adapter, "only a software wgpu adapter; using the CPU backend");
                    Ok(cpu())
                }
                None => Ok(cpu()),
            }
        }
    }
}

fn cpu() -> SelectedBackend {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    SelectedBackend {
        kind: BackendKind::Cpu,
        adapter: format!("Burn flex, {threads} threads"),
        software: false,
    }
}

/// CUDA is probed through the driver library before burn-cuda is touched: without a driver,
/// burn-cuda 0.21 panics in a device thread.
fn probe_cuda() -> Option<SelectedBackend> {
    static PROBE: OnceLock<Option<SelectedBackend>> = OnceLock::new();
    PROBE.get_or_init(probe_cuda_once).clone()
}

fn probe_cuda_once() -> Option<SelectedBackend> {
    // SAFETY: these only try to dlopen the driver and NVRTC libraries.
    let present = unsafe {
        cudarc::driver::sys::is_culib_present() && cudarc::nvrtc::sys::is_culib_present()
    };
    if !present {
        return None;
    }
    let name = catch_unwind(|| {
        let device = CudaDevice::default();
        // A tiny op proves the device answers.
        let t = burn::tensor::Tensor::<Cuda, 1>::ones([1], &device);
        let _ = t.into_data();
        <Cuda as Backend>::name(&device)
    })
    .ok()?;
    Some(SelectedBackend {
        kind: BackendKind::Cuda,
        adapter: name,
        software: false,
    })
}

/// The wgpu runtime of a device can be set up once per process (a second `init_setup` panics),
/// so the probe's answer is kept.
fn probe_wgpu() -> Option<SelectedBackend> {
    static PROBE: OnceLock<Option<SelectedBackend>> = OnceLock::new();
    PROBE.get_or_init(probe_wgpu_once).clone()
}

fn probe_wgpu_once() -> Option<SelectedBackend> {
    let setup = catch_unwind(AssertUnwindSafe(|| {
        init_setup::<AutoGraphicsApi>(&WgpuDevice::DefaultDevice, RuntimeOptions::default())
    }))
    .ok()?;
    let info = setup.adapter.get_info();
    Some(SelectedBackend {
        kind: BackendKind::Wgpu,
        adapter: format!("{} ({:?})", info.name, info.backend),
        software: info.device_type == wgpu::DeviceType::Cpu,
    })
}

/// Code generic over the backend, called by [`dispatch`] with the selected one.
pub trait BackendTask {
    type Output;
    /// Runs on backend `B` with its device.
    fn run<B: Backend>(self, device: B::Device) -> Self::Output;
}

/// Runs `task` on the selected backend.
pub fn dispatch<T: BackendTask>(selected: &SelectedBackend, task: T) -> T::Output {
    match selected.kind {
        BackendKind::Cuda => task.run::<Cuda>(CudaDevice::default()),
        BackendKind::Wgpu => task.run::<Wgpu>(WgpuDevice::DefaultDevice),
        BackendKind::Cpu => task.run::<Flex>(FlexDevice),
    }
}
