//! Throughput of the two hot loops of a GRPO step, on the golden tiny model
//! (`tests/fixtures/golden`, or `GRPO_GOLDEN_DIR`) and on a mid-size Qwen2 with random weights:
//!
//! - `generate/<model>`: [`generate`] of G sampled completions for each of B prompts, in
//!   generated tokens per second;
//! - `train_step/<model>/{grouped,plain}`: policy and reference log-probs → [`grpo_loss`] →
//!   backward, in batch tokens (`B·G·(P+C)`, TRL's `num_tokens`) per second. `grouped` is the
//!   shared-prefix forward the trainer uses (each prompt runs once for its G completions);
//!   `plain` is the batched forward over `[B·G, P+C]` with every completion repeating its
//!   prompt, as TRL computes it. Their ratio is the headline figure of `docs/BENCHMARKS.md`;
//! - `ref_logprobs/<model>/{grouped,plain}`: the forward-only part of that step (the frozen
//!   reference model's log-probs, no gradient graph), in the same tokens per second.
//!
//! After each `train_step`/`ref_logprobs` group the bench prints the plain/grouped time ratio
//! measured on alternating runs, which a shared machine's changing load hardly skews.
//!
//! Sampling and loss settings are the project defaults (`Config::default()`: temperature 0.9,
//! G = 8, one prompt per micro-batch, beta 0.04 so the reference model runs too).
//! Everything runs on the first CUDA device when the crate is built with `--features cuda`,
//! else on the CPU. Run with `cargo bench --bench train_step`; see `docs/BENCHMARKS.md`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

use grpo::config::Config;
use grpo::grpo::{grpo_loss, LossInputs, LossParams};
use grpo::model::{
    completion_logprobs, grouped_completion_logprobs, GroupedBatch, ModelFiles, Qwen2,
    TokenLogprobs,
};
use grpo::sampling::{generate, GenerationSpec, SamplingParams};

mod common;
use common::mid_size_config;

/// Prompt tokens of every training prompt (a GSM8K question in the chat template is ~100-150).
const PROMPT_LEN: usize = 128;
/// Completion tokens of every training completion.
const COMPLETION_LEN: usize = 64;
/// Lengths of the generation prompts: two, of different lengths, so left padding is exercised.
const GENERATION_PROMPT_LENS: [usize; 2] = [PROMPT_LEN, 100];
/// Tokens each generated completion runs to (no row may stop early, see [`no_early_stop`]).
const NEW_TOKENS: usize = 64;
const SEED: u64 = 42;

/// The trainable policy and the frozen reference model of one benchmarked size.
struct Models {
    name: &'static str,
    policy: Qwen2,
    reference: Qwen2,
}

impl Models {
    fn vocab_size(&self) -> usize {
        self.policy.config().vocab_size
    }

    fn device(&self) -> &Device {
        self.policy.lm_head_weight().device()
    }

    /// The golden tiny checkpoint and its `ref_model/`.
    fn golden(device: &Device) -> Result<Self> {
        let dir = std::env::var("GRPO_GOLDEN_DIR").unwrap_or_else(|_| {
            concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/golden").to_string()
        });
        let policy_files = ModelFiles::resolve(&dir, "main")?;
        let reference_files = ModelFiles::resolve(&format!("{dir}/ref_model"), "main")?;
        Ok(Self {
            name: "tiny",
            policy: Qwen2::load_policy(&policy_files, device)?,
            reference: Qwen2::load_reference(&reference_files, device)?,
        })
    }

