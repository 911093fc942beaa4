//! Dense linear algebra shared by the matrix optimizers (Muon, Shampoo,
//! SOAP), all through faer: row-major views of flat state buffers, Gram
//! matrices accumulated by GEMM, and f64 symmetric eigendecompositions.
//!
//! Each call runs sequentially (`Par::Seq`): the optimizers parallelize over
//! blocks and tensors instead, which keeps both cores busy on the many
//! mid-sized matrices of an LLM where faer's internal parallelism does not
//! pay (a 1024 x 1024 eigendecomposition was slower on two threads than on
//! one on the development machine).

use std::any::TypeId;
use std::cell::RefCell;
use std::mem::MaybeUninit;

use faer::diag::DiagMut;
use faer::dyn_stack::{DynArray, MemBuffer, MemStack, StackReq};
use faer::linalg::evd::{self, ComputeEigenvectors};
use faer::linalg::matmul::matmul;
use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::{Accum, MatMut, MatRef, Par};

use crate::real::Real;

/// Row-major `rows x cols` view of a flat buffer.
pub(crate) fn view<T: Real>(x: &[T], rows: usize, cols: usize) -> MatRef<'_, T> {
    MatRef::from_row_major_slice(x, rows, cols)
}

/// Mutable row-major `rows x cols` view of a flat buffer.
pub(crate) fn view_mut<T: Real>(x: &mut [T], rows: usize, cols: usize) -> MatMut<'_, T> {
    MatMut::from_row_major_slice_mut(x, rows, cols)
}

/// The two zero moment buffers of a matrix optimizer's parameter of `numel`
/// elements: allocated before anything is derived from the shape, so an
/// impossible size fails here, cheaply.
pub(crate) fn moment_buffers<T: Real>(numel: usize, what: &str) -> crate::Result<[Vec<T>; 2]> {
    use crate::memory::try_zeros;
    Ok([try_zeros(numel, what)?, try_zeros(numel, what)?])
}

/// The state of a matrix optimizer's parameter: its two `moments`, then zero
/// factors and identity matrices (roots or bases) of the sizes `dims`, laid
/// out alike, one `n x n` row-major matrix after another. `what` names the
/// state in a [`crate::KeelError::Memory`] error.
pub(crate) fn matrix_state<T: Real>(
    moments: [Vec<T>; 2],
    dims: &[usize],
    what: &str,
) -> crate::Result<Vec<Vec<T>>> {
    use crate::memory::try_zeros;
    let len = dims
        .iter()
        .try_fold(0usize, |len, &n| n.checked_mul(n)?.checked_add(len))
        .ok_or_else(|| crate::KeelError::Memory {
            what: what.to_string(),
            needed: u128::MAX,
            available: crate::memory::available_memory(),
        })?;
    let mut identities = try_zeros(len, what)?;
    set_identities(&mut identities, dims);
    let [first, second] = moments;
    Ok(vec![first, second, try_zeros(len, what)?, identities])
}

/// Writes one identity per `n` of `dims` into `slot` (the `n x n` matrices
/// one after the other; off-diagonal entries must already be zero).
fn set_identities<T: Real>(slot: &mut [T], dims: &[usize]) {
    let mut at = 0;
    for &n in dims {
        for i in 0..n {
            slot[at + i * (n + 1)] = T::one();
        }
        at += n * n;
    }
}

/// Puts a [`matrix_state`] back to how it started, in place: moments and
/// factor statistics zero, roots or eigenbases identities.
pub(crate) fn reset_matrix_state<T: Real>(state: &mut [Vec<T>], dims: &[usize]) {
    for slot in state.iter_mut() {
        slot.fill(T::zero());
    }
    if let Some(last) = state.get_mut(3) {
        set_identities(last, dims);
    }
}

/// The mode-`j` geometry of a row-major tensor with `dims`: `(outer, n, inner)`.
pub(crate) fn around(dims: &[usize], j: usize) -> (usize, usize, usize) {
    (
        dims[..j].iter().product(),
        dims[j],
        dims[j + 1..].iter().product(),
    )
}

/// `dst (+)= alpha * a b` computing only the lower triangle of the square
/// `dst` (the upper triangle is left as it was): half the flops of a GEMM
/// for products known to be symmetric (Gram matrices, `Q D Q^T`).
pub(crate) fn matmul_lower<T: Real>(
    dst: MatMut<'_, T>,
    accum: Accum,
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    alpha: T,
    par: Par,
) {
    triangular::matmul(
        dst,
        BlockStructure::TriangularLower,
        accum,
        a,
        BlockStructure::Rectangular,
        b,
        BlockStructure::Rectangular,
        alpha,
        par,
    );
}

