// softmax.cu: softmax, log-softmax, hardmax and fused softmax + cross-entropy (loss and dZ).
//
// Formulas (rows along the class axis, C classes, M = row max, s = sum_c exp(z_c - M)):
//   softmax      p_j    = exp(z_j - M) / s
//   log-softmax  logp_j = (z_j - M) - log s
//   hardmax      h_j    = [j == argmax], first index on ties, a NaN counts as the maximum
//                         (the first NaN wins), as NumPy's argmax
//   cross-entropy, integer target t (weight w, smoothing ls, W = sum_c w_c, sh = z - M, L = log s):
//     loss = w_t (1-ls) (L - sh_t) + (ls/C) (W L - sum_c w_c sh_c)     (0 for ignore_index)
//     dz_j = g [p_j (w_t (1-ls) + (ls/C) W) - [j == t] w_t (1-ls) - (ls/C) w_j]
//   cross-entropy, probability target y:  wy_c = w_c (y_c (1-ls) + ls/C)
//     loss = L sum_c wy_c - sum_c wy_c sh_c,   dz_j = g (p_j sum_c wy_c - wy_j)
//   g = dloss (per row for reduction 'none'), divided by the 'mean' denominator.
//
// Row statistics are gathered in ONE pass with an online (max, sum) pair, so a row is read once
// when it stays on chip and twice when it does not; exp is exp2 of a log2(e)-prescaled difference.
// sum_c w_c sh_c is accumulated against a pivot P (the row's first logit, 0 if not finite):
// q = sum w_c (z_c - P), then sum w_c sh_c = q + (P - M) W, which needs no rescaling on merge and
// keeps the precision of the shifted sum for logits far from 0.
//
// Paths (chosen by gpu/ops/softmax.py; z viewed as a C-contiguous (outer, C, inner) array):
//   *_warp_n{N}  inner == 1, C <= 32 N: a group of `lanes` lanes per row (lanes = 32, or the power
//                of two >= C when C <= 32, so several short rows share a warp); the row lives in
//                registers, N values per lane, 16-byte vector loads when rows are aligned.
//                Block 128 threads, grid = min(row groups, resident blocks), grid-stride over rows.
//   *_block      inner == 1, longer rows: one block per row. cached=1 keeps the row (and the
//                probability target) in dynamic shared memory, so it is read once from DRAM;
//                cached=0 (rows past the shared-memory limit, e.g. 128K-256K vocabularies) reads
//                it a second time, ideally from L2. Scalar head up to 16-byte alignment, vector
//                body, scalar tail. Block 128..1024 threads by row length.
//   *_strided    inner > 1 (classes on axis 0 of (C, m), or axis 1 of NCHW): a block of (32, TY)
//                threads handles a tile of 32 inner positions (coalesced along inner); the TY
//                thread rows split the classes and merge their statistics through shared memory.
//                cached=1 keeps the (C, 32) tile in shared memory.
//   softmax_cross_entropy_weight_sum  integer targets, reduction 'mean' with a gradient: the denominator
//                sum of w_t over non-ignored targets, needed before any dz is written, from the
//                targets alone (8 bytes a row), reduced deterministically.
//
// Bytes per op (E elements of s bytes, R rows), for the cached paths:
//   softmax / log-softmax  2 E s      (uncached path: 3 E s, one read from L2 if it fits)
//   hardmax                2 E s      (never needs the row cached: the output needs only argmax)
//   CE loss only           E s + 8 R (+ s R for 'none')
//   CE loss + dz           2 E s + 8 R (+ E s for probability targets); in place: same bytes,
//                          no second E-sized allocation. Uncached: + E s (+ E s dense targets).
//   softmax_cross_entropy_weight_sum          8 R
//
// Cross-entropy reductions are deterministic: each block sums its rows in a fixed order, writes a
// partial, and the last block to finish (atomic ticket) sums the partials in block order. An
// integer target outside [0, C) that is not ignore_index is never used as an index: the row is
// treated as ignored and the first such row is reported through bad_out (-1 when none).
//
// Assumptions: z, out, dz and y are C-contiguous (outer, C, inner) with the same 16-byte
// misalignment when vec=1; C < 2^31; element offsets and row counts are 64-bit (index_t).
// Storage in SCALAR_T, accumulation in ACC_T (float, double for double).

// No tuning defines: path thresholds are host-side (gpu/ops/softmax.py), so tests can force each path
// at small sizes without building another module.

