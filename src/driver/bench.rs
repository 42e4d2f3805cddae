//! `distillery bench`: what a full run of a configuration would cost, measured before it
//! is paid for. The recipe runs, unchanged, on a sample of the configuration's corpus
//! (a seeded draw, see [`SAMPLE_SEED`]) on the chosen device, in a run directory of its own; each device
//! stage's rate and each part's wall time come from that run, and the parts are scaled
//! to a corpus of N passages.
//!
//! How each part scales with the number of passages `N` (the sample has `S`; `f = N/S`):
//! - generation, labelling (teacher pairs: queries x candidates per query), training
//!   (examples: one per query, epochs fixed) and the teacher check grow with the number
//!   of queries, which the recipe makes per passage: linearly, `f`;
//! - mining embeds passages and queries (linear) and retrieves exactly: every query
//!   against every passage, `f^2`. The retrieval's own time (each retriever's
//!   [`RetrievalReport::seconds`]) is scaled by `f^2`, the rest of the part by `f`;
//! - evaluation embeds the passages (linear) and retrieves for the held-out queries,
//!   whose number grows with N too: scaled by `f`, and flagged as a lower bound.
//!
//! Counts the configuration gives in passages (`[held_out] count`, `[generate]
//! max_passages`) shrink for the sample in proportion to it (the sample is the full run
//! in miniature), and a run on N passages is assumed to keep the same proportions.
//!
//! Human queries (`[queries]`) are a fixed set whose number does not grow with the corpus,
//! though the share of them with a relevant passage in the sample does: the estimate scales
//! their work like generated queries', and says it is rough when a configuration has them.
//!
//! Constant costs (loading models, opening files) are scaled with the rest, so a small
//! sample overestimates; [`DEFAULT_SAMPLE`] passages keep them a small share on the
//! shipped models. The evaluation on an external BEIR dataset is left out of the sample
//! run: its size does not depend on N.
//!
//! [`RetrievalReport::seconds`]: crate::dataflow::retrieve::RetrievalReport

use std::collections::{BTreeMap, BinaryHeap};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::Pipeline;
use crate::corpus::{open_passages, ReadOptions};
use crate::driver::{run_recipe, StageWork};
use crate::error::EngineError;
use crate::mining::held_out_rank;
use crate::record::Passage;

/// Passages of the sample when `--sample` is not given: enough that model loading and
/// file opening are a small share of each part on the shipped models, few enough that
/// the sample runs in minutes on two CPU cores.
pub const DEFAULT_SAMPLE: usize = 1000;

/// The corpus sample's file in the bench's run directory.
const SAMPLE_FILE: &str = "sample-corpus.jsonl";

/// The sample is the passages with the smallest seeded hash of their id (the held-out
/// choice's hash, [`held_out_rank`], with this seed): a draw from the whole corpus, not
/// its first passages (a corpus sorted by date or source would make those
/// unrepresentative), the same on every call, and unrelated to the held-out choice.
pub const SAMPLE_SEED: u64 = 0x6265_6e63_6873_6d70;

/// How a part's time grows with the number of passages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scaling {
    /// In proportion to the passages.
    Linear,
    /// Linear, plus exact retrieval (queries x passages) in proportion to their square.
    LinearPlusRetrieval,
}

/// One part of the sample run and its estimate at the target size.
#[derive(Debug, Clone, Serialize)]
pub struct PartEstimate {
    pub part: String,
    pub sample_seconds: f64,
    /// Of `sample_seconds`, the exact retrieval's (scaled by the square).
    pub retrieval_seconds: f64,
    pub scaling: Scaling,
    pub estimated_seconds: f64,
}

/// What `bench` measured and estimated.
#[derive(Debug, Clone, Serialize)]
pub struct BenchOutcome {
    /// The configuration's corpus and its passages.
    pub corpus: PathBuf,
    pub corpus_passages: u64,
    /// Passages of the sample run (fewer than asked when the corpus is smaller).
    pub sample_passages: u64,
    /// Queries the sample run mined for.
    pub sample_queries: usize,
    /// The corpus size the estimate is for.
    pub target_passages: u64,
    pub device: String,
    /// Every device stage of the sample run: items and rate.
    pub stages: Vec<StageWork>,
    pub parts: Vec<PartEstimate>,
    /// Wall time of the sample run.
    pub sample_seconds: f64,
    /// The estimated wall time of a run on `target_passages`.
    pub estimated_seconds: f64,
    /// The sample run's directory (its summary and report are there).
    pub run_dir: PathBuf,
    /// The configuration has human queries, which the estimate scales as if their number
    /// grew with the corpus (see the module docs).
    pub human_queries: bool,
}

