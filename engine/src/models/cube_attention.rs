//! The fused attention processor on Burn's CubeCL backends (CUDA, wgpu): a flash kernel, forced
//! rather than left to autotune.
//!
//! Burn 0.21's `attention` op autotunes between CubeCL's flash kernels and a materialised
//! fallback (and goes straight to the fallback when given an explicit scale, and in f32): the
//! fastest on a given shape wins, which at SD sizes can be the one that materialises
//! `[heads, hw, hw]` scores — the very thing diffusers' SDPA processor exists to avoid
//! (docs/architecture.md §1). Here a flash kernel is called directly:
//! - f16/bf16 at the default scale `1/√d`: CubeCL's tensor-core flash kernel where the device has
//!   tensor cores, else its unit variant (f32 accumulation in both);
//! - everything else (f32, any other scale, or a problem CubeCL's kernels decline): our own
//!   kernel, [`shaders::flash_attention`], f32 accumulation, exact to rounding in f32.
//!
//! `BRUSHFIRE_FLASH_KERNEL=brushfire` sends f16/bf16 to our kernel too (to compare the two on a
//! GPU); `burn` is the default. Only when no kernel accepts the problem are the scores
//! materialised, with a warning.
//!
//! Unfused backends (`CubeBackend`) run it on the spot; under fusion it is registered as a custom
//! operation in the fusion stream, so the ops around it keep their order and fusion.

use std::any::Any;
use std::marker::PhantomData;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use burn::backend::wgpu::WgpuRuntime;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::ops::attention::attention_fallback;
use burn::tensor::{DType, Tensor, TensorPrimitive, backend::Backend};
use burn_cubecl::fusion::FusionCubeRuntime;
use burn_cubecl::kernel::attention::{AttentionStrategy, attention as cube_attention};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeBackend, CubeRuntime};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr, TensorStatus};
#[cfg(feature = "cuda")]
use cubecl::cuda::CudaRuntime;
use cubek::attention::routines::blackbox_accelerated::BlackboxAcceleratedStrategy;

/// Planes per cube for the tensor-core variant (one of the sizes Burn's autotune tries).
const ACCELERATED_PLANES: u8 = 4;

/// Calls CubeCL's flash kernels ran, calls our kernel ran, and calls that no kernel accepted
/// (materialised instead), for diagnostics and tests.
static FLASH: AtomicUsize = AtomicUsize::new(0);
static OWN: AtomicUsize = AtomicUsize::new(0);
static MATERIALISED: AtomicUsize = AtomicUsize::new(0);

/// How many forced calls ran one of CubeCL's flash kernels in this process (counted when the
/// kernel is launched, which under fusion is when the stream executes).
pub fn flash_calls() -> usize {
    FLASH.load(Ordering::Relaxed)
}

/// How many forced calls ran our own kernel ([`shaders::flash_attention`]) in this process.
pub fn own_kernel_calls() -> usize {
    OWN.load(Ordering::Relaxed)
}

/// How many forced calls fell back to materialised scores in this process.
pub fn materialised_fallbacks() -> usize {
    MATERIALISED.load(Ordering::Relaxed)
}

/// Which kernel takes f16/bf16 attention at the default scale (`BRUSHFIRE_FLASH_KERNEL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HalfPrecisionKernel {
    /// CubeCL's flash kernels (tensor cores where present): the default.
    Cubecl,
    /// Ours, [`shaders::flash_attention`] (CUDA cores, f32 accumulation).
    Brushfire,
}

/// The kernel chosen for f16/bf16 at the default scale: `BRUSHFIRE_FLASH_KERNEL=brushfire`
/// picks ours, anything else (or nothing) CubeCL's. Read once per process.
pub fn half_precision_kernel() -> HalfPrecisionKernel {
    static CHOICE: OnceLock<HalfPrecisionKernel> = OnceLock::new();
    *CHOICE.get_or_init(
        || match std::env::var("BRUSHFIRE_FLASH_KERNEL").ok().as_deref() {
            Some("brushfire") => HalfPrecisionKernel::Brushfire,
            Some("burn" | "cubecl") | None => HalfPrecisionKernel::Cubecl,
            Some(other) => {
                tracing::warn!(
                    value = other,
                    "BRUSHFIRE_FLASH_KERNEL is `burn` or `brushfire`; using CubeCL's kernels"
                );
                HalfPrecisionKernel::Cubecl
            }
        },
    )
}

