// softmax.cu: softmax, log-softmax, hardmax and fused softmax + cross-entropy (loss and dZ).
//
// @headers rows.cuh
// @variants [{}, {"CE_PLAIN": 1}, {"CE_SMOOTH": 1}]
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
//   z-loss (PaLM), lse = M + L the row's log-sum-exp: loss += zl lse^2 on every row that is not
//     ignored, dz_j += gz 2 zl lse p_j. The class weight does not scale it, and 'mean' divides it
//     by the number of non-ignored rows (of rows, for probability targets), not by sum w_t: gz
//     is dloss over that count (Liger-Kernel's convention).
//   soft-cap (Gemma 2): every formula above reads z'_c = cap tanh(z_c / cap) in place of z_c,
//     and dz_c = dz'_c (1 - tanh^2(z_c / cap)). Both are applied where z is read, in the same pass.
//
// Every kernel is one path of the row engine (rows.cuh: the paths, their launch shapes and the Op
// interface) run with one of the ops below. Row statistics are gathered in ONE pass with an online
// (max, sum) pair, so a row is read once when it stays on chip and twice when it does not.
// sum_c w_c sh_c is accumulated against a pivot P (the row's first logit, 0 if not finite):
// q = sum w_c (z_c - P), then sum w_c sh_c = q + (P - M) W, which needs no rescaling on merge and
// keeps the precision of the shifted sum for logits far from 0.
//
// Paths (chosen by gpu/_engines/rows.py; z viewed as a C-contiguous (outer, C, inner) array):
//   *_warp_n{N}  rows_warp: inner == 1, C <= 32 N, the row in registers, `lanes` lanes per row.
//                Block 128 threads, grid = min(row groups, resident blocks).
//   *_block      rows_block: inner == 1, longer rows, one block per row. `cached` columns of the
//                row (and of the probability target) are kept in shared memory: the whole row
//                where it fits, so it is read once from DRAM; else (e.g. 128K-256K vocabularies)
//                the leading columns the budget holds, the rest read a second time, from L2: the
//                rest of the row is read last in pass 1 and first in pass 2, and the kept columns
//                are read with evict-first hints, so the L2 working set is resident blocks x the
//                uncached part of a row. Block 128..1024 threads by row length.
//   *_strided    rows_strided: inner > 1 (classes on axis 0 of (C, m), or axis 1 of NCHW), a
//                (32, TY) block per tile of 32 inner positions (coalesced along inner).
//   softmax_cross_entropy_weight_sum  integer targets, reduction 'mean' with a gradient: the denominator
//                sum of w_t over non-ignored targets, needed before any dz is written, from the
//                targets alone (8 bytes a row), reduced deterministically.
//
// Bytes per op (E elements of s bytes, R rows), for the cached paths:
//   softmax / log-softmax  2 E s      (a partly cached row: the rest read again, from L2 if it fits)
//   hardmax                2 E s      (never needs the row cached: the output needs only argmax)
//   CE loss only           E s + 8 R (+ s R for 'none')
//   CE loss + dz           2 E s + 8 R (+ E s for probability targets); in place: same bytes,
//                          no second E-sized allocation. Uncached: + E s (+ E s dense targets).
//   softmax_cross_entropy_weight_sum          8 R
//
// Cross-entropy reductions are deterministic: each block sums its rows in a fixed order, writes a
// partial, and the last block to finish (last_block_ticket) sums the partials in block order. An
// integer target outside [0, C) that is not ignore_index is never used as an index: the row is
// treated as ignored and the first such row is recorded in bad_out, a sticky record in the
// stream's workspace that the host reads only at an explicit check (no sync per call).
//
// Assumptions: z, out, dz and y are C-contiguous (outer, C, inner) with the same 16-byte
// misalignment when vec=1; C < 2^31; element offsets and row counts are 64-bit (index_t).
// Storage in SCALAR_T, accumulation in ACC_T (float, double for double).

// No tuning defines: path thresholds are host-side (gpu/_engines/rows.py), so tests can force each path
// at small sizes without building another module.

#define SM_NO_ROW 0x7fffffffffffffffLL   // "no bad row" in the per-block minimum

// The row paths' block sizes (SM_WARP_THREADS, SM_BLOCK_MAX_THREADS[_F64]) are rows.cuh's: each
// kernel's __launch_bounds__ below, so a launch past them fails instead of running with too few
// registers. The host plans with them (gpu/_engines/rows.py), and with this one
// (gpu/ops/softmax/kernel_path.py):
#define SM_WEIGHT_SUM_THREADS 256 // softmax_cross_entropy_weight_sum

// ---------------------------------------------------------------------------------------------
// Ops: what a row kernel accumulates (Stats), holds per row (Ctx), and writes (out_value)
// ---------------------------------------------------------------------------------------------
// The interface the row engine calls is described at the top of rows.cuh.

struct SoftmaxOp {
    scalar_t* out;
    int log;

    static constexpr bool kReadsX = true, kHasY = false, kHasW = false, kStream = false;
    struct Stats { acc_t m, s; };
    struct Ctx {};
    struct Fin { acc_t m, a; };   // a: 1/s (softmax) or log s (log-softmax)