    /// [`mid_size_config`] with seeded normal(0, 0.02) weights, norms 1 and biases 0, as
    /// transformers initialises a Qwen2; the reference model shares the policy's weights.
    fn mid_size(device: &Device) -> Result<Self> {
        let config = mid_size_config();
        let normal = Normal::new(0.0f32, 0.02)?;
        let mut rng = StdRng::seed_from_u64(SEED);
        let parameters = config
            .parameter_shapes()
            .into_iter()
            .map(|(name, shape)| {
                let count = shape.iter().product();
                let values: Vec<f32> = if name.ends_with("norm.weight") {
                    vec![1.0; count]
                } else if name.ends_with(".bias") {
                    vec![0.0; count]
                } else {
                    (0..count).map(|_| normal.sample(&mut rng)).collect()
                };
                Ok((name, Tensor::from_vec(values, shape, device)?))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            name: "mid",
            policy: Qwen2::from_parameters(config.clone(), parameters.clone(), true)?,
            reference: Qwen2::from_parameters(config, parameters, false)?,
        })
    }
}

fn random_tokens(rng: &mut StdRng, len: usize, vocab_size: usize) -> Vec<u32> {
    (0..len)
        .map(|_| rng.random_range(0..vocab_size as u32))
        .collect()
}

/// The generation of a training step with the default sampling settings. Its only EOS id is
/// `vocab_size`, which no logit can pick, so every row generates exactly `NEW_TOKENS` tokens.
fn generation_spec(config: &Config, vocab_size: usize) -> GenerationSpec {
    GenerationSpec {
        group_size: config.num_generations,
        max_new_tokens: NEW_TOKENS,
        eos_ids: vec![vocab_size as u32],
        pad_id: 0,
        params: SamplingParams::from_config(config),
        seed: SEED,
        entropy_temperature: None,
    }
}

/// Checks that every row ran to `NEW_TOKENS`, so the throughput counts tokens really generated.
fn no_early_stop(models: &Models, prompts: &[Vec<u32>], spec: &GenerationSpec) -> Result<()> {
    let completions = generate(&models.policy, prompts, spec)?;
    ensure!(
        completions.lengths.iter().all(|&len| len == NEW_TOKENS),
        "{}: a row stopped before {NEW_TOKENS} tokens (lengths {:?}); pick an EOS id the model \
         cannot produce",
        models.name,
        completions.lengths
    );
    Ok(())
}

fn bench_generation(c: &mut Criterion, models: &Models) -> Result<()> {
    let config = Config::default();
    let mut rng = StdRng::seed_from_u64(SEED);
    let prompts: Vec<Vec<u32>> = GENERATION_PROMPT_LENS
        .iter()
        .map(|&len| random_tokens(&mut rng, len, models.vocab_size()))
        .collect();
    let spec = generation_spec(&config, models.vocab_size());
    no_early_stop(models, &prompts, &spec)?;
    let generated_tokens = prompts.len() * spec.group_size * NEW_TOKENS;

    let mut group = c.benchmark_group("generate");
    group.sampling_mode(SamplingMode::Flat);
    group.throughput(Throughput::Elements(generated_tokens as u64));
    group.bench_function(models.name, |b| {
        b.iter(|| generate(&models.policy, &prompts, &spec).expect("generation failed"))
    });
    group.finish();
    Ok(())
}

/// How the completions' log-probs are computed.
#[derive(Clone, Copy)]
enum Forward {
    /// [`grouped_completion_logprobs`]: each prompt once, its G completions on its hidden states.
    Grouped,
    /// [`completion_logprobs`] over `[B·G, P+C]`: every completion repeats its prompt.
    Plain,
}

/// One micro-batch in both layouts, with all-ones masks (the mask changes no work).
struct TrainBatch {
    group_size: usize,
    /// `[B, P]` and `[B·G, C]`, for [`Forward::Grouped`].
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    /// `[B·G, P+C]`, for [`Forward::Plain`].
    input_ids: Tensor,
    attention_mask: Tensor,
    /// `[B·G]`, group-normalised-looking values of both signs.
    advantages: Tensor,
}

