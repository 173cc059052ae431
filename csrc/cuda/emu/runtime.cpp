// CUDA emulation: block scheduler, fibers, barriers and warp meetings.
//
// Execution model
// - A launch runs its blocks in sequence (or reversed, or shuffled with a seed), optionally spread
//   over worker OS threads. Each worker owns its fibers' stacks and its dynamic shared memory, so
//   blocks on different workers really run concurrently (inter-block races show up).
// - A block's threads are fibers: user-space contexts with their own stacks, switched by a small
//   hand-written x86-64 routine (callee-saved registers, MXCSR and the x87 control word; ucontext
//   elsewhere). A fiber runs until it reaches __syncthreads, a warp collective, or its end.
// - Scheduling is adversarial for missing barriers: warps run one after another, each as far as it
//   can get (its lanes one at a time, its warp collectives resolved as soon as the lanes in the mask
//   have all arrived) before the next warp starts. A warp therefore reads shared memory that other
//   warps have not written yet, or overwrites what they have not read yet, unless a barrier stops it.
// - Dynamic shared memory is filled with 0xff bytes (NaN as fp32, fp16 and bf16) before each block.
// - __syncthreads is released when every thread of the block waits at the same source line; a
//   thread at another line, or one that has exited, is an error. A warp collective is a meeting of
//   exactly the lanes in its mask: the caller must be in the mask, every lane of the mask must make
//   the same kind of call with the same mask (mma.sync: the same line), and a shuffle's source lane,
//   computed with the PTX shfl rules, must be in the mask (otherwise the GPU returns garbage).
// - Errors (including device asserts and deadlocks) abandon the launch and are thrown from
//   launch_impl on the calling thread: exceptions never cross a fiber stack.
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <stdexcept>
#include <thread>
#include <vector>

#include "cuda/emu/device.h"

#if defined(__x86_64__)
#define SF_EMU_ASM_SWITCH 1
// void sf_emu_switch(void** save_sp, void* load_sp): push the callee-saved state on the current
// stack, store the stack pointer in *save_sp, continue on load_sp (whose top holds the same frame).
__asm__(R"(
  .text
  .p2align 4
  .globl sf_emu_switch
  .hidden sf_emu_switch
  .type sf_emu_switch, @function
sf_emu_switch:
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
  .size sf_emu_switch, .-sf_emu_switch
)");
extern "C" void sf_emu_switch(void** save_sp, void* load_sp);
#else
#include <ucontext.h>
#endif

const char* cudaGetErrorString(cudaError_t error) {
  return error == cudaSuccess ? "no error" : "invalid argument";
}

namespace sf_emu {
namespace {

enum State : uint8_t { kRunnable, kBarrier, kWarp, kExited };
enum WarpOp : uint8_t { kOpShfl, kOpBallot, kOpSyncwarp, kOpMma };
const char* op_name(WarpOp op) {
  switch (op) {
    case kOpShfl: return "a warp shuffle";
    case kOpBallot: return "a warp vote";
    case kOpSyncwarp: return "__syncwarp";
    default: return "mma.sync";
  }
}

struct WarpCall {
  WarpOp op;
  unsigned mask;
  uint64_t value;      // shuffle payload; ballot predicate
  int mode;            // shuffle mode; mma kind
  unsigned b, c;       // shuffle operands b and c as in PTX shfl.sync
  float* d;            // mma accumulators (4 floats of this lane)
  const uint32_t* a;   // mma A fragment (4 regs)
  const uint32_t* bf;  // mma B fragment (2 regs)
  uint64_t result;
};

struct Fiber {
  void* sp = nullptr;
  State state = kExited;
  ThreadCtx ctx{};
  const char* file = "";  // where it waits (barrier or warp call)
  int line = 0;
  WarpCall call{};
#if !SF_EMU_ASM_SWITCH
  ucontext_t uc;
#endif
};

constexpr size_t kStackBytes = 256 << 10;
constexpr size_t kGuardBytes = 4096;

struct Worker {
  std::vector<Fiber> fibers;
  std::vector<char*> stacks;  // kGuardBytes (PROT_NONE) + kStackBytes each
  void* sched_sp = nullptr;
#if !SF_EMU_ASM_SWITCH
  ucontext_t sched_uc;
#endif
  unsigned cur = 0, nthreads = 0, exited = 0;
  const std::function<void()>* body = nullptr;
  unsigned char* smem = nullptr;
  size_t smem_cap = 0;
  std::vector<unsigned> warp_order;
  std::string error;

