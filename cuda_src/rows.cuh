// rows.cuh: the row engine. Reduces each row of a C-contiguous (outer, C, inner) array along its C
// classes and writes one output per element from the row's statistics; what is accumulated and
// written is an Op (softmax.cu: SoftmaxOp, HardmaxOp, CrossEntropyOp). A family declares it with
// `// @headers rows.cuh`; gpu/_kernels.py pastes it after common.cuh.
//
// Offers:
//   rows_warp<N>(op, z, rows, C, lanes, vec)       inner == 1, C <= 32 N: the row in registers
//   rows_block(op, z, rows, C, cache_cols, vec)    inner == 1, any C: a block per row
//   rows_strided(op, z, outer, C, inner, cached)   inner > 1: classes `inner` elements apart
//   online_add / online_merge                      the online (max, sum of exp) pair
//   acc_exp / acc_log / acc_rcp / acc_tanh         inline exp, log, 1/x, tanh in acc_t (no slow paths)
//   group_allreduce<Op> / block_allreduce<Op>      an Op's Stats over a lane group / a block, in
//                                                  a fixed order, the result in every thread
//   load_pack_coherent                             a 16-byte load that sees writes of this launch
//
// Every path reads a row once for its statistics (pass 1), merges them across the threads that
// share the row, finishes the row, then writes each element (pass 2) from registers (warp path),
// shared memory (cached columns) or a second read (the rest, ideally from L2). The statistics of
// softmax-like ops are an online (max, sum of exp) pair, so pass 1 is ONE read of the row; exp is
// exp2 of a log2(e)-prescaled difference. Merges run in a fixed order (butterflies over lanes,
// then over warps; thread rows in order), so results are bitwise reproducible for a given launch
// shape.
//
// The Op interface (x: an element of z; y: the element of the dense second input at the same
// position, or 0; w: the value of a per-column vector at its class, or 1; col: its class index;
// the struct is passed by value and may keep per-thread sums across rows):
//   static constexpr bool kReadsX, kHasY, kHasW, kStream
//                                                  out_value needs x (else pass 2 does not load
//                                                  z); a second input y (laid out as z) may be
//                                                  read; a per-column vector w (acc_t[C], the
//                                                  same for every row: cross-entropy's class
//                                                  weights) may be read; streaming stores
//                                                  (output not re-read)
//   struct Stats, Ctx, Fin                          per-thread partial (trivially constructible:
//                                                  it goes through shared memory), per-row
//                                                  context, per-row result of finish
//   scalar_t* dest() const                          the output, laid out as z; nullptr: no pass 2
//   const scalar_t* ysrc() const                    y, or nullptr
//   const acc_t* wsrc() const                       w, or nullptr (every w is then 1)
//   Stats init() const
//   Ctx begin(index_t row, bool active, acc_t pivot) const
//                                                  pivot: the row's first element; active: false
//                                                  for lanes or threads past the last row
//   template <class Wt> void add(Stats&, const Ctx&, acc_t x, acc_t y, Wt w, int col) const
//                                                  w: a value or a ColIdx (below)
//   static void merge(Stats&, const Stats&)         symmetric, so a butterfly leaves every lane
//                                                  with the same bits
//   static Stats shfl_xor(const Stats&, int mask, int width)
//   Fin finish(const Stats&, const Ctx&, index_t row, bool leader)
//                                                  leader: one thread per active row (per-row
//                                                  side effects, e.g. a loss, happen there)
//   template <class Wt> acc_t out_value(const Fin&, acc_t x, acc_t y, Wt w, int col) const
//   void end_block()                                after the block's last row; every thread of
//                                                  the block calls it (it may hold barriers)
//
// Launch shapes the paths assume:
//   rows_warp     blocks of 128 threads (a multiple of `lanes`), any grid: grid-stride over row
//                 groups. A group of `lanes` lanes per row (32, or the power of two >= C when
//                 C <= 32, so short rows share a warp), N values per lane; vec=1 (C % SM_PACK == 0,
//                 z, y and the output 16-byte aligned) loads and stores 16-byte vectors.
//   rows_block    1-D blocks, a multiple of 32 threads, any grid: one block per row, grid-stride.
//                 The leading cache_cols columns (C: the row; 0: none) are kept in dynamic shared
//                 memory, SM_BLOCK_REGION(min(cache_cols, C)) elements for z (the same again for
//                 y); the rest (rows past the shared-memory limit) are read a second time.
//   rows_strided  blocks of (32, TY) threads, TY <= SM_STRIDED_MAX_TY, any grid: grid-stride over
//                 tiles of 32 inner positions (outer * ceil_div(inner, 32) < 2^31); cached=1 keeps
//                 the (C, 32) tile of z (and y) in dynamic shared memory.
// Sizes: C < 2^31; rows and element offsets are index_t.

