//! Running requests: validation of the sampling parameters, grouping by prompt length,
//! the prefill and decode steps of a group, and choosing each row's next token.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use rayon::prelude::*;

use super::prefix::{shared_lengths, SharedPrefix};
use super::GenerationOutput;
use super::{internal, LlmGenerator};
use crate::error::{OperatorError, Result};
use crate::llm::attention::StepRows;
use crate::llm::chat_template::ChatMessage;
use crate::llm::sampling::SamplingParams;
use crate::llm::sampling::{next_token, SplitMix64};

impl LlmGenerator {
    /// Replies to each `(chat, seed)`, in order.
    pub fn generate(
        &self,
        requests: &[(Vec<ChatMessage>, u64)],
        params: &SamplingParams,
    ) -> Result<Vec<GenerationOutput>> {
        self.check_params(params)?;
        let mut prompts = Vec::with_capacity(requests.len());
        for (i, (messages, _)) in requests.iter().enumerate() {
            let ids = self.prompt_ids(messages)?;
            if ids.is_empty() {
                return Err(OperatorError::Tokenizer(format!(
                    "request {i}: the rendered prompt has no tokens"
                )));
            }
            if let Some(window) = self.config().sliding_window {
                if ids.len() + params.max_new_tokens > window {
                    return Err(OperatorError::Unsupported {
                        path: self.path.clone(),
                        what: "sequence length beyond the sliding attention window",
                        value: format!(
                            "request {i}: {} prompt + {} new tokens > window {window}",
                            ids.len(),
                            params.max_new_tokens
                        ),
                        supported: "sequences within the window (full attention is exact there)",
                    });
                }
            }
            prompts.push(ids);
        }
        let seeds: Vec<u64> = requests.iter().map(|r| r.1).collect();
        let generated = self.generate_ids(&prompts, &seeds, params)?;
        generated
            .into_iter()
            .zip(&prompts)
            .map(|((token_ids, finished_by_eos), prompt)| {
                let text = self
                    .tokenizer
                    .decode(&token_ids, true)
                    .map_err(|e| OperatorError::Tokenizer(e.to_string()))?;
                Ok(GenerationOutput {
                    text,
                    token_ids,
                    prompt_tokens: prompt.len(),
                    finished_by_eos,
                })
            })
            .collect()
    }

    fn check_params(&self, p: &SamplingParams) -> Result<()> {
        let bad = |what: &'static str, value: String, supported: &'static str| {
            Err(OperatorError::Unsupported {
                path: self.path.clone(),
                what,
                value,
                supported,
            })
        };
        if !(p.temperature.is_finite() && p.temperature >= 0.0) {
            return bad(
                "sampling temperature",
                p.temperature.to_string(),
                "a finite number >= 0 (0 is greedy)",
            );
        }
        if !(p.top_p > 0.0 && p.top_p <= 1.0) {
            return bad("sampling top_p", p.top_p.to_string(), "a number in (0, 1]");
        }
        Ok(())
    }

    /// Generates from prompts given as token ids (one seed each); per prompt the new
    /// ids and whether an end-of-turn token stopped them.
    pub fn generate_ids(
        &self,
        prompts: &[Vec<u32>],
        seeds: &[u64],
        params: &SamplingParams,
    ) -> Result<Vec<(Vec<u32>, bool)>> {
        self.check_params(params)?;
        if prompts.len() != seeds.len() {
            return Err(internal("one seed per prompt"));
        }
        let mut results = vec![(Vec::new(), false); prompts.len()];
        if params.max_new_tokens == 0 {
            return Ok(results);
        }
        let padded = self.options.padded_attention || !self.decoder.device().is_cpu();
        let shared = if padded || self.options.prefix_cache_bytes == 0 {
            vec![None; prompts.len()]
        } else {
            self.shared_prefixes(prompts)?
        };
        // What each prompt prefills itself.
        let own = |i: usize| prompts[i].len() - shared[i].as_ref().map_or(0, |p| p.tokens.len());
        let mut order: Vec<usize> = (0..prompts.len()).collect();
        order.sort_by_key(|&i| (prompts[i].len(), i));
        let max_rows = self.options.max_batch_rows.max(1);
        let mut group: Vec<usize> = Vec::new();
        let mut group_tokens = 0;
        for &i in &order {
            let len = own(i);
            // Padded attention pays for the longest prompt in every row.
            let cost = if padded {
                (group.len() + 1) * prompts[i].len()
            } else {
                group_tokens + len
            };
            if !group.is_empty()
                && (group.len() == max_rows || cost > self.options.max_batch_tokens)
            {
                self.run_group(&group, prompts, &shared, seeds, params, &mut results)?;
                group.clear();
                group_tokens = 0;
            }
            group.push(i);
            group_tokens += len;
        }
        if !group.is_empty() {
            self.run_group(&group, prompts, &shared, seeds, params, &mut results)?;
        }
        Ok(results)
    }