  ~Worker() {
    for (char* s : stacks) munmap(s, kGuardBytes + kStackBytes);
    std::free(smem);
  }
};

thread_local Worker* tl_worker = nullptr;

Options g_options;
std::mutex g_mutex;                              // g_options, g_optin
std::map<const void*, int> g_optin;              // kernel -> opted-in dynamic smem bytes

const char* base_name(const char* path) {
  const char* slash = std::strrchr(path, '/');
  return slash ? slash + 1 : path;
}

std::string thread_name(const Worker& w, unsigned i) {
  const ThreadCtx& c = w.fibers[i].ctx;
  char buf[128];
  std::snprintf(buf, sizeof buf, "block (%u,%u,%u) thread (%u,%u,%u)", c.block.x, c.block.y,
                c.block.z, c.thread.x, c.thread.y, c.thread.z);
  return buf;
}

std::string at(const char* file, int line) {
  return std::string(base_name(file)) + ":" + std::to_string(line);
}

// ------------------------------------------------------------------------------- fibers
void fiber_main() {
  Worker* w = tl_worker;
  (*w->body)();
  Fiber& f = w->fibers[w->cur];
  f.state = kExited;
  ++w->exited;
#if SF_EMU_ASM_SWITCH
  sf_emu_switch(&f.sp, w->sched_sp);
#else
  swapcontext(&f.uc, &w->sched_uc);
#endif
  std::abort();  // an exited fiber is never resumed
}

void ensure_stacks(Worker& w, unsigned n) {
  while (w.stacks.size() < n) {
    void* p = mmap(nullptr, kGuardBytes + kStackBytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("CUDA emulation: cannot allocate fiber stacks");
    mprotect(p, kGuardBytes, PROT_NONE);  // a stack overflow faults instead of corrupting a neighbour
    w.stacks.push_back(static_cast<char*>(p));
  }
  if (w.fibers.size() < n) w.fibers.resize(n);
}

void start_fiber(Worker& w, unsigned i) {
  Fiber& f = w.fibers[i];
  char* top = w.stacks[i] + kGuardBytes + kStackBytes;  // 16-byte aligned (page aligned)
#if SF_EMU_ASM_SWITCH
  // The frame sf_emu_switch pops: MXCSR | x87 CW, r15, r14, r13, r12, rbx, rbp, return address
  // (fiber_main), then a zero "return address" for fiber_main so that it starts with the stack
  // alignment of a called function (rsp = 8 mod 16).
  uint64_t* sp = reinterpret_cast<uint64_t*>(top);
  sp[-1] = 0;
  sp[-2] = reinterpret_cast<uint64_t>(&fiber_main);
  for (int r = 3; r <= 8; ++r) sp[-r] = 0;
  sp[-9] = 0x1f80u | (uint64_t(0x037fu) << 32);  // default MXCSR, x87 control word
  f.sp = &sp[-9];
#else
  getcontext(&f.uc);
  f.uc.uc_stack.ss_sp = w.stacks[i] + kGuardBytes;
  f.uc.uc_stack.ss_size = kStackBytes;
  f.uc.uc_link = nullptr;
  makecontext(&f.uc, &fiber_main, 0);
  (void)top;
#endif
  f.state = kRunnable;
}

void resume(Worker& w, unsigned i) {
  w.cur = i;
#if SF_EMU_ASM_SWITCH
  sf_emu_switch(&w.sched_sp, w.fibers[i].sp);
#else
  swapcontext(&w.sched_uc, &w.fibers[i].uc);
#endif
}

// Called on a fiber: back to the scheduler until it resumes this fiber.
void park(Worker& w, Fiber& f) {
#if SF_EMU_ASM_SWITCH
  sf_emu_switch(&f.sp, w.sched_sp);
#else
  swapcontext(&f.uc, &w.sched_uc);
#endif
}

Worker& current(const char* what) {
  Worker* w = tl_worker;
  if (!w) {
    std::fprintf(stderr, "CUDA emulation: %s called outside a kernel\n", what);
    std::abort();
  }
  return *w;
}

// Called on a fiber: record the error and leave the block for good.
[[noreturn]] void fail_on_fiber(Worker& w, const std::string& what) {
  if (w.error.empty()) w.error = "CUDA emulation: " + thread_name(w, w.cur) + ": " + what;
  Fiber& f = w.fibers[w.cur];
  f.state = kExited;
  park(w, f);
  std::abort();
}

// ------------------------------------------------------------------------------- warp meetings
unsigned lanes_in_warp(const Worker& w, unsigned warp) {
  return std::min(32u, w.nthreads - warp * 32);
}

// On a fiber: checks the mask, posts the call and waits for the meeting.
uint64_t warp_call(WarpCall call, const char* file, int line) {
  Worker& w = current("a warp collective");
  Fiber& f = w.fibers[w.cur];
  const unsigned lane = w.cur % 32, lanes = lanes_in_warp(w, w.cur / 32);
  char buf[256];
  if (!((call.mask >> lane) & 1u)) {
    std::snprintf(buf, sizeof buf, "%s with mask 0x%08x at %s: the calling lane %u is not in the mask",
                  op_name(call.op), call.mask, at(file, line).c_str(), lane);
    fail_on_fiber(w, buf);
  }
  if (lanes < 32 && (call.mask >> lanes)) {
    std::snprintf(buf, sizeof buf, "%s with mask 0x%08x at %s names lanes that do not exist (this warp "
                  "has %u threads)", op_name(call.op), call.mask, at(file, line).c_str(), lanes);
    fail_on_fiber(w, buf);
  }
  f.call = call;
  f.state = kWarp;
  f.file = file;
  f.line = line;
  park(w, f);
  return f.call.result;
}

// PTX shfl.sync: the lane whose value lane `i` receives.
unsigned shfl_source(unsigned i, const WarpCall& c) {
  const unsigned segmask = (c.c >> 8) & 0x1fu, clamp = c.c & 0x1fu;
  const int min_lane = int(i & segmask), max_lane = int((i & segmask) | (clamp & ~segmask));
  int j = int(i);
  bool ok = false;
  switch (c.mode) {
    case kShflUp: j = int(i) - int(c.b); ok = j >= max_lane; break;
    case kShflDown: j = int(i) + int(c.b); ok = j <= max_lane; break;
    case kShflBfly: j = int(i ^ (c.b & 0x1fu)); ok = j <= max_lane; break;
    default: j = min_lane | int(c.b & 0x1fu & ~segmask); ok = j <= max_lane; break;
  }
  return ok ? unsigned(j) : i;
}

uint16_t lo16(uint32_t r) { return uint16_t(r & 0xffffu); }
uint16_t hi16(uint32_t r) { return uint16_t(r >> 16); }

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: gather the fragments of the 32 lanes into A
// (16x16) and B (16x8), then D = A B + C in fp32 (products of fp16/bf16 values are exact in fp32).
// Fragment layout (PTX ISA, "Matrix fragments for mma.m16n8k16"), g = lane / 4, t = lane % 4:
//   A regs 0..3 = rows (g, g+8, g, g+8), columns (2t, 2t, 2t+8, 2t+8) and the next column;
//   B regs 0..1 = rows (2t, 2t+8) and the next row, column g;  C/D = rows (g, g, g+8, g+8),
//   columns (2t, 2t+1, 2t, 2t+1).
void mma_meeting(Worker& w, unsigned base) {
  float A[16][16], B[16][8];
  const bool bf = w.fibers[base].call.mode == kMmaBF16;
  auto cvt = [bf](uint16_t h) { return bf ? bf16_to_float(h) : half_to_float(h); };
  for (unsigned lane = 0; lane < 32; ++lane) {
    const WarpCall& c = w.fibers[base + lane].call;
    const unsigned g = lane / 4, t = lane % 4;
    for (int r = 0; r < 4; ++r) {
      const unsigned row = g + (r & 1) * 8, col = 2 * t + (r >> 1) * 8;
      A[row][col] = cvt(lo16(c.a[r]));
      A[row][col + 1] = cvt(hi16(c.a[r]));
    }
    for (int r = 0; r < 2; ++r) {
      B[2 * t + r * 8][g] = cvt(lo16(c.bf[r]));
      B[2 * t + r * 8 + 1][g] = cvt(hi16(c.bf[r]));
    }
  }
  for (unsigned lane = 0; lane < 32; ++lane) {
    float* d = w.fibers[base + lane].call.d;
    const unsigned g = lane / 4, t = lane % 4;
    for (int e = 0; e < 4; ++e) {
      const unsigned row = g + (e >> 1) * 8, col = 2 * t + (e & 1);
      float acc = d[e];
      for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
      d[e] = acc;
    }
  }
}

// Resolves every complete meeting of warp `warp`; returns whether any lane was released. Sets
// w.error when a meeting can never complete.
bool resolve_warp(Worker& w, unsigned warp) {
  const unsigned base = warp * 32, lanes = lanes_in_warp(w, warp);
  bool released = false;
  for (unsigned i = 0; i < lanes; ++i) {
    Fiber& f = w.fibers[base + i];
    if (f.state != kWarp) continue;
    const WarpCall& c = f.call;
    bool complete = true;
    for (unsigned j = 0; j < lanes; ++j) {
      if (!((c.mask >> j) & 1u)) continue;
      const Fiber& o = w.fibers[base + j];
      std::string problem;
      if (o.state == kRunnable) {
        complete = false;
      } else if (o.state == kExited) {
        problem = "lane " + std::to_string(j) + " of the mask has exited";
      } else if (o.state == kBarrier) {
        problem = "lane " + std::to_string(j) + " of the mask waits at __syncthreads at " + at(o.file, o.line) +
                  " (deadlock)";
      } else if (o.call.op != c.op || o.call.mask != c.mask ||
                 (c.op == kOpMma && (o.line != f.line || std::strcmp(o.file, f.file) || o.call.mode != c.mode))) {
        char buf[160];
        std::snprintf(buf, sizeof buf, "lane %u of the mask is in %s with mask 0x%08x at %s", j,
                      op_name(o.call.op), o.call.mask, at(o.file, o.line).c_str());
        problem = buf;
      }
      if (!problem.empty()) {
        char buf[160];
        std::snprintf(buf, sizeof buf, "%s with mask 0x%08x at %s can never complete: ", op_name(c.op),
                      c.mask, at(f.file, f.line).c_str());
        w.error = "CUDA emulation: " + thread_name(w, base + i) + ": " + buf + problem;
        return false;
      }
    }
    if (!complete) continue;
    if (c.op == kOpShfl) {
      for (unsigned j = 0; j < lanes; ++j) {
        if (!((c.mask >> j) & 1u)) continue;
        Fiber& o = w.fibers[base + j];
        const unsigned src = shfl_source(j, o.call);
        if (!((c.mask >> src) & 1u)) {
          char buf[200];
          std::snprintf(buf, sizeof buf, ": shuffle at %s reads lane %u, which is not in the mask 0x%08x "
                        "(the GPU returns an undefined value)", at(o.file, o.line).c_str(), src, c.mask);
          w.error = "CUDA emulation: " + thread_name(w, base + j) + buf;
          return false;
        }
        o.call.result = w.fibers[base + src].call.value;
      }
    } else if (c.op == kOpBallot) {
      unsigned bits = 0;
      for (unsigned j = 0; j < lanes; ++j)
        if (((c.mask >> j) & 1u) && w.fibers[base + j].call.value) bits |= 1u << j;
      for (unsigned j = 0; j < lanes; ++j)
        if ((c.mask >> j) & 1u) w.fibers[base + j].call.result = bits;
    } else if (c.op == kOpMma) {
      mma_meeting(w, base);
    }
    for (unsigned j = 0; j < lanes; ++j)
      if ((c.mask >> j) & 1u) w.fibers[base + j].state = kRunnable;
    released = true;
  }
  return released;
}

// ------------------------------------------------------------------------------- blocks
void run_block(Worker& w, const dim3& grid, const dim3& block, uint64_t id, size_t smem_bytes,
               std::mt19937_64* rng) {
  const unsigned n = block.x * block.y * block.z;
  w.nthreads = n;
  w.exited = 0;
  ensure_stacks(w, n);
  const dim3 bid(unsigned(id % grid.x), unsigned(id / grid.x % grid.y), unsigned(id / grid.x / grid.y));
  for (unsigned i = 0; i < n; ++i) {
    Fiber& f = w.fibers[i];
    f.ctx.thread = uint3{i % block.x, i / block.x % block.y, i / block.x / block.y};
    f.ctx.block = uint3{bid.x, bid.y, bid.z};
    f.ctx.block_dim = block;
    f.ctx.grid_dim = grid;
    start_fiber(w, i);
  }
  if (smem_bytes) std::memset(w.smem, 0xff, smem_bytes);  // NaN in every float format
  const unsigned warps = (n + 31) / 32;
  w.warp_order.resize(warps);
  std::iota(w.warp_order.begin(), w.warp_order.end(), 0u);
  if (rng) std::shuffle(w.warp_order.begin(), w.warp_order.end(), *rng);

  for (;;) {
    // each warp as far as it gets before the next one starts
    for (unsigned warp : w.warp_order) {
      const unsigned base = warp * 32, lanes = lanes_in_warp(w, warp);
      for (;;) {
        for (unsigned i = base; i < base + lanes; ++i) {
          if (w.fibers[i].state != kRunnable) continue;
          resume(w, i);
          if (!w.error.empty()) return;
        }
        const bool released = resolve_warp(w, warp);
        if (!w.error.empty()) return;
        if (!released) break;
      }
    }
    if (w.exited == n) return;
    // every live thread is now at a barrier (a warp call that cannot complete is an error above)
    unsigned first = n, exited = n;
    for (unsigned i = 0; i < n; ++i) {
      const Fiber& f = w.fibers[i];
      if (f.state == kExited) {
        if (exited == n) exited = i;
        continue;
      }
      if (f.state != kBarrier) {
        w.error = "CUDA emulation: " + thread_name(w, i) + ": deadlock in " + op_name(f.call.op) + " at " +
                  at(f.file, f.line);
        return;
      }
      if (first == n) {
        first = i;
      } else if (f.line != w.fibers[first].line || std::strcmp(f.file, w.fibers[first].file)) {
        w.error = "CUDA emulation: divergent __syncthreads: " + thread_name(w, first) + " waits at " +
                  at(w.fibers[first].file, w.fibers[first].line) + ", " + thread_name(w, i) + " at " +
                  at(f.file, f.line);
        return;
      }
    }
    if (exited != n) {
      w.error = "CUDA emulation: " + thread_name(w, exited) + " exited without reaching the __syncthreads at " +
                at(w.fibers[first].file, w.fibers[first].line) + " where " + thread_name(w, first) + " waits";
      return;
    }
    for (unsigned i = 0; i < n; ++i) w.fibers[i].state = kRunnable;
  }
}

void ensure_smem(Worker& w, size_t bytes) {
  if (bytes <= w.smem_cap) return;
  std::free(w.smem);
  w.smem = static_cast<unsigned char*>(std::aligned_alloc(128, (bytes + 127) / 128 * 128));
  if (!w.smem) throw std::runtime_error("CUDA emulation: out of memory for shared memory");
  w.smem_cap = bytes;
}

// Runs the blocks order[begin..] picked through `next` on this OS thread's worker.
template <class Next>
std::string run_blocks(Worker& w, const dim3& grid, const dim3& block, size_t smem,
                       const std::function<void()>& body, const std::vector<uint64_t>& order, Next next,
                       std::mt19937_64* rng) {
  Worker* saved = tl_worker;
  tl_worker = &w;
  w.body = &body;
  ensure_smem(w, smem);
  std::string error;
  for (int64_t k = next(); k >= 0; k = next()) {
    run_block(w, grid, block, order[k], smem, rng);
    if (!w.error.empty()) {
      error.swap(w.error);
      break;
    }
  }
  tl_worker = saved;
  return error;
}

}  // namespace

// ------------------------------------------------------------------------------- device API
const ThreadCtx& ctx() {
  Worker& w = current("threadIdx/blockIdx");
  return w.fibers[w.cur].ctx;
}

unsigned char* dynamic_smem() { return current("dynamic shared memory").smem; }

void syncthreads(const char* file, int line) {
  Worker& w = current("__syncthreads");
  Fiber& f = w.fibers[w.cur];
  f.state = kBarrier;
  f.file = file;
  f.line = line;
  park(w, f);
}

void syncwarp(unsigned mask, const char* file, int line) {
  WarpCall c{};
  c.op = kOpSyncwarp;
  c.mask = mask;
  warp_call(c, file, line);
}

uint64_t shfl(unsigned mask, uint64_t value, int mode, unsigned b, unsigned c, const char* file, int line) {
  WarpCall call{};
  call.op = kOpShfl;
  call.mask = mask;
  call.value = value;
  call.mode = mode;
  call.b = b;
  call.c = c;
  return warp_call(call, file, line);
}

unsigned ballot(unsigned mask, bool pred, const char* file, int line) {
  WarpCall call{};
  call.op = kOpBallot;
  call.mask = mask;
  call.value = pred;
  return unsigned(warp_call(call, file, line));
}

void mma_m16n8k16(int kind, float* d, const uint32_t* a, const uint32_t* b, const char* file, int line) {
  WarpCall call{};
  call.op = kOpMma;
  call.mask = 0xffffffffu;  // mma.sync.aligned: the whole warp, converged, at the same instruction
  call.mode = kind;
  call.d = d;
  call.a = a;
  call.bf = b;
  warp_call(call, file, line);
}

void device_fail(const char* what, const char* file, int line) {
  Worker& w = current("a device assertion");
  fail_on_fiber(w, std::string(what) + " at " + at(file, line));
}

// ------------------------------------------------------------------------------- host API
void configure(const Options& options) {
  if (options.order != "sequential" && options.order != "reverse" && options.order != "shuffled")
    throw std::invalid_argument("CUDA emulation: order must be sequential, reverse or shuffled, got " + options.order);
  if (options.workers < 1 || options.workers > 64)
    throw std::invalid_argument("CUDA emulation: workers must be in [1, 64], got " + std::to_string(options.workers));
  if (max_dynamic_smem_optin(options.arch) == 0)
    throw std::invalid_argument("CUDA emulation: unknown arch " + std::to_string(options.arch) +
                                " (expected 70, 75, 80, 86, 87, 89 or 90)");
  std::lock_guard<std::mutex> lock(g_mutex);
  g_options = options;
}

Options options() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return g_options;
}

int max_dynamic_smem_optin(int arch) {
  switch (arch) {
    case 70: return 98304;    // 96 KB
    case 75: return 65536;    // 64 KB
    case 80: return 166912;   // 163 KB (A100)
    case 87: return 166912;
    case 86: return 101376;   // 99 KB
    case 89: return 101376;
    case 90: return 232448;   // 227 KB (H100)
    default: return 0;
  }
}

cudaError_t set_max_dynamic_smem(const void* kernel, int bytes) {
  std::lock_guard<std::mutex> lock(g_mutex);
  const int cap = max_dynamic_smem_optin(g_options.arch);
  if (bytes < 0 || bytes > cap)
    throw std::runtime_error("CUDA emulation: cudaFuncSetAttribute(MaxDynamicSharedMemorySize, " +
                             std::to_string(bytes) + ") exceeds the sm_" + std::to_string(g_options.arch) +
                             " limit of " + std::to_string(cap) + " bytes (cudaErrorInvalidValue)");
  g_optin[kernel] = bytes;
  return cudaSuccess;
}

void launch_impl(const void* kernel, dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
  const Options opt = options();
  auto bad = [&](const std::string& why) {
    throw std::runtime_error("CUDA emulation: invalid launch configuration grid (" + std::to_string(grid.x) +
                             "," + std::to_string(grid.y) + "," + std::to_string(grid.z) + ") block (" +
                             std::to_string(block.x) + "," + std::to_string(block.y) + "," +
                             std::to_string(block.z) + "), " + std::to_string(smem) +
                             " bytes of dynamic shared memory: " + why);
  };
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (!block.x || !block.y || !block.z || !grid.x || !grid.y || !grid.z) bad("a dimension is 0");
  if (block.x > 1024 || block.y > 1024 || block.z > 64) bad("block dims exceed (1024, 1024, 64)");
  if (threads > 1024) bad("more than 1024 threads per block");
  if (grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) bad("grid dims exceed (2^31-1, 65535, 65535)");
  if (smem > 49152) {
    int optin = 0;
    {
      std::lock_guard<std::mutex> lock(g_mutex);
      auto it = g_optin.find(kernel);
      if (it != g_optin.end()) optin = it->second;
    }
    if (smem > size_t(optin))
      bad("more than 48 KB needs cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, " +
          std::to_string(smem) + ") first (opted in: " + std::to_string(optin) + ")");
  }
  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
  if (blocks > (uint64_t(1) << 26)) bad("too many blocks to emulate");

  std::vector<uint64_t> order(blocks);
  std::iota(order.begin(), order.end(), uint64_t(0));
  std::mt19937_64 rng(opt.seed);
  const bool shuffled = opt.order == "shuffled";
  if (shuffled) std::shuffle(order.begin(), order.end(), rng);
  if (opt.order == "reverse") std::reverse(order.begin(), order.end());

  std::string error;
  if (opt.workers == 1 || blocks == 1) {
    thread_local std::unique_ptr<Worker> local;
    if (!local) local = std::make_unique<Worker>();
    int64_t k = 0;
    error = run_blocks(*local, grid, block, smem, body, order,
                       [&]() -> int64_t { return k < int64_t(blocks) ? k++ : -1; }, shuffled ? &rng : nullptr);
  } else {
    std::atomic<int64_t> next{0};
    std::atomic<bool> stop{false};
    std::mutex error_mutex;
    std::vector<std::thread> threads_;
    const int workers = int(std::min<uint64_t>(opt.workers, blocks));
    for (int t = 0; t < workers; ++t) {
      threads_.emplace_back([&, t] {
        Worker w;
        std::mt19937_64 wrng(opt.seed + 1 + t);
        std::string e;
        try {
          e = run_blocks(w, grid, block, smem, body, order,
                         [&]() -> int64_t {
                           if (stop.load()) return -1;
                           const int64_t k = next.fetch_add(1);
                           return k < int64_t(blocks) ? k : -1;
                         },
                         shuffled ? &wrng : nullptr);
        } catch (const std::exception& ex) {
          e = ex.what();
        }
        if (!e.empty()) {
          stop = true;
          std::lock_guard<std::mutex> lock(error_mutex);
          if (error.empty()) error = e;
        }
      });
    }
    for (auto& th : threads_) th.join();
  }
  if (!error.empty()) throw std::runtime_error(error);
}

}  // namespace sf_emu