#define SM_PACK (Pack<scalar_t>::size)   // elements in one 16-byte vector
#define SM_STRIDED_MAX_TY 8              // thread rows of the strided path's (32, TY) block
// Block sizes the host plans with (gpu/_engines/rows.py reads these lines); an op's kernels use
// them as their __launch_bounds__, so a launch past them fails instead of running with too few
// registers.
#define SM_WARP_THREADS 128              // warp path: rows of `lanes` lanes, 128 / lanes rows per block
#define SM_BLOCK_MAX_THREADS 1024        // block path: one block per row, at most this many threads
#define SM_BLOCK_MAX_THREADS_F64 512     // ... for float64 (its registers)

// ---------------------------------------------------------------------------------------------
// Scalar helpers: inline math in acc_t
// ---------------------------------------------------------------------------------------------

#if defined(SCALAR_IS_DOUBLE)
// exp(d) for d <= 0 (every caller passes a difference to the running maximum) or NaN.
// CUDA's exp(double) calls an out-of-line slow path, which costs callee-saved spills in these
// register-heavy kernels; this one is inline: d = k ln2 + r (Cody-Waite), |r| <= ln2/2, a
// degree-12 Taylor polynomial (truncation < 1e-15 relative), then 2^k in two normal factors so
// subnormal results come out right.
__device__ __forceinline__ acc_t acc_exp(acc_t d) {
    if (!(d > -745.2)) return d != d ? d : 0.0;            // NaN stays NaN; -inf and underflow: 0
    const double k = rint(d * 1.4426950408889634);
    double r = fma(k, -6.93147180369123816490e-01, d);     // ln2 high part (exact k * hi)
    r = fma(k, -1.90821492927058770002e-10, r);            // ln2 low part
    double p = 1.0 / 479001600.0;
    p = fma(p, r, 1.0 / 39916800.0);
    p = fma(p, r, 1.0 / 3628800.0);
    p = fma(p, r, 1.0 / 362880.0);
    p = fma(p, r, 1.0 / 40320.0);
    p = fma(p, r, 1.0 / 5040.0);
    p = fma(p, r, 1.0 / 720.0);
    p = fma(p, r, 1.0 / 120.0);
    p = fma(p, r, 1.0 / 24.0);
    p = fma(p, r, 1.0 / 6.0);
    p = fma(p, r, 0.5);
    p = fma(p, r, 1.0);
    p = fma(p, r, 1.0);
    const long long k1 = (long long)k / 2, k2 = (long long)k - k1;   // both in [-538, 0]
    return p * __longlong_as_double((k1 + 1023) << 52) * __longlong_as_double((k2 + 1023) << 52);
}
__device__ __forceinline__ acc_t acc_log(acc_t x) { return log(x); }
// 1/x for the sums of exps (x in [1, C], or 0 / NaN for rows that come out NaN): a float
// reciprocal refined by two Newton steps (24 -> 48 -> 96 bits), inline where a double division
// would call its out-of-line slow path.
__device__ __forceinline__ acc_t acc_rcp(acc_t x) {
    double r = (double)__fdividef(1.0f, (float)x);
    r = fma(r, fma(-x, r, 1.0), r);
    return fma(r, fma(-x, r, 1.0), r);
}
#else
// exp(d) = 2^(d log2 e): one MUFU.EX2 after one multiply. d = z - M is formed first, so logits
// far from 0 (1e4) lose nothing to the prescale. ex2_approx_ftz (common.cuh), not exp2f: exp2f
// wraps the same MUFU.EX2 in a guard for subnormal results (3 more instructions per element);
// flushed, such a term (< 2^-126 of the row's largest) changes no sum and no output past float's
// smallest normal.
__device__ __forceinline__ acc_t acc_exp(acc_t d) { return ex2_approx_ftz(d * 1.4426950408889634f); }
// x in [1, C]: MUFU.LG2 (absolute error ~1e-7 here); logf calls a slow path that spills.
__device__ __forceinline__ acc_t acc_log(acc_t x) { return __logf(x); }
// 1/x for x in [1, C] (the sums of exps): MUFU.RCP, inline; IEEE division and __frcp_rn call an
// out-of-line slow path on sm_80, which spills in these kernels.
__device__ __forceinline__ acc_t acc_rcp(acc_t x) { return __fdividef(1.0f, x); }
#endif

