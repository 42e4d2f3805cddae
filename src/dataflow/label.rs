//! The labelling stage: teacher scores for every (query, candidate) pair of the
//! candidates stage, then the teacher funnel and the `examples` table (RECIPE.md
//! section 4).
//!
//! A teacher is a cross-encoder, a bi-encoder
//! or BM25 ([`teacher::PairTeacher`], one file per kind). Per model teacher, scores live
//! in an append-only cache stage named after the teacher's fingerprint, keyed per pair by
//! a hash of the query text and the passage text: a pair is never scored twice by the
//! same teacher, across runs and corpus changes, and teachers of different kinds or
//! settings never share a cache ([`pair_cache`]). Missing pairs are scored by the teacher (its device
//! stages resume when killed) and then appended to the cache. BM25, whose every score
//! moves with the corpus, scores every pair each time labelling runs and keeps none
//! ([`teacher::PairTeacher::cached`]).
//!
//! The examples stage is keyed by the teachers' fingerprints, the labelling settings and
//! the candidates stage's content; when it is complete under that key (an unchanged
//! rerun), the stage reports the record it keeps beside it ([`EXAMPLES_STATS_FILE`]) and
//! reads no pair.

pub mod bi_encoder;
pub mod bm25;
pub mod cross_encoder;
pub mod load;
pub mod pair_cache;
pub mod teacher;

pub use pair_cache::pair_key;
use pair_cache::{pair_key_of, teacher_label, PairCache};

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use serde::Serialize;

use crate::config::Pipeline;
use crate::dataflow::candidates::{MineOutcome, CANDIDATES_STAGE};
use crate::dataflow::passage_texts_of;
use crate::dataflow::score_ahead::ScoredAhead;
use crate::dataflow::CHUNK_ROWS;
use crate::error::EngineError;
use crate::mining::{
    example_from_labelled, examples_schema, examples_to_batch, label_queries, write_examples_jsonl,
    Example, PassageIdx, ScoredQuery, TeacherStats,
};
use crate::schema::{candidates_from_batch, CandidateRow};
use crate::store::memo::MemoKey;
use crate::store::{hash_settings, StageKey, StageStore};
use teacher::{EmbeddingCounts, KnownEmbeddings};

/// The examples stage's name.
pub const EXAMPLES_STAGE: &str = "examples";

/// What `label` did.
#[derive(Debug, Clone, Serialize)]
pub struct LabelOutcome {
    pub mine: MineOutcome,
    /// True when the examples were complete under their key and nothing was labelled.
    pub reused: bool,
    /// Pairs each teacher needed, and how many of them it had to score now (ahead,
    /// while the candidates were made, or in this stage).
    pub pairs: usize,
    pub scored_now: Vec<usize>,
    /// Per teacher: how many of `scored_now` were scored ahead, while the candidates
    /// were made ([`crate::dataflow::score_ahead`]).
    pub scored_ahead: Vec<usize>,
    /// Per teacher: texts it embedded now and texts it took from a retriever's stage.
    pub teacher_embeddings: Vec<EmbeddingCounts>,
    pub stats: TeacherStats,
    pub examples: usize,
    pub train: usize,
    pub dev: usize,
    pub jsonl: Option<PathBuf>,
}

/// The examples stage's record beside it: its key and what labelling measured, so a
/// rerun whose examples are complete under the same key reports them without reading a
/// pair. Written before the stage is finished; a stage finished without it (a run killed
/// between the two) is labelled again, which finds the stage complete and writes this.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
struct ExamplesRecord {
    key: StageKey,
    pairs: usize,
    stats: TeacherStats,
    examples: usize,
    dev: usize,
}

/// Where the examples stage's record (its key, pairs, teacher statistics and counts) is
/// kept in the run directory.
pub const EXAMPLES_STATS_FILE: &str = "examples-stats.json";