/// Runs the recipe of `pipeline` on `sample` of its corpus's passages in
/// `<run_dir>/bench-<sample>` (made afresh) and estimates a run on `target` passages
/// (default: the whole corpus).
pub fn bench(
    pipeline: &Pipeline,
    sample: usize,
    target: Option<u64>,
) -> Result<BenchOutcome, EngineError> {
    if sample == 0 {
        return Err(EngineError::Invalid("--sample: at least 1 passage".into()));
    }
    let corpus = pipeline.corpus.clone();
    let run_dir = pipeline.run_dir.join(format!("bench-{sample}"));
    if run_dir.exists() {
        std::fs::remove_dir_all(&run_dir).map_err(|source| EngineError::Write {
            path: run_dir.clone(),
            source,
        })?;
    }
    std::fs::create_dir_all(&run_dir).map_err(|source| EngineError::Write {
        path: run_dir.clone(),
        source,
    })?;
    let sample_file = run_dir.join(SAMPLE_FILE);
    let (sample_passages, corpus_passages) = write_sample(&corpus, &sample_file, sample)?;
    let target_passages = target.unwrap_or(corpus_passages);

    let mut sampled = pipeline.clone();
    // Counts the configuration gives in passages shrink with the corpus: the sample is
    // the full run in miniature (see the module docs).
    let share = sample_passages as f64 / corpus_passages.max(1) as f64;
    sampled.held_out.count = shrink(pipeline.held_out.count, share);
    if let Some(generate) = &mut sampled.generate {
        generate.max_passages = generate.max_passages.map(|m| shrink(m, share));
    }
    sampled.corpus = sample_file;
    sampled.run_dir = run_dir.clone();
    sampled.eval.dataset = None;
    let outcome = run_recipe(&sampled)?;

    let f = target_passages as f64 / sample_passages.max(1) as f64;
    let retrieval: f64 = outcome.mine.retrievals.iter().map(|r| r.seconds).sum();
    let parts: Vec<PartEstimate> = outcome
        .parts
        .iter()
        .map(|p| {
            let (scaling, retrieval_seconds) = if p.part == "mine" {
                (Scaling::LinearPlusRetrieval, retrieval.min(p.seconds))
            } else {
                (Scaling::Linear, 0.0)
            };
            PartEstimate {
                part: p.part.clone(),
                sample_seconds: p.seconds,
                retrieval_seconds,
                scaling,
                estimated_seconds: (p.seconds - retrieval_seconds) * f + retrieval_seconds * f * f,
            }
        })
        .collect();
    let estimated_seconds = parts.iter().map(|p| p.estimated_seconds).sum();
    Ok(BenchOutcome {
        corpus,
        corpus_passages,
        sample_passages,
        sample_queries: outcome.mine.queries,
        target_passages,
        device: pipeline.device_name.clone(),
        stages: outcome.device_stages,
        parts,
        sample_seconds: outcome.seconds,
        estimated_seconds,
        run_dir,
        human_queries: pipeline.queries.is_some(),
    })
}

/// A count of passages for a sample that is `share` of the corpus: at least 1 where the
/// count is not 0.
fn shrink(count: usize, share: f64) -> usize {
    if count == 0 {
        0
    } else {
        ((count as f64 * share).round() as usize).max(1)
    }
}

/// `n` passages of `corpus` (any format the reader takes; see [`SAMPLE_SEED`]) as a BEIR
/// JSONL file, in the corpus's order; returns how many were written and how many the
/// corpus has (it is read whole). Holds `n` passages.
fn write_sample(corpus: &Path, out: &Path, n: usize) -> Result<(u64, u64), EngineError> {
    // The n smallest ranks so far (largest on top) and their passages by position.
    let mut ranks: BinaryHeap<([u8; 32], usize)> = BinaryHeap::with_capacity(n + 1);
    let mut kept: BTreeMap<usize, Passage> = BTreeMap::new();
    let mut read = 0u64;
    for (position, passage) in open_passages(corpus, &ReadOptions::default())?.enumerate() {
        let p = passage?;
        read += 1;
        let rank = held_out_rank(&p.id, SAMPLE_SEED);
        if ranks.len() == n {
            match ranks.peek() {
                Some(&(top, dropped)) if rank < top => {
                    ranks.pop();
                    kept.remove(&dropped);
                }
                _ => continue,
            }
        }
        ranks.push((rank, position));
        kept.insert(position, p);
    }
    let file = std::fs::File::create(out).map_err(|source| EngineError::Write {
        path: out.to_path_buf(),
        source,
    })?;
    let mut w = std::io::BufWriter::new(file);
    let mut written = 0u64;
    for p in kept.into_values() {
        let line = serde_json::json!({"_id": p.id, "title": p.title, "text": p.text});
        writeln!(w, "{line}").map_err(|source| EngineError::Write {
            path: out.to_path_buf(),
            source,
        })?;
        written += 1;
    }
    w.flush().map_err(|source| EngineError::Write {
        path: out.to_path_buf(),
        source,
    })?;
    if written == 0 {
        return Err(EngineError::Invalid(format!(
            "{}: no passages to sample",
            corpus.display()
        )));
    }
    Ok((written, read))
}

