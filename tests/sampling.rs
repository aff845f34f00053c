//! `sampling::generate` on the golden tiny model: greedy decoding with the KV cache against the
//! argmax of full forwards, reproducible seeds, stopping at EOS with padding and truncation
//! flags, first-token frequencies against the model's softmax, and the same completions when
//! the batch is sharded over workers; the entropies recorded for training; the processors of the
//! chooser and of `choose_on_device` against transformers'.

mod common;

use candle_core::{Device, IndexOp, Tensor};
use grpo::model::{ModelFiles, Qwen2};
use grpo::prompt::ChatTokenizer;
use grpo::sampling::{
    choose_on_device, generate, generate_on, Completions, GenerationSpec, SamplingParams,
    TokenChooser,
};
use grpo::workers::Workers;

use common::golden_dir;

fn model_files() -> ModelFiles {
    let dir = golden_dir();
    ModelFiles::resolve(dir.to_str().expect("utf-8 path"), "main").expect("golden model resolves")
}

fn model() -> Qwen2 {
    Qwen2::load_reference(&model_files(), &Device::Cpu).expect("golden model loads")
}

/// Three prompts of different lengths, tokenised by the golden tokenizer.
fn prompts() -> Vec<Vec<u32>> {
    let tokenizer = ChatTokenizer::from_dir(&golden_dir()).expect("golden tokenizer loads");
    let prompts: Vec<Vec<u32>> = [
        "What is 12 plus 30?",
        "Hi",
        "A farmer has 3 fields with 17 cows each; how many cows?",
    ]
    .iter()
    .map(|text| tokenizer.encode(text).expect("encodes"))
    .collect();
    assert!(
        prompts[0].len() != prompts[1].len() && prompts[1].len() != prompts[2].len(),
        "the test needs prompts of different lengths"
    );
    prompts
}

/// A pad id that is a real token but not an EOS of the folder.
fn pad_id(files: &ModelFiles) -> u32 {
    (0..files.config.vocab_size as u32)
        .find(|id| !files.eos_token_ids.contains(id))
        .expect("a non-EOS token")
}

fn spec(params: SamplingParams, group_size: usize, max_new_tokens: usize) -> GenerationSpec {
    let files = model_files();
    GenerationSpec {
        group_size,
        max_new_tokens,
        eos_ids: Vec::new(),
        pad_id: pad_id(&files),
        params,
        seed: 1234,
        entropy_temperature: None,
    }
}

fn sampled(temperature: f32) -> SamplingParams {
    SamplingParams {
        temperature: Some(temperature),
        ..SamplingParams::greedy()
    }
}

/// Logits `[t, V]` of one unpadded sequence through the full forward (no cache).
fn full_forward_logits(model: &Qwen2, ids: &[u32]) -> Vec<Vec<f32>> {
    let input = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let mask = Tensor::ones((1, ids.len()), candle_core::DType::U32, &Device::Cpu).unwrap();
    let hidden = model.forward_masked(&input, &mask).unwrap();
    model
        .lm_head(&hidden.i(0).unwrap())
        .unwrap()
        .to_vec2::<f32>()
        .unwrap()
}

fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold(0, |best, (i, &x)| if x > row[best] { i } else { best })
}

#[test]
fn greedy_decoding_matches_the_full_forward_argmax_at_every_step() {
    let model = model();
    let prompts = prompts();
    let group_size = 2;
    let max_new_tokens = 8;
    let out = generate(
        &model,
        &prompts,
        &spec(SamplingParams::greedy(), group_size, max_new_tokens),
    )
    .unwrap();
    assert_eq!(out.ids.len(), prompts.len() * group_size);
    assert_eq!(out.width, max_new_tokens);
    for (row, ids) in out.ids.iter().enumerate() {
        let prompt = &prompts[row / group_size];
        assert_eq!(
            out.lengths[row], max_new_tokens,
            "row {row}: no EOS ids given"
        );
        assert!(out.truncated[row], "row {row} ran to max_new_tokens");
        let sequence: Vec<u32> = prompt.iter().chain(ids).copied().collect();
        let logits = full_forward_logits(&model, &sequence);
        for (step, &token) in ids.iter().enumerate() {
            let scores = &logits[prompt.len() - 1 + step];
            let best = argmax(scores);
            // Equal, or a float tie between cached and uncached attention.
            assert!(
                token as usize == best || scores[best] - scores[token as usize] < 1e-4,
                "row {row} step {step}: chose {token}, full forward argmax {best} \
                 ({} vs {})",
                scores[token as usize],
                scores[best]
            );
        }
    }
    // Greedy rows of the same prompt are identical.
    for pair in out.ids.chunks(group_size) {
        assert_eq!(pair[0], pair[1]);
    }
}

