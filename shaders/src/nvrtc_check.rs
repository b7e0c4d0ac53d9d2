//! The flash kernel's CUDA C++ through NVRTC, on a machine without a GPU.
//!
//! `cubecl-cuda` turns a kernel into CUDA C++ and compiles it with NVRTC when it is first
//! launched. Our parity tests run the kernel on wgpu (lavapipe) only, so a construct that CubeCL's
//! C++ backend or NVRTC rejects would surface on the first CUDA launch, in the app's default GPU
//! path (f32, fused attention). This test generates the C++ that `cubecl-cuda` would generate for
//! every tiling our models use, in every float type, and compiles it to SASS for the cards we
//! target, with the options `cubecl-cuda` passes. ptxas' report then checks two things that
//! decide the kernel's speed: no register spills, and the shared memory the launch check
//! accounts for is what the compiler allocated.
//!
//! NVRTC needs no GPU (`pip install nvidia-cuda-nvrtc` gives `libnvrtc.so.13`). The test reads
//! the library's path from `BRUSHFIRE_NVRTC`; CI sets it. Without it the test says so and checks
//! nothing, like the wgpu tests without an adapter. With `BRUSHFIRE_NVRTC_DUMP=DIR` it also
//! writes each variant's C++ and cubin there (`nvdisasm -c` shows the SASS).

use std::ffi::{CStr, CString, c_char, c_int, c_void};

use burn::tensor::DType;
use cubecl::cuda::CudaCompiler;
use cubecl::prelude::*;
use cubecl::wgpu::{WgpuDevice, WgpuRuntime};
use cubecl::{Compiler, ExecutionMode};

use crate::attention::kernel::flash_attention_kernel::FlashAttentionKernel;
use crate::attention::{Tiling, UNITS_X, UNITS_Y};

/// The NVRTC entry points the test calls, loaded from the library's path.
struct Nvrtc {
    lib: libloading::Library,
}

type Program = *mut c_void;

/// What one compilation produced.
struct Compiled {
    log: String,
    cubin: Vec<u8>,
}

impl Nvrtc {
    fn open(path: &str) -> Self {
        // SAFETY: loading NVRTC runs no initialiser with preconditions.
        let lib = unsafe { libloading::Library::new(path) }
            .unwrap_or_else(|e| panic!("BRUSHFIRE_NVRTC={path} could not be loaded: {e}"));
        Self { lib }
    }

    fn version(&self) -> (c_int, c_int) {
        let (mut major, mut minor) = (0, 0);
        // SAFETY: nvrtcVersion(int*, int*) writes two ints.
        let status = unsafe {
            let f = self
                .lib
                .get::<unsafe extern "C" fn(*mut c_int, *mut c_int) -> c_int>(b"nvrtcVersion")
                .expect("nvrtcVersion");
            f(&mut major, &mut minor)
        };
        assert_eq!(status, 0, "nvrtcVersion failed");
        (major, minor)
    }

    /// Compiles `source` with `options`; `Err` holds NVRTC's log.
    fn compile(&self, source: &str, options: &[String]) -> Result<Compiled, String> {
        type Create = unsafe extern "C" fn(
            *mut Program,
            *const c_char,
            *const c_char,
            c_int,
            *const *const c_char,
            *const *const c_char,
        ) -> c_int;
        type CompileFn = unsafe extern "C" fn(Program, c_int, *const *const c_char) -> c_int;
        type Size = unsafe extern "C" fn(Program, *mut usize) -> c_int;
        type Log = unsafe extern "C" fn(Program, *mut c_char) -> c_int;
        type Destroy = unsafe extern "C" fn(*mut Program) -> c_int;

        let source = CString::new(source).expect("no NUL in the source");
        let options: Vec<CString> = options
            .iter()
            .map(|o| CString::new(o.as_str()).expect("no NUL in an option"))
            .collect();
        let option_ptrs: Vec<*const c_char> = options.iter().map(|o| o.as_ptr()).collect();
        // SAFETY: the signatures are NVRTC's (nvrtc.h); every pointer passed outlives the call,
        // the log buffer has the size NVRTC reported, and the program is destroyed once.
        unsafe {
            let create = self
                .lib
                .get::<Create>(b"nvrtcCreateProgram")
                .expect("create");
            let compile = self
                .lib
                .get::<CompileFn>(b"nvrtcCompileProgram")
                .expect("compile");
            let log_size = self
                .lib
                .get::<Size>(b"nvrtcGetProgramLogSize")
                .expect("log size");
            let get_log = self.lib.get::<Log>(b"nvrtcGetProgramLog").expect("log");
            let cubin_size = self
                .lib
                .get::<Size>(b"nvrtcGetCUBINSize")
                .expect("cubin size");
            let get_cubin = self.lib.get::<Log>(b"nvrtcGetCUBIN").expect("cubin");
            let destroy = self
                .lib
                .get::<Destroy>(b"nvrtcDestroyProgram")
                .expect("destroy");

            let mut program: Program = std::ptr::null_mut();
            let status = create(
                &mut program,
                source.as_ptr(),
                c"flash_attention.cu".as_ptr(),
                0,
                std::ptr::null(),
                std::ptr::null(),
            );
            assert_eq!(status, 0, "nvrtcCreateProgram failed");
            let compiled = compile(program, option_ptrs.len() as c_int, option_ptrs.as_ptr());
            let mut size = 0usize;
            assert_eq!(log_size(program, &mut size), 0);
            let mut buffer = vec![0 as c_char; size.max(1)];
            assert_eq!(get_log(program, buffer.as_mut_ptr()), 0);
            let log = CStr::from_ptr(buffer.as_ptr())
                .to_string_lossy()
                .into_owned();
            let mut cubin = Vec::new();
            if compiled == 0 {
                let mut size = 0usize;
                assert_eq!(cubin_size(program, &mut size), 0);
                cubin = vec![0u8; size];
                assert_eq!(get_cubin(program, cubin.as_mut_ptr().cast()), 0);
            }
            destroy(&mut program);
            if compiled == 0 {
                Ok(Compiled { log, cubin })
            } else {
                Err(log)
            }
        }
    }
}

