//! Checkpoints resume bit-exactly, for every kind and precision, and broken
//! files are refused with a message that says why.

mod common;
use common::Rng;

use std::fs;
use std::path::Path;

use half::bf16;
use keel::real::Real;
use keel::{
    checkpoint, CpuOptimizer, KeelError, MixedPrecisionOptimizer, Optimizer, OptimizerConfig,
    ParamGroup, ParamSpec, Rounding, Schedule, StateData, StateDict, StepStats,
};

/// Every kind, with the options that change its state or passes.
const VARIANTS: &[(&str, &str)] = &[
    (
        "sgd_nesterov",
        r#"{"kind":"sgd","lr":1,"momentum":0.9,"nesterov":true,"weight_decay":0.01}"#,
    ),
    ("sgd_plain", r#"{"kind":"sgd","lr":1}"#),
    ("adam", r#"{"kind":"adam","lr":1,"weight_decay":0.01}"#),
    ("adamw", r#"{"kind":"adamw","lr":1,"weight_decay":0.1}"#),
    (
        "adamw_update_clip",
        r#"{"kind":"adamw","lr":1,"weight_decay":0.1,"update_clip_rms":0.5,"clip_global_norm":5.0}"#,
    ),
    ("lamb", r#"{"kind":"lamb","lr":1,"weight_decay":0.01}"#),
    (
        "lars",
        r#"{"kind":"lars","lr":1,"momentum":0.9,"weight_decay":0.01,"trust_coefficient":0.02}"#,
    ),
    (
        "lion",
        r#"{"kind":"lion","lr":1,"weight_decay":0.01,"clip_value":2.0}"#,
    ),
];

fn parse(json: &str) -> OptimizerConfig {
    OptimizerConfig::from_json(json).unwrap_or_else(|e| panic!("{json}: {e}"))
}

/// Parameters of assorted shapes: a matrix, one tensor over a block, a
/// scalar, and one larger than a 16K-element work chunk.
fn specs() -> Vec<ParamSpec> {
    vec![
        ParamSpec::new("emb", [7, 5]),
        ParamSpec::new("h0.w", [300]),
        ParamSpec::new("h0.b", Vec::<usize>::new()),
        ParamSpec::new("big", [17000]),
    ]
}

fn groups() -> Vec<ParamGroup> {
    vec![
        ParamGroup::new("decay", ["emb", "h0.w", "big"]),
        ParamGroup::new("no_decay", ["h0.b"])
            .with_weight_decay(false)
            .with_lr_scale(0.5),
    ]
}

const SCHEDULE: Schedule = Schedule::WarmupCosine {
    peak_lr: 0.01,
    warmup_steps: 3,
    total_steps: 10,
    final_lr: 0.001,
};

fn values<T: Real>(seed: u64, scale: f64) -> Vec<Vec<T>> {
    let mut rng = Rng(seed);
    specs()
        .iter()
        .map(|s| {
            (0..s.numel())
                .map(|_| T::from_f64x(rng.uniform(-1.0, 1.0) * scale))
                .collect()
        })
        .collect()
}

fn init<T: Real>() -> Vec<Vec<T>> {
    values(1, 1.0)
}

/// The gradients of step `s`, with a spike at step 4.
fn grads<T: Real>(s: u64) -> Vec<Vec<T>> {
    values(1000 + s, if s == 4 { 100.0 } else { 1.0 })
}

/// Gradients holding a NaN: the step is skipped.
fn nan_grads<T: Real>() -> Vec<Vec<T>> {
    let mut g = grads::<T>(99);
    g[1][17] = T::nan();
    g
}

fn step<T: Real>(opt: &mut CpuOptimizer<T>, params: &mut [Vec<T>], grads: &[Vec<T>]) -> StepStats {
    let mut ps: Vec<&mut [T]> = params.iter_mut().map(|p| &mut p[..]).collect();
    let gs: Vec<&[T]> = grads.iter().map(|g| &g[..]).collect();
    opt.step(&mut ps, &gs).unwrap()
}

/// Steps `from..to` as a trainer would: lr from the schedule, and a skipped
/// (NaN) step before step 7.
fn train<T: Real>(opt: &mut CpuOptimizer<T>, params: &mut [Vec<T>], from: u64, to: u64) {
    for s in from..to {
        if s == 7 {
            assert!(step(opt, params, &nan_grads()).skipped.is_some());
        }
        opt.set_lr(SCHEDULE.lr_at(s)).unwrap();
        let stats = step(opt, params, &grads(s));
        assert!(stats.skipped.is_none());
        assert_eq!(stats.step, s + 1);
    }
}

fn same_bits<T: Real>(a: &[T], b: &[T]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.to_f64x().to_bits() == y.to_f64x().to_bits())
}

/// `StateDict` equality with tensors compared bit for bit.
fn assert_state_eq(a: &StateDict, b: &StateDict, what: &str) {
    assert_eq!(a.config, b.config, "{what}");
    assert_eq!(a.step, b.step, "{what}");
    assert_eq!(a.specs, b.specs, "{what}");
    assert_eq!(a.groups, b.groups, "{what}");
    assert_eq!(a.extra, b.extra, "{what}");
    let mut ta: Vec<_> = a.tensors.iter().collect();
    let mut tb: Vec<_> = b.tensors.iter().collect();
    ta.sort_by(|x, y| x.name.cmp(&y.name));
    tb.sort_by(|x, y| x.name.cmp(&y.name));
    assert_eq!(ta.len(), tb.len(), "{what}");
    for (x, y) in ta.iter().zip(&tb) {
        assert_eq!(x.name, y.name, "{what}");
        assert_eq!(x.shape, y.shape, "{what}");
        let same = match (&x.data, &y.data) {
            (StateData::F32(u), StateData::F32(v)) => same_bits(u, v),
            (StateData::F64(u), StateData::F64(v)) => same_bits(u, v),
            _ => false,
        };
        assert!(same, "{what}: state tensor {} differs", x.name);
    }
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// 10 steps straight equal 5 steps, a checkpoint, a fresh optimizer, and 5
/// more: parameters and state bit-identical, through `load_state`, through
/// `from_state_dict(checkpoint::load(..))` and through `from_file`.
fn resume_is_bit_identical<T: Real>(name: &str, json: &str) {
    let what = format!("{name} {}", T::DTYPE);
    let cfg = parse(json);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.safetensors");

    let mut straight = CpuOptimizer::<T>::with_groups(cfg.clone(), specs(), groups()).unwrap();
    let mut p_straight = init::<T>();
    train(&mut straight, &mut p_straight, 0, 10);

    let mut first = CpuOptimizer::<T>::with_groups(cfg.clone(), specs(), groups()).unwrap();
    let mut p_half = init::<T>();
    train(&mut first, &mut p_half, 0, 5);
    first.save_state(&path).unwrap();
    first.save_state(&path).unwrap(); // overwriting is fine too
    assert_eq!(
        files_in(dir.path()),
        ["state.safetensors"],
        "{what}: temporary file left behind"
    );

    let loaded = checkpoint::load(&path).unwrap();
    assert_state_eq(&loaded, &first.state_dict().unwrap(), &what);

    // A fresh optimizer from the config and specs alone (one default group):
    // the checkpoint brings back the groups, step count and moments.
    let mut fresh = CpuOptimizer::<T>::new(cfg.clone(), specs()).unwrap();
    fresh.load_state(&path).unwrap();
    assert_eq!(fresh.groups(), &groups()[..], "{what}");
    assert_eq!(fresh.step_count(), 5, "{what}");
    let rebuilt = CpuOptimizer::<T>::from_state_dict(&loaded).unwrap();
    assert_eq!(rebuilt.config(), first.config(), "{what}");
    let from_file = CpuOptimizer::<T>::from_file(&path).unwrap();
    assert_eq!(from_file.config(), first.config(), "{what}");
    assert_eq!(from_file.groups(), &groups()[..], "{what}");
    assert_eq!(from_file.specs(), &specs()[..], "{what}");

    for (how, mut opt) in [
        ("load_state", fresh),
        ("from_state_dict", rebuilt),
        ("from_file", from_file),
    ] {
        let mut params = p_half.clone();
        train(&mut opt, &mut params, 5, 10);
        for (i, (a, b)) in params.iter().zip(&p_straight).enumerate() {
            assert!(same_bits(a, b), "{what} via {how}: parameter {i} differs");
        }
        assert_state_eq(
            &opt.state_dict().unwrap(),
            &straight.state_dict().unwrap(),
            &what,
        );
        assert_eq!(opt.step_count(), 10, "{what}");
    }
}

#[test]
fn every_kind_resumes_bit_identically_f32() {
    for (name, json) in VARIANTS {
        resume_is_bit_identical::<f32>(name, json);
    }
}

#[test]
fn every_kind_resumes_bit_identically_f64() {
    for (name, json) in VARIANTS {
        resume_is_bit_identical::<f64>(name, json);
    }
}

fn bf16_values(v: Vec<Vec<f32>>) -> Vec<Vec<bf16>> {
    v.into_iter()
        .map(|t| t.into_iter().map(bf16::from_f32).collect())
        .collect()
}

fn step_mixed(opt: &mut MixedPrecisionOptimizer, params: &mut [Vec<bf16>], s: u64) {
    let g = bf16_values(grads::<f32>(s));
    let mut ps: Vec<&mut [bf16]> = params.iter_mut().map(|p| &mut p[..]).collect();
    let gs: Vec<&[bf16]> = g.iter().map(|g| &g[..]).collect();
    opt.set_lr(SCHEDULE.lr_at(s)).unwrap();
    let stats = opt.step(&mut ps, &gs).unwrap();
    assert!(stats.skipped.is_none());
}

fn mixed(
    params: &[Vec<bf16>],
    groups: Vec<ParamGroup>,
    rounding: Rounding,
) -> MixedPrecisionOptimizer {
    let cfg = parse(r#"{"kind":"adamw","lr":1,"weight_decay":0.1,"clip_global_norm":10.0}"#);
    let init: Vec<&[bf16]> = params.iter().map(|p| &p[..]).collect();
    MixedPrecisionOptimizer::new(cfg, specs(), groups, &init, rounding).unwrap()
}

#[test]
fn mixed_precision_resumes_bit_identically() {
    for rounding in [Rounding::Stochastic { seed: 42 }, Rounding::Nearest] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mixed.safetensors");
        let p0 = bf16_values(init::<f32>());

        let mut straight = mixed(&p0, groups(), rounding);
        let mut p_straight = p0.clone();
        for s in 0..10 {
            step_mixed(&mut straight, &mut p_straight, s);
        }

        let mut first = mixed(&p0, groups(), rounding);
        let mut params = p0.clone();
        for s in 0..5 {
            step_mixed(&mut first, &mut params, s);
        }
        first.save_state(&path).unwrap();
        assert_eq!(files_in(dir.path()), ["mixed.safetensors"]);

        // Fresh, with one group and the other rounding: the checkpoint
        // restores groups, rounding and master weights.
        let specs = specs();
        let mut fresh = mixed(&params, vec![ParamGroup::all(&specs)], Rounding::Nearest);
        fresh.load_state(&path).unwrap();
        assert_state_eq(
            &fresh.state_dict().unwrap(),
            &first.state_dict().unwrap(),
            "mixed load",
        );
        for s in 5..10 {
            step_mixed(&mut fresh, &mut params, s);
        }
        for (i, (a, b)) in params.iter().zip(&p_straight).enumerate() {
            assert!(
                a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{rounding:?}: bf16 parameter {i} differs"
            );
            assert!(
                same_bits(fresh.master(i), straight.master(i)),
                "{rounding:?}: master {i} differs"
            );
        }
        assert_state_eq(
            &fresh.state_dict().unwrap(),
            &straight.state_dict().unwrap(),
            "mixed",
        );
    }
}

/// A saved adamw f32 state, its bytes, and where the tensor data starts.
fn saved_adamw(dir: &Path) -> (std::path::PathBuf, Vec<u8>, usize, CpuOptimizer<f32>) {
    let path = dir.join("adamw.safetensors");
    let mut opt =
        CpuOptimizer::<f32>::with_groups(parse(VARIANTS[3].1), specs(), groups()).unwrap();
    let mut params = init::<f32>();
    train(&mut opt, &mut params, 0, 3);
    opt.save_state(&path).unwrap();
    let bytes = fs::read(&path).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let data_start = 8 + header;
    assert!(data_start < bytes.len());
    (path, bytes, data_start, opt)
}

#[test]
fn truncated_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_, bytes, data_start, _) = saved_adamw(dir.path());
    let n = bytes.len();
    let mut target =
        CpuOptimizer::<f32>::with_groups(parse(VARIANTS[3].1), specs(), groups()).unwrap();
    let before = target.state_dict().unwrap();
    for cut in [
        0,
        1,
        7,
        8,
        9,
        data_start / 2,
        data_start - 1,
        data_start,
        data_start + 1,
        (data_start + n) / 2,
        n - 4,
        n - 1,
    ] {
        let path = dir.path().join(format!("cut{cut}.safetensors"));
        fs::write(&path, &bytes[..cut]).unwrap();
        let e = checkpoint::load(&path).unwrap_err();
        assert!(
            matches!(e, KeelError::Checkpoint { .. }),
            "cut at {cut}: {e:?}"
        );
        let msg = e.to_string();
        assert!(msg.contains("truncated"), "cut at {cut} of {n}: {msg}");
        assert!(
            msg.contains(&format!("cut{cut}.safetensors")),
            "the message names the file: {msg}"
        );
        assert!(target.load_state(&path).is_err());
        assert!(CpuOptimizer::<f32>::from_file(&path).is_err());
        assert_eq!(
            target.state_dict().unwrap(),
            before,
            "a failed load changed the optimizer"
        );
    }
}

#[test]
fn corrupted_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_, bytes, data_start, _) = saved_adamw(dir.path());
    let n = bytes.len();
    let mut target =
        CpuOptimizer::<f32>::with_groups(parse(VARIANTS[3].1), specs(), groups()).unwrap();
    let before = target.state_dict().unwrap();
    for (at, mask) in [
        (n - 1, 0x01u8),
        (n - 5, 0xff),
        (n - 100, 0x80),
        (data_start, 0x10),
        ((data_start + n) / 2, 0x04),
    ] {
        let mut broken = bytes.clone();
        broken[at] ^= mask;
        let path = dir.path().join(format!("flip{at}.safetensors"));
        fs::write(&path, &broken).unwrap();
        let e = checkpoint::load(&path).unwrap_err();
        assert!(
            matches!(e, KeelError::Checkpoint { .. }),
            "byte {at}: {e:?}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains("checksum") && msg.contains("corrupted"),
            "byte {at}: {msg}"
        );
        assert!(target.load_state(&path).is_err());
        assert!(CpuOptimizer::<f32>::from_file(&path).is_err());
        assert_eq!(target.state_dict().unwrap(), before);
    }
    // The untouched bytes still load.
    let path = dir.path().join("intact.safetensors");
    fs::write(&path, &bytes).unwrap();
    target.load_state(&path).unwrap();
    assert_eq!(target.step_count(), 3);
}

