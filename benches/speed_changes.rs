//! What each speed change of issue 11 buys, op by op, on the CPU in f32: every fused op of
//! [`grpo::model::ops`] against its composite form (the `*_composite` function: the candle ops it
//! replaced, which CUDA and the tests still use), forward AND backward, at the shapes of one
//! grouped training chunk (1 prompt of 62 tokens and 16 completions of 64 tokens attending to
//! it: 62 + 16 × 64 = 1086 rows), for the mid model of `benches/train_step.rs` (hidden 512) and
//! the Qwen2.5-0.5B shape (hidden 896):
//!
//! - `<model>/<op>/{composite,fused}`: the op applied as one decoder layer applies it, to the
//!   prompt part (`[1, 62, ..]`, 62 keys) and the completion part (`[16, 64, ..]`, 62 + 64 keys)
//!   of the chunk, then `Σ output · upstream` (a fixed random upstream gradient) and
//!   `.backward()`. Trainable inputs (weights, activations, scores) are `Var`s; the rotary tables
//!   and the mask bias are constants, as in the model. Before timing, the bench checks that
//!   both forms give the same outputs. `<model>/<op>/loss_only` is that loss and backward alone,
//!   on `Var` stand-ins for the outputs: the cost both forms share, to subtract from both. The ops and their count per decoder layer: `q_proj` (1,
//!   with bias), `k_v_proj` (2, with bias), `o_proj` (1), `gate_up_proj` (2), `down_proj` (1),
//!   `rms_norm` (2), `rope_q_k` (1: queries and keys), `split_heads_q_k_v` (1), `merge_heads`
//!   (1), `swiglu` (1), `attention_softmax` (1; its composite form still ends in the fused
//!   softmax, so the scale and mask are what it compares), `softmax` (the softmax inside it,
//!   at the same scores) and `attention` (1: the whole attention from the rotated heads, the
//!   fused node against the two matmuls around the fused attention softmax).
//! - `<model>/decode_gate_up_<n>_rows/{composite,fused}`: the decoding product of n = 16 rows
//!   (one token of each of 16 sequences) and n = 4 (issue 11's 0.5B setting, G = 4) by the
//!   gate/up weight, forward only, without a graph: candle's matmul (`linear_composite`)
//!   against `FewRowsMatmul` (what `linear` takes there).
//! - `<model>/lm_head/{logprobs_fwd_bwd,logits}`: the per-token log-probs of the completion
//!   rows, forward and backward, with the forward's logits kept for the backward (they fit:
//!   rows × vocab ≤ 32 M), and the logits product alone, which is what the backward would
//!   recompute without them. Rows: the chunk's 16 × 64 for the mid model; 4 × 32 for the
//!   0.5B shape (issue 11's 0.5B setting: at 16 × 64 rows its 151,936-token logits do not fit
//!   and are recomputed anyway).
//!
//! Like `grpo`, the bench first makes glibc keep freed memory for reuse
//! (`grpo::memory::reuse_freed_memory`); with `SPEED_CHANGES_DEFAULT_MALLOC=1` it leaves
//! glibc's defaults, so two runs show what that setting buys. Run with
//! `cargo bench --bench speed_changes`; see `docs/BENCHMARKS.md`.

use std::hint::black_box;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

use grpo::model::ops::{
    apply_rope, apply_rope_composite, attention, attention_composite, attention_softmax,
    attention_softmax_composite, causal_bias, linear, linear_composite, merge_heads,
    merge_heads_composite, rms_norm, rms_norm_composite, rope_tables, softmax_composite,
    softmax_last_dim, split_heads, split_heads_composite, swiglu, swiglu_composite,
};
use grpo::model::{token_logprobs, Qwen2, Qwen2Config};

mod common;
use common::{mid_size_config, qwen05b_config};

const PROMPT_LEN: usize = 62;
const GROUP_SIZE: usize = 16;
const COMPLETION_LEN: usize = 64;
/// Sequences decoded together (one new token each).
const DECODE_ROWS: [usize; 2] = [16, 4];
/// Completions and their length in issue 11's 0.5B setting (1 prompt × 4 × 32).
const QWEN05B_LM_HEAD_ROWS: usize = 4 * 32;
const SEED: u64 = 42;

/// One part of a grouped training chunk as a decoder layer sees it.
struct Part {
    batch: usize,
    queries: usize,
    keys: usize,
    /// Position of the first query.
    first_position: usize,
}