#define SM_PACK (Pack<scalar_t>::size)   // elements in one 16-byte vector
#define SM_STRIDED_MAX_TY 8              // thread rows of the strided path's (32, TY) block
#define SM_NO_ROW 0x7fffffffffffffffLL   // "no bad row" in the per-block minimum

// ---------------------------------------------------------------------------------------------
// Scalar helpers
// ---------------------------------------------------------------------------------------------

#if defined(SCALAR_IS_DOUBLE)
// exp(d) for d <= 0 (every call here passes a difference to the running maximum) or NaN.
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
// far from 0 (1e4) lose nothing to the prescale.
__device__ __forceinline__ acc_t acc_exp(acc_t d) { return exp2f(d * 1.4426950408889634f); }
// x in [1, C]: MUFU.LG2 (absolute error ~1e-7 here); logf calls a slow path that spills.
__device__ __forceinline__ acc_t acc_log(acc_t x) { return __logf(x); }
// 1/x for x in [1, C] (the sums of exps): MUFU.RCP, inline; IEEE division and __frcp_rn call an
// out-of-line slow path on sm_80, which spills in these kernels.
__device__ __forceinline__ acc_t acc_rcp(acc_t x) { return __fdividef(1.0f, x); }
#endif

__device__ __forceinline__ acc_t acc_inf() { return acc_t(INFINITY); }
__device__ __forceinline__ scalar_t scalar_zero() { return from_acc<scalar_t>(acc_t(0)); }