/// `softmax(q kᵀ · scale) v` through a flash kernel when `B` is one of Burn's CubeCL backends
/// (fused or not) on CUDA or wgpu; `None` otherwise (the caller runs Burn's op).
///
/// # Shapes
/// - q `[n, heads, lq, d]`, k `[n, heads, lk, d]`, v `[n, heads, lk, dv]` → `[n, heads, lq, dv]`
pub fn forced_flash_attention<B: Backend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    scale: f64,
) -> Option<Tensor<B, 4>> {
    let [q, k, v] = [q, k, v].map(|t| primitive::<B>(t.clone()));
    #[cfg(feature = "cuda")]
    let on_cuda = fused::<B, CudaRuntime>(&q, &k, &v, scale)
        .or_else(|| unfused::<B, CudaRuntime>(&q, &k, &v, scale));
    #[cfg(not(feature = "cuda"))]
    let on_cuda = None;
    let out = on_cuda
        .or_else(|| fused::<B, WgpuRuntime>(&q, &k, &v, scale))
        .or_else(|| unfused::<B, WgpuRuntime>(&q, &k, &v, scale))?;
    Some(Tensor::from_primitive(TensorPrimitive::Float(out)))
}

fn primitive<B: Backend>(t: Tensor<B, 4>) -> Option<B::FloatTensorPrimitive> {
    match t.into_primitive() {
        TensorPrimitive::Float(p) => Some(p),
        TensorPrimitive::QFloat(_) => None,
    }
}

/// `value` as a `T` if that is its type.
fn cast<T: 'static, U: 'static>(value: U) -> Option<T> {
    let any: Box<dyn Any> = Box::new(value);
    any.downcast::<T>().ok().map(|b| *b)
}

/// The unfused CubeCL backend on runtime `R`: the kernel runs now.
fn unfused<B: Backend, R: CubeRuntime>(
    q: &Option<B::FloatTensorPrimitive>,
    k: &Option<B::FloatTensorPrimitive>,
    v: &Option<B::FloatTensorPrimitive>,
    scale: f64,
) -> Option<B::FloatTensorPrimitive> {
    let [q, k, v] = [q, k, v].map(|t| t.clone().and_then(cast::<CubeTensor<R>, _>));
    let out = flash_or_fallback(q?, k?, v?, scale);
    cast(out)
}

/// The fusion backend over CubeCL on runtime `R`: a custom operation in the stream.
fn fused<B: Backend, R: CubeRuntime>(
    q: &Option<B::FloatTensorPrimitive>,
    k: &Option<B::FloatTensorPrimitive>,
    v: &Option<B::FloatTensorPrimitive>,
    scale: f64,
) -> Option<B::FloatTensorPrimitive> {
    type Fused<R> = FusionTensor<FusionCubeRuntime<R>>;
    let [q, k, v] = [q, k, v].map(|t| t.clone().and_then(cast::<Fused<R>, _>));
    let (q, k, v) = (q?, k?, v?);
    let [n, heads, lq, _] = dims(&q.shape)?;
    let [_, _, _, dv] = dims(&v.shape)?;
    let client = q.client.clone();
    let streams = OperationStreams::with_inputs([&q, &k, &v]);
    let out = TensorIr {
        id: client.create_empty_handle(),
        shape: [n, heads, lq, dv].into(),
        status: TensorStatus::NotInit,
        dtype: q.dtype,
    };
    let desc = CustomOpIr::new(
        "brushfire_flash_attention",
        &[q.into_ir(), k.into_ir(), v.into_ir()],
        &[out],
    );
    let op = FlashOp::<R> {
        desc: desc.clone(),
        scale,
        _runtime: PhantomData,
    };
    let out = client
        .register(streams, OperationIr::Custom(desc), op)
        .into_iter()
        .next()?;
    cast(out)
}