/// The prompt, run once, and its completions, attending to its keys and causally to their own.
const PARTS: [Part; 2] = [
    Part {
        batch: 1,
        queries: PROMPT_LEN,
        keys: PROMPT_LEN,
        first_position: 0,
    },
    Part {
        batch: GROUP_SIZE,
        queries: COMPLETION_LEN,
        keys: PROMPT_LEN + COMPLETION_LEN,
        first_position: PROMPT_LEN,
    },
];

#[derive(Clone, Copy, Debug)]
enum Form {
    /// The `*_composite` function: elementary candle ops.
    Composite,
    /// The function the model calls: a fused CPU op.
    Fused,
}

impl Form {
    fn id(self) -> &'static str {
        match self {
            Form::Composite => "composite",
            Form::Fused => "fused",
        }
    }
}

/// A part's inputs that get a gradient, and its constants.
struct PartInputs {
    vars: Vec<Var>,
    constants: Vec<Tensor>,
}

type Apply = dyn Fn(Form, &[Tensor], &[Tensor], &[Tensor]) -> candle_core::Result<Vec<Tensor>>;

/// One op over the chunk: `apply(form, shared, part vars, part constants)` gives a part's
/// outputs; `shared` (a weight) serves every part, as a layer's weight does.
struct OpCase {
    op: &'static str,
    shared: Vec<Var>,
    parts: Vec<PartInputs>,
    apply: Box<Apply>,
}

impl OpCase {
    fn outputs(&self, form: Form) -> candle_core::Result<Vec<Tensor>> {
        let shared = tensors(&self.shared);
        let mut outputs = Vec::new();
        for part in &self.parts {
            outputs.extend((self.apply)(
                form,
                &shared,
                &tensors(&part.vars),
                &part.constants,
            )?);
        }
        Ok(outputs)
    }
}

fn tensors(vars: &[Var]) -> Vec<Tensor> {
    vars.iter().map(|v| v.as_tensor().clone()).collect()
}

fn random(rng: &mut StdRng, dims: &[usize], mean: f32, std: f32) -> Result<Tensor> {
    let normal = Normal::new(mean, std)?;
    let values: Vec<f32> = (0..dims.iter().product())
        .map(|_| normal.sample(rng))
        .collect();
    Ok(Tensor::from_vec(values, dims, &Device::Cpu)?)
}

fn random_var(rng: &mut StdRng, dims: &[usize], std: f32) -> Result<Var> {
    Ok(Var::from_tensor(&random(rng, dims, 0.0, std)?)?)
}

/// Per part, one activation `Var` of each shape `dims(part)` gives.
fn activations(
    rng: &mut StdRng,
    dims: impl Fn(&Part) -> Vec<Vec<usize>>,
) -> Result<Vec<PartInputs>> {
    PARTS
        .iter()
        .map(|part| {
            let vars = dims(part)
                .iter()
                .map(|d| random_var(rng, d, 1.0))
                .collect::<Result<_>>()?;
            Ok(PartInputs {
                vars,
                constants: Vec::new(),
            })
        })
        .collect()
}

/// A projection `[.., inputs] → [.., outputs]` of the layer (weight `[outputs, inputs]`, optional
/// bias) applied to the chunk's activations.
fn linear_case(
    rng: &mut StdRng,
    op: &'static str,
    inputs: usize,
    outputs: usize,
    with_bias: bool,
) -> Result<OpCase> {
    let mut shared = vec![random_var(rng, &[outputs, inputs], 0.02)?];
    if with_bias {
        shared.push(random_var(rng, &[outputs], 0.02)?);
    }
    Ok(OpCase {
        op,
        shared,
        parts: activations(rng, |p| vec![vec![p.batch, p.queries, inputs]])?,
        apply: Box::new(|form, shared, vars, _| {
            let (weight, bias) = (&shared[0], shared.get(1));
            Ok(vec![match form {
                Form::Composite => linear_composite(&vars[0], weight, bias)?,
                Form::Fused => linear(&vars[0], weight, bias)?,
            }])
        }),
    })
}

/// The rotary tables of a part's query positions.
fn rope_constants(part: &Part, config: &Qwen2Config) -> Result<Vec<Tensor>> {
    let positions: Vec<i64> = (0..part.batch)
        .flat_map(|_| (part.first_position..part.first_position + part.queries).map(|p| p as i64))
        .collect();
    let positions = Tensor::from_vec(positions, (part.batch, part.queries), &Device::Cpu)?;
    let (cos, sin) = rope_tables(&positions, config.head_dim, config.rope_theta)?;
    Ok(vec![cos, sin])
}