// A coherent 16-byte load (not __ldg): in-place cross-entropy writes dz over z during the
// kernel, which the read-only (non-coherent) path does not allow; it also lets the uncached
// paths' first read leave the row in L2 for the second.
__device__ __forceinline__ Pack<scalar_t> load_pack_coherent(const scalar_t* p) {
    return *reinterpret_cast<const Pack<scalar_t>*>(p);
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
// Ops: what a row kernel accumulates (Stats), holds per row (Ctx), and writes (out)
// ---------------------------------------------------------------------------------------------
//
// Each op provides:
//   Stats init(); void add(Stats&, const Ctx&, acc_t x, acc_t y, int col);
//   static void merge(Stats&, const Stats&) (symmetric); static Stats shfl_xor(Stats, int, int);
//   Ctx begin(index_t row, bool active, acc_t pivot);
//   Fin finish(const Stats&, const Ctx&, index_t row, bool leader);  // leader: once per row
//   acc_t out(const Fin&, acc_t x, acc_t y, int col);
//   void end_block();                                                 // after the last row
//   kReadsX (out needs x), kHasY (a dense target may be read), kStream (streaming stores)

struct SoftmaxOp {
    scalar_t* out;
    int log;

    static constexpr bool kReadsX = true, kHasY = false, kStream = false;
    struct Stats { acc_t m, s; };
    struct Ctx {};
    struct Fin { acc_t m, a; };   // a: 1/s (softmax) or log s (log-softmax)

    __device__ __forceinline__ scalar_t* dest() const { return out; }
    __device__ __forceinline__ const scalar_t* ysrc() const { return nullptr; }
    __device__ __forceinline__ Stats init() const { return Stats{-acc_inf(), acc_t(0)}; }
    __device__ __forceinline__ Ctx begin(index_t, bool, acc_t) const { return Ctx{}; }
    __device__ __forceinline__ void add(Stats& st, const Ctx&, acc_t x, acc_t, int) const {
        online_add(st.m, st.s, x);
    }
    __device__ __forceinline__ static void merge(Stats& a, const Stats& b) { online_merge(a.m, a.s, b.m, b.s); }
    __device__ __forceinline__ static Stats shfl_xor(const Stats& a, int mask, int width) {
        return Stats{__shfl_xor_sync(GPU_FULL_MASK, a.m, mask, width),
                     __shfl_xor_sync(GPU_FULL_MASK, a.s, mask, width)};
    }
    __device__ __forceinline__ Fin finish(const Stats& st, const Ctx&, index_t, bool) const {
        return Fin{st.m, log ? acc_log(st.s) : acc_rcp(st.s)};
    }
    __device__ __forceinline__ acc_t out_value(const Fin& f, acc_t x, acc_t, int) const {
        return log ? (x - f.m) - f.a : acc_exp(x - f.m) * f.a;
    }
    __device__ __forceinline__ void end_block() {}
};

struct HardmaxOp {
    scalar_t* out;

    static constexpr bool kReadsX = false, kHasY = false, kStream = false;
    struct Stats { acc_t v; int i; };
    struct Ctx {};
    struct Fin { int i; };

    __device__ __forceinline__ scalar_t* dest() const { return out; }
    __device__ __forceinline__ const scalar_t* ysrc() const { return nullptr; }
    __device__ __forceinline__ Stats init() const { return Stats{-acc_inf(), 0x7fffffff}; }
    __device__ __forceinline__ Ctx begin(index_t, bool, acc_t) const { return Ctx{}; }
    // The better of two candidates: NaN beats numbers, larger beats smaller, ties (and two NaNs)
    // go to the smaller index. Symmetric, so any merge order gives NumPy's argmax.
    __device__ __forceinline__ static void merge(Stats& a, const Stats& b) {
        const bool an = a.v != a.v, bn = b.v != b.v;
        bool take_b;
        if (an || bn) take_b = (an && bn) ? b.i < a.i : bn;
        else take_b = b.v > a.v || (b.v == a.v && b.i < a.i);
        if (take_b) a = b;
    }
    __device__ __forceinline__ void add(Stats& st, const Ctx&, acc_t x, acc_t, int col) const {
        merge(st, Stats{x, col});
    }
    __device__ __forceinline__ static Stats shfl_xor(const Stats& a, int mask, int width) {
        return Stats{__shfl_xor_sync(GPU_FULL_MASK, a.v, mask, width),
                     __shfl_xor_sync(GPU_FULL_MASK, a.i, mask, width)};
    }
    __device__ __forceinline__ Fin finish(const Stats& st, const Ctx&, index_t, bool) const { return Fin{st.i}; }
    __device__ __forceinline__ acc_t out_value(const Fin& f, acc_t, acc_t, int col) const {
        return col == f.i ? acc_t(1) : acc_t(0);
    }
    __device__ __forceinline__ void end_block() {}
};

// Cross-entropy flags (host: gpu/ops/softmax.py _CE_*).
#define CE_GRAD 1      // write dz
#define CE_ROWS 2      // write the per-row losses (reduction 'none')
#define CE_PROBS 4     // y holds class probabilities (else target holds class indices)
#define CE_WEIGHT 8    // weight holds per-class weights (else all 1)
#define CE_DENOM 16    // g = dloss * *inv_denom ('mean' over integer targets, gradient)

// reduction codes for the scalar loss
#define CE_RED_NONE 0
#define CE_RED_SUM 1
#define CE_RED_MEAN 2        // sum / sum of w_t (NaN when every target is ignored)
#define CE_RED_MEAN_ROWS 3   // sum / rows (probability targets)

struct CrossEntropyOp {
    // outputs
    scalar_t* dz;            // [rows * C] (may alias z: in place)
    scalar_t* loss_rows;     // [rows] for CE_ROWS
    scalar_t* loss_out;      // [1], reduction != none
    long long* bad_out;      // [1]: first row with an out-of-range target, -1 if none
    acc_t* part_loss;        // [gridDim.x] per-block partials
    acc_t* part_w;
    long long* part_bad;
    unsigned int* ticket;    // [1], zero before the launch
    // inputs
    const long long* target; // [rows] class indices
    const scalar_t* y;       // [rows * C] class probabilities (CE_PROBS)
    const acc_t* weight;     // [C] (CE_WEIGHT)
    const acc_t* dloss;      // [1] or [rows]
    index_t dloss_stride;    // 0 or 1
    const acc_t* inv_denom;  // [1] (CE_DENOM): 1 / sum of w_t, 0 if that sum is 0
    long long ignore_index;
    acc_t ls;                // label smoothing
    acc_t ls_c;              // ls / C
    int C, flags, reduction;
    index_t rows;
    // per-thread sums over the rows this thread leads
    acc_t sum_loss, sum_w;
    long long first_bad;

    static constexpr bool kReadsX = true, kHasY = true, kStream = true;
    struct Stats { acc_t m, s, zt, q, w; };  // zt: z at the target (one lane adds it)
    struct Ctx { long long t; acc_t pivot; bool active, valid, bad; };   // active: a real row
    struct Fin { acc_t m, scale, sub_t, sub_w; long long t; };

    __device__ __forceinline__ scalar_t* dest() const { return (flags & CE_GRAD) ? dz : nullptr; }
    __device__ __forceinline__ const scalar_t* ysrc() const { return (flags & CE_PROBS) ? y : nullptr; }
    __device__ __forceinline__ acc_t w_of(long long c) const {
        return (flags & CE_WEIGHT) ? weight[c] : acc_t(1);
    }
    __device__ __forceinline__ Stats init() const {
        return Stats{-acc_inf(), acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
    }
    __device__ __forceinline__ Ctx begin(index_t row, bool active, acc_t pivot) const {
        Ctx c;
        c.pivot = (pivot - pivot == acc_t(0)) ? pivot : acc_t(0);   // finite, else 0
        c.t = -1;
        c.active = active;
        c.valid = c.bad = false;
        if (!active) return c;
        if (flags & CE_PROBS) {
            c.valid = true;
        } else {
            const long long t = target[row];
            const bool in_range = t >= 0 && t < (long long)C;
            c.bad = !in_range && t != ignore_index;
            c.valid = in_range && t != ignore_index;   // never used as an index unless in range
            c.t = c.valid ? t : -1;
        }
        return c;
    }
    __device__ __forceinline__ void add(Stats& st, const Ctx& c, acc_t x, acc_t yv, int col) const {
        online_add(st.m, st.s, x);
        if (col == c.t) st.zt += x;
        if (flags & CE_PROBS) {
            const acc_t wy = w_of(col) * (yv * (acc_t(1) - ls) + ls_c);
            st.q += wy * (x - c.pivot);
            st.w += wy;
        } else if (ls > acc_t(0)) {
            const acc_t wc = w_of(col);
            st.q += wc * (x - c.pivot);
            st.w += wc;
        }
    }
    __device__ __forceinline__ static void merge(Stats& a, const Stats& b) {
        online_merge(a.m, a.s, b.m, b.s);
        a.zt += b.zt;
        a.q += b.q;
        a.w += b.w;
    }
    __device__ __forceinline__ static Stats shfl_xor(const Stats& a, int mask, int width) {
        return Stats{__shfl_xor_sync(GPU_FULL_MASK, a.m, mask, width),
                     __shfl_xor_sync(GPU_FULL_MASK, a.s, mask, width),
                     __shfl_xor_sync(GPU_FULL_MASK, a.zt, mask, width),
                     __shfl_xor_sync(GPU_FULL_MASK, a.q, mask, width),
                     __shfl_xor_sync(GPU_FULL_MASK, a.w, mask, width)};
    }
    __device__ __forceinline__ Fin finish(const Stats& st, const Ctx& c, index_t row, bool leader) {
        const acc_t L = acc_log(st.s);
        const acc_t inv_s = acc_rcp(st.s);
        acc_t g = acc_t(0);
        if ((flags & CE_GRAD) && c.active) {   // lanes past the last row read nothing
            g = dloss[row * dloss_stride];
            if (flags & CE_DENOM) g *= *inv_denom;   // 0 when every target is ignored
        }
        Fin f;
        f.m = st.m;
        f.t = c.t;
        acc_t loss, wt;
        if (flags & CE_PROBS) {
            const acc_t wy_sh = st.q + (c.pivot - st.m) * st.w;   // sum_c wy_c (z_c - M)
            loss = L * st.w - wy_sh;
            wt = acc_t(1);
            f.scale = g * st.w * inv_s;
            f.sub_t = acc_t(0);
            f.sub_w = g;
        } else {
            wt = c.valid ? w_of(c.t) : acc_t(0);
            const acc_t keep = acc_t(1) - ls;
            loss = wt * keep * (L - (st.zt - st.m));
            const acc_t gs = c.valid ? g * ls_c : acc_t(0);
            acc_t coef = g * wt * keep;
            if (ls > acc_t(0) && c.valid) {
                const acc_t w_sh = st.q + (c.pivot - st.m) * st.w;   // sum_c w_c (z_c - M)
                loss += ls_c * (st.w * L - w_sh);
                coef += gs * st.w;
            }
            f.scale = coef * inv_s;
            f.sub_t = g * wt * keep;
            f.sub_w = gs;
        }
        if (leader) {
            if (flags & CE_ROWS) loss_rows[row] = from_acc<scalar_t>(loss);
            sum_loss += loss;
            sum_w += wt;
            if (c.bad && row < first_bad) first_bad = row;
        }
        return f;
    }
    __device__ __forceinline__ acc_t out_value(const Fin& f, acc_t x, acc_t yv, int col) const {
        acc_t d = acc_exp(x - f.m) * f.scale;
        if (flags & CE_PROBS) {
            d -= f.sub_w * w_of(col) * (yv * (acc_t(1) - ls) + ls_c);
        } else {
            if (col == f.t) d -= f.sub_t;
            if (ls > acc_t(0)) d -= f.sub_w * w_of(col);
        }
        return d;
    }
    // Deterministic grid reduction: block partial (fixed tree), then the last block to take a
    // ticket sums every block's partial in block order and writes the scalar results.
    __device__ __forceinline__ void end_block();
};

struct MinLL {
    __device__ __forceinline__ long long operator()(long long a, long long b) const { return a < b ? a : b; }
    template <typename T> __device__ __forceinline__ static T identity() { return SM_NO_ROW; }
};

__device__ __forceinline__ void CrossEntropyOp::end_block() {
    __shared__ acc_t scratch[32];
    __shared__ long long scratch_ll[32];
    __shared__ int is_last;
    const int tid = block_thread_rank();
    const int nt = block_num_threads();
    acc_t l = block_reduce_sum(sum_loss, scratch);
    acc_t w = block_reduce_sum(sum_w, scratch);
    long long b = block_reduce(first_bad, scratch_ll, MinLL());
    if (tid == 0) {
        part_loss[blockIdx.x] = l;
        part_w[blockIdx.x] = w;
        part_bad[blockIdx.x] = b;
        __threadfence();   // partials visible device-wide before the ticket is taken
        is_last = atomicAdd(ticket, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (!is_last) return;   // block-uniform
    __threadfence();
    l = acc_t(0);
    w = acc_t(0);
    b = SM_NO_ROW;
    for (int i = tid; i < (int)gridDim.x; i += nt) {   // volatile: other blocks' writes, not L1
        l += ((volatile acc_t*)part_loss)[i];
        w += ((volatile acc_t*)part_w)[i];
        const long long bi = ((volatile long long*)part_bad)[i];
        b = bi < b ? bi : b;
    }
    l = block_reduce_sum(l, scratch);
    w = block_reduce_sum(w, scratch);
    b = block_reduce(b, scratch_ll, MinLL());
    if (tid == 0) {
        bad_out[0] = b == SM_NO_ROW ? -1 : b;
        if (reduction == CE_RED_SUM) loss_out[0] = from_acc<scalar_t>(l);
        else if (reduction == CE_RED_MEAN) loss_out[0] = from_acc<scalar_t>(w != acc_t(0) ? l / w : acc_t(NAN));
        else if (reduction == CE_RED_MEAN_ROWS) loss_out[0] = from_acc<scalar_t>(l / acc_t(rows));
    }
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
template <class Op>
__device__ __forceinline__ typename Op::Stats block_allreduce(typename Op::Stats st, typename Op::Stats* scratch) {
    const int tid = block_thread_rank();
    const int nw = block_num_threads() / GPU_WARP;
    st = group_allreduce<Op>(st, GPU_WARP);
    if (tid % GPU_WARP == 0) scratch[tid / GPU_WARP] = st;
    __syncthreads();
    st = scratch[0];
    for (int w = 1; w < nw; ++w) Op::merge(st, scratch[w]);   // same order in every thread
    __syncthreads();
    return st;
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
            if (active && col < C) op.add(st, ctx, x[j], Op::kHasY && yp ? yv[j] : acc_t(0), col);
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
                        p.v[i] = from_acc<scalar_t>(op.out_value(fin, x[k * V + i], Op::kHasY && yp ? yv[k * V + i] : acc_t(0), col0 + i));
                    if (Op::kStream) store_pack_stream(out + base + col0, p);
                    else store_pack(out + base + col0, p);
                }
            } else {
#pragma unroll
                for (int i = 0; i < V; ++i) {
                    const int col = col0 + i;
                    if (col < C)
                        store_out<Op>(out + base + col, op.out_value(fin, x[k * V + i], Op::kHasY && yp ? yv[k * V + i] : acc_t(0), col));
                }
            }
        }
    }
    op.end_block();
}

// ---------------------------------------------------------------------------------------------
// Path 2: a block per row (inner == 1), the row cached in shared memory when it fits
// ---------------------------------------------------------------------------------------------
// Columns [0, head) and [head + nvec V, C) are scalar, [head, head + nvec V) are 16-byte vectors
// (head: elements up to the row's first 16-byte boundary; vec=0 makes every column scalar).
// Shared memory holds column c at c + shift, shift = (V - head) % V, so cached vectors are aligned
// too: (C + V) elements for z, the same again for y.

extern __shared__ Pack<scalar_t> sm_dynamic[];

template <class Op>
__device__ __forceinline__ void rows_block(Op op, const scalar_t* z, index_t rows, int C,
                                           int cached, int vec) {
    constexpr int V = SM_PACK;
    __shared__ typename Op::Stats scratch[32];
    const int tid = threadIdx.x;
    const int nt = blockDim.x;
    scalar_t* const out = op.dest();
    const scalar_t* const yp = op.ysrc();
    const bool has_y = Op::kHasY && yp != nullptr;
    scalar_t* const zc = reinterpret_cast<scalar_t*>(sm_dynamic);
    scalar_t* const yc = zc + (C + V + V - 1) / V * V;

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

        const typename Op::Ctx ctx = op.begin(row, true, to_acc(z[base]));
        typename Op::Stats st = op.init();
        // pass 1: statistics (and the shared-memory copy)
        for (int c = tid; c < head; c += nt) {
            const scalar_t xs = z[base + c];
            const scalar_t ys = has_y ? yp[base + c] : scalar_zero();
            if (cached) { zc[c + shift] = xs; if (has_y) yc[c + shift] = ys; }
            op.add(st, ctx, to_acc(xs), to_acc(ys), c);
        }
        for (int k = tid; k < nvec; k += nt) {
            const int c0 = head + k * V;
            const Pack<scalar_t> p = load_pack_coherent(z + base + c0);
            Pack<scalar_t> q;
            if (has_y) q = load_pack_coherent(yp + base + c0);
            if (cached) {
                *reinterpret_cast<Pack<scalar_t>*>(zc + c0 + shift) = p;
                if (has_y) *reinterpret_cast<Pack<scalar_t>*>(yc + c0 + shift) = q;
            }
#pragma unroll
            for (int i = 0; i < V; ++i) op.add(st, ctx, to_acc(p.v[i]), has_y ? to_acc(q.v[i]) : acc_t(0), c0 + i);
        }
        for (int c = tail0 + tid; c < C; c += nt) {
            const scalar_t xs = z[base + c];
            const scalar_t ys = has_y ? yp[base + c] : scalar_zero();
            if (cached) { zc[c + shift] = xs; if (has_y) yc[c + shift] = ys; }
            op.add(st, ctx, to_acc(xs), to_acc(ys), c);
        }
        st = block_allreduce<Op>(st, scratch);   // its barriers also publish the cached row
        const typename Op::Fin fin = op.finish(st, ctx, row, tid == 0);

        if (out != nullptr) {
            // pass 2: outputs; uncached rows are read again (last use: streaming loads)
            const bool from_smem = cached != 0;
            for (int c = tid; c < head; c += nt) {
                acc_t xv = 0, yv = 0;
                if (Op::kReadsX) xv = to_acc(from_smem ? zc[c + shift] : __ldcs(z + base + c));
                if (has_y) yv = to_acc(from_smem ? yc[c + shift] : __ldcs(yp + base + c));
                store_out<Op>(out + base + c, op.out_value(fin, xv, yv, c));
            }
            for (int k = tid; k < nvec; k += nt) {
                const int c0 = head + k * V;
                Pack<scalar_t> p, q, o;
                if (Op::kReadsX)
                    p = from_smem ? *reinterpret_cast<const Pack<scalar_t>*>(zc + c0 + shift) : load_pack_stream(z + base + c0);
                if (has_y)
                    q = from_smem ? *reinterpret_cast<const Pack<scalar_t>*>(yc + c0 + shift) : load_pack_stream(yp + base + c0);
#pragma unroll
                for (int i = 0; i < V; ++i)
                    o.v[i] = from_acc<scalar_t>(op.out_value(fin, Op::kReadsX ? to_acc(p.v[i]) : acc_t(0),
                                                             has_y ? to_acc(q.v[i]) : acc_t(0), c0 + i));
                if (Op::kStream) store_pack_stream(out + base + c0, o);
                else store_pack(out + base + c0, o);
            }
            for (int c = tail0 + tid; c < C; c += nt) {
                acc_t xv = 0, yv = 0;
                if (Op::kReadsX) xv = to_acc(from_smem ? zc[c + shift] : __ldcs(z + base + c));
                if (has_y) yv = to_acc(from_smem ? yc[c + shift] : __ldcs(yp + base + c));
                store_out<Op>(out + base + c, op.out_value(fin, xv, yv, c));
            }
        }
        if (cached) __syncthreads();   // the next row overwrites the cache
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
    const int tiles_per_outer = (int)((inner + GPU_WARP - 1) / GPU_WARP);
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
                op.add(st, ctx, to_acc(xs), to_acc(ys), c);
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
                store_out<Op>(out + base + c * inner, op.out_value(fin, xv, yv, c));
            }
        }
        __syncthreads();   // `part` and the cache are rewritten by the next tile
    }
    op.end_block();
}

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------
// Warp kernels: 128 threads; N (values per lane) in {1, 2, 4, 8, 16, 32}, the smallest with
// 32 N >= C (N = 1 with lanes < 32 for C <= 32).