// tanh for the soft-cap (cross-entropy). CUDA's double tanh calls an out-of-line division that
// spills in the cross-entropy kernels; this one is inline: with u = |x|, tanh u = -m / (2 + m),
// m = expm1(-2u) by its Taylor series (no cancellation) for u < 0.17 (|2u| < ln2 / 2), else
// (1 - e) / (1 + e), e = exp(-2u) <= 0.71 (1 - e loses at most 2 bits); reciprocals by acc_rcp.
#if defined(SCALAR_IS_DOUBLE)
__device__ __forceinline__ acc_t acc_tanh(acc_t x) {
    const double u = fabs(x);
    double t;
    if (u < 0.17) {
        const double r = -2.0 * u;
        double p = 1.0 / 6227020800.0;                   // 1/13!: truncation < 1e-16 relative
        p = fma(p, r, 1.0 / 479001600.0);
        p = fma(p, r, 1.0 / 39916800.0);
        p = fma(p, r, 1.0 / 3628800.0);
        p = fma(p, r, 1.0 / 362880.0);
        p = fma(p, r, 1.0 / 40320.0);
        p = fma(p, r, 1.0 / 5040.0);
        p = fma(p, r, 1.0 / 720.0);
        p = fma(p, r, 1.0 / 120.0);
        p = fma(p, r, 1.0 / 24.0);
        p = fma(p, r, 1.0 / 6.0);
        p = fma(p, r, 0.5);
        p = fma(p, r, 1.0);
        const double m = p * r;                          // expm1(-2u), in (-0.3, 0]
        t = -m * acc_rcp(2.0 + m);
    } else {
        const double e = acc_exp(-2.0 * u);               // NaN stays NaN, inf gives 1
        t = (1.0 - e) * acc_rcp(1.0 + e);
    }
    return copysign(t, x);
}
#else
__device__ __forceinline__ acc_t acc_tanh(acc_t x) { return tanhf(x); }   // inline in CUDA
#endif

__device__ __forceinline__ acc_t acc_inf() { return acc_t(INFINITY); }
__device__ __forceinline__ scalar_t scalar_zero() { return from_acc<scalar_t>(acc_t(0)); }

// A coherent 16-byte load (not __ldg): in-place cross-entropy writes dz over z during the
// kernel, which the read-only (non-coherent) path does not allow; it also lets the uncached
// paths' first read leave the row in L2 for the second.
__device__ __forceinline__ Pack<scalar_t> load_pack_coherent(const scalar_t* p) {
    return *reinterpret_cast<const Pack<scalar_t>*>(p);
}

// Shared-memory vectors are indexed as uint4 (a 16-byte element of an array of them), so the
// compiler sees their alignment and emits one LDS.128 / STS.128. Through a scalar_t pointer (a Pack
// copy, or a uint4 cast of zc + c) it cannot prove it and splits them into four 4-byte accesses: at
// a 16-byte stride between threads, 4-way bank conflicts and four instructions for one.
__device__ __forceinline__ Pack<scalar_t> load_pack_shared(const uint4* p, int k) {
    const uint4 raw = p[k];
    Pack<scalar_t> out;
    memcpy(&out, &raw, sizeof(out));
    return out;
}
__device__ __forceinline__ void store_pack_shared(uint4* p, int k, const Pack<scalar_t>& x) {
    uint4 raw;
    memcpy(&raw, &x, sizeof(raw));
    p[k] = raw;
}

