// trust.cu — the optimizers whose update needs a per-tensor norm first:
// LARS and LAMB (trust ratios) and AdamW with update_clip_rms.
//
// LARS: the scan (reduce.cu) already read g and p and its finalize turned
// ||g||^2, g.p and ||p||^2 into each tensor's trust ratio on the device, so
// LARS is one fused pass here (keel_lars), like SGD.
//
// LAMB and AdamW+update_clip_rms need ||u|| of the new Adam direction:
// pass A (keel_lamb_moments / keel_adam_moments) updates m and v and writes
// per-chunk partials of ||p||^2 and ||u||^2; keel_tensor_sums (reduce.cu)
// turns them into the trust ratio or clip factor and folds it into the
// tensor's lr coefficient; pass B (keel_adam_apply) recomputes u from the new
// m and v and applies it. Recomputing u costs a division and a square root
// per element but saves writing and re-reading a tensor-sized temporary,
// which on a memory-bound step is the dearer of the two.

#include "elementwise.cuh"

// optax LARS: coef = [wd, lr * trust, momentum, u_in_d, b_in_d]; the trust
// ratio was folded into coef[1] by keel_global_finalize.
#define KEEL_LARS_LR 1
struct KeelLars {
    static const bool kReadsGrad = true, kWritesState = true;
    static const int kSlots = 1;
    float wd, lr_trust, momentum, u_in_d, b_in_d;
    __device__ __forceinline__ explicit KeelLars(const float* k)
        : wd(k[0]), lr_trust(k[1]), momentum(k[2]), u_in_d(k[3]), b_in_d(k[4]) {}
    __device__ __forceinline__ float update(float p, float g, float& b, float&) const {
        const float u = lr_trust * (g + wd * p);
        b = u + momentum * b;
        return p - (u_in_d * u + b_in_d * b);
    }
};

// Pass B: p = p decay - lr (u + wd_dir p), u from the stored m, v; reads no
// gradient.
struct KeelAdamApply {
    static const bool kReadsGrad = false, kWritesState = false;
    static const int kSlots = 2;
    KeelAdamCoef k;
    __device__ __forceinline__ explicit KeelAdamApply(const float* c) : k(c) {}
    __device__ __forceinline__ float update(float p, float, float& m, float& v) const {
        return p * k.decay - k.lr * (k.direction(m, v) + k.wd_dir * p);
    }
};

KEEL_ELEMENTWISE_KERNELS(keel_lars, KeelLars)

extern "C" __global__ void __launch_bounds__(KEEL_BLOCK)
keel_adam_apply(const KeelChunk* chunks, const KeelPtrs* ptrs, const float* coef,
                const double* global, double* partials, int stochastic, u64 seed, u64 step) {
    keel_elementwise<KeelAdamApply, false>(chunks, ptrs, coef, global, partials, 0.0f, 0.0f,
                                           stochastic, seed, step);
}

// Pass A: m, v updated from the prepared gradient; partials of ||p||^2 (when
// WITH_P, LAMB) and ||u||^2 with u = m_hat / (sqrt(v_hat) + eps) + wd_dir p.
template <bool BF16, bool WITH_P>
__device__ __forceinline__ void keel_moments(const KeelChunk* chunks, const KeelPtrs* ptrs,
                                             const float* coef, const double* global,
                                             double* partials, float lo, float hi) {
    __shared__ double scratch[32];
    if (global[KEEL_G_SKIP] != 0.0) return;
    const float s = (float)global[KEEL_G_CLIP];
    const KeelChunk c = chunks[blockIdx.x];
    const KeelPtrs t = ptrs[c.tensor];
    const KeelAdamCoef k(coef + (u64)c.tensor * KEEL_COEF_LEN);
    double psq = 0.0, usq = 0.0;
    keel_chunk_groups(c, [&](u32 first, auto full) {
        constexpr bool FULL = decltype(full)::value;
        float g[KEEL_ILP] = {}, m[KEEL_ILP] = {}, v[KEEL_ILP] = {}, p[KEEL_ILP] = {};
        keel_group_each<FULL>(c, first, [&](int u, u64 i) {
            g[u] = keel_grad(t.g, i, BF16);
            m[u] = t.s0[i];
            v[u] = t.s1[i];
            if (WITH_P) p[u] = t.p[i];
        });
        keel_group_each<FULL>(c, first, [&](int u, u64 i) {
            k.moments(keel_prep(g[u], lo, hi, s), m[u], v[u]);
            t.s0[i] = m[u];
            t.s1[i] = v[u];
            float dir = k.direction(m[u], v[u]);
            if (WITH_P) {
                dir = dir + k.wd_dir * p[u];
                psq += (double)p[u] * (double)p[u];
            }
            usq += (double)dir * (double)dir;
        });
    });
    keel_store_partials2(partials, psq, usq, scratch);
}

#define KEEL_MOMENT_ENTRY(name, BF16, WITH_P)                                          \
    extern "C" __global__ void __launch_bounds__(KEEL_BLOCK)                           \
        name(const KeelChunk* chunks, const KeelPtrs* ptrs, const float* coef,         \
             const double* global, double* partials, float lo, float hi) {             \
        keel_moments<BF16, WITH_P>(chunks, ptrs, coef, global, partials, lo, hi);      \
    }

#define KEEL_MOMENT_KERNELS(name, WITH_P) KEEL_GRAD_VARIANTS(KEEL_MOMENT_ENTRY, name, WITH_P)

KEEL_MOMENT_KERNELS(keel_lamb_moments, true)
KEEL_MOMENT_KERNELS(keel_adam_moments, false)