// The cross-entropy kernels share one argument list: outputs, workspace, inputs, options.
#define CE_PARAMS                                                                                       \
    scalar_t *dz, scalar_t *loss_rows, scalar_t *loss_out, long long *bad_out, acc_t *part_loss,        \
        acc_t *part_w, long long *part_bad, unsigned int *ticket, const scalar_t *z,                    \
        const long long *target, const scalar_t *y, const acc_t *weight, const acc_t *dloss,            \
        index_t dloss_stride, const acc_t *inv_denom, long long ignore_index, acc_t label_smoothing,        \
        int flags, int reduction, index_t n_rows
#define CE_ARGS                                                                                         \
    dz, loss_rows, loss_out, bad_out, part_loss, part_w, part_bad, ticket, target, y, weight, dloss,    \
        dloss_stride, inv_denom, ignore_index, label_smoothing, flags, reduction, n_rows

__device__ __forceinline__ CrossEntropyOp make_ce(
    scalar_t* dz, scalar_t* loss_rows, scalar_t* loss_out, long long* bad_out, acc_t* part_loss, acc_t* part_w,
    long long* part_bad, unsigned int* ticket, const long long* target, const scalar_t* y, const acc_t* weight,
    const acc_t* dloss, index_t dloss_stride, const acc_t* inv_denom, long long ignore_index, acc_t label_smoothing,
    int flags, int reduction, index_t n_rows, int C) {
    CrossEntropyOp op;
    op.dz = dz; op.loss_rows = loss_rows; op.loss_out = loss_out; op.bad_out = bad_out;
    op.part_loss = part_loss; op.part_w = part_w; op.part_bad = part_bad; op.ticket = ticket;
    op.target = target; op.y = y; op.weight = weight; op.dloss = dloss; op.dloss_stride = dloss_stride;
    op.inv_denom = inv_denom; op.ignore_index = ignore_index; op.ls = label_smoothing; op.C = C;
    op.ls_c = label_smoothing * acc_rcp(acc_t(C));
    op.flags = flags; op.reduction = reduction; op.rows = n_rows;
    op.sum_loss = acc_t(0); op.sum_w = acc_t(0); op.first_bad = SM_NO_ROW;
    return op;
}

