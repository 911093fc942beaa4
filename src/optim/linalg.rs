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

/// Appends the row-major `n x n` identity to `out`.
pub(crate) fn push_identity<T: Real>(out: &mut Vec<T>, n: usize) {
    out.extend((0..n * n).map(|i| {
        if i % (n + 1) == 0 {
            T::one()
        } else {
            T::zero()
        }
    }));
}

/// The state of a matrix optimizer's parameter of `numel` elements: two
/// moment buffers, zero factors and the given identity matrices (roots or
/// bases), the factors laid out like them.
pub(crate) fn matrix_state<T: Real>(numel: usize, identities: Vec<T>) -> Vec<Vec<T>> {
    vec![
        vec![T::zero(); numel],
        vec![T::zero(); numel],
        vec![T::zero(); identities.len()],
        identities,
    ]
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
/// upper triangle, in 64 x 64 tiles so the strided side of the copy stays in
/// L1 (a plain column loop misses the cache on every element of a
/// 1024-wide factor).
pub(crate) fn mirror_lower<T: Real>(m: &mut [T], n: usize) {
    const TILE: usize = 64;
    assert_eq!(m.len(), n * n, "mirror_lower: buffer is not n x n");
    for i0 in (0..n).step_by(TILE) {
        for j0 in (i0..n).step_by(TILE) {
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
        // A nested call on the same thread (none today) gets its own buffer.
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

/// Workspace for an `n x n` matrix of `T`.
pub(crate) fn square_scratch<T>(n: usize) -> StackReq {
    buffer_scratch::<T>(n * n)
}

/// An `n x n` column-major matrix in the workspace, zeroed, then column `j`
/// (a contiguous slice of `n` values) filled by `fill(j, column)`. Filling
/// whole columns keeps the writes and the sources' reads sequential: a
/// per-entry closure over a flat index costs an integer division per entry
/// and, reading a row-major source, a cache miss per entry at order 1024.
pub(crate) fn square_in<'s, T: Real>(
    n: usize,
    stack: &'s mut MemStack,
    fill: impl Fn(usize, &mut [T]),
) -> (DynArray<'s, T>, &'s mut MemStack) {
    let (mut m, stack) = buffer_in(n * n, stack, |_| T::zero());
    if n > 0 {
        for (j, column) in m.chunks_exact_mut(n).enumerate() {
            fill(j, column);
        }
    }
    (m, stack)
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

/// Eigenvalues (ascending) and eigenvectors (columns) of a symmetric matrix,
/// the vectors in a workspace.
pub(crate) struct SymEigen<'s, T> {
    /// Eigenvalues, ascending.
    pub values: Vec<f64>,
    /// Orthonormal eigenvectors, column-major, one per column in the order
    /// of `values`.
    vectors: DynArray<'s, T>,
}

impl<T: Real> SymEigen<'_, T> {
    /// The eigenvectors as columns.
    pub fn vectors(&self) -> MatRef<'_, T> {
        let n = self.values.len();
        MatRef::from_column_major_slice(&self.vectors, n, n)
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
    if (0..n).any(|j| (j..n).any(|i| !a[(i, j)].is_finite())) {
        return (None, stack);
    }
    let (mut vectors, stack) = square_in(n, stack, |_, _| {});
    let (mut values, stack) = buffer_in(n, stack, |_| T::zero());
    let solved = evd::self_adjoint_evd(
        a,
        DiagMut::from_slice_mut(&mut values),
        Some(MatMut::from_column_major_slice_mut(&mut vectors, n, n)),
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
/// (`n x n`); `false` (and `out` unspecified) when a value is not finite.
/// The eigenvectors may be in another precision `E` (f64 for Shampoo).
pub(crate) fn spectral_apply<E: Real, T: Real>(
    eig: &SymEigen<'_, E>,
    f: impl Fn(f64) -> f64,
    out: &mut [T],
    stack: &mut MemStack,
) -> bool {
    let n = eig.values.len();
    let scale: Vec<f64> = eig.values.iter().map(|&m| f(m)).collect();
    if scale.iter().any(|s| !s.is_finite()) {
        return false;
    }
    let q = eig.vectors();
    let q_column = |i: usize| &eig.vectors[i * n..(i + 1) * n];
    let (q_scaled, stack) = square_in(n, stack, |i, column| {
        for (c, &x) in column.iter_mut().zip(q_column(i)) {
            *c = T::from_f64x(x.to_f64x() * scale[i]);
        }
    });
    // The eigenvectors as they are when already in `T` (no copy).
    let converted;
    let q_t: MatRef<'_, T> = if TypeId::of::<E>() == TypeId::of::<T>() {
        // SAFETY: `E` and `T` are the same type, so this is `q` itself.
        unsafe {
            MatRef::from_raw_parts(q.as_ptr().cast::<T>(), n, n, q.row_stride(), q.col_stride())
        }
    } else {
        converted = square_in(n, stack, |i, column| {
            for (c, &x) in column.iter_mut().zip(q_column(i)) {
                *c = T::from_f64x(x.to_f64x());
            }
        })
        .0;
        MatRef::from_column_major_slice(&converted, n, n)
    };
    matmul_lower(
        view_mut(out, n, n),
        Accum::Replace,
        MatRef::from_column_major_slice(&q_scaled, n, n),
        q_t.transpose(),
        T::one(),
        Par::Seq,
    );
    mirror_lower(out, n);
    out.iter().all(|x| x.is_finite())
}
