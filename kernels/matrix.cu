// matrix.cu — the elementwise and reduction pieces of the matrix optimizers
// (Muon, Shampoo) around their cuBLAS GEMMs and cuSOLVER eigendecompositions
// (src/backend/cuda/matrix.rs queues them).
//
// Unlike the elementwise optimizers, a matrix step reads the skip flag and
// the clip factor back to the host once, right after the scan: its sequence
// of GEMMs and eigendecompositions depends on shapes and on whether roots are
// due, not on data, so one synchronization per step costs nothing next to
// the matrix work, and these kernels take the clip factor as a plain argument
// and never look at the skip flag.
//
// What each kernel fuses, and why:
// - keel_muon_momentum: gradient preparation (clamp, clip factor), the
//   momentum update and the Nesterov blend in one pass: the GEMMs then read
//   the blended update, which is never materialized on the host side;
// - keel_shampoo_moments: Shampoo's graft accumulator, first moment, bias
//   correction and graft direction (E3, E5, E6), elementwise over the whole
//   tensor in its own layout (they do not depend on the blocking);
// - keel_sumsq_partials + keel_norm_finalize: two norms in one read (the
//   graft direction's and the preconditioned direction's), reduced in a fixed
//   order (no float atomics), left on the device as one scale factor;
// - keel_matrix_apply: the parameter update with weight decay and the
//   partial sums of ||p||^2 and ||dp||^2 for the step statistics;
// - keel_root_input / keel_root_scale / keel_root_commit: the f64 matrix
//   handed to the eigensolver (bias correction and epsilon on the diagonal),
//   the eigenvector columns scaled by (lambda + shift)^(-1/r), and the guarded
//   write of the new root (the old one stays when anything was not finite or
//   the solver failed, as on the CPU).

#include "common.cuh"

// Grid-stride loop over [0, n).
#define KEEL_FOR(i, n) \
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < (n); i += (u64)gridDim.x * blockDim.x)

// Partials of sum(x^2) and sum(y^2) (y may be null): block b writes
// partials[2b] and partials[2b + 1]. The grid size is fixed by the host for a
// given n, so the sums are the same bits every run.
extern "C" __global__ void __launch_bounds__(KEEL_BLOCK)
keel_sumsq_partials(const float* x, const float* y, u64 n, double* partials) {
    __shared__ double scratch[32];
    double sx = 0.0, sy = 0.0;
    KEEL_FOR(i, n) {
        double a = x[i];
        sx += a * a;
        if (y != 0) {
            double b = y[i];
            sy += b * b;
        }
    }
    sx = keel_block_sum(sx, scratch);
    if (threadIdx.x == 0) partials[2 * (u64)blockIdx.x] = sx;
    sy = keel_block_sum(sy, scratch);
    if (threadIdx.x == 0) partials[2 * (u64)blockIdx.x + 1] = sy;
}

#define KEEL_NORM_INV 0    // out = 1 / max(||x||, eps): Muon's normalization
#define KEEL_NORM_RATIO 1  // out = ||x|| / (||y|| + eps): Shampoo's graft scale

// The two column sums of `count` partial pairs, added in a fixed order
// (valid in thread 0).
__device__ __forceinline__ void keel_pair_sums(const double* partials, int count, double* scratch,
                                               double* s0, double* s1) {
    double a = 0.0, b = 0.0;
    for (int k = threadIdx.x; k < count; k += blockDim.x) {
        a += partials[2 * k];
        b += partials[2 * k + 1];
    }
    *s0 = keel_block_sum(a, scratch);
    *s1 = keel_block_sum(b, scratch);
}

// One block: adds `count` partial pairs in order and writes one f32 factor.
extern "C" __global__ void __launch_bounds__(KEEL_BLOCK)
keel_norm_finalize(const double* partials, int count, int mode, double eps, float* out) {
    __shared__ double scratch[32];
    double sx, sy;
    keel_pair_sums(partials, count, scratch, &sx, &sy);
    if (threadIdx.x == 0) {
        double nx = sqrt(sx), ny = sqrt(sy);
        double v = mode == KEEL_NORM_INV ? 1.0 / (nx > eps ? nx : eps) : nx / (ny + eps);
        out[0] = (float)v;
    }
}

