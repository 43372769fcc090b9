// batch_norm.cu: batch statistics, batch-norm forward (training), inference and backward.
//
// @variants [{"BN_VECTOR": 1}, {"BN_VECTOR": 0}]
//
// View. gpu/ops/batch_norm.py maps every layout onto a C-contiguous (outer, C, inner) view and reduces
// over (outer, inner) for each of the C channels, without a transpose copy:
//     (N, C) axis=0 -> (N, C, 1)      NCHW axis=(0,2,3) -> (N, C, H*W)
//     NHWC axis=(0,1,2) -> (N*H*W, C, 1)      the seed's (n, m) axis=1 -> (1, n, m)
// Both shapes are one "rows x vectors" walk: a thread owns one vector of VEC contiguous elements
// (16 bytes when BN_VECTOR=1: 8 halves/bfloat16s, 4 floats, 2 doubles; else 1 element) and visits
// it in every row it is given, so per-channel coefficients sit in registers and no element index
// is ever divided:
//   channels-last  (inner == 1): a row is x[r, :]; the vector is VEC consecutive channels; the
//       block's bx threads along x cover bx*VEC channels (one "tile"), blockDim/bx rows at a time.
//       Threads with the same x position hold the same channels ("columns", S = bx).
//   channels-first (inner > 1):  a row is x[n, c, :]; one channel per tile (grid.x = C * chunks),
//       the inner axis split into chunks of bx*VEC; every thread of a block holds the same channel
//       (S = 1).
// Rows are split over grid.y (gy blocks per tile), grid-stride, BN_UNROLL rows of loads in flight.
// The vector path needs the row length (C, or inner) to be a multiple of VEC and 16-byte aligned
// pointers; otherwise the module built with BN_VECTOR=0 runs (scalar loads, same kernels).
//
// Kernels (one per op and path):
//   batch_norm_stats            per-channel Welford partials -> block -> grid; the last block of a tile
//                       finalizes: mean, biased var, invstd = 1/sqrt(var+eps), the affine
//                       coefficients scale = gamma*invstd and shift = beta, and the running-stat
//                       update r = (1-momentum)*r + momentum*stat (var unbiased by M/(M-1)).
//   batch_norm_apply            y = (x - center[c]) * scale[c] + shift[c]: the training forward's second
//                       pass (center = batch mean) and inference (center = running mean).
//   batch_norm_forward_onchip   training forward with x held in registers (<= BN_ONCHIP_ROWS rows per
//                       thread, at most BN_ONCHIP_THREADS threads) from the statistics to the
//                       normalization: stats, finalize and normalize in one launch, x read once.
//                       Either one block holds a whole tile (all rows of its channels; an ordinary
//                       launch), or the tile's rows and chunks spread over gy*chunks blocks that
//                       exchange Welford partials across a grid barrier (persistent: a cooperative
//                       launch, every block resident at once, see below).
//   batch_norm_inference_params scale = gamma/sqrt(running_var+eps), shift = beta, one thread per channel.
//   batch_norm_backward_reduce  per-channel sum(dy) and sum(dy*(x-mean)), reduced like the statistics; the
//                       last block writes dbeta = sum(dy), dgamma = sum(dy*(x-mean))*invstd and
//                       the coefficients of dx = k*dy + a*(x - mean) + b:
//                       k = gamma*invstd, a = -k*invstd*dgamma/M, b = -k*dbeta/M.
//   batch_norm_backward_apply   dx from those coefficients.
//
// Statistics. Each thread keeps VEC Welford states sharing one count (its lanes see the same
// rows), so one reciprocal per row serves VEC elements: no divide per element. States merge by
// Chan's formula: warp shuffles (shfl_down, fixed pairing), then shared memory in warp order,
// then across the gy*chunks blocks of a tile through a workspace of partials in partition order;
// the block that arrives last at the tile's counter (atomicAdd on an integer) merges them. The
// merge order never depends on scheduling, so results are bitwise reproducible; no floating-point
// atomics. A NaN or inf only reaches the lanes of its own channel.
//
// Persistent forward. With several blocks per tile, batch_norm_forward_onchip cannot wait for the last
// block to finalize (the others would have to drop their rows): each block stores its partial in
// the workspace, grid.sync() (cooperative_groups; the launch is cooperative, so the grid must fit
// the device at once: gpu/ops/batch_norm.py sizes it from max_cooperative_grid), then every block merges
// its tile's partials in partition order itself. The merge is the same sequence of operations in
// every block, so all blocks normalize with the same bits; block part 0 alone writes the
// statistics and the running-stat update.
//
// Bytes moved (E elements of s bytes, C channels; partials and coefficients are O(C * gy)):
//   batch statistics                  E*s                  (batch_norm_stats)
//   forward, training, on chip        2 E*s                (batch_norm_forward_onchip, one block per
//                                                           tile or persistent across the grid)
//   forward, training, two-pass       3 E*s                (batch_norm_stats + batch_norm_apply; the second read
//                                                           of x hits L2 when x fits there)
//   inference                         2 E*s                (batch_norm_inference_params + batch_norm_apply)
//   backward                          5 E*s                (batch_norm_backward_reduce reads dy, x;
//                                                           batch_norm_backward_apply reads dy, x, writes dx)
//
// Accumulation in ACC_T (float for half/bfloat16/float, double for double); x, y, dy, dx in
// SCALAR_T; every per-channel array (gamma, beta, running stats, mean, invstd, coefficients,
// workspace) in ACC_T (the Python side converts mixed parameter dtypes). Element offsets are
// index_t (64 bits); C < 2^31. Blocks: 1-D, a multiple of 32 threads, <= BN_MAX_THREADS; bx a
// power of two; dynamic shared memory = blockDim.x * (1 + 2*VEC) * sizeof(ACC_T).