/// Copies the lower triangle of the row-major `n x n` matrix `m` onto its
/// upper triangle in 8 x 8 tiles, a column of tiles at a time: the eight
/// source rows of a tile fit in one L1 set even at a power-of-two stride
/// (larger tiles of a 1024-wide factor evict each other), and the source
/// rows stay cached while their column of tiles is written.
pub(crate) fn mirror_lower<T: Real>(m: &mut [T], n: usize) {
    const TILE: usize = 8;
    assert_eq!(m.len(), n * n, "mirror_lower: buffer is not n x n");
    for j0 in (0..n).step_by(TILE) {
        for i0 in (0..=j0).step_by(TILE) {
            for i in i0..(i0 + TILE).min(n) {
                for j in (j0.max(i + 1))..(j0 + TILE).min(n) {
                    m[i * n + j] = m[j * n + i];
                }
            }
        }
    }
}

/// `gram += alpha * sum_o X_o X_o^T` where `X_o` is the `n x inner` mode-`j`
/// slice `o` of `x` (so `gram` is `n x n`, row-major and symmetric). The
/// last mode is one product (`X^T X` of the `outer x n` matrix), the first
/// mode one too; only the lower triangle is computed, then mirrored.
pub(crate) fn mode_gram_add<T: Real>(gram: &mut [T], x: &[T], dims: &[usize], j: usize, alpha: T) {
    let (outer, n, inner) = around(dims, j);
    let mut g = view_mut(gram, n, n);
    if inner == 1 {
        let xm = view(x, outer, n);
        matmul_lower(g.as_mut(), Accum::Add, xm.transpose(), xm, alpha, Par::Seq);
    } else {
        for o in 0..outer {
            let xo = view(&x[o * n * inner..(o + 1) * n * inner], n, inner);
            matmul_lower(g.as_mut(), Accum::Add, xo, xo.transpose(), alpha, Par::Seq);
        }
    }
    mirror_lower(gram, n);
}

/// `y = x x_j p`: every mode-`j` fibre of `x` multiplied by the `n x n`
/// matrix `p` (`Y_o = P X_o` per slice; the last mode is `Y = X P^T`, one
/// GEMM). `y` must have `x`'s length.
pub(crate) fn mode_product<T: Real>(
    y: &mut [T],
    x: &[T],
    dims: &[usize],
    j: usize,
    p: MatRef<'_, T>,
) {
    let (outer, n, inner) = around(dims, j);
    if inner == 1 {
        let ym = view_mut(y, outer, n);
        matmul(
            ym,
            Accum::Replace,
            view(x, outer, n),
            p.transpose(),
            T::one(),
            Par::Seq,
        );
        return;
    }
    for o in 0..outer {
        let range = o * n * inner..(o + 1) * n * inner;
        let xo = view(&x[range.clone()], n, inner);
        let yo = view_mut(&mut y[range], n, inner);
        matmul(yo, Accum::Replace, p, xo, T::one(), Par::Seq);
    }
}

thread_local! {
    /// Each thread's workspace and the request it was sized for.
    static WORKSPACE: RefCell<(StackReq, MemBuffer)> =
        RefCell::new((StackReq::EMPTY, MemBuffer::new(StackReq::EMPTY)));
}

/// Runs `f` on a workspace of at least `req`, kept per thread between calls.
/// A recomputing Shampoo step runs hundreds of eigendecompositions, each with
/// megabytes of matrices and solver workspace; allocated afresh every time,
/// they make the allocator hand pages back to the kernel and fault them in
/// again.
pub(crate) fn with_workspace<R>(req: StackReq, f: impl FnOnce(&mut MemStack) -> R) -> R {
    WORKSPACE.with(|cell| {
        // A nested call on the same thread gets its own buffer: rayon may
        // run another job on a thread that holds its workspace across a
        // parallel loop (Shampoo's accumulate, over a block's factors).
        let Ok(mut guard) = cell.try_borrow_mut() else {
            return f(MemStack::new(&mut MemBuffer::new(req)));
        };
        let (have, buffer) = &mut *guard;
        if have.size_bytes() < req.size_bytes() || have.align_bytes() < req.align_bytes() {
            *buffer = MemBuffer::new(req);
            *have = req;
        }
        f(MemStack::new(buffer))
    })
}

/// Alignment of workspace matrices: a cache line, as faer's own.
const ALIGN: usize = 64;

/// Workspace for a buffer of `len` values of `T`.
pub(crate) fn buffer_scratch<T>(len: usize) -> StackReq {
    StackReq::new_aligned::<T>(len, ALIGN)
}