#[test]
fn missing_files_and_folders_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.safetensors");
    let e = checkpoint::load(&missing).unwrap_err();
    assert!(matches!(e, KeelError::Checkpoint { .. }), "{e:?}");
    assert!(e.to_string().contains("nope.safetensors"), "{e}");
    let mut opt = CpuOptimizer::<f64>::new(parse(VARIANTS[0].1), specs()).unwrap();
    assert!(opt.load_state(&missing).is_err());
    // Saving into a folder that does not exist fails and leaves nothing.
    let e = opt
        .save_state(&dir.path().join("no/such/dir/state.safetensors"))
        .unwrap_err();
    assert!(matches!(e, KeelError::Checkpoint { .. }), "{e:?}");
    assert!(files_in(dir.path()).is_empty());
    // Not a keel file at all.
    let junk = dir.path().join("junk.safetensors");
    fs::write(&junk, b"hello, world: definitely not safetensors").unwrap();
    assert!(checkpoint::load(&junk).is_err());
}

fn dtype_mismatch_is_refused(name: &str, json: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.safetensors");
    let mut opt64 = CpuOptimizer::<f64>::with_groups(parse(json), specs(), groups()).unwrap();
    let mut p64 = init::<f64>();
    train(&mut opt64, &mut p64, 0, 2);
    opt64.save_state(&path).unwrap();
    let mut opt32 = CpuOptimizer::<f32>::with_groups(parse(json), specs(), groups()).unwrap();
    let before = opt32.state_dict().unwrap();
    match opt32.load_state(&path) {
        Ok(()) => panic!("{name}: an f64 state loaded into an f32 optimizer"),
        // The error names the file and what does not fit.
        Err(e) => assert!(
            matches!(e, KeelError::Checkpoint { .. })
                && e.to_string().contains("state.safetensors")
                && e.to_string().contains("F64"),
            "{name}: {e}"
        ),
    }
    assert_eq!(opt32.state_dict().unwrap(), before, "{name}");
    assert!(
        CpuOptimizer::<f32>::from_state_dict(&checkpoint::load(&path).unwrap()).is_err(),
        "{name}: from_state_dict accepted an f64 state for f32"
    );
    match CpuOptimizer::<f32>::from_file(&path) {
        Ok(_) => panic!("{name}: from_file accepted an f64 state for f32"),
        Err(e) => assert!(
            matches!(e, KeelError::Checkpoint { .. })
                && e.to_string().contains("state.safetensors")
                && e.to_string().contains("F64"),
            "{name}: {e}"
        ),
    }
    // And the other way round.
    let mut opt32 = CpuOptimizer::<f32>::with_groups(parse(json), specs(), groups()).unwrap();
    let mut p32 = init::<f32>();
    train(&mut opt32, &mut p32, 0, 2);
    let sd = opt32.state_dict().unwrap();
    let mut fresh64 = CpuOptimizer::<f64>::with_groups(parse(json), specs(), groups()).unwrap();
    assert!(
        fresh64.load_state_dict(&sd).is_err(),
        "{name}: an f32 state loaded into an f64 optimizer"
    );
}