    __device__ __forceinline__ scalar_t* dest() const { return out; }
    __device__ __forceinline__ const scalar_t* ysrc() const { return nullptr; }
    __device__ __forceinline__ const acc_t* wsrc() const { return nullptr; }
    __device__ __forceinline__ Stats init() const { return Stats{-acc_inf(), acc_t(0)}; }
    __device__ __forceinline__ Ctx begin(index_t, bool, acc_t) const { return Ctx{}; }
    template <class Wt> __device__ __forceinline__ void add(Stats& st, const Ctx&, acc_t x, acc_t, Wt, int) const {
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
    template <class Wt> __device__ __forceinline__ acc_t out_value(const Fin& f, acc_t x, acc_t, Wt, int) const {
        return log ? (x - f.m) - f.a : acc_exp(x - f.m) * f.a;
    }
    __device__ __forceinline__ void end_block() {}
};

struct HardmaxOp {
    scalar_t* out;

    static constexpr bool kReadsX = false, kHasY = false, kHasW = false, kStream = false;
    struct Stats { acc_t v; int i; };
    struct Ctx {};
    struct Fin { int i; };

    __device__ __forceinline__ scalar_t* dest() const { return out; }
    __device__ __forceinline__ const scalar_t* ysrc() const { return nullptr; }
    __device__ __forceinline__ const acc_t* wsrc() const { return nullptr; }
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
    template <class Wt> __device__ __forceinline__ void add(Stats& st, const Ctx&, acc_t x, acc_t, Wt, int col) const {
        merge(st, Stats{x, col});
    }
    __device__ __forceinline__ static Stats shfl_xor(const Stats& a, int mask, int width) {
        return Stats{__shfl_xor_sync(GPU_FULL_MASK, a.v, mask, width),
                     __shfl_xor_sync(GPU_FULL_MASK, a.i, mask, width)};
    }
    __device__ __forceinline__ Fin finish(const Stats& st, const Ctx&, index_t, bool) const { return Fin{st.i}; }
    template <class Wt> __device__ __forceinline__ acc_t out_value(const Fin& f, acc_t, acc_t, Wt, int col) const {
        return col == f.i ? acc_t(1) : acc_t(0);
    }
    __device__ __forceinline__ void end_block() {}
};

// Cross-entropy flags (host: gpu/ops/softmax/kernel_path.py).
#define CE_GRAD 1      // write dz
#define CE_ROWS 2      // write the per-row losses (reduction 'none')
#define CE_PROBS 4     // y holds class probabilities (else target holds class indices)
#define CE_WEIGHT 8    // weight holds per-class weights (else all 1)
#define CE_DENOM 16    // g = dloss * inv_denom[0], gz = dloss * inv_denom[1] ('mean' over integer targets, gradient)
#define CE_SOFTCAP 32  // logits are soft-capped: z' = cap tanh(z / cap)
#define CE_ZRET 64     // also write the z-loss term: loss_out[1], and loss_rows[rows + row] with CE_ROWS

// The modules built with CE_PLAIN=1 and CE_SMOOTH=1 (the @variants line) hold the cross-entropy
// warp and block kernels alone, for integer targets without soft-cap, without label smoothing
// (CE_PLAIN) or with it (CE_SMOOTH; and softmax_cross_entropy_block_w there, for class weights)
// (host: gpu/ops/softmax/kernel_path.py): those are fixed at compile time, so the per-element code
// tests none of those flags and reads no y (16-bit rows then keep 2 vectors in flight: rows_block's
// U), and the plain module reads no per-class weight.
#if defined(CE_PLAIN) || defined(CE_SMOOTH)
#define CE_STATIC_OFF (CE_PROBS | CE_SOFTCAP)   // flags the module ignores (the host leaves them 0)
#define CE_FULL 0
#else
#define CE_STATIC_OFF 0
#define CE_FULL 1                               // the module with every option and every kernel
#endif
// label smoothing: 0 none (the host passes 0), 1 as label_smoothing says, 2 always (the host
// passes label_smoothing > 0)
#if defined(CE_PLAIN)
#define CE_SMOOTHING 0
#elif defined(CE_SMOOTH)
#define CE_SMOOTHING 2
#else
#define CE_SMOOTHING 1
#endif

// reduction codes for the scalar loss
#define CE_RED_NONE 0
#define CE_RED_SUM 1
#define CE_RED_MEAN 2        // sum / sum of w_t (NaN when every target is ignored)
#define CE_RED_MEAN_ROWS 3   // sum / rows (probability targets)

// The row statistics of cross-entropy, shared by CrossEntropyOp and the vocabulary-parallel
// VPStatsOp: the online max and sum of exponentials, z at the target (one lane adds it), and the
// weighted sums against the row's pivot that smoothing and probability targets need.
struct CEStatsOps {
    struct Stats { acc_t m, s, zt, q, w; };
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
};

// W: the per-element sums may weigh by class (kHasW: the row engine reads the weights with the
// elements, in 16-byte vectors on the block path); CrossEntropyOp<false> weighs only the target,
// for the block kernel without per-element weights (host: gpu/ops/softmax/kernel_path.py).
template <bool W>
struct CrossEntropyOp : CEStatsOps {
    // outputs
    scalar_t* dz;            // [rows * C] (may alias z: in place)
    scalar_t* loss_rows;     // [rows] for CE_ROWS ([2 rows] with CE_ZRET: then the z-loss terms)
    scalar_t* loss_out;      // [1], reduction != none ([2] with CE_ZRET: then the z-loss term)
    long long* bad_out;      // [4] sticky: {first bad row, its target, C, ignore_index}; row -1: none
    acc_t* part_loss;        // [gridDim.x] per-block partials
    acc_t* part_w;           // [3 gridDim.x]: sum w_t, z-loss, non-ignored rows
    long long* part_bad;
    unsigned int* ticket;    // [1], zero before the launch
    // inputs
    const long long* target; // [rows] class indices
    const scalar_t* y;       // [rows * C] class probabilities (CE_PROBS)
    const acc_t* weight;     // [C] (CE_WEIGHT)
    const acc_t* dloss;      // [1] or [rows]
    index_t dloss_stride;    // 0 or 1
    const acc_t* inv_denom;  // [2] (CE_DENOM): 1 / sum of w_t, 1 / non-ignored rows (inf for 0)
    long long ignore_index;
    acc_t ls;                // label smoothing
    acc_t ls_c;              // ls / C
    acc_t zl;                // z-loss coefficient (0: none)
    acc_t cap, inv_cap;      // soft-cap (CE_SOFTCAP)
    int C, flags, reduction;
    index_t rows;
    // per-thread sums over the rows this thread leads
    acc_t sum_loss, sum_w, sum_z, sum_n;
    long long first_bad;