// An Op takes a column's w as `Wt w`, where it uses it: on the block path's vectors the value
// (acc_t), which the engine loads with the elements (w is read-only for the whole launch: the
// non-coherent path); elsewhere the column (ColIdx), for the Op to read w at itself, only on the
// paths its flags take.
struct ColIdx { int col; };
// w at the SM_PACK columns of one vector, c0 the first: SM_PACK sizeof(acc_t) / 16 16-byte loads
// (1 for float32 and float64 rows, 2 for 16-bit ones) where wp + c0 is 16-byte aligned (`wvec`),
// else SM_PACK scalar loads; all 1 without a vector. The 16-byte loads are inline PTX: as plain
// loads, NVRTC moves them into the Op's flag branches that use w and splits them into scalar
// loads there, one per element again.
struct ColPack { acc_t v[SM_PACK]; };
template <class Op>
__device__ __forceinline__ ColPack load_cols(bool has_w, const acc_t* wp, int c0, bool wvec) {
    constexpr int P = 16 / sizeof(acc_t);   // acc_t values in 16 bytes
    ColPack w;
    if (!Op::kHasW || !has_w) {
#pragma unroll
        for (int i = 0; i < SM_PACK; ++i) w.v[i] = acc_t(1);
    } else if (wvec) {
#pragma unroll
        for (int j = 0; j < SM_PACK / P; ++j) {
#if defined(GPU_EMULATOR)
            const uint4 raw = __ldg(reinterpret_cast<const uint4*>(wp + c0) + j);
#else
            uint4 raw;
            asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];"
                         : "=r"(raw.x), "=r"(raw.y), "=r"(raw.z), "=r"(raw.w)
                         : "l"(reinterpret_cast<const uint4*>(wp + c0) + j));
#endif
            memcpy(&w.v[j * P], &raw, sizeof(raw));
        }
    } else {
#pragma unroll
        for (int i = 0; i < SM_PACK; ++i) w.v[i] = __ldg(wp + c0 + i);
    }
    return w;
}

// ---------------------------------------------------------------------------------------------
// Online (max, sum of exp) statistics
// ---------------------------------------------------------------------------------------------

// s = sum exp(x - m) over the values seen. Special values come out as in the reference:
// +inf anywhere or NaN anywhere makes s NaN (the row's outputs NaN); an all -inf row keeps
// m = -inf, s = 0 and its outputs (z - M = NaN) are NaN, as PyTorch's.
__device__ __forceinline__ void online_add(acc_t& m, acc_t& s, acc_t x) {
    const bool up = x > m;
    acc_t e = acc_exp(up ? m - x : x - m);     // one exp per element either way
    if (x == -acc_inf()) e = acc_t(0);         // -inf - (-inf) would be NaN
    s = up ? s * e + (acc_t(1) + (x - x)) : s + e;   // x - x: NaN for x = +inf, else 0
    m = up ? x : m;
}

// Symmetric in its operands (IEEE + and * commute), so a butterfly leaves every lane equal.
__device__ __forceinline__ void online_merge(acc_t& m, acc_t& s, acc_t m2, acc_t s2) {
    const acc_t mm = m > m2 ? m : m2;
    if (mm == -acc_inf()) {
        s = s + s2;                            // both 0 (or NaN, kept)
    } else {
        s = s * acc_exp(m - mm) + s2 * acc_exp(m2 - mm);
    }
    m = mm;
}

// ---------------------------------------------------------------------------------------------
// Stats reductions across a lane group and a block (fixed butterfly, then warps in order)
// ---------------------------------------------------------------------------------------------

template <class Op>
__device__ __forceinline__ typename Op::Stats group_allreduce(typename Op::Stats st, int width) {
    for (int off = width / 2; off > 0; off >>= 1) Op::merge(st, Op::shfl_xor(st, off, width));
    return st;
}

// Every thread gets the block's result. Blocks are a multiple of 32 threads; ends with a barrier.
// The warps' partials are merged by a butterfly over the lanes (lane w takes warp w's partial,
// lanes past the last warp the identity): log2(32) = 5 merges a thread where a serial sweep over
// the partials costs nw - 1 merges and as many shared-memory loads of a Stats. Every warp runs the
// same butterfly on the same values, so every thread ends with the same bits.
template <class Op>
__device__ __forceinline__ typename Op::Stats block_allreduce(const Op& op, typename Op::Stats st,
                                                              typename Op::Stats* scratch) {
    const int tid = block_thread_rank();
    const int nw = block_num_threads() / GPU_WARP;
    const int lane = tid % GPU_WARP;
    st = group_allreduce<Op>(st, GPU_WARP);
    if (lane == 0) scratch[tid / GPU_WARP] = st;
    __syncthreads();
    st = lane < nw ? scratch[lane] : op.init();
    __syncthreads();
    return group_allreduce<Op>(st, GPU_WARP);
}