#[test]
fn f64_state_into_f32_optimizer_is_refused() {
    for (name, json) in VARIANTS.iter().filter(|(n, _)| *n != "sgd_plain") {
        dtype_mismatch_is_refused(name, json);
    }
}

/// BUG (src/backend/cpu.rs, `load_state_dict`): the dtype is only checked
/// per state tensor (`StateDict::tensor`), and the state dict records no
/// dtype of its own, so a kind without state buffers (sgd without momentum)
/// accepts a state of the other precision, although `Optimizer::load_state_dict`
/// promises "the kind and dtype must match".
#[test]
fn f64_state_into_f32_optimizer_is_refused_without_state_buffers() {
    dtype_mismatch_is_refused("sgd_plain", r#"{"kind":"sgd","lr":1}"#);
}

/// A parameter with no elements (shape `[0, 4]`) steps, saves and loads.
#[test]
fn zero_size_parameters_round_trip() {
    let specs = vec![ParamSpec::new("e", [0, 4]), ParamSpec::new("w", [3])];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("z.safetensors");
    for (name, json) in VARIANTS {
        let mut opt = CpuOptimizer::<f32>::new(parse(json), specs.clone()).unwrap();
        let mut e: [f32; 0] = [];
        let mut w = [1.0f32; 3];
        let stats = opt
            .step(&mut [&mut e[..], &mut w[..]], &[&[][..], &[0.5f32; 3][..]])
            .unwrap();
        assert_eq!(stats.tensors[0].grad_norm, 0.0, "{name}");
        assert_eq!(stats.tensors[0].update_norm, 0.0, "{name}");
        assert!(
            (stats.global_grad_norm - 0.75f64.sqrt()).abs() < 1e-12,
            "{name}"
        );
        opt.save_state(&path).unwrap();
        let mut back = CpuOptimizer::<f32>::new(parse(json), specs.clone()).unwrap();
        back.load_state(&path).unwrap();
        assert_state_eq(
            &back.state_dict().unwrap(),
            &opt.state_dict().unwrap(),
            name,
        );
    }
}

/// GAP (src/checkpoint.rs `to_bytes`/`from_bytes`): the CRC-32 covers tensor
/// names and bytes only, not the metadata (config, step, specs, groups,
/// extra). One flipped digit in the step count loads silently and changes
/// Adam's bias correction on resume.
#[test]
fn corrupted_metadata_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (path, mut bytes, _, _) = saved_adamw(dir.path());
    let pat = b"\"step\":\"3\"";
    let at = bytes
        .windows(pat.len())
        .position(|w| w == pat)
        .expect("step in the metadata");
    bytes[at + 8] = b'7';
    fs::write(&path, &bytes).unwrap();
    let loaded = checkpoint::load(&path);
    assert!(
        loaded.is_err(),
        "a corrupted step count loaded: step {:?}",
        loaded.map(|s| s.step)
    );
}

