//! Choosing where tensors live: CUDA when a device answers, else wgpu on a hardware adapter,
//! else Burn's CPU backend (flex). A software wgpu adapter (lavapipe) is used only when asked for.
//!
//! Code that runs models is generic over `B: Backend`; [`crate::session`] calls it with the
//! concrete backend type the selection made, in one place.

use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::str::FromStr;
use std::sync::OnceLock;

use burn::backend::Wgpu;
use burn::backend::wgpu::{
    RuntimeOptions, WgpuDevice, WgpuRuntime, graphics::AutoGraphicsApi, init_setup,
};
#[cfg(feature = "cuda")]
use burn::backend::{Cuda, cuda::CudaDevice};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, FloatDType, IntDType, get_device_settings, set_default_dtypes};
use cubecl::Runtime;
#[cfg(feature = "cuda")]
use cubecl::cuda::CudaRuntime;

use crate::error::{EngineError, Result};
use crate::memory::MemoryBudget;

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

impl BackendRequest {
    /// Every choice, in the order the CLI and the settings panel list them.
    pub const ALL: [BackendRequest; 4] = [Self::Auto, Self::Cuda, Self::Wgpu, Self::Cpu];

    /// The `--backend` name (also what the app's session file stores).
    pub fn cli_name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Cuda => "cuda",
            Self::Wgpu => "wgpu",
            Self::Cpu => "cpu",
        }
    }

    /// The name the settings panel shows.
    pub fn label(self) -> &'static str {
        match self {
            Self::Auto => "Auto",
            Self::Cuda => "CUDA",
            Self::Wgpu => "wgpu",
            Self::Cpu => "CPU",
        }
    }
}

impl FromStr for BackendRequest {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|b| b.cli_name() == s)
            .ok_or_else(|| {
                EngineError::invalid(
                    "backend",
                    format!("`{s}` is not one of auto, cuda, wgpu, cpu"),
                )
            })
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

/// Brushfire's cache folder: `$XDG_CACHE_HOME/brushfire` (or `~/.cache/brushfire`).
pub fn cache_dir() -> Option<std::path::PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache")))?;
    Some(base.join("brushfire"))
}

/// Where compiled GPU kernels and autotune results are kept between runs:
/// [`cache_dir`]`/kernels`.
pub fn kernel_cache_dir() -> Option<std::path::PathBuf> {
    Some(cache_dir()?.join("kernels"))
}

/// Keeps compiled kernels (CUDA PTX) and autotune results on disk so only the first run on a
/// machine pays for compilation. Burn 0.21's CUDA backend compiles every kernel with NVRTC on one
/// thread (~0.4 s each on an H100 host) and autotunes ~20 variants per matmul shape, so without
/// the cache every launch of the app spends minutes compiling before its first step. Call before
/// any backend is used; a `cubecl.toml` or `CUBECL_*` variables still apply, and a cache location
/// they set wins. Does nothing if CubeCL's configuration was already read.
pub fn configure_kernel_cache() {
    use cubecl::config::cache::CacheConfig;
    use cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};
    let Some(dir) = kernel_cache_dir() else {
        return;
    };
    let storage = CubeClRuntimeConfig::storage();
    let mut state = storage.lock();
    if state.is_some() {
        return;
    }
    let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
    if config.compilation.cache.is_none() {
        config.compilation.cache = Some(CacheConfig::File(dir.clone()));
    }
    if matches!(config.autotune.cache, CacheConfig::Target) {
        config.autotune.cache = CacheConfig::File(dir);
    }
    *state = Some(std::sync::Arc::new(config));
}

