// reduce.cu — the scan: global gradient norm, non-finite flag and clip factor,
// computed on the device in one deterministic two-stage reduction.
//
// Fuses: the non-finite check, the per-tensor gradient norms (of the clamped
// gradient when clip_value is set), LARS's parameter sums, the global norm,
// the clip factor and LARS's trust ratios. Why: the update kernels read the
// clip factor and the skip flag from device memory, so a clipped (or
// skipped) step needs no host round trip between the scan and the update;
// the host reads all statistics back once, after the whole step is queued.
//
// Stage 1 (keel_scan): one block per chunk writes its partial sums.
// Stage 2 (keel_tensor_sums): one block per tensor adds its chunks' partials
//   in chunk order (also used after the update passes, for ||p||, ||dp||, and
//   after LAMB's/AdamW's moment pass, where it turns ||u|| into the trust
//   ratio or the update clip factor).
// Stage 3 (keel_global_finalize): one block adds the per-tensor sums in
//   tensor order and writes the global norm, clip factor and skip flag.
// No float atomics anywhere: the same inputs give the same bits every run.

#include "common.cuh"

// Stage 1. Partials per chunk: [raw_sq, clamped_sq, p_sq, g_dot_p] (the last
// two only when `with_params`, for LARS). The squares accumulate in double:
// an f32 gradient cannot overflow them, so the raw sum is finite exactly when
// every element is.
template <bool BF16>
__device__ void keel_scan_body(const KeelChunk* chunks, const KeelPtrs* ptrs, double* partials,
                               float lo, float hi, int with_params) {
    __shared__ double scratch[32];
    const KeelChunk c = chunks[blockIdx.x];
    const KeelPtrs t = ptrs[c.tensor];
    double raw = 0.0, clamped = 0.0, psq = 0.0, gp = 0.0;
    // Unrolled so that several independent loads are in flight per thread
    // (the loop only reads, so the compiler may hoist them).
#pragma unroll 4
    for (u32 j = threadIdx.x; j < c.len; j += blockDim.x) {
        u64 i = c.offset + j;
        float g = keel_grad(t.g, i, BF16);
        float gc = fminf(fmaxf(g, lo), hi);
        raw += (double)g * (double)g;
        clamped += (double)gc * (double)gc;
        if (with_params) {
            float p = t.p[i];
            psq += (double)p * (double)p;
            gp += (double)gc * (double)p;
        }
    }
    double* out = partials + 4 * (u64)blockIdx.x;
    double r = keel_block_sum(raw, scratch);
    if (threadIdx.x == 0) out[0] = r;
    r = keel_block_sum(clamped, scratch);
    if (threadIdx.x == 0) out[1] = r;
    if (with_params) {
        r = keel_block_sum(psq, scratch);
        if (threadIdx.x == 0) out[2] = r;
        r = keel_block_sum(gp, scratch);
        if (threadIdx.x == 0) out[3] = r;
    } else if (threadIdx.x == 0) {
        out[2] = 0.0;
        out[3] = 0.0;
    }
}

extern "C" __global__ void __launch_bounds__(KEEL_BLOCK)
keel_scan_f32(const KeelChunk* chunks, const KeelPtrs* ptrs, double* partials, float lo,
              float hi, int with_params) {
    keel_scan_body<false>(chunks, ptrs, partials, lo, hi, with_params);
}

extern "C" __global__ void __launch_bounds__(KEEL_BLOCK)
keel_scan_bf16(const KeelChunk* chunks, const KeelPtrs* ptrs, double* partials, float lo,
               float hi, int with_params) {
    keel_scan_body<true>(chunks, ptrs, partials, lo, hi, with_params);
}

// What keel_tensor_sums does with a tensor's sums besides storing them.
#define KEEL_SUMS_STORE 0  // just store
#define KEEL_SUMS_LAMB 1   // partials are (||p||^2, ||u||^2): LAMB trust ratio
#define KEEL_SUMS_UCLIP 2  // partials are (., ||u||^2): AdamW update clipping

