use faer::linalg::matmul::matmul;
use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::{Accum, Mat, Par};
use std::time::Instant;
fn eigh<T: faer::traits::RealField + Copy>(a: &Mat<T>) {
    let n = a.nrows();
    let mut u = Mat::<T>::zeros(n, n);
    let mut sd = faer::diag::Diag::<T>::zeros(n);
    let mut buf =
        faer::dyn_stack::MemBuffer::new(faer::linalg::evd::self_adjoint_evd_scratch::<T>(
            n,
            faer::linalg::evd::ComputeEigenvectors::Yes,
            Par::Seq,
            Default::default(),
        ));
    faer::linalg::evd::self_adjoint_evd(
        a.as_ref(),
        sd.as_mut(),
        Some(u.as_mut()),
        Par::Seq,
        faer::dyn_stack::MemStack::new(&mut buf),
        Default::default(),
    )
    .unwrap();
}
fn best(mut f: impl FnMut()) -> f64 {
    (0..5)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .fold(f64::INFINITY, f64::min)
}
fn main() {
    for &n in &[1024usize, 512, 384] {
        let x = Mat::<f64>::from_fn(n, 2 * n, |i, j| ((i * 7 + j * 13) as f64).sin());
        let a = &x * x.transpose();
        let a32 = Mat::<f32>::from_fn(n, n, |i, j| a[(i, j)] as f32);
        println!(
            "eigh n={n}: f64 {:.1} ms, f32 {:.1} ms",
            best(|| eigh(&a)),
            best(|| eigh(&a32))
        );
    }
    let (m, k) = (384usize, 1536usize);
    let x = Mat::<f32>::from_fn(m, k, |i, j| ((i * 7 + j * 13) as f32).sin());
    let mut g = Mat::<f32>::zeros(m, m);
    let full = best(|| matmul(&mut g, Accum::Replace, &x, x.transpose(), 1.0, Par::Seq));
    let tri = best(|| {
        triangular::matmul(
            &mut g,
            BlockStructure::TriangularLower,
            Accum::Replace,
            &x,
            BlockStructure::Rectangular,
            x.transpose(),
            BlockStructure::Rectangular,
            1.0,
            Par::Seq,
        )
    });
    println!(
        "gram 384x1536 seq f32: full {full:.2} ms ({:.1} GFLOP/s), lower {tri:.2} ms",
        2.0 * (m * m * k) as f64 / full / 1e6
    );
    let (m, k, n) = (1024usize, 1024usize, 384usize);
    let a = Mat::<f32>::from_fn(m, k, |i, j| ((i + j) % 7) as f32);
    let b = Mat::<f32>::from_fn(k, n, |i, j| ((i * j) % 5) as f32);
    let mut c = Mat::<f32>::zeros(m, n);
    let t = best(|| matmul(&mut c, Accum::Replace, &a, &b, 1.0, Par::Seq));
    println!(
        "f32 gemm 1024x1024x384 seq: {t:.2} ms {:.1} GFLOP/s",
        2.0 * (m * k * n) as f64 / t / 1e6
    );
}
