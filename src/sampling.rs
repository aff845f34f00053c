//! Choosing the next token: the logits processors of transformers' `generate` (repetition
//! penalty, temperature, top-k, top-p, min-p) applied in its order, then a seeded draw.
//!
//! [`TokenChooser`] works on one row of logits as a plain `f32` slice: it is the reference,
//! tested against transformers' processors, and the choice on the CPU. [`generate`] drives the
//! model: each prompt is prefilled once and its KV cache shared by its G completions. Plain
//! greedy decoding takes its argmax on the model's device; on a GPU, sampling applies the same
//! processors with tensor ops where the logits are ([`choose_on_device`], tested against the
//! chooser and transformers' processors on the CPU device): each row's seeded RNG still draws
//! its uniform number on the host, and only that number (and, for a repetition penalty, the
//! row's token ids so far) goes to the device and the token ids come back. On request, each
//! drawn token's entropy (of the tempered distribution before the other processors) is
//! recorded where the logits are, for training ([`GenerationSpec::entropy_temperature`]).

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Tensor, D};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use std::ops::Range;

use crate::model::{next_token_entropies, position_ids_from_mask, simd, ModelFiles, Qwen2};
use crate::prompt::{left_pad, ChatTokenizer};
use crate::workers::{split_evenly, Workers};

/// How the next token is chosen. Field meanings and defaults are TRL's `GRPOConfig`'s.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// Logits are divided by this before sampling; `None` means greedy (argmax).
    pub temperature: Option<f32>,
    /// Keep only the `top_k` most likely tokens; 0 turns the filter off.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`; 1 is off.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one; 0 is off.
    pub min_p: f32,
    /// transformers' repetition penalty over prompt and completion so far; 1 is off.
    pub repetition_penalty: f32,
}

impl SamplingParams {
    /// Argmax decoding (with the repetition penalty still applied, as transformers does).
    pub fn greedy() -> Self {
        Self {
            temperature: None,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
        }
    }
}

/// Applies the processors to one row of logits and draws a token with its own seeded RNG.
#[derive(Clone)]
pub struct TokenChooser {
    params: SamplingParams,
    rng: StdRng,
    /// Scratch buffer of (logit, token) pairs reused across calls to avoid reallocating.
    order: Vec<(f32, u32)>,
}