#include <cooperative_groups.h>

#ifndef BN_VECTOR
#define BN_VECTOR 1
#endif

#define BN_MAX_THREADS 512   // largest block any launch uses (bounds the register budget)
#define BN_UNROLL 4          // rows of loads in flight per thread in the streaming loops
#define BN_ONCHIP_ROWS 8     // rows per thread batch_norm_forward_onchip keeps in registers
#define BN_ONCHIP_THREADS 256  // its largest block; one block per SM may use up to 255 registers
                               // (bfloat16 at sm_90: 157, as the row cache and its float copies stay live)
#define BN_MAX_COLS 64       // largest bx of a channels-last tile (bounds batch_norm_forward_onchip's smem)

#if BN_VECTOR
typedef Pack<scalar_t> Vec;
#else
struct Vec {
    static constexpr int size = 1;
    scalar_t v[1];
};
#endif
#define VEC (Vec::size)

// flags
#define BN_HAS_GAMMA 1
#define BN_HAS_BETA 2
#define BN_RUNNING 4

__device__ __forceinline__ Vec load_vec(const scalar_t* __restrict__ p) {
#if BN_VECTOR
    return load_pack(p);
#else
    Vec v;
    v.v[0] = p[0];
    return v;
#endif
}

// Outputs are not re-read by the kernel that writes them: stream them past L2.
__device__ __forceinline__ void store_vec(scalar_t* p, const Vec& v) {
#if BN_VECTOR
    store_pack_stream(p, v);
#else
    p[0] = v.v[0];
#endif
}

// ---------------------------------------------------------------------------------------------
// Geometry: which vector a thread owns and which rows it visits
// ---------------------------------------------------------------------------------------------

struct Tile {
    index_t row, step, rows;   // rows row, row + step, ... < rows
    index_t stride, base;      // element offset of the vector in row r: r * stride + base
    int c0;                    // channel of lane 0 (channels-last) or of the whole block
    int tile;                  // counter index: which channels this block reduces
    int ncols;                 // S: threads with equal threadIdx.x % S hold the same channels
    int part, nparts;          // this block's partial among the tile's
    bool active;               // the vector lies inside the tensor
    bool col_active;           // the thread's column has channels (for the workspace merge)
};

__device__ __forceinline__ Tile make_tile(index_t outer, int C, index_t inner, int bx, int chunks) {
    Tile t;
    const int tx = threadIdx.x % bx, ty = threadIdx.x / bx, by = blockDim.x / bx;
    const int chunk = blockIdx.x % chunks;
    t.tile = blockIdx.x / chunks;
    t.part = chunk * gridDim.y + blockIdx.y;
    t.nparts = chunks * gridDim.y;
    t.row = (index_t)blockIdx.y * by + ty;
    t.step = (index_t)gridDim.y * by;
    t.rows = outer;
    if (inner == 1) {
        t.c0 = (t.tile * bx + tx) * VEC;
        t.active = t.col_active = t.c0 < C;
        t.stride = C;
        t.base = t.c0;
        t.ncols = bx;
    } else {
        const index_t i = ((index_t)chunk * bx + tx) * VEC;
        t.c0 = t.tile;
        t.active = i < inner;
        t.col_active = true;
        t.stride = (index_t)C * inner;
        t.base = (index_t)t.tile * inner + i;
        t.ncols = 1;
    }
    return t;
}

