//! The reference GPT: parameters as named flat buffers, forward and backward
//! by hand, activations in a workspace reused from step to step.

use faer::Accum;
use rayon::prelude::*;

use super::config::{GptConfig, Norm};
use super::kernels::{self as k, AttnShape};
use super::rng::SplitMix64;
use crate::error::{KeelError, Result};
use crate::real::Real;
use crate::tensor::ParamSpec;

/// Where one block's tensors sit in the parameter list.
#[derive(Debug, Clone)]
struct LayerIndex {
    ln_1: (usize, usize),
    c_attn: (usize, usize),
    qk_norm: Option<[usize; 4]>,
    attn_proj: (usize, usize),
    ln_2: (usize, usize),
    c_fc: (usize, usize),
    mlp_proj: (usize, usize),
}

/// Where every tensor sits in the parameter list.
#[derive(Debug, Clone)]
struct Layout {
    wte: usize,
    wpe: usize,
    layers: Vec<LayerIndex>,
    ln_f: Option<(usize, usize)>,
}

/// The parameter list of `config`, in a stable order (GPT-2 names, torch
/// Linear weights `[out, in]`), with the index of each tensor.
fn layout(config: &GptConfig) -> (Vec<ParamSpec>, Layout) {
    let (v, c, bs) = (config.vocab_size, config.n_embd, config.block_size);
    let hs = config.head_size();
    let mut specs = Vec::new();
    let mut add = |name: String, shape: &[usize]| {
        specs.push(ParamSpec::new(name, shape));
        specs.len() - 1
    };
    let wte = add("transformer.wte.weight".into(), &[v, c]);
    let wpe = add("transformer.wpe.weight".into(), &[bs, c]);
    let mut layers = Vec::with_capacity(config.n_layer);
    for l in 0..config.n_layer {
        let p = format!("transformer.h.{l}.");
        let mut pair = |name: &str, w: &[usize], b: &[usize]| {
            (
                add(format!("{p}{name}.weight"), w),
                add(format!("{p}{name}.bias"), b),
            )
        };
        let ln_1 = pair("ln_1", &[c], &[c]);
        let c_attn = pair("attn.c_attn", &[3 * c, c], &[3 * c]);
        let qk_norm = config.qk_norm.then(|| {
            let q = pair("attn.q_norm", &[hs], &[hs]);
            let kk = pair("attn.k_norm", &[hs], &[hs]);
            [q.0, q.1, kk.0, kk.1]
        });
        let attn_proj = pair("attn.c_proj", &[c, c], &[c]);
        let ln_2 = pair("ln_2", &[c], &[c]);
        let c_fc = pair("mlp.c_fc", &[4 * c, c], &[4 * c]);
        let mlp_proj = pair("mlp.c_proj", &[c, 4 * c], &[c]);
        layers.push(LayerIndex {
            ln_1,
            c_attn,
            qk_norm,
            attn_proj,
            ln_2,
            c_fc,
            mlp_proj,
        });
    }
    let ln_f = (config.norm == Norm::Pre).then(|| {
        (
            add("transformer.ln_f.weight".into(), &[c]),
            add("transformer.ln_f.bias".into(), &[c]),
        )
    });
    (
        specs,
        Layout {
            wte,
            wpe,
            layers,
            ln_f,
        },
    )
}

/// What one forward (and backward) pass measured.
#[derive(Debug, Clone, PartialEq)]
pub struct GptStats {
    /// `cross_entropy + z_loss * mean(logsumexp^2)` (NaN without targets).
    pub loss: f64,
    /// Mean cross-entropy alone (NaN without targets).
    pub cross_entropy: f64,
    /// Mean log-partition `mean(logsumexp(logits))` over all positions.
    pub mean_log_z: f64,
    /// Per layer, the largest unmasked attention logit `q.k / sqrt(hs)`.
    pub max_attn_logit: Vec<f64>,
}

/// Activations of the last forward pass (and backward scratch), sized for
/// one `(B, T)`; reallocated only when the batch shape changes.
#[derive(Default)]
struct Workspace<T> {
    b: usize,
    t: usize,
    /// Residual stream entering each block, and after the last: `[L+1, N, C]`.
    resid: Vec<T>,
    /// First LayerNorm output (pre: attention input; post: MLP input) and stats.
    ln1: Vec<T>,
    ln1_stats: (Vec<T>, Vec<T>),
    qkv: Vec<T>,
    /// qk-normed `[q | k]` `[L, N, 2C]` and its stats `[L, N, 2H]`.
    qkn: Vec<T>,
    qkn_stats: (Vec<T>, Vec<T>),
    att: Vec<T>,
    atty: Vec<T>,
    /// Residual sum after attention (LayerNorm input in post-LN).
    s1: Vec<T>,
    /// Second LayerNorm output (pre: MLP input; post: block output) and stats.
    ln2: Vec<T>,
    ln2_stats: (Vec<T>, Vec<T>),
    /// Post-LN only: residual sum after the MLP (ln_2's input).
    s2: Vec<T>,
    fc: Vec<T>,
    fc_gelu: Vec<T>,
    lnf: Vec<T>,
    lnf_stats: (Vec<T>, Vec<T>),
    logits: Vec<T>,
    lse: Vec<T>,
    max_logit: Vec<T>,
    /// One block output (attention or MLP) before the residual add.
    branch: Vec<T>,
    dlogits: Vec<T>,
    dres: Vec<T>,
    dmid: Vec<T>,
    dln: Vec<T>,
    dqkv: Vec<T>,
    dfc: Vec<T>,
    datty: Vec<T>,
    dscores: Vec<T>,
    ones: Vec<T>,
}