impl TokenChooser {
    pub fn new(params: SamplingParams, seed: u64) -> Self {
        Self {
            params,
            rng: StdRng::seed_from_u64(seed),
            order: Vec::new(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Applies the logits processors to one row in place, in transformers' order: repetition
    /// penalty over `history` (the row's prompt and completion so far), then, when sampling,
    /// temperature, top-k, top-p and min-p, removed tokens set to -inf. The result is the row
    /// [`TokenChooser::choose`] samples from (or takes the argmax of, when greedy).
    pub fn process(&mut self, logits: &mut [f32], history: &[u32]) {
        apply_repetition_penalty(logits, history, self.params.repetition_penalty);
        let Some(temperature) = self.params.temperature else {
            return;
        };
        if temperature != 1.0 {
            logits.iter_mut().for_each(|x| *x /= temperature);
        }
        self.filter(logits);
    }

    /// Chooses the next token for a row whose tokens so far (prompt and completion) are
    /// `history`. `logits` is overwritten by the processed scores ([`TokenChooser::process`]).
    pub fn choose(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        self.process(logits, history);
        if self.params.temperature.is_none() {
            return argmax(logits);
        }
        let total = softmax_in_place(logits);
        let u = self.uniform() * total;
        let mut acc = 0.0f64;
        let mut last_kept = 0;
        for (i, &p) in logits.iter().enumerate() {
            if p > 0.0 {
                acc += f64::from(p);
                last_kept = i;
                if acc > u {
                    return i as u32;
                }
            }
        }
        last_kept as u32
    }

    /// The next number of the row's stream, uniform in [0, 1): a sampled token is the first
    /// whose cumulative probability exceeds it (one number per sampled token, none when greedy).
    fn uniform(&mut self) -> f64 {
        self.rng.random::<f64>()
    }

    /// top-k, then top-p, then min-p (transformers' warper order); removed tokens get -inf.
    fn filter(&mut self, logits: &mut [f32]) {
        let SamplingParams {
            top_k,
            top_p,
            min_p,
            ..
        } = self.params;
        let use_top_k = top_k > 0 && top_k < logits.len();
        if !use_top_k && top_p >= 1.0 && min_p <= 0.0 {
            return;
        }
        self.order.clear();
        self.order
            .extend(logits.iter().enumerate().map(|(i, &x)| (x, i as u32)));
        let by_logit_desc = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0);
        if use_top_k {
            // Keep ties with the k-th value, as `torch.topk` thresholding does.
            self.order.select_nth_unstable_by(top_k - 1, by_logit_desc);
            let kth = self.order[top_k - 1].0;
            logits
                .iter_mut()
                .filter(|x| **x < kth)
                .for_each(|x| *x = f32::NEG_INFINITY);
            self.order.retain(|&(x, _)| x >= kth);
        }
        if top_p >= 1.0 && min_p <= 0.0 {
            return;
        }
        self.order.sort_unstable_by(by_logit_desc);
        let max = self.order[0].0;
        let weights: Vec<f64> = self
            .order
            .iter()
            .map(|&(x, _)| f64::from(x - max).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        // transformers: sort ascending, drop tokens whose cumulative probability stays
        // <= 1 - top_p. Descending: keep tokens until the mass before them reaches top_p.
        let mut keep = self.order.len();
        if top_p < 1.0 {
            let tail_cut = 1.0 - f64::from(top_p);
            let mut tail = 0.0;
            // The best token stays even when the whole mass is within the cut (a top_p below
            // f64's resolution next to 1), as transformers keeps one.
            keep = weights
                .iter()
                .rposition(|w| {
                    tail += w / total;
                    tail > tail_cut
                })
                .map_or(1, |i| i + 1);
        }
        if min_p > 0.0 {
            // Probabilities relative to the top token: p_i / p_max = weights[i].
            let above = weights
                .iter()
                .take_while(|&&w| w >= f64::from(min_p))
                .count();
            keep = keep.min(above.max(1));
        }
        for &(_, token) in &self.order[keep..] {
            logits[token as usize] = f32::NEG_INFINITY;
        }
    }
}

/// G completions for each of B prompts, rows `r * G + g` for prompt `r`.
#[derive(Debug, Clone, PartialEq)]
pub struct Completions {
    /// `[B * G][width]` token ids; after a row's first EOS (and after its last token when it
    /// was cut at max_new_tokens) the row holds `pad_id`.
    pub ids: Vec<Vec<u32>>,
    /// Tokens of each row up to and including its first EOS (all of them when truncated).
    pub lengths: Vec<usize>,
    /// Rows that reached max_new_tokens without an EOS.
    pub truncated: Vec<bool>,
    /// Width of every row: the longest row's length (at most max_new_tokens).
    pub width: usize,
    /// With [`GenerationSpec::entropy_temperature`]: for each row, the entropy of the
    /// distribution each of its `lengths[r]` tokens was drawn from (before the processors, at
    /// that temperature): what the training forward logs as `entropy`, from the sampling logits.
    pub entropies: Option<Vec<Vec<f32>>>,
}

/// The ids that end a completion and the id that pads after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopTokens {
    /// Never empty when built by [`StopTokens::resolve`].
    pub eos_ids: Vec<u32>,
    pub pad_id: u32,
}

impl StopTokens {
    /// As TRL: generation_config's EOS ids plus the tokenizer's EOS; the tokenizer's pad token,
    /// else the first EOS. Every command resolves them at start-up, before loading weights or
    /// data: a model that names no EOS token is an error, as its completions could never stop.
    pub fn resolve(files: &ModelFiles, tokenizer: &ChatTokenizer) -> Result<Self> {
        let mut eos_ids = files.eos_token_ids.clone();
        if let Some(eos) = tokenizer.eos_token_id() {
            if !eos_ids.contains(&eos) {
                eos_ids.push(eos);
            }
        }
        let Some(&first_eos) = eos_ids.first() else {
            bail!(
                "model {:?} names no EOS token (generation_config.json, config.json and \
                 tokenizer_config.json have none), so completions could never stop; add \
                 eos_token_id to its generation_config.json (or eos_token to its \
                 tokenizer_config.json)",
                files.source
            );
        };
        let pad_id = tokenizer.pad_token_id().unwrap_or(first_eos);
        Ok(Self { eos_ids, pad_id })
    }

    /// The first EOS id (generation_config's first, else the tokenizer's).
    pub fn first_eos(&self) -> u32 {
        self.eos_ids.first().copied().unwrap_or(self.pad_id)
    }
}

/// What generation needs besides the model and the prompts.
#[derive(Debug, Clone)]
pub struct GenerationSpec {
    pub group_size: usize,
    pub max_new_tokens: usize,
    /// A row stops at the first of these (generation_config's eos ids).
    pub eos_ids: Vec<u32>,
    pub pad_id: u32,
    pub params: SamplingParams,
    /// Row `i` draws from its own RNG seeded from (seed, i): reproducible whatever the batch.
    pub seed: u64,
    /// Record each drawn token's entropy at this temperature ([`Completions::entropies`]).
    pub entropy_temperature: Option<f64>,
}

/// Samples `spec.group_size` completions per prompt (unpadded prompt token ids). Each prompt is
/// prefilled once; its KV cache is repeated to its G rows; rows stop at their first EOS.
///
/// All prompts run as one left-padded batch: one prefill forward `[B, P]`, then one decode
/// forward `[rows, 1]` per new token over the rows still generating, with a cache in the
/// model's compute dtype preallocated for `P + max_new_tokens` positions and written in place.
/// Only the last position's logits are computed. Plain greedy decoding takes the argmax on the
/// model's device (only token ids cross to the host). Otherwise each row's token follows its
/// own [`TokenChooser`] (the repetition penalty sees the row's prompt and its tokens so far):
/// on the CPU the chooser itself runs on each row; on a GPU [`choose_on_device`] applies the
/// processors to every row at once where the logits are, with one uniform number per row drawn
/// from the row's chooser (the same tokens, so the completions do not depend on the device). A
/// row that has finished leaves the batch (its cache rows are dropped) so it costs nothing
/// more; the loop stops when every row has finished.
///
/// Non-finite logits (NaN or infinite, e.g. from NaN weights) are an error naming the
/// completion, not a token.
pub fn generate(model: &Qwen2, prompts: &[Vec<u32>], spec: &GenerationSpec) -> Result<Completions> {
    generate_on(&Workers::single(), model, prompts, spec)
}

/// [`generate`] with the completions split into one shard per worker (whole groups when there
/// are at least as many prompts as workers, else runs of one group's rows, each shard then
/// prefilling its prompt itself), the shards generated at once. Every row keeps the seed of its
/// place in the whole batch, so the completions do not depend on the split.
pub fn generate_on(
    workers: &Workers,
    model: &Qwen2,
    prompts: &[Vec<u32>],
    spec: &GenerationSpec,
) -> Result<Completions> {
    ensure!(
        spec.group_size > 0,
        "group_size must be at least 1 completion per prompt"
    );
    ensure!(
        spec.max_new_tokens > 0,
        "max_new_tokens must be at least 1 (max_completion_length is 0)"
    );
    if let Some(index) = prompts.iter().position(Vec::is_empty) {
        bail!("prompt {index} has no tokens: every prompt needs at least one token to continue");
    }
    let group = spec.group_size;
    let shards: Vec<Range<usize>> = if prompts.len() >= workers.count() {
        split_evenly(prompts.len(), workers.count())
            .into_iter()
            .map(|prompts| prompts.start * group..prompts.end * group)
            .collect()
    } else {
        split_evenly(prompts.len() * group, workers.count())
    };
    let parts = workers.map(shards, |rows| generate_rows(model, prompts, spec, rows))?;
    let width = parts.iter().map(|part| part.width).max().unwrap_or(0);
    let mut completions = Completions {
        ids: Vec::with_capacity(prompts.len() * group),
        lengths: Vec::with_capacity(prompts.len() * group),
        truncated: Vec::with_capacity(prompts.len() * group),
        width,
        entropies: spec.entropy_temperature.map(|_| Vec::new()),
    };
    for part in parts {
        for mut ids in part.ids {
            ids.resize(width, spec.pad_id);
            completions.ids.push(ids);
        }
        completions.lengths.extend(part.lengths);
        completions.truncated.extend(part.truncated);
        if let (Some(all), Some(part)) = (&mut completions.entropies, part.entropies) {
            all.extend(part);
        }
    }
    Ok(completions)
}

/// The completions `rows` (never empty: [`split_evenly`] makes no empty shard) of the batch (row
/// `r` is completion `r % G` of prompt `r / G`): the prompts they continue run as one
/// left-padded prefill, then one decode step per new token.
fn generate_rows(
    model: &Qwen2,
    prompts: &[Vec<u32>],
    spec: &GenerationSpec,
    rows: Range<usize>,
) -> Result<Completions> {
    let group = spec.group_size;
    let first_prompt = rows.start / group;
    let prompts = &prompts[first_prompt..=(rows.end - 1) / group];
    // The prompt (among `prompts`) of each of our rows.
    let prompt_of: Vec<usize> = rows.clone().map(|r| r / group - first_prompt).collect();
    let mut rows: Vec<Row> = rows
        .zip(&prompt_of)
        .map(|(index, &prompt)| Row::new(&prompts[prompt], spec, index))
        .collect();

    let device = model.lm_head_weight().device().clone();
    let padded = left_pad(prompts, spec.pad_id);
    let prompt_width = padded.width();
    let ids = Tensor::new(padded.ids.clone(), &device)?;
    let mask = Tensor::new(padded.mask.clone(), &device)?;
    let mut cache = model.new_cache(prompts.len(), prompt_width + spec.max_new_tokens)?;
    let hidden = model
        .forward(
            &ids,
            &position_ids_from_mask(&mask)?,
            &mask,
            Some(&mut cache),
        )
        .context("prefilling the prompts")?;
    // Each row starts from its prompt's last-token logits and cache row.
    let repeat = Tensor::new(
        prompt_of.iter().map(|&p| p as u32).collect::<Vec<_>>(),
        &device,
    )?;
    let mut logits = last_token_logits(model, &hidden)?.index_select(&repeat, 0)?;
    let mut cache = cache.select_rows(&repeat)?;
    // The rows of the batch (and of the cache), in order; finished rows leave it.
    let mut active: Vec<usize> = (0..rows.len()).collect();

    for step in 0..spec.max_new_tokens {
        let tokens = choose_tokens(&logits, &mut rows, &active, spec.params, step)?;
        if let Some(temperature) = spec.entropy_temperature {
            let entropies = next_token_entropies(&logits, temperature)?;
            for (&row, entropy) in active.iter().zip(entropies) {
                rows[row].entropies.push(entropy);
            }
        }
        for (&row, token) in active.iter().zip(tokens) {
            rows[row].push(token, &spec.eos_ids);
        }
        let still_active: Vec<usize> = (0..active.len())
            .filter(|&i| !rows[active[i]].finished)
            .collect();
        if step + 1 == spec.max_new_tokens || still_active.is_empty() {
            break;
        }
        if still_active.len() < active.len() {
            cache.keep_rows(&still_active)?;
            active = still_active.iter().map(|&i| active[i]).collect();
        }
        // Feed each row its new token at the position after its last one; it sees its
        // prompt's real tokens and every generated position.
        let next_ids: Vec<u32> = active
            .iter()
            .map(|&row| *rows[row].history.last().unwrap_or(&spec.pad_id))
            .collect();
        let positions: Vec<i64> = active
            .iter()
            .map(|&row| (rows[row].prompt_len + step) as i64)
            .collect();
        let key_mask: Vec<u32> = active
            .iter()
            .flat_map(|&row| {
                padded.mask[prompt_of[row]]
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(1, step + 1))
            })
            .collect();
        let batch = active.len();
        let hidden = model
            .forward(
                &Tensor::from_vec(next_ids, (batch, 1), &device)?,
                &Tensor::from_vec(positions, (batch, 1), &device)?,
                &Tensor::from_vec(key_mask, (batch, prompt_width + step + 1), &device)?,
                Some(&mut cache),
            )
            .with_context(|| format!("decoding new token {}", step + 2))?;
        logits = last_token_logits(model, &hidden)?;
    }

    let width = rows
        .iter()
        .map(|row| row.generated().len())
        .max()
        .unwrap_or(0);
    let mut completions = Completions {
        ids: Vec::with_capacity(rows.len()),
        lengths: Vec::with_capacity(rows.len()),
        truncated: Vec::with_capacity(rows.len()),
        width,
        entropies: spec
            .entropy_temperature
            .map(|_| Vec::with_capacity(rows.len())),
    };
    for row in rows {
        let generated = row.generated();
        let padding = std::iter::repeat_n(spec.pad_id, width - generated.len());
        completions
            .ids
            .push(generated.iter().copied().chain(padding).collect());
        completions.lengths.push(generated.len());
        completions.truncated.push(!row.finished);
        if let Some(entropies) = &mut completions.entropies {
            entropies.push(row.entropies);
        }
    }
    Ok(completions)
}

/// One completion being generated.
#[derive(Clone)]
struct Row {
    chooser: TokenChooser,
    /// The prompt's tokens followed by the tokens generated so far.
    history: Vec<u32>,
    prompt_len: usize,
    /// Its place in the whole batch (row `r` is completion `r % G` of prompt `r / G`).
    index: usize,
    /// An EOS id has been generated.
    finished: bool,
    /// The entropy at each generated token, when recorded.
    entropies: Vec<f32>,
}

impl Row {
    fn new(prompt: &[u32], spec: &GenerationSpec, index: usize) -> Self {
        let mut history = Vec::with_capacity(prompt.len() + spec.max_new_tokens);
        history.extend_from_slice(prompt);
        Self {
            chooser: TokenChooser::new(spec.params, row_seed(spec.seed, index as u64)),
            history,
            prompt_len: prompt.len(),
            index,
            finished: false,
            entropies: Vec::new(),
        }
    }