#[test]
fn a_seed_reproduces_its_completions_and_another_seed_differs() {
    let model = model();
    let prompts = prompts();
    let run = |seed: u64| -> Completions {
        let spec = GenerationSpec {
            seed,
            ..spec(sampled(1.0), 3, 6)
        };
        generate(&model, &prompts, &spec).unwrap()
    };
    let first = run(5);
    assert_eq!(first, run(5));
    assert_ne!(first.ids, run(6).ids);
    // The G rows of one prompt draw from different streams.
    assert!(
        first.ids.chunks(3).any(|group| group[0] != group[1]),
        "{:?}",
        first.ids
    );
}

#[test]
fn rows_stop_at_their_first_eos_and_are_padded_after_it() {
    let model = model();
    let prompts = prompts();
    let max_new_tokens = 6;
    let base = spec(SamplingParams::greedy(), 1, max_new_tokens);
    let free = generate(&model, &prompts, &base).unwrap();
    // Declare the token the first row emits at step 2 an EOS: every row must now stop at its
    // first occurrence of that token and keep the greedy tokens before it.
    let eos = free.ids[0][2];
    let stopped = generate(
        &model,
        &prompts,
        &GenerationSpec {
            eos_ids: vec![eos],
            ..base.clone()
        },
    )
    .unwrap();
    let mut widest = 0;
    for (row, full) in free.ids.iter().enumerate() {
        let expected_len = full
            .iter()
            .position(|&t| t == eos)
            .map_or(max_new_tokens, |i| i + 1);
        widest = widest.max(expected_len);
        assert_eq!(stopped.lengths[row], expected_len, "row {row}");
        assert_eq!(
            stopped.truncated[row],
            !full.contains(&eos),
            "row {row}: truncated means no EOS within max_new_tokens"
        );
        assert_eq!(stopped.ids[row][..expected_len], full[..expected_len]);
        assert!(
            stopped.ids[row][expected_len..]
                .iter()
                .all(|&t| t == base.pad_id),
            "row {row} is padded after its EOS: {:?}",
            stopped.ids[row]
        );
    }
    assert!(stopped.lengths[0] <= 3);
    assert_eq!(stopped.width, widest);
    assert!(stopped.ids.iter().all(|row| row.len() == widest));

    // Every row stops on its first token: one step, width 1, nothing truncated.
    let first_tokens: Vec<u32> = free.ids.iter().map(|row| row[0]).collect();
    let at_once = generate(
        &model,
        &prompts,
        &GenerationSpec {
            eos_ids: first_tokens.clone(),
            ..base.clone()
        },
    )
    .unwrap();
    assert_eq!(at_once.width, 1);
    assert_eq!(at_once.lengths, vec![1; prompts.len()]);
    assert_eq!(at_once.truncated, vec![false; prompts.len()]);
    let got: Vec<u32> = at_once.ids.iter().map(|row| row[0]).collect();
    assert_eq!(got, first_tokens);

    // A budget of one token truncates every row that did not draw an EOS.
    let one = generate(
        &model,
        &prompts,
        &GenerationSpec {
            max_new_tokens: 1,
            ..base
        },
    )
    .unwrap();
    assert_eq!(one.lengths, vec![1; prompts.len()]);
    assert_eq!(one.truncated, vec![true; prompts.len()]);
}