// ---------------------------------------------------------------------------------------------
// Accumulators: L lanes (L channels, or after folding one), saved word by word
// ---------------------------------------------------------------------------------------------

// Welford states of L lanes that saw the same rows: one count.
template <int L>
struct BnWelford {
    static constexpr int kWords = 1 + 2 * L;
    acc_t n, mean[L], m2[L];

    __device__ __forceinline__ void init() {
        n = acc_t(0);
#pragma unroll
        for (int j = 0; j < L; ++j) mean[j] = m2[j] = acc_t(0);
    }
    __device__ __forceinline__ void push(const Vec& v) {
        n += acc_t(1);
        const acc_t rn = acc_t(1) / n;  // one reciprocal for the L lanes
#pragma unroll
        for (int j = 0; j < L; ++j) {
            const acc_t xj = to_acc(v.v[j]);
            const acc_t d = xj - mean[j];
            mean[j] += d * rn;
            m2[j] += d * (xj - mean[j]);
        }
    }
    // Chan et al.; either side may be empty (n == 0, mean == m2 == 0).
    __device__ __forceinline__ void merge(const BnWelford& o) {
        const acc_t n_ab = n + o.n;
        const acc_t w = n_ab > acc_t(0) ? o.n / n_ab : acc_t(0);
#pragma unroll
        for (int j = 0; j < L; ++j) {
            const acc_t d = o.mean[j] - mean[j];
            mean[j] += d * w;
            m2[j] += o.m2[j] + d * d * n * w;
        }
        n = n_ab;
    }
    __device__ __forceinline__ BnWelford<1> fold() const {
        BnWelford<1> r;
        r.n = n;
        r.mean[0] = mean[0];
        r.m2[0] = m2[0];
#pragma unroll
        for (int j = 1; j < L; ++j) {
            BnWelford<1> o;
            o.n = n;
            o.mean[0] = mean[j];
            o.m2[0] = m2[j];
            r.merge(o);
        }
        return r;
    }
    __device__ __forceinline__ BnWelford shfl_down(int off) const {
        BnWelford o;
        o.n = __shfl_down_sync(GPU_FULL_MASK, n, off);
#pragma unroll
        for (int j = 0; j < L; ++j) {
            o.mean[j] = __shfl_down_sync(GPU_FULL_MASK, mean[j], off);
            o.m2[j] = __shfl_down_sync(GPU_FULL_MASK, m2[j], off);
        }
        return o;
    }
    // Shared memory: word w of slot i at s[w * nslots + i] (consecutive threads, distinct banks).
    __device__ __forceinline__ void save(acc_t* s, int i, int nslots) const {
        s[i] = n;
#pragma unroll
        for (int j = 0; j < L; ++j) {
            s[(1 + j) * nslots + i] = mean[j];
            s[(1 + L + j) * nslots + i] = m2[j];
        }
    }
    __device__ __forceinline__ void load(const acc_t* s, int i, int nslots) {
        n = s[i];
#pragma unroll
        for (int j = 0; j < L; ++j) {
            mean[j] = s[(1 + j) * nslots + i];
            m2[j] = s[(1 + L + j) * nslots + i];
        }
    }
    // Workspace: word w of (partial p, channel c) at ws[w * P * C + p * C + c]; lane j is channel
    // c0 + j. Loads are volatile: other blocks wrote the partials during this launch.
    __device__ __forceinline__ void store_partial(acc_t* ws, index_t idx, index_t pc) const {
#pragma unroll
        for (int j = 0; j < L; ++j) {
            ws[idx + j] = n;
            ws[pc + idx + j] = mean[j];
            ws[2 * pc + idx + j] = m2[j];
        }
    }
    __device__ __forceinline__ void load_partial(const volatile acc_t* ws, index_t idx, index_t pc) {
        n = ws[idx];
#pragma unroll
        for (int j = 0; j < L; ++j) {
            mean[j] = ws[pc + idx + j];
            m2[j] = ws[2 * pc + idx + j];
        }
    }
};

