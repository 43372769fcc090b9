// runtime.cpp: the scheduler of the gpu CPU emulator, linked into every emulated kernel module.
//
// A launch runs its blocks one after another (shuffled by a seed, or in index order); a
// cooperative launch runs all of them at once, as one group, so that grid.sync() can hold every
// thread of the grid. Each CUDA thread of the running group is a fiber with its own stack; fibers
// switch only at synchronization points, so a launch is deterministic for a given seed:
//
//   - The scheduler sweeps the group's threads, resuming each runnable one until it blocks at a
//     barrier or a warp operation, or returns. The sweep order (GPU_EMULATOR_ORDER) is forward,
//     all reversed, or shuffled: a fresh seeded order of the blocks and of the threads in a block
//     for every sweep (warps permuted, lanes in a random xor order), so every phase between
//     barriers interleaves differently and a missing barrier shows whichever direction it goes. The block and thread permutations mix
//     the seed with the kernel's name and launch shape: reproducible whatever else ran before.
//   - A warp operation (shuffle, vote, __syncwarp) completes when every lane of its mask has
//     arrived; the last arrival computes all lanes' results.
//   - When no thread is runnable, the block is done (all returned), or every live thread waits at
//     the same __syncthreads (exited threads count as arrived, as on the GPU and in
//     compute-sanitizer's synccheck) and all are released, or the block cannot progress: an error
//     naming the kernel, the block, the threads and the source lines.
//   - grid.sync() (cooperative_groups.h) completes when every thread of every block waits at it;
//     a thread that has exited, or waits at another barrier, is an error (compute-sanitizer and
//     the CUDA documentation require every thread of the grid to arrive), as is grid.sync() in a
//     launch that is not cooperative.
//
// Shared memory lives in the module's thread-local storage (see cuda_emulator.h); it is filled with
// the word 0x7fffffff (NaN as float, double, half and bfloat16) at each block start, so a read
// that a missing barrier leaves unordered shows up as NaN. A guard zone after the requested
// dynamic size catches overflows (under ASan, the rest of the buffer is poisoned for ASan too).
// In a cooperative launch the blocks take turns in that one region: when the scheduler moves on
// to a fiber of another block, it checks the guard zone, saves the region (static shared memory
// and the requested dynamic bytes) into the leaving block's image and restores the arriving
// block's (poison, the first time).
//
// The context switch is ~15 instructions of x86-64 assembly (callee-saved registers, stack
// pointer, MXCSR and x87 control word); elsewhere, or with -DGPUEMU_UCONTEXT, ucontext (which makes a
// system call per switch). Under ASan the fiber switches are announced to the sanitizer.
//
// The trace build (GPUEMU_TRACE, GPU_EMULATOR_TRACE=1) adds trace_runtime.inc: the
// AddressSanitizer callbacks that its instrumented kernel code calls on every load and store, and
// the warp requests they make (each fiber counts its resumes: the segments the requests group by).
//
// Everything here has hidden visibility except the gpuemu_* entry points used from Python, and no
// state is thread_local, so the module's TLS block is exactly its shared memory.

#include "cuda_emulator.h"

#include <dlfcn.h>
#include <link.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <mutex>
#include <string>
#include <vector>
#if defined(GPUEMU_TRACE)
#include <cstring>
#include <map>
#include <unordered_map>
#endif

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define GPUEMU_ASAN 1
#endif

#if !defined(__x86_64__) && !defined(GPUEMU_UCONTEXT)
#define GPUEMU_UCONTEXT 1
#endif
#if defined(GPUEMU_UCONTEXT)
#include <ucontext.h>
#endif

#define GPUEMU_EXPORT extern "C" __attribute__((visibility("default")))

// The largest dynamic shared memory a launch may request (H100 opt-in), and the guard after it.
#define GPUEMU_DYNAMIC_SMEM_CAPACITY (227 * 1024)
#define GPUEMU_GUARD_BYTES 1024

// Defined by the build for each module: the buffer every `extern __shared__` array aliases, and
// the kernel table.
extern __thread unsigned char gpuemu_dynamic_smem[GPUEMU_DYNAMIC_SMEM_CAPACITY + GPUEMU_GUARD_BYTES];
extern const gpuemu::KernelEntry gpuemu_kernel_table[];
extern const int gpuemu_kernel_count;

uint3 threadIdx;
uint3 blockIdx;
dim3 blockDim;
dim3 gridDim;

#if !defined(GPUEMU_UCONTEXT)
// gpuemu_swap(save, load): store this context's stack pointer in *save, continue on `load`.
// A new fiber's stack is laid out as if it had called gpuemu_swap (see start_fiber), returning
// into gpuemu_fiber_entry with the fiber in r12 and its main function in r13.
extern "C" void gpuemu_swap(void** save, void* load);
extern "C" void gpuemu_fiber_entry();
asm(R"(
    .text
    .globl gpuemu_swap
    .hidden gpuemu_swap
    .type gpuemu_swap, @function
gpuemu_swap:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size gpuemu_swap, .-gpuemu_swap

    .globl gpuemu_fiber_entry
    .hidden gpuemu_fiber_entry
    .type gpuemu_fiber_entry, @function
gpuemu_fiber_entry:
    movq %r12, %rdi
    callq *%r13
    ud2
    .size gpuemu_fiber_entry, .-gpuemu_fiber_entry
)");
#endif

