// step.cu — one fused launch per step for SGD, Adam, AdamW and Lion over all
// tensors (the multi-tensor chunk table of elementwise.cuh).
//
// Fuses: gradient clamp and global clip factor, coupled L2 (adam) or
// decoupled decay (adamw, lion), moment updates, bias corrections, the
// parameter update, the bf16 copy of the new parameter (mixed precision,
// nearest or stochastic rounding) and the ||p||, ||dp|| statistics. Why:
// these optimizers are memory bound; one pass that reads p, g, state once and
// writes p, state once is the minimum traffic, and one launch for hundreds of
// tensors removes per-tensor launch overhead.

#include "elementwise.cuh"

// torch SGD with momentum: coef = [lr, wd, keep, take, g_in_d, b_in_d]
// (first-step and Nesterov choices folded into coefficients, as on the CPU).
struct KeelSgd {
    static const bool kReadsGrad = true, kWritesState = true;
    static const int kSlots = 1;
    float lr, wd, keep, take, g_in_d, b_in_d;
    __device__ __forceinline__ explicit KeelSgd(const float* k)
        : lr(k[0]), wd(k[1]), keep(k[2]), take(k[3]), g_in_d(k[4]), b_in_d(k[5]) {}
    __device__ __forceinline__ float update(float p, float g, float& b, float&) const {
        const float gw = g + wd * p;
        b = keep * b + take * gw;
        return p - lr * (g_in_d * gw + b_in_d * b);
    }
};

// SGD without momentum (no state): same coefficients.
struct KeelSgdPlain {
    static const bool kReadsGrad = true, kWritesState = false;
    static const int kSlots = 0;
    float lr, wd;
    __device__ __forceinline__ explicit KeelSgdPlain(const float* k) : lr(k[0]), wd(k[1]) {}
    __device__ __forceinline__ float update(float p, float g, float&, float&) const {
        return p - lr * (g + wd * p);
    }
};

// Adam (coupled L2 when l2 != 0) and AdamW (decay = 1 - lr wd).
struct KeelAdam {
    static const bool kReadsGrad = true, kWritesState = true;
    static const int kSlots = 2;
    KeelAdamCoef k;
    __device__ __forceinline__ explicit KeelAdam(const float* c) : k(c) {}
    __device__ __forceinline__ float update(float p, float g, float& m, float& v) const {
        float kept = p;
        if (k.l2 != 0.0f) {
            g = g + k.l2 * p;
        } else {
            kept = p * k.decay;
        }
        k.moments(g, m, v);
        return kept - k.lr * k.direction(m, v);
    }
};

// optax Lion: coef = [b1, 1-b1, b2, 1-b2, lr, 1 - lr wd]; sign(0) = 0.
struct KeelLion {
    static const bool kReadsGrad = true, kWritesState = true;
    static const int kSlots = 1;
    float b1, omb1, b2, omb2, lr, decay;
    __device__ __forceinline__ explicit KeelLion(const float* k)
        : b1(k[0]), omb1(k[1]), b2(k[2]), omb2(k[3]), lr(k[4]), decay(k[5]) {}
    __device__ __forceinline__ float update(float p, float g, float& m, float&) const {
        const float c = b1 * m + omb1 * g;
        m = b2 * m + omb2 * g;
        const float sign = c > 0.0f ? 1.0f : (c < 0.0f ? -1.0f : 0.0f);
        return p * decay - lr * sign;
    }
};

KEEL_ELEMENTWISE_KERNELS(keel_sgd, KeelSgd)
KEEL_ELEMENTWISE_KERNELS(keel_sgd_plain, KeelSgdPlain)
KEEL_ELEMENTWISE_KERNELS(keel_adam, KeelAdam)
KEEL_ELEMENTWISE_KERNELS(keel_lion, KeelLion)