impl<T> std::fmt::Debug for Workspace<T> {
    // The buffers are activations: printing them would swamp any log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workspace")
            .field("b", &self.b)
            .field("t", &self.t)
            .finish_non_exhaustive()
    }
}

fn zeros<T: Real>(n: usize) -> Vec<T> {
    vec![T::zero(); n]
}

/// An upper bound of the parameter count of `cfg` (saturating): the
/// embeddings, and per block `12 C^2` weights plus at most `17 C` biases,
/// gains and qk-norm gains.
fn param_bound(cfg: &GptConfig) -> u128 {
    let c = cfg.n_embd as u128;
    let per_block = c
        .saturating_mul(c)
        .saturating_mul(12)
        .saturating_add(17 * c);
    [
        elems(&[cfg.vocab_size, cfg.n_embd]),
        elems(&[cfg.block_size, cfg.n_embd]),
        per_block.saturating_mul(cfg.n_layer as u128),
        2 * c,
    ]
    .into_iter()
    .fold(0, u128::saturating_add)
}

/// The product of `dims` as a `u128`, saturating (a saturated length fails
/// every memory check).
fn elems(dims: &[usize]) -> u128 {
    dims.iter().fold(1u128, |n, &d| n.saturating_mul(d as u128))
}

impl<T: Real> Workspace<T> {
    /// Builds the buffers for `(b, t)`, asking `alloc` for each as `(length,
    /// fill value)`: [`Workspace::bytes`] counts with it, [`Workspace::new`]
    /// allocates with it, so the two cannot disagree.
    fn build(
        cfg: &GptConfig,
        b: usize,
        t: usize,
        alloc: &mut dyn FnMut(u128, T) -> Result<Vec<T>>,
    ) -> Result<Self> {
        let (l, c, v, h) = (cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.n_head);
        let (qk, pre, post) = (cfg.qk_norm, cfg.norm == Norm::Pre, cfg.norm == Norm::Post);
        let on = |flag: bool| usize::from(flag);
        let mut stats = |dims: &[usize]| -> Result<(Vec<T>, Vec<T>)> {
            Ok((
                alloc(elems(dims), T::zero())?,
                alloc(elems(dims), T::zero())?,
            ))
        };
        let ln1_stats = stats(&[l, b, t])?;
        let qkn_stats = stats(&[on(qk), l, b, t, 2, h])?;
        let ln2_stats = stats(&[l, b, t])?;
        let lnf_stats = stats(&[on(pre), b, t])?;
        let mut z = |dims: &[usize]| alloc(elems(dims), T::zero());
        Ok(Workspace {
            b,
            t,
            resid: z(&[l.saturating_add(1), b, t, c])?,
            ln1: z(&[l, b, t, c])?,
            ln1_stats,
            qkv: z(&[l, b, t, 3, c])?,
            qkn: z(&[on(qk), l, b, t, 2, c])?,
            qkn_stats,
            att: z(&[l, b, h, t, t])?,
            atty: z(&[l, b, t, c])?,
            s1: z(&[l, b, t, c])?,
            ln2: z(&[l, b, t, c])?,
            ln2_stats,
            s2: z(&[on(post), l, b, t, c])?,
            fc: z(&[l, b, t, 4, c])?,
            fc_gelu: z(&[l, b, t, 4, c])?,
            lnf: z(&[on(pre), b, t, c])?,
            lnf_stats,
            logits: z(&[b, t, v])?,
            lse: z(&[b, t])?,
            max_logit: z(&[b])?,
            branch: z(&[b, t, c])?,
            dlogits: z(&[b, t, v])?,
            dres: z(&[b, t, c])?,
            dmid: z(&[b, t, c])?,
            dln: z(&[b, t, c])?,
            dqkv: z(&[b, t, 3, c])?,
            dfc: z(&[b, t, 4, c])?,
            datty: z(&[b, t, c])?,
            dscores: z(&[b, t, t])?,
            ones: alloc(elems(&[b, t]).max(v as u128), T::one())?,
        })
    }

    /// Bytes the buffers for `(b, t)` take (saturating at `u128::MAX`).
    fn bytes(cfg: &GptConfig, b: usize, t: usize) -> u128 {
        let mut total = 0u128;
        let mut count = |len: u128, _: T| {
            total = total.saturating_add(len);
            Ok(Vec::new())
        };
        // Counting allocates nothing, so it cannot fail.
        let _ = Self::build(cfg, b, t, &mut count);
        total.saturating_mul(std::mem::size_of::<T>() as u128)
    }

    /// The buffers for `(b, t)`, or [`KeelError::Memory`] when they cannot
    /// be allocated.
    fn new(cfg: &GptConfig, b: usize, t: usize) -> Result<Self> {
        let what = format!("the GPT's activations at batch {b} x {t} tokens");
        let bytes = Self::bytes(cfg, b, t);
        if bytes > isize::MAX as u128 {
            return Err(KeelError::Memory {
                what,
                needed: bytes,
                available: crate::memory::available_memory(),
            });
        }
        // Every length is at most `bytes`, so it fits in `usize` here.
        Self::build(cfg, b, t, &mut |len, fill| match fill == T::zero() {
            true => crate::memory::try_zeros(len as usize, &what),
            false => crate::memory::try_filled(len as usize, fill, &what),
        })
    }
}