template <class Op>
__device__ __forceinline__ void store_out(scalar_t* p, acc_t v) {
    if (Op::kStream) __stcs(p, from_acc<scalar_t>(v));
    else *p = from_acc<scalar_t>(v);
}

// ---------------------------------------------------------------------------------------------
// Path 1: a lane group per row, the row in registers (inner == 1, C <= 32 N)
// ---------------------------------------------------------------------------------------------
// Lane l of a group holds columns (k lanes + l) V + i, k < N/V, i < V: each k is one coalesced
// (vector) load across the group. `vec`: C % SM_PACK == 0 and z/out/y 16-byte aligned.

template <int N, class Op>
__device__ __forceinline__ void rows_warp(Op op, const scalar_t* z, index_t rows, int C, int lanes,
                                          int vec) {
    constexpr int V = N >= SM_PACK ? SM_PACK : 1;
    constexpr int K = N / V;
    const int lane = threadIdx.x % lanes;
    const int groups = blockDim.x / lanes;
    const int group = threadIdx.x / lanes;
    scalar_t* const out = op.dest();
    const scalar_t* const yp = op.ysrc();
    const bool use_vec = V > 1 && vec;

    // The loop bound is the same for the whole block, so every lane reaches every shuffle.
    for (index_t row0 = (index_t)blockIdx.x * groups; row0 < rows; row0 += (index_t)gridDim.x * groups) {
        const index_t row = row0 + group;
        const bool active = row < rows;
        const index_t base = (active ? row : 0) * (index_t)C;
        acc_t x[N], yv[N];
#pragma unroll
        for (int j = 0; j < N; ++j) x[j] = yv[j] = acc_t(0);
#pragma unroll
        for (int k = 0; k < K; ++k) {
            const int col0 = (k * lanes + lane) * V;
            if (use_vec) {
                if (active && col0 < C) {
                    const Pack<scalar_t> p = load_pack_coherent(z + base + col0);
#pragma unroll
                    for (int i = 0; i < V; ++i) x[k * V + i] = to_acc(p.v[i]);
                    if (Op::kHasY && yp) {
                        const Pack<scalar_t> q = load_pack_coherent(yp + base + col0);
#pragma unroll
                        for (int i = 0; i < V; ++i) yv[k * V + i] = to_acc(q.v[i]);
                    }
                }
            } else {
#pragma unroll
                for (int i = 0; i < V; ++i) {
                    const int col = col0 + i;
                    if (active && col < C) {
                        x[k * V + i] = to_acc(z[base + col]);
                        if (Op::kHasY && yp) yv[k * V + i] = to_acc(yp[base + col]);
                    }
                }
            }
        }
        // Pivot: the row's first logit, held by lane 0 of the group in x[0].
        const acc_t pivot = __shfl_sync(GPU_FULL_MASK, x[0], 0, lanes);
        const typename Op::Ctx ctx = op.begin(row, active, pivot);
        typename Op::Stats st = op.init();
#pragma unroll
        for (int j = 0; j < N; ++j) {
            const int col = ((j / V) * lanes + lane) * V + j % V;
            if (active && col < C)
                op.add(st, ctx, x[j], Op::kHasY && yp ? yv[j] : acc_t(0), ColIdx{col}, col);
        }
        st = group_allreduce<Op>(st, lanes);
        const typename Op::Fin fin = op.finish(st, ctx, row, active && lane == 0);
        if (out == nullptr || !active) continue;
#pragma unroll
        for (int k = 0; k < K; ++k) {
            const int col0 = (k * lanes + lane) * V;
            if (use_vec) {
                if (col0 < C) {
                    Pack<scalar_t> p;
#pragma unroll
                    for (int i = 0; i < V; ++i)
                        p.v[i] = from_acc<scalar_t>(op.out_value(fin, x[k * V + i], Op::kHasY && yp ? yv[k * V + i] : acc_t(0),
                                                                 ColIdx{col0 + i}, col0 + i));
                    if (Op::kStream) store_pack_stream(out + base + col0, p);
                    else store_pack(out + base + col0, p);
                }
            } else {
#pragma unroll
                for (int i = 0; i < V; ++i) {
                    const int col = col0 + i;
                    if (col < C)
                        store_out<Op>(out + base + col, op.out_value(fin, x[k * V + i], Op::kHasY && yp ? yv[k * V + i] : acc_t(0),
                                                                     ColIdx{col}, col));
                }
            }
        }
    }
    op.end_block();
}