    /// The tokens generated so far.
    fn generated(&self) -> &[u32] {
        &self.history[self.prompt_len..]
    }

    /// Appends the chosen token; an EOS id finishes the row.
    fn push(&mut self, token: u32, eos_ids: &[u32]) {
        self.history.push(token);
        self.finished = eos_ids.contains(&token);
    }
}

/// The seed of row `index`'s RNG: distinct streams per row, reproducible from the run seed.
fn row_seed(seed: u64, index: u64) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ index
}

/// The f32 logits `[b, vocab]` of the last position of `hidden` `[b, t, h]`, on its device.
fn last_token_logits(model: &Qwen2, hidden: &Tensor) -> Result<Tensor> {
    let (_, t, _) = hidden.dims3()?;
    Ok(model
        .lm_head(&hidden.narrow(1, t - 1, 1)?.squeeze(1)?)?
        .to_dtype(DType::F32)?)
}

/// The next token of each batch row (`active[i]` is the completion of batch row `i`).
///
/// The logits are first checked finite where they are (one sum per row comes to the host).
/// Plain greedy decoding (no temperature, no repetition penalty) then takes the argmax there.
/// Otherwise, on the CPU, each row's [`TokenChooser`] applies the processors to its row; on
/// other devices [`choose_on_device`] does, so only one uniform number per sampled row (and,
/// for a repetition penalty, the rows' token ids so far) goes to the device and only the token
/// ids come back.
fn choose_tokens(
    logits: &Tensor,
    rows: &mut [Row],
    active: &[usize],
    params: SamplingParams,
    step: usize,
) -> Result<Vec<u32>> {
    // NaN and infinities survive a sum; finite logits (|x| < 1e30) cannot overflow it.
    let sums = logits.sum(D::Minus1)?.to_vec1::<f32>()?;
    if let Some((i, sum)) = sums.iter().enumerate().find(|(_, sum)| !sum.is_finite()) {
        bail!(
            "the model produced non-finite logits (their sum is {sum}) for completion {} at new \
             token {}: its weights or activations are not finite",
            rows[active[i]].index,
            step + 1
        );
    }
    if params.temperature.is_none() && params.repetition_penalty == 1.0 {
        return Ok(logits.argmax(D::Minus1)?.to_vec1::<u32>()?);
    }
    if logits.device().is_cpu() {
        choose_on_host(logits, rows, active)
    } else {
        choose_with_tensors(logits, rows, active, params)
    }
}