/// Slice `i` of `len` elements of a per-layer buffer.
fn at<T>(v: &[T], i: usize, len: usize) -> &[T] {
    &v[i * len..(i + 1) * len]
}

fn at_mut<T>(v: &mut [T], i: usize, len: usize) -> &mut [T] {
    &mut v[i * len..(i + 1) * len]
}

/// Two distinct tensors of a gradient list, both mutable.
fn pair_mut<T, G: AsMut<[T]>>(g: &mut [G], (i, j): (usize, usize)) -> (&mut [T], &mut [T]) {
    debug_assert!(i < j);
    let (lo, hi) = g.split_at_mut(j);
    (lo[i].as_mut(), hi[0].as_mut())
}

/// A GPT-2 style model (see `tests/data/gpt-golden/README.md`) over `T`
/// (`f32` to train, `f64` to check against the golden cases).
///
/// Parameters and gradients live outside the model, as one flat buffer per
/// [`ParamSpec`] of [`Gpt::param_specs`], so a trainer hands the same buffers
/// to a keel [`crate::Optimizer`].
///
/// ```
/// use keel::gpt::{Gpt, GptConfig};
/// let mut model = Gpt::<f32>::new(GptConfig::new(11, 8, 1, 2, 8))?;
/// let params = model.init_params(0);
/// let mut grads = model.zeros_like_params();
/// let tokens = [1u32, 2, 3, 4];
/// let targets = [2u32, 3, 4, 5];
/// let stats = model.forward_backward(&params, &mut grads, &tokens, &targets, 1, 4)?;
/// assert!((stats.loss - 11f64.ln()).abs() < 0.1);
/// # Ok::<(), keel::KeelError>(())
/// ```
#[derive(Debug)]
pub struct Gpt<T: Real> {
    config: GptConfig,
    specs: Vec<ParamSpec>,
    layout: Layout,
    ws: Workspace<T>,
}

