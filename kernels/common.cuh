// common.cuh — types and helpers shared by every keel kernel.
//
// The host (src/backend/cuda/) includes this file textually in front of each
// .cu source before handing it to NVRTC, so the kernels need no include path
// and no CUDA headers (bf16 is handled as raw bits here, which also makes the
// rounding bit-identical to the CPU backend's).
//
// Conventions every kernel follows:
// - one thread block per chunk of the multi-tensor chunk table (at most
//   KEEL_CHUNK elements of one tensor), so a launch covers all tensors and
//   hundreds of small tensors cost one launch, not hundreds;
// - reductions are fixed-order trees (per-thread strided sums, then warp
//   shuffles, then one warp over the warp sums) written as per-chunk partials;
//   later kernels add partials in chunk order: results are deterministic and
//   there are no float atomics;
// - every kernel that writes optimizer state first reads the device-side skip
//   flag (a non-finite gradient anywhere) and returns, so a skipped step writes
//   nothing and the host never has to look before launching.

#define KEEL_BLOCK 256

typedef unsigned int u32;
typedef unsigned long long u64;

// One entry of the chunk table: elements [offset, offset + len) of `tensor`.
struct KeelChunk {
    u32 tensor;
    u32 len;
    u64 offset;
};

// Device addresses of one tensor's buffers (0 where a buffer is absent).
struct KeelPtrs {
    float* p;            // parameter, or f32 master weight under mixed precision
    const void* g;       // gradient (f32 or bf16 bits, per kernel variant)
    float* s0;           // first state slot (momentum, exp_avg)
    float* s1;           // second state slot (exp_avg_sq)
    unsigned short* out; // bf16 copy of the parameter (mixed precision)
};

// The step's scalars the scan computes on the device (see reduce.cu).
#define KEEL_G_NORM 0  // global gradient norm (NaN when not finite)
#define KEEL_G_CLIP 1  // global clip factor applied to every gradient
#define KEEL_G_SKIP 2  // 1 when any gradient is non-finite: skip the step
#define KEEL_G_LEN 4

// Per-tensor statistics (doubles), read back once per step.
#define KEEL_T_RAW_SQ 0    // sum(g^2) of the raw gradient (finite iff all are)
#define KEEL_T_GRAD_SQ 1   // sum(clamp(g)^2)
#define KEEL_T_SCAN_PSQ 2  // sum(p^2) (LARS scan only)
#define KEEL_T_GP 3        // sum(clamp(g) * p) (LARS scan only)
#define KEEL_T_PARAM_SQ 4  // sum(p^2) before the update
#define KEEL_T_UPDATE_SQ 5 // sum((p_new - p)^2)
#define KEEL_T_TRUST 6     // trust ratio applied, NaN if none
#define KEEL_T_UCLIP 7     // update clip factor applied, NaN if none
#define KEEL_T_LEN 8

// Per-tensor host inputs (doubles): base lr (group scale included), weight
// decay, 1 if the trust ratio is on, element count.
#define KEEL_P_LR 0
#define KEEL_P_WD 1
#define KEEL_P_TRUST 2
#define KEEL_P_NUMEL 3
#define KEEL_P_LEN 4

// Per-tensor f32 coefficients of the elementwise kernels (meaning per kernel).
#define KEEL_COEF_LEN 12

// A compile-time bool as a type, to instantiate a generic lambda twice: for
// a full group of elements (no bounds checks, so its loads issue back to
// back) and for the ragged end of a chunk.
template <bool B>
struct KeelBool {
    static constexpr bool value = B;
};

__device__ __forceinline__ float keel_bf16_to_f32(unsigned short b) {
    return __uint_as_float(((u32)b) << 16);
}

__device__ __forceinline__ float keel_grad(const void* g, u64 i, bool bf16) {
    return bf16 ? keel_bf16_to_f32(((const unsigned short*)g)[i]) : ((const float*)g)[i];
}

// f32 -> bf16, round to nearest even; NaN stays a quiet NaN (as the `half`
// crate does on the CPU).
__device__ __forceinline__ unsigned short keel_bf16_rne(float x) {
    u32 b = __float_as_uint(x);
    if ((b & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((b >> 16) | 0x40u);
    return (unsigned short)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

// splitmix64's finalizer, as in src/backend/mixed.rs.
__device__ __forceinline__ u64 keel_mix(u64 z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// Stochastic rounding to bf16 with 16 random bits; a carry into infinity
// falls back to nearest (the CPU's `stochastic_bf16`).
__device__ __forceinline__ unsigned short keel_bf16_stochastic(float x, u64 noise) {
    u32 b = __float_as_uint(x);
    if ((b & 0x7f800000u) == 0x7f800000u) return keel_bf16_rne(x);
    unsigned short y = (unsigned short)((b + (u32)(noise & 0xffffu)) >> 16);
    if ((y & 0x7fffu) == 0x7f80u) return keel_bf16_rne(x);
    return y;
}

// Writes the bf16 copy of element `i` (nearest unless `stochastic`, then with
// the noise of hash `tensor_base + i`; no copy when `out` is null).
__device__ __forceinline__ void keel_write_bf16(unsigned short* out, u64 i, float x,
                                                 int stochastic, u64 tensor_base) {
    if (out == 0) return;
    out[i] = stochastic ? keel_bf16_stochastic(x, keel_mix(tensor_base + i)) : keel_bf16_rne(x);
}

// The per-tensor hash base of stochastic rounding: mix(seed ^ mix((step << 24) ^ tensor)).
__device__ __forceinline__ u64 keel_round_base(u64 seed, u64 step, u32 tensor) {
    return keel_mix(seed ^ keel_mix((step << 24) ^ (u64)tensor));
}

// The gradient a step uses: clamp to [lo, hi] (clip_value; +-inf when unset),
// then the global clip factor. fmaxf/fminf map NaN to a bound like Rust's
// max/min; non-finite checks look at the raw gradient instead.
__device__ __forceinline__ float keel_prep(float g, float lo, float hi, float s) {
    return fminf(fmaxf(g, lo), hi) * s;
}

// Sum of `v` over the block, in a fixed order; the result is valid in thread 0.
// `scratch` holds one double per warp.
__device__ __forceinline__ double keel_block_sum(double v, double* scratch) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
        int nw = (blockDim.x + 31) >> 5;
        v = lane < nw ? scratch[lane] : 0.0;
        for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    }
    return v;
}