/// Each row's [`TokenChooser`] on its row of the logits, brought to the host.
fn choose_on_host(logits: &Tensor, rows: &mut [Row], active: &[usize]) -> Result<Vec<u32>> {
    let mut host = logits.to_vec2::<f32>()?;
    Ok(active
        .iter()
        .zip(host.iter_mut())
        .map(|(&row, row_logits)| {
            let row = &mut rows[row];
            row.chooser.choose(row_logits, &row.history)
        })
        .collect())
}

/// [`choose_on_device`] for the batch rows, each drawing its uniform number from its chooser.
fn choose_with_tensors(
    logits: &Tensor,
    rows: &mut [Row],
    active: &[usize],
    params: SamplingParams,
) -> Result<Vec<u32>> {
    let uniforms: Vec<f64> = match params.temperature {
        Some(_) => active
            .iter()
            .map(|&row| rows[row].chooser.uniform())
            .collect(),
        None => Vec::new(),
    };
    let histories: Vec<&[u32]> = active
        .iter()
        .map(|&row| rows[row].history.as_slice())
        .collect();
    Ok(choose_on_device(logits, &histories, &uniforms, params)?.to_vec1::<u32>()?)
}

/// Steps of the bisections that find a row's top-k and top-p thresholds among its logits. Each
/// halves the interval: 40 take a range of 64 to 6e-11, below the gap between distinct f32
/// logits of magnitude above 1e-3, so the threshold separates the same logits as a sort.
const THRESHOLD_STEPS: usize = 40;

