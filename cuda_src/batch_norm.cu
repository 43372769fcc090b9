// batch_norm.cu: batch statistics, batch-norm forward (training), inference and backward.
//
// @variants [{"BN_VECTOR": 1}, {"BN_VECTOR": 0}, {"BN_VECTOR": 1, "BN_EPILOGUE": 1}, {"BN_VECTOR": 0, "BN_EPILOGUE": 1}]
// @headers channels.cuh
//
// Every kernel walks the (outer, C, inner) view of the per-channel reduction engine (channels.cuh:
// the view, the tile geometry, the launch shape and the merge order): a thread owns one vector of
// VEC contiguous elements and visits it in every row it is given, BN_UNROLL rows of loads in
// flight. The module built with BN_VECTOR=0 (scalar loads, same kernels) runs when the row length
// is not a multiple of VEC or a pointer is not 16-byte aligned.
//
// Kernels (one per op and path):
//   batch_norm_stats            per-channel Welford partials -> block -> grid; the last block of a tile
//                       finalizes: mean, biased var, invstd = 1/sqrt(var+eps), the affine
//                       coefficients scale = gamma*invstd and shift = beta, and the running-stat
//                       update r = (1-momentum)*r + momentum*stat (var unbiased by M/(M-1)).
//   batch_norm_apply            y = (x - center[c]) * scale[c] + shift[c]: the training forward's second
//                       pass (center = batch mean) and inference (center = running mean).
//   batch_norm_forward_onchip   training forward with x held on chip (BN_ONCHIP_ROWS rows per thread in
//                       registers, then up to cache_rows more in the row cache, shared memory; at
//                       most BN_ONCHIP_THREADS threads) from the statistics to the normalization:
//                       stats, finalize and normalize in one launch, x read once.
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
//   batch_norm_backward_onchip  both in one launch with dy and x held on chip (BN_BACKWARD_ROWS[_16BIT] rows of
//                       each in registers, then the row cache), as batch_norm_forward_onchip: the
//                       sums, a grid barrier when several blocks share a tile, every block merging
//                       the tile's partials, dx from the coefficients; block part 0 writes dgamma
//                       and dbeta.
//
// Persistent forward (and backward: batch_norm_backward_onchip does the same with its sums). With
// several blocks per tile, batch_norm_forward_onchip cannot wait for the last
// block to finalize (the others would have to drop their rows): each block stores its partial in
// the workspace, grid.sync() (cooperative_groups; the launch is cooperative, so the grid must fit
// the device at once: gpu/_engines/channels.py sizes it from max_cooperative_grid), then every block merges
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
//   backward, on chip                 3 E*s                (batch_norm_backward_onchip: dy, x read once)
//   backward, two kernels             5 E*s                (batch_norm_backward_reduce reads dy, x;
//                                                           batch_norm_backward_apply reads dy, x, writes dx)
// The on-chip paths run where the tile's rows fit its blocks' registers and shared memory, the
// blocks of a persistent grid all resident at once (an H200: about 30 MB of x forward, of x and
// dy together backward): gpu/_engines/channels.py (_onchip_choice) picks the path.
//
// Accumulation in ACC_T (float for half/bfloat16/float, double for double); x, y, dy, dx in
// SCALAR_T; every per-channel array (gamma, beta, running stats, mean, invstd, coefficients,
// workspace) in ACC_T (the Python side converts mixed parameter dtypes). Element offsets are
// index_t (64 bits); C < 2^31. Blocks: 1-D, a multiple of 32 threads, <= BN_MAX_THREADS; bx a
// power of two; dynamic shared memory = blockDim.x * (1 + 3*VEC) * sizeof(ACC_T) (the backward's
// sums: 2*VEC), plus the on-chip kernels' row cache: cache_rows * blockDim.x vectors (backward:
// twice that).
//
// The epilogue (the modules built with BN_EPILOGUE=1; the same kernels): each output step of the
// forward, the inference and the backward fuses what follows a batch norm in a residual block,
//   forward, inference   y = act(bn(x) + residual): residual read where y is written, the sum in
//                        ACC_T rounded once; act = relu keeps a NaN (torch's clamp_min)
//   backward             dz = dy where y > 0, else 0 (relu's gradient from the forward's y, torch's
//                        threshold_backward): the sums and dx use dz; dresidual = dz written with dx
// Which half runs is a launch flag (BN_RESIDUAL, BN_RELU); the statistics are x's alone. residual,
// y and dresidual have x's (outer, C, inner) view. Bytes: forward on chip 3 E*s (x, residual read,
// y written), inference 3 E*s, backward on chip 5 E*s (dy, y, x read; dx, dresidual written),
// two kernels 8 E*s. The BN_EPILOGUE=0 modules take the same arguments and never touch them.
//
// Special values (PyTorch's answers unless said): statistics stay finite whenever the true
// variance is (channels.cuh's scaled Welford); an inf in a channel gives mean inf, var NaN; a NaN,
// or +inf with -inf, NaN; var + eps == 0 (eps = 0, a constant channel) gives invstd 0, so y = beta
// (PyTorch's native op; in inference too, where PyTorch gives NaN).

