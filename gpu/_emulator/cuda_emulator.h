// cuda_emulator.h: the CUDA C++ surface the project's kernels use, for the CPU emulator.
//
// Force-included (g++ -include) in front of a kernel family's source, which then compiles
// unchanged with the system C++ compiler. Execution model (runtime.cpp): the blocks of a launch
// run one after another (a cooperative launch: all at once); each CUDA thread of a block is a fiber
// on one OS thread, switched only at synchronization points (barriers, warp shuffles and votes,
// grid.sync), so runs are deterministic for a given seed (blocks and threads run in seeded shuffled
// orders by default: runtime.cpp).
//
//  - __shared__ is `thread_local`: inside a function that also means `static`, so every fiber of a
//    block (all on one OS thread) sees one copy. `extern __shared__` arrays are aliased by the
//    build to one buffer of the largest dynamic size a device allows. In a cooperative launch the
//    scheduler swaps each block's copy in and out as it moves between blocks.
//  - threadIdx/blockIdx/blockDim/gridDim are globals the scheduler rewrites at every switch.
//  - Synchronization intrinsics take the caller's file and line as default arguments, so errors
//    (divergent barrier, shuffle from a lane that has exited) name the source line.
//
// Anything not declared here or in the stand-in cooperative_groups.h (grid groups only) fails to
// compile (textures, inline PTX, __activemask, thread-block tiles), so an unsupported kernel can
// never run wrong. GPU_EMULATOR is defined; __CUDA_ARCH__ and
// __CUDACC__ are not.
#pragma once

#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <math.h>
#include <type_traits>
#include <utility>

#define GPU_EMULATOR 1

// Kernels get a section of their own: the build finds `extern "C"` kernels by this marker in the
// preprocessed source.
#define __global__ __attribute__((noinline, used, section(".text.gpuemu_kernels")))
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __shared__ thread_local
#define __constant__
// __launch_bounds__(maxThreads, minBlocks): the build reads the bounds from a marker left in the
// preprocessed text (GPUEMU_FIND_KERNELS) and puts them in the kernel table; a launch past
// maxThreads fails as on the GPU. The compile proper drops it.
#if defined(GPUEMU_FIND_KERNELS)
#define __launch_bounds__(...) gpuemu_launch_bounds(__VA_ARGS__)
#else
#define __launch_bounds__(...)
#endif
#define __align__(n) __attribute__((aligned(n)))

// ---------------------------------------------------------------------------------------------
// Indices and vector types
// ---------------------------------------------------------------------------------------------

struct uint3 { unsigned int x, y, z; };
struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;
constexpr int warpSize = 32;

#define GPUEMU_VEC2(name, T, align) \
    struct alignas(align) name { T x, y; }; \
    inline name make_##name(T x, T y) { return name{x, y}; }
#define GPUEMU_VEC3(name, T) \
    struct name { T x, y, z; }; \
    inline name make_##name(T x, T y, T z) { return name{x, y, z}; }
#define GPUEMU_VEC4(name, T, align) \
    struct alignas(align) name { T x, y, z, w; }; \
    inline name make_##name(T x, T y, T z, T w) { return name{x, y, z, w}; }

GPUEMU_VEC2(char2, signed char, 2)
GPUEMU_VEC4(char4, signed char, 4)
GPUEMU_VEC2(uchar2, unsigned char, 2)
GPUEMU_VEC4(uchar4, unsigned char, 4)
GPUEMU_VEC2(short2, short, 4)
GPUEMU_VEC4(short4, short, 8)
GPUEMU_VEC2(ushort2, unsigned short, 4)
GPUEMU_VEC4(ushort4, unsigned short, 8)
GPUEMU_VEC2(int2, int, 8)
GPUEMU_VEC3(int3, int)
GPUEMU_VEC4(int4, int, 16)
GPUEMU_VEC2(uint2, unsigned int, 8)
GPUEMU_VEC4(uint4, unsigned int, 16)
GPUEMU_VEC2(float2, float, 8)
GPUEMU_VEC3(float3, float)
GPUEMU_VEC4(float4, float, 16)
GPUEMU_VEC2(longlong2, long long, 16)
GPUEMU_VEC2(ulonglong2, unsigned long long, 16)
GPUEMU_VEC2(double2, double, 16)
inline uint3 make_uint3(unsigned int x, unsigned int y, unsigned int z) { return uint3{x, y, z}; }