    /// For each prompt, the longest shared prefix it starts with (see
    /// `generator::prefix`): kept from earlier calls, or computed now for prefixes that
    /// several prompts of this call share.
    fn shared_prefixes(&self, prompts: &[Vec<u32>]) -> Result<Vec<Option<Arc<SharedPrefix>>>> {
        // A poisoned lock means a panic elsewhere mid-update: the store holds whole
        // entries only, so it is still sound to use.
        let lock = || self.prefixes.lock().unwrap_or_else(|e| e.into_inner());
        let (wanted, mut found) = {
            let mut store = lock();
            let wanted = shared_lengths(prompts, store.recent());
            store.saw(prompts);
            let found: Vec<Option<Arc<SharedPrefix>>> =
                prompts.iter().map(|p| store.longest_match(p)).collect();
            (wanted, found)
        };
        let mut new: Vec<&[u32]> = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            let have = found[i].as_ref().map_or(0, |f| f.tokens.len());
            if wanted[i] > have && !new.contains(&&p[..wanted[i]]) {
                new.push(&p[..wanted[i]]);
            }
        }
        if new.is_empty() {
            return Ok(found);
        }
        let start = Instant::now();
        let computed = self.prefill_prefixes(&new)?;
        count_nanos(&self.prefill_nanos, start);
        {
            let mut store = lock();
            for p in &computed {
                store.insert(Arc::clone(p), self.options.prefix_cache_bytes);
            }
        }
        for (p, f) in prompts.iter().zip(found.iter_mut()) {
            let have = f.as_ref().map_or(0, |f| f.tokens.len());
            if let Some(better) = computed
                .iter()
                .filter(|c| c.tokens.len() > have && c.tokens.len() < p.len())
                .filter(|c| p.starts_with(&c.tokens))
                .max_by_key(|c| c.tokens.len())
            {
                *f = Some(Arc::clone(better));
            }
        }
        Ok(found)
    }

    /// The keys and values of each prefix, prefilled together in steps of at most
    /// `max_batch_tokens` tokens (a longer prefix alone).
    fn prefill_prefixes(&self, prefixes: &[&[u32]]) -> Result<Vec<Arc<SharedPrefix>>> {
        let mut out = Vec::with_capacity(prefixes.len());
        let mut start = 0;
        while start < prefixes.len() {
            let mut end = start + 1;
            let mut tokens = prefixes[start].len();
            while end < prefixes.len()
                && tokens + prefixes[end].len() <= self.options.max_batch_tokens
            {
                tokens += prefixes[end].len();
                end += 1;
            }
            let chunk = &prefixes[start..end];
            let capacity: Vec<usize> = chunk.iter().map(|p| p.len()).collect();
            let mut cache = self.decoder.new_cache(&capacity, false);
            let step = StepRows::pack(chunk.iter().map(|p| (0, p.len())));
            self.decoder.forward(&chunk.concat(), &step, &mut cache)?;
            for (slot, p) in chunk.iter().enumerate() {
                out.push(Arc::new(SharedPrefix {
                    tokens: p.to_vec(),
                    kv: cache.snapshot(slot)?,
                }));
            }
            start = end;
        }
        Ok(out)
    }

    /// Prefills the prompts of `group` together and decodes until every row is done.
    fn run_group(
        &self,
        group: &[usize],
        prompts: &[Vec<u32>],
        shared: &[Option<Arc<SharedPrefix>>],
        seeds: &[u64],
        params: &SamplingParams,
        results: &mut [(Vec<u32>, bool)],
    ) -> Result<()> {
        let capacity: Vec<usize> = group
            .iter()
            .map(|&i| prompts[i].len() + params.max_new_tokens)
            .collect();
        let mut cache = self
            .decoder
            .new_cache(&capacity, self.options.padded_attention);
        let mut generated: Vec<Vec<u32>> = vec![Vec::new(); group.len()];
        let mut stopped = vec![false; group.len()];
        // Rows still decoding, as positions in `group`: slot s of the cache is row
        // active[s], whose random stream is rngs[s].
        let mut active: Vec<usize> = (0..group.len()).collect();
        let mut rngs: Vec<SplitMix64> = group.iter().map(|&i| SplitMix64::new(seeds[i])).collect();
        // A row that starts with a shared prefix holds its keys and values already and
        // prefills the rest.
        let mut past = Vec::with_capacity(group.len());
        for (slot, &i) in group.iter().enumerate() {
            match &shared[i] {
                Some(prefix) => {
                    cache.seed(slot, &prefix.kv)?;
                    past.push(prefix.tokens.len());
                    self.prefix_tokens_reused
                        .fetch_add(prefix.tokens.len() as u64, Ordering::Relaxed);
                }
                None => past.push(0),
            }
        }
        let mut step = StepRows::pack(
            group
                .iter()
                .zip(&past)
                .map(|(&i, &p)| (p, prompts[i].len() - p)),
        );
        let mut tokens: Vec<u32> = group
            .iter()
            .zip(&past)
            .flat_map(|(&i, &p)| prompts[i][p..].iter().copied())
            .collect();
        let mut prefill = true;
        loop {
            let start = Instant::now();
            let logits = self
                .decoder
                .forward(&tokens, &step, &mut cache)?
                .to_vec2::<f32>()?;
            let picks = logits
                .into_par_iter()
                .zip(active.par_iter())
                .zip(rngs.par_iter_mut())
                .map(|((row, &g), rng)| self.pick(row, generated[g].len(), params, rng))
                .collect::<Result<Vec<u32>>>()?;
            let mut keep = Vec::with_capacity(active.len());
            for (slot, (&g, &token)) in active.iter().zip(&picks).enumerate() {
                if self.stop_tokens.contains(&token) {
                    stopped[g] = true;
                } else {
                    generated[g].push(token);
                }
                if !stopped[g] && generated[g].len() < params.max_new_tokens {
                    keep.push(slot);
                }
            }
            let counter = if prefill {
                &self.prefill_nanos
            } else {
                &self.decode_nanos
            };
            count_nanos(counter, start);
            prefill = false;
            if keep.is_empty() {
                break;
            }
            if keep.len() < active.len() {
                cache.retain(&keep)?;
                active = keep.iter().map(|&s| active[s]).collect();
                rngs = keep.iter().map(|&s| rngs[s].clone()).collect();
            }
            step = StepRows::pack(
                active
                    .iter()
                    .map(|&g| (prompts[group[g]].len() + generated[g].len() - 1, 1)),
            );
            tokens = active
                .iter()
                .map(|&g| generated[g].last().copied())
                .collect::<Option<Vec<u32>>>()
                .ok_or_else(|| internal("an active row without a token"))?;
        }
        for (g, &i) in group.iter().enumerate() {
            results[i] = (std::mem::take(&mut generated[g]), stopped[g]);
        }
        Ok(())
    }

    /// The next token of one row from its logits (`row`, consumed), `made` tokens into
    /// its reply: end-of-turn tokens are barred before `min_new_tokens`.
    fn pick(
        &self,
        mut row: Vec<f32>,
        made: usize,
        params: &SamplingParams,
        rng: &mut SplitMix64,
    ) -> Result<u32> {
        if made < params.min_new_tokens {
            for &s in &self.stop_tokens {
                if let Some(x) = row.get_mut(s as usize) {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
        if row.iter().any(|x| x.is_nan()) {
            return Err(OperatorError::Candle(candle_core::Error::Msg(
                "the model produced NaN logits".into(),
            )));
        }
        Ok(next_token(&row, params.temperature, params.top_p, rng))
    }
}

/// Adds the time since `start` to `counter`.
fn count_nanos(counter: &AtomicU64, start: Instant) {
    let nanos = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
    counter.fetch_add(nanos, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::random::{write_random_gguf, RandomShape};
    use crate::llm::LlmOptions;
    use candle_core::quantized::GgmlDType;
    use std::path::Path;

    /// Each row's logits, for prompts prefilled together and then one decode step with
    /// `next[i]` fed to row i: `[prefill rows, decode rows]`.
    fn two_steps(llm: &LlmGenerator, prompts: &[Vec<u32>], next: &[u32]) -> Vec<Vec<Vec<f32>>> {
        let capacity: Vec<usize> = prompts.iter().map(|p| p.len() + 1).collect();
        let mut cache = llm.decoder.new_cache(&capacity, false);
        let step = StepRows::pack(prompts.iter().map(|p| (0, p.len())));
        let tokens: Vec<u32> = prompts.concat();
        let first = llm.decoder.forward(&tokens, &step, &mut cache).unwrap();
        let step = StepRows::pack(prompts.iter().map(|p| (p.len(), 1)));
        let second = llm.decoder.forward(next, &step, &mut cache).unwrap();
        vec![first.to_vec2().unwrap(), second.to_vec2().unwrap()]
    }

    /// Guards the lone-row product of dense matrices: gemm rounds a single row
    /// differently from a row among others, so without the pairing a request decoded
    /// alone got other logits (and could sample other tokens) than in a batch.
    #[test]
    fn a_rows_logits_are_the_same_bits_alone_and_in_any_batch() {
        let dir = tempfile::tempdir().unwrap();
        let shape = RandomShape {
            hidden: 256,
            intermediate: 512,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            vocab: 600,
        };
        let tokenizer_dir =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/llm/tiny-qwen2");
        let prompt = |n: usize, seed: u32| -> Vec<u32> {
            (0..n as u32).map(|i| (i * 37 + seed) % 550).collect()
        };
        let (a, b, c) = (prompt(7, 1), prompt(30, 2), prompt(12, 3));
        for dtype in [GgmlDType::F32, GgmlDType::Q8_0] {
            let path = dir.path().join(format!("{dtype:?}.gguf"));
            write_random_gguf(&path, &shape, dtype, 11).unwrap();
            let options = LlmOptions {
                tokenizer_dir: Some(tokenizer_dir.clone()),
                ..LlmOptions::default()
            };
            let llm = LlmGenerator::load(&path, &options).unwrap();
            let alone = two_steps(&llm, std::slice::from_ref(&a), &[5]);
            let batched = two_steps(&llm, &[b.clone(), a.clone(), c.clone()], &[9, 5, 13]);
            assert_eq!(alone[0][0], batched[0][1], "{dtype:?}: prompt step");
            assert_eq!(alone[1][0], batched[1][1], "{dtype:?}: decode step");
        }
    }
}