/// The tokens [`TokenChooser::choose`] picks for the rows of `logits` (`[rows, vocab]`, f32,
/// finite), computed with tensor ops on the logits' device; `u32` ids `[rows]`.
///
/// Row `i` has seen `histories[i]` (for the repetition penalty) and, when sampling, draws with
/// `uniforms[i]`, the number its chooser's RNG gives ([`TokenChooser`] draws the same). The
/// processors run in transformers' order, as the chooser's: repetition penalty (gather, penalty,
/// scatter), temperature (a division), then top-k (the k-th largest logit, found by bisection
/// on counts, so ties with it stay), top-p (the cutoff logit, by bisection on the probability
/// mass at or below it) and min-p (probability relative to the best), with the chooser's f64
/// weights. The draw walks the cumulative probabilities in token order in two levels (sums of
/// blocks of about sqrt(vocab) tokens, then inside the chosen block; f64 prefix sums as
/// products with a triangular matrix). Sorting and `cumsum` over the whole vocabulary are
/// avoided: candle's CUDA sort holds a whole row in shared memory (at most 8,192 columns), and
/// its `cumsum` builds a `[vocab, vocab]` matrix. Up to float rounding and the order of tied
/// logits at a top-p cutoff the tokens are the chooser's.
pub fn choose_on_device(
    logits: &Tensor,
    histories: &[&[u32]],
    uniforms: &[f64],
    params: SamplingParams,
) -> Result<Tensor> {
    let (rows, _) = logits.dims2()?;
    ensure!(
        histories.len() == rows && (params.temperature.is_none() || uniforms.len() == rows),
        "choose_on_device: {rows} rows of logits, {} histories and {} uniform numbers",
        histories.len(),
        uniforms.len()
    );
    let mut scores = logits.to_dtype(DType::F32)?;
    if params.repetition_penalty != 1.0 {
        scores = penalize_repetitions(&scores, histories, params.repetition_penalty)?;
    }
    let Some(temperature) = params.temperature else {
        return Ok(scores.argmax(D::Minus1)?);
    };
    if temperature != 1.0 {
        scores = scores.broadcast_div(&Tensor::new(temperature, scores.device())?)?;
    }
    let shifted = scores.broadcast_sub(&scores.max_keepdim(D::Minus1)?)?;
    let mut weights = shifted.exp()?.to_dtype(DType::F64)?;
    if let Some(kept) = kept_tokens(&scores, &shifted, params)? {
        weights = (weights * kept.to_dtype(DType::F64)?)?;
    }
    draw(&weights, uniforms)
}

/// [`apply_repetition_penalty`] on every row: the scores of the tokens each row has seen are
/// gathered, penalised and scattered back (ids outside the vocabulary, and the padding of the
/// shorter histories, go to a spare column).
fn penalize_repetitions(scores: &Tensor, histories: &[&[u32]], penalty: f32) -> Result<Tensor> {
    let (rows, vocab) = scores.dims2()?;
    let device = scores.device();
    let width = histories.iter().map(|h| h.len()).max().unwrap_or(0).max(1);
    let spare = vocab as u32;
    let ids: Vec<u32> = histories
        .iter()
        .flat_map(|history| {
            history
                .iter()
                .map(|&id| id.min(spare))
                .chain(std::iter::repeat_n(spare, width - history.len()))
        })
        .collect();
    let ids = Tensor::from_vec(ids, (rows, width), device)?;
    let spare_column = Tensor::zeros((rows, 1), DType::F32, device)?;
    let extended = Tensor::cat(&[scores, &spare_column], 1)?;
    let seen = extended.gather(&ids, 1)?;
    let penalty = Tensor::new(penalty, device)?;
    let penalised = seen.lt(0.0)?.where_cond(
        &seen.broadcast_mul(&penalty)?,
        &seen.broadcast_div(&penalty)?,
    )?;
    Ok(extended.scatter(&ids, &penalised, 1)?.narrow(1, 0, vocab)?)
}

/// The tokens top-k, top-p and min-p keep (u8 `[rows, vocab]`, as [`TokenChooser`]'s filter),
/// or `None` when they are all off. `shifted` is `scores` minus each row's maximum.
fn kept_tokens(
    scores: &Tensor,
    shifted: &Tensor,
    params: SamplingParams,
) -> Result<Option<Tensor>> {
    let SamplingParams {
        top_k,
        top_p,
        min_p,
        ..
    } = params;
    let vocab = scores.dim(1)?;
    let mut kept = None;
    if top_k > 0 && top_k < vocab {
        kept = Some(scores.broadcast_ge(&kth_largest(scores, top_k)?)?);
    }
    if top_p >= 1.0 && min_p <= 0.0 {
        return Ok(kept);
    }
    let both = |kept: Option<Tensor>, more: Tensor| -> Result<Option<Tensor>> {
        Ok(Some(match kept {
            Some(kept) => (kept * more)?,
            None => more,
        }))
    };
    // The chooser's weights: probabilities relative to the best, in f64, of the tokens top-k kept.
    let mut weights = shifted.to_dtype(DType::F64)?.exp()?;
    if let Some(kept) = &kept {
        weights = (weights * kept.to_dtype(DType::F64)?)?;
    }
    if top_p < 1.0 {
        let cutoff = top_p_cutoff(scores, &weights, top_p)?;
        // The best token stays even when the whole mass is within the cut, as in the chooser.
        let best = shifted.ge(0.0)?;
        kept = both(kept, scores.broadcast_gt(&cutoff)?.maximum(&best)?)?;
    }
    if min_p > 0.0 {
        // The best token (weight 1) always stays, as at least one does in the chooser.
        kept = both(kept, weights.ge(f64::from(min_p).min(1.0))?)?;
    }
    Ok(kept)
}

/// Each row's k-th largest score (`[rows, 1]`): the largest threshold that at least `k` scores
/// reach, by bisection between the row's smallest and largest score.
fn kth_largest(scores: &Tensor, k: usize) -> Result<Tensor> {
    let reached_by_k = |threshold: &Tensor| -> Result<Tensor> {
        Ok(scores
            .broadcast_ge(threshold)?
            .to_dtype(DType::F32)?
            .sum_keepdim(1)?
            .ge(k as f64)?)
    };
    let mut low = scores.min_keepdim(1)?;
    let mut high = scores.max_keepdim(1)?;
    for _ in 0..THRESHOLD_STEPS {
        let middle = ((&low + &high)? * 0.5)?;
        let reached = reached_by_k(&middle)?;
        low = reached.where_cond(&middle, &low)?;
        high = reached.where_cond(&high, &middle)?;
    }
    // `high` is reached by k scores only when it never moved: k scores tie with the maximum.
    Ok(reached_by_k(&high)?.where_cond(&high, &low)?)
}

