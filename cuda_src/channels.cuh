// channels.cuh: the per-channel reduction engine. Reduces a C-contiguous (outer, C, inner) array
// over (outer, inner) for each of its C channels, without a transpose copy, without a divide per
// element and in a fixed merge order. Used by batch_norm.cu (statistics, on-chip forward, backward
// reduce and the elementwise passes); a family declares it with `// @headers channels.cuh` and
// gpu/_kernels.py pastes it after common.cuh.
//
// Offers:
//   Vec, VEC, load_vec, store_vec       one vector of VEC contiguous elements: 16 bytes when
//                                       BN_VECTOR=1 (8 halves/bfloat16s, 4 floats, 2 doubles), else
//                                       1 element; stores stream past L2
//   Tile, make_tile                     which vector a thread owns and which rows it visits
//   load_channel_values                 per-channel values (mean, coefficients) of a thread's lanes
//   BnWelford<L>, BnGradSums<L>         per-thread partials of L lanes (L = VEC, or 1 after fold()):
//                                       overflow-safe Welford (count, mean, M2 in a power-of-two
//                                       unit) with Chan's merge, and the backward
//                                       sums sum(dy), sum(dy * (x - mean))
//   reduce_columns                      a block's partials of each column merged
//   store_tile_partial, merge_tile_partials
//                                       a tile's block partials through the workspace, merged in
//                                       partition order (any block may merge: same bits)
//   merge_grid                          store, then the block that takes the tile's last ticket
//                                       (common.cuh's last_block_ticket) merges: it holds the
//                                       tile's final partial
// A partial type A provides init, merge, shfl_down, save / load (shared memory) and
// store_partial / load_partial (workspace), kLanes, and kWords, its words per thread.
//
// View. gpu/_engines/channels.py maps every layout onto the (outer, C, inner) view:
//     (N, C) axis=0 -> (N, C, 1)      NCHW axis=(0,2,3) -> (N, C, H*W)
//     NHWC axis=(0,1,2) -> (N*H*W, C, 1)      the seed's (n, m) axis=1 -> (1, n, m)
// Both shapes are one "rows x vectors" walk: a thread owns one vector and visits it in every row it
// is given, so per-channel coefficients sit in registers and no element index is ever divided:
//   channels-last  (inner == 1): a row is x[r, :]; the vector is VEC consecutive channels; the
//       block's bx threads along x cover bx*VEC channels (one "tile"), blockDim/bx rows at a time.
//       Threads with the same x position hold the same channels ("columns", S = bx).
//   channels-first (inner > 1):  a row is x[n, c, :]; one channel per tile (grid.x = C * chunks),
//       the inner axis split into chunks of bx*VEC; every thread of a block holds the same channel
//       (S = 1).
//
// Launch shape. grid = (tiles * chunks, gy): channels-last tiles = ceil(C / (bx*VEC)), chunks = 1;
// channels-first tiles = C, chunks = ceil(inner / (bx*VEC)). Rows are split over grid.y (gy blocks
// per tile), grid-stride. Blocks: 1-D, a multiple of 32 threads; bx threads along the contiguous
// axis, a power of two; by = blockDim.x / bx rows at a time. Dynamic shared memory for
// reduce_columns: blockDim.x * kWords * sizeof(acc_t). Workspace (when gy * chunks > 1): 4 words
// (Welford) or 2 (gradient sums) per channel and partial, nparts = gy * chunks partials; one
// counter per tile, zero before the launch. The vector path needs the row length (C, or inner) to
// be a multiple of VEC and 16-byte aligned pointers; otherwise the family's BN_VECTOR=0 module runs
// (scalar loads, same code).
//
// Merge order. Each thread keeps VEC Welford states sharing one count (its lanes see the same
// rows), so one reciprocal per row serves VEC elements. States merge by Chan's formula: warp
// shuffles (shfl_down, fixed pairing), then shared memory in warp order, then across the gy*chunks
// blocks of a tile through the workspace in partition order; the block that arrives last at the
// tile's counter merges them. The order never depends on scheduling, so results are bitwise
// reproducible; no floating-point atomics. A NaN or inf only reaches the lanes of its own channel.