/// A part's attention bias: causal over its own queries, every earlier key visible.
fn attention_bias(part: &Part) -> Result<Tensor> {
    let key_mask = Tensor::ones((part.batch, part.keys), DType::U8, &Device::Cpu)?;
    Ok(causal_bias(&key_mask, part.queries)?)
}

/// Every op a decoder layer of `config` runs on the training chunk, fused or composite.
fn layer_cases(config: &Qwen2Config) -> Result<Vec<OpCase>> {
    let mut rng = StdRng::seed_from_u64(SEED);
    let rng = &mut rng;
    let (h, i, d) = (
        config.hidden_size,
        config.intermediate_size,
        config.head_dim,
    );
    let (heads, kv_heads) = (config.num_attention_heads, config.num_key_value_heads);
    let eps = config.rms_norm_eps;
    let scale = 1.0 / (d as f64).sqrt();
    // The scores of a part's query heads grouped by key head, as the model computes them.
    let scores = move |p: &Part| vec![p.batch, kv_heads, heads / kv_heads * p.queries, p.keys];

    let mut rope = OpCase {
        op: "rope_q_k",
        shared: Vec::new(),
        parts: activations(rng, |p| {
            vec![
                vec![p.batch, heads, p.queries, d],
                vec![p.batch, kv_heads, p.queries, d],
            ]
        })?,
        apply: Box::new(|form, _, vars, constants| {
            let (cos, sin) = (&constants[0], &constants[1]);
            vars.iter()
                .map(|x| match form {
                    Form::Composite => apply_rope_composite(x, cos, sin),
                    Form::Fused => apply_rope(x, cos, sin),
                })
                .collect()
        }),
    };
    for (inputs, part) in rope.parts.iter_mut().zip(&PARTS) {
        inputs.constants = rope_constants(part, config)?;
    }

    let mut softmax_case = OpCase {
        op: "attention_softmax",
        shared: Vec::new(),
        parts: activations(rng, |p| vec![scores(p)])?,
        apply: Box::new(move |form, _, vars, constants| {
            Ok(vec![match form {
                Form::Composite => attention_softmax_composite(&vars[0], &constants[0], scale)?,
                Form::Fused => attention_softmax(&vars[0], &constants[0], scale)?,
            }])
        }),
    };
    for (inputs, part) in softmax_case.parts.iter_mut().zip(&PARTS) {
        inputs.constants = vec![attention_bias(part)?];
    }

    let mut attention_case = OpCase {
        op: "attention",
        shared: Vec::new(),
        parts: activations(rng, |p| {
            let rows = heads / kv_heads * p.queries;
            vec![
                vec![p.batch, kv_heads, rows, d],
                vec![p.batch, kv_heads, p.keys, d],
                vec![p.batch, kv_heads, p.keys, d],
            ]
        })?,
        apply: Box::new(move |form, _, vars, constants| {
            let (q, k, v, bias) = (&vars[0], &vars[1], &vars[2], &constants[0]);
            Ok(vec![match form {
                Form::Composite => attention_composite(q, k, v, bias, scale)?,
                Form::Fused => attention(q, k, v, bias, scale)?,
            }])
        }),
    };
    for (inputs, part) in attention_case.parts.iter_mut().zip(&PARTS) {
        inputs.constants = vec![attention_bias(part)?];
    }

    Ok(vec![
        linear_case(rng, "q_proj", h, heads * d, config.qkv_bias())?,
        linear_case(rng, "k_v_proj", h, kv_heads * d, config.qkv_bias())?,
        linear_case(rng, "o_proj", heads * d, h, config.o_proj_bias())?,
        linear_case(rng, "gate_up_proj", h, i, false)?,
        linear_case(rng, "down_proj", i, h, false)?,
        OpCase {
            op: "rms_norm",
            shared: vec![Var::from_tensor(&random(rng, &[h], 1.0, 0.1)?)?],
            parts: activations(rng, |p| vec![vec![p.batch, p.queries, h]])?,
            apply: Box::new(move |form, shared, vars, _| {
                Ok(vec![match form {
                    Form::Composite => rms_norm_composite(&vars[0], &shared[0], eps)?,
                    Form::Fused => rms_norm(&vars[0], &shared[0], eps)?,
                }])
            }),
        },
        rope,
        OpCase {
            op: "split_heads_q_k_v",
            shared: Vec::new(),
            parts: activations(rng, |p| {
                let kv = vec![p.batch, p.queries, kv_heads * d];
                vec![vec![p.batch, p.queries, heads * d], kv.clone(), kv]
            })?,
            apply: Box::new(move |form, _, vars, _| {
                [heads, kv_heads, kv_heads]
                    .iter()
                    .zip(vars)
                    .map(|(&n, x)| match form {
                        Form::Composite => split_heads_composite(x, n),
                        Form::Fused => split_heads(x, n),
                    })
                    .collect()
            }),
        },
        softmax_case,
        attention_case,
        OpCase {
            op: "softmax",
            shared: Vec::new(),
            parts: activations(rng, |p| vec![vec![p.batch, heads, p.queries, p.keys]])?,
            apply: Box::new(|form, _, vars, _| {
                Ok(vec![match form {
                    Form::Composite => softmax_composite(&vars[0])?,
                    Form::Fused => softmax_last_dim(&vars[0])?,
                }])
            }),
        },
        OpCase {
            op: "merge_heads",
            shared: Vec::new(),
            parts: activations(rng, |p| vec![vec![p.batch, heads, p.queries, d]])?,
            apply: Box::new(|form, _, vars, _| {
                Ok(vec![match form {
                    Form::Composite => merge_heads_composite(&vars[0])?,
                    Form::Fused => merge_heads(&vars[0])?,
                }])
            }),
        },
        OpCase {
            op: "swiglu",
            shared: Vec::new(),
            parts: activations(rng, |p| vec![vec![p.batch, p.queries, i]; 2])?,
            apply: Box::new(|form, _, vars, _| {
                Ok(vec![match form {
                    Form::Composite => swiglu_composite(&vars[0], &vars[1])?,
                    Form::Fused => swiglu(&vars[0], &vars[1])?,
                }])
            }),
        },
    ])
}