#include <cooperative_groups.h>

#define BN_MAX_THREADS 512   // largest block any launch uses (bounds the register budget: 128 a thread;
                             // bfloat16 batch_norm_backward_reduce takes all 128 at sm_90, NVRTC 12, with no
                             // spill: at the planned 256 threads that is 2 blocks an SM, as float16's 85 give)
#define BN_UNROLL 4          // rows of loads in flight per thread in the streaming loops
#define BN_ONCHIP_ROWS 8     // rows per thread batch_norm_forward_onchip keeps in registers
#define BN_ONCHIP_THREADS 256  // its largest block; one block per SM may use up to 255 registers
                               // (NVRTC 12, sm_90, float32/float16/bfloat16/float64: 162/180/242/176, as
                               // the register rows, two batches of the row cache's fill and their float
                               // copies stay live; batch_norm_backward_onchip 198/174/241/191)
#define BN_BACKWARD_ROWS 8   // rows of dy and x per thread batch_norm_backward_onchip keeps in registers
#define BN_BACKWARD_ROWS_16BIT 4  // the same for half and bfloat16 (their float copies: bfloat16 at 8 rows
                                  // takes 254 registers at sm_90)
#define BN_CACHE_UNROLL 8    // rows in one batch of the on-chip kernels' row-cache fill (software-pipelined:
                             // one batch's loads in flight while the batch before is pushed)
// the fill loops' iterations unrolled: 2 lets the pipeline's next batch take the registers of the one
// before instead of a copy; 16-bit types (their float copies) spill at 2 on sm_90
#define BN_FILL_UNROLL (sizeof(scalar_t) >= 4 ? 2 : 1)
#define BN_MAX_COLS 64       // largest bx of a channels-last tile (bounds batch_norm_forward_onchip's smem)

// flags (host: gpu/ops/batch_norm/kernel_path.py, _flags)
#define BN_HAS_GAMMA 1       // gamma given (else 1)
#define BN_HAS_BETA 2        // beta given (else 0)
#define BN_RUNNING 4         // update running_mean / running_var
#define BN_CUMULATIVE 8      // momentum = 1 / batches[0] (PyTorch's momentum=None)
#define BN_PARAMS_THREADS 256  // block of batch_norm_inference_params (one thread per channel)
#define BN_RESIDUAL 16       // the epilogue: add residual (forward, inference); write dresidual (backward)
#define BN_RELU 32           // the epilogue: relu after the add (forward, inference); dy masked by y > 0

#ifndef BN_EPILOGUE
#define BN_EPILOGUE 0        // 1: the output steps have the epilogue (the flags above choose its halves)
#endif

// ---------------------------------------------------------------------------------------------
// The normalization of a channel as an affine map: y = (x - center) * scale + shift
// ---------------------------------------------------------------------------------------------
// Spelled once: the statistics finalize, the inference parameters and the backward's k build the
// coefficients here, and the on-chip forward and the apply passes normalize here, so every path
// gives the same bits for the same statistics.

struct Affine { acc_t scale, shift; };

// 0 when var + eps == 0 (eps = 0, a constant channel): y = beta, as PyTorch's native op.
__device__ __forceinline__ acc_t bn_invstd(acc_t var, acc_t eps) {
    const acc_t v = var + eps;
    return v == acc_t(0) ? acc_t(0) : acc_t(1) / sqrt(v);
}

// scale = gamma * invstd, shift = beta; an absent gamma is 1 and an absent beta 0 (flags).
__device__ __forceinline__ Affine bn_affine(acc_t invstd, const acc_t* gamma, const acc_t* beta, int c,
                                            int flags) {
    Affine f;
    f.scale = (flags & BN_HAS_GAMMA) ? gamma[c] * invstd : invstd;
    f.shift = (flags & BN_HAS_BETA) ? beta[c] : acc_t(0);
    return f;
}