/// The CUDA C++ `cubecl-cuda` generates for the flash kernel with this tiling and float type
/// (with the options it sets on a Hopper card; older cards differ only in cluster features this
/// kernel does not use), and the bytes of shared memory it declares.
///
/// The kernel's IR is expanded against a wgpu client (CubeCL expands a kernel against some
/// runtime's client; this one needs no CUDA device) and lowered by `cubecl-cuda`'s compiler.
fn cuda_source(
    client: &ComputeClient<WgpuRuntime>,
    dtype: DType,
    dv: usize,
    tiling: Tiling,
) -> (String, usize) {
    let settings = KernelSettings::default()
        .cube_dim(CubeDim::new_2d(UNITS_X as u32, UNITS_Y as u32))
        .address_type(AddressType::U32);
    let tensor = || TensorCompilationArg { inplace: None };
    let kernel = FlashAttentionKernel::<WgpuRuntime>::new(
        settings,
        client.clone(),
        tensor(),
        tensor(),
        tensor(),
        tensor(),
        (), // the f32 scale: a runtime scalar, nothing to compile
        dv,
        tiling.depth_chunk,
        tiling.value_rows,
        tiling.single_chunk,
        dtype.into(),
    );
    let mut options = <CudaCompiler as Compiler>::CompilationOptions::default();
    // What cubecl-cuda's runtime sets on a Hopper card (cubecl-cuda 0.10, runtime.rs).
    options.supports_features.fast_math = true;
    options.supports_features.grid_constants = true;
    options.supports_features.fast_tanh = true;
    options.supports_features.clusters = true;
    options.supports_features.elect_sync = true;
    let compiled = CudaCompiler::default()
        .compile(
            kernel.define(),
            &options,
            ExecutionMode::Unchecked,
            AddressType::U32.unsigned_type(),
        )
        .expect("cubecl-cuda lowers the kernel");
    let shared = compiled.shared_memory_size();
    (compiled.to_string(), shared)
}

/// `(registers, spill store bytes, spill load bytes)` per unit from ptxas' `-v` report.
fn ptxas_report(log: &str) -> (usize, usize, usize) {
    let number_before = |line: &str, unit: &str| -> Option<usize> {
        let end = line.find(unit)?;
        line[..end].split_whitespace().last()?.parse().ok()
    };
    let mut report = (usize::MAX, usize::MAX, usize::MAX);
    for line in log.lines() {
        if let Some(n) = number_before(line, " registers") {
            report.0 = n;
        }
        if let Some(n) = number_before(line, " bytes spill stores") {
            report.1 = n;
        }
        if let Some(n) = number_before(line, " bytes spill loads") {
            report.2 = n;
        }
    }
    report
}