/// Largest absolute difference between `a` and `b`, over the larger of 1 and `b`'s magnitude.
fn relative_difference(a: &Tensor, b: &Tensor) -> Result<f32> {
    let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let scale = b.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
    Ok(diff / scale)
}

/// `Σ output · upstream` over `outputs`, then its backward.
fn loss_backward(outputs: &[Tensor], upstream: &[Tensor]) -> Result<()> {
    let mut loss = Tensor::zeros((), DType::F32, &Device::Cpu)?;
    for (output, upstream) in outputs.iter().zip(upstream) {
        loss = (loss + (output * upstream)?.sum_all()?)?;
    }
    black_box(loss.backward()?);
    Ok(())
}

fn bench_op(c: &mut Criterion, model: &str, case: &OpCase) -> Result<()> {
    let composite = case.outputs(Form::Composite)?;
    let fused = case.outputs(Form::Fused)?;
    for (c, f) in composite.iter().zip(&fused) {
        ensure!(
            c.dims() == f.dims(),
            "{model}/{}: output shapes differ",
            case.op
        );
        let diff = relative_difference(f, c)?;
        ensure!(
            diff < 1e-4,
            "{model}/{}: fused and composite outputs differ by {diff}",
            case.op
        );
    }
    let mut rng = StdRng::seed_from_u64(SEED + 1);
    let upstream = fused
        .iter()
        .map(|output| random(&mut rng, output.dims(), 0.0, 1.0))
        .collect::<Result<Vec<_>>>()?;
    let mut group = c.benchmark_group(format!("{model}/{}", case.op));
    group.sampling_mode(SamplingMode::Flat);
    for form in [Form::Composite, Form::Fused] {
        group.bench_function(form.id(), |b| {
            b.iter(|| {
                let outputs = case.outputs(form).expect("forward failed");
                loss_backward(&outputs, &upstream).expect("backward failed")
            })
        });
    }
    // The same loss and backward on stand-ins for the outputs: the cost both forms share.
    let stand_ins = fused
        .iter()
        .map(|output| Ok(Var::from_tensor(output)?.as_tensor().clone()))
        .collect::<Result<Vec<_>>>()?;
    group.bench_function("loss_only", |b| {
        b.iter(|| loss_backward(&stand_ins, &upstream).expect("backward failed"))
    });
    group.finish();
    Ok(())
}