// Warp kernels: 128 threads; N (values per lane) in {1, 2, 4, 8, 16, 32}, the smallest with
// 32 N >= C (N = 1 with lanes < 32 for C <= 32).
#define SM_WARP_KERNELS(N)                                                                              \
    extern "C" __global__ void __launch_bounds__(128)                                                   \
    softmax_warp_n##N(scalar_t* __restrict__ out, const scalar_t* __restrict__ z, index_t rows, int C,   \
                      int lanes, int vec, int log) {                                                     \
        rows_warp<N>(SoftmaxOp{out, log}, z, rows, C, lanes, vec);                                       \
    }                                                                                                    \
    extern "C" __global__ void __launch_bounds__(128)                                                   \
    hardmax_warp_n##N(scalar_t* __restrict__ out, const scalar_t* __restrict__ z, index_t rows, int C,   \
                      int lanes, int vec) {                                                              \
        rows_warp<N>(HardmaxOp{out}, z, rows, C, lanes, vec);                                            \
    }
// MIN_BLOCKS: ptxas's register target; without it, N = 16 saves a register to the stack on sm_90.
#define CE_WARP_KERNEL(N, MIN_BLOCKS)                                                                   \
    extern "C" __global__ void __launch_bounds__(128, MIN_BLOCKS)                                       \
    softmax_cross_entropy_warp_n##N(CE_PARAMS, int C, int lanes, int vec) {                                                 \
        rows_warp<N>(make_ce(CE_ARGS, C), z, n_rows, C, lanes, vec);                                     \
    }