fn dims(shape: &burn::tensor::Shape) -> Option<[usize; 4]> {
    shape.to_vec().try_into().ok()
}

/// The fusion stream's record of one forced flash attention.
#[derive(Debug)]
struct FlashOp<R> {
    desc: CustomOpIr,
    scale: f64,
    _runtime: PhantomData<R>,
}

/// Reads and registers handles; the float type parameter does not matter for that.
type Handles<R> = CubeBackend<R, f32, i32, u8>;

impl<R: CubeRuntime> Operation<FusionCubeRuntime<R>> for FlashOp<R> {
    fn execute(
        &self,
        handles: &mut HandleContainer<<FusionCubeRuntime<R> as FusionRuntime>::FusionHandle>,
    ) {
        let ([q, k, v], [out]) = self.desc.as_fixed::<3, 1>();
        let q = handles.get_float_tensor::<Handles<R>>(q);
        let k = handles.get_float_tensor::<Handles<R>>(k);
        let v = handles.get_float_tensor::<Handles<R>>(v);
        let result = flash_or_fallback(q, k, v, self.scale);
        handles.register_float_tensor::<Handles<R>>(&out.id, result);
    }
}

/// Non-causal, no softcap; `None` lets the kernel use 1/√d.
fn options(scale: Option<f64>) -> AttentionModuleOptions {
    AttentionModuleOptions {
        scale,
        softcap: None,
        is_causal: false,
    }
}

/// CubeCL's flash kernels for f16/bf16 at the default scale (unless our kernel is chosen),
/// else ours, else — only for problems neither takes — the materialised maths.
fn flash_or_fallback<R: CubeRuntime>(
    q: CubeTensor<R>,
    k: CubeTensor<R>,
    v: CubeTensor<R>,
    scale: f64,
) -> CubeTensor<R> {
    let depth = q.meta.shape().to_vec().last().copied().unwrap_or(1);
    let default_scale = 1.0 / (depth as f64).sqrt();
    let cubecl_eligible = q.dtype != DType::F32
        && (scale - default_scale).abs() <= 1e-9 * default_scale
        && half_precision_kernel() == HalfPrecisionKernel::Cubecl;
    if cubecl_eligible && let Some(out) = cubecl_flash(&q, &k, &v) {
        FLASH.fetch_add(1, Ordering::Relaxed);
        return out;
    }
    match shaders::flash_attention(q.clone(), k.clone(), v.clone(), scale as f32) {
        Ok(out) => {
            OWN.fetch_add(1, Ordering::Relaxed);
            out
        }
        Err(e) => {
            MATERIALISED.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %e, "no flash attention kernel takes this problem; materialising the scores");
            attention_fallback::<Handles<R>>(q, k, v, None, None, options(Some(scale)))
        }
    }
}

/// CubeCL's tensor-core flash kernel, else its unit one; `None` when both decline.
fn cubecl_flash<R: CubeRuntime>(
    q: &CubeTensor<R>,
    k: &CubeTensor<R>,
    v: &CubeTensor<R>,
) -> Option<CubeTensor<R>> {
    // CubeCL's flash kernels (cubek 0.2) read their inputs as if contiguous, whatever the
    // strides: a heads-split view of q came out wrong by ~1 on lavapipe. Copy views first.
    let [q, k, v] = [q, k, v].map(|t| into_contiguous(t.clone()));
    let accelerated = AttentionStrategy::FlashBlackboxAccelerated(BlackboxAcceleratedStrategy {
        num_planes: ACCELERATED_PLANES,
        seq_q: 1,
        seq_kv: 1,
    });
    for strategy in [accelerated, AttentionStrategy::FlashUnit] {
        let name = format!("{strategy:?}");
        match cube_attention(
            q.clone(),
            k.clone(),
            v.clone(),
            None,
            None,
            // CubeCL's kernels compute 1/√d themselves: the caller only comes here at that scale.
            options(None),
            strategy,
        ) {
            Ok(out) => return Some(out),
            Err(e) => tracing::debug!(strategy = %name, error = ?e, "flash attention declined"),
        }
    }
    None
}