/// `seconds` as `1h 02m`, `3m 05s` or `4.2 s`.
pub fn human_duration(seconds: f64) -> String {
    let seconds = seconds.max(0.0);
    let s = seconds.round() as u64;
    if seconds < 60.0 {
        format!("{seconds:.1} s")
    } else if s < 3600 {
        format!("{}m {:02}s", s / 60, s % 60)
    } else {
        format!("{}h {:02}m", s / 3600, s % 3600 / 60)
    }
}

impl BenchOutcome {
    /// The report `bench` prints.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let corpus = format!(
            "{} passages in {}",
            self.corpus_passages,
            self.corpus.display()
        );
        out.push_str(&format!(
            "bench: the recipe on {} passages ({} queries) drawn from {corpus}, on {}: {}\n",
            self.sample_passages,
            self.sample_queries,
            self.device,
            human_duration(self.sample_seconds)
        ));
        out.push_str("device stages of the sample run:\n");
        for s in &self.stages {
            if s.run == 0 {
                continue;
            }
            let rate = if s.seconds > 0.0 {
                s.run as f64 / s.seconds
            } else {
                0.0
            };
            out.push_str(&format!(
                "  {:<52} {:>8} items {:>8.2} s {:>10.1}/s  busy {:>3.0}%\n",
                s.label,
                s.run,
                s.seconds,
                rate,
                100.0 * s.busy_fraction
            ));
        }
        out.push_str(&format!(
            "parts, measured on {} passages -> estimated on {}:\n",
            self.sample_passages, self.target_passages
        ));
        for p in &self.parts {
            let how = match p.scaling {
                Scaling::Linear => "linear".to_string(),
                Scaling::LinearPlusRetrieval => format!(
                    "linear; exact retrieval {:.2} s of it grows with the square",
                    p.retrieval_seconds
                ),
            };
            let bound = if p.part == "evaluate" {
                ", a lower bound"
            } else {
                ""
            };
            out.push_str(&format!(
                "  {:<15} {:>9.2} s -> {:>10}   ({how}{bound})\n",
                p.part,
                p.sample_seconds,
                human_duration(p.estimated_seconds)
            ));
        }
        out.push_str(&format!(
            "estimated wall time for {} passages: {}\n",
            self.target_passages,
            human_duration(self.estimated_seconds)
        ));
        if self.human_queries {
            out.push_str(
                "(rough: the human queries are a fixed set, scaled here as if their number \
                 grew with the corpus; generated queries do)\n",
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_shrink_with_the_sample_but_never_to_none() {
        assert_eq!(shrink(100, 0.2), 20);
        assert_eq!(shrink(250, 0.2), 50);
        assert_eq!(shrink(3, 0.01), 1);
        assert_eq!(shrink(0, 0.5), 0);
        assert_eq!(shrink(7, 1.0), 7);
    }

    #[test]
    fn durations_read_as_a_person_would_write_them() {
        assert_eq!(human_duration(4.24), "4.2 s");
        assert_eq!(human_duration(185.0), "3m 05s");
        assert_eq!(human_duration(3725.0), "1h 02m");
        assert_eq!(human_duration(-1.0), "0.0 s");
    }

    #[test]
    fn the_sample_is_a_seeded_draw_in_corpus_order_as_beir_jsonl() {
        let dir = tempfile::tempdir().unwrap();
        let corpus = dir.path().join("c.tsv");
        let ids: Vec<String> = (0..50).map(|i| format!("p{i}")).collect();
        let mut text = String::from("id\ttitle\ttext\n");
        for id in &ids {
            text.push_str(&format!("{id}\tT{id}\ttext of {id}\n"));
        }
        std::fs::write(&corpus, text).unwrap();
        let out = dir.path().join("s.jsonl");
        assert_eq!(write_sample(&corpus, &out, 10).unwrap(), (10, 50));
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        // The ten ids of smallest rank, written in the corpus's order.
        let mut ranked: Vec<(usize, &String)> = ids.iter().enumerate().collect();
        ranked.sort_by_key(|(_, id)| held_out_rank(id, SAMPLE_SEED));
        let mut want: Vec<usize> = ranked[..10].iter().map(|(i, _)| *i).collect();
        want.sort();
        let got: Vec<&str> = lines.iter().map(|l| l["_id"].as_str().unwrap()).collect();
        let want: Vec<&str> = want.iter().map(|&i| ids[i].as_str()).collect();
        assert_eq!(got, want);
        assert_ne!(
            got,
            ["p0", "p1", "p2", "p3", "p4", "p5", "p6", "p7", "p8", "p9"]
        );
        assert_eq!(lines[0]["title"], format!("T{}", got[0]));
        assert_eq!(lines[0]["text"], format!("text of {}", got[0]));
        // A sample larger than the corpus is the corpus.
        assert_eq!(write_sample(&corpus, &out, 80).unwrap(), (50, 50));
    }
}