/// A buffer of `len` values in the workspace, value `k` from `f`.
pub(crate) fn buffer_in<'s, T: Real>(
    len: usize,
    stack: &'s mut MemStack,
    f: impl Fn(usize) -> T,
) -> (DynArray<'s, T>, &'s mut MemStack) {
    stack.make_aligned_with(len, ALIGN, f)
}

/// Column stride of the workspace matrices that feed GEMMs: `n` rounded up
/// to whole cache lines, plus one line when that is a multiple of 256
/// bytes. At such strides (1024 or 384 f32 columns: 4096 or 1536 bytes)
/// the columns that the GEMM kernels pack together map to a few cache sets
/// and evict each other; the extra line staggers them (the inverse root
/// `Q D Q^T` of order 1024 took about 20% less time in a micro-benchmark on
/// the development machine).
pub(crate) fn padded_stride<T>(n: usize) -> usize {
    let size = std::mem::size_of::<T>().max(1);
    let line = (ALIGN / size).max(1);
    let stride = n.div_ceil(line) * line;
    if (stride * size).is_multiple_of(256) {
        stride + line
    } else {
        stride
    }
}

/// Workspace for an `n x n` matrix of `T` with [`padded_stride`] columns.
pub(crate) fn square_scratch<T>(n: usize) -> StackReq {
    buffer_scratch::<T>(padded_stride::<T>(n) * n)
}

/// An `n x n` column-major matrix in the workspace with [`padded_stride`]
/// columns, column `j` (a contiguous slice of `n` values) zeroed, padding
/// included, then filled by `fill(j, column)`. Filling whole columns keeps
/// the writes and the sources' reads sequential: a per-entry closure over a
/// flat index costs an integer division per entry and, reading a row-major
/// source, a cache miss per entry at order 1024. Each column is zeroed just
/// before its fill, while it is in L1, rather than the whole matrix in a
/// separate pass through memory.
pub(crate) fn square_in<T: Real>(
    n: usize,
    stack: &mut MemStack,
    fill: impl Fn(usize, &mut [T]),
) -> (MatRef<'_, T>, &mut MemStack) {
    let stride = padded_stride::<T>(n);
    let (raw, stack) = stack.make_aligned_uninit::<T>(stride * n, ALIGN);
    if n > 0 {
        for (j, column) in raw.chunks_exact_mut(stride).enumerate() {
            column.fill(MaybeUninit::new(T::zero()));
            // SAFETY: every element of `column` was just written.
            let column = unsafe { &mut *(column as *mut [MaybeUninit<T>] as *mut [T]) };
            fill(j, &mut column[..n]);
        }
    }
    // SAFETY: every element was written, column by column, above.
    let m = unsafe { &*(raw as *mut [MaybeUninit<T>] as *const [T]) };
    (
        MatRef::from_column_major_slice_with_stride(m, n, n, stride),
        stack,
    )
}

/// Fills `column` with column `j` of the symmetric `n x n` matrix stored
/// row-major in `sym`, mapped by `f`: row `j` read in order, which is column
/// `j` because the matrix is symmetric (the optimizers' factors are kept
/// exactly symmetric: their lower triangle is computed, then mirrored).
pub(crate) fn symmetric_column<S: Copy, T>(
    sym: &[S],
    j: usize,
    column: &mut [T],
    f: impl Fn(S) -> T,
) {
    let n = column.len();
    for (c, &x) in column.iter_mut().zip(&sym[j * n..(j + 1) * n]) {
        *c = f(x);
    }
}

/// Whether the lower triangle of the square `a` is finite. Contiguous
/// columns are checked as slices by counting their non-finite entries (a
/// count without early exit vectorizes), others entry by entry.
fn lower_is_finite<T: Real>(a: MatRef<'_, T>) -> bool {
    let n = a.nrows();
    (0..n).all(|j| match a.col(j).try_as_col_major() {
        Some(column) => {
            let below = &column.as_slice()[j..];
            below.iter().filter(|x| !x.is_finite()).count() == 0
        }
        None => (j..n).all(|i| a[(i, j)].is_finite()),
    })
}

/// Eigenvalues (ascending) and eigenvectors (columns) of a symmetric matrix,
/// the vectors in a workspace.
pub(crate) struct SymEigen<'s, T> {
    /// Eigenvalues, ascending.
    pub values: Vec<f64>,
    /// Orthonormal eigenvectors, column-major with [`padded_stride`]
    /// columns (zero padding), one per column in the order of `values`.
    vectors: DynArray<'s, T>,
}

