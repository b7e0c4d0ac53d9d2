// libnvrtc.so shim for CubeCL/cudarc (cudarc dlopens "libnvrtc.so" first, then resolves
// symbols lazily by name). Forwards to the real NVRTC and
//   * appends "-pch" (NVRTC >= 12.8 automatic precompiled headers) unless NVRTC_SHIM_PCH=0
//   * if NVRTC_SHIM_CUBIN=1, hands back the CUBIN NVRTC already built (CubeCL passes
//     --gpu-architecture=sm_90a, a real arch) through nvrtcGetPTXSize/nvrtcGetPTX, so
//     cuModuleLoadData loads SASS directly instead of JIT-compiling the PTX again.
// Real library: $NVRTC_SHIM_REAL, else "libnvrtc.so.13".
// Build: gcc -O2 -shared -fPIC -o libnvrtc.so nvrtc_shim.c -ldl
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stddef.h>
typedef int R; typedef void *P;
static void *real;
static void *sym(const char *n) {
  if (!real) {
    const char *p = getenv("NVRTC_SHIM_REAL");
    real = dlopen(p && *p ? p : "libnvrtc.so.13", RTLD_NOW | RTLD_LOCAL);
    if (!real) { fprintf(stderr, "nvrtc shim: %s\n", dlerror()); abort(); }
  }
  void *f = dlsym(real, n);
  if (!f) { fprintf(stderr, "nvrtc shim: missing %s\n", n); abort(); }
  return f;
}
#define FWD(ret, name, params, args) \
  ret name params { static ret (*f) params; if (!f) f = sym(#name); return f args; }
static int env_on(const char *n, int dflt) { const char *v = getenv(n); return v ? strcmp(v, "0") != 0 : dflt; }
static int want_cubin(P prog, size_t *n) {
  static R (*cs)(P, size_t *);
  if (!env_on("NVRTC_SHIM_CUBIN", 0)) return 0;
  if (!cs) cs = sym("nvrtcGetCUBINSize");
  return cs(prog, n) == 0 && *n > 0;
}
FWD(const char *, nvrtcGetErrorString, (R r), (r))
FWD(R, nvrtcVersion, (int *a, int *b), (a, b))
FWD(R, nvrtcGetNumSupportedArchs, (int *n), (n))
FWD(R, nvrtcGetSupportedArchs, (int *a), (a))
FWD(R, nvrtcCreateProgram, (P *p, const char *s, const char *n, int k, const char *const *h, const char *const *hn), (p, s, n, k, h, hn))
FWD(R, nvrtcDestroyProgram, (P *p), (p))
FWD(R, nvrtcGetProgramLogSize, (P p, size_t *n), (p, n))
FWD(R, nvrtcGetProgramLog, (P p, char *l), (p, l))
FWD(R, nvrtcGetCUBINSize, (P p, size_t *n), (p, n))
FWD(R, nvrtcGetCUBIN, (P p, char *c), (p, c))
FWD(R, nvrtcAddNameExpression, (P p, const char *e), (p, e))
FWD(R, nvrtcGetLoweredName, (P p, const char *e, const char **l), (p, e, l))
R nvrtcCompileProgram(P prog, int n, const char *const *opts) {
  static R (*f)(P, int, const char *const *);
  if (!f) f = sym("nvrtcCompileProgram");
  if (!env_on("NVRTC_SHIM_PCH", 1)) return f(prog, n, opts);
  const char **o = malloc(sizeof(char *) * (n + 1));
  memcpy(o, opts, sizeof(char *) * n);
  o[n] = "-pch";
  R r = f(prog, n + 1, o);
  free(o);
  return r;
}
R nvrtcGetPTXSize(P prog, size_t *n) {
  static R (*f)(P, size_t *);
  if (want_cubin(prog, n)) return 0;
  if (!f) f = sym("nvrtcGetPTXSize");
  return f(prog, n);
}
R nvrtcGetPTX(P prog, char *out) {
  static R (*f)(P, char *);
  size_t n;
  if (want_cubin(prog, &n)) return ((R(*)(P, char *))sym("nvrtcGetCUBIN"))(prog, out);
  if (!f) f = sym("nvrtcGetPTX");
  return f(prog, out);
}