/// Each row's top-p cutoff (`[rows, 1]`): a token is kept when its score is above it, i.e. when
/// the probability mass of the tokens scoring at most as much as it exceeds `1 - top_p` (the
/// chooser's tail rule). `weights` are the chooser's (f64, relative to the best, 0 for tokens
/// top-k removed). By bisection on the scores.
fn top_p_cutoff(scores: &Tensor, weights: &Tensor, top_p: f32) -> Result<Tensor> {
    let tail_cut = (weights.sum_keepdim(1)? * (1.0 - f64::from(top_p)))?;
    let mass_beyond_cut = |threshold: &Tensor| -> Result<Tensor> {
        Ok(
            (weights * scores.broadcast_le(threshold)?.to_dtype(DType::F64)?)?
                .sum_keepdim(1)?
                .gt(&tail_cut)?,
        )
    };
    // The mass at or below `low` stays within the cut, the mass at or below `high` exceeds it.
    let mut low = (scores.min_keepdim(1)? - 1.0)?;
    let mut high = scores.max_keepdim(1)?;
    for _ in 0..THRESHOLD_STEPS {
        let middle = ((&low + &high)? * 0.5)?;
        let beyond = mass_beyond_cut(&middle)?;
        low = beyond.where_cond(&low, &middle)?;
        high = beyond.where_cond(&middle, &high)?;
    }
    Ok(low)
}

/// The token of each row (`u32 [rows]`) where the cumulative `weights` (f64 `[rows, vocab]`,
/// 0 for removed tokens), walked in token order, first exceed `uniforms[i]` times their total:
/// [`TokenChooser::choose`]'s inverse CDF, in two levels (blocks of about sqrt(vocab) tokens,
/// then the tokens of the chosen block).
fn draw(weights: &Tensor, uniforms: &[f64]) -> Result<Tensor> {
    let (rows, vocab) = weights.dims2()?;
    let block = (vocab as f64).sqrt().ceil() as usize;
    let blocks = vocab.div_ceil(block);
    let padded = weights
        .pad_with_zeros(1, 0, blocks * block - vocab)?
        .reshape((rows, blocks, block))?;
    let block_mass = padded.sum(2)?;
    // Mass through each block, and before it.
    let through = running_sums(&block_mass)?;
    let before = through
        .pad_with_zeros(1, 1, 0)?
        .narrow(1, 0, blocks)?
        .contiguous()?;
    let target = Tensor::from_slice(uniforms, (rows, 1), weights.device())?
        .mul(&through.narrow(1, blocks - 1, 1)?)?;
    let chosen = first_above(&through, &block_mass, &target)?;
    let inside = padded
        .gather(
            &chosen
                .unsqueeze(2)?
                .broadcast_as((rows, 1, block))?
                .contiguous()?,
            1,
        )?
        .squeeze(1)?;
    let running = running_sums(&inside)?.broadcast_add(&before.gather(&chosen, 1)?)?;
    let token = ((chosen * block as f64)? + first_above(&running, &inside, &target)?)?;
    Ok(token.squeeze(1)?)
}

/// Running sums along the rows of `x` (f64 `[rows, n]`): a product with a triangular matrix of
/// ones. Every sum adds its terms in the same order and rounding is monotone, so for
/// non-negative `x` they do not decrease.
fn running_sums(x: &Tensor) -> Result<Tensor> {
    Ok(x.matmul(&Tensor::triu2(x.dim(1)?, DType::F64, x.device())?)?)
}

/// In each row, the index (u32 `[rows, 1]`) of the first of the `running` sums of `weights`
/// (f64 `[rows, n]`) above the row's `target`; when none is (the target reaches their total by
/// rounding), the last with positive weight, as the chooser then takes its last kept token.
fn first_above(running: &Tensor, weights: &Tensor, target: &Tensor) -> Result<Tensor> {
    let n = running.dim(1)?;
    let at_or_below = running
        .broadcast_le(target)?
        .to_dtype(DType::F64)?
        .sum_keepdim(1)?;
    let positions = Tensor::arange(0u32, n as u32, running.device())?.to_dtype(DType::F64)?;
    let last_positive = weights
        .gt(0.0)?
        .to_dtype(DType::F64)?
        .broadcast_mul(&positions)?
        .max_keepdim(1)?;
    Ok(at_or_below
        .lt(n as f64)?
        .where_cond(&at_or_below, &last_positive)?
        .to_dtype(DType::U32)?)
}

/// transformers' `RepetitionPenaltyLogitsProcessor`: every token already present has its score
/// divided by the penalty when positive and multiplied by it when negative.
fn apply_repetition_penalty(logits: &mut [f32], history: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut seen = vec![false; logits.len()];
    for &token in history {
        let Some(slot) = seen.get_mut(token as usize) else {
            continue;
        };
        if !*slot {
            *slot = true;
            let x = &mut logits[token as usize];
            *x = if *x < 0.0 { *x * penalty } else { *x / penalty };
        }
    }
}