// Backward sums of L lanes: sum(dy) and sum(dy * (x - mean)).
template <int L>
struct BnGradSums {
    static constexpr int kWords = 2 * L;
    acc_t dy[L], dyx[L];

    __device__ __forceinline__ void init() {
#pragma unroll
        for (int j = 0; j < L; ++j) dy[j] = dyx[j] = acc_t(0);
    }
    __device__ __forceinline__ void push(const Vec& g, const Vec& v, const acc_t* mu) {
#pragma unroll
        for (int j = 0; j < L; ++j) {
            const acc_t gj = to_acc(g.v[j]);
            dy[j] += gj;
            dyx[j] += gj * (to_acc(v.v[j]) - mu[j]);
        }
    }
    __device__ __forceinline__ void merge(const BnGradSums& o) {
#pragma unroll
        for (int j = 0; j < L; ++j) {
            dy[j] += o.dy[j];
            dyx[j] += o.dyx[j];
        }
    }
    __device__ __forceinline__ BnGradSums<1> fold() const {
        BnGradSums<1> r;
        r.dy[0] = dy[0];
        r.dyx[0] = dyx[0];
#pragma unroll
        for (int j = 1; j < L; ++j) {
            r.dy[0] += dy[j];
            r.dyx[0] += dyx[j];
        }
        return r;
    }
    __device__ __forceinline__ BnGradSums shfl_down(int off) const {
        BnGradSums o;
#pragma unroll
        for (int j = 0; j < L; ++j) {
            o.dy[j] = __shfl_down_sync(GPU_FULL_MASK, dy[j], off);
            o.dyx[j] = __shfl_down_sync(GPU_FULL_MASK, dyx[j], off);
        }
        return o;
    }
    __device__ __forceinline__ void save(acc_t* s, int i, int nslots) const {
#pragma unroll
        for (int j = 0; j < L; ++j) {
            s[j * nslots + i] = dy[j];
            s[(L + j) * nslots + i] = dyx[j];
        }
    }
    __device__ __forceinline__ void load(const acc_t* s, int i, int nslots) {
#pragma unroll
        for (int j = 0; j < L; ++j) {
            dy[j] = s[j * nslots + i];
            dyx[j] = s[(L + j) * nslots + i];
        }
    }
    __device__ __forceinline__ void store_partial(acc_t* ws, index_t idx, index_t pc) const {
#pragma unroll
        for (int j = 0; j < L; ++j) {
            ws[idx + j] = dy[j];
            ws[pc + idx + j] = dyx[j];
        }
    }
    __device__ __forceinline__ void load_partial(const volatile acc_t* ws, index_t idx, index_t pc) {
#pragma unroll
        for (int j = 0; j < L; ++j) {
            dy[j] = ws[idx + j];
            dyx[j] = ws[pc + idx + j];
        }
    }
};

// ---------------------------------------------------------------------------------------------
// Block and grid merges
// ---------------------------------------------------------------------------------------------

// Merge the states of threads with equal threadIdx.x % S (S a power of two <= blockDim.x).
// The result is in threads threadIdx.x < S. Order: shfl_down pairs within a warp (S < 32), then
// the slots k = 0, 1, ... in shared memory. Every thread must call.
template <class A>
__device__ __forceinline__ A reduce_columns(A a, int S, acc_t* smem) {
    const int tid = threadIdx.x, lane = tid % GPU_WARP, warp = tid / GPU_WARP;
    const int nthreads = blockDim.x;
    if (S < GPU_WARP)
        for (int off = GPU_WARP / 2; off >= S; off >>= 1) a.merge(a.shfl_down(off));
    // Column t's partials now sit in slots t, t + S, t + 2S, ... (K of them).
    const int K = S >= GPU_WARP ? nthreads / S : nthreads / GPU_WARP;
    if (K > 1) {
        if (S >= GPU_WARP || lane < S) a.save(smem, S >= GPU_WARP ? tid : warp * S + lane, nthreads);
        __syncthreads();
        if (tid < S) {
            for (int k = 1; k < K; ++k) {
                A o;
                o.load(smem, k * S + tid, nthreads);
                a.merge(o);
            }
        }
        __syncthreads();
    }
    return a;
}