// ---------------------------------------------------------------------------------------------
// __half and __nv_bfloat16 (cuda_fp16.h / cuda_bf16.h): storage types, arithmetic in float
// ---------------------------------------------------------------------------------------------

namespace gpuemu {

inline unsigned int f2u(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
inline float u2f(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }

// Round to nearest even, as the GPU's cvt.rn.f16.f32; NaN becomes the canonical 0x7fff.
inline unsigned short f32_to_f16(float f) {
    const unsigned int x = f2u(f), sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return 0x7fff;
    if (ax >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds to infinity
    if (ax < 0x38800000u)                          // below 2^-14: subnormal, in units of 2^-24
        return sign | (unsigned short)std::nearbyint(u2f(ax) * 16777216.0f);
    const unsigned int r = ax - 0x38000000u;       // rebias the exponent from 127 to 15
    return sign | ((r + 0xfffu + ((r >> 13) & 1u)) >> 13);
}

inline float f16_to_f32(unsigned short h) {
    const unsigned int sign = (unsigned int)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0x1f) return u2f(sign | 0x7f800000u | (m << 13));
    if (e == 0) return u2f(sign | f2u(m * (1.0f / 16777216.0f)));
    return u2f(sign | ((e + 112u) << 23) | (m << 13));
}

inline unsigned short f32_to_bf16(float f) {
    const unsigned int x = f2u(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fff;
    return (unsigned short)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

inline float bf16_to_f32(unsigned short b) { return u2f((unsigned int)b << 16); }

}  // namespace gpuemu

#define GPUEMU_FLOAT16_TYPE(T, TO_BITS, FROM_BITS)                                        \
    struct T {                                                                              \
        unsigned short __x;                                                                 \
        T() = default;                                                                      \
        T(float f) : __x(gpuemu::TO_BITS(f)) {}                                             \
        T(double d) : __x(gpuemu::TO_BITS((float)d)) {}                                     \
        T(int i) : __x(gpuemu::TO_BITS((float)i)) {}                                        \
        T(unsigned int i) : __x(gpuemu::TO_BITS((float)i)) {}                               \
        T(long long i) : __x(gpuemu::TO_BITS((float)i)) {}                                  \
        T(unsigned long long i) : __x(gpuemu::TO_BITS((float)i)) {}                         \
        operator float() const { return gpuemu::FROM_BITS(__x); }                           \
        T& operator+=(T o) { return *this = T(float(*this) + float(o)); }                  \
        T& operator-=(T o) { return *this = T(float(*this) - float(o)); }                  \
        T& operator*=(T o) { return *this = T(float(*this) * float(o)); }                  \
        T& operator/=(T o) { return *this = T(float(*this) / float(o)); }                  \
    };                                                                                      \
    inline T operator+(T a, T b) { return T(float(a) + float(b)); }                       \
    inline T operator-(T a, T b) { return T(float(a) - float(b)); }                       \
    inline T operator*(T a, T b) { return T(float(a) * float(b)); }                       \
    inline T operator/(T a, T b) { return T(float(a) / float(b)); }                       \
    inline T operator-(T a) { T r; r.__x = a.__x ^ 0x8000u; return r; }                  \
    inline bool operator==(T a, T b) { return float(a) == float(b); }                     \
    inline bool operator!=(T a, T b) { return float(a) != float(b); }                     \
    inline bool operator<(T a, T b) { return float(a) < float(b); }                       \
    inline bool operator<=(T a, T b) { return float(a) <= float(b); }                     \
    inline bool operator>(T a, T b) { return float(a) > float(b); }                       \
    inline bool operator>=(T a, T b) { return float(a) >= float(b); }

GPUEMU_FLOAT16_TYPE(__half, f32_to_f16, f16_to_f32)
GPUEMU_FLOAT16_TYPE(__nv_bfloat16, f32_to_bf16, bf16_to_f32)
#undef GPUEMU_FLOAT16_TYPE

struct alignas(4) __half2 { __half x, y; };
struct alignas(4) __nv_bfloat162 { __nv_bfloat16 x, y; };
typedef __half half;
typedef __half2 half2;
typedef __nv_bfloat16 nv_bfloat16;
typedef __nv_bfloat162 nv_bfloat162;

inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline __half __double2half(double d) { return __half((float)d); }
inline float __half2float(__half h) { return float(h); }
inline __half2 __float2half2_rn(float f) { return __half2{__half(f), __half(f)}; }
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__half(a), __half(b)}; }
inline __half2 __float22half2_rn(float2 f) { return __half2{__half(f.x), __half(f.y)}; }
inline float2 __half22float2(__half2 h) { return float2{float(h.x), float(h.y)}; }
inline float __low2float(__half2 h) { return float(h.x); }
inline float __high2float(__half2 h) { return float(h.y); }
inline __half __low2half(__half2 h) { return h.x; }
inline __half __high2half(__half2 h) { return h.y; }
inline __half2 __halves2half2(__half a, __half b) { return __half2{a, b}; }
inline __half2 __half2half2(__half a) { return __half2{a, a}; }
inline __half __hadd(__half a, __half b) { return a + b; }
inline __half __hsub(__half a, __half b) { return a - b; }
inline __half __hmul(__half a, __half b) { return a * b; }
inline __half __hdiv(__half a, __half b) { return a / b; }
inline __half __hfma(__half a, __half b, __half c) { return __half(std::fma(float(a), float(b), float(c))); }
inline __half __hmax(__half a, __half b) { return __half(std::fmax(float(a), float(b))); }
inline __half __hmin(__half a, __half b) { return __half(std::fmin(float(a), float(b))); }
inline bool __hisnan(__half a) { return std::isnan(float(a)); }
inline __half2 __hadd2(__half2 a, __half2 b) { return __half2{a.x + b.x, a.y + b.y}; }
inline __half2 __hmul2(__half2 a, __half2 b) { return __half2{a.x * b.x, a.y * b.y}; }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short u) { __half h; h.__x = u; return h; }

inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __double2bfloat16(double d) { return __nv_bfloat16((float)d); }
inline float __bfloat162float(__nv_bfloat16 b) { return float(b); }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__nv_bfloat16(a), __nv_bfloat16(b)}; }
inline __nv_bfloat162 __float22bfloat162_rn(float2 f) { return {__nv_bfloat16(f.x), __nv_bfloat16(f.y)}; }
inline float2 __bfloat1622float2(__nv_bfloat162 b) { return float2{float(b.x), float(b.y)}; }
inline float __low2float(__nv_bfloat162 b) { return float(b.x); }
inline float __high2float(__nv_bfloat162 b) { return float(b.y); }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return {a, b}; }
inline __nv_bfloat16 __hadd(__nv_bfloat16 a, __nv_bfloat16 b) { return a + b; }
inline __nv_bfloat16 __hmul(__nv_bfloat16 a, __nv_bfloat16 b) { return a * b; }
inline __nv_bfloat16 __hmax(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat16(std::fmax(float(a), float(b))); }
inline bool __hisnan(__nv_bfloat16 a) { return std::isnan(float(a)); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { __nv_bfloat16 b; b.__x = u; return b; }

// ---------------------------------------------------------------------------------------------
// Synchronization: barriers, warp shuffles and votes (runtime.cpp)
// ---------------------------------------------------------------------------------------------

namespace gpuemu {

enum BarrierKind { BAR_PLAIN, BAR_COUNT, BAR_AND, BAR_OR, BAR_GRID };
enum WarpOpKind { OP_SHFL_IDX, OP_SHFL_UP, OP_SHFL_DOWN, OP_SHFL_XOR, OP_BALLOT, OP_ALL, OP_ANY, OP_SYNCWARP };

int barrier(int kind, int pred, const char* file, int line);
unsigned long long warp_op(int kind, unsigned mask, unsigned long long value, int arg, int width,
                           const char* file, int line);
[[noreturn]] void trap(const char* what, const char* file, int line);

template <typename T>
inline T shuffle(int kind, unsigned mask, T var, int arg, int width, const char* file, int line) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value,
                  "gpu emulator: shuffles move at most 8 bytes of a trivially copyable type");
    unsigned long long bits = 0;
    std::memcpy(&bits, &var, sizeof(T));
    bits = warp_op(kind, mask, bits, arg, width, file, line);
    T out;
    std::memcpy(&out, &bits, sizeof(T));
    return out;
}

}  // namespace gpuemu