// center: the batch mean (training) or the running mean (inference). The backward's
// a*(x - mean) + b is the same map with its own coefficients.
__device__ __forceinline__ acc_t bn_apply(acc_t x, acc_t center, acc_t scale, acc_t shift) {
    return (x - center) * scale + shift;
}

// ---------------------------------------------------------------------------------------------
// The on-chip kernels' rows: registers, then the row cache
// ---------------------------------------------------------------------------------------------
// batch_norm_forward_onchip and batch_norm_backward_onchip hold every row a thread visits from the
// reduction to the elementwise pass: the first ones in registers, up to `cache_rows` more in the
// row cache, dynamic shared memory after the reduction's area (blockDim.x * kWords words, a
// multiple of 16 bytes). Cached row k of thread i is slot k * blockDim.x + i: consecutive threads
// store and load consecutive 16-byte slots (st.shared.v4 / ld.shared.v4, no bank conflict), and
// each thread reads back only what it wrote, so no barrier orders the two.

__device__ __forceinline__ Vec* row_cache(acc_t* smem, int words) {
    return reinterpret_cast<Vec*>(smem + blockDim.x * words);
}

// Whether cached row k (of row r0 + k * step) is one of the thread's rows.
__device__ __forceinline__ bool cached_row(const Tile& t, index_t r0, int k, int cache_rows) {
    return k < cache_rows && r0 + k * t.step < t.rows;
}

__device__ __forceinline__ Vec normalize_vec(const Vec& v, const acc_t* mu, const acc_t* sc, const acc_t* sh) {
    Vec out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) out.v[j] = from_acc<scalar_t>(bn_apply(to_acc(v.v[j]), mu[j], sc[j], sh[j]));
    return out;
}

// dx = k*dy + a*(x - mean) + b, lane by lane.
__device__ __forceinline__ Vec grad_vec(const Vec& g, const Vec& v, const acc_t* mu, const acc_t* ca,
                                        const acc_t* cb, const acc_t* ck) {
    Vec out;
#pragma unroll
    for (int j = 0; j < VEC; ++j)
        out.v[j] = from_acc<scalar_t>(bn_apply(to_acc(v.v[j]), mu[j], ca[j], cb[j]) + ck[j] * to_acc(g.v[j]));
    return out;
}

// ---------------------------------------------------------------------------------------------
// The epilogue of the output steps (BN_EPILOGUE modules; see the header comment)
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ acc_t bn_relu(acc_t v) { return v < acc_t(0) ? acc_t(0) : v; }   // NaN stays

// The forward's (and inference's) output vector at element offset `off`: normalized, then
// act(. + residual) before the one rounding to scalar_t.
__device__ __forceinline__ Vec output_vec(const Vec& v, const acc_t* mu, const acc_t* sc, const acc_t* sh,
                                          const scalar_t* __restrict__ residual, index_t off, int flags) {
#if BN_EPILOGUE
    Vec r = v;
    const bool add = (flags & BN_RESIDUAL) != 0;
    if (add) r = load_vec(residual + off);
    Vec out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
        acc_t o = bn_apply(to_acc(v.v[j]), mu[j], sc[j], sh[j]);
        if (add) o += to_acc(r.v[j]);
        if (flags & BN_RELU) o = bn_relu(o);
        out.v[j] = from_acc<scalar_t>(o);
    }
    return out;
#else
    (void)residual; (void)off; (void)flags;
    return normalize_vec(v, mu, sc, sh);
#endif
}

// g (dy's vector at `off`) where y > 0, else 0: relu's gradient, from the forward's output.
__device__ __forceinline__ Vec relu_mask(Vec g, const scalar_t* __restrict__ y, index_t off) {
    const Vec m = load_vec(y + off);
#pragma unroll
    for (int j = 0; j < VEC; ++j)
        if (!(to_acc(m.v[j]) > acc_t(0))) g.v[j] = from_acc<scalar_t>(acc_t(0));
    return g;
}

// dy at `off`, masked by y > 0 under BN_RELU: what reaches the batch norm through the relu.
__device__ __forceinline__ Vec load_grad(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ y,
                                         index_t off, int flags) {
    Vec g = load_vec(dy + off);
#if BN_EPILOGUE
    if (flags & BN_RELU) g = relu_mask(g, y, off);
#else
    (void)y; (void)flags;
#endif
    return g;
}

// dresidual = the masked dy, stored with dx under BN_RESIDUAL.
__device__ __forceinline__ void store_residual_grad(scalar_t* dresidual, index_t off, const Vec& g, int flags) {
#if BN_EPILOGUE
    if (flags & BN_RESIDUAL) store_vec(dresidual + off, g);
#else
    (void)dresidual; (void)off; (void)g; (void)flags;
#endif
}