// One block: adds `count` partial pairs in order into out[0], out[1] (the
// per-tensor ||p||^2 and ||dp||^2 statistics slots).
extern "C" __global__ void __launch_bounds__(KEEL_BLOCK)
keel_sums_finalize(const double* partials, int count, double* out) {
    __shared__ double scratch[32];
    double s0, s1;
    keel_pair_sums(partials, count, scratch, &s0, &s1);
    if (threadIdx.x == 0) {
        out[0] = s0;
        out[1] = s1;
    }
}

// x *= *factor (a factor left on the device by keel_norm_finalize).
extern "C" __global__ void __launch_bounds__(KEEL_BLOCK)
keel_scale_by(float* x, u64 n, const float* factor) {
    const float f = *factor;
    KEEL_FOR(i, n) x[i] *= f;
}

// Muon's momentum (src/optim/muon.rs): b += (1-momentum)(g - b);
// u = g + momentum (b - g) with Nesterov, else b; g clamped and clipped.
extern "C" __global__ void __launch_bounds__(KEEL_BLOCK)
keel_muon_momentum(const float* g, float* buf, float* u, u64 n, float lo, float hi, float s,
                   float keep, float momentum, int nesterov) {
    KEEL_FOR(i, n) {
        float gi = keel_prep(g[i], lo, hi, s);
        float b = buf[i];
        b = b + keep * (gi - b);
        buf[i] = b;
        u[i] = nesterov ? gi + momentum * (b - gi) : b;
    }
}

#define KEEL_GRAFT_NONE 0
#define KEEL_GRAFT_ADAGRAD 1
#define KEEL_GRAFT_ADAM 2

// Shampoo (E3) graft accumulator, (E5) first moment with bias correction and
// (E6) graft direction, in the order and precision of src/optim/shampoo.rs.
// Writes g_hat (the preconditioner's input) and, when grafting, the graft
// direction dg.
extern "C" __global__ void __launch_bounds__(KEEL_BLOCK)
keel_shampoo_moments(const float* g, float* m, float* v, float* g_hat, float* dg, u64 n,
                     float lo, float hi, float s, int graft, float graft_beta2, float graft_bc2,
                     float graft_eps, int use_m, float beta1, float bc1) {
    KEEL_FOR(i, n) {
        float gi = keel_prep(g[i], lo, hi, s);
        float vi = v[i];
        if (graft == KEEL_GRAFT_ADAGRAD) {
            vi += gi * gi;
        } else if (graft == KEEL_GRAFT_ADAM) {
            vi = graft_beta2 * vi + (1.0f - graft_beta2) * gi * gi;
        }
        float gh = gi;
        if (use_m) {
            float mi = beta1 * m[i] + (1.0f - beta1) * gi;
            m[i] = mi;
            gh = mi / bc1;
        }
        g_hat[i] = gh;
        if (graft == KEEL_GRAFT_ADAGRAD) {
            v[i] = vi;
            dg[i] = gh / (sqrtf(vi) + graft_eps);
        } else if (graft == KEEL_GRAFT_ADAM) {
            v[i] = vi;
            dg[i] = gh / (sqrtf(vi / graft_bc2) + graft_eps);
        }
    }
}

#define KEEL_APPLY_MUON 0     // p = p * a - b * d        (a = 1 - lr wd, b = lr * shape scale)
#define KEEL_APPLY_SHAMPOO 1  // p = p - a * (d + b * p)  (a = lr, b = wd)

// The parameter update, with partials of ||p||^2 (before) and ||dp||^2.
extern "C" __global__ void __launch_bounds__(KEEL_BLOCK)
keel_matrix_apply(float* p, const float* d, u64 n, int mode, float a, float b, double* partials) {
    __shared__ double scratch[32];
    double psq = 0.0, usq = 0.0;
    KEEL_FOR(i, n) {
        float old = p[i];
        float nw = mode == KEEL_APPLY_MUON ? old * a - b * d[i] : old - a * (d[i] + b * old);
        p[i] = nw;
        double change = (double)(nw - old);
        psq += (double)old * (double)old;
        usq += change * change;
    }
    psq = keel_block_sum(psq, scratch);
    if (threadIdx.x == 0) partials[2 * (u64)blockIdx.x] = psq;
    usq = keel_block_sum(usq, scratch);
    if (threadIdx.x == 0) partials[2 * (u64)blockIdx.x + 1] = usq;
}