/// `save` streams the file tensor by tensor; it must hold exactly the bytes
/// `to_bytes` makes, every time (the header's keys are sorted: safetensors
/// takes the metadata as a hash map, whose order differs from map to map),
/// leave no temporary file, and get the permissions a plain file creation
/// gets.
#[test]
fn saved_files_hold_what_to_bytes_holds() {
    let dir = tempfile::tempdir().unwrap();
    let (path, bytes, _, opt) = saved_adamw(dir.path());
    let state = opt.state_dict().unwrap();
    let in_memory = checkpoint::to_bytes(&state).unwrap();
    assert!(bytes == in_memory, "save and to_bytes differ");
    for round in 0..4 {
        assert!(
            checkpoint::to_bytes(&state).unwrap() == in_memory,
            "to_bytes differs in round {round}"
        );
        opt.save_state(&path).unwrap();
        assert!(
            fs::read(&path).unwrap() == bytes,
            "save differs in round {round}"
        );
    }
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + header_len]).unwrap();
    assert!(
        header.starts_with(r#"{"__metadata__":{"config":"#),
        "{header}"
    );
    let from_file = checkpoint::from_bytes(&bytes, &path).unwrap();
    assert_state_eq(&from_file, &state, "saved file");
    assert_eq!(files_in(dir.path()), ["adamw.safetensors"]);
    let plain = dir.path().join("plain");
    fs::File::create(&plain).unwrap();
    assert_eq!(
        fs::metadata(&path).unwrap().permissions(),
        fs::metadata(&plain).unwrap().permissions()
    );
}