/// Picks the backend for `request`; see the module docs for the order.
pub fn select_backend(request: BackendRequest) -> Result<SelectedBackend> {
    match request {
        BackendRequest::Cpu => Ok(cpu()),
        BackendRequest::Cuda => probe_cuda().ok_or_else(|| {
            EngineError::Backend(if CUDA_BUILT {
                "no CUDA driver or device found (is the NVIDIA driver installed?)".into()
            } else {
                "this build has no CUDA backend (it was built without the `cuda` feature)".into()
            })
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
#[cfg(feature = "cuda")]
fn probe_cuda() -> Option<SelectedBackend> {
    static PROBE: OnceLock<Option<SelectedBackend>> = OnceLock::new();
    PROBE.get_or_init(probe_cuda_once).clone()
}

/// A build without the `cuda` feature (`--no-default-features --features wgpu`) has no CUDA
/// backend: `auto` goes on to wgpu, `--backend cuda` says so.
#[cfg(not(feature = "cuda"))]
fn probe_cuda() -> Option<SelectedBackend> {
    None
}

/// Whether this build has the CUDA backend (the `cuda` cargo feature, on by default).
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

#[cfg(feature = "cuda")]
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
        // A round trip through the device proves it answers. Straight through CubeCL, not a
        // Burn tensor: the first Burn tensor on a device fixes its default float type for the
        // whole process, which is the precision switch's to choose (`claim_precision`).
        let client = CudaRuntime::client(&device);
        let handle = client.create_from_slice(&[1, 2, 3, 4]);
        client.read_one(handle).ok()?;
        Some(<Cuda as Backend>::name(&device))
    })
    .ok()
    .flatten()?;
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

/// The float type models compute in (`--dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum Precision {
    #[default]
    F32,
    /// Half precision on GPU backends; GroupNorm statistics and softmax upcasts stay f32.
    F16,
}

impl Precision {
    /// The weights variant to prefer on this precision: `fp16` files in f16 (diffusers'
    /// `variant="fp16"` beside `torch_dtype=torch.float16`; half the download), the default
    /// weights otherwise. A model without the variant loads its default weights.
    pub fn weights_variant(self) -> Option<&'static str> {
        match self {
            Self::F32 => None,
            Self::F16 => Some("fp16"),
        }
    }
}

impl FromStr for Precision {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" | "fp32" | "float32" => Ok(Self::F32),
            "f16" | "fp16" | "float16" => Ok(Self::F16),
            other => Err(EngineError::invalid(
                "dtype",
                format!("`{other}` is not one of f32, f16"),
            )),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
        })
    }
}

/// How the selected backend runs the models: Burn's fusion (the "compile" switch) and the
/// float type. Each combination is its own Burn backend type, so switching rebuilds models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ExecutionOptions {
    /// Burn's fusion backend (kernel fusion + autotune) on GPU backends.
    pub fusion: bool,
    pub precision: Precision,
}

impl Default for ExecutionOptions {
    fn default() -> Self {
        Self {
            fusion: true,
            precision: Precision::F32,
        }
    }
}

impl ExecutionOptions {
    /// Whether `selected` can run these options; the error says why not.
    pub fn check(&self, selected: &SelectedBackend) -> Result<()> {
        match (selected.kind, self.precision) {
            (BackendKind::Cpu, Precision::F16) => Err(EngineError::Unsupported(
                "f16 runs on GPU backends only (CUDA, wgpu); the CPU backend computes in f32"
                    .into(),
            )),
            (BackendKind::Wgpu, Precision::F16)
                if !<Wgpu as Backend>::supports_dtype(&WgpuDevice::DefaultDevice, DType::F16) =>
            {
                Err(EngineError::Unsupported(format!(
                    "f16 is not supported by the wgpu adapter {}",
                    selected.adapter
                )))
            }
            _ => claim_precision(selected.kind, self.precision),
        }
    }

    /// Whether the fusion switch changes anything on `kind` (the CPU backend has no fusion).
    pub fn fusion_applies(kind: BackendKind) -> bool {
        kind != BackendKind::Cpu
    }
}