// A thread's lanes' coefficients from the three rows of coef_smem that a finalize left
// (channels-last: lane j of column tx is slot tx*VEC + j; channels-first: slot 0).
__device__ __forceinline__ void coefficients_of(acc_t* c0, acc_t* c1, acc_t* c2, const acc_t* coef_smem, int bx,
                                                index_t inner) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
        const int q = inner == 1 ? (int)(threadIdx.x % bx) * VEC + j : 0;
        c0[j] = coef_smem[q];
        c1[j] = coef_smem[BN_MAX_COLS * VEC + q];
        c2[j] = coef_smem[2 * BN_MAX_COLS * VEC + q];
    }
}

// ---------------------------------------------------------------------------------------------
// Statistics and training forward
// ---------------------------------------------------------------------------------------------

struct StatsOut {
    acc_t *mean, *var, *invstd, *scale, *shift, *running_mean, *running_var;
    const acc_t *gamma, *beta;
    const long long* batches;
    acc_t inv_m, unbias, eps, momentum;
    int flags;
};

// Final values of channel c from its merged mean and biased variance, written out when `write`;
// returns (mean, scale, shift) for reuse.
__device__ __forceinline__ void finalize_channel(const StatsOut& o, int c, acc_t mu, acc_t var, bool write,
                                                 acc_t* coef) {
    const acc_t invstd = bn_invstd(var, o.eps);
    const Affine f = bn_affine(invstd, o.gamma, o.beta, c, o.flags);
    coef[0] = mu;
    coef[1] = f.scale;
    coef[2] = f.shift;
    if (!write) return;
    o.mean[c] = mu;
    o.var[c] = var;
    o.invstd[c] = invstd;
    o.scale[c] = f.scale;
    o.shift[c] = f.shift;
    if (o.flags & BN_RUNNING) {
        // momentum=None: the cumulative average, from the count the host incremented (no sync)
        const acc_t momentum = (o.flags & BN_CUMULATIVE) ? acc_t(1) / acc_t(o.batches[0]) : o.momentum;
        const acc_t keep = acc_t(1) - momentum;
        o.running_mean[c] = keep * o.running_mean[c] + momentum * mu;
        o.running_var[c] = keep * o.running_var[c] + momentum * (var * o.unbias);
    }
}

// The final values of lane j (channel c) of merged statistics: finalize_channel.
template <int L>
__device__ __forceinline__ void finalize_lane(const StatsOut& o, const BnWelford<L>& w, int j, int c, bool write,
                                              acc_t* coef) {
    finalize_channel(o, c, w.mean[j], w.variance(j, o.inv_m), write, coef);
}

// ---------------------------------------------------------------------------------------------
// A tile's reduction, end to end (A: BnWelford with StatsOut, or BnGradSums with GradOut)
// ---------------------------------------------------------------------------------------------

// Finalize the tile's channels from its merged partials (in threads threadIdx.x < S). When
// `coef_smem` is given, also leave word w of the three coefficients of lane j of column col at
// coef_smem[w * BN_MAX_COLS * VEC + col * L + j], for the block to apply.
template <class A, class Out>
__device__ __forceinline__ void finalize_tile(const A& a, const Tile& t, const Out& o, bool write,
                                              acc_t* coef_smem) {
    if ((int)threadIdx.x < t.ncols && t.col_active) {
#pragma unroll
        for (int j = 0; j < A::kLanes; ++j) {
            acc_t coef[3];
            finalize_lane(o, a, j, t.c0 + j, write, coef);
            if (coef_smem) {
                const int q = threadIdx.x * A::kLanes + j;
                coef_smem[q] = coef[0];
                coef_smem[BN_MAX_COLS * VEC + q] = coef[1];
                coef_smem[2 * BN_MAX_COLS * VEC + q] = coef[2];
            }
        }
    }
}

// The streaming kernels (batch_norm_stats, batch_norm_backward_reduce): block reduce, grid merge
// through the counter, the last block finalizes.
template <class A, class Out>
__device__ __forceinline__ void finish_streaming(A a, const Tile& t, int C, const Out& o, acc_t* ws,
                                                 unsigned int* counters, acc_t* smem) {
    a = reduce_columns(a, t.ncols, smem);
    if (!merge_grid(a, t, C, ws, counters, smem)) return;
    finalize_tile(a, t, o, true, nullptr);
}