// ---------------------------------------------------------------------------------------------
// Path 2: a block per row (inner == 1), the row (or its leading columns) in shared memory
// ---------------------------------------------------------------------------------------------
// Columns [0, head) and [head + nvec V, C) are scalar, [head, head + nvec V) are 16-byte vectors
// (head: elements up to the row's first 16-byte boundary; vec=0 makes every column scalar).
// Columns [0, cache_cols) are kept in shared memory (a vector when it starts there): cache_cols = C
// keeps the row, 0 none, anything between a prefix (rows past the shared-memory limit: the rest is
// read again, from L2 if it is still there). Shared memory holds column c at c + shift,
// shift = (V - head) % V, so cached vectors are aligned too: SM_BLOCK_REGION(cache_cols) elements
// for z, the same again for y (the host sizes the launch with the same formula).
//
// The row's traffic: pass 1 reads every column once; columns that are not read again (cached, or
// no pass 2) are loaded with evict-first hints, so they do not push the re-read columns out of
// L2. The re-read columns are the row's end, read last in pass 1 and first in pass 2 (pass 2 runs
// its vectors from the end of the row backwards): between the two reads of a column lie only the
// columns after it, in every block, which keeps the L2 working set at (resident blocks) x
// (uncached bytes of a row), not the whole rows.
// Pass 1 keeps SM_BLOCK_UNROLL vectors (of z, and as many of y) in flight per thread.

extern __shared__ Pack<scalar_t> sm_dynamic[];

#define SM_BLOCK_REGION(cols) ((ceil_div((cols), SM_PACK) + 2) * SM_PACK)