impl TrainBatch {
    fn random(config: &Config, vocab_size: usize, device: &Device) -> Result<Self> {
        let group_size = config.num_generations;
        let num_prompts = config.per_device_train_batch_size / group_size;
        ensure!(num_prompts > 0, "the default batch holds no whole group");
        let rows = num_prompts * group_size;
        let mut rng = StdRng::seed_from_u64(SEED);
        let prompts: Vec<Vec<u32>> = (0..num_prompts)
            .map(|_| random_tokens(&mut rng, PROMPT_LEN, vocab_size))
            .collect();
        let completions: Vec<Vec<u32>> = (0..rows)
            .map(|_| random_tokens(&mut rng, COMPLETION_LEN, vocab_size))
            .collect();
        let full: Vec<u32> = completions
            .iter()
            .enumerate()
            .flat_map(|(row, completion)| {
                prompts[row / group_size]
                    .iter()
                    .chain(completion)
                    .copied()
                    .collect::<Vec<_>>()
            })
            .collect();
        let advantages: Vec<f32> = (0..rows)
            .map(|row| (row % group_size) as f32 - (group_size as f32 - 1.0) / 2.0)
            .collect();
        Ok(Self {
            group_size,
            prompt_ids: Tensor::from_vec(prompts.concat(), (num_prompts, PROMPT_LEN), device)?,
            prompt_mask: Tensor::ones((num_prompts, PROMPT_LEN), DType::U32, device)?,
            completion_ids: Tensor::from_vec(completions.concat(), (rows, COMPLETION_LEN), device)?,
            completion_mask: Tensor::ones((rows, COMPLETION_LEN), DType::F32, device)?,
            input_ids: Tensor::from_vec(full, (rows, PROMPT_LEN + COMPLETION_LEN), device)?,
            attention_mask: Tensor::ones((rows, PROMPT_LEN + COMPLETION_LEN), DType::F32, device)?,
            advantages: Tensor::from_vec(advantages, rows, device)?,
        })
    }

    /// Prompt and completion tokens of the `[B·G, P+C]` batch.
    fn num_tokens(&self) -> usize {
        self.input_ids.elem_count()
    }

    fn logprobs(
        &self,
        model: &Qwen2,
        forward: Forward,
        temperature: f64,
        with_entropy: bool,
    ) -> Result<TokenLogprobs> {
        Ok(match forward {
            Forward::Grouped => grouped_completion_logprobs(
                model,
                &GroupedBatch {
                    prompt_ids: &self.prompt_ids,
                    prompt_mask: &self.prompt_mask,
                    completion_ids: &self.completion_ids,
                    completion_mask: &self.completion_mask,
                    group_size: self.group_size,
                },
                temperature,
                with_entropy,
            )?,
            Forward::Plain => completion_logprobs(
                model,
                &self.input_ids,
                &self.attention_mask,
                PROMPT_LEN,
                temperature,
                with_entropy,
            )?,
        })
    }
}

/// The trainer's micro-batch: policy log-probs with entropy, reference log-probs, the GRPO loss
/// with `old_logp = logp.detach()` (`num_iterations` 1), and its gradients.
fn train_step(
    models: &Models,
    batch: &TrainBatch,
    forward: Forward,
    config: &Config,
) -> Result<GradStore> {
    let policy = batch.logprobs(&models.policy, forward, config.temperature, true)?;
    let reference = batch.logprobs(&models.reference, forward, config.temperature, false)?;
    let old_logp = policy.logprobs.detach();
    let params = LossParams {
        max_completion_length: COMPLETION_LEN,
        gradient_accumulation_steps: 1,
        steps_per_generation: 1,
        ..LossParams::from_config(config, batch.completion_mask.elem_count())
    };
    let loss = grpo_loss(
        &LossInputs {
            logp: &policy.logprobs,
            old_logp: &old_logp,
            ref_logp: Some(&reference.logprobs),
            advantages: &batch.advantages,
            mask: &batch.completion_mask,
            entropy_mask: None,
        },
        &params,
    )?;
    Ok(loss.loss.backward()?)
}