// Stage 2. Block `i` adds the `width` partial columns of tensor i's chunks
// [chunk_start[i], chunk_start[i+1]) in chunk order and stores them at
// tstats[i * KEEL_T_LEN + slot + k]. In the LAMB and UCLIP modes it then
// writes the factor into the tensor's coefficient `lr_slot`
// (coef = lr * factor, computed in double then rounded once, as the CPU does).
extern "C" __global__ void __launch_bounds__(KEEL_BLOCK)
keel_tensor_sums(const double* partials, int width, const int* chunk_start, double* tstats,
                 int slot, int mode, const double* tparam, float* coef, int lr_slot,
                 double max_rms, const double* global) {
    __shared__ double scratch[32];
    // After a skipped update (any slot but the scan's) there is nothing to sum;
    // the scan's own sums run before the flag of this step exists.
    if (slot != KEEL_T_RAW_SQ && global[KEEL_G_SKIP] != 0.0) return;
    const int i = blockIdx.x;
    const int a = chunk_start[i], b = chunk_start[i + 1];
    double* ts = tstats + (u64)i * KEEL_T_LEN;
    for (int k = 0; k < width; ++k) {
        double v = 0.0;
        for (int c = a + threadIdx.x; c < b; c += blockDim.x) v += partials[(u64)c * 4 + k];
        v = keel_block_sum(v, scratch);
        if (threadIdx.x == 0) ts[slot + k] = v;
    }
    if (threadIdx.x != 0 || mode == KEEL_SUMS_STORE) return;
    const double* tp = tparam + (u64)i * KEEL_P_LEN;
    double factor = 1.0;
    if (mode == KEEL_SUMS_LAMB) {
        if (tp[KEEL_P_TRUST] != 0.0) {
            double pn = sqrt(ts[slot]), un = sqrt(ts[slot + 1]);
            factor = (pn == 0.0 || un == 0.0) ? 1.0 : pn / un;
            ts[KEEL_T_TRUST] = factor;
        }
    } else {
        double numel = tp[KEEL_P_NUMEL] > 1.0 ? tp[KEEL_P_NUMEL] : 1.0;
        double rms = sqrt(ts[slot + 1] / numel);
        factor = max_rms / (rms > max_rms ? rms : max_rms);
        ts[KEEL_T_UCLIP] = factor;
    }
    coef[(u64)i * KEEL_COEF_LEN + lr_slot] = (float)(tp[KEEL_P_LR] * factor);
}

// Stage 3, one block. Global norm = sqrt(sum_i ||g_i||^2) over the clamped
// gradients (NaN if any tensor is non-finite), clip factor c / norm when the
// norm exceeds clip_norm (< 0: no clipping), skip flag. With `lars` it also
// computes every tensor's LARS trust ratio from the scan's sums:
// ||s*g + wd*p||^2 = s^2 gg + 2 s wd gp + wd^2 pp, r = tc ||p|| / (||u|| + eps)
// (1 if either norm is 0), and writes lr * r into coefficient `lr_slot`.
extern "C" __global__ void __launch_bounds__(1024)
keel_global_finalize(double* tstats, int n, double clip_norm, int lars, double tc, double eps,
                     const double* tparam, float* coef, int lr_slot, double* global) {
    __shared__ double scratch[32];
    __shared__ double shared_s;
    __shared__ int shared_skip;
    double sq = 0.0, bad = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const double* ts = tstats + (u64)i * KEEL_T_LEN;
        if (isfinite(ts[KEEL_T_RAW_SQ])) {
            double norm = sqrt(ts[KEEL_T_GRAD_SQ]);
            sq += norm * norm;
        } else {
            bad += 1.0;
        }
        tstats[(u64)i * KEEL_T_LEN + KEEL_T_TRUST] = nan("");
        tstats[(u64)i * KEEL_T_LEN + KEEL_T_UCLIP] = nan("");
    }
    sq = keel_block_sum(sq, scratch);
    bad = keel_block_sum(bad, scratch);
    if (threadIdx.x == 0) {
        double norm = bad > 0.0 ? nan("") : sqrt(sq);
        double s = (clip_norm >= 0.0 && norm > clip_norm) ? clip_norm / norm : 1.0;
        global[KEEL_G_NORM] = norm;
        global[KEEL_G_CLIP] = s;
        global[KEEL_G_SKIP] = bad > 0.0 ? 1.0 : 0.0;
        global[3] = 0.0;
        shared_s = s;
        shared_skip = bad > 0.0;
    }
    __syncthreads();
    if (!lars || shared_skip) return;
    const double s = shared_s;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        double* ts = tstats + (u64)i * KEEL_T_LEN;
        const double* tp = tparam + (u64)i * KEEL_P_LEN;
        double r = 1.0;
        if (tp[KEEL_P_TRUST] != 0.0) {
            double wd = tp[KEEL_P_WD];
            double u2 = s * s * ts[KEEL_T_GRAD_SQ] + 2.0 * s * wd * ts[KEEL_T_GP] +
                        wd * wd * ts[KEEL_T_SCAN_PSQ];
            double un = sqrt(u2 > 0.0 ? u2 : 0.0), pn = sqrt(ts[KEEL_T_SCAN_PSQ]);
            r = (pn == 0.0 || un == 0.0) ? 1.0 : tc * pn / (un + eps);
            ts[KEEL_T_TRUST] = r;
        }
        coef[(u64)i * KEEL_COEF_LEN + lr_slot] = (float)(tp[KEEL_P_LR] * r);
    }
}