template <class Op>
__device__ __forceinline__ void rows_block(Op op, const scalar_t* z, index_t rows, int C,
                                           int cache_cols, int vec) {
    constexpr int V = SM_PACK;
    // vectors in flight per thread in pass 1: 4 of z; 2 of z and 2 of y when a y may be read; half
    // that for 16-bit types (8 elements a vector, unpacked to float: more spill on sm_80, NVRTC 12)
    constexpr int U = (Op::kHasY ? 2 : 4) / (sizeof(scalar_t) >= 4 ? 1 : 2);
    __shared__ typename Op::Stats scratch[32];
    const int tid = threadIdx.x;
    const int nt = blockDim.x;
    scalar_t* const out = op.dest();
    const scalar_t* const yp = op.ysrc();
    const bool has_y = Op::kHasY && yp != nullptr;
    const acc_t* const wp = op.wsrc();
    const bool has_w = Op::kHasW && wp != nullptr;
    const int ccols = out == nullptr ? 0 : (cache_cols < C ? cache_cols : C);   // no pass 2: nothing kept
    scalar_t* const zc = reinterpret_cast<scalar_t*>(sm_dynamic);
    scalar_t* const yc = zc + SM_BLOCK_REGION(ccols);
    uint4* const zvec = reinterpret_cast<uint4*>(sm_dynamic);   // the same memory, by vector
    uint4* const yvec = zvec + SM_BLOCK_REGION(ccols) / V;

    for (index_t row = blockIdx.x; row < rows; row += gridDim.x) {
        const index_t base = row * (index_t)C;
        int head = C, nvec = 0;
        if (vec) {
            const int mis = (int)((reinterpret_cast<unsigned long long>(z + base) & 15ull) / sizeof(scalar_t));
            head = (V - mis) % V < C ? (V - mis) % V : C;
            nvec = (C - head) / V;
        }
        const int shift = (V - head % V) % V;
        const int tail0 = head + nvec * V;
        const int hv = (head + shift) / V;   // vector k is shared-memory vector hv + k
        // vectors [0, kc) start in the cached columns
        const int kc = ccols <= head ? 0 : min(nvec, ceil_div(ccols - head, V));
        // w of a vector in 16-byte loads: w + head aligned (every vector then is)
        const bool wvec = has_w && ((reinterpret_cast<unsigned long long>(wp + head) & 15ull) == 0);

        const typename Op::Ctx ctx = op.begin(row, true, to_acc(z[base]));
        typename Op::Stats st = op.init();
        // pass 1: statistics (and the shared-memory copy)
        for (int c = tid; c < head; c += nt) {
            const bool keep = c < ccols;
            const scalar_t xs = keep || out == nullptr ? __ldcs(z + base + c) : z[base + c];
            const scalar_t ys = has_y ? (keep ? __ldcs(yp + base + c) : yp[base + c]) : scalar_zero();
            if (keep) { zc[c + shift] = xs; if (has_y) yc[c + shift] = ys; }
            op.add(st, ctx, to_acc(xs), to_acc(ys), ColIdx{c}, c);
        }
        // vectors [k0, k1): `keep` stores them in shared memory; `once` (not read again) streams them
        auto vectors = [&](int k0, int k1, bool keep, bool once) {
            int k = k0 + tid;
            for (; k + (U - 1) * nt < k1; k += U * nt) {
                Pack<scalar_t> p[U], q[U];
#pragma unroll
                for (int u = 0; u < U; ++u) {
                    const int c0 = head + (k + u * nt) * V;
                    p[u] = once ? load_pack_stream(z + base + c0) : load_pack_coherent(z + base + c0);
                    if (has_y) q[u] = once ? load_pack_stream(yp + base + c0) : load_pack_coherent(yp + base + c0);
                }
#pragma unroll
                for (int u = 0; u < U; ++u) {
                    const int c0 = head + (k + u * nt) * V;
                    if (keep) {
                        store_pack_shared(zvec, hv + k + u * nt, p[u]);
                        if (has_y) store_pack_shared(yvec, hv + k + u * nt, q[u]);
                    }
                    const ColPack w = load_cols<Op>(has_w, wp, c0, wvec);
#pragma unroll
                    for (int i = 0; i < V; ++i)
                        op.add(st, ctx, to_acc(p[u].v[i]), has_y ? to_acc(q[u].v[i]) : acc_t(0), w.v[i], c0 + i);
                }
            }
            for (; k < k1; k += nt) {
                const int c0 = head + k * V;
                const Pack<scalar_t> p = once ? load_pack_stream(z + base + c0) : load_pack_coherent(z + base + c0);
                Pack<scalar_t> q;
                if (has_y) q = once ? load_pack_stream(yp + base + c0) : load_pack_coherent(yp + base + c0);
                const ColPack w = load_cols<Op>(has_w, wp, c0, wvec);
                if (keep) {
                    store_pack_shared(zvec, hv + k, p);
                    if (has_y) store_pack_shared(yvec, hv + k, q);
                }
#pragma unroll
                for (int i = 0; i < V; ++i)
                    op.add(st, ctx, to_acc(p.v[i]), has_y ? to_acc(q.v[i]) : acc_t(0), w.v[i], c0 + i);
            }
        };
        if (kc > 0) vectors(0, kc, true, true);
        if (kc < nvec) vectors(kc, nvec, false, out == nullptr);
        for (int c = tail0 + tid; c < C; c += nt) {
            const bool keep = c < ccols;
            const scalar_t xs = keep || out == nullptr ? __ldcs(z + base + c) : z[base + c];
            const scalar_t ys = has_y ? (keep ? __ldcs(yp + base + c) : yp[base + c]) : scalar_zero();
            if (keep) { zc[c + shift] = xs; if (has_y) yc[c + shift] = ys; }
            op.add(st, ctx, to_acc(xs), to_acc(ys), ColIdx{c}, c);
        }
        st = block_allreduce<Op>(op, st, scratch);   // its barriers also publish the cached columns
        const typename Op::Fin fin = op.finish(st, ctx, row, tid == 0);

        if (out != nullptr) {
            // pass 2: outputs, the row's end first (the columns read last in pass 1); columns that
            // are not cached are read again (last use: streaming loads)
            for (int c = tail0 + tid; c < C; c += nt) {
                const bool keep = c < ccols;
                acc_t xv = 0, yv = 0;
                if (Op::kReadsX) xv = to_acc(keep ? zc[c + shift] : __ldcs(z + base + c));
                if (has_y) yv = to_acc(keep ? yc[c + shift] : __ldcs(yp + base + c));
                store_out<Op>(out + base + c, op.out_value(fin, xv, yv, ColIdx{c}, c));
            }
            for (int j = tid; j < nvec; j += nt) {
                const int k = nvec - 1 - j;
                const int c0 = head + k * V;
                const bool keep = k < kc;
                Pack<scalar_t> p, q, o;
                if (Op::kReadsX) p = keep ? load_pack_shared(zvec, hv + k) : load_pack_stream(z + base + c0);
                if (has_y) q = keep ? load_pack_shared(yvec, hv + k) : load_pack_stream(yp + base + c0);
                const ColPack w = load_cols<Op>(has_w, wp, c0, wvec);
#pragma unroll
                for (int i = 0; i < V; ++i)
                    o.v[i] = from_acc<scalar_t>(op.out_value(fin, Op::kReadsX ? to_acc(p.v[i]) : acc_t(0),
                                                             has_y ? to_acc(q.v[i]) : acc_t(0), w.v[i], c0 + i));
                if (Op::kStream) store_pack_stream(out + base + c0, o);
                else store_pack(out + base + c0, o);
            }
            for (int c = tid; c < head; c += nt) {
                const bool keep = c < ccols;
                acc_t xv = 0, yv = 0;
                if (Op::kReadsX) xv = to_acc(keep ? zc[c + shift] : __ldcs(z + base + c));
                if (has_y) yv = to_acc(keep ? yc[c + shift] : __ldcs(yp + base + c));
                store_out<Op>(out + base + c, op.out_value(fin, xv, yv, ColIdx{c}, c));
            }
        }
        if (ccols > 0) __syncthreads();   // the next row overwrites the cache
    }
    op.end_block();
}