#ifndef BN_VECTOR
#define BN_VECTOR 1   // 16-byte vectors; the family's variants build 1 and 0 (scalar)
#endif

// ---------------------------------------------------------------------------------------------
// Vectors: VEC contiguous elements of one row
// ---------------------------------------------------------------------------------------------

#if BN_VECTOR
typedef Pack<scalar_t> Vec;
#else
struct Vec {
    static constexpr int size = 1;
    scalar_t v[1];
};
#endif
#define VEC (Vec::size)

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

// Per-channel values of a thread's lanes: lane j is channel c0 + j (channels-last) or c0.
__device__ __forceinline__ void load_channel_values(acc_t* out, const acc_t* __restrict__ p, const Tile& t,
                                                    index_t inner) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = p[inner == 1 ? t.c0 + j : t.c0];
}

// ---------------------------------------------------------------------------------------------
// Accumulators: L lanes (L channels, or after folding one), saved word by word
// ---------------------------------------------------------------------------------------------

// Welford states of L lanes that saw the same rows: one count.
//
// Overflow-safe. M2 = sum (x - mean)^2 overflows float long before the variance does (1024 values
// of standard deviation 3e18: var 9.4e36 fits, M2 9.6e39 does not), and so can one product
// d * (x - mean). Each lane therefore keeps M2 in units of sc^-2: m2 = M2 * sc^2, sc a power of
// two (1 until needed) and every product is taken on d * sc. When a scaled deviation passes
// BN_SCALE_LIMIT the lane rescales (sc = 2^-ilogb(d), m2 *= (sc_new / sc_old)^2, exact but for
// underflow of what is then negligible): |d * sc| <= 2^40 keeps n * (2 * 2^40)^2 < 2^128 for
// n < 2^44 values per channel. var = m2 / n / sc / sc is then finite whenever the true variance
// is. The mean needs no scaling (|mean| <= max |x|); a deviation that overflows (|x - mean| past
// FLT_MAX) means an infinite variance.
//
// Non-finite data follow PyTorch (its mean is a sum): an inf makes the mean inf and the variance
// NaN; +inf and -inf, or a NaN, make both NaN. The mean of a lane that saw one is kept by the
// convex form mean * (1 - 1/n) + x / n, which keeps inf where mean + (x - mean) / n would give
// inf - inf. Both are the rare branch of one compare per element.
//
// Words: n, then per lane mean, m2, sc (kWords = 1 + 3L).
#define BN_SCALE_LIMIT (sizeof(acc_t) == 4 ? acc_t(1099511627776.0) : acc_t(1e146))  // 2^40 (float)

// 2^-e for |d| = 1.f * 2^e (d finite, |d| > 2^40), from the exponent bits: no libm call in the
// loop. e is capped so that the result stays a normal number (|d * s| < 4 at the top of the range).
__device__ __forceinline__ float bn_pow2_inv(float d) {
    const int e = min((__float_as_int(d) >> 23) & 0xff, 253);
    return __int_as_float((254 - e) << 23);
}
__device__ __forceinline__ double bn_pow2_inv(double d) {
    const long long e = min((__double_as_longlong(d) >> 52) & 0x7ffLL, 2045LL);
    return __longlong_as_double((2046LL - e) << 52);
}

template <int L>
struct BnWelford {
    static constexpr int kLanes = L;
    static constexpr int kWords = 1 + 3 * L;
    acc_t n, mean[L], m2[L], sc[L];