// After reduce_columns: this block's partial of its tile into the workspace.
template <class A>
__device__ __forceinline__ void store_tile_partial(const A& a, const Tile& t, int C, acc_t* ws) {
    if ((int)threadIdx.x < t.ncols && t.col_active)
        a.store_partial(ws, (index_t)t.part * C + t.c0, (index_t)t.nparts * C);
}

// All nparts partials of the tile merged in partition order (the same order in any block that
// calls it); the result is in threads threadIdx.x < S. Every thread must call.
template <class A>
__device__ __forceinline__ A merge_tile_partials(const Tile& t, int C, const acc_t* ws, acc_t* smem) {
    const index_t pc = (index_t)t.nparts * C;
    A a;
    a.init();
    if (t.col_active) {
        const int step = blockDim.x / t.ncols;
        for (int p = threadIdx.x / t.ncols; p < t.nparts; p += step) {
            A o;
            o.load_partial(ws, (index_t)p * C + t.c0, pc);
            a.merge(o);
        }
    }
    return reduce_columns(a, t.ncols, smem);
}

// After reduce_columns: when the tile has several blocks, each stores its partial and the block
// that arrives last at the tile's counter merges all of them in partition order. Returns true in
// the block holding the tile's final states (in threads threadIdx.x < S).
template <class A>
__device__ __forceinline__ bool merge_grid(A& a, const Tile& t, int C, acc_t* ws, unsigned int* counters,
                                           acc_t* smem, int* is_last) {
    if (t.nparts == 1) return true;
    store_tile_partial(a, t, C, ws);
    __threadfence();  // partials visible device-wide before the counter says so
    __syncthreads();
    if (threadIdx.x == 0) *is_last = atomicAdd(&counters[t.tile], 1u) == (unsigned int)(t.nparts - 1);
    __syncthreads();
    if (!*is_last) return false;
    __threadfence();
    a = merge_tile_partials<A>(t, C, ws, smem);
    return true;
}

// ---------------------------------------------------------------------------------------------
// Statistics and training forward
// ---------------------------------------------------------------------------------------------

struct StatsOut {
    acc_t *mean, *var, *invstd, *scale, *shift, *running_mean, *running_var;
    const acc_t *gamma, *beta;
    acc_t inv_m, unbias, eps, momentum;
    int flags;
};

// Final values of channel c from its merged (mean, m2), written out when `write`; returns
// (mean, scale, shift) for reuse.
__device__ __forceinline__ void finalize_channel(const StatsOut& o, int c, acc_t mu, acc_t m2, bool write,
                                                 acc_t* coef) {
    acc_t var = m2 * o.inv_m;
    var = var < acc_t(0) ? acc_t(0) : var;  // keeps NaN (fmax would not)
    const acc_t invstd = acc_t(1) / sqrt(var + o.eps);
    const acc_t scale = (o.flags & BN_HAS_GAMMA) ? o.gamma[c] * invstd : invstd;
    const acc_t shift = (o.flags & BN_HAS_BETA) ? o.beta[c] : acc_t(0);
    coef[0] = mu;
    coef[1] = scale;
    coef[2] = shift;
    if (!write) return;
    o.mean[c] = mu;
    o.var[c] = var;
    o.invstd[c] = invstd;
    o.scale[c] = scale;
    o.shift[c] = shift;
    if (o.flags & BN_RUNNING) {
        const acc_t keep = acc_t(1) - o.momentum;
        o.running_mean[c] = keep * o.running_mean[c] + o.momentum * mu;
        o.running_var[c] = keep * o.running_var[c] + o.momentum * (var * o.unbias);
    }
}

// Finalize the tile's channels from its merged states (in threads threadIdx.x < S). When
// `coef_smem` is given, also leave word w of (mean, scale, shift) of lane j of column col at
// coef_smem[w * BN_MAX_COLS * VEC + col * L + j], for the block to normalize with.
template <int L>
__device__ __forceinline__ void finalize_tile(const BnWelford<L>& w, const Tile& t, const StatsOut& o, bool write,
                                              acc_t* coef_smem) {
    if ((int)threadIdx.x < t.ncols && t.col_active) {
#pragma unroll
        for (int j = 0; j < L; ++j) {
            acc_t coef[3];
            finalize_channel(o, t.c0 + j, w.mean[j], w.m2[j], write, coef);
            if (coef_smem) {
                const int q = threadIdx.x * L + j;
                coef_smem[q] = coef[0];
                coef_smem[BN_MAX_COLS * VEC + q] = coef[1];
                coef_smem[2 * BN_MAX_COLS * VEC + q] = coef[2];
            }
        }
    }
}