// ---------------------------------------------------------------------------------------------
// Path 3: classes strided by `inner` (inner > 1): a (32, TY) block per tile of 32 inner positions
// ---------------------------------------------------------------------------------------------
// Thread (tx, ty) owns inner position i0 + tx and classes ty, ty + TY, ...: each class is one
// coalesced 32-wide load along inner. Cache: z[c][tx] (then y) in shared memory, (C, 32) each.

template <class Op>
__device__ __forceinline__ void rows_strided(Op op, const scalar_t* z, index_t outer, int C,
                                             index_t inner, int cached) {
    __shared__ typename Op::Stats part[SM_STRIDED_MAX_TY][GPU_WARP];
    const int tx = threadIdx.x, ty = threadIdx.y, TY = blockDim.y;
    scalar_t* const out = op.dest();
    const scalar_t* const yp = op.ysrc();
    const bool has_y = Op::kHasY && yp != nullptr;
    scalar_t* const zc = reinterpret_cast<scalar_t*>(sm_dynamic);
    scalar_t* const yc = zc + (index_t)C * GPU_WARP;
    // Tiles are counted in 32 bits (the host checks outer * tiles_per_outer < 2^31): a 64-bit
    // division calls an out-of-line routine, and its saved registers show up as spills.
    const int tiles_per_outer = (int)ceil_div(inner, (index_t)GPU_WARP);
    const int tiles = (int)(outer * tiles_per_outer);

    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const index_t o = tile / tiles_per_outer;
        const index_t i = (index_t)(tile % tiles_per_outer) * GPU_WARP + tx;
        const bool active = i < inner;
        const index_t base = o * (index_t)C * inner + (active ? i : 0);
        const index_t row = o * inner + i;

        const typename Op::Ctx ctx = op.begin(row, active, active ? to_acc(z[base]) : acc_t(0));
        typename Op::Stats st = op.init();
        if (active) {
            for (int c = ty; c < C; c += TY) {
                const scalar_t xs = z[base + c * inner];
                const scalar_t ys = has_y ? yp[base + c * inner] : scalar_zero();
                if (cached) { zc[c * GPU_WARP + tx] = xs; if (has_y) yc[c * GPU_WARP + tx] = ys; }
                op.add(st, ctx, to_acc(xs), to_acc(ys), ColIdx{c}, c);
            }
        }
        part[ty][tx] = st;
        __syncthreads();
        st = part[0][tx];
        for (int r = 1; r < TY; ++r) Op::merge(st, part[r][tx]);   // same order in every thread
        const typename Op::Fin fin = op.finish(st, ctx, row, active && ty == 0);

        if (out != nullptr && active) {
            for (int c = ty; c < C; c += TY) {
                acc_t xv = 0, yv = 0;
                if (Op::kReadsX) xv = to_acc(cached ? zc[c * GPU_WARP + tx] : __ldcs(z + base + c * inner));
                if (has_y) yv = to_acc(cached ? yc[c * GPU_WARP + tx] : __ldcs(yp + base + c * inner));
                store_out<Op>(out + base + c * inner, op.out_value(fin, xv, yv, ColIdx{c}, c));
            }
        }
        __syncthreads();   // `part` and the cache are rewritten by the next tile
    }
    op.end_block();
}