/// Teacher scoring and labelling of `mine`'s candidates by `teachers` (the pipeline's
/// `[[teachers]]`, loaded: [`load::load_teachers`]), taking over the caches and counts
/// of what was scored `ahead` while the candidates were made; inputs not checked here
/// ([`Pipeline::preflight`]).
pub fn run_label_stage(
    pipeline: &Pipeline,
    mine: MineOutcome,
    teachers: &[Box<dyn teacher::PairTeacher>],
    ahead: Option<ScoredAhead>,
) -> Result<LabelOutcome, EngineError> {
    let store = StageStore::open(&pipeline.run_dir)?;
    if teachers.len() != pipeline.teachers.len() {
        return Err(EngineError::Dataflow(format!(
            "labelling got {} teachers for {} [[teachers]]; this is a bug",
            teachers.len(),
            pipeline.teachers.len()
        )));
    }
    let (mut ahead_caches, scored_ahead) = match ahead {
        Some(a) => (a.caches, a.scored),
        None => (Vec::new(), Vec::new()),
    };
    // The teachers' fingerprints are part of the examples' key.
    let teacher_ids: Vec<String> = teachers
        .iter()
        .map(|t| t.fingerprint().to_string())
        .collect();
    let weights: Vec<f32> = pipeline.teachers.iter().map(|t| t.weight).collect();
    #[derive(Serialize)]
    struct ExamplesKey<'a> {
        teacher: &'a crate::mining::TeacherConfig,
        weights: &'a [f32],
        teachers: &'a [String],
    }
    let key = StageKey {
        settings_hash: hash_settings(&ExamplesKey {
            teacher: &pipeline.teacher,
            weights: &weights,
            teachers: &teacher_ids,
        })?,
        input_hash: mine.candidates.content_hash(),
    };
    let record_path = pipeline.run_dir.join(EXAMPLES_STATS_FILE);
    let jsonl_path = pipeline.run_dir.join("examples.jsonl");
    if store.completed(EXAMPLES_STAGE, &key)?.is_some() {
        let record = std::fs::read_to_string(&record_path)
            .ok()
            .and_then(|text| serde_json::from_str::<ExamplesRecord>(&text).ok())
            .filter(|r| r.key == key);
        if let Some(record) = record {
            let jsonl = if pipeline.jsonl {
                let mut examples = Vec::with_capacity(record.examples);
                for batch in store.read(EXAMPLES_STAGE)? {
                    examples.extend(crate::mining::examples_from_batch(&batch?)?);
                }
                write_jsonl(&jsonl_path, &examples)?;
                Some(jsonl_path)
            } else {
                None
            };
            return Ok(LabelOutcome {
                mine,
                reused: true,
                pairs: record.pairs,
                scored_now: vec![0; teachers.len()],
                scored_ahead: vec![0; teachers.len()],
                teacher_embeddings: vec![EmbeddingCounts::default(); teachers.len()],
                stats: record.stats,
                examples: record.examples,
                train: record.examples - record.dev,
                dev: record.dev,
                jsonl,
            });
        }
    }

    // What the teachers can do before they see a pair starts now, beside the pairs'
    // gathering.
    for (t, teacher) in teachers.iter().enumerate() {
        teacher.prepare(&teacher_label(pipeline, t), pipeline.quiet);
    }
    let mut rows: Vec<CandidateRow> = Vec::new();
    for batch in store.read(CANDIDATES_STAGE)? {
        rows.extend(candidates_from_batch(&batch?)?);
    }

    // Passage texts of every candidate, streamed from the corpus.
    let wanted: HashSet<&str> = rows
        .iter()
        .flat_map(|r| r.candidate_ids.iter().map(String::as_str))
        .collect();
    let read = pipeline.retrievers[0].read_options()?;
    let texts = passage_texts_of(&pipeline.corpus, &read, &wanted)?;

    // Every row's pair keys, computed once for the pairs and the funnel: a text is
    // hashed once for all its pairs. The texts are borrowed from the candidate rows and
    // the passage map, never copied per pair (SciFact's 1.45M pairs once held 2 GB of
    // copies).
    // Each candidate passage once: its text and its text's key, by its place here.
    let mut passage_texts_by_place: Vec<&str> = Vec::with_capacity(texts.len());
    let mut passage_keys: HashMap<&str, (MemoKey, u32)> = HashMap::with_capacity(texts.len());
    for (id, text) in &texts {
        let place = passage_texts_by_place.len() as u32;
        passage_texts_by_place.push(text);
        passage_keys.insert(id, (MemoKey::of(text.as_bytes()), place));
    }
    // (key, row, the passage's place) of every (row, candidate), row-major, the keys
    // hashed over the cores.
    let mut pairs = row_pairs(&rows, &passage_keys, pipeline.threads)?;
    // `pair_of[i]`: the distinct pair of the `i`th (row, candidate), its index in the
    // order of the keys (the order the teachers score in and the cache is appended
    // in). Two pairs of equal keys have the same texts, so which one stays does not
    // matter.
    let mut pair_of = vec![0u32; pairs.len()];
    {
        let mut order: Vec<(MemoKey, u32)> =
            (0..pairs.len()).map(|i| (pairs[i].0, i as u32)).collect();
        order.sort_unstable();
        let mut distinct: Vec<Pair> = Vec::with_capacity(order.len());
        for &(_, i) in &order {
            let pair = pairs[i as usize];
            if distinct.last().map(|d| d.0) != Some(pair.0) {
                distinct.push(pair);
            }
            pair_of[i as usize] = (distinct.len() - 1) as u32;
        }
        pairs = distinct;
    }

    // Where each text sits in the retrievers' embedding stages: passages by id, queries
    // by query id.
    let passage_id_of_text: HashMap<String, String> = texts
        .iter()
        .map(|(id, text)| (text.clone(), id.clone()))
        .collect();
    let query_id_of_text: HashMap<String, String> = rows
        .iter()
        .map(|r| (r.query_text.clone(), r.query_id.clone()))
        .collect();
    let known: Vec<KnownEmbeddings<'_>> = mine
        .embeddings
        .iter()
        .flat_map(|(passages, queries)| {
            [
                KnownEmbeddings {
                    stage: passages.stage.clone(),
                    settings_hash: passages.settings_hash.clone(),
                    id_of_text: &passage_id_of_text,
                },
                KnownEmbeddings {
                    stage: queries.stage.clone(),
                    settings_hash: queries.settings_hash.clone(),
                    id_of_text: &query_id_of_text,
                },
            ]
        })
        .collect();

    // Per teacher, every distinct pair's score, by the pair's index. The teachers that
    // run on the CPU alone (BM25) score on threads of their own while the others,
    // which take turns on the device, score here; no score depends on which runs when.
    let keys: Vec<MemoKey> = pairs.iter().map(|p| p.0).collect();
    let texts_of = |i: usize| {
        let (_, row, place) = pairs[i];
        (
            rows[row as usize].query_text.as_str(),
            passage_texts_by_place[place as usize],
        )
    };
    let score_with = |t: usize, cache: Option<PairCache>| {
        let teacher = teachers[t].as_ref();
        let mut cache = match cache {
            Some(cache) => cache,
            None => PairCache::open(&store, teacher)?,
        };
        cache.scores(
            &store,
            pipeline,
            t,
            teacher,
            &keys,
            &texts_of,
            known.clone(),
        )
    };
    // Per teacher: its scores and how many it scored now, once it has scored.
    type Scored = Result<(Vec<f32>, usize), EngineError>;
    let mut scored_by_teacher: Vec<Option<Scored>> = (0..teachers.len()).map(|_| None).collect();
    std::thread::scope(|scope| {
        let mut aside = Vec::new();
        for (t, teacher) in teachers.iter().enumerate() {
            let cache = ahead_caches.get_mut(t).and_then(Option::take);
            if teacher.uses_device() {
                scored_by_teacher[t] = Some(score_with(t, cache));
            } else {
                aside.push((t, scope.spawn(move || score_with(t, cache))));
            }
        }
        for (t, handle) in aside {
            scored_by_teacher[t] = Some(handle.join().unwrap_or_else(|_| {
                Err(EngineError::Dataflow(format!(
                    "teacher {t}'s scoring thread panicked"
                )))
            }));
        }
    });
    let mut per_teacher: Vec<Vec<f32>> = Vec::with_capacity(teachers.len());
    let mut scored_now = Vec::with_capacity(teachers.len());
    let mut teacher_embeddings = Vec::with_capacity(teachers.len());
    for (t, scored) in scored_by_teacher.into_iter().enumerate() {
        let (scores, now) = scored.ok_or_else(|| {
            EngineError::Dataflow(format!("teacher {t} scored nothing; this is a bug"))
        })??;
        scored_now.push(now + scored_ahead.get(t).copied().unwrap_or(0));
        teacher_embeddings.push(teachers[t].embedding_counts());
        per_teacher.push(scores);
    }

    // The teacher funnel over every candidates row.
    let mut interned: Vec<String> = Vec::new();
    let mut index: HashMap<String, PassageIdx> = HashMap::new();
    let mut intern = |id: &str| -> PassageIdx {
        if let Some(&i) = index.get(id) {
            return i;
        }
        let i = interned.len() as PassageIdx;
        interned.push(id.to_string());
        index.insert(id.to_string(), i);
        i
    };
    let mut scored = Vec::with_capacity(rows.len());
    let mut at = 0;
    for r in &rows {
        let n = r.candidate_ids.len();
        let candidates: Vec<PassageIdx> = r.candidate_ids.iter().map(|c| intern(c)).collect();
        let sources: Vec<PassageIdx> = r.source_ids.iter().map(|c| intern(c)).collect();
        let row_pairs = &pair_of[at..at + n];
        at += n;
        let scores = per_teacher
            .iter()
            .map(|s| row_pairs.iter().map(|&i| s[i as usize]).collect())
            .collect();
        scored.push(ScoredQuery {
            query_id: r.query_id.clone(),
            sources,
            candidates,
            scores,
        });
    }
    drop(per_teacher);
    let (labelled, stats) = label_queries(&pipeline.teacher, &weights, scored)
        .map_err(|e| EngineError::Invalid(e.to_string()))?;
    let by_id: HashMap<&str, &CandidateRow> =
        rows.iter().map(|r| (r.query_id.as_str(), r)).collect();
    let mut examples: Vec<Example> = Vec::with_capacity(labelled.len());
    for l in labelled {
        let row = by_id[l.query_id.as_str()];
        examples.push(
            example_from_labelled(
                l,
                row.query_text.clone(),
                row.query_type.clone(),
                &interned,
                &pipeline.teacher,
            )
            .map_err(|e| EngineError::Invalid(e.to_string()))?,
        );
    }
    let dev = examples
        .iter()
        .filter(|e| e.split == crate::mining::Split::Dev)
        .count();
    let record = ExamplesRecord {
        key: key.clone(),
        pairs: pairs.len(),
        stats: stats.clone(),
        examples: examples.len(),
        dev,
    };
    let text =
        serde_json::to_string_pretty(&record).map_err(|e| EngineError::Invalid(e.to_string()))?;
    if store.completed(EXAMPLES_STAGE, &key)?.is_none() {
        let mut writer = store.begin(EXAMPLES_STAGE, key, examples_schema())?;
        writer.write_rows(&examples, CHUNK_ROWS, |chunk| {
            Ok::<_, EngineError>(examples_to_batch(chunk)?)
        })?;
        crate::store::write_file_atomically(&record_path, text.as_bytes())?;
        writer.finish()?;
    } else {
        crate::store::write_file_atomically(&record_path, text.as_bytes())?;
    }
    let jsonl = if pipeline.jsonl {
        write_jsonl(&jsonl_path, &examples)?;
        Some(jsonl_path)
    } else {
        None
    };
    Ok(LabelOutcome {
        mine,
        reused: false,
        pairs: pairs.len(),
        scored_now,
        scored_ahead: (0..teachers.len())
            .map(|t| scored_ahead.get(t).copied().unwrap_or(0))
            .collect(),
        teacher_embeddings,
        stats,
        examples: examples.len(),
        train: examples.len() - dev,
        dev,
        jsonl,
    })
}