inline void __syncthreads(const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
    gpuemu::barrier(gpuemu::BAR_PLAIN, 0, f, l);
}
inline int __syncthreads_count(int p, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
    return gpuemu::barrier(gpuemu::BAR_COUNT, p != 0, f, l);
}
inline int __syncthreads_and(int p, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
    return gpuemu::barrier(gpuemu::BAR_AND, p != 0, f, l);
}
inline int __syncthreads_or(int p, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
    return gpuemu::barrier(gpuemu::BAR_OR, p != 0, f, l);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
    gpuemu::warp_op(gpuemu::OP_SYNCWARP, mask, 0, 0, 32, f, l);
}
template <typename T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32,
                     const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
    return gpuemu::shuffle(gpuemu::OP_SHFL_IDX, mask, var, src_lane, width, f, l);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32,
                        const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
    return gpuemu::shuffle(gpuemu::OP_SHFL_UP, mask, var, (int)delta, width, f, l);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32,
                          const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
    return gpuemu::shuffle(gpuemu::OP_SHFL_DOWN, mask, var, (int)delta, width, f, l);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32,
                         const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
    return gpuemu::shuffle(gpuemu::OP_SHFL_XOR, mask, var, lane_mask, width, f, l);
}
inline unsigned __ballot_sync(unsigned mask, int p, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
    return (unsigned)gpuemu::warp_op(gpuemu::OP_BALLOT, mask, p != 0, 0, 32, f, l);
}
inline int __all_sync(unsigned mask, int p, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
    return (int)gpuemu::warp_op(gpuemu::OP_ALL, mask, p != 0, 0, 32, f, l);
}
inline int __any_sync(unsigned mask, int p, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
    return (int)gpuemu::warp_op(gpuemu::OP_ANY, mask, p != 0, 0, 32, f, l);
}
[[noreturn]] inline void __trap(const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
    gpuemu::trap("__trap()", f, l);
}

// Blocks run one at a time on one OS thread; the fences still order memory for the compiler.
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_system() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// ---------------------------------------------------------------------------------------------
// Cache-hinted loads and stores: plain accesses on the CPU
// ---------------------------------------------------------------------------------------------

template <typename T> inline T __ldg(const T* p) { return *p; }
template <typename T> inline T __ldca(const T* p) { return *p; }
template <typename T> inline T __ldcg(const T* p) { return *p; }
template <typename T> inline T __ldcs(const T* p) { return *p; }
template <typename T> inline T __ldlu(const T* p) { return *p; }
template <typename T> inline T __ldcv(const T* p) { return *p; }
template <typename T> inline void __stwb(T* p, T v) { *p = v; }
template <typename T> inline void __stcg(T* p, T v) { *p = v; }
template <typename T> inline void __stcs(T* p, T v) { *p = v; }
template <typename T> inline void __stwt(T* p, T v) { *p = v; }

// ---------------------------------------------------------------------------------------------
// Atomics
// ---------------------------------------------------------------------------------------------