/// The reader takes the header's offsets, not the order of its keys or of
/// the names: a file whose tensors lie in another order than their names
/// sort (here two tensors' bytes swapped, with their offsets) loads the same
/// state, and its checksum still holds.
#[test]
fn tensors_laid_out_in_any_order_load_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let (path, bytes, data_start, opt) = saved_adamw(dir.path());
    let mut header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..data_start]).unwrap();
    let offsets = |h: &serde_json::Map<String, serde_json::Value>, name: &str| -> (usize, usize) {
        let o = &h[name]["data_offsets"];
        (
            o[0].as_u64().unwrap() as usize,
            o[1].as_u64().unwrap() as usize,
        )
    };
    // Two tensors of one parameter (same length), swapped in the data.
    let (a, b) = ("big/exp_avg", "big/exp_avg_sq");
    let (oa, ob) = (offsets(&header, a), offsets(&header, b));
    assert_eq!(oa.1 - oa.0, ob.1 - ob.0);
    assert!(oa.0 < ob.0, "the writer lays tensors out in name order");
    let mut data = bytes[data_start..].to_vec();
    let (first, second) = (data[oa.0..oa.1].to_vec(), data[ob.0..ob.1].to_vec());
    data[oa.0..oa.1].copy_from_slice(&second);
    data[ob.0..ob.1].copy_from_slice(&first);
    let swap =
        |h: &mut serde_json::Map<String, serde_json::Value>, name: &str, o: (usize, usize)| {
            h.get_mut(name).unwrap()["data_offsets"] = serde_json::json!([o.0, o.1]);
        };
    swap(&mut header, a, ob);
    swap(&mut header, b, oa);
    let header = serde_json::to_vec(&header).unwrap();
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend(&header);
    file.extend(&data);
    let moved = dir.path().join("moved.safetensors");
    fs::write(&moved, &file).unwrap();
    assert_state_eq(
        &checkpoint::load(&moved).unwrap(),
        &opt.state_dict().unwrap(),
        "swapped layout",
    );
    assert_state_eq(
        &checkpoint::load(&path).unwrap(),
        &opt.state_dict().unwrap(),
        "original",
    );
}