/// Index of the largest logit (the first one on ties, like `torch.argmax`).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Replaces logits by unnormalised probabilities `exp(x - max)` and returns their sum.
fn softmax_in_place(logits: &mut [f32]) -> f64 {
    let max = simd::max(logits);
    logits.iter_mut().for_each(|x| *x -= max);
    simd::exp_in_place(logits);
    simd::sum_f64(logits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn params(top_k: usize, top_p: f32, min_p: f32) -> SamplingParams {
        SamplingParams {
            temperature: Some(1.0),
            top_k,
            top_p,
            min_p,
            repetition_penalty: 1.0,
        }
    }

    /// Empirical frequencies of `n` draws.
    fn frequencies(params: SamplingParams, logits: &[f32], n: usize) -> Vec<f64> {
        let mut chooser = TokenChooser::new(params, 7);
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..n {
            let mut row = logits.to_vec();
            counts[chooser.choose(&mut row, &[]) as usize] += 1;
        }
        counts.into_iter().map(|c| c as f64 / n as f64).collect()
    }

    fn probs(logits: &[f32]) -> Vec<f64> {
        let e: Vec<f64> = logits.iter().map(|&x| f64::from(x).exp()).collect();
        let s: f64 = e.iter().sum();
        e.into_iter().map(|x| x / s).collect()
    }

    fn assert_close(got: &[f64], want: &[f64], tol: f64) {
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() < tol,
                "token {i}: got {g:.4}, want {w:.4} (all: {got:?})"
            );
        }
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut chooser = TokenChooser::new(SamplingParams::greedy(), 0);
        assert_eq!(chooser.choose(&mut [0.1, 2.0, 2.0, -1.0], &[]), 1);
    }

    #[test]
    fn plain_sampling_matches_the_softmax() {
        let logits = [1.0, 0.0, -1.0, 0.5];
        assert_close(
            &frequencies(params(0, 1.0, 0.0), &logits, 40_000),
            &probs(&logits),
            0.01,
        );
    }

    #[test]
    fn temperature_sharpens_the_distribution() {
        let logits = [1.0, 0.0, -1.0, 0.5];
        let p = SamplingParams {
            temperature: Some(0.5),
            ..params(0, 1.0, 0.0)
        };
        let scaled: Vec<f32> = logits.iter().map(|x| x / 0.5).collect();
        assert_close(&frequencies(p, &logits, 40_000), &probs(&scaled), 0.01);
    }

    #[test]
    fn top_k_renormalises_over_the_k_best() {
        let logits = [1.0, 0.0, -1.0, 0.5];
        let want = probs(&[1.0, f32::NEG_INFINITY, f32::NEG_INFINITY, 0.5]);
        assert_close(
            &frequencies(params(2, 1.0, 0.0), &logits, 40_000),
            &want,
            0.01,
        );
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        // Probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.7 keeps the first two (0.5 < 0.7 <= 0.8).
        let logits: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
        let want = [0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0];
        assert_close(
            &frequencies(params(0, 0.7, 0.0), &logits, 40_000),
            &want,
            0.01,
        );
        // top_p 0.85 needs the third token too; the last one stays out.
        let mut chooser = TokenChooser::new(params(0, 0.85, 0.0), 0);
        let mut row = logits.clone();
        chooser.filter(&mut row);
        assert!(row[2].is_finite() && row[3].is_infinite());
    }

    #[test]
    fn min_p_drops_tokens_below_a_fraction_of_the_best() {
        let logits: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
        // min_p 0.25: threshold 0.125 keeps 0.5, 0.3 and 0.15.
        let want = [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0];
        assert_close(
            &frequencies(params(0, 1.0, 0.25), &logits, 40_000),
            &want,
            0.01,
        );
    }

    #[test]
    fn repetition_penalty_follows_transformers() {
        let mut logits = [2.0, -2.0, 1.0];
        apply_repetition_penalty(&mut logits, &[0, 1, 1, 99], 2.0);
        assert_eq!(logits, [1.0, -4.0, 1.0]);
    }

    /// The rows of a batch, row `i` with a random prompt of 1 to 12 tokens below `vocab`.
    fn random_rows(rng: &mut StdRng, params: SamplingParams, vocab: usize) -> Vec<Row> {
        let spec = GenerationSpec {
            group_size: 1,
            max_new_tokens: 8,
            eos_ids: Vec::new(),
            pad_id: 0,
            params,
            seed: rng.random(),
            entropy_temperature: None,
        };
        (0..6)
            .map(|index| {
                let len = rng.random_range(1..=12);
                let prompt: Vec<u32> = (0..len)
                    .map(|_| rng.random_range(0..vocab as u32))
                    .collect();
                Row::new(&prompt, &spec, index)
            })
            .collect()
    }

    /// `n` logits, logit `i` drawn by `sample(i)`, all distinct. Distinct because at a top-p
    /// cutoff that falls among tied logits the chooser keeps an arbitrary subset of them (its
    /// sort is unstable, as transformers' is) where [`choose_on_device`] keeps them all, and
    /// random f32 logits do tie by chance.
    fn distinct_logits(n: usize, mut sample: impl FnMut(usize) -> f32) -> Vec<f32> {
        let mut seen = std::collections::HashSet::with_capacity(n);
        let mut logits = Vec::with_capacity(n);
        while logits.len() < n {
            let x = sample(logits.len());
            if seen.insert(x.to_bits()) {
                logits.push(x);
            }
        }
        logits
    }

    /// A row of `vocab` random logits, flat, ordinary or peaked by `row`, either rounded to
    /// halves (many ties, for top-k and min-p) or all distinct.
    fn random_logits(rng: &mut StdRng, vocab: usize, row: usize, ties: bool) -> Vec<f32> {
        let scale = [0.5, 3.0, 12.0][row % 3];
        if ties {
            (0..vocab)
                .map(|_| (scale * rng.random_range(-1.0f32..1.0) * 2.0).round() / 2.0)
                .collect()
        } else {
            distinct_logits(vocab, |_| scale * rng.random_range(-1.0..1.0))
        }
    }

    #[test]
    fn the_device_choice_is_the_choosers_on_random_rows() {
        let sampled = |temperature, top_k, top_p, min_p, repetition_penalty| SamplingParams {
            temperature: Some(temperature),
            top_k,
            top_p,
            min_p,
            repetition_penalty,
        };
        // Each setting with logits rounded to halves (many ties: top-k keeps those with the k-th
        // value) or not (top-p's cut, among the tied logits, is the chooser's sort order).
        let settings = [
            (sampled(1.0, 0, 1.0, 0.0, 1.0), false),
            (sampled(0.7, 0, 1.0, 0.0, 1.0), false),
            (
                SamplingParams {
                    repetition_penalty: 1.3,
                    ..SamplingParams::greedy()
                },
                false,
            ),
            (sampled(0.8, 0, 1.0, 0.0, 1.5), true),
            (sampled(1.0, 1, 1.0, 0.0, 1.0), true),
            (sampled(1.0, 5, 1.0, 0.0, 1.0), true),
            (sampled(1.0, 36, 1.0, 0.0, 1.0), true),
            (sampled(1.2, 3, 1.0, 0.3, 1.0), true),
            (sampled(1.0, 0, 0.9, 0.0, 1.0), false),
            (sampled(1.0, 0, 0.05, 0.0, 1.0), false),
            (sampled(1.0, 0, 0.999, 0.0, 1.0), false),
            // 1 - top_p rounds to 1: only the best token stays.
            (sampled(1.0, 0, 1e-30, 0.0, 1.0), false),
            (sampled(1.0, 0, 1.0, 0.1, 1.0), true),
            (sampled(1.0, 0, 1.0, 1.0, 1.0), false),
            (sampled(0.9, 40, 0.95, 0.0, 1.1), false),
            (sampled(1.3, 10, 0.8, 0.05, 1.2), false),
        ];
        let mut rng = StdRng::seed_from_u64(99);
        let mut distinct = std::collections::HashSet::new();
        // 37 is top_k 36 + 1; 1601 tokens fill 41 blocks of 40 but the last.
        for vocab in [5, 37, 1000, 1601] {
            for &(params, ties) in &settings {
                let mut on_host = random_rows(&mut rng, params, vocab);
                let mut on_device = on_host.clone();
                let active: Vec<usize> = (0..on_host.len()).collect();
                for step in 0..5 {
                    let logits: Vec<f32> = (0..active.len())
                        .flat_map(|row| random_logits(&mut rng, vocab, row, ties))
                        .collect();
                    let logits =
                        Tensor::from_vec(logits, (active.len(), vocab), &Device::Cpu).unwrap();
                    let want = choose_on_host(&logits, &mut on_host, &active).unwrap();
                    let got =
                        choose_with_tensors(&logits, &mut on_device, &active, params).unwrap();
                    assert_eq!(got, want, "vocab {vocab}, step {step}, {params:?}");
                    for (row, &token) in want.iter().enumerate() {
                        on_host[row].push(token, &[]);
                        on_device[row].push(token, &[]);
                        distinct.insert((vocab, token));
                    }
                }
            }
        }
        assert!(distinct.len() > 200, "the rows chose varied tokens");
    }

    /// Qwen's vocabulary (151,936 tokens) with rows like a language model's: a few dozen likely
    /// tokens well above a normal crowd, some of them in the prompt (so the repetition penalty
    /// moves them), each chosen token penalised at the next step. GRPO's usual top-k, top-p and
    /// temperature keep a few tokens; top-p alone keeps much of the crowd.
    #[test]
    fn the_device_choice_is_the_choosers_on_a_full_vocabulary() {
        const VOCAB: usize = 151_936;
        let settings = [
            SamplingParams {
                temperature: Some(0.7),
                top_k: 50,
                top_p: 0.9,
                min_p: 0.0,
                repetition_penalty: 1.1,
            },
            SamplingParams {
                temperature: Some(1.0),
                top_k: 0,
                top_p: 0.95,
                min_p: 0.0,
                repetition_penalty: 1.3,
            },
        ];
        let mut rng = StdRng::seed_from_u64(8);
        let crowd = rand_distr::Normal::new(0.0f32, 2.0).unwrap();
        let likely: Vec<Vec<bool>> = (0..2)
            .map(|_| {
                let mut likely = vec![false; VOCAB];
                (0..40).for_each(|_| likely[rng.random_range(0..VOCAB)] = true);
                likely
            })
            .collect();
        let prompts: Vec<Vec<u32>> = likely
            .iter()
            .map(|likely| {
                (0..VOCAB as u32)
                    .filter(|&token| likely[token as usize])
                    .step_by(4)
                    .chain((0..20).map(|_| rng.random_range(0..VOCAB as u32)))
                    .collect()
            })
            .collect();
        let mut on_host: Vec<Vec<Row>> = settings
            .iter()
            .map(|&params| {
                let spec = GenerationSpec {
                    group_size: 1,
                    max_new_tokens: 2,
                    eos_ids: Vec::new(),
                    pad_id: 0,
                    params,
                    seed: 21,
                    entropy_temperature: None,
                };
                let rows = prompts.iter().enumerate();
                rows.map(|(index, prompt)| Row::new(prompt, &spec, index))
                    .collect()
            })
            .collect();
        let mut on_device = on_host.clone();
        let active: Vec<usize> = (0..prompts.len()).collect();
        for step in 0..2 {
            let logits: Vec<f32> = likely
                .iter()
                .flat_map(|likely| {
                    distinct_logits(VOCAB, |token| match likely[token] {
                        true => rng.random_range(8.0..14.0),
                        false => rng.sample(crowd),
                    })
                })
                .collect();
            let logits = Tensor::from_vec(logits, (active.len(), VOCAB), &Device::Cpu).unwrap();
            for (setting, &params) in settings.iter().enumerate() {
                let (on_host, on_device) = (&mut on_host[setting], &mut on_device[setting]);
                let want = choose_on_host(&logits, on_host, &active).unwrap();
                let got = choose_with_tensors(&logits, on_device, &active, params).unwrap();
                assert_eq!(got, want, "step {step}, {params:?}");
                for (row, &token) in want.iter().enumerate() {
                    on_host[row].push(token, &[]);
                    on_device[row].push(token, &[]);
                }
            }
        }
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits = [0.3, 0.1, 0.2, 0.9, -0.4];
        let draw = |seed| {
            let mut c = TokenChooser::new(params(0, 0.9, 0.0), seed);
            (0..50)
                .map(|_| c.choose(&mut logits.clone(), &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
    }
}