SM_WARP_KERNELS(1) SM_WARP_KERNELS(2) SM_WARP_KERNELS(4) SM_WARP_KERNELS(8) SM_WARP_KERNELS(16)
SM_WARP_KERNELS(32)
CE_WARP_KERNEL(1, 4) CE_WARP_KERNEL(2, 4) CE_WARP_KERNEL(4, 4) CE_WARP_KERNEL(8, 4)
#if !defined(SCALAR_IS_DOUBLE)
// 16 or 32 doubles of z and as many of y per lane do not fit in registers: double CE rows past
// 256 classes take the block path.
CE_WARP_KERNEL(16, 4) CE_WARP_KERNEL(32, 1)
#endif

extern "C" __global__ void __launch_bounds__(1024)
softmax_block(scalar_t* __restrict__ out, const scalar_t* __restrict__ z, index_t rows, int C, int cached,
              int vec, int log) {
    rows_block(SoftmaxOp{out, log}, z, rows, C, cached, vec);
}
extern "C" __global__ void __launch_bounds__(1024)
hardmax_block(scalar_t* __restrict__ out, const scalar_t* __restrict__ z, index_t rows, int C, int vec) {
    rows_block(HardmaxOp{out}, z, rows, C, 0, vec);
}
// z is not __restrict__ in the cross-entropy kernels: dz may be written over it (in place).
extern "C" __global__ void __launch_bounds__(1024)
softmax_cross_entropy_block(CE_PARAMS, int C, int cached, int vec) {
    rows_block(make_ce(CE_ARGS, C), z, n_rows, C, cached, vec);
}