impl<T: Real> Gpt<T> {
    /// A model of `config` (validated); the workspace is allocated at the
    /// first pass.
    ///
    /// A configuration whose parameters could not be addressed, or whose
    /// list of parameter tensors would not fit in the memory available, is a
    /// [`KeelError::Memory`] error; the parameters themselves are not
    /// allocated here (see [`Gpt::init_params`]).
    pub fn new(config: GptConfig) -> Result<Self> {
        config.validate()?;
        let bytes = param_bound(&config).saturating_mul(std::mem::size_of::<T>() as u128);
        if bytes > isize::MAX as u128 {
            return Err(KeelError::Memory {
                what: "the GPT's parameters".to_string(),
                needed: bytes,
                available: crate::memory::available_memory(),
            });
        }
        // About 16 named tensors per block, each a name and a shape.
        let per_block = 16 * (std::mem::size_of::<ParamSpec>() as u128 + 48);
        crate::memory::ensure_fits(
            "the GPT's list of parameter tensors",
            per_block.saturating_mul(config.n_layer as u128),
        )?;
        let (specs, layout) = layout(&config);
        Ok(Gpt {
            config,
            specs,
            layout,
            ws: Workspace::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &GptConfig {
        &self.config
    }

    /// Every parameter tensor, in the order the buffers are passed (the
    /// list to register with a keel optimizer).
    pub fn param_specs(&self) -> Vec<ParamSpec> {
        self.specs.clone()
    }

    /// Total number of parameters.
    pub fn num_params(&self) -> usize {
        self.specs.iter().map(ParamSpec::numel).sum()
    }

    /// One zeroed buffer per parameter (e.g. for gradients).
    pub fn zeros_like_params(&self) -> Vec<Vec<T>> {
        self.specs.iter().map(|s| zeros(s.numel())).collect()
    }

    /// GPT-2 initialization from `seed`: embeddings and Linear weights
    /// `N(0, init_std)`, residual projections (`c_proj`) scaled by
    /// `1/sqrt(2L)` when `scale_residual_init`, biases 0, LayerNorm weights 1.
    pub fn init_params(&self, seed: u64) -> Vec<Vec<T>> {
        let mut rng = SplitMix64::new(seed);
        let std = self.config.init_std;
        let proj_std = if self.config.scale_residual_init {
            std / (2.0 * self.config.n_layer as f64).sqrt()
        } else {
            std
        };
        self.specs
            .iter()
            .map(|s| {
                let n = s.numel();
                let name = s.name.as_str();
                let is_norm = name.contains("ln_") || name.contains("_norm.");
                if name.ends_with(".bias") {
                    zeros(n)
                } else if is_norm {
                    vec![T::one(); n]
                } else {
                    let sd = if name.ends_with("c_proj.weight") {
                        proj_std
                    } else {
                        std
                    };
                    (0..n).map(|_| T::from_f64x(rng.normal() * sd)).collect()
                }
            })
            .collect()
    }

    /// Bytes of the activations (and backward scratch) a pass over a `[b,
    /// t]` batch holds, `f32` or `f64` as `T`; saturates at `u128::MAX`. The
    /// model allocates them at the first pass of that shape: a trainer can
    /// check them against [`crate::memory::available_memory`] first.
    ///
    /// ```
    /// use keel::gpt::{Gpt, GptConfig};
    /// let model = Gpt::<f32>::new(GptConfig::new(65, 64, 2, 2, 32))?;
    /// assert!(model.activation_bytes(8, 64) > model.activation_bytes(4, 64));
    /// # Ok::<(), keel::KeelError>(())
    /// ```
    pub fn activation_bytes(&self, b: usize, t: usize) -> u128 {
        Workspace::<T>::bytes(&self.config, b, t)
    }

    /// Reallocates the workspace when the batch shape changes; the old one is
    /// freed first, so the two are never held together.
    fn ensure_workspace(&mut self, b: usize, t: usize) -> Result<()> {
        if self.ws.b != b || self.ws.t != t {
            self.ws = Workspace::default();
            self.ws = Workspace::new(&self.config, b, t)?;
        }
        Ok(())
    }

    /// The logits `[B, T, V]` of the last pass.
    pub fn logits(&self) -> &[T] {
        let n = self.ws.b * self.ws.t;
        &self.ws.logits[..n * self.config.vocab_size]
    }

    fn check_inputs<P: AsRef<[T]>>(
        &self,
        params: &[P],
        tokens: &[u32],
        targets: Option<&[u32]>,
        b: usize,
        t: usize,
    ) -> Result<()> {
        check_buffers(
            &self.specs,
            params.iter().map(|p| p.as_ref().len()),
            "param",
        )?;
        if b == 0 {
            return Err(KeelError::config("batch", "must be at least 1"));
        }
        if t == 0 || t > self.config.block_size {
            return Err(KeelError::config(
                "seq_len",
                format!("{t} is not in 1..={}", self.config.block_size),
            ));
        }
        let n = b
            .checked_mul(t)
            .filter(|n| {
                n.checked_mul(self.config.vocab_size.max(4 * self.config.n_embd))
                    .is_some()
            })
            .ok_or_else(|| KeelError::config("batch", format!("{b} x {t} positions overflow")))?;
        let v = self.config.vocab_size;
        let lists = std::iter::once(("tokens", tokens)).chain(targets.map(|x| ("targets", x)));
        for (name, ids) in lists {
            if ids.len() != n {
                return Err(KeelError::shape(
                    name,
                    format!("expected B*T = {n} ids, got {}", ids.len()),
                ));
            }
            if let Some(pos) = ids.iter().position(|&x| x as usize >= v) {
                return Err(KeelError::shape(
                    name,
                    format!("id {} at {pos} is not below vocab_size {v}", ids[pos]),
                ));
            }
        }
        Ok(())
    }

    /// Forward pass only: logits (see [`Gpt::logits`]) and, with targets, the
    /// loss. `tokens` and `targets` are `[B, T]` row-major.
    pub fn forward<P: AsRef<[T]>>(
        &mut self,
        params: &[P],
        tokens: &[u32],
        targets: Option<&[u32]>,
        b: usize,
        t: usize,
    ) -> Result<GptStats> {
        self.check_inputs(params, tokens, targets, b, t)?;
        self.ensure_workspace(b, t)?;
        Ok(self.forward_unchecked(params, tokens, targets, b, t))
    }

    /// Forward and backward: writes the gradient of the loss into `grads`
    /// (one buffer per parameter, overwritten) and returns the statistics.
    pub fn forward_backward<P: AsRef<[T]>, G: AsMut<[T]>>(
        &mut self,
        params: &[P],
        grads: &mut [G],
        tokens: &[u32],
        targets: &[u32],
        b: usize,
        t: usize,
    ) -> Result<GptStats> {
        self.check_inputs(params, tokens, Some(targets), b, t)?;
        check_buffers(
            &self.specs,
            grads.iter_mut().map(|g| g.as_mut().len()),
            "grad",
        )?;
        self.ensure_workspace(b, t)?;
        let stats = self.forward_unchecked(params, tokens, Some(targets), b, t);
        self.backward(params, grads, tokens, targets);
        Ok(stats)
    }

    fn forward_unchecked<P: AsRef<[T]>>(
        &mut self,
        params: &[P],
        tokens: &[u32],
        targets: Option<&[u32]>,
        b: usize,
        t: usize,
    ) -> GptStats {
        let cfg = &self.config;
        let lay = &self.layout;
        let ws = &mut self.ws;
        let p = |i: usize| params[i].as_ref();
        let (c, v, h, nl) = (cfg.n_embd, cfg.vocab_size, cfg.n_head, cfg.n_layer);
        let n = b * t;
        let nc = n * c;
        let shape = AttnShape { t, c, h };

        // Embedding: x = (wte[token] + wpe[pos]) * embed_scale.
        let (wte, wpe) = (p(lay.wte), p(lay.wpe));
        let es = T::from_f64x(cfg.embed_scale);
        ws.resid[..nc]
            .par_chunks_mut(c)
            .zip(tokens.par_iter())
            .enumerate()
            .for_each(|(row, (x, &tok))| {
                let te = &wte[tok as usize * c..][..c];
                let pe = &wpe[(row % t) * c..][..c];
                for ((x, &a), &b) in x.iter_mut().zip(te).zip(pe) {
                    *x = (a + b) * es;
                }
            });

        let mut max_attn_logit = Vec::with_capacity(nl);
        for (l, li) in lay.layers.iter().enumerate() {
            let (done, rest) = ws.resid.split_at_mut((l + 1) * nc);
            let x_in = &done[l * nc..];
            let x_out = &mut rest[..nc];
            let ln1 = at_mut(&mut ws.ln1, l, nc);
            let ln1_m = at_mut(&mut ws.ln1_stats.0, l, n);
            let ln1_r = at_mut(&mut ws.ln1_stats.1, l, n);
            let qkv = at_mut(&mut ws.qkv, l, 3 * nc);
            let att = at_mut(&mut ws.att, l, b * h * t * t);
            let atty = at_mut(&mut ws.atty, l, nc);
            let s1 = at_mut(&mut ws.s1, l, nc);
            let ln2 = at_mut(&mut ws.ln2, l, nc);
            let ln2_m = at_mut(&mut ws.ln2_stats.0, l, n);
            let ln2_r = at_mut(&mut ws.ln2_stats.1, l, n);
            let fc = at_mut(&mut ws.fc, l, 4 * nc);
            let fc_gelu = at_mut(&mut ws.fc_gelu, l, 4 * nc);
            let branch = &mut ws.branch[..nc];

            // Attention input: ln_1(x) in pre-LN, x itself in post-LN.
            let attn_in: &[T] = match cfg.norm {
                Norm::Pre => {
                    k::layernorm_forward(ln1, ln1_m, ln1_r, x_in, p(li.ln_1.0), p(li.ln_1.1), c);
                    ln1
                }
                Norm::Post => x_in,
            };
            k::linear_forward(
                qkv,
                attn_in,
                p(li.c_attn.0),
                Some(p(li.c_attn.1)),
                (n, c, 3 * c),
            );
            let (qk, qk_stride): (&[T], usize) = match li.qk_norm {
                Some([qw, qb, kw, kb]) => {
                    let qkn = at_mut(&mut ws.qkn, l, 2 * nc);
                    k::qk_norm_forward(
                        qkn,
                        at_mut(&mut ws.qkn_stats.0, l, 2 * n * h),
                        at_mut(&mut ws.qkn_stats.1, l, 2 * n * h),
                        qkv,
                        (p(qw), p(qb), p(kw), p(kb)),
                        c,
                        h,
                    );
                    (qkn, 2 * c)
                }
                None => (qkv, 3 * c),
            };
            k::attention_forward(atty, att, &mut ws.max_logit, qk, qk_stride, qkv, shape);
            let mx = ws
                .max_logit
                .iter()
                .fold(f64::NEG_INFINITY, |a, &x| a.max(x.to_f64x()));
            max_attn_logit.push(mx);
            let pr = li.attn_proj;
            k::linear_forward(branch, atty, p(pr.0), Some(p(pr.1)), (n, c, c));
            add_into(s1, x_in, branch);

            let (mlp_in, mlp_res): (&[T], &[T]) = match cfg.norm {
                Norm::Pre => {
                    k::layernorm_forward(ln2, ln2_m, ln2_r, s1, p(li.ln_2.0), p(li.ln_2.1), c);
                    (ln2, s1)
                }
                Norm::Post => {
                    k::layernorm_forward(ln1, ln1_m, ln1_r, s1, p(li.ln_1.0), p(li.ln_1.1), c);
                    (ln1, ln1)
                }
            };
            k::linear_forward(fc, mlp_in, p(li.c_fc.0), Some(p(li.c_fc.1)), (n, c, 4 * c));
            k::gelu_forward(fc_gelu, fc);
            let pr = li.mlp_proj;
            k::linear_forward(branch, fc_gelu, p(pr.0), Some(p(pr.1)), (n, 4 * c, c));
            match cfg.norm {
                Norm::Pre => add_into(x_out, mlp_res, branch),
                Norm::Post => {
                    let s2 = at_mut(&mut ws.s2, l, nc);
                    add_into(s2, mlp_res, branch);
                    k::layernorm_forward(ln2, ln2_m, ln2_r, s2, p(li.ln_2.0), p(li.ln_2.1), c);
                    x_out.copy_from_slice(ln2);
                }
            }
        }

        let x_last = &ws.resid[nl * nc..];
        let xf: &[T] = match lay.ln_f {
            Some((w, bb)) => {
                let (m, r) = (&mut ws.lnf_stats.0, &mut ws.lnf_stats.1);
                k::layernorm_forward(&mut ws.lnf, m, r, x_last, p(w), p(bb), c);
                &ws.lnf
            }
            None => x_last,
        };
        k::linear_forward(&mut ws.logits, xf, wte, None, (n, c, v));
        k::logsumexp_rows(&mut ws.lse, &ws.logits, v);

        // Sums over positions in f64 so the reported loss does not depend on
        // the order of a long f32 sum.
        let mean_log_z = ws.lse.iter().map(|x| x.to_f64x()).sum::<f64>() / n as f64;
        let (loss, cross_entropy) = match targets {
            Some(tg) => {
                let (mut ce, mut z2) = (0.0f64, 0.0f64);
                for (i, (&l, &tgt)) in ws.lse.iter().zip(tg).enumerate() {
                    let l = l.to_f64x();
                    ce += l - ws.logits[i * v + tgt as usize].to_f64x();
                    z2 += l * l;
                }
                let ce = ce / n as f64;
                (ce + cfg.z_loss * z2 / n as f64, ce)
            }
            None => (f64::NAN, f64::NAN),
        };
        GptStats {
            loss,
            cross_entropy,
            mean_log_z,
            max_attn_logit,
        }
    }

    /// Backward of the last [`Gpt::forward_unchecked`] with the same inputs.
    fn backward<P: AsRef<[T]>, G: AsMut<[T]>>(
        &mut self,
        params: &[P],
        grads: &mut [G],
        tokens: &[u32],
        targets: &[u32],
    ) {
        let cfg = &self.config;
        let lay = &self.layout;
        let ws = &mut self.ws;
        let (b, t) = (ws.b, ws.t);
        let p = |i: usize| params[i].as_ref();
        let (c, v, h, nl) = (cfg.n_embd, cfg.vocab_size, cfg.n_head, cfg.n_layer);
        let n = b * t;
        let nc = n * c;
        let shape = AttnShape { t, c, h };
        let ones = &ws.ones[..];

        // Every kernel below accumulates into the parameter gradients.
        for g in grads.iter_mut() {
            g.as_mut().par_iter_mut().for_each(|x| *x = T::zero());
        }

        k::loss_backward(&mut ws.dlogits, &ws.logits, &ws.lse, targets, cfg.z_loss, v);
        let x_last = &ws.resid[nl * nc..];
        let xf: &[T] = if lay.ln_f.is_some() { &ws.lnf } else { x_last };
        // Tied head: logits = xf wte^T, so wte gets dlogits^T xf here and the
        // embedding's gradient below.
        let dxf = if lay.ln_f.is_some() {
            &mut ws.dln
        } else {
            &mut ws.dres
        };
        k::linear_backward(
            Some((dxf, Accum::Replace)),
            grads[lay.wte].as_mut(),
            None,
            &ws.dlogits,
            xf,
            p(lay.wte),
            ones,
            (n, c, v),
        );
        if let Some(lnf) = lay.ln_f {
            let (dw, db) = pair_mut(grads, lnf);
            let (m, r) = (&ws.lnf_stats.0, &ws.lnf_stats.1);
            k::layernorm_backward(
                &mut ws.dres,
                false,
                dw,
                db,
                &ws.dln,
                x_last,
                m,
                r,
                p(lnf.0),
                c,
            );
        }

        // `dres` holds the gradient of the block's output; each iteration
        // turns it into the gradient of the block's input.
        for (l, li) in lay.layers.iter().enumerate().rev() {
            let x_in = at(&ws.resid, l, nc);
            let ln1 = at(&ws.ln1, l, nc);
            let (ln1_m, ln1_r) = (at(&ws.ln1_stats.0, l, n), at(&ws.ln1_stats.1, l, n));
            let qkv = at(&ws.qkv, l, 3 * nc);
            let att = at(&ws.att, l, b * h * t * t);
            let atty = at(&ws.atty, l, nc);
            let s1 = at(&ws.s1, l, nc);
            let ln2 = at(&ws.ln2, l, nc);
            let (ln2_m, ln2_r) = (at(&ws.ln2_stats.0, l, n), at(&ws.ln2_stats.1, l, n));
            let fc = at(&ws.fc, l, 4 * nc);
            let fc_gelu = at(&ws.fc_gelu, l, 4 * nc);
            let (dres, dmid, dln) = (&mut ws.dres, &mut ws.dmid, &mut ws.dln);
            let (dfc, datty, dqkv) = (&mut ws.dfc, &mut ws.datty, &mut ws.dqkv);

            // MLP: out = in + mlp(in') with (in, in') = (s1, ln_2(s1)) in
            // pre-LN, (ln_1(s1), ln_1(s1)) in post-LN followed by ln_2.
            let dmlp_out: &[T] = match cfg.norm {
                Norm::Pre => dres,
                Norm::Post => {
                    let s2 = at(&ws.s2, l, nc);
                    let (dw, db) = pair_mut(grads, li.ln_2);
                    k::layernorm_backward(
                        dmid,
                        false,
                        dw,
                        db,
                        dres,
                        s2,
                        ln2_m,
                        ln2_r,
                        p(li.ln_2.0),
                        c,
                    );
                    dmid
                }
            };
            let mlp_in = if cfg.norm == Norm::Pre { ln2 } else { ln1 };
            let pr = li.mlp_proj;
            let (dw, db) = pair_mut(grads, pr);
            k::linear_backward(
                Some((dfc, Accum::Replace)),
                dw,
                Some(db),
                dmlp_out,
                fc_gelu,
                p(pr.0),
                ones,
                (n, 4 * c, c),
            );
            k::gelu_backward(dfc, fc);
            let (dw, db) = pair_mut(grads, li.c_fc);
            k::linear_backward(
                Some((dln, Accum::Replace)),
                dw,
                Some(db),
                dfc,
                mlp_in,
                p(li.c_fc.0),
                ones,
                (n, c, 4 * c),
            );
            // Gradient of s1 (the attention residual sum) into `dmid`.
            match cfg.norm {
                Norm::Pre => {
                    // ds1 = dres (skip path) + ln_2 backward of dln.
                    dmid.copy_from_slice(dres);
                    let (dw, db) = pair_mut(grads, li.ln_2);
                    k::layernorm_backward(
                        dmid,
                        true,
                        dw,
                        db,
                        dln,
                        s1,
                        ln2_m,
                        ln2_r,
                        p(li.ln_2.0),
                        c,
                    );
                }
                Norm::Post => {
                    // d ln_1 output = ds2 (skip path, in dmid) + dln.
                    dln.iter_mut().zip(dmid.iter()).for_each(|(a, &b)| *a += b);
                    let (dw, db) = pair_mut(grads, li.ln_1);
                    k::layernorm_backward(
                        dmid,
                        false,
                        dw,
                        db,
                        dln,
                        s1,
                        ln1_m,
                        ln1_r,
                        p(li.ln_1.0),
                        c,
                    );
                }
            }

            // Attention: s1 = x_in + proj(attn(a_in)), a_in = ln_1(x_in) (pre)
            // or x_in (post).
            let pr = li.attn_proj;
            let (dw, db) = pair_mut(grads, pr);
            k::linear_backward(
                Some((datty, Accum::Replace)),
                dw,
                Some(db),
                dmid,
                atty,
                p(pr.0),
                ones,
                (n, c, c),
            );
            let (qk, qk_stride): (&[T], usize) = match li.qk_norm {
                Some(_) => (at(&ws.qkn, l, 2 * nc), 2 * c),
                None => (qkv, 3 * c),
            };
            k::attention_backward(dqkv, &mut ws.dscores, datty, att, qk, qk_stride, qkv, shape);
            if let Some([qw, qb, kw, kb]) = li.qk_norm {
                let (m, r) = (
                    at(&ws.qkn_stats.0, l, 2 * n * h),
                    at(&ws.qkn_stats.1, l, 2 * n * h),
                );
                // The four tensors are consecutive (q weight, q bias, k weight,
                // k bias), so one split gives both pairs.
                let (lo, hi) = grads.split_at_mut(kw);
                let (dq_w, dq_b) = pair_mut(lo, (qw, qb));
                let (dkw, dkb) = pair_mut(hi, (0, kb - kw));
                k::qk_norm_backward(
                    dqkv,
                    (dq_w, dq_b),
                    (dkw, dkb),
                    qkv,
                    m,
                    r,
                    (p(qw), p(kw)),
                    c,
                    h,
                );
            }
            let attn_in = if cfg.norm == Norm::Pre { ln1 } else { x_in };
            let (dw, db) = pair_mut(grads, li.c_attn);
            match cfg.norm {
                Norm::Pre => {
                    k::linear_backward(
                        Some((dln, Accum::Replace)),
                        dw,
                        Some(db),
                        dqkv,
                        attn_in,
                        p(li.c_attn.0),
                        ones,
                        (n, c, 3 * c),
                    );
                    // dx_in = ds1 (skip path) + ln_1 backward of dln.
                    dres.copy_from_slice(dmid);
                    let (dw, db) = pair_mut(grads, li.ln_1);
                    k::layernorm_backward(
                        dres,
                        true,
                        dw,
                        db,
                        dln,
                        x_in,
                        ln1_m,
                        ln1_r,
                        p(li.ln_1.0),
                        c,
                    );
                }
                Norm::Post => {
                    // dx_in = ds1 (skip path) + c_attn backward.
                    dres.copy_from_slice(dmid);
                    k::linear_backward(
                        Some((dres, Accum::Add)),
                        dw,
                        Some(db),
                        dqkv,
                        attn_in,
                        p(li.c_attn.0),
                        ones,
                        (n, c, 3 * c),
                    );
                }
            }
        }

        // Embedding: both tables get embed_scale * dx; rows of repeated
        // tokens and positions sum, so this scatter stays sequential.
        let es = T::from_f64x(cfg.embed_scale);
        let dx = &ws.dres[..nc];
        {
            let dwte = grads[lay.wte].as_mut();
            for (row, &tok) in dx.chunks(c).zip(tokens) {
                let g = &mut dwte[tok as usize * c..][..c];
                g.iter_mut().zip(row).for_each(|(g, &d)| *g += es * d);
            }
        }
        let dwpe = grads[lay.wpe].as_mut();
        for (i, row) in dx.chunks(c).enumerate() {
            let g = &mut dwpe[(i % t) * c..][..c];
            g.iter_mut().zip(row).for_each(|(g, &d)| *g += es * d);
        }
    }
}

/// `out = a + b`, elementwise.
fn add_into<T: Real>(out: &mut [T], a: &[T], b: &[T]) {
    out.par_chunks_mut(8192)
        .zip(a.par_chunks(8192).zip(b.par_chunks(8192)))
        .for_each(|(o, (a, b))| {
            for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                *o = a + b;
            }
        });
}

/// Checks a buffer list against the specs (count and lengths).
fn check_buffers(
    specs: &[ParamSpec],
    lens: impl ExactSizeIterator<Item = usize>,
    what: &str,
) -> Result<()> {
    if lens.len() != specs.len() {
        return Err(KeelError::shape(
            what,
            format!("expected {} buffers, got {}", specs.len(), lens.len()),
        ));
    }
    for (s, len) in specs.iter().zip(lens) {
        if len != s.numel() {
            return Err(KeelError::shape(
                &s.name,
                format!(
                    "{what} buffer has {len} elements, shape {:?} needs {}",
                    s.shape,
                    s.numel()
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The activations' size written out from the buffers' shapes, apart
    /// from `Workspace::build`, for `[b, t]` (in elements).
    fn expected_elements(cfg: &GptConfig, b: usize, t: usize) -> usize {
        let (l, c, v, h) = (cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.n_head);
        let n = b * t;
        // resid, ln1, qkv, atty, s1, ln2, fc, fc_gelu; ln1 and ln2 stats;
        // attention probabilities.
        let mut e = (l + 1) * n * c + l * n * c * (1 + 3 + 1 + 1 + 1 + 4 + 4);
        e += 2 * 2 * l * n + l * b * h * t * t;
        if cfg.qk_norm {
            e += l * n * 2 * c + 2 * l * n * 2 * h;
        }
        match cfg.norm {
            Norm::Pre => e += n * c + 2 * n,
            Norm::Post => e += l * n * c,
        }
        // logits, lse, max_logit, branch, dlogits, dres, dmid, dln, dqkv,
        // dfc, datty, dscores, ones.
        e + n * v
            + n
            + b
            + n * c
            + n * v
            + 3 * n * c
            + 3 * n * c
            + 4 * n * c
            + n * c
            + b * t * t
            + n.max(v)
    }

    #[test]
    fn activation_bytes_match_the_buffers() {
        for (norm, qk) in [
            (Norm::Pre, false),
            (Norm::Pre, true),
            (Norm::Post, false),
            (Norm::Post, true),
        ] {
            let mut cfg = GptConfig::new(11, 8, 3, 2, 6);
            cfg.norm = norm;
            cfg.qk_norm = qk;
            for (b, t) in [(1, 1), (2, 5), (3, 8)] {
                let want = expected_elements(&cfg, b, t);
                assert_eq!(Workspace::<f32>::bytes(&cfg, b, t), 4 * want as u128);
                assert_eq!(Workspace::<f64>::bytes(&cfg, b, t), 8 * want as u128);
                let model = Gpt::<f32>::new(cfg.clone()).unwrap();
                assert_eq!(model.activation_bytes(b, t), 4 * want as u128);
            }
        }
        // A real pass over a reshaped batch still runs (the workspace follows
        // the shape).
        let mut model = Gpt::<f64>::new(GptConfig::new(11, 8, 1, 2, 4)).unwrap();
        let params = model.init_params(0);
        for (b, t) in [(2, 3), (1, 8)] {
            let tokens: Vec<u32> = (0..b * t).map(|i| (i % 11) as u32).collect();
            let stats = model
                .forward(&params, &tokens, Some(&tokens), b, t)
                .unwrap();
            assert!((stats.loss - 11f64.ln()).abs() < 0.1, "{}", stats.loss);
            assert_eq!(model.logits().len(), b * t * 11);
        }
    }

    #[test]
    fn the_parameter_bound_holds() {
        for (norm, qk) in [(Norm::Pre, false), (Norm::Pre, true), (Norm::Post, true)] {
            for (v, bs, l, h, c) in [(11, 8, 3, 2, 6), (65, 64, 1, 4, 32), (2, 1, 2, 1, 1)] {
                let mut cfg = GptConfig::new(v, bs, l, h, c);
                cfg.norm = norm;
                cfg.qk_norm = qk;
                let n = Gpt::<f32>::new(cfg.clone()).unwrap().num_params() as u128;
                let bound = param_bound(&cfg);
                // Exceeds the count by at most the 4C per block that
                // qk-norm's gains take when it is on.
                assert!(
                    bound >= n && bound - n <= 4 * (c * l) as u128 + 2 * c as u128,
                    "{cfg:?}"
                );
            }
        }
    }

    /// A pass whose activations cannot be allocated fails, and the model
    /// still runs passes of other shapes afterwards.
    #[cfg(all(target_os = "linux", target_pointer_width = "64"))]
    #[test]
    fn a_refused_workspace_leaves_the_model_usable() {
        // T = 2^20 (4 MiB of tokens), 16 blocks of 16 heads: 2^48 attention
        // probabilities (1 PiB), which the allocator refuses.
        let t = 1 << 20;
        let mut model = Gpt::<f32>::new(GptConfig::new(65, t, 16, 16, 16)).unwrap();
        let params = model.init_params(0);
        let tokens: Vec<u32> = (0..t).map(|i| (i % 65) as u32).collect();
        let e = model.forward(&params, &tokens, None, 1, t).unwrap_err();
        assert!(matches!(e, KeelError::Memory { .. }), "{e:?}");
        let stats = model
            .forward(&params, &tokens[..4], Some(&tokens[1..5]), 1, 4)
            .unwrap();
        assert!((stats.loss - 65f64.ln()).abs() < 0.1, "{}", stats.loss);
    }

    #[test]
    fn impossible_activations_are_an_error_before_any_allocation() {
        let cfg = GptConfig::new(65, 1 << 30, 4, 4, 64);
        // L * B * H * T^2 attention probabilities alone: 2^4 * 2^20 * 2^60.
        let e = Workspace::<f32>::new(&cfg, 1 << 20, 1 << 30).unwrap_err();
        match &e {
            KeelError::Memory { what, needed, .. } => {
                assert!(what.contains("1048576 x 1073741824"), "{what}");
                assert!(*needed > isize::MAX as u128);
            }
            other => panic!("expected a memory error, got {other:?}"),
        }
        assert_eq!(
            Workspace::<f32>::bytes(&cfg, usize::MAX, usize::MAX),
            u128::MAX
        );
        // Parameters beyond any address space (12 C^2 with C = 2^40):
        // refused by the constructor, with their size; so are 2^50 blocks
        // (their list alone), and a width whose 4C overflows by validation.
        let e = Gpt::<f32>::new(GptConfig::new(65, 8, 1, 1, 1 << 40)).unwrap_err();
        assert!(e.to_string().contains("the GPT's parameters: needs"), "{e}");
        let e = Gpt::<f32>::new(GptConfig::new(65, 8, 1 << 50, 1, 2)).unwrap_err();
        assert!(e.to_string().contains("list of parameter tensors"), "{e}");
        let e = Gpt::<f32>::new(GptConfig::new(65, 8, 1, 1, 1 << 62)).unwrap_err();
        assert!(
            e.to_string()
                .contains("`n_embd`: 4611686018427387904 is too large"),
            "{e}"
        );
    }
}