/// Makes `precision` the device's float type, or says why it cannot be.
///
/// Burn 0.21 keeps one default float type per device for the whole process, shared by every
/// backend type on that device, and fixed by the first tensor created there. Params,
/// `from_data` and `zeros` all follow it. That is how f16 runs: on the f32 backend types
/// (`session::run_on_backend`), with the device's float type claimed here, so no pipeline is
/// compiled a second time for an f16 type parameter. Without the claim a second precision in
/// one process would silently compute in the first one.
fn claim_precision(kind: BackendKind, precision: Precision) -> Result<()> {
    let dtype = match precision {
        Precision::F32 => FloatDType::F32,
        Precision::F16 => FloatDType::F16,
    };
    match kind {
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => claim_float_dtype::<Cuda>(&CudaDevice::default(), dtype),
        BackendKind::Wgpu => claim_float_dtype::<Wgpu>(&WgpuDevice::DefaultDevice, dtype),
        // flex computes in f32 only (f16 is refused before this); a build without CUDA never
        // selects it.
        _ => Ok(()),
    }
}

fn claim_float_dtype<B: Backend>(device: &B::Device, dtype: FloatDType) -> Result<()> {
    match set_default_dtypes::<B>(device, dtype, IntDType::I32) {
        Ok(()) => Ok(()),
        Err(_) => {
            let current = get_device_settings::<B>(device).float_dtype;
            if current == dtype {
                Ok(())
            } else {
                let name = |d: FloatDType| match d {
                    FloatDType::F32 => "f32".to_string(),
                    FloatDType::F16 => "f16".to_string(),
                    other => format!("{other:?}"),
                };
                Err(EngineError::PrecisionLocked {
                    current: name(current),
                    wanted: name(dtype),
                })
            }
        }
    }
}

/// Bytes held by the device's memory pool (GPU backends only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeviceMemory {
    /// Bytes in live tensors.
    pub bytes_in_use: u64,
    /// Bytes the pool holds from the device (what the process occupies).
    pub bytes_reserved: u64,
}

/// The memory pool of the selected device; `None` on the CPU backend.
pub fn device_memory(selected: &SelectedBackend) -> Option<DeviceMemory> {
    let usage = match selected.kind {
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => CudaRuntime::client(&CudaDevice::default()).memory_usage(),
        BackendKind::Wgpu => WgpuRuntime::client(&WgpuDevice::DefaultDevice).memory_usage(),
        _ => return None,
    }
    .ok()?;
    Some(DeviceMemory {
        bytes_in_use: usage.bytes_in_use,
        bytes_reserved: usage.bytes_reserved,
    })
}

/// What requests on the selected backend are checked against before any tensor work
/// ([`crate::memory`]): the host's available memory on the CPU backend, the largest allocation
/// of the device's memory pool on a GPU.
pub fn memory_budget(selected: &SelectedBackend) -> MemoryBudget {
    let max_allocation = match selected.kind {
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => {
            CudaRuntime::client(&CudaDevice::default())
                .properties()
                .memory
                .max_page_size
        }
        BackendKind::Wgpu => {
            WgpuRuntime::client(&WgpuDevice::DefaultDevice)
                .properties()
                .memory
                .max_page_size
        }
        _ => return MemoryBudget::Host,
    };
    MemoryBudget::Device { max_allocation }
}

/// Starts a new peak of the process's resident memory (Linux: resets `VmHWM` through
/// `/proc/self/clear_refs`). The CPU backend's "device memory" is the process's; the benchmark
/// reads this per cell. Returns whether the reset worked.
pub fn reset_peak_process_memory() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The process's peak resident memory in bytes since the last reset (Linux `VmHWM`).
pub fn peak_process_memory() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    crate::memory::proc_kib_field(&status, "VmHWM")
}

/// Returns unused pool memory to the device (between benchmark cells, after unloading).
pub fn release_device_memory(selected: &SelectedBackend) {
    match selected.kind {
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => <Cuda as Backend>::memory_cleanup(&CudaDevice::default()),
        BackendKind::Wgpu => <Wgpu as Backend>::memory_cleanup(&WgpuDevice::DefaultDevice),
        _ => {}
    }
}