// batch_norm_stats: block reduce, grid merge through the counter, finalize.
template <int L>
__device__ __forceinline__ void finish_stats(BnWelford<L> w, const Tile& t, int C, const StatsOut& o,
                                             acc_t* ws, unsigned int* counters, acc_t* smem, int* is_last) {
    w = reduce_columns(w, t.ncols, smem);
    if (!merge_grid(w, t, C, ws, counters, smem, is_last)) return;
    finalize_tile(w, t, o, true, nullptr);
}

// batch_norm_forward_onchip: block reduce; with several blocks per tile, partials through the workspace
// and a grid barrier, merged by every block; the coefficients into coef_smem. Block part 0 writes
// the statistics.
template <int L>
__device__ __forceinline__ void onchip_stats(BnWelford<L> w, const Tile& t, int C, const StatsOut& o,
                                             acc_t* ws, acc_t* smem, acc_t* coef_smem) {
    w = reduce_columns(w, t.ncols, smem);
    if (t.nparts > 1) {
        store_tile_partial(w, t, C, ws);
        cooperative_groups::this_grid().sync();  // orders the partials' stores before the loads
        w = merge_tile_partials<BnWelford<L>>(t, C, ws, smem);
    }
    finalize_tile(w, t, o, t.part == 0, coef_smem);
}

extern "C" __global__ void __launch_bounds__(BN_MAX_THREADS)
batch_norm_stats(acc_t* mean, acc_t* var, acc_t* invstd, acc_t* scale, acc_t* shift, acc_t* running_mean,
         acc_t* running_var, acc_t* ws, unsigned int* counters, const scalar_t* __restrict__ x,
         const acc_t* __restrict__ gamma, const acc_t* __restrict__ beta, index_t outer, int C,
         index_t inner, int bx, int chunks, acc_t inv_m, acc_t unbias, acc_t eps, acc_t momentum,
         int flags) {
    extern __shared__ acc_t bn_smem[];
    __shared__ int is_last;
    const Tile t = make_tile(outer, C, inner, bx, chunks);
    const StatsOut o = {mean, var, invstd, scale, shift, running_mean, running_var,
                        gamma, beta, inv_m, unbias, eps, momentum, flags};
    BnWelford<VEC> w;
    w.init();
    if (t.active) {
        for (index_t r = t.row; r < t.rows; r += BN_UNROLL * t.step) {
            Vec v[BN_UNROLL];
#pragma unroll
            for (int u = 0; u < BN_UNROLL; ++u)
                if (r + u * t.step < t.rows) v[u] = load_vec(x + (r + u * t.step) * t.stride + t.base);
#pragma unroll
            for (int u = 0; u < BN_UNROLL; ++u)
                if (r + u * t.step < t.rows) w.push(v[u]);
        }
    }
    if (inner == 1)
        finish_stats<VEC>(w, t, C, o, ws, counters, bn_smem, &is_last);
    else
        finish_stats<1>(w.fold(), t, C, o, ws, counters, bn_smem, &is_last);
}