#[test]
fn first_token_frequencies_follow_the_tempered_softmax() {
    let model = model();
    let prompt = prompts().swap_remove(1);
    let temperature = 0.7f32;
    let draws = 4000;
    let out = generate(
        &model,
        std::slice::from_ref(&prompt),
        &spec(sampled(temperature), draws, 1),
    )
    .unwrap();

    let logits = full_forward_logits(&model, &prompt);
    let last = &logits[prompt.len() - 1];
    let max = last.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let weights: Vec<f64> = last
        .iter()
        .map(|&x| f64::from((x - max) / temperature).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut counts = vec![0usize; last.len()];
    for row in &out.ids {
        counts[row[0] as usize] += 1;
    }

    // Pearson chi-square over tokens expected at least 5 times, the rest pooled in one bin.
    let mut chi2 = 0.0;
    let mut bins = 0usize;
    let (mut pooled_expected, mut pooled_observed) = (0.0, 0.0);
    for (token, &weight) in weights.iter().enumerate() {
        let expected = draws as f64 * weight / total;
        let observed = counts[token] as f64;
        if expected >= 5.0 {
            chi2 += (observed - expected).powi(2) / expected;
            bins += 1;
        } else {
            pooled_expected += expected;
            pooled_observed += observed;
        }
    }
    if pooled_expected > 0.0 {
        chi2 += (pooled_observed - pooled_expected).powi(2) / pooled_expected;
        bins += 1;
    }
    assert!(
        bins >= 3,
        "the case needs several likely tokens ({bins} bins)"
    );
    let dof = (bins - 1) as f64;
    // Mean dof, std sqrt(2 dof): five standard deviations above the mean.
    assert!(
        chi2 < dof + 5.0 * (2.0 * dof).sqrt(),
        "chi-square {chi2:.1} over {bins} bins"
    );
}

#[test]
fn finished_rows_leave_the_batch_without_changing_the_others() {
    // Sampled rows, three per prompt, each with its own seeded stream. Declaring a token an EOS
    // makes the rows that draw it stop early and leave the batch; every other row must draw
    // exactly what it drew when no row stopped, and every stopped row a prefix of its free run.
    let model = model();
    let prompts = prompts();
    let base = spec(sampled(1.0), 3, 10);
    let free = generate(&model, &prompts, &base).unwrap();
    let eos = free.ids[4][1];
    let stopped = generate(
        &model,
        &prompts,
        &GenerationSpec {
            eos_ids: vec![eos],
            ..base.clone()
        },
    )
    .unwrap();
    let mut early = 0;
    for (row, full) in free.ids.iter().enumerate() {
        match full.iter().position(|&t| t == eos) {
            Some(at) => {
                early += usize::from(at + 1 < full.len());
                assert_eq!(stopped.lengths[row], at + 1, "row {row}");
                assert_eq!(stopped.ids[row][..=at], full[..=at], "row {row}");
            }
            None => assert_eq!(stopped.ids[row][..full.len()], full[..], "row {row}"),
        }
    }
    assert!(
        early > 0 && early < free.ids.len(),
        "some rows stop early, some go on"
    );
}

#[test]
fn shards_on_several_workers_give_the_completions_of_one_batch() {
    // Two workers split the three prompts 2 + 1 (whole groups); four or seven split the nine
    // rows inside groups (each shard prefilling its prompts itself). Every row keeps its own
    // seeded stream, some rows stop early, and the shards' widths differ: the result must be
    // the single batch's, row for row, padding included.
    let model = model();
    let prompts = prompts();
    for params in [sampled(1.0), SamplingParams::greedy()] {
        let base = spec(params, 3, 8);
        let free = generate(&model, &prompts, &base).unwrap();
        let stopping = GenerationSpec {
            eos_ids: vec![free.ids[1][2], free.ids[7][0]],
            ..base
        };
        let whole = generate(&model, &prompts, &stopping).unwrap();
        assert!(whole.lengths.iter().any(|&n| n < 8), "{:?}", whole.lengths);
        for threads in [2, 4, 7] {
            let workers = Workers::with_threads(threads).unwrap();
            let sharded = generate_on(&workers, &model, &prompts, &stopping).unwrap();
            assert_eq!(sharded, whole, "{threads} workers, {params:?}");
        }
    }
}

/// The entropy of `softmax(logits / temperature)`, in f64.
fn tempered_entropy(logits: &[f32], temperature: f64) -> f64 {
    let scaled: Vec<f64> = logits.iter().map(|&x| f64::from(x) / temperature).collect();
    let max = scaled.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let total: f64 = scaled.iter().map(|x| (x - max).exp()).sum();
    let log_total = total.ln();
    -scaled
        .iter()
        .map(|x| {
            let log_p = x - max - log_total;
            log_p.exp() * log_p
        })
        .sum::<f64>()
}

#[test]
fn recorded_entropies_are_those_of_the_tempered_distribution_each_token_came_from() {
    // Processors change which tokens are drawn, not the entropy recorded: that of the plain
    // tempered distribution at the token's position, as the training forward computes it.
    let model = model();
    let prompts = prompts();
    let temperature = 0.8;
    let params = SamplingParams {
        top_k: 7,
        repetition_penalty: 1.3,
        ..sampled(temperature as f32)
    };
    let unrecorded = spec(params, 2, 6);
    assert_eq!(
        generate(&model, &prompts, &unrecorded).unwrap().entropies,
        None
    );
    let base = generate(&model, &prompts, &unrecorded).unwrap();
    let stopping = GenerationSpec {
        eos_ids: vec![base.ids[0][1]],
        entropy_temperature: Some(temperature),
        ..unrecorded
    };
    let got = generate(&model, &prompts, &stopping).unwrap();
    let entropies = got.entropies.as_ref().expect("recorded when asked");
    assert!(
        got.lengths.iter().any(|&n| n < 6),
        "some row stops early: {:?}",
        got.lengths
    );
    for (row, row_entropies) in entropies.iter().enumerate() {
        let length = got.lengths[row];
        assert_eq!(
            row_entropies.len(),
            length,
            "one entropy per token of row {row}"
        );
        let prompt = &prompts[row / 2];
        let ids: Vec<u32> = prompt
            .iter()
            .chain(&got.ids[row][..length])
            .copied()
            .collect();
        let logits = full_forward_logits(&model, &ids);
        for (j, &entropy) in row_entropies.iter().enumerate() {
            let want = tempered_entropy(&logits[prompt.len() - 1 + j], temperature);
            assert!(
                (f64::from(entropy) - want).abs() <= 1e-5 * want.abs() + 1e-6,
                "row {row}, token {j}: {entropy} vs {want}"
            );
        }
    }
    // Shards record the same entropies for the same rows.
    let workers = Workers::with_threads(2).unwrap();
    let sharded = generate_on(&workers, &model, &prompts, &stopping).unwrap();
    assert_eq!(sharded.ids, got.ids);
    for (a, b) in sharded.entropies.unwrap().iter().zip(entropies) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-5 * y.abs() + 1e-6, "{x} vs {y}");
        }
    }
}