#define GPUEMU_ATOMIC_INT(T)                                                                           \
    inline T atomicAdd(T* p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }               \
    inline T atomicSub(T* p, T v) { return __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST); }               \
    inline T atomicAnd(T* p, T v) { return __atomic_fetch_and(p, v, __ATOMIC_SEQ_CST); }               \
    inline T atomicOr(T* p, T v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }                 \
    inline T atomicXor(T* p, T v) { return __atomic_fetch_xor(p, v, __ATOMIC_SEQ_CST); }               \
    inline T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }             \
    inline T atomicCAS(T* p, T expected, T desired) {                                                  \
        __atomic_compare_exchange_n(p, &expected, desired, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); \
        return expected;                                                                               \
    }                                                                                                  \
    inline T atomicMax(T* p, T v) {                                                                    \
        T old = __atomic_load_n(p, __ATOMIC_SEQ_CST);                                                  \
        while (old < v && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {} \
        return old;                                                                                    \
    }                                                                                                  \
    inline T atomicMin(T* p, T v) {                                                                    \
        T old = __atomic_load_n(p, __ATOMIC_SEQ_CST);                                                  \
        while (old > v && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {} \
        return old;                                                                                    \
    }
GPUEMU_ATOMIC_INT(int)
GPUEMU_ATOMIC_INT(unsigned int)
GPUEMU_ATOMIC_INT(long long)
GPUEMU_ATOMIC_INT(unsigned long long)
#undef GPUEMU_ATOMIC_INT

inline unsigned int atomicInc(unsigned int* p, unsigned int limit) {
    unsigned int old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
    while (!__atomic_compare_exchange_n(p, &old, old >= limit ? 0u : old + 1u, false, __ATOMIC_SEQ_CST,
                                        __ATOMIC_SEQ_CST)) {}
    return old;
}
inline unsigned int atomicDec(unsigned int* p, unsigned int limit) {
    unsigned int old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
    while (!__atomic_compare_exchange_n(p, &old, (old == 0u || old > limit) ? limit : old - 1u, false,
                                        __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {}
    return old;
}

// Floating-point atomics: a compare-and-swap loop on the bits (__atomic_* reject float types).
namespace gpuemu {
template <typename F, typename U, typename Op>
inline F atomic_float(F* p, Op op) {
    U* bits = reinterpret_cast<U*>(p);
    U old = __atomic_load_n(bits, __ATOMIC_SEQ_CST), next;
    do {
        F f, g;
        std::memcpy(&f, &old, sizeof(F));
        g = op(f);
        std::memcpy(&next, &g, sizeof(F));
    } while (!__atomic_compare_exchange_n(bits, &old, next, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
    F out;
    std::memcpy(&out, &old, sizeof(F));
    return out;
}
}  // namespace gpuemu
inline float atomicAdd(float* p, float v) { return gpuemu::atomic_float<float, unsigned int>(p, [v](float f) { return f + v; }); }
inline double atomicAdd(double* p, double v) {
    return gpuemu::atomic_float<double, unsigned long long>(p, [v](double f) { return f + v; });
}
inline float atomicExch(float* p, float v) { return gpuemu::atomic_float<float, unsigned int>(p, [v](float) { return v; }); }

// ---------------------------------------------------------------------------------------------
// Math functions and intrinsics (glibc's functions: results may differ from CUDA's in the last ulp)
// ---------------------------------------------------------------------------------------------

using std::isfinite;
using std::isinf;
using std::isnan;
using std::signbit;

inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __expf(float x) { return expf(x); }
inline float __exp10f(float x) { return exp10f(x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __log10f(float x) { return log10f(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __fadd_rn(float x, float y) { return x + y; }
inline float __fsub_rn(float x, float y) { return x - y; }
inline float __fmul_rn(float x, float y) { return x * y; }
inline float __fdiv_rn(float x, float y) { return x / y; }
inline float __fmaf_rn(float x, float y, float z) { return fmaf(x, y, z); }
inline double __dadd_rn(double x, double y) { return x + y; }
inline double __dmul_rn(double x, double y) { return x * y; }
inline double __fma_rn(double x, double y, double z) { return fma(x, y, z); }
inline float __saturatef(float x) { return x != x ? 0.0f : fminf(fmaxf(x, 0.0f), 1.0f); }
// common.cuh's inline-PTX ex2.approx.ftz.f32: 2^x, subnormal inputs and results flushed to 0
inline float ex2_approx_ftz(float x) {
    if (std::fpclassify(x) == FP_SUBNORMAL) x = 0.0f;
    const float y = exp2f(x);
    return std::fpclassify(y) == FP_SUBNORMAL ? 0.0f : y;
}

inline int __float2int_rn(float x) { return (int)nearbyintf(x); }
inline int __float2int_rz(float x) { return (int)x; }
inline int __float2int_rd(float x) { return (int)floorf(x); }
inline int __float2int_ru(float x) { return (int)ceilf(x); }
inline unsigned int __float2uint_rn(float x) { return (unsigned int)nearbyintf(x); }
inline long long __float2ll_rn(float x) { return (long long)nearbyintf(x); }
inline float __int2float_rn(int x) { return (float)x; }
inline float __uint2float_rn(unsigned int x) { return (float)x; }
inline float __ll2float_rn(long long x) { return (float)x; }
inline float __double2float_rn(double x) { return (float)x; }
inline int __double2int_rn(double x) { return (int)nearbyint(x); }

inline int __float_as_int(float x) { int i; std::memcpy(&i, &x, 4); return i; }
inline float __int_as_float(int i) { float x; std::memcpy(&x, &i, 4); return x; }
inline unsigned int __float_as_uint(float x) { unsigned int i; std::memcpy(&i, &x, 4); return i; }
inline float __uint_as_float(unsigned int i) { float x; std::memcpy(&x, &i, 4); return x; }
inline long long __double_as_longlong(double x) { long long i; std::memcpy(&i, &x, 8); return i; }
inline double __longlong_as_double(long long i) { double x; std::memcpy(&x, &i, 8); return x; }

inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned int)x); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned int __brev(unsigned int x) {
    x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
    x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
    x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
    return __builtin_bswap32(x);
}
inline int __mul24(int x, int y) { return (int)((long long)(x << 8 >> 8) * (y << 8 >> 8)); }
inline unsigned int __umul24(unsigned int x, unsigned int y) { return (x & 0xffffffu) * (y & 0xffffffu); }
inline int __mulhi(int x, int y) { return (int)(((long long)x * y) >> 32); }
inline unsigned int __umulhi(unsigned int x, unsigned int y) { return (unsigned int)(((unsigned long long)x * y) >> 32); }
inline unsigned long long __umul64hi(unsigned long long x, unsigned long long y) {
    return (unsigned long long)(((unsigned __int128)x * y) >> 64);
}

// CUDA's overloaded min/max of the same type on both sides.
#define GPUEMU_MINMAX(T)                                  \
    inline T min(T a, T b) { return a < b ? a : b; }      \
    inline T max(T a, T b) { return a > b ? a : b; }
GPUEMU_MINMAX(int)
GPUEMU_MINMAX(unsigned int)
GPUEMU_MINMAX(long long)
GPUEMU_MINMAX(unsigned long long)
#undef GPUEMU_MINMAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }

// ---------------------------------------------------------------------------------------------
// Launch plumbing: the build appends a table of the module's kernels (gpuemu::KernelEntry), each
// with a typed invoker that unpacks CuPy-style argument pointers and a signature for the checks.
// ---------------------------------------------------------------------------------------------

namespace gpuemu {

struct KernelEntry {
    const char* name;
    void (*invoke)(void** args);
    const char* (*signature)();
    int max_threads, min_blocks;  // __launch_bounds__, 0 where the kernel declares none
};

template <typename T> struct TypeName { static constexpr const char* value = nullptr; };
#define GPUEMU_TYPE_NAME(T, name) template <> struct TypeName<T> { static constexpr const char* value = name; };
GPUEMU_TYPE_NAME(bool, "bool")
GPUEMU_TYPE_NAME(signed char, "int8")
GPUEMU_TYPE_NAME(short, "int16")
GPUEMU_TYPE_NAME(int, "int32")
GPUEMU_TYPE_NAME(long, "int64")
GPUEMU_TYPE_NAME(long long, "int64")
GPUEMU_TYPE_NAME(unsigned char, "uint8")
GPUEMU_TYPE_NAME(unsigned short, "uint16")
GPUEMU_TYPE_NAME(unsigned int, "uint32")
GPUEMU_TYPE_NAME(unsigned long, "uint64")
GPUEMU_TYPE_NAME(unsigned long long, "uint64")
GPUEMU_TYPE_NAME(float, "float32")
GPUEMU_TYPE_NAME(double, "float64")
GPUEMU_TYPE_NAME(__half, "float16")
GPUEMU_TYPE_NAME(__nv_bfloat16, "bfloat16")
#undef GPUEMU_TYPE_NAME

// What a pointer parameter's array must hold: the element dtype, or "any" for raw bytes, void
// and structs (workspaces, reinterpreted buffers). Vector types name their component.
template <typename T> struct PointeeName { static constexpr const char* value = TypeName<T>::value ? TypeName<T>::value : "any"; };
template <> struct PointeeName<void> { static constexpr const char* value = "any"; };
template <> struct PointeeName<char> { static constexpr const char* value = "any"; };
template <> struct PointeeName<signed char> { static constexpr const char* value = "any"; };
template <> struct PointeeName<unsigned char> { static constexpr const char* value = "any"; };
#define GPUEMU_POINTEE(V, S) template <> struct PointeeName<V> { static constexpr const char* value = TypeName<S>::value; };
GPUEMU_POINTEE(int2, int) GPUEMU_POINTEE(int4, int) GPUEMU_POINTEE(uint2, unsigned int)
GPUEMU_POINTEE(uint4, unsigned int) GPUEMU_POINTEE(float2, float) GPUEMU_POINTEE(float4, float)
GPUEMU_POINTEE(double2, double) GPUEMU_POINTEE(__half2, __half) GPUEMU_POINTEE(__nv_bfloat162, __nv_bfloat16)
GPUEMU_POINTEE(longlong2, long long) GPUEMU_POINTEE(ulonglong2, unsigned long long)
#undef GPUEMU_POINTEE

template <typename P>
inline void append_param_name(char*& out) {
    const char* name;
    if constexpr (std::is_pointer<P>::value) {
        *out++ = '*';
        name = PointeeName<std::remove_cv_t<std::remove_pointer_t<P>>>::value;
    } else {
        static_assert(TypeName<std::remove_cv_t<P>>::value != nullptr,
                      "gpu emulator: kernel parameters must be pointers or arithmetic scalars "
                      "(what CuPy's RawKernel can pass)");
        name = TypeName<std::remove_cv_t<P>>::value;
    }
    while (*name) *out++ = *name++;
    *out++ = ',';
}

template <auto F> struct Invoker;
template <typename... P, void (*F)(P...)>
struct Invoker<F> {
    template <typename T> static T load(void* p) {
        T v;
        std::memcpy(&v, p, sizeof(T));
        return v;
    }
    template <std::size_t... I> static void call(void** args, std::index_sequence<I...>) {
        F(load<std::remove_cv_t<P>>(args[I])...);
    }
    static void invoke(void** args) { call(args, std::index_sequence_for<P...>{}); }
    // "*float32,*float32,int64,int32": one entry per parameter, pointers starred.
    static const char* signature() {
        static char text[64 * (sizeof...(P) + 1)];
        if (!text[0]) {
            char* out = text;
            (append_param_name<P>(out), ...);
            if (out != text) --out;
            *out = '\0';
        }
        return text;
    }
};

}  // namespace gpuemu

#define GPUEMU_KERNEL_ENTRY(k, max_threads, min_blocks) \
    {#k, &gpuemu::Invoker<&k>::invoke, &gpuemu::Invoker<&k>::signature, (int)(max_threads), (int)(min_blocks)}