// A Shampoo block out of its tensor, in row-major block order: run r of
// `run_len` contiguous tensor elements starts at runs[r]. With `prep` the
// gradient preparation (clamp, clip factor) is applied on the way.
extern "C" __global__ void __launch_bounds__(KEEL_BLOCK)
keel_gather(const float* x, float* out, const u64* runs, u64 nruns, u32 run_len, int prep,
            float lo, float hi, float s) {
    KEEL_FOR(i, nruns * run_len) {
        float v = x[runs[i / run_len] + i % run_len];
        out[i] = prep ? keel_prep(v, lo, hi, s) : v;
    }
}

// The inverse of keel_gather (no preparation).
extern "C" __global__ void __launch_bounds__(KEEL_BLOCK)
keel_scatter(const float* blk, float* x, const u64* runs, u64 nruns, u32 run_len) {
    KEEL_FOR(i, nruns * run_len) x[runs[i / run_len] + i % run_len] = blk[i];
}

// Copies the lower triangle of the n x n column-major matrix onto its upper
// triangle, so factors are exactly symmetric (as the CPU keeps them) whatever
// order the GEMM summed in.
extern "C" __global__ void __launch_bounds__(KEEL_BLOCK)
keel_mirror_lower(float* a, u32 n) {
    KEEL_FOR(idx, (u64)n * n) {
        u64 i = idx % n, j = idx / n;  // row i, column j
        if (i < j) a[idx] = a[j + i * (u64)n];
    }
}

// The eigensolver's input: A = L / bias2 + eps I in f64 (L symmetric, f32).
// Raises *bad (cleared by the host before) when L has a non-finite entry.
extern "C" __global__ void __launch_bounds__(KEEL_BLOCK)
keel_root_input(const float* l, double* a, u32 n, double bias2, double eps, int* bad) {
    KEEL_FOR(idx, (u64)n * n) {
        u64 i = idx % n, j = idx / n;
        double v = (double)l[idx] / bias2 + (i == j ? eps : 0.0);
        if (!isfinite(v)) *bad = 1;
        a[idx] = v;
    }
}

// Replaces the solver's input with the identity when *bad is raised, so
// no non-finite matrix reaches the eigensolver.
extern "C" __global__ void __launch_bounds__(KEEL_BLOCK)
keel_root_guard(double* a, u32 n, const int* bad) {
    if (*bad == 0) return;
    KEEL_FOR(idx, (u64)n * n) a[idx] = (idx % n == idx / n) ? 1.0 : 0.0;
}

// Qs[:, c] = Q[:, c] * (w[c] + shift)^exponent with the epsilon shift of
// SHAMPOO.md (E3): shift = eps - w[0] when the smallest eigenvalue w[0]
// (ascending order) is below eps. Raises *bad on a non-finite factor.
extern "C" __global__ void __launch_bounds__(KEEL_BLOCK)
keel_root_scale(const double* q, const double* w, double* qs, u32 n, double eps, double exponent,
                int* bad) {
    const double lo = w[0];
    const double shift = lo < eps ? eps - lo : 0.0;
    KEEL_FOR(idx, (u64)n * n) {
        double f = pow(w[idx / n] + shift, exponent);
        if (!isfinite(f)) *bad = 1;
        qs[idx] = q[idx] * f;
    }
}

// One block: writes the new root (f64 product Qs Q^T, its lower triangle
// mirrored, rounded to f32) unless the eigensolver failed (info != 0), a
// factor was flagged, or an entry is not finite in f32; then the previous
// root stays and *failures counts it.
extern "C" __global__ void __launch_bounds__(1024)
keel_root_commit(const double* r, float* root, u32 n, const int* info, const int* bad,
                 int* failures) {
    __shared__ int ok;
    if (threadIdx.x == 0) ok = (*info == 0 && *bad == 0);
    __syncthreads();
    const u64 n2 = (u64)n * n;
    int fine = 1;
    for (u64 idx = threadIdx.x; idx < n2; idx += blockDim.x) {
        u64 i = idx % n, j = idx / n;
        double v = i >= j ? r[idx] : r[j + i * (u64)n];
        if (!isfinite((float)v)) fine = 0;
    }
    if (!fine) ok = 0;  // every writer stores the same value
    __syncthreads();
    if (!ok) {
        if (threadIdx.x == 0) *failures += 1;
        return;
    }
    for (u64 idx = threadIdx.x; idx < n2; idx += blockDim.x) {
        u64 i = idx % n, j = idx / n;
        root[idx] = (float)(i >= j ? r[idx] : r[j + i * (u64)n]);
    }
}
