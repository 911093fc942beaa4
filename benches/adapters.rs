//! keel inside candle and burn against each framework's own AdamW: one step
//! on one 10M-parameter f32 tensor, the implementations alternating round by
//! round (the machine is shared, so ratios measured back to back are what
//! count). Gradients are computed outside the timed region.
//!
//! Run: `cargo bench --features candle,burn --bench adapters [-- ROUNDS [PARAMS]]`
//! (`--features candle` alone times the candle rows only).

mod common;

use std::time::{Duration, Instant};

#[cfg(feature = "burn")]
use burn::module::{Module, Param};
#[cfg(feature = "burn")]
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
#[cfg(feature = "burn")]
use burn::tensor::{Device as BurnDevice, Tensor as BurnTensor, TensorData};
use candle_core::{Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer as _, ParamsAdamW};
#[cfg(feature = "burn")]
use keel::adapters::burn::KeelBurn;
use keel::adapters::candle::KeelCandle;
use keel::{CpuOptimizer, Optimizer, OptimizerConfig, ParamSpec};

use common::values;

const CONFIG: &str = r#"{"kind": "adamw", "lr": 0.001, "weight_decay": 0.01}"#;

#[cfg(feature = "burn")]
#[derive(Module, Debug)]
struct One {
    w: Param<BurnTensor<1>>,
}

#[cfg(feature = "burn")]
/// A burn module with one parameter and its gradient (`g`, via a trivial loss).
fn burn_setup(n: usize) -> (One, GradientsParams) {
    let device = BurnDevice::default().autodiff();
    let model = One {
        w: Param::from_data(TensorData::new(values(n, 1, 2.0), [n]), &device),
    };
    let g = BurnTensor::<1>::from_data(TensorData::new(values(n, 2, 0.02), [n]), &device);
    let grads = burn_grads(&model, &g);
    (model, grads)
}

#[cfg(feature = "burn")]
fn burn_grads(model: &One, g: &BurnTensor<1>) -> GradientsParams {
    let loss = (model.w.val() * g.clone()).sum();
    GradientsParams::from_grads(loss.backward(), model)
}

#[cfg(feature = "burn")]
fn burn_step(optim: &mut ModuleOptimizer, model: One, g: &BurnTensor<1>) -> (One, Duration) {
    let grads = burn_grads(&model, g);
    let t = Instant::now();
    let model = optim.step(1e-3, model, grads);
    // Force the lazy result so the whole step is timed (one element read).
    #[allow(clippy::single_range_in_vec_init)]
    let _ = model.w.val().slice([0..1]).into_data();
    (model, t.elapsed())
}

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1e3
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // `cargo bench` passes `--bench`; numbers are positional after it.
    let nums: Vec<usize> = std::env::args().filter_map(|a| a.parse().ok()).collect();
    let rounds = nums.first().copied().unwrap_or(10);
    let n = nums.get(1).copied().unwrap_or(10_000_000);
    let config = OptimizerConfig::from_json(CONFIG)?;

    // keel's own CPU step, on plain Vecs: the floor for both adapters.
    let mut native = CpuOptimizer::<f32>::new(config.clone(), vec![ParamSpec::new("w", [n])])?;
    let (mut p, g) = (values(n, 1, 2.0), values(n, 2, 0.02));

    // candle: two Vars with the same values, one gradient store each.
    let dev = Device::Cpu;
    let var_nn = Var::from_vec(values(n, 1, 2.0), n, &dev)?;
    let var_keel = Var::from_vec(values(n, 1, 2.0), n, &dev)?;
    let g_candle = Tensor::from_vec(g.clone(), n, &dev)?;
    let grads_nn = (var_nn.as_tensor() * &g_candle)?.sum_all()?.backward()?;
    let grads_keel = (var_keel.as_tensor() * &g_candle)?.sum_all()?.backward()?;
    let mut candle_nn_adamw = AdamW::new(
        vec![var_nn.clone()],
        ParamsAdamW {
            lr: 1e-3,
            weight_decay: 0.01,
            ..Default::default()
        },
    )?;
    let mut keel_candle = KeelCandle::new(vec![var_keel.clone()], config.clone())?;

    // burn: the same module twice.
    #[cfg(feature = "burn")]
    let (mut burn_model, _) = burn_setup(n);
    #[cfg(feature = "burn")]
    let (mut keel_model, _) = burn_setup(n);
    #[cfg(feature = "burn")]
    let g_burn = BurnTensor::<1>::from_data(
        TensorData::new(values(n, 2, 0.02), [n]),
        &BurnDevice::default().autodiff(),
    );
    #[cfg(feature = "burn")]
    let mut burn_adamw = AdamWConfig::new()
        .with_weight_decay(0.01)
        .with_epsilon(1e-8)
        .init();
    #[cfg(feature = "burn")]
    let mut keel_burn = KeelBurn::new(config)?.init();

    let mut times: [Vec<Duration>; 5] = Default::default();
    for round in 0..=rounds {
        let t = Instant::now();
        native.step(&mut [&mut p[..]], &[&g[..]])?;
        let d0 = t.elapsed();

        let t = Instant::now();
        candle_nn_adamw.step(&grads_nn)?;
        let d1 = t.elapsed();

        let t = Instant::now();
        keel_candle.step(&grads_keel)?;
        let d2 = t.elapsed();

        #[cfg(feature = "burn")]
        let (d3, d4) = {
            let (m, d3) = burn_step(&mut burn_adamw, burn_model, &g_burn);
            burn_model = m;
            let (m, d4) = burn_step(&mut keel_burn, keel_model, &g_burn);
            keel_model = m;
            (d3, d4)
        };
        #[cfg(not(feature = "burn"))]
        let (d3, d4) = (Duration::ZERO, Duration::ZERO);
        // Round 0 warms caches and allocators.
        if round > 0 {
            for (v, d) in times.iter_mut().zip([d0, d1, d2, d3, d4]) {
                v.push(d);
            }
        }
    }
    let [native, nn, kc, ba, kb] = times.map(median);
    println!("AdamW step, one {n}-parameter f32 tensor, median of {rounds} alternating rounds:");
    println!("  keel CpuOptimizer (plain Vec)   {native:9.2} ms");
    println!("  candle-nn AdamW                 {nn:9.2} ms");
    println!(
        "  keel inside candle (KeelCandle) {kc:9.2} ms   {:.1}x faster than candle-nn",
        nn / kc
    );
    if cfg!(feature = "burn") {
        println!("  burn AdamW (ndarray)            {ba:9.2} ms");
        println!(
            "  keel inside burn (KeelBurn)     {kb:9.2} ms   {:.1}x faster than burn",
            ba / kb
        );
    }
    Ok(())
}