    static constexpr bool kReadsX = true, kHasY = !(CE_STATIC_OFF & CE_PROBS), kHasW = W && CE_SMOOTHING, kStream = true;
    // t: the target class, -1 for none; an int (in [0, C) when valid), so the per-element test
    // col == t is one 32-bit compare
    typedef int target_t;
    struct Ctx { target_t t; acc_t pivot; bool active, valid, bad; };   // active: a real row
    struct Fin { acc_t m, scale, sub_t, sub_w; target_t t; bool valid; };   // valid: Ctx's

    __device__ __forceinline__ scalar_t* dest() const { return (flags & CE_GRAD) ? dz : nullptr; }
    // a flag, false at compile time where the module fixes it off
    __device__ __forceinline__ bool has(int f) const { return !(CE_STATIC_OFF & f) && (flags & f); }
    __device__ __forceinline__ bool smoothing() const { return CE_SMOOTHING == 2 || (CE_SMOOTHING == 1 && ls > acc_t(0)); }
    __device__ __forceinline__ const scalar_t* ysrc() const { return has(CE_PROBS) ? y : nullptr; }
    // the class weights, for the row engine to read with each element where the sums need them
    // (probability targets, smoothing); without them (and at the target: w_of) the engine passes 1
    __device__ __forceinline__ const acc_t* wsrc() const {
        return kHasW && (flags & CE_WEIGHT) && (has(CE_PROBS) || smoothing()) ? weight : nullptr;
    }
    __device__ __forceinline__ acc_t w_of(long long c) const {
        return (flags & CE_WEIGHT) ? weight[c] : acc_t(1);
    }
    __device__ __forceinline__ acc_t col_w(acc_t w) const { return w; }                  // the engine's
    __device__ __forceinline__ acc_t col_w(ColIdx c) const { return kHasW ? w_of(c.col) : acc_t(1); }
    // The logit the loss sees: z, or cap tanh(z / cap) (then t = tanh(z / cap), for the gradient).
    __device__ __forceinline__ acc_t capped(acc_t x, acc_t& t) const {
        if (!has(CE_SOFTCAP)) return x;
        t = acc_tanh(x * inv_cap);
        return cap * t;
    }
    __device__ __forceinline__ Stats init() const {
        return Stats{-acc_inf(), acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
    }
    __device__ __forceinline__ Ctx begin(index_t row, bool active, acc_t pivot) const {
        Ctx c;
        acc_t t;
        pivot = capped(pivot, t);
        c.pivot = (pivot - pivot == acc_t(0)) ? pivot : acc_t(0);   // finite, else 0
        c.t = -1;
        c.active = active;
        c.valid = c.bad = false;
        if (!active) return c;
        if (has(CE_PROBS)) {
            c.valid = true;
        } else {
            const long long t = target[row];
            const bool in_range = t >= 0 && t < (long long)C;
            c.bad = !in_range && t != ignore_index;
            c.valid = in_range && t != ignore_index;   // never used as an index unless in range
            c.t = c.valid ? (target_t)t : -1;
        }
        return c;
    }
    template <class Wt>
    __device__ __forceinline__ void add(Stats& st, const Ctx& c, acc_t x, acc_t yv, Wt w, int col) const {
        acc_t t;
        x = capped(x, t);
        online_add(st.m, st.s, x);
        if (col == c.t) st.zt += x;
        if (has(CE_PROBS)) {
            const acc_t wy = col_w(w) * (yv * (acc_t(1) - ls) + ls_c);
            st.q += wy * (x - c.pivot);
            st.w += wy;
        } else if (smoothing()) {
            const acc_t wc = col_w(w);
            st.q += wc * (x - c.pivot);
            st.w += wc;
        }
    }
    __device__ __forceinline__ Fin finish(const Stats& st, const Ctx& c, index_t row, bool leader) {
        const acc_t L = acc_log(st.s);
        const acc_t inv_s = acc_rcp(st.s);
        acc_t g = acc_t(0), gz = acc_t(0);
        // An ignored row's gradient is 0 whatever dloss and the denominator (lanes past the last
        // row read nothing); a valid row's with a zero 'mean' denominator is NaN (inf * 0), as torch.
        if ((flags & CE_GRAD) && c.valid) {
            g = gz = dloss[row * dloss_stride];
            if (flags & CE_DENOM) {
                g *= inv_denom[0];
                gz *= inv_denom[1];
            }
        }
        // z-loss on rows that are not ignored (a conditional: an ignored NaN row adds 0)
        const acc_t lse = st.m + L;
        const acc_t zrow = (zl > acc_t(0) && c.valid) ? zl * lse * lse : acc_t(0);
        const acc_t zscale = (zl > acc_t(0) && c.valid) ? acc_t(2) * zl * lse * gz * inv_s : acc_t(0);
        Fin f;
        f.m = st.m;
        f.t = c.t;
        f.valid = c.valid;
        acc_t loss, wt;
        if (has(CE_PROBS)) {
            const acc_t wy_sh = st.q + (c.pivot - st.m) * st.w;   // sum_c wy_c (z_c - M)
            loss = L * st.w - wy_sh;
            wt = acc_t(1);
            f.scale = g * st.w * inv_s + zscale;
            f.sub_t = acc_t(0);
            f.sub_w = g;
        } else {
            wt = c.valid ? w_of(c.t) : acc_t(0);
            const acc_t keep = acc_t(1) - ls;
            // an ignored row adds exactly 0, whatever its logits (+inf or NaN: L is NaN, 0 * NaN)
            loss = c.valid ? wt * keep * (L - (st.zt - st.m)) : acc_t(0);
            const acc_t gs = c.valid ? g * ls_c : acc_t(0);
            acc_t coef = g * wt * keep;
            if (smoothing() && c.valid) {
                const acc_t w_sh = st.q + (c.pivot - st.m) * st.w;   // sum_c w_c (z_c - M)
                loss += ls_c * (st.w * L - w_sh);
                coef += gs * st.w;
            }
            f.scale = coef * inv_s + zscale;
            f.sub_t = g * wt * keep;
            f.sub_w = gs;
        }
        if (leader) {
            if (flags & CE_ROWS) {
                loss_rows[row] = from_acc<scalar_t>(loss + zrow);
                if (flags & CE_ZRET) loss_rows[rows + row] = from_acc<scalar_t>(zrow);
            }
            sum_loss += loss;
            sum_w += wt;
            sum_z += zrow;
            sum_n += c.valid ? acc_t(1) : acc_t(0);
            if (c.bad && row < first_bad) first_bad = row;
        }
        return f;
    }
    template <class Wt>
    __device__ __forceinline__ acc_t out_value(const Fin& f, acc_t x, acc_t yv, Wt w, int col) const {
        if (!f.valid) return acc_t(0);      // an ignored row: 0 even where its logits are +inf or NaN
        acc_t t = acc_t(0);
        x = capped(x, t);
        acc_t d = acc_exp(x - f.m) * f.scale;
        if (has(CE_PROBS)) {
            d -= f.sub_w * col_w(w) * (yv * (acc_t(1) - ls) + ls_c);
        } else {
            if (col == f.t) d -= f.sub_t;
            if (smoothing()) d -= f.sub_w * col_w(w);
        }
        if (has(CE_SOFTCAP)) d *= acc_t(1) - t * t;   // d tanh = 1 - tanh^2
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

template <bool W>
__device__ __forceinline__ void CrossEntropyOp<W>::end_block() {
    __shared__ acc_t scratch[32];
    __shared__ long long scratch_ll[32];
    const int tid = block_thread_rank();
    const int nt = block_num_threads();
    const int G = (int)gridDim.x;
    acc_t l = block_reduce_sum(sum_loss, scratch);
    acc_t w = block_reduce_sum(sum_w, scratch);
    acc_t zs = block_reduce_sum(sum_z, scratch);
    acc_t n = block_reduce_sum(sum_n, scratch);
    long long b = block_reduce(first_bad, scratch_ll, MinLL());
    if (tid == 0) {
        part_loss[blockIdx.x] = l;
        part_w[blockIdx.x] = w;
        part_w[G + blockIdx.x] = zs;
        part_w[2 * G + blockIdx.x] = n;
        part_bad[blockIdx.x] = b;
    }
    if (!last_block_ticket(ticket, G)) return;
    l = w = zs = n = acc_t(0);
    b = SM_NO_ROW;
    for (int i = tid; i < G; i += nt) {   // volatile: other blocks' writes, not L1
        l += ((volatile acc_t*)part_loss)[i];
        w += ((volatile acc_t*)part_w)[i];
        zs += ((volatile acc_t*)part_w)[G + i];
        n += ((volatile acc_t*)part_w)[2 * G + i];
        const long long bi = ((volatile long long*)part_bad)[i];
        b = bi < b ? bi : b;
    }
    l = block_reduce_sum(l, scratch);
    w = block_reduce_sum(w, scratch);
    zs = block_reduce_sum(zs, scratch);
    n = block_reduce_sum(n, scratch);
    b = block_reduce(b, scratch_ll, MinLL());
    if (tid == 0) {
        // a sticky record, kept until the host reads and clears it (gpu.check_errors): the first
        // bad target of this launch, unless an earlier launch on the stream left one
        if (b != SM_NO_ROW && bad_out[0] < 0) {
            bad_out[1] = target[b];
            bad_out[2] = C;
            bad_out[3] = ignore_index;
            bad_out[0] = b;
        }
        // the denominators of the loss and of the z-loss term (a 'mean' of z-loss over non-ignored
        // rows: 0 / 0, NaN, over none); two divisions in all (each a call for double)
        acc_t dl = acc_t(1), dn = acc_t(1);
        if (reduction == CE_RED_MEAN) { dl = w; dn = n; }
        else if (reduction == CE_RED_MEAN_ROWS) dl = dn = acc_t(rows);
        if (reduction != CE_RED_NONE) {
            const acc_t z = zs / dn;
            l = dl != acc_t(0) ? l / dl : acc_t(NAN);
            if (zl > acc_t(0)) l += z;
            loss_out[0] = from_acc<scalar_t>(l);
            if (flags & CE_ZRET) loss_out[1] = from_acc<scalar_t>(z);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

// The cross-entropy kernels share one argument list: outputs, workspace, inputs, options.
#define CE_PARAMS                                                                                       \
    scalar_t *dz, scalar_t *loss_rows, scalar_t *loss_out, long long *bad_out, acc_t *part_loss,        \
        acc_t *part_w, long long *part_bad, unsigned int *ticket, const scalar_t *z,                    \
        const long long *target, const scalar_t *y, const acc_t *weight, const acc_t *dloss,            \
        index_t dloss_stride, const acc_t *inv_denom, long long ignore_index, acc_t label_smoothing,        \
        acc_t z_loss, acc_t softcap, int flags, int reduction, index_t n_rows
#define CE_ARGS                                                                                         \
    dz, loss_rows, loss_out, bad_out, part_loss, part_w, part_bad, ticket, target, y, weight, dloss,    \
        dloss_stride, inv_denom, ignore_index, label_smoothing, z_loss, softcap, flags, reduction, n_rows

template <bool W>
__device__ __forceinline__ CrossEntropyOp<W> make_ce(
    scalar_t* dz, scalar_t* loss_rows, scalar_t* loss_out, long long* bad_out, acc_t* part_loss, acc_t* part_w,
    long long* part_bad, unsigned int* ticket, const long long* target, const scalar_t* y, const acc_t* weight,
    const acc_t* dloss, index_t dloss_stride, const acc_t* inv_denom, long long ignore_index, acc_t label_smoothing,
    acc_t z_loss, acc_t softcap, int flags, int reduction, index_t n_rows, int C) {
    CrossEntropyOp<W> op;
    op.dz = dz; op.loss_rows = loss_rows; op.loss_out = loss_out; op.bad_out = bad_out;
    op.part_loss = part_loss; op.part_w = part_w; op.part_bad = part_bad; op.ticket = ticket;
    op.target = target; op.y = y; op.weight = weight; op.dloss = dloss; op.dloss_stride = dloss_stride;
    op.inv_denom = inv_denom; op.ignore_index = ignore_index; op.ls = label_smoothing; op.C = C;
    op.ls_c = label_smoothing * acc_rcp(acc_t(C));
    op.zl = z_loss; op.cap = softcap; op.inv_cap = (flags & CE_SOFTCAP) ? acc_rcp(softcap) : acc_t(0);
    op.flags = flags; op.reduction = reduction; op.rows = n_rows;
    op.sum_loss = acc_t(0); op.sum_w = acc_t(0); op.sum_z = acc_t(0); op.sum_n = acc_t(0);
    op.first_bad = SM_NO_ROW;
    return op;
}

// Warp kernels: 128 threads; N (values per lane) in {1, 2, 4, 8, 16, 32}, the smallest with
// 32 N >= C (N = 1 with lanes < 32 for C <= 32).
#define SM_WARP_KERNELS(N)                                                                              \
    extern "C" __global__ void __launch_bounds__(SM_WARP_THREADS)                                       \
    softmax_warp_n##N(scalar_t* __restrict__ out, const scalar_t* __restrict__ z, index_t rows, int C,   \
                      int lanes, int vec, int log) {                                                     \
        rows_warp<N>(SoftmaxOp{out, log}, z, rows, C, lanes, vec);                                       \
    }                                                                                                    \
    extern "C" __global__ void __launch_bounds__(SM_WARP_THREADS)                                       \
    hardmax_warp_n##N(scalar_t* __restrict__ out, const scalar_t* __restrict__ z, index_t rows, int C,   \
                      int lanes, int vec) {                                                              \
        rows_warp<N>(HardmaxOp{out}, z, rows, C, lanes, vec);                                            \
    }
// MIN_BLOCKS: ptxas's register target; without it, N = 16 saves a register to the stack on sm_90.
#define CE_WARP_KERNEL(N, MIN_BLOCKS)                                                                   \
    extern "C" __global__ void __launch_bounds__(SM_WARP_THREADS, MIN_BLOCKS)                           \
    softmax_cross_entropy_warp_n##N(CE_PARAMS, int C, int lanes, int vec) {                                                 \
        rows_warp<N>(make_ce<true>(CE_ARGS, C), z, n_rows, C, lanes, vec);                                     \
    }

CE_WARP_KERNEL(1, 4) CE_WARP_KERNEL(2, 4) CE_WARP_KERNEL(4, 4) CE_WARP_KERNEL(8, 4)
#if !defined(SCALAR_IS_DOUBLE)
// 16 or 32 doubles of z and as many of y per lane do not fit in registers: double CE rows past
// 256 classes take the block path.
CE_WARP_KERNEL(16, 4) CE_WARP_KERNEL(32, 1)
#endif
#if CE_FULL   // the specialized modules: the cross-entropy warp and block kernels alone
SM_WARP_KERNELS(1) SM_WARP_KERNELS(2) SM_WARP_KERNELS(4) SM_WARP_KERNELS(8) SM_WARP_KERNELS(16)
SM_WARP_KERNELS(32)

// cached: the leading columns of a row kept in shared memory (rows_block's cache_cols)
extern "C" __global__ void __launch_bounds__(SM_BLOCK_MAX_THREADS)
softmax_block(scalar_t* __restrict__ out, const scalar_t* __restrict__ z, index_t rows, int C, int cached,
              int vec, int log) {
    rows_block(SoftmaxOp{out, log}, z, rows, C, cached, vec);
}
extern "C" __global__ void __launch_bounds__(SM_BLOCK_MAX_THREADS)
hardmax_block(scalar_t* __restrict__ out, const scalar_t* __restrict__ z, index_t rows, int C, int vec) {
    rows_block(HardmaxOp{out}, z, rows, C, 0, vec);
}
#endif
// z is not __restrict__ in the cross-entropy kernels: dz may be written over it (in place).
// float64 blocks have at most SM_BLOCK_MAX_THREADS_F64 threads (the host's plan): bounding the
// kernel there, one block per SM at least (without it ptxas still caps at 64 registers), leaves
// the registers the double soft-cap needs without spilling (80 on sm_80).
#if defined(SCALAR_IS_DOUBLE)
#define SM_CE_BLOCK_THREADS SM_BLOCK_MAX_THREADS_F64
#else
#define SM_CE_BLOCK_THREADS SM_BLOCK_MAX_THREADS
#endif
// softmax_cross_entropy_block: no per-element class weight (none given, or integer targets without
// smoothing); softmax_cross_entropy_block_w: class weights in the per-element sums (probability
// targets or smoothing), read a vector at a time with the logits. Its blocks have at most
// SM_CE_BLOCK_W_THREADS threads (the host's plan): bounded at 1024 threads (64 registers) ptxas
// spills 16 bytes and the cached pass-1 loop issues 31.8 SASS instructions per element, against
// 27.0 at 512 with no spill (bfloat16, sm_90, NVRTC 12; 83-116 registers over the dtypes, so one
// block of 16 warps per SM).
#define SM_CE_BLOCK_W_THREADS 512
extern "C" __global__ void __launch_bounds__(SM_CE_BLOCK_THREADS, 1)
softmax_cross_entropy_block(CE_PARAMS, int C, int cached, int vec) {
    rows_block(make_ce<false>(CE_ARGS, C), z, n_rows, C, cached, vec);
}
#if !defined(CE_PLAIN)
extern "C" __global__ void __launch_bounds__(SM_CE_BLOCK_W_THREADS, 1)
softmax_cross_entropy_block_w(CE_PARAMS, int C, int cached, int vec) {
    rows_block(make_ce<true>(CE_ARGS, C), z, n_rows, C, cached, vec);
}
#endif

#if CE_FULL

extern "C" __global__ void __launch_bounds__(GPU_WARP * SM_STRIDED_MAX_TY)
softmax_strided(scalar_t* __restrict__ out, const scalar_t* __restrict__ z, index_t outer, int C,
                index_t inner, int cached, int log) {
    rows_strided(SoftmaxOp{out, log}, z, outer, C, inner, cached);
}
extern "C" __global__ void __launch_bounds__(GPU_WARP * SM_STRIDED_MAX_TY)
hardmax_strided(scalar_t* __restrict__ out, const scalar_t* __restrict__ z, index_t outer, int C, index_t inner) {
    rows_strided(HardmaxOp{out}, z, outer, C, inner, 0);
}
// (256, 4): ptxas's register target; without it NVRTC 12 saves a register to the stack on sm_80.
extern "C" __global__ void __launch_bounds__(GPU_WARP * SM_STRIDED_MAX_TY, 4)
softmax_cross_entropy_strided(CE_PARAMS, index_t outer, int C, index_t inner, int cached) {
    rows_strided(make_ce<true>(CE_ARGS, C), z, outer, C, inner, cached);
}

// inv_denom[0] = 1 / (sum of w_t over rows whose target is in range and not ignore_index), inf when
// that sum is 0 (valid rows then get a NaN gradient, as in PyTorch; ignored rows never read it),
// and inv_denom[1] = 1 / (number of those rows), the z-loss's: the inverse 'mean' denominators a
// gradient needs before any dz is written. Grid-stride, fixed-order block sums, the last block sums
// the partials (part: [2 gridDim.x]) in block order. Block: 256 threads.
extern "C" __global__ void __launch_bounds__(SM_WEIGHT_SUM_THREADS)
softmax_cross_entropy_weight_sum(acc_t* inv_denom, acc_t* part, unsigned int* ticket, const long long* __restrict__ target,
              const acc_t* __restrict__ weight, int has_weight, index_t rows, int C, long long ignore_index) {
    __shared__ acc_t scratch[32];
    const int tid = threadIdx.x;
    const int G = (int)gridDim.x;
    acc_t w = 0, n = 0;
    for (index_t r = (index_t)blockIdx.x * blockDim.x + tid; r < rows; r += (index_t)gridDim.x * blockDim.x) {
        const long long t = target[r];
        if (t != ignore_index && t >= 0 && t < (long long)C) {
            w += has_weight ? weight[t] : acc_t(1);
            n += acc_t(1);
        }
    }
    w = block_reduce_sum(w, scratch);
    n = block_reduce_sum(n, scratch);
    if (tid == 0) {
        part[blockIdx.x] = w;
        part[G + blockIdx.x] = n;
    }
    if (!last_block_ticket(ticket, G)) return;
    w = n = 0;
    for (int i = tid; i < G; i += blockDim.x) {
        w += ((volatile acc_t*)part)[i];
        n += ((volatile acc_t*)part)[G + i];
    }
    w = block_reduce_sum(w, scratch);
    n = block_reduce_sum(n, scratch);
    if (tid == 0) {
        inv_denom[0] = acc_t(1) / w;
        inv_denom[1] = acc_t(1) / n;
    }
}

// ---------------------------------------------------------------------------------------------
// Vocabulary-parallel cross-entropy (gpu/ops/softmax/vocab_parallel.py): this rank's slice of the
// classes, [offset, offset + C) of `classes`, rows C-contiguous (rows, C). Two kernels around the
// one collective: the per-row statistics of the slice, then dz from the merged coefficients.
// ---------------------------------------------------------------------------------------------

#define VP_WEIGHT 1     // per-class weights of the slice
#define VP_PROBS 2      // probability targets (this rank's slice of them, laid out as z)
#define VP_SMOOTH 4     // label smoothing: sum_c w_c (z'_c - shift) per row
#define VP_SOFTCAP 8    // z' = cap tanh(z / cap)
#define VP_GRAD_THREADS 256   // softmax_cross_entropy_vp_grad's block

// The statistics of each row of the slice, written to stats [k rows] (float64, the collective's
// buffer): m = max z', s = sum exp(z' - m), then for integer targets zt = z'_t and wt = w_t where
// the target is in the slice (else 0) and, with VP_SMOOTH, q = sum_c w_c (z'_c - shift); for
// probability targets sum_c wy_c and sum_c wy_c (z'_c - shift), wy_c = w_c (y_c keep + ls_c).
// shift = m, or 0 for a row of -inf (or an empty one): the merge's (vocab_parallel.merge). The
// weighted sums are taken against a pivot (the row's first logit) as in CrossEntropyOp. A target
// outside [0, classes) that is not ignore_index is counted nowhere (the host recorded it).
struct VPStatsOp : CEStatsOps {
    double* stats;
    const long long* target;
    const scalar_t* y;
    const acc_t* weight;
    long long offset, classes, ignore_index;
    acc_t keep, ls_c, cap, inv_cap;
    int C, flags;
    index_t rows;

    static constexpr bool kReadsX = true, kHasY = true, kHasW = true, kStream = false;
    struct Ctx { long long t; acc_t pivot; };   // t: the target's column in the slice, or -1
    struct Fin {};

    __device__ __forceinline__ scalar_t* dest() const { return nullptr; }   // statistics only
    __device__ __forceinline__ const scalar_t* ysrc() const { return (flags & VP_PROBS) ? y : nullptr; }
    // the weights for the engine to read with the elements (CrossEntropyOp::wsrc)
    __device__ __forceinline__ const acc_t* wsrc() const {
        return (flags & VP_WEIGHT) && (flags & (VP_PROBS | VP_SMOOTH)) ? weight : nullptr;
    }
    __device__ __forceinline__ acc_t w_of(long long c) const { return (flags & VP_WEIGHT) ? weight[c] : acc_t(1); }
    __device__ __forceinline__ acc_t col_w(acc_t w) const { return w; }                  // the engine's
    __device__ __forceinline__ acc_t col_w(ColIdx c) const { return w_of(c.col); }
    __device__ __forceinline__ acc_t capped(acc_t x) const {
        return (flags & VP_SOFTCAP) ? cap * acc_tanh(x * inv_cap) : x;
    }
    __device__ __forceinline__ Stats init() const {
        return Stats{-acc_inf(), acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
    }
    __device__ __forceinline__ Ctx begin(index_t row, bool active, acc_t pivot) const {
        Ctx c;
        pivot = capped(pivot);
        c.pivot = (pivot - pivot == acc_t(0)) ? pivot : acc_t(0);   // finite, else 0
        c.t = -1;
        if (active && !(flags & VP_PROBS)) {
            const long long t = target[row];
            if (t != ignore_index && t >= offset && t < offset + (long long)C && t < classes) c.t = t - offset;
        }
        return c;
    }
    template <class Wt>
    __device__ __forceinline__ void add(Stats& st, const Ctx& c, acc_t x, acc_t yv, Wt w, int col) const {
        x = capped(x);
        online_add(st.m, st.s, x);
        if (col == c.t) st.zt += x;
        if (flags & VP_PROBS) {
            const acc_t wy = col_w(w) * (yv * keep + ls_c);
            st.q += wy * (x - c.pivot);
            st.w += wy;
        } else if (flags & VP_SMOOTH) {
            const acc_t wc = col_w(w);
            st.q += wc * (x - c.pivot);
            st.w += wc;
        }
    }
    __device__ __forceinline__ Fin finish(const Stats& st, const Ctx& c, index_t row, bool leader) const {
        if (leader) {
            const acc_t shift = st.m == -acc_inf() ? acc_t(0) : st.m;
            const acc_t q = st.q + (c.pivot - shift) * st.w;   // sum (w or wy)_c (z'_c - shift)
            stats[row] = (double)st.m;
            stats[rows + row] = (double)st.s;
            if (flags & VP_PROBS) {
                stats[2 * rows + row] = (double)st.w;
                stats[3 * rows + row] = (double)q;
            } else {
                stats[2 * rows + row] = c.t >= 0 ? (double)st.zt : 0.0;
                stats[3 * rows + row] = c.t >= 0 ? (double)w_of(c.t) : 0.0;
                if (flags & VP_SMOOTH) stats[4 * rows + row] = (double)q;
            }
        }
        return Fin{};
    }
    template <class Wt> __device__ __forceinline__ acc_t out_value(const Fin&, acc_t, acc_t, Wt, int) const { return acc_t(0); }
    __device__ __forceinline__ void end_block() {}
};

#define VP_STATS_PARAMS                                                                                 \
    double *stats, const scalar_t *z, const long long *target, const scalar_t *y, const acc_t *weight,  \
        long long offset, long long classes, long long ignore_index, acc_t keep, acc_t ls_c,            \
        acc_t softcap, int flags, index_t n_rows

__device__ __forceinline__ VPStatsOp make_vp_stats(double* stats, const long long* target, const scalar_t* y,
                                                   const acc_t* weight, long long offset, long long classes,
                                                   long long ignore_index, acc_t keep, acc_t ls_c, acc_t softcap,
                                                   int flags, index_t n_rows, int C) {
    VPStatsOp op;
    op.stats = stats; op.target = target; op.y = y; op.weight = weight;
    op.offset = offset; op.classes = classes; op.ignore_index = ignore_index;
    op.keep = keep; op.ls_c = ls_c; op.cap = softcap;
    op.inv_cap = (flags & VP_SOFTCAP) ? acc_rcp(softcap) : acc_t(0);
    op.C = C; op.flags = flags; op.rows = n_rows;
    return op;
}

// MIN_BLOCKS: ptxas's register target, as CE_WARP_KERNEL's (N = 32 spills without it).
#define VP_STATS_WARP_KERNEL(N, MIN_BLOCKS)                                                             \
    extern "C" __global__ void __launch_bounds__(SM_WARP_THREADS, MIN_BLOCKS)                           \
    softmax_cross_entropy_vp_stats_warp_n##N(VP_STATS_PARAMS, int C, int lanes, int vec) {              \
        rows_warp<N>(make_vp_stats(stats, target, y, weight, offset, classes, ignore_index, keep, ls_c,  \
                                   softcap, flags, n_rows, C), z, n_rows, C, lanes, vec);                \
    }
VP_STATS_WARP_KERNEL(1, 4) VP_STATS_WARP_KERNEL(2, 4) VP_STATS_WARP_KERNEL(4, 4) VP_STATS_WARP_KERNEL(8, 4)
#if !defined(SCALAR_IS_DOUBLE)
VP_STATS_WARP_KERNEL(16, 4) VP_STATS_WARP_KERNEL(32, 1)
#endif

extern "C" __global__ void __launch_bounds__(SM_CE_BLOCK_THREADS, 1)
softmax_cross_entropy_vp_stats_block(VP_STATS_PARAMS, int C, int cached, int vec) {
    rows_block(make_vp_stats(stats, target, y, weight, offset, classes, ignore_index, keep, ls_c, softcap, flags,
                             n_rows, C), z, n_rows, C, cached, vec);
}

// dz of the slice from the merged per-row coefficients coef [5 rows] (float64): lse, scale,
// sub_t, sub_w and the target's column in the slice (-1: elsewhere; -2: an ignored row, dz = 0):
//   dz_j = [exp(z'_j - lse) scale - [j == t] sub_t - sub_w w_j] (1 - tanh^2)             integer
//   dz_j = [exp(z'_j - lse) scale - sub_w w_j (y_j keep + ls_c)] (1 - tanh^2)            probabilities
// (sub_w w_j only with VP_SMOOTH for integer targets). Grid-stride over rows * C elements; dz may
// be z (in place).
extern "C" __global__ void __launch_bounds__(VP_GRAD_THREADS)
softmax_cross_entropy_vp_grad(scalar_t* dz, const scalar_t* z, const double* __restrict__ coef,
                              const scalar_t* __restrict__ y, const acc_t* __restrict__ weight, acc_t keep,
                              acc_t ls_c, acc_t softcap, int flags, index_t n_rows, int C) {
    const index_t total = n_rows * (index_t)C;
    const acc_t inv_cap = (flags & VP_SOFTCAP) ? acc_rcp(softcap) : acc_t(0);
    for (index_t i = (index_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (index_t)gridDim.x * blockDim.x) {
        const index_t r = i / C;
        const int col = (int)(i - r * C);
        const double tl = coef[4 * n_rows + r];
        acc_t d = acc_t(0);
        if (tl > -2.0) {
            acc_t x = to_acc(z[i]);
            acc_t t = acc_t(0);
            if (flags & VP_SOFTCAP) {
                t = acc_tanh(x * inv_cap);
                x = softcap * t;
            }
            const acc_t wc = (flags & VP_WEIGHT) ? weight[col] : acc_t(1);
            d = acc_exp(x - (acc_t)coef[r]) * (acc_t)coef[n_rows + r];
            if (flags & VP_PROBS) {
                d -= (acc_t)coef[3 * n_rows + r] * wc * (to_acc(y[i]) * keep + ls_c);
            } else {
                if ((double)col == tl) d -= (acc_t)coef[2 * n_rows + r];
                if (flags & VP_SMOOTH) d -= (acc_t)coef[3 * n_rows + r] * wc;
            }
            if (flags & VP_SOFTCAP) d *= acc_t(1) - t * t;
        }
        dz[i] = from_acc<scalar_t>(d);
    }
}
#endif