#[test]
fn non_finite_logits_are_an_error_not_a_token() {
    let files = model_files();
    let parameters: Vec<(String, Tensor)> = files
        .load_parameters(&Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(name, tensor)| match name.as_str() {
            "model.norm.weight" => {
                let nan = Tensor::full(f32::NAN, tensor.shape(), &Device::Cpu).unwrap();
                (name, nan)
            }
            _ => (name, tensor),
        })
        .collect();
    let model = Qwen2::from_parameters(files.config.clone(), parameters, false).unwrap();
    // Sampled on the host, and greedy on the device: both refuse.
    for params in [sampled(1.0), SamplingParams::greedy()] {
        let error = generate(&model, &prompts(), &spec(params, 2, 4)).unwrap_err();
        let message = format!("{error:#}");
        assert!(
            message.contains("non-finite logits") && message.contains("new token 1"),
            "{message}"
        );
    }
}

/// One case of `tests/fixtures/sampling/processors.json`: transformers' own processors
/// (`generate`'s processor list) on fixed logits, written by the pinned script beside it.
struct ProcessorCase {
    name: String,
    params: SamplingParams,
    logits: Vec<f32>,
    history: Vec<u32>,
    /// The processed logits; `None` for a removed token.
    scores: Vec<Option<f64>>,
    /// The distribution transformers samples from.
    probs: Vec<f64>,
}