impl<T: Real> SymEigen<'_, T> {
    /// The eigenvectors as columns.
    pub fn vectors(&self) -> MatRef<'_, T> {
        let n = self.values.len();
        MatRef::from_column_major_slice_with_stride(&self.vectors, n, n, padded_stride::<T>(n))
    }

    /// Eigenvector `i`.
    fn vector(&self, i: usize) -> &[T] {
        let n = self.values.len();
        let start = i * padded_stride::<T>(n);
        &self.vectors[start..start + n]
    }
}

/// Workspace of [`sym_eigen`] for order `n`.
pub(crate) fn sym_eigen_scratch<T: Real>(n: usize) -> StackReq {
    square_scratch::<T>(n)
        .and(buffer_scratch::<T>(n))
        .and(evd::self_adjoint_evd_scratch::<T>(
            n,
            ComputeEigenvectors::Yes,
            Par::Seq,
            Default::default(),
        ))
}

/// The eigendecomposition of the symmetric `a` in `T`'s precision (its
/// lower triangle is read), or `None` when `a` has a non-finite entry or
/// the solver fails; with the rest of the workspace.
pub(crate) fn sym_eigen<'s, T: Real>(
    a: MatRef<'_, T>,
    stack: &'s mut MemStack,
) -> (Option<SymEigen<'s, T>>, &'s mut MemStack) {
    let n = a.nrows();
    if !lower_is_finite(a) {
        return (None, stack);
    }
    let stride = padded_stride::<T>(n);
    let (mut vectors, stack) = buffer_in(stride * n, stack, |_| T::zero());
    let (mut values, stack) = buffer_in(n, stack, |_| T::zero());
    let solved = evd::self_adjoint_evd(
        a,
        DiagMut::from_slice_mut(&mut values),
        Some(MatMut::from_column_major_slice_with_stride_mut(
            &mut vectors,
            n,
            n,
            stride,
        )),
        Par::Seq,
        stack,
        Default::default(),
    );
    let values: Vec<f64> = values.iter().map(|v| v.to_f64x()).collect();
    if solved.is_err() || values.iter().any(|v| !v.is_finite()) {
        return (None, stack);
    }
    (Some(SymEigen { values, vectors }), stack)
}

/// Workspace of [`spectral_apply`] for order `n` into `T`.
pub(crate) fn spectral_apply_scratch<T>(n: usize) -> StackReq {
    square_scratch::<T>(n).and(square_scratch::<T>(n))
}