    __device__ __forceinline__ void init() {
        n = acc_t(0);
#pragma unroll
        for (int j = 0; j < L; ++j) {
            mean[j] = m2[j] = acc_t(0);
            sc[j] = acc_t(1);
        }
    }
    __device__ __forceinline__ void push(const Vec& v) {
        n += acc_t(1);
        const acc_t rn = acc_t(1) / n;  // one reciprocal for the L lanes
#pragma unroll
        for (int j = 0; j < L; ++j) {
            const acc_t xj = to_acc(v.v[j]);
            const acc_t d = xj - mean[j];
            const acc_t ds = d * sc[j];
            if (fabs(ds) <= BN_SCALE_LIMIT) {   // false for inf and NaN too
                mean[j] += d * rn;
                m2[j] += ds * ((xj - mean[j]) * sc[j]);
            } else if (isfinite(d)) {           // a large deviation: rescale the lane to it
                const acc_t s = bn_pow2_inv(d);
                const acc_t f = s / sc[j];      // a power of two < 1
                m2[j] = (m2[j] * f) * f;
                sc[j] = s;
                mean[j] += d * rn;
                m2[j] += (d * s) * ((xj - mean[j]) * s);
            } else {                            // inf or NaN, or x - mean past the range
                const bool data_finite = isfinite(xj) && isfinite(mean[j]);
                mean[j] = mean[j] * (acc_t(1) - rn) + xj * rn;
                m2[j] = data_finite ? m2[j] + acc_t(INFINITY) : acc_t(NAN);
            }
        }
    }
    // Chan et al.; either side may be empty (n == 0).
    __device__ __forceinline__ void merge(const BnWelford& o) {
        if (o.n == acc_t(0)) return;
        if (n == acc_t(0)) {
            *this = o;
            return;
        }
        const acc_t n_ab = n + o.n;
        const acc_t w = o.n / n_ab;
#pragma unroll
        for (int j = 0; j < L; ++j) {
            // both sides in the coarser unit
            const acc_t s = sc[j] < o.sc[j] ? sc[j] : o.sc[j];
            const acc_t fa = s / sc[j], fb = s / o.sc[j];
            const acc_t a2 = (m2[j] * fa) * fa, b2 = (o.m2[j] * fb) * fb;
            const acc_t d = o.mean[j] - mean[j];
            acc_t ds = d * s;
            if (fabs(ds) <= BN_SCALE_LIMIT) {
                mean[j] += d * w;
                m2[j] = a2 + b2 + ds * ds * n * w;
                sc[j] = s;
            } else if (isfinite(d)) {  // rescale to d
                const acc_t s2 = bn_pow2_inv(d);
                const acc_t f = s2 / s;
                ds = d * s2;
                mean[j] += d * w;
                m2[j] = (a2 * f) * f + (b2 * f) * f + ds * ds * n * w;
                sc[j] = s2;
            } else {                   // a non-finite mean, or their difference overflows
                const bool data_finite = isfinite(mean[j]) && isfinite(o.mean[j]);
                mean[j] = mean[j] * (acc_t(1) - w) + o.mean[j] * w;
                m2[j] = data_finite ? a2 + b2 + acc_t(INFINITY) : acc_t(NAN);
                sc[j] = s;
            }
        }
        n = n_ab;
    }
    __device__ __forceinline__ BnWelford<1> fold() const {
        BnWelford<1> r;
        r.n = n;
        r.mean[0] = mean[0];
        r.m2[0] = m2[0];
        r.sc[0] = sc[0];
#pragma unroll
        for (int j = 1; j < L; ++j) {
            BnWelford<1> o;
            o.n = n;
            o.mean[0] = mean[j];
            o.m2[0] = m2[j];
            o.sc[0] = sc[j];
            r.merge(o);
        }
        return r;
    }
    // The biased variance of lane j in the data's units (inf when it does not fit).
    __device__ __forceinline__ acc_t variance(int j, acc_t inv_m) const {
        acc_t v = m2[j] * inv_m;
        v = v < acc_t(0) ? acc_t(0) : v;  // keeps NaN (fmax would not)
        return v / sc[j] / sc[j];          // two divides: sc * sc may underflow
    }
    __device__ __forceinline__ BnWelford shfl_down(int off) const {
        BnWelford o;
        o.n = __shfl_down_sync(GPU_FULL_MASK, n, off);
#pragma unroll
        for (int j = 0; j < L; ++j) {
            o.mean[j] = __shfl_down_sync(GPU_FULL_MASK, mean[j], off);
            o.m2[j] = __shfl_down_sync(GPU_FULL_MASK, m2[j], off);
            o.sc[j] = __shfl_down_sync(GPU_FULL_MASK, sc[j], off);
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
            s[(1 + 2 * L + j) * nslots + i] = sc[j];
        }
    }
    __device__ __forceinline__ void load(const acc_t* s, int i, int nslots) {
        n = s[i];
#pragma unroll
        for (int j = 0; j < L; ++j) {
            mean[j] = s[(1 + j) * nslots + i];
            m2[j] = s[(1 + L + j) * nslots + i];
            sc[j] = s[(1 + 2 * L + j) * nslots + i];
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
            ws[3 * pc + idx + j] = sc[j];
        }
    }
    __device__ __forceinline__ void load_partial(const volatile acc_t* ws, index_t idx, index_t pc) {
        n = ws[idx];
#pragma unroll
        for (int j = 0; j < L; ++j) {
            mean[j] = ws[pc + idx + j];
            m2[j] = ws[2 * pc + idx + j];
            sc[j] = ws[3 * pc + idx + j];
        }
    }
};