#[test]
fn flash_kernel_compiles_for_cuda_without_spills() {
    let Some(path) = std::env::var_os("BRUSHFIRE_NVRTC") else {
        eprintln!("SKIPPED: BRUSHFIRE_NVRTC (the path of libnvrtc.so) is not set");
        return;
    };
    let nvrtc = Nvrtc::open(&path.to_string_lossy());
    // The CUDA headers the generated C++ includes (`cuda_runtime.h`, `cuda_fp16.h`, ...), beside
    // the library as in a toolkit (`lib64/../include`) or the pip wheels (`nvidia/cu13/lib/../include`);
    // cubecl-cuda passes `$CUDA_PATH/include` the same way.
    let include = std::path::Path::new(&path)
        .parent()
        .and_then(std::path::Path::parent)
        .map(|root| root.join("include"))
        .filter(|dir| dir.join("cuda_runtime.h").exists())
        .unwrap_or_else(|| {
            panic!("no include/cuda_runtime.h beside {path:?} (pip install nvidia-cuda-runtime)")
        });
    let (major, minor) = nvrtc.version();
    eprintln!("NVRTC {major}.{minor}");
    let client = WgpuRuntime::client(&WgpuDevice::DefaultDevice);
    let dump = std::env::var_os("BRUSHFIRE_NVRTC_DUMP").map(std::path::PathBuf::from);
    if let Some(dir) = &dump {
        std::fs::create_dir_all(dir).unwrap();
    }

    // Head sizes of our models: SD 1.5's 40/80/160, IF's and the x4 upscaler's 64, the VAEs'
    // single 512-wide head; and an odd one, which must compile but may spill (ptxas keeps it
    // to 64 registers and spills a few bytes outside the loops on sm_90a).
    let model_heads = [40, 80, 160, 64, 512];
    let problems = [
        (40, 40),
        (80, 80),
        (160, 160),
        (64, 64),
        (512, 512),
        (24, 8),
    ];
    // sm_90a: what cubecl-cuda asks for on an H100/H200; sm_80: an A100; sm_86/89: RTX 30/40.
    let archs = ["sm_90a", "sm_89", "sm_80"];
    let mut failures = Vec::new();
    for (depth, dv) in problems {
        let tiling = Tiling::for_dims(depth, dv);
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let (source, shared) = cuda_source(&client, dtype, dv, tiling);
            assert_eq!(
                shared,
                tiling.shared_memory_bytes(dv),
                "shared memory of the generated kernel ({dtype:?}, {depth}/{dv}) against the launch check's count"
            );
            for arch in archs {
                let options = [
                    format!("--gpu-architecture={arch}"),
                    format!("--include-path={}", include.display()),
                    "-lineinfo".to_string(),
                    "--ptxas-options=-v".to_string(),
                ];
                match nvrtc.compile(&source, &options) {
                    Ok(compiled) => {
                        let (registers, spill_stores, spill_loads) = ptxas_report(&compiled.log);
                        // Cubes one SM holds as far as registers allow (64 K registers per SM
                        // on every card above) and as far as shared memory does (the opt-in
                        // 227 KiB of sm_90, 163 KiB of sm_80, 99 KiB of sm_86/89).
                        let sm_shared = match arch {
                            "sm_90a" => 227 * 1024,
                            "sm_80" => 163 * 1024,
                            _ => 99 * 1024,
                        };
                        let by_registers = 65536 / (registers.max(1) * UNITS_X * UNITS_Y);
                        eprintln!(
                            "{arch} {dtype:?} d={depth} dv={dv} {tiling:?}: {registers} registers, \
                             {shared} B shared, cubes/SM {by_registers} (registers) {} (shared), \
                             spills {spill_stores}/{spill_loads} B, cubin {} B",
                            sm_shared / shared,
                            compiled.cubin.len()
                        );
                        assert!(!compiled.cubin.is_empty(), "{arch} {dtype:?}: empty cubin");
                        if let Some(dir) = &dump {
                            let name = format!("{arch}-{dtype:?}-{depth}-{dv}");
                            std::fs::write(dir.join(format!("{name}.cu")), &source).unwrap();
                            std::fs::write(dir.join(format!("{name}.cubin")), &compiled.cubin)
                                .unwrap();
                        }
                        assert!(
                            registers <= 255,
                            "{arch} {dtype:?} {depth}/{dv}: no register count in\n{}",
                            compiled.log
                        );
                        assert!(
                            !model_heads.contains(&depth) || (spill_stores, spill_loads) == (0, 0),
                            "{arch} {dtype:?} {depth}/{dv} spills registers:\n{}",
                            compiled.log
                        );
                    }
                    Err(log) => failures.push(format!("{arch} {dtype:?} {depth}/{dv}:\n{log}")),
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "NVRTC rejected the kernel:\n{}",
        failures.join("\n\n")
    );
}