// The on-chip kernels: block reduce; with several blocks per tile, partials through the workspace
// and a grid barrier, merged by every block; the coefficients into coef_smem. Block part 0 writes
// the per-channel outputs.
template <class A, class Out>
__device__ __forceinline__ void finish_onchip(A a, const Tile& t, int C, const Out& o, acc_t* ws, acc_t* smem,
                                              acc_t* coef_smem) {
    a = reduce_columns(a, t.ncols, smem);
    if (t.nparts > 1) {
        store_tile_partial(a, t, C, ws);
        cooperative_groups::this_grid().sync();  // orders the partials' stores before the loads
        a = merge_tile_partials<A, true>(t, C, ws, smem);
    }
    finalize_tile(a, t, o, t.part == 0, coef_smem);
}

extern "C" __global__ void __launch_bounds__(BN_MAX_THREADS)
batch_norm_stats(acc_t* mean, acc_t* var, acc_t* invstd, acc_t* scale, acc_t* shift, acc_t* running_mean,
         acc_t* running_var, acc_t* ws, unsigned int* counters, const scalar_t* __restrict__ x,
         const long long* __restrict__ batches,
         const acc_t* __restrict__ gamma, const acc_t* __restrict__ beta, index_t outer, int C,
         index_t inner, int bx, int chunks, acc_t inv_m, acc_t unbias, acc_t eps, acc_t momentum,
         int flags) {
    extern __shared__ __align__(16) acc_t bn_smem[];
    const Tile t = make_tile(outer, C, inner, bx, chunks);
    const StatsOut o = {mean, var, invstd, scale, shift, running_mean, running_var,
                        gamma, beta, batches, inv_m, unbias, eps, momentum, flags};
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
        finish_streaming(w, t, C, o, ws, counters, bn_smem);
    else
        finish_streaming(w.fold(), t, C, o, ws, counters, bn_smem);
}