fn processor_cases() -> Vec<ProcessorCase> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/sampling/processors.json");
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 8);
    cases
        .iter()
        .map(|case| {
            let settings = &case["settings"];
            let number = |key: &str, default: f64| settings[key].as_f64().unwrap_or(default);
            let floats = |key: &str| -> Vec<Option<f64>> {
                case[key]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64())
                    .collect()
            };
            ProcessorCase {
                name: case["name"].as_str().unwrap().to_string(),
                params: SamplingParams {
                    temperature: match settings["do_sample"].as_bool().unwrap() {
                        true => Some(number("temperature", 1.0) as f32),
                        false => None,
                    },
                    top_k: number("top_k", 0.0) as usize,
                    top_p: number("top_p", 1.0) as f32,
                    min_p: number("min_p", 0.0) as f32,
                    repetition_penalty: number("repetition_penalty", 1.0) as f32,
                },
                logits: floats("logits")
                    .into_iter()
                    .map(|v| v.unwrap() as f32)
                    .collect(),
                history: case["history"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap() as u32)
                    .collect(),
                scores: floats("scores"),
                probs: floats("probs").into_iter().map(Option::unwrap).collect(),
            }
        })
        .collect()
}

/// The chooser's processors against transformers' on fixed logits.
#[test]
fn processors_match_transformers_on_fixed_logits() {
    let eps = f64::from(f32::EPSILON);
    for case in processor_cases() {
        let name = &case.name;
        let mut scores = case.logits.clone();
        TokenChooser::new(case.params, 0).process(&mut scores, &case.history);
        for (i, (got, want)) in scores.iter().zip(&case.scores).enumerate() {
            match want {
                None => assert_eq!(*got, f32::NEG_INFINITY, "{name}: token {i} is removed"),
                Some(want) => {
                    let got = f64::from(*got);
                    assert!(
                        (got - want).abs() <= 4.0 * eps * want.abs().max(1.0),
                        "{name}: token {i} scores {got}, transformers {want}"
                    );
                }
            }
        }
        // The distribution sampled from, and draws only from its support.
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let weights: Vec<f64> = scores.iter().map(|&x| f64::from(x - max).exp()).collect();
        let total: f64 = weights.iter().sum();
        for (i, (w, want)) in weights.iter().zip(&case.probs).enumerate() {
            assert!(
                (w / total - want).abs() <= 1e-6,
                "{name}: token {i} probability {} vs transformers {want}",
                w / total
            );
        }
        let mut chooser = TokenChooser::new(case.params, 11);
        for _ in 0..200 {
            let token = chooser.choose(&mut case.logits.clone(), &case.history) as usize;
            assert!(
                case.probs[token] > 0.0,
                "{name}: drew removed token {token}"
            );
        }
    }
}

/// `choose_on_device` (the choice on a GPU, here on the CPU device) against transformers'
/// processors: rows of the same logits drawn with evenly spaced uniform numbers `(j + 1/2) / N`
/// pick each token as often as its probability says, within one row in N (an inverse CDF);
/// greedy decoding picks the best processed score.
#[test]
fn the_device_choice_draws_transformers_distribution() {
    const N: usize = 1000;
    for case in processor_cases() {
        let name = &case.name;
        let vocab = case.logits.len();
        let logits = Tensor::new(case.logits.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap()
            .repeat((N, 1))
            .unwrap();
        let histories = vec![case.history.as_slice(); N];
        let uniforms: Vec<f64> = (0..N).map(|j| (j as f64 + 0.5) / N as f64).collect();
        let tokens = choose_on_device(&logits, &histories, &uniforms, case.params)
            .unwrap()
            .to_vec1::<u32>()
            .unwrap();
        if case.params.temperature.is_none() {
            let best = (0..vocab)
                .max_by(|&a, &b| case.scores[a].partial_cmp(&case.scores[b]).unwrap())
                .unwrap();
            assert!(tokens.iter().all(|&t| t as usize == best), "{name}");
            continue;
        }
        let mut counts = vec![0usize; vocab];
        tokens.iter().for_each(|&t| counts[t as usize] += 1);
        for (i, (&count, &want)) in counts.iter().zip(&case.probs).enumerate() {
            let got = count as f64 / N as f64;
            assert!(
                (got - want).abs() <= 1.0 / N as f64 + 1e-6 && (want > 0.0 || count == 0),
                "{name}: token {i} drawn {count} times in {N}, transformers' probability {want}"
            );
        }
    }
}
