// elementwise.cuh — the multi-tensor loop every fused optimizer kernel shares.
//
// One block per chunk of the chunk table; each thread walks its chunk with a
// block-wide stride (coalesced loads), reads p, g and the state once, writes p
// and the state once, and (mixed precision) writes the bf16 copy of the new
// parameter while it is in registers. In the same pass it accumulates
// ||p||^2 and ||p_new - p||^2 for the step statistics, so logging costs no
// extra pass over memory. The gradient transform (clip_value clamp, global
// clip factor) and the skip flag come from device memory written by the scan
// (reduce.cu): no host synchronization between scan and update. The chunk
// walk itself (keel_chunk_groups, keel_group_each, keel_store_partials2) is
// also the one LAMB's and AdamW+update_clip_rms's pass A runs (trust.cu).
//
// `Op` is the optimizer's per-element math: a constructor that loads its
// per-tensor coefficients; `kReadsGrad`, `kSlots` (state buffers it uses,
// 0-2) and `kWritesState`; and `float update(float p, float g, float& a,
// float& b)` that updates the state values `a`, `b` in registers and returns
// the new parameter. Compiled with --fmad=false, so each formula rounds
// exactly like the CPU backend's.

#include "common.cuh"

// Elements each thread loads before it computes any: the loads of one
// group are all in flight together (memory-level parallelism a memory-bound
// kernel needs to approach the device's bandwidth), and the stores follow.
#define KEEL_ILP 4

// Runs `group(first, KeelBool<FULL>())` for each group of this thread's
// elements of chunk `c` (KEEL_ILP elements `blockDim.x` apart, starting at
// `first`): FULL for a whole group, false for the ragged end of the chunk.
template <class Group>
__device__ __forceinline__ void keel_chunk_groups(const KeelChunk& c, Group&& group) {
    for (u32 first = threadIdx.x; first < c.len; first += KEEL_ILP * blockDim.x) {
        if (first + (KEEL_ILP - 1) * blockDim.x < c.len) {
            group(first, KeelBool<true>());
        } else {
            group(first, KeelBool<false>());
        }
    }
}

// Calls `f(u, i)` for element `u` of the group at `first` (`i` its index in
// the tensor) when it lies in chunk `c`; unrolled, so `u` indexes registers.
template <bool FULL, class F>
__device__ __forceinline__ void keel_group_each(const KeelChunk& c, u32 first, F&& f) {
#pragma unroll
    for (int u = 0; u < KEEL_ILP; ++u) {
        const u32 j = first + u * blockDim.x;
        if (FULL || j < c.len) f(u, c.offset + j);
    }
}

// Writes the block sums of `x` and `y` as this chunk's partials 0 and 1.
__device__ __forceinline__ void keel_store_partials2(double* partials, double x, double y,
                                                     double* scratch) {
    double* out = partials + 4 * (u64)blockIdx.x;
    double r = keel_block_sum(x, scratch);
    if (threadIdx.x == 0) out[0] = r;
    r = keel_block_sum(y, scratch);
    if (threadIdx.x == 0) out[1] = r;
}

// The f32- and bf16-gradient entry points of a kernel: `ENTRY(name_f32,
// false, ...)` and `ENTRY(name_bf16, true, ...)` (the host picks one by this
// suffix).
#define KEEL_GRAD_VARIANTS(ENTRY, name, ...) \
    ENTRY(name##_f32, false, __VA_ARGS__)    \
    ENTRY(name##_bf16, true, __VA_ARGS__)

template <class Op, bool BF16>
__device__ __forceinline__ void keel_elementwise(const KeelChunk* chunks, const KeelPtrs* ptrs,
                                                 const float* coef, const double* global,
                                                 double* partials, float lo, float hi,
                                                 int stochastic, u64 seed, u64 step) {
    __shared__ double scratch[32];
    if (global[KEEL_G_SKIP] != 0.0) return;
    const float s = Op::kReadsGrad ? (float)global[KEEL_G_CLIP] : 1.0f;
    const KeelChunk c = chunks[blockIdx.x];
    const KeelPtrs t = ptrs[c.tensor];
    const Op op(coef + (u64)c.tensor * KEEL_COEF_LEN);
    const u64 round_base = stochastic ? keel_round_base(seed, step, c.tensor) : 0ull;
    double psq = 0.0, dsq = 0.0;
    keel_chunk_groups(c, [&](u32 first, auto full) {
        constexpr bool FULL = decltype(full)::value;
        float p[KEEL_ILP] = {}, g[KEEL_ILP] = {}, a[KEEL_ILP] = {}, b[KEEL_ILP] = {};
        keel_group_each<FULL>(c, first, [&](int u, u64 i) {
            p[u] = t.p[i];
            if (Op::kReadsGrad) g[u] = keel_grad(t.g, i, BF16);
            if (Op::kSlots > 0) a[u] = t.s0[i];
            if (Op::kSlots > 1) b[u] = t.s1[i];
        });
        keel_group_each<FULL>(c, first, [&](int u, u64 i) {
            const float gp = Op::kReadsGrad ? keel_prep(g[u], lo, hi, s) : 0.0f;
            const float np = op.update(p[u], gp, a[u], b[u]);
            const float d = np - p[u];
            t.p[i] = np;
            if (Op::kWritesState && Op::kSlots > 0) t.s0[i] = a[u];
            if (Op::kWritesState && Op::kSlots > 1) t.s1[i] = b[u];
            keel_write_bf16(t.out, i, np, stochastic, round_base);
            psq += (double)p[u] * (double)p[u];
            dsq += (double)d * (double)d;
        });
    });
    keel_store_partials2(partials, psq, dsq, scratch);
}

#define KEEL_ELEMENTWISE_ENTRY(name, BF16, Op)                                                \
    extern "C" __global__ void __launch_bounds__(KEEL_BLOCK)                                  \
        name(const KeelChunk* chunks, const KeelPtrs* ptrs, const float* coef,                \
             const double* global, double* partials, float lo, float hi, int stochastic,      \
             u64 seed, u64 step) {                                                            \
        keel_elementwise<Op, BF16>(chunks, ptrs, coef, global, partials, lo, hi, stochastic,  \
                                   seed, step);                                               \
    }

// Declares the f32- and bf16-gradient entry points of an elementwise kernel.
#define KEEL_ELEMENTWISE_KERNELS(name, Op) KEEL_GRAD_VARIANTS(KEEL_ELEMENTWISE_ENTRY, name, Op)

// The Adam family's coefficients (src/optim/adam.rs `AdamCoeffs`), in order.
#define KEEL_ADAM_LR 9
struct KeelAdamCoef {
    float b1, omb1, b2, omb2, inv_bc1, inv_sqrt_bc2, eps, l2, decay, lr, wd_dir;
    __device__ __forceinline__ explicit KeelAdamCoef(const float* k)
        : b1(k[0]), omb1(k[1]), b2(k[2]), omb2(k[3]), inv_bc1(k[4]), inv_sqrt_bc2(k[5]),
          eps(k[6]), l2(k[7]), decay(k[8]), lr(k[9]), wd_dir(k[10]) {}
    // m = b1 m + (1-b1) g; v = b2 v + (1-b2) g g (the CPU's operation order).
    __device__ __forceinline__ void moments(float g, float& m, float& v) const {
        m = b1 * m + omb1 * g;
        v = b2 * v + omb2 * g * g;
    }
    // u = m_hat / (sqrt(v_hat) + eps).
    __device__ __forceinline__ float direction(float m, float v) const {
        return (m * inv_bc1) / (sqrtf(v) * inv_sqrt_bc2 + eps);
    }
};