/// Checks that both layouts compute the same log-probs, so the two benchmarks do the same job.
fn same_logprobs(models: &Models, batch: &TrainBatch, temperature: f64) -> Result<()> {
    let grouped = batch.logprobs(&models.policy, Forward::Grouped, temperature, false)?;
    let plain = batch.logprobs(&models.policy, Forward::Plain, temperature, false)?;
    let diff = (grouped.logprobs - plain.logprobs)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    ensure!(
        diff < 1e-3,
        "{}: grouped and plain log-probs differ by {diff}",
        models.name
    );
    Ok(())
}

fn bench_train_step(c: &mut Criterion, models: &Models) -> Result<()> {
    let config = Config::default();
    let batch = TrainBatch::random(&config, models.vocab_size(), models.device())?;
    same_logprobs(models, &batch, config.temperature)?;
    let tokens = batch.num_tokens();
    let name = models.name;
    let device = models.device();
    bench_layouts(
        c,
        &format!("train_step/{name}"),
        tokens,
        device,
        |forward| train_step(models, &batch, forward, &config),
    )?;
    bench_layouts(
        c,
        &format!("ref_logprobs/{name}"),
        tokens,
        device,
        |forward| batch.logprobs(&models.reference, forward, config.temperature, false),
    )
}

/// Alternating grouped/plain runs behind each printed ratio.
const PAIRS: usize = 3;

/// Benchmarks `job` in both layouts as the criterion group `name`, then runs them alternately
/// [`PAIRS`] times and prints the median plain/grouped time ratio. Criterion measures one
/// benchmark after the other, so on a shared machine a change of load between the two skews the
/// ratio of their results; two runs seconds apart see nearly the same load.
fn bench_layouts<T>(
    c: &mut Criterion,
    name: &str,
    tokens: usize,
    device: &Device,
    job: impl Fn(Forward) -> Result<T>,
) -> Result<()> {
    // A GPU runs kernels asynchronously: a run ends when the device has finished it.
    let job = |forward| -> Result<T> {
        let output = job(forward)?;
        device.synchronize()?;
        Ok(output)
    };
    let layouts = [("grouped", Forward::Grouped), ("plain", Forward::Plain)];
    let mut group = c.benchmark_group(name);
    group.sampling_mode(SamplingMode::Flat);
    group.throughput(Throughput::Elements(tokens as u64));
    for (label, forward) in layouts {
        group.bench_function(label, |b| {
            b.iter(|| job(forward).unwrap_or_else(|e| panic!("{name}/{label}: {e:#}")))
        });
    }
    group.finish();

    let seconds = |forward| -> Result<f64> {
        let start = Instant::now();
        black_box(job(forward)?);
        Ok(start.elapsed().as_secs_f64())
    };
    let mut ratios = (0..PAIRS)
        .map(|_| Ok(seconds(Forward::Plain)? / seconds(Forward::Grouped)?))
        .collect::<Result<Vec<f64>>>()?;
    ratios.sort_by(f64::total_cmp);
    println!(
        "{name}: plain/grouped time ratio {:.2} (median of {PAIRS} alternating pairs: {ratios:.2?})",
        ratios[PAIRS / 2]
    );
    Ok(())
}

fn benchmarks(c: &mut Criterion) {
    let run = |c: &mut Criterion| -> Result<()> {
        let device = Device::cuda_if_available(0)?;
        println!("device: {device:?}");
        for models in [
            Models::golden(&device).context("loading the golden tiny model")?,
            Models::mid_size(&device).context("building the mid-size model")?,
        ] {
            bench_generation(c, &models)?;
            bench_train_step(c, &models)?;
        }
        Ok(())
    };
    if let Err(error) = run(c) {
        panic!("benchmark setup failed: {error:#}");
    }
}

/// Ten samples of one iteration each are enough for steps that take seconds on a CPU; the whole
/// bench takes a few minutes on two cores.
fn settings() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(10))
}

criterion_group! {
    name = train_step_benches;
    config = settings();
    targets = benchmarks
}
criterion_main!(train_step_benches);