namespace gpuemu {
namespace {

enum State : unsigned char { RUNNABLE, AT_BARRIER, AT_WARP_OP, EXITED };

struct Fiber {
#if defined(GPUEMU_UCONTEXT)
    ucontext_t context;
#else
    void* sp = nullptr;
#endif
    char* stack = nullptr;  // lowest usable byte (a guard page lies below)
    size_t stack_size = 0;
    void* asan_fake_stack = nullptr;
    int rank = 0;   // thread rank within its block
    int block = 0;  // index of its block in the running group
    uint3 tid{};
    State state = RUNNABLE;
    // What the thread waits at, and the values it brings and gets back.
    const char* file = nullptr;
    int line = 0;
    int op = 0;
    int arg = 0, width = 0;  // a shuffle's source lane / delta / lane mask (per lane), and width
    unsigned long long value = 0, result = 0;
    unsigned segment = 0;  // how many times it has been resumed (the trace's warp requests)
};

// Lanes of one warp waiting at one warp operation with one mask.
struct WarpGroup {
    unsigned mask, arrived;
    int op;
    const char* file;
    int line;
};

struct Warp {
    int lanes = 0;  // lanes that exist (the last warp of a block may be partial)
    std::vector<WarpGroup> groups;
};

// A block of the running group: its index, and its shared memory while another block's is resident.
struct Block {
    uint3 idx{};
    bool fresh = true;                 // has not run yet: its shared memory starts as poison
    std::vector<unsigned char> image;  // saved static + dynamic shared memory
};

#if defined(GPUEMU_ASAN)
constexpr size_t kStackSize = 256 * 1024;  // ASan's redzones grow frames
#else
constexpr size_t kStackSize = 64 * 1024;
#endif
constexpr unsigned int kPoison = 0x7fffffffu;
constexpr unsigned long long kPoison64 = 0x7fffffff7fffffffull;

const char* const kWarpOpNames[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync",
                                    "__ballot_sync", "__all_sync", "__any_sync", "__syncwarp"};
const char* const kBarrierNames[] = {"__syncthreads", "__syncthreads_count", "__syncthreads_and",
                                     "__syncthreads_or", "grid.sync"};

enum Order { ORDER_FORWARD, ORDER_REVERSE, ORDER_SHUFFLE };

// splitmix64: the block and thread orders for a seed.
unsigned long long mix(unsigned long long& state) {
    unsigned long long z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// Fisher-Yates with a multiply-shift range reduction (no division: this runs once per sweep).
template <typename T>
void permute(std::vector<T>& v, unsigned long long& state) {
    for (size_t i = v.size(); i > 1; --i) {
        const size_t j = (size_t)(((unsigned __int128)mix(state) * i) >> 64);
        std::swap(v[i - 1], v[j]);
    }
}

// One launch at a time per module: the launch state below is global, not thread-local.
std::mutex g_launch_mutex;

struct Launch {
    const KernelEntry* kernel = nullptr;
    void** args = nullptr;
    int order = 0;  // ORDER_FORWARD, ORDER_REVERSE or ORDER_SHUFFLE
    unsigned long long rng = 0;  // the thread-order generator's state
    unsigned dynamic_smem = 0;
    bool cooperative = false;
    int threads = 0;  // per block
    bool aborted = false;
    std::string error;
} g;

// The running group: g_blocks.size() blocks; thread r of block b is g_fibers[b * g.threads + r],
// its warp g_warps[b * warps_per_block + r / 32].
std::vector<Block> g_blocks;
std::vector<Fiber> g_fibers;
std::vector<Warp> g_warps;
int g_resident = 0;  // the block whose shared memory is in the TLS region
Fiber* g_current = nullptr;
int g_runnable = 0;
#if defined(GPUEMU_UCONTEXT)
ucontext_t g_main_context;
#else
void* g_main_sp = nullptr;
#endif
#if defined(GPUEMU_ASAN)
void* g_main_fake_stack = nullptr;
const void* g_main_stack_bottom = nullptr;
size_t g_main_stack_size = 0;
#endif

// ----------------------------------------------------------------------------------------------
// Errors
// ----------------------------------------------------------------------------------------------

std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return buf;
}

std::string where() {
    return format("kernel '%s', block (%u,%u,%u)", g.kernel->name, blockIdx.x, blockIdx.y, blockIdx.z);
}

// "0-31,40,64-95" for a set of thread ranks or lanes.
std::string ranges(const std::vector<int>& items) {
    std::string out;
    for (size_t i = 0; i < items.size();) {
        size_t j = i;
        while (j + 1 < items.size() && items[j + 1] == items[j] + 1) ++j;
        if (!out.empty()) out += ',';
        out += j == i ? format("%d", items[i]) : format("%d-%d", items[i], items[j]);
        i = j + 1;
    }
    return out;
}

std::string lanes_of(unsigned mask) {
    std::vector<int> lanes;
    for (int l = 0; l < 32; ++l)
        if (mask >> l & 1u) lanes.push_back(l);
    return ranges(lanes);
}

void record_error(const std::string& message) {
    if (!g.aborted) {
        g.aborted = true;
        g.error = where() + ": " + message;
    }
}

// ----------------------------------------------------------------------------------------------
// Fibers
// ----------------------------------------------------------------------------------------------

void fiber_main(Fiber* f);

#if defined(GPUEMU_UCONTEXT)
void fiber_trampoline(unsigned hi, unsigned lo) {
    fiber_main(reinterpret_cast<Fiber*>((uintptr_t)hi << 32 | lo));
}
#endif

void allocate_stacks(int threads) {
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    while ((int)g_fibers.size() < threads) {
        Fiber f;
        void* base = mmap(nullptr, kStackSize + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (base == MAP_FAILED) throw std::bad_alloc();
        mprotect(base, page, PROT_NONE);  // a stack overflow faults instead of corrupting memory
        f.stack = static_cast<char*>(base) + page;
        f.stack_size = kStackSize;
        g_fibers.push_back(f);
    }
}

void start_fiber(Fiber* f) {
#if defined(GPUEMU_UCONTEXT)
    getcontext(&f->context);
    f->context.uc_stack.ss_sp = f->stack;
    f->context.uc_stack.ss_size = f->stack_size;
    f->context.uc_link = nullptr;
    const uintptr_t p = reinterpret_cast<uintptr_t>(f);
    makecontext(&f->context, reinterpret_cast<void (*)()>(fiber_trampoline), 2, (unsigned)(p >> 32), (unsigned)p);
#else
    // The frame gpuemu_swap pops: MXCSR + x87 control word, r15, r14, r13, r12, rbx, rbp, return
    // address. After `ret` the stack pointer is 16-byte aligned, as a call instruction expects.
    uintptr_t top = (reinterpret_cast<uintptr_t>(f->stack) + f->stack_size) & ~(uintptr_t)15;
    auto* frame = reinterpret_cast<unsigned long long*>(top - 64);
    frame[0] = 0x037full << 32 | 0x1f80u;  // default x87 control word and MXCSR
    frame[1] = frame[2] = 0;
    frame[3] = reinterpret_cast<unsigned long long>(&fiber_main);
    frame[4] = reinterpret_cast<unsigned long long>(f);
    frame[5] = frame[6] = 0;  // rbp = 0 ends frame-pointer backtraces here
    frame[7] = reinterpret_cast<unsigned long long>(&gpuemu_fiber_entry);
    f->sp = frame;
#endif
}

// Scheduler -> fiber.
void resume(Fiber* f) {
    g_current = f;
    ++f->segment;
    threadIdx = f->tid;
    blockIdx = g_blocks[f->block].idx;
#if defined(GPUEMU_ASAN)
    __sanitizer_start_switch_fiber(&g_main_fake_stack, f->stack, f->stack_size);
#endif
#if defined(GPUEMU_UCONTEXT)
    swapcontext(&g_main_context, &f->context);
#else
    gpuemu_swap(&g_main_sp, f->sp);
#endif
#if defined(GPUEMU_ASAN)
    __sanitizer_finish_switch_fiber(g_main_fake_stack, nullptr, nullptr);
#endif
}

// Fiber -> scheduler. Returns when the scheduler resumes this fiber.
void yield(bool exiting = false) {
    Fiber* f = g_current;
#if defined(GPUEMU_ASAN)
    __sanitizer_start_switch_fiber(exiting ? nullptr : &f->asan_fake_stack, g_main_stack_bottom, g_main_stack_size);
#else
    (void)exiting;
#endif
#if defined(GPUEMU_UCONTEXT)
    swapcontext(&f->context, &g_main_context);
#else
    gpuemu_swap(&f->sp, g_main_sp);
#endif
#if defined(GPUEMU_ASAN)
    __sanitizer_finish_switch_fiber(f->asan_fake_stack, nullptr, nullptr);
#endif
}

// Block the current fiber until the scheduler releases it; never returns after an error.
void wait() {
    --g_runnable;
    yield();
    while (g.aborted) yield();
}

void fiber_main(Fiber* f) {
#if defined(GPUEMU_ASAN)
    __sanitizer_finish_switch_fiber(nullptr, &g_main_stack_bottom, &g_main_stack_size);
#endif
    g.kernel->invoke(g.args);
    f->state = EXITED;
    --g_runnable;
    yield(true);
    __builtin_trap();  // an exited fiber is never resumed
}

// ----------------------------------------------------------------------------------------------
// Shared memory: poison at block start, check the guard zone at block end
// ----------------------------------------------------------------------------------------------

// `dynamic`: the address of gpuemu_dynamic_smem in that block, what the cached lookup is valid for.
struct TlsBlock {
    unsigned char* start = nullptr;
    size_t size = 0;
    unsigned char* dynamic = nullptr;
};
TlsBlock g_tls;

int find_tls(struct dl_phdr_info* info, size_t, void* data) {
    const auto self = reinterpret_cast<uintptr_t>(&find_tls);
    bool mine = false;
    size_t tls_size = 0;
    for (int i = 0; i < info->dlpi_phnum; ++i) {
        const ElfW(Phdr)& ph = info->dlpi_phdr[i];
        if (ph.p_type == PT_LOAD && self >= info->dlpi_addr + ph.p_vaddr &&
            self < info->dlpi_addr + ph.p_vaddr + ph.p_memsz)
            mine = true;
        if (ph.p_type == PT_TLS) tls_size = ph.p_memsz;
    }
    if (!mine) return 0;
    auto* out = static_cast<TlsBlock*>(data);
    out->start = static_cast<unsigned char*>(info->dlpi_tls_data);
    out->size = tls_size;
    return 1;
}

void fill_poison(unsigned char* p, size_t n) {
    const size_t words = n / 4;
    auto* w = reinterpret_cast<unsigned int*>(p);
    for (size_t i = 0; i < words; ++i) w[i] = kPoison;
    std::memset(p + 4 * words, 0x7f, n % 4);
}

// The calling thread's copy of this module's TLS: all of its static shared memory plus the
// dynamic buffer. Touching gpuemu_dynamic_smem first makes sure the copy exists.
//
// The cache is keyed by the address of the calling thread's gpuemu_dynamic_smem, not by the
// thread: glibc hands an exited thread's pthread_t (its cached stack and descriptor) to the next
// thread it creates, while the exited thread's copy of a dlopen'ed module's TLS is freed and the
// new thread gets a fresh one elsewhere. A cache keyed by pthread_self() then poisoned freed
// memory (a crash when many short-lived threads launch one after another). An address is safe to
// reuse: the variable's offset inside the module's TLS block is fixed by the linker, so one
// address of gpuemu_dynamic_smem always means the same block start.
bool locate_shared_memory() {
    unsigned char* dynamic = gpuemu_dynamic_smem;
    __asm__ volatile("" : : "r"(dynamic) : "memory");  // the TLS access must happen before the lookup
    if (g_tls.start && g_tls.dynamic == dynamic) return true;
    TlsBlock found;
    dl_iterate_phdr(find_tls, &found);
    if (!found.start || dynamic < found.start ||
        dynamic + sizeof(gpuemu_dynamic_smem) > found.start + found.size)
        return false;
    found.dynamic = dynamic;
    g_tls = found;
    return true;
}

void poison_shared_memory() {
    unsigned char* dynamic = gpuemu_dynamic_smem;
    unsigned char* dynamic_end = dynamic + sizeof(gpuemu_dynamic_smem);
    unsigned char* used_end = dynamic + g.dynamic_smem + GPUEMU_GUARD_BYTES;
#if defined(GPUEMU_ASAN)
    ASAN_UNPOISON_MEMORY_REGION(dynamic, sizeof(gpuemu_dynamic_smem));
#endif
    fill_poison(g_tls.start, dynamic - g_tls.start);
    fill_poison(dynamic, used_end - dynamic);
    fill_poison(dynamic_end, g_tls.start + g_tls.size - dynamic_end);
#if defined(GPUEMU_ASAN)
    ASAN_POISON_MEMORY_REGION(dynamic + g.dynamic_smem, dynamic_end - (dynamic + g.dynamic_smem));
#endif
}

// Reads the guard zone that ASan builds poison: exempt from instrumentation. An overflow is
// charged to the resident block.
__attribute__((no_sanitize("address"))) void check_guard_zone() {
    blockIdx = g_blocks[g_resident].idx;
    const unsigned char* guard = gpuemu_dynamic_smem + g.dynamic_smem;
    for (int i = 0; i < GPUEMU_GUARD_BYTES; i += 4) {
        unsigned int w;
        std::memcpy(&w, guard + i, 4);
        if (w != kPoison) {
            record_error(format("wrote past the end of its %u bytes of dynamic shared memory (at byte %u)",
                                g.dynamic_smem, g.dynamic_smem + i));
            return;
        }
    }
}

// What a block owns of the TLS region: the static shared memory before and after the dynamic
// buffer, and the dynamic bytes the launch asked for (the guard zone and the rest stay poison).
struct Range {
    unsigned char* p;
    size_t n;
};

void block_ranges(Range (&r)[3]) {
    unsigned char* dynamic = gpuemu_dynamic_smem;
    unsigned char* dynamic_end = dynamic + sizeof(gpuemu_dynamic_smem);
    r[0] = {g_tls.start, (size_t)(dynamic - g_tls.start)};
    r[1] = {dynamic, g.dynamic_smem};
    r[2] = {dynamic_end, (size_t)(g_tls.start + g_tls.size - dynamic_end)};
}

// Cooperative launches: make block b's shared memory resident, saving the resident block's.
void switch_shared_memory(int b) {
    check_guard_zone();
    if (g.aborted) return;
    Range r[3];
    block_ranges(r);
    Block& out = g_blocks[g_resident];
    out.image.resize(r[0].n + r[1].n + r[2].n);
    unsigned char* q = out.image.data();
    for (const Range& x : r) {
        std::memcpy(q, x.p, x.n);
        q += x.n;
    }
    Block& in = g_blocks[b];
    q = in.image.data();
    for (const Range& x : r) {
        if (in.fresh) {
            fill_poison(x.p, x.n);
        } else {
            std::memcpy(x.p, q, x.n);
            q += x.n;
        }
    }
    in.fresh = false;
    g_resident = b;
}

#if defined(GPUEMU_TRACE)
#include "trace_runtime.inc"
#endif

// ----------------------------------------------------------------------------------------------
// Barriers and warp operations
// ----------------------------------------------------------------------------------------------

int warps_per_block() { return (g.threads + 31) / 32; }
Fiber& fiber_of(int block, int rank) { return g_fibers[(size_t)block * g.threads + rank]; }

// Lane `lane`'s result for a completed warp operation.
unsigned long long warp_result(const WarpGroup& grp, int warp_base, int lane) {
    const int width = g_fibers[warp_base + lane].width;
    const int arg = g_fibers[warp_base + lane].arg;
    const int seg = lane & ~(width - 1);
    int src = lane;
    switch (grp.op) {
        case OP_SHFL_IDX: src = seg + (arg & (width - 1)); break;
        case OP_SHFL_UP: src = lane - arg >= seg ? lane - arg : lane; break;
        case OP_SHFL_DOWN: src = lane + arg < seg + width ? lane + arg : lane; break;
        case OP_SHFL_XOR: src = (lane ^ arg) < seg + width ? lane ^ arg : lane; break;
        case OP_BALLOT:
        case OP_ALL:
        case OP_ANY: {
            unsigned votes = 0;
            for (int l = 0; l < 32; ++l)
                if ((grp.mask >> l & 1u) && g_fibers[warp_base + l].value) votes |= 1u << l;
            if (grp.op == OP_BALLOT) return votes;
            return grp.op == OP_ALL ? votes == grp.mask : votes != 0;
        }
        default: return 0;
    }
    // Reading a lane outside the mask is undefined on the GPU: hand back poison (NaN), not a
    // plausible value.
    if (src < 0 || src > 31 || !(grp.mask >> src & 1u)) return kPoison64;
    return g_fibers[warp_base + src].value;
}

}  // namespace

unsigned long long warp_op(int op, unsigned mask, unsigned long long value, int arg, int width,
                           const char* file, int line) {
    Fiber* f = g_current;
    const int warp = f->rank / 32, lane = f->rank % 32;
    Warp& w = g_warps[f->block * warps_per_block() + warp];
    const unsigned existing = w.lanes == 32 ? 0xffffffffu : (1u << w.lanes) - 1u;
    std::string error;
    if (mask & ~existing)
        error = format("%s at %s:%d: mask 0x%08x names lanes %s, which do not exist (warp %d has %d lanes)",
                       kWarpOpNames[op], file, line, mask, lanes_of(mask & ~existing).c_str(), warp, w.lanes);
    else if (!(mask >> lane & 1u))
        error = format("%s at %s:%d: lane %d of warp %d calls with mask 0x%08x, which does not include it",
                       kWarpOpNames[op], file, line, lane, warp, mask);
    else if (width < 1 || width > 32 || (width & (width - 1)))
        error = format("%s at %s:%d: width %d is not a power of two in [1, 32]", kWarpOpNames[op], file, line, width);
    WarpGroup* grp = nullptr;
    for (WarpGroup& gr : w.groups) {
        if (!error.empty()) break;
        if (gr.mask == mask && gr.op == op && gr.file == file && gr.line == line) {
            grp = &gr;
        } else if (gr.mask & mask) {
            error = format("diverged warp %d: lane %d is at %s (%s:%d) with mask 0x%08x while lanes %s are at %s "
                           "(%s:%d) with mask 0x%08x",
                           warp, lane, kWarpOpNames[op], file, line, mask, lanes_of(gr.arrived).c_str(),
                           kWarpOpNames[gr.op], gr.file, gr.line, gr.mask);
        }
    }
    if (!error.empty()) {
        record_error(error);
        wait();
    }
    if (!grp) {
        w.groups.push_back(WarpGroup{mask, 0u, op, file, line});
        grp = &w.groups.back();
    }
    f->state = AT_WARP_OP;
    f->value = value;
    f->arg = arg;
    f->width = width;
    f->file = file;
    f->line = line;
    f->op = op;
    grp->arrived |= 1u << lane;
    if (grp->arrived == mask) {
        const int base = f->block * g.threads + warp * 32;
        for (int l = 0; l < 32; ++l) {
            if (!(mask >> l & 1u)) continue;
            Fiber& t = g_fibers[base + l];
            t.result = warp_result(*grp, base, l);
            t.state = RUNNABLE;
            ++g_runnable;
        }
        w.groups.erase(w.groups.begin() + (grp - w.groups.data()));
    }
    // Even the last lane to arrive yields, so lanes run in the scheduler's order between
    // synchronization points.
    wait();
    return f->result;
}

int barrier(int kind, int pred, const char* file, int line) {
    Fiber* f = g_current;
    if (kind == BAR_GRID && !g.cooperative) {
        record_error(format("grid.sync() at %s:%d in a launch that is not cooperative (launch it with "
                            "cooperative=True)", file, line));
        wait();
    }
    f->state = AT_BARRIER;
    f->op = kind;
    f->value = (unsigned long long)pred;
    f->file = file;
    f->line = line;
    wait();
    return (int)f->result;
}

void trap(const char* what, const char* file, int line) {
    record_error(format("%s at %s:%d", what, file, line));
    wait();
    __builtin_unreachable();
}

// ----------------------------------------------------------------------------------------------
// Misaligned accesses: the kernel source is built with -fsanitize=alignment, whose checks call
// the handler below (UBSan's ABI, defined here with hidden visibility, so no sanitizer runtime is
// needed and an ASan build's UBSan reports of this kind come here too). A GPU faults on an access
// not aligned to its type (a float4 load through a pointer that is not 16-byte aligned:
// "misaligned address"); the emulator stops the launch with the kernel, block, thread, type and
// source line.
// ----------------------------------------------------------------------------------------------

struct UbsanLocation {
    const char* file;
    unsigned line, column;
};
struct UbsanType {
    unsigned short kind, info;
    char name[1];
};
struct UbsanTypeMismatch {
    UbsanLocation loc;
    const UbsanType* type;
    unsigned char log_alignment;
    unsigned char check_kind;
};

[[noreturn]] void type_mismatch(const UbsanTypeMismatch* d, uintptr_t ptr) {
    static const char* const kinds[] = {"load of", "store to", "reference binding to", "member access within",
                                        "member call on", "constructor call on", "downcast of", "downcast of",
                                        "upcast of", "cast to virtual base of", "_Nonnull binding to",
                                        "dynamic operation on"};
    const char* kind = d->check_kind < sizeof(kinds) / sizeof(kinds[0]) ? kinds[d->check_kind] : "access to";
    const unsigned long long align = 1ull << d->log_alignment;
    std::string type = d->type->name;  // GCC quotes it already, clang does not
    if (type.size() < 2 || type.front() != '\'') type = "'" + type + "'";
    std::string what;
    if (ptr == 0)
        what = format("%s null pointer of type %s", kind, type.c_str());
    else if (ptr & (align - 1))
        what = format("misaligned address: %s address 0x%llx for type %s, which needs %llu-byte alignment",
                      kind, (unsigned long long)ptr, type.c_str(), align);
    else
        what = format("%s address 0x%llx with too little space for type %s", kind, (unsigned long long)ptr,
                      type.c_str());
    if (!g_current) {  // not in a kernel thread: cannot stop a launch, stop the process
        std::fprintf(stderr, "gpu emulator: %s at %s:%u\n", what.c_str(), d->loc.file, d->loc.line);
        std::abort();
    }
    const Fiber* f = g_current;
    record_error(format("%s at %s:%u (thread (%u,%u,%u))", what.c_str(), d->loc.file, d->loc.line, f->tid.x,
                        f->tid.y, f->tid.z));
    wait();
    __builtin_unreachable();
}

namespace {

enum BlockState { BLOCK_DONE, BLOCK_RELEASED, BLOCK_AT_GRID_SYNC, BLOCK_FAILED };

// No thread of the group is runnable; for block b: all returned, or every live thread waits at
// the same __syncthreads (released now) or at grid.sync (released with the grid), or an error.
BlockState resolve_block(int b) {
    blockIdx = g_blocks[b].idx;  // for the error messages
    std::vector<int> exited, at_barrier, at_warp;
    for (int r = 0; r < g.threads; ++r) {
        switch (fiber_of(b, r).state) {
            case EXITED: exited.push_back(r); break;
            case AT_BARRIER: at_barrier.push_back(r); break;
            case AT_WARP_OP: at_warp.push_back(r); break;
            case RUNNABLE: break;
        }
    }
    if ((int)exited.size() == g.threads) return BLOCK_DONE;
    if (!at_warp.empty()) {
        // A warp operation waits for lanes that will never come: they exited or wait at a barrier.
        const int warp = at_warp[0] / 32;
        const WarpGroup& grp = g_warps[b * warps_per_block() + warp].groups.front();
        std::vector<int> gone, barred;
        for (int l = 0; l < 32; ++l) {
            if (!(grp.mask >> l & 1u) || (grp.arrived >> l & 1u)) continue;
            const Fiber& o = fiber_of(b, warp * 32 + l);
            (o.state == EXITED ? gone : barred).push_back(l);
        }
        std::string why;
        if (!gone.empty()) why += format("lanes %s have exited", ranges(gone).c_str());
        if (!barred.empty()) {
            const Fiber& o = fiber_of(b, warp * 32 + barred[0]);
            why += format("%slanes %s wait at %s (%s:%d)", why.empty() ? "" : "; ", ranges(barred).c_str(),
                          kBarrierNames[o.op], o.file, o.line);
        }
        record_error(format("%s at %s:%d in warp %d (mask 0x%08x) cannot complete: %s", kWarpOpNames[grp.op],
                            grp.file, grp.line, warp, grp.mask, why.c_str()));
        return BLOCK_FAILED;
    }
    // Every live thread waits at a barrier: the same one, or the block has diverged.
    const Fiber& first = fiber_of(b, at_barrier[0]);
    std::vector<int> same, other;
    for (int r : at_barrier) {
        const Fiber& t = fiber_of(b, r);
        (t.file == first.file && t.line == first.line && t.op == first.op ? same : other).push_back(r);
    }
    if (!other.empty()) {
        const Fiber& o = fiber_of(b, other[0]);
        std::vector<int> elsewhere;
        for (int r : other)
            if (fiber_of(b, r).file == o.file && fiber_of(b, r).line == o.line) elsewhere.push_back(r);
        record_error(format("divergent barrier: threads %s wait at %s (%s:%d) while threads %s wait at %s (%s:%d)",
                            ranges(same).c_str(), kBarrierNames[first.op], first.file, first.line,
                            ranges(elsewhere).c_str(), kBarrierNames[o.op], o.file, o.line));
        return BLOCK_FAILED;
    }
    if (first.op == BAR_GRID) return BLOCK_AT_GRID_SYNC;
    long long count = 0;
    for (int r : at_barrier) count += fiber_of(b, r).value != 0;
    unsigned long long result = 0;
    switch (first.op) {
        case BAR_COUNT: result = (unsigned long long)count; break;
        case BAR_AND: result = count == (long long)at_barrier.size(); break;
        case BAR_OR: result = count != 0; break;
        default: break;
    }
    for (int r : at_barrier) {
        fiber_of(b, r).result = result;
        fiber_of(b, r).state = RUNNABLE;
    }
    g_runnable += (int)at_barrier.size();
    return BLOCK_RELEASED;
}

// Every block that has not finished waits at grid.sync with all its live threads: release them,
// unless a thread has exited (it can never arrive) or blocks wait at different grid.sync calls.
bool release_grid_sync() {
    const int nblocks = (int)g_blocks.size(), total = nblocks * g.threads;
    const Fiber* first = nullptr;
    for (int i = 0; i < total && !first; ++i)
        if (g_fibers[i].state == AT_BARRIER) first = &g_fibers[i];
    for (int b = 0; b < nblocks; ++b) {
        std::vector<int> exited, elsewhere;
        const Fiber* other = nullptr;
        for (int r = 0; r < g.threads; ++r) {
            const Fiber& t = fiber_of(b, r);
            if (t.state == EXITED) {
                exited.push_back(r);
            } else if (t.file != first->file || t.line != first->line) {
                elsewhere.push_back(r);
                other = &t;
            }
        }
        blockIdx = g_blocks[b].idx;
        if (!exited.empty()) {
            record_error(format("grid.sync at %s:%d cannot complete: threads %s of this block have exited "
                                "(every thread of the grid must arrive)",
                                first->file, first->line, ranges(exited).c_str()));
            return false;
        }
        if (other) {
            const uint3 fb = g_blocks[first->block].idx;
            record_error(format("divergent grid barrier: threads %s wait at grid.sync (%s:%d) while block "
                                "(%u,%u,%u) waits at grid.sync (%s:%d)",
                                ranges(elsewhere).c_str(), other->file, other->line, fb.x, fb.y, fb.z,
                                first->file, first->line));
            return false;
        }
    }
    for (int i = 0; i < total; ++i) {
        if (g_fibers[i].state != AT_BARRIER) continue;
        g_fibers[i].state = RUNNABLE;
        ++g_runnable;
    }
    return true;
}

// No thread of the group is runnable: release what can be released. False when the group has
// finished or failed.
bool resolve_group() {
    bool released = false, at_grid_sync = false;
    for (int b = 0; b < (int)g_blocks.size(); ++b) {
        switch (resolve_block(b)) {
            case BLOCK_DONE: break;
            case BLOCK_RELEASED: released = true; break;
            case BLOCK_AT_GRID_SYNC: at_grid_sync = true; break;
            case BLOCK_FAILED: return false;
        }
    }
    if (released) return true;
    return at_grid_sync && release_grid_sync();
}

// Runs blocks `idx` as one group: one block for an ordinary launch, the whole grid for a
// cooperative one. g_fibers and g_warps are sized for the group.
void run_group(const std::vector<uint3>& idx) {
    const int nblocks = (int)idx.size(), total = nblocks * g.threads;
    g_blocks.assign(nblocks, Block{});
    for (int b = 0; b < nblocks; ++b) g_blocks[b].idx = idx[b];
    g_blocks[0].fresh = false;
    g_resident = 0;
    poison_shared_memory();
    for (int i = 0; i < total; ++i) {
        Fiber& f = g_fibers[i];
        const int r = i % g.threads;
        f.rank = r;
        f.block = i / g.threads;
        f.tid = uint3{r % blockDim.x, r / blockDim.x % blockDim.y, r / (blockDim.x * blockDim.y)};
        f.state = RUNNABLE;
        f.segment = 0;
        start_fiber(&f);
    }
    for (Warp& w : g_warps) w.groups.clear();
    g_runnable = total;
    // Resumes f if it can run; false once the launch has failed.
    auto step = [](Fiber& f) {
        if (f.state != RUNNABLE) return true;
        if (f.block != g_resident) switch_shared_memory(f.block);
        if (!g.aborted) resume(&f);
        return !g.aborted;
    };
    const int wpb = warps_per_block();
    std::vector<int> block_order, warp_order;
    if (g.order == ORDER_SHUFFLE) {
        block_order.resize(nblocks);
        warp_order.resize(wpb);
        for (int b = 0; b < nblocks; ++b) block_order[b] = b;
        for (int w = 0; w < wpb; ++w) warp_order[w] = w;
    }
    for (;;) {
        while (g_runnable > 0) {
            if (g.order == ORDER_SHUFFLE) {
                // A fresh order every sweep: the blocks and the warps of a block permuted, the
                // lanes of a warp taken as lane ^ m for a random m (any two lanes of a warp run
                // in either order with even odds, and a warp's fibers stay close in memory).
                // Blocks stay contiguous, so a cooperative group swaps shared memory once per
                // block and sweep, not once per thread.
                permute(block_order, g.rng);
                permute(warp_order, g.rng);
                for (int b : block_order) {
                    for (int w : warp_order) {
                        const int lanes = std::min(32, g.threads - w * 32);
                        const int m = (int)(mix(g.rng) & 31u);
                        for (int l = 0; l < 32; ++l) {
                            const int lane = l ^ m;
                            if (lane < lanes && !step(fiber_of(b, w * 32 + lane))) return;
                        }
                    }
                }
            } else {
                for (int i = 0; i < total; ++i)
                    if (!step(g_fibers[g.order == ORDER_REVERSE ? total - 1 - i : i])) return;
            }
        }
        if (!resolve_group()) break;
    }
    if (!g.aborted) check_guard_zone();
#if defined(GPUEMU_TRACE)
    trace_flush();
#endif
}

}  // namespace
}  // namespace gpuemu

using namespace gpuemu;

GPUEMU_EXPORT int gpuemu_kernel_count_() { return gpuemu_kernel_count; }
GPUEMU_EXPORT const char* gpuemu_kernel_name(int i) { return gpuemu_kernel_table[i].name; }
GPUEMU_EXPORT const char* gpuemu_kernel_signature(int i) { return gpuemu_kernel_table[i].signature(); }
GPUEMU_EXPORT int gpuemu_kernel_max_threads(int i) { return gpuemu_kernel_table[i].max_threads; }
GPUEMU_EXPORT int gpuemu_kernel_min_blocks(int i) { return gpuemu_kernel_table[i].min_blocks; }
GPUEMU_EXPORT unsigned gpuemu_dynamic_smem_capacity() { return GPUEMU_DYNAMIC_SMEM_CAPACITY; }
GPUEMU_EXPORT const char* gpuemu_last_error() { return g.error.c_str(); }

// Bytes of static shared memory: all the module's kernels together (one TLS block holds them all).
GPUEMU_EXPORT unsigned gpuemu_static_smem_bytes() {
    TlsBlock found;
    dl_iterate_phdr(find_tls, &found);
    return (unsigned)(found.size - sizeof(gpuemu_dynamic_smem));
}

// Runs kernel `index` over the whole grid. `args[i]` points at parameter i's bytes, as in
// cuLaunchKernel. `order`: ORDER_FORWARD, ORDER_REVERSE, or ORDER_SHUFFLE seeded by `thread_seed`.
// `block_seed` != 0 shuffles the block order. Both seeds are mixed with the kernel's name and the
// launch shape. `cooperative` != 0 runs all blocks as one group (cuLaunchCooperativeKernel:
// grid.sync() allowed). Returns 0, or -1 with gpuemu_last_error().
GPUEMU_EXPORT int gpuemu_launch(int index, const unsigned* grid, const unsigned* block, unsigned dynamic_smem,
                                void** args, int order, unsigned long long thread_seed,
                                unsigned long long block_seed, int cooperative) {
    std::lock_guard<std::mutex> lock(g_launch_mutex);
    g = Launch{};
    g.kernel = &gpuemu_kernel_table[index];
    g.args = args;
    // FNV-1a of the name and shape: what makes two launches' orders differ under one seed
    unsigned long long shape = 0xcbf29ce484222325ull;
    for (const char* c = g.kernel->name; *c; ++c) shape = (shape ^ (unsigned char)*c) * 0x100000001b3ull;
    for (int i = 0; i < 3; ++i) shape = (shape ^ grid[i]) * 0x100000001b3ull;
    for (int i = 0; i < 3; ++i) shape = (shape ^ block[i]) * 0x100000001b3ull;
    g.order = order;
    g.rng = thread_seed ^ shape;

    g.dynamic_smem = dynamic_smem;
    g.cooperative = cooperative != 0;
    gridDim = dim3(grid[0], grid[1], grid[2]);
    blockDim = dim3(block[0], block[1], block[2]);
    g.threads = (int)(block[0] * block[1] * block[2]);
    blockIdx = uint3{0, 0, 0};
    if (dynamic_smem > GPUEMU_DYNAMIC_SMEM_CAPACITY) {
        record_error(format("%u bytes of dynamic shared memory requested; at most %u", dynamic_smem,
                            GPUEMU_DYNAMIC_SMEM_CAPACITY));
        return -1;
    }
    if (!locate_shared_memory()) {
        record_error("cannot locate the module's thread-local shared memory");
        return -1;
    }
    const unsigned long long blocks = (unsigned long long)grid[0] * grid[1] * grid[2];
    const int group = g.cooperative ? (int)blocks : 1;
    try {
        allocate_stacks(group * g.threads);
    } catch (const std::bad_alloc&) {
        record_error("cannot allocate fiber stacks");
        return -1;
    }
    const int wpb = warps_per_block();
    g_warps.assign((size_t)group * wpb, Warp{});
    for (size_t w = 0; w < g_warps.size(); ++w)
        g_warps[w].lanes = std::min(32, g.threads - (int)(w % wpb) * 32);
    std::vector<unsigned long long> block_order;
    if (block_seed) {
        block_order.resize(blocks);
        for (unsigned long long b = 0; b < blocks; ++b) block_order[b] = b;
        unsigned long long state = block_seed ^ shape;
        permute(block_order, state);
    }
    std::vector<uint3> idx;
    for (unsigned long long i = 0; i < blocks && !g.aborted; i += group) {
        idx.clear();
        for (unsigned long long j = i; j < i + group; ++j) {
            const unsigned long long b = block_seed ? block_order[j] : j;
            idx.push_back(uint3{(unsigned)(b % grid[0]), (unsigned)(b / grid[0] % grid[1]),
                                (unsigned)(b / ((unsigned long long)grid[0] * grid[1]))});
        }
        run_group(idx);
    }
#if defined(GPUEMU_ASAN)
    // Fibers abandoned at an error leave their frames' redzones poisoned in ASan's shadow; the
    // next launch reuses the stacks.
    if (g.aborted)
        for (Fiber& f : g_fibers) ASAN_UNPOISON_MEMORY_REGION(f.stack, f.stack_size);
#endif
    return g.aborted ? -1 : 0;
}

// UBSan's handlers for -fsanitize=alignment (and, in an ASan build, null and object-size checks):
// hidden, so they serve this module only.
extern "C" __attribute__((visibility("hidden"))) void __ubsan_handle_type_mismatch_v1(void* data, uintptr_t ptr) {
    type_mismatch(static_cast<const UbsanTypeMismatch*>(data), ptr);
}
extern "C" __attribute__((visibility("hidden"))) void __ubsan_handle_type_mismatch_v1_abort(void* data,
                                                                                             uintptr_t ptr) {
    type_mismatch(static_cast<const UbsanTypeMismatch*>(data), ptr);
}