/// Headers whose offsets add up to more than any file (here eight F64
/// tensors of 2^58 - 1 elements, which safetensors' own checks accept) are
/// refused as truncated, in debug builds too, before anything is allocated.
#[test]
fn headers_describing_impossible_sizes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let n: u64 = (1 << 58) - 1;
    let mut header = serde_json::Map::new();
    header.insert(
        "__metadata__".into(),
        serde_json::json!({"format": checkpoint::FORMAT}),
    );
    for i in 0..8u64 {
        header.insert(
            format!("t{i}"),
            serde_json::json!({"dtype": "F64", "shape": [n], "data_offsets": [i * n * 8, (i + 1) * n * 8]}),
        );
    }
    let header = serde_json::to_vec(&header).unwrap();
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend(&header);
    let path = dir.path().join("huge.safetensors");
    fs::write(&path, &file).unwrap();
    let e = checkpoint::load(&path).unwrap_err();
    assert!(matches!(e, KeelError::Checkpoint { .. }), "{e:?}");
    assert!(e.to_string().contains("truncated"), "{e}");
}

/// A mixed-precision optimizer refuses a state that does not fit, naming
/// the file, and keeps its own state.
#[test]
fn mixed_precision_refuses_a_state_that_does_not_fit() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _, _, _) = saved_adamw(dir.path());
    let p0 = bf16_values(init::<f32>());
    let mut target = mixed(&p0, groups(), Rounding::Nearest);
    let before = target.state_dict().unwrap();
    // An f32 optimizer's state has no master weights.
    let e = target.load_state(&path).unwrap_err();
    assert!(matches!(e, KeelError::Checkpoint { .. }), "{e:?}");
    assert!(e.to_string().contains("adamw.safetensors"), "{e}");
    assert!(e.to_string().contains("master"), "{e}");
    assert_state_eq(
        &target.state_dict().unwrap(),
        &before,
        "after a refused load",
    );
}