/// `Q diag(f(mu)) Q^T` in precision `T`, written row-major into `out`
/// (`n x n`); `false`, with `out` untouched, when a scale `f(mu)` is not
/// finite or could overflow `T`, or an eigenvector is not finite. The
/// eigenvectors may be in another precision `E` (f64 for Shampoo).
///
/// The checks come first so that callers can write into the matrix they
/// keep: with orthonormal `Q`, every entry is a weighted mean-like sum
/// `sum_k q_ik s_k q_jk` bounded by `max |s_k|` (Cauchy-Schwarz), so finite
/// vectors and scales below a quarter of `T`'s largest value give a finite
/// result.
pub(crate) fn spectral_apply<E: Real, T: Real>(
    eig: &SymEigen<'_, E>,
    f: impl Fn(f64) -> f64,
    out: &mut [T],
    stack: &mut MemStack,
) -> bool {
    let n = eig.values.len();
    let scale: Vec<f64> = eig.values.iter().map(|&m| f(m)).collect();
    let bound = T::max_value().to_f64x() / 4.0;
    // `is_finite` first: a NaN scale fails no comparison.
    if scale.iter().any(|s| !s.is_finite() || s.abs() > bound) {
        return false;
    }
    if eig.vectors.iter().filter(|x| !x.is_finite()).count() > 0 {
        return false;
    }
    let q = eig.vectors();
    // Padded columns (see `padded_stride`) for both GEMM operands.
    let (q_scaled, stack) = square_in(n, stack, |i, column| {
        for (c, &x) in column.iter_mut().zip(eig.vector(i)) {
            *c = T::from_f64x(x.to_f64x() * scale[i]);
        }
    });
    // The eigenvectors as they are when already in `T` (no copy).
    let q_t: MatRef<'_, T> = if TypeId::of::<E>() == TypeId::of::<T>() {
        // SAFETY: `E` and `T` are the same type, so this is `q` itself.
        unsafe {
            MatRef::from_raw_parts(q.as_ptr().cast::<T>(), n, n, q.row_stride(), q.col_stride())
        }
    } else {
        square_in(n, stack, |i, column| {
            for (c, &x) in column.iter_mut().zip(eig.vector(i)) {
                *c = T::from_f64x(x.to_f64x());
            }
        })
        .0
    };
    matmul_lower(
        view_mut(out, n, n),
        Accum::Replace,
        q_scaled,
        q_t.transpose(),
        T::one(),
        Par::Seq,
    );
    mirror_lower(out, n);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padded_stride_is_whole_lines_off_multiples_of_256_bytes() {
        for (n, f32_stride, f64_stride) in [
            (1, 16, 8),
            (65, 80, 72),
            (384, 400, 392),
            (1008, 1008, 1008),
            (1024, 1040, 1032),
        ] {
            assert_eq!(padded_stride::<f32>(n), f32_stride, "f32, n {n}");
            assert_eq!(padded_stride::<f64>(n), f64_stride, "f64, n {n}");
        }
    }

    #[test]
    fn eigenvectors_in_padded_columns_reconstruct_the_matrix() {
        // A symmetric 37 x 37 matrix: its stride is padded in f32 and f64.
        let n = 37;
        let a: Vec<f64> = (0..n * n)
            .map(|k| {
                let (i, j) = (k % n, k / n);
                ((i * j) % 7) as f64 + if i == j { 10.0 } else { 0.0 }
            })
            .collect();
        with_workspace(sym_eigen_scratch::<f64>(n), |stack| {
            let (eig, _) = sym_eigen(MatRef::from_column_major_slice(&a, n, n), stack);
            let eig = eig.expect("a finite symmetric matrix decomposes");
            let q = eig.vectors();
            assert_eq!(q.col_stride() as usize, padded_stride::<f64>(n));
            for i in 0..n {
                for j in 0..n {
                    let sum: f64 = (0..n).map(|k| q[(i, k)] * eig.values[k] * q[(j, k)]).sum();
                    assert!((sum - a[j * n + i]).abs() < 1e-9, "({i}, {j}): {sum}");
                }
            }
        });
    }

    #[test]
    fn mirror_lower_copies_every_lower_entry_to_its_transpose() {
        for n in [0, 1, 7, 8, 9, 17, 24, 33] {
            let original: Vec<f64> = (0..n * n).map(|k| k as f64).collect();
            let mut m = original.clone();
            mirror_lower(&mut m, n);
            for i in 0..n {
                for j in 0..n {
                    let from = if j <= i { i * n + j } else { j * n + i };
                    assert_eq!(m[i * n + j], original[from], "n {n}, entry ({i}, {j})");
                }
            }
        }
    }

    #[test]
    fn lower_is_finite_reads_only_the_lower_triangle() {
        for n in [1, 5, 16] {
            for layout_col_major in [true, false] {
                for (i, j) in [(0, 0), (n - 1, 0), (n - 1, n - 1), (n / 2, n / 3)] {
                    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                        let mut m = vec![1.0f32; n * n];
                        // Entry (i, j) of the lower triangle, in storage.
                        let at = |i: usize, j: usize| {
                            if layout_col_major {
                                j * n + i
                            } else {
                                i * n + j
                            }
                        };
                        m[at(i, j)] = bad;
                        let view = if layout_col_major {
                            MatRef::from_column_major_slice(&m, n, n)
                        } else {
                            MatRef::from_row_major_slice(&m, n, n)
                        };
                        assert!(!lower_is_finite(view), "n {n}, ({i}, {j}) = {bad}");
                        if i != j {
                            // The same value above the diagonal is not read.
                            m[at(i, j)] = 1.0;
                            m[at(j, i)] = bad;
                            let view = if layout_col_major {
                                MatRef::from_column_major_slice(&m, n, n)
                            } else {
                                MatRef::from_row_major_slice(&m, n, n)
                            };
                            assert!(lower_is_finite(view), "n {n}, ({j}, {i}) = {bad}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn spectral_apply_leaves_out_untouched_when_a_scale_overflows() {
        let a = [4.0f32, 1.0, 1.0, 3.0];
        with_workspace(
            sym_eigen_scratch::<f32>(2).and(spectral_apply_scratch::<f32>(2)),
            |stack| {
                let (eig, stack) = sym_eigen(MatRef::from_column_major_slice(&a, 2, 2), stack);
                let eig = eig.expect("a finite symmetric matrix decomposes");
                let mut out = [7.0f32; 4];
                // 1e38 is below f32::MAX but above a quarter of it.
                assert!(!spectral_apply(&eig, |_| 1e38, &mut out, stack));
                assert_eq!(out, [7.0; 4]);
                assert!(spectral_apply(&eig, |m| m, &mut out, stack));
                for (x, y) in out.iter().zip(a) {
                    assert!((x - y).abs() < 1e-5, "{out:?}");
                }
            },
        );
    }
}