/// One decoding step's gate/up product for `rows` sequences, no graph.
fn bench_decode(c: &mut Criterion, model: &str, config: &Qwen2Config, rows: usize) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(SEED);
    let (h, i) = (config.hidden_size, config.intermediate_size);
    let x = random(&mut rng, &[rows, h], 0.0, 1.0)?;
    let weight = random(&mut rng, &[i, h], 0.0, 0.02)?;
    let diff = relative_difference(
        &linear(&x, &weight, None)?,
        &linear_composite(&x, &weight, None)?,
    )?;
    ensure!(
        diff < 1e-4,
        "{model}: the decoding products differ by {diff}"
    );
    let mut group = c.benchmark_group(format!("{model}/decode_gate_up_{rows}_rows"));
    group.sampling_mode(SamplingMode::Flat);
    for form in [Form::Composite, Form::Fused] {
        group.bench_function(form.id(), |b| {
            b.iter(|| {
                black_box(match form {
                    Form::Composite => linear_composite(&x, &weight, None),
                    Form::Fused => linear(&x, &weight, None),
                })
                .expect("the product failed")
            })
        });
    }
    group.finish();
    Ok(())
}

/// The lm-head's log-probs over `rows` completion positions (forward and backward, logits kept)
/// and the logits product alone, on a model of `config`'s embeddings and no layers.
fn bench_lm_head(c: &mut Criterion, model: &str, config: &Qwen2Config, rows: usize) -> Result<()> {
    let config = Qwen2Config {
        num_hidden_layers: 0,
        ..config.clone()
    };
    let (h, vocab) = (config.hidden_size, config.vocab_size);
    ensure!(
        config.tie_word_embeddings,
        "{model}: the lm-head bench builds tied embeddings only"
    );
    let mut rng = StdRng::seed_from_u64(SEED);
    let parameters = vec![
        (
            "model.embed_tokens.weight".to_string(),
            random(&mut rng, &[vocab, h], 0.0, 0.02)?,
        ),
        (
            "model.norm.weight".to_string(),
            Tensor::ones(h, DType::F32, &Device::Cpu)?,
        ),
    ];
    let policy = Qwen2::from_parameters(config, parameters, true)?;
    let hidden = random_var(&mut rng, &[1, rows, h], 1.0)?;
    let targets: Vec<u32> = (0..rows).map(|r| (r * 7919 % vocab) as u32).collect();
    let targets = Tensor::from_vec(targets, (1, rows), &Device::Cpu)?;
    let mask = Tensor::ones((1, rows), DType::F32, &Device::Cpu)?;
    let detached = hidden.as_tensor().detach();

    let mut group = c.benchmark_group(format!("{model}/lm_head"));
    group.sampling_mode(SamplingMode::Flat);
    group.bench_function("logprobs_fwd_bwd", |b| {
        b.iter(|| {
            let logprobs = token_logprobs(&policy, hidden.as_tensor(), &targets, &mask, 1.0, true)
                .expect("log-probs failed");
            black_box(
                logprobs
                    .logprobs
                    .sum_all()
                    .and_then(|loss| loss.backward())
                    .expect("backward failed"),
            )
        })
    });
    group.bench_function("logits", |b| {
        b.iter(|| black_box(policy.lm_head(&detached).expect("logits failed")))
    });
    group.finish();
    Ok(())
}

fn benchmarks(c: &mut Criterion) {
    let run = |c: &mut Criterion| -> Result<()> {
        if std::env::var_os("SPEED_CHANGES_DEFAULT_MALLOC").is_some_and(|v| v == "1") {
            println!("allocator: glibc defaults");
        } else {
            grpo::memory::reuse_freed_memory();
            println!("allocator: freed memory kept for reuse (as grpo sets it)");
        }
        let models = [
            ("mid", mid_size_config(), GROUP_SIZE * COMPLETION_LEN),
            ("qwen05b", qwen05b_config(), QWEN05B_LM_HEAD_ROWS),
        ];
        for (model, config, lm_head_rows) in &models {
            for case in layer_cases(config).with_context(|| format!("{model}: building inputs"))? {
                bench_op(c, model, &case)?;
            }
            for rows in DECODE_ROWS {
                bench_decode(c, model, config, rows)?;
            }
            bench_lm_head(c, model, config, *lm_head_rows)?;
        }
        Ok(())
    };
    if let Err(error) = run(c) {
        panic!("benchmark setup failed: {error:#}");
    }
}

/// Ten samples and a short measurement per benchmark: the whole bench takes a few minutes on
/// two cores.
fn settings() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = speed_changes_benches;
    config = settings();
    targets = benchmarks
}
criterion_main!(speed_changes_benches);