// Every row of the grid on chip: grid = (tiles * chunks, gy), by * gy * (BN_ONCHIP_ROWS + cache_rows)
// >= outer; a thread's first BN_ONCHIP_ROWS rows in registers, the next cache_rows in the row cache
// (dynamic shared memory after the reduction's area). gy * chunks == 1: an ordinary launch (ws
// unused); else a cooperative one with ws holding 4 * gy * chunks * C words.
extern "C" __global__ void __launch_bounds__(BN_ONCHIP_THREADS, 1)
batch_norm_forward_onchip(scalar_t* y, acc_t* mean, acc_t* var, acc_t* invstd, acc_t* scale, acc_t* shift,
                  acc_t* running_mean, acc_t* running_var, acc_t* ws, const scalar_t* __restrict__ x,
                  const scalar_t* __restrict__ residual, const long long* __restrict__ batches,
                  const acc_t* __restrict__ gamma, const acc_t* __restrict__ beta, index_t outer,
                  int C, index_t inner, int bx, int chunks, acc_t inv_m, acc_t unbias, acc_t eps,
                  acc_t momentum, int flags, int cache_rows) {
    extern __shared__ __align__(16) acc_t bn_smem[];
    __shared__ acc_t coef_smem[3 * BN_MAX_COLS * VEC];
    const Tile t = make_tile(outer, C, inner, bx, chunks);
    const StatsOut o = {mean, var, invstd, scale, shift, running_mean, running_var,
                        gamma, beta, batches, inv_m, unbias, eps, momentum, flags};
    Vec* cache = row_cache(bn_smem, BnWelford<VEC>::kWords);
    const index_t r0 = t.row + (index_t)BN_ONCHIP_ROWS * t.step;   // the cache's first row
    Vec v[BN_ONCHIP_ROWS];
    BnWelford<VEC> w;
    w.init();
    if (t.active) {
#pragma unroll
        for (int u = 0; u < BN_ONCHIP_ROWS; ++u)
            if (t.row + u * t.step < t.rows) v[u] = load_vec(x + (t.row + u * t.step) * t.stride + t.base);
        // Software pipeline: the loads of the row cache's batch k + BN_CACHE_UNROLL are issued
        // before the pushes of batch k (and batch 0's before the register rows' pushes), so a
        // batch of loads is in flight while the previous one is reduced. Same push order: same bits.
        Vec c[BN_CACHE_UNROLL];
#pragma unroll
        for (int u = 0; u < BN_CACHE_UNROLL; ++u)
            if (cached_row(t, r0, u, cache_rows)) c[u] = load_vec(x + (r0 + u * t.step) * t.stride + t.base);
#pragma unroll
        for (int u = 0; u < BN_ONCHIP_ROWS; ++u)
            if (t.row + u * t.step < t.rows) w.push(v[u]);
#pragma unroll (BN_FILL_UNROLL)
        for (int k = 0; k < cache_rows && r0 + k * t.step < t.rows; k += BN_CACHE_UNROLL) {
            Vec n[BN_CACHE_UNROLL];
#pragma unroll
            for (int u = 0; u < BN_CACHE_UNROLL; ++u) {
                const int kn = k + BN_CACHE_UNROLL + u;
                if (cached_row(t, r0, kn, cache_rows)) n[u] = load_vec(x + (r0 + kn * t.step) * t.stride + t.base);
            }
#pragma unroll
            for (int u = 0; u < BN_CACHE_UNROLL; ++u) {
                if (cached_row(t, r0, k + u, cache_rows)) {
                    w.push(c[u]);
                    cache[(k + u) * blockDim.x + threadIdx.x] = c[u];
                }
            }
#pragma unroll
            for (int u = 0; u < BN_CACHE_UNROLL; ++u) c[u] = n[u];
        }
    }
    if (inner == 1)
        finish_onchip(w, t, C, o, ws, bn_smem, coef_smem);
    else
        finish_onchip(w.fold(), t, C, o, ws, bn_smem, coef_smem);
    __syncthreads();
    if (!t.active) return;
    acc_t mu[VEC], sc[VEC], sh[VEC];
    coefficients_of(mu, sc, sh, coef_smem, bx, inner);
#pragma unroll
    for (int u = 0; u < BN_ONCHIP_ROWS; ++u) {
        if (t.row + u * t.step < t.rows) {
            const index_t off = (t.row + u * t.step) * t.stride + t.base;
            store_vec(y + off, output_vec(v[u], mu, sc, sh, residual, off, flags));
        }
    }
#pragma unroll 4
    for (int k = 0; k < cache_rows; ++k) {  // each thread reads back only its own slots: no barrier
        if (cached_row(t, r0, k, cache_rows)) {
            const index_t off = (r0 + k * t.step) * t.stride + t.base;
            store_vec(y + off, output_vec(cache[k * blockDim.x + threadIdx.x], mu, sc, sh, residual, off, flags));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Elementwise passes: y = (x - center) * scale + shift, and dx = k*dy + a*(x - mean) + b
// ---------------------------------------------------------------------------------------------

// aux: the forward's residual, or the backward's y (relu's mask); out2: the backward's dresidual.
template <bool BACKWARD>
__device__ __forceinline__ void apply_rows(scalar_t* out, scalar_t* out2, const scalar_t* __restrict__ dy,
                                           const scalar_t* __restrict__ x, const scalar_t* __restrict__ aux,
                                           const acc_t* __restrict__ center,
                                           const acc_t* __restrict__ a, const acc_t* __restrict__ b,
                                           const acc_t* __restrict__ k, index_t outer, int C, index_t inner,
                                           int bx, int chunks, int flags) {
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
                if (BACKWARD) vg[u] = load_grad(dy, aux, off, flags);
            }
        }
#pragma unroll
        for (int u = 0; u < BN_UNROLL; ++u) {
            if (r + u * t.step < t.rows) {
                const index_t off = (r + u * t.step) * t.stride + t.base;
                Vec o;
                if constexpr (BACKWARD) {
                    o = grad_vec(vg[u], vx[u], mu, ca, cb, ck);
                    store_residual_grad(out2, off, vg[u], flags);
                } else {
                    o = output_vec(vx[u], mu, ca, cb, aux, off, flags);
                }
                store_vec(out + off, o);
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(BN_MAX_THREADS)
batch_norm_apply(scalar_t* y, const scalar_t* __restrict__ x, const scalar_t* __restrict__ residual,
         const acc_t* __restrict__ center, const acc_t* __restrict__ scale, const acc_t* __restrict__ shift,
         index_t outer, int C, index_t inner, int bx, int chunks, int flags) {
    apply_rows<false>(y, nullptr, nullptr, x, residual, center, scale, shift, nullptr, outer, C, inner, bx, chunks,
                      flags);
}

extern "C" __global__ void __launch_bounds__(BN_MAX_THREADS)
batch_norm_backward_apply(scalar_t* dx, scalar_t* dresidual, const scalar_t* __restrict__ dy,
                  const scalar_t* __restrict__ x, const scalar_t* __restrict__ y,
                  const acc_t* __restrict__ mean, const acc_t* __restrict__ k,
                  const acc_t* __restrict__ a, const acc_t* __restrict__ b, index_t outer, int C,
                  index_t inner, int bx, int chunks, int flags) {
    apply_rows<true>(dx, dresidual, dy, x, y, mean, a, b, k, outer, C, inner, bx, chunks, flags);
}

extern "C" __global__ void __launch_bounds__(BN_PARAMS_THREADS)
batch_norm_inference_params(acc_t* scale, acc_t* shift, const acc_t* __restrict__ gamma, const acc_t* __restrict__ beta,
                            const acc_t* __restrict__ running_var, int C, acc_t eps, int flags) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    const Affine f = bn_affine(bn_invstd(running_var[c], eps), gamma, beta, c, flags);
    scale[c] = f.scale;
    shift[c] = f.shift;
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

// Channel c's gradient coefficients from its sums: dgamma, dbeta written out when `write` (and
// k, a, b too when o.k is given: the streaming path's second kernel reads them); (k, a, b) left in
// coef for reuse.
__device__ __forceinline__ void grad_channel(const GradOut& o, int c, acc_t sum_dy, acc_t sum_dyx, bool write,
                                             acc_t* coef) {
    const acc_t istd = o.invstd[c];
    const acc_t dbeta = sum_dy, dgamma = sum_dyx * istd;
    // k is the forward's scale; beta plays no part in dx
    const acc_t k = bn_affine(istd, o.gamma, nullptr, c, o.flags & BN_HAS_GAMMA).scale;
    coef[0] = k;
    coef[1] = -k * istd * dgamma * o.inv_m;
    coef[2] = -k * dbeta * o.inv_m;
    if (!write) return;
    o.dgamma[c] = dgamma;
    o.dbeta[c] = dbeta;
    if (o.k) {
        o.k[c] = coef[0];
        o.a[c] = coef[1];
        o.b[c] = coef[2];
    }
}

template <int L>
__device__ __forceinline__ void finalize_lane(const GradOut& o, const BnGradSums<L>& s, int j, int c, bool write,
                                              acc_t* coef) {
    grad_channel(o, c, s.dy[j], s.dyx[j], write, coef);
}

extern "C" __global__ void __launch_bounds__(BN_MAX_THREADS)
batch_norm_backward_reduce(acc_t* dgamma, acc_t* dbeta, acc_t* k, acc_t* a, acc_t* b, acc_t* ws,
                   unsigned int* counters, const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                   const scalar_t* __restrict__ y, const acc_t* __restrict__ mean, const acc_t* __restrict__ invstd,
                   const acc_t* __restrict__ gamma, index_t outer, int C, index_t inner, int bx,
                   int chunks, acc_t inv_m, int flags) {
    extern __shared__ __align__(16) acc_t bn_smem[];
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
#if BN_EPILOGUE
            if (flags & BN_RELU) {   // after the loads (masking in the load loop spilled at sm_80/sm_90)
#pragma unroll
                for (int u = 0; u < BN_UNROLL; ++u)
                    if (r + u * t.step < t.rows) vg[u] = relu_mask(vg[u], y, (r + u * t.step) * t.stride + t.base);
            }
#endif
#pragma unroll
            for (int u = 0; u < BN_UNROLL; ++u)
                if (r + u * t.step < t.rows) s.push(vg[u], vx[u], mu);
        }
    }
    if (inner == 1)
        finish_streaming(s, t, C, o, ws, counters, bn_smem);
    else
        finish_streaming(s.fold(), t, C, o, ws, counters, bn_smem);
}

// The backward with x and dy on chip, dx = k*dy + a*(x - mean) + b from sums it reduced itself:
// dy and x read once (3 E*s with dx). The launch of batch_norm_forward_onchip: grid = (tiles *
// chunks, gy), by * gy * (kRows + cache_rows) >= outer (kRows: BN_BACKWARD_ROWS, or _16BIT for
// 16-bit types), the row cache holding cache_rows rows of dy and then as many of x; gy * chunks
// == 1 an ordinary launch, else a cooperative one with ws holding 2 * gy * chunks * C words.
extern "C" __global__ void __launch_bounds__(BN_ONCHIP_THREADS, 1)
batch_norm_backward_onchip(scalar_t* dx, scalar_t* dresidual, acc_t* dgamma, acc_t* dbeta, acc_t* ws,
                           const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                           const scalar_t* __restrict__ y, const acc_t* __restrict__ mean,
                           const acc_t* __restrict__ invstd, const acc_t* __restrict__ gamma, index_t outer,
                           int C, index_t inner, int bx, int chunks, acc_t inv_m, int flags, int cache_rows) {
    extern __shared__ __align__(16) acc_t bn_smem[];
    __shared__ acc_t coef_smem[3 * BN_MAX_COLS * VEC];
    const Tile t = make_tile(outer, C, inner, bx, chunks);
    const GradOut o = {dgamma, dbeta, nullptr, nullptr, nullptr, invstd, gamma, inv_m, flags};
    Vec* cache_dy = row_cache(bn_smem, BnGradSums<VEC>::kWords);
    Vec* cache_x = cache_dy + cache_rows * blockDim.x;
    constexpr int kRows = sizeof(scalar_t) >= 4 ? BN_BACKWARD_ROWS : BN_BACKWARD_ROWS_16BIT;
    const index_t r0 = t.row + (index_t)kRows * t.step;
    Vec vg[kRows], vx[kRows];
    acc_t mu[VEC];
    BnGradSums<VEC> s;
    s.init();
    if (t.active) {
        load_channel_values(mu, mean, t, inner);
#pragma unroll
        for (int u = 0; u < kRows; ++u) {
            if (t.row + u * t.step < t.rows) {
                const index_t off = (t.row + u * t.step) * t.stride + t.base;
                vg[u] = load_grad(dy, y, off, flags);
                vx[u] = load_vec(x + off);
            }
        }
        // Software pipeline, as batch_norm_forward_onchip's: batch k + kBatch's loads are issued
        // before batch k's pushes, batch 0's before the register rows' pushes.
        constexpr int kBatch = BN_CACHE_UNROLL / 2;
        Vec cg[kBatch], cx[kBatch];
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
            if (cached_row(t, r0, u, cache_rows)) {
                const index_t off = (r0 + u * t.step) * t.stride + t.base;
                cg[u] = load_grad(dy, y, off, flags);
                cx[u] = load_vec(x + off);
            }
        }
#pragma unroll
        for (int u = 0; u < kRows; ++u)
            if (t.row + u * t.step < t.rows) s.push(vg[u], vx[u], mu);
#pragma unroll (BN_FILL_UNROLL)
        for (int k = 0; k < cache_rows && r0 + k * t.step < t.rows; k += kBatch) {
            Vec ng[kBatch], nx[kBatch];
#pragma unroll
            for (int u = 0; u < kBatch; ++u) {
                const int kn = k + kBatch + u;
                if (cached_row(t, r0, kn, cache_rows)) {
                    const index_t off = (r0 + kn * t.step) * t.stride + t.base;
                    ng[u] = load_grad(dy, y, off, flags);
                    nx[u] = load_vec(x + off);
                }
            }
#pragma unroll
            for (int u = 0; u < kBatch; ++u) {
                if (cached_row(t, r0, k + u, cache_rows)) {
                    s.push(cg[u], cx[u], mu);
                    cache_dy[(k + u) * blockDim.x + threadIdx.x] = cg[u];
                    cache_x[(k + u) * blockDim.x + threadIdx.x] = cx[u];
                }
            }
#pragma unroll
            for (int u = 0; u < kBatch; ++u) {
                cg[u] = ng[u];
                cx[u] = nx[u];
            }
        }
    }
    if (inner == 1)
        finish_onchip(s, t, C, o, ws, bn_smem, coef_smem);
    else
        finish_onchip(s.fold(), t, C, o, ws, bn_smem, coef_smem);
    __syncthreads();
    if (!t.active) return;
    acc_t ck[VEC], ca[VEC], cb[VEC];
    coefficients_of(ck, ca, cb, coef_smem, bx, inner);
#pragma unroll
    for (int u = 0; u < kRows; ++u) {
        if (t.row + u * t.step < t.rows) {
            const index_t off = (t.row + u * t.step) * t.stride + t.base;
            store_vec(dx + off, grad_vec(vg[u], vx[u], mu, ca, cb, ck));
            store_residual_grad(dresidual, off, vg[u], flags);
        }
    }
#pragma unroll 4
    for (int k = 0; k < cache_rows; ++k) {
        if (cached_row(t, r0, k, cache_rows)) {
            const int i = k * blockDim.x + threadIdx.x;
            const index_t off = (r0 + k * t.step) * t.stride + t.base;
            store_vec(dx + off, grad_vec(cache_dy[i], cache_x[i], mu, ca, cb, ck));
            store_residual_grad(dresidual, off, cache_dy[i], flags);
        }
    }
}