// Every row of the grid in registers: grid = (tiles * chunks, gy), by * gy * BN_ONCHIP_ROWS >= outer.
// gy * chunks == 1: an ordinary launch (ws unused); else a cooperative one with ws holding
// 3 * gy * chunks * C words.
extern "C" __global__ void __launch_bounds__(BN_ONCHIP_THREADS, 1)
batch_norm_forward_onchip(scalar_t* y, acc_t* mean, acc_t* var, acc_t* invstd, acc_t* scale, acc_t* shift,
                  acc_t* running_mean, acc_t* running_var, acc_t* ws, const scalar_t* __restrict__ x,
                  const acc_t* __restrict__ gamma, const acc_t* __restrict__ beta, index_t outer,
                  int C, index_t inner, int bx, int chunks, acc_t inv_m, acc_t unbias, acc_t eps,
                  acc_t momentum, int flags) {
    extern __shared__ acc_t bn_smem[];
    __shared__ acc_t coef_smem[3 * BN_MAX_COLS * VEC];
    const Tile t = make_tile(outer, C, inner, bx, chunks);
    const StatsOut o = {mean, var, invstd, scale, shift, running_mean, running_var,
                        gamma, beta, inv_m, unbias, eps, momentum, flags};
    Vec v[BN_ONCHIP_ROWS];
    BnWelford<VEC> w;
    w.init();
    if (t.active) {
#pragma unroll
        for (int u = 0; u < BN_ONCHIP_ROWS; ++u)
            if (t.row + u * t.step < t.rows) v[u] = load_vec(x + (t.row + u * t.step) * t.stride + t.base);
#pragma unroll
        for (int u = 0; u < BN_ONCHIP_ROWS; ++u)
            if (t.row + u * t.step < t.rows) w.push(v[u]);
    }
    if (inner == 1)
        onchip_stats<VEC>(w, t, C, o, ws, bn_smem, coef_smem);
    else
        onchip_stats<1>(w.fold(), t, C, o, ws, bn_smem, coef_smem);
    __syncthreads();
    if (!t.active) return;
    acc_t mu[VEC], sc[VEC], sh[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
        // channels-last: lane j of column tx is slot tx*VEC + j; channels-first: slot 0
        const int q = inner == 1 ? (int)(threadIdx.x % bx) * VEC + j : 0;
        mu[j] = coef_smem[q];
        sc[j] = coef_smem[BN_MAX_COLS * VEC + q];
        sh[j] = coef_smem[2 * BN_MAX_COLS * VEC + q];
    }
#pragma unroll
    for (int u = 0; u < BN_ONCHIP_ROWS; ++u) {
        if (t.row + u * t.step < t.rows) {
            Vec out;
#pragma unroll
            for (int j = 0; j < VEC; ++j) out.v[j] = from_acc<scalar_t>((to_acc(v[u].v[j]) - mu[j]) * sc[j] + sh[j]);
            store_vec(y + (t.row + u * t.step) * t.stride + t.base, out);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Elementwise passes: y = (x - center) * scale + shift, and dx = k*dy + a*(x - mean) + b
// ---------------------------------------------------------------------------------------------

// Per-channel values of a thread's lanes: lane j is channel c0 + j (channels-last) or c0.
__device__ __forceinline__ void load_channel_values(acc_t* out, const acc_t* __restrict__ p, const Tile& t,
                                                    index_t inner) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = p[inner == 1 ? t.c0 + j : t.c0];
}

template <bool BACKWARD>
__device__ __forceinline__ void apply_rows(scalar_t* out, const scalar_t* __restrict__ dy,
                                           const scalar_t* __restrict__ x, const acc_t* __restrict__ center,
                                           const acc_t* __restrict__ a, const acc_t* __restrict__ b,
                                           const acc_t* __restrict__ k, index_t outer, int C, index_t inner,
                                           int bx, int chunks) {
    const Tile t = make_tile(outer, C, inner, bx, chunks);
    if (!t.active) return;
    acc_t mu[VEC], ca[VEC], cb[VEC], ck[VEC];
    load_channel_values(mu, center, t, inner);
    load_channel_values(ca, a, t, inner);
    load_channel_values(cb, b, t, inner);
    if (BACKWARD) load_channel_values(ck, k, t, inner);
    for (index_t r = t.row; r < t.rows; r += BN_UNROLL * t.step) {
        Vec vx[BN_UNROLL], vg[BN_UNROLL];
#pragma unroll
        for (int u = 0; u < BN_UNROLL; ++u) {
            if (r + u * t.step < t.rows) {
                const index_t off = (r + u * t.step) * t.stride + t.base;
                vx[u] = load_vec(x + off);
                if (BACKWARD) vg[u] = load_vec(dy + off);
            }
        }
#pragma unroll
        for (int u = 0; u < BN_UNROLL; ++u) {
            if (r + u * t.step < t.rows) {
                Vec o;
#pragma unroll
                for (int j = 0; j < VEC; ++j) {
                    acc_t v = (to_acc(vx[u].v[j]) - mu[j]) * ca[j] + cb[j];
                    if (BACKWARD) v += ck[j] * to_acc(vg[u].v[j]);
                    o.v[j] = from_acc<scalar_t>(v);
                }
                store_vec(out + (r + u * t.step) * t.stride + t.base, o);
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(BN_MAX_THREADS)
batch_norm_apply(scalar_t* y, const scalar_t* __restrict__ x, const acc_t* __restrict__ center,
         const acc_t* __restrict__ scale, const acc_t* __restrict__ shift, index_t outer, int C,
         index_t inner, int bx, int chunks) {
    apply_rows<false>(y, nullptr, x, center, scale, shift, nullptr, outer, C, inner, bx, chunks);
}

extern "C" __global__ void __launch_bounds__(BN_MAX_THREADS)
batch_norm_backward_apply(scalar_t* dx, const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                  const acc_t* __restrict__ mean, const acc_t* __restrict__ k,
                  const acc_t* __restrict__ a, const acc_t* __restrict__ b, index_t outer, int C,
                  index_t inner, int bx, int chunks) {
    apply_rows<true>(dx, dy, x, mean, a, b, k, outer, C, inner, bx, chunks);
}

extern "C" __global__ void batch_norm_inference_params(acc_t* scale, acc_t* shift, const acc_t* __restrict__ gamma,
                                               const acc_t* __restrict__ beta,
                                               const acc_t* __restrict__ running_var, int C, acc_t eps,
                                               int flags) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    const acc_t invstd = acc_t(1) / sqrt(running_var[c] + eps);
    scale[c] = (flags & BN_HAS_GAMMA) ? gamma[c] * invstd : invstd;
    shift[c] = (flags & BN_HAS_BETA) ? beta[c] : acc_t(0);
}

// ---------------------------------------------------------------------------------------------
// Backward reduction
// ---------------------------------------------------------------------------------------------

struct GradOut {
    acc_t *dgamma, *dbeta, *k, *a, *b;
    const acc_t *invstd, *gamma;
    acc_t inv_m;
    int flags;
};

template <int L>
__device__ __forceinline__ void finish_grad(BnGradSums<L> s, const Tile& t, int C, const GradOut& o,
                                            acc_t* ws, unsigned int* counters, acc_t* smem, int* is_last) {
    s = reduce_columns(s, t.ncols, smem);
    if (!merge_grid(s, t, C, ws, counters, smem, is_last)) return;
    if ((int)threadIdx.x < t.ncols && t.col_active) {
#pragma unroll
        for (int j = 0; j < L; ++j) {
            const int c = t.c0 + j;
            const acc_t istd = o.invstd[c];
            const acc_t dbeta = s.dy[j], dgamma = s.dyx[j] * istd;
            const acc_t k = (o.flags & BN_HAS_GAMMA) ? o.gamma[c] * istd : istd;
            o.dgamma[c] = dgamma;
            o.dbeta[c] = dbeta;
            o.k[c] = k;
            o.a[c] = -k * istd * dgamma * o.inv_m;
            o.b[c] = -k * dbeta * o.inv_m;
        }
    }
}

extern "C" __global__ void __launch_bounds__(BN_MAX_THREADS)
batch_norm_backward_reduce(acc_t* dgamma, acc_t* dbeta, acc_t* k, acc_t* a, acc_t* b, acc_t* ws,
                   unsigned int* counters, const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                   const acc_t* __restrict__ mean, const acc_t* __restrict__ invstd,
                   const acc_t* __restrict__ gamma, index_t outer, int C, index_t inner, int bx,
                   int chunks, acc_t inv_m, int flags) {
    extern __shared__ acc_t bn_smem[];
    __shared__ int is_last;
    const Tile t = make_tile(outer, C, inner, bx, chunks);
    const GradOut o = {dgamma, dbeta, k, a, b, invstd, gamma, inv_m, flags};
    BnGradSums<VEC> s;
    s.init();
    if (t.active) {
        acc_t mu[VEC];
        load_channel_values(mu, mean, t, inner);
        for (index_t r = t.row; r < t.rows; r += BN_UNROLL * t.step) {
            Vec vg[BN_UNROLL], vx[BN_UNROLL];
#pragma unroll
            for (int u = 0; u < BN_UNROLL; ++u) {
                if (r + u * t.step < t.rows) {
                    const index_t off = (r + u * t.step) * t.stride + t.base;
                    vg[u] = load_vec(dy + off);
                    vx[u] = load_vec(x + off);
                }
            }
#pragma unroll
            for (int u = 0; u < BN_UNROLL; ++u)
                if (r + u * t.step < t.rows) s.push(vg[u], vx[u], mu);
        }
    }
    if (inner == 1)
        finish_grad<VEC>(s, t, C, o, ws, counters, bn_smem, &is_last);
    else
        finish_grad<1>(s.fold(), t, C, o, ws, counters, bn_smem, &is_last);
}
