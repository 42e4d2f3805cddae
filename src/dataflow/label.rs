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
use pair_cache::{pair_key_of, PairCache};

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
use crate::store::memo::{MemoKey, MemoMap};
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
    let mut row_keys: Vec<Vec<MemoKey>> = Vec::with_capacity(rows.len());
    // Every distinct pair, in the order of its key (the order the teachers score in and
    // the cache is appended in): (key, row, the passage's place). Two pairs of equal keys
    // have the same texts, so which one stays does not matter.
    let mut pairs: Vec<(MemoKey, u32, u32)> =
        Vec::with_capacity(rows.iter().map(|r| r.candidate_ids.len()).sum());
    for (row, r) in rows.iter().enumerate() {
        let query_key = MemoKey::of(r.query_text.as_bytes());
        let mut keys = Vec::with_capacity(r.candidate_ids.len());
        for c in &r.candidate_ids {
            let Some(&(passage_key, place)) = passage_keys.get(c.as_str()) else {
                return Err(EngineError::Invalid(format!(
                    "candidate passage `{c}` is not in the corpus any more; run mine again"
                )));
            };
            let key = pair_key_of(query_key, passage_key);
            keys.push(key);
            pairs.push((key, row as u32, place));
        }
        row_keys.push(keys);
    }
    pairs.sort_unstable_by_key(|p| p.0);
    pairs.dedup_by_key(|p| p.0);

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

    let mut per_teacher: Vec<MemoMap<f32>> = Vec::new();
    let mut scored_now = Vec::new();
    let mut teacher_embeddings = Vec::new();
    let keys: Vec<MemoKey> = pairs.iter().map(|p| p.0).collect();
    let texts_of = |i: usize| {
        let (_, row, place) = pairs[i];
        (
            rows[row as usize].query_text.as_str(),
            passage_texts_by_place[place as usize],
        )
    };
    for (t, teacher) in teachers.iter().enumerate() {
        let mut cache = match ahead_caches.get_mut(t).and_then(Option::take) {
            Some(cache) => cache,
            None => PairCache::open(&store, teacher.as_ref())?,
        };
        let now = cache.score_missing(
            &store,
            pipeline,
            t,
            teacher.as_ref(),
            &keys,
            &texts_of,
            known.clone(),
        )?;
        scored_now.push(now + scored_ahead.get(t).copied().unwrap_or(0));
        teacher_embeddings.push(teacher.embedding_counts());
        per_teacher.push(cache.into_scores());
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
    for (r, keys) in rows.iter().zip(&row_keys) {
        let candidates: Vec<PassageIdx> = r.candidate_ids.iter().map(|c| intern(c)).collect();
        let sources: Vec<PassageIdx> = r.source_ids.iter().map(|c| intern(c)).collect();
        let mut scores = Vec::with_capacity(per_teacher.len());
        for cache in &per_teacher {
            let mut s = Vec::with_capacity(keys.len());
            for (c, key) in r.candidate_ids.iter().zip(keys) {
                s.push(*cache.get(key).ok_or_else(|| {
                    EngineError::Dataflow(format!(
                        "no teacher score for query {} and passage {c}; this is a bug",
                        r.query_id
                    ))
                })?);
            }
            scores.push(s);
        }
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