extern "C" __global__ void __launch_bounds__(256)
softmax_strided(scalar_t* __restrict__ out, const scalar_t* __restrict__ z, index_t outer, int C,
                index_t inner, int cached, int log) {
    rows_strided(SoftmaxOp{out, log}, z, outer, C, inner, cached);
}
extern "C" __global__ void __launch_bounds__(256)
hardmax_strided(scalar_t* __restrict__ out, const scalar_t* __restrict__ z, index_t outer, int C, index_t inner) {
    rows_strided(HardmaxOp{out}, z, outer, C, inner, 0);
}
// (256, 4): ptxas's register target; without it NVRTC 12 saves a register to the stack on sm_80.
extern "C" __global__ void __launch_bounds__(256, 4)
softmax_cross_entropy_strided(CE_PARAMS, index_t outer, int C, index_t inner, int cached) {
    rows_strided(make_ce(CE_ARGS, C), z, outer, C, inner, cached);
}

// 1 / (sum of w_t over rows whose target is in range and not ignore_index), 0 when that sum is 0:
// the inverse 'mean' denominator a gradient needs before any dz is written. Grid-stride,
// fixed-order block sums, the last block sums the partials in block order. Block: 256 threads.
extern "C" __global__ void __launch_bounds__(256)
softmax_cross_entropy_weight_sum(acc_t* inv_denom, acc_t* part, unsigned int* ticket, const long long* __restrict__ target,
              const acc_t* __restrict__ weight, int has_weight, index_t rows, int C, long long ignore_index) {
    __shared__ acc_t scratch[32];
    __shared__ int is_last;
    const int tid = threadIdx.x;
    acc_t w = 0;
    for (index_t r = (index_t)blockIdx.x * blockDim.x + tid; r < rows; r += (index_t)gridDim.x * blockDim.x) {
        const long long t = target[r];
        if (t != ignore_index && t >= 0 && t < (long long)C) w += has_weight ? weight[t] : acc_t(1);
    }
    w = block_reduce_sum(w, scratch);
    if (tid == 0) {
        part[blockIdx.x] = w;
        __threadfence();
        is_last = atomicAdd(ticket, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    w = 0;
    for (int i = tid; i < (int)gridDim.x; i += blockDim.x) w += ((volatile acc_t*)part)[i];
    w = block_reduce_sum(w, scratch);
    if (tid == 0) inv_denom[0] = w != acc_t(0) ? acc_t(1) / w : acc_t(0);
}