// Backward sums of L lanes: sum(dy) and sum(dy * (x - mean)).
template <int L>
struct BnGradSums {
    static constexpr int kLanes = L;
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
// calls it); the result is in threads threadIdx.x < S. Every thread must call. kBatched: a thread
// issues the loads of up to kBatch of its partials (about 32 registers) before it merges
// the first of them, instead of one L2 round trip per merge (the persistent kernels, whose every
// block merges after the grid barrier; the streaming kernels' last block keeps one at a time, as
// their registers bound their occupancy). The merges keep partition order: the same bits.
template <class A, bool kBatched = false>
__device__ __forceinline__ A merge_tile_partials(const Tile& t, int C, const acc_t* ws, acc_t* smem) {
    constexpr int kWords32 = A::kWords * (int)(sizeof(acc_t) / 4);
    constexpr int kBatch = !kBatched ? 1 : kWords32 <= 4 ? 8 : kWords32 <= 8 ? 4 : 2;
    const index_t pc = (index_t)t.nparts * C;
    A a;
    a.init();
    if (t.col_active) {
        const int step = blockDim.x / t.ncols;
        for (int p = threadIdx.x / t.ncols; p < t.nparts; p += kBatch * step) {
            A o[kBatch];
#pragma unroll
            for (int b = 0; b < kBatch; ++b)
                if (p + b * step < t.nparts) o[b].load_partial(ws, (index_t)(p + b * step) * C + t.c0, pc);
#pragma unroll
            for (int b = 0; b < kBatch; ++b)
                if (p + b * step < t.nparts) a.merge(o[b]);
        }
    }
    return reduce_columns(a, t.ncols, smem);
}

// After reduce_columns: when the tile has several blocks, each stores its partial and the block
// that arrives last at the tile's counter merges all of them in partition order. Returns true in
// the block holding the tile's final states (in threads threadIdx.x < S).
template <class A>
__device__ __forceinline__ bool merge_grid(A& a, const Tile& t, int C, acc_t* ws, unsigned int* counters,
                                           acc_t* smem) {
    if (t.nparts == 1) return true;
    store_tile_partial(a, t, C, ws);
    if (!last_block_ticket(&counters[t.tile], (unsigned int)t.nparts)) return false;
    a = merge_tile_partials<A>(t, C, ws, smem);
    return true;
}