/// A pair: its key, its candidates row, its passage's place (in the candidates' texts).
type Pair = (MemoKey, u32, u32);

/// (pair key, row, the passage's place in `passage_keys`) of every (row, candidate) of
/// `rows`, row-major: the keys hashed on `threads` threads, each over a contiguous range
/// of rows.
fn row_pairs(
    rows: &[CandidateRow],
    passage_keys: &HashMap<&str, (MemoKey, u32)>,
    threads: usize,
) -> Result<Vec<Pair>, EngineError> {
    let per_thread = rows.len().div_ceil(threads.max(1)).max(1);
    let parts: Vec<Result<Vec<Pair>, EngineError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = rows
            .chunks(per_thread)
            .enumerate()
            .map(|(part, chunk)| {
                scope.spawn(move || {
                    let first = part * per_thread;
                    let mut out =
                        Vec::with_capacity(chunk.iter().map(|r| r.candidate_ids.len()).sum());
                    for (j, r) in chunk.iter().enumerate() {
                        let query_key = MemoKey::of(r.query_text.as_bytes());
                        for c in &r.candidate_ids {
                            let Some(&(passage_key, place)) = passage_keys.get(c.as_str()) else {
                                return Err(EngineError::Invalid(format!(
                                    "candidate passage `{c}` is not in the corpus any more; \
                                     run mine again"
                                )));
                            };
                            out.push((
                                pair_key_of(query_key, passage_key),
                                (first + j) as u32,
                                place,
                            ));
                        }
                    }
                    Ok(out)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(EngineError::Dataflow(
                        "a pair key thread panicked; this is a bug".into(),
                    ))
                })
            })
            .collect()
    });
    let mut pairs = Vec::with_capacity(rows.iter().map(|r| r.candidate_ids.len()).sum());
    for part in parts {
        pairs.extend(part?);
    }
    Ok(pairs)
}

/// The examples as JSONL at `path`, through the durable protocol.
fn write_jsonl(path: &std::path::Path, examples: &[Example]) -> Result<(), EngineError> {
    let io = |source| EngineError::Write {
        path: path.to_path_buf(),
        source,
    };
    crate::store::write_file_with(path, |file: &mut std::fs::File, _| {
        let mut out = std::io::BufWriter::new(file);
        write_examples_jsonl(&mut out, examples).map_err(io)?;
        std::io::Write::flush(&mut out).map_err(io)
    })?;
    Ok(())
}
