//! The labelling stage: teacher scores for every (query, candidate) pair of the
//! candidates stage, then the teacher funnel and the `examples` table (RECIPE.md
//! section 4).
//!
//! A teacher is a cross-encoder, a bi-encoder
//! or BM25 ([`teacher::PairTeacher`], one file per kind). Per model teacher, scores live
//! in an append-only cache stage named after the teacher's fingerprint, keyed per pair by
//! a hash of the query text and the passage text: a pair is never scored twice by the
//! same teacher, across runs and corpus changes, and teachers of different kinds or
//! settings never share a cache. Missing pairs are scored by the teacher (its device
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
pub mod teacher;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, Float32Array, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use serde::Serialize;

use crate::config::Pipeline;
use crate::dataflow::candidates::{MineOutcome, CANDIDATES_STAGE};
use crate::dataflow::passage_texts_of;
use crate::dataflow::CHUNK_ROWS;
use crate::error::EngineError;
use crate::mining::{
    example_from_labelled, examples_schema, examples_to_batch, label_queries, write_examples_jsonl,
    Example, PassageIdx, ScoredQuery, TeacherStats,
};
use crate::schema::{candidates_from_batch, CandidateRow};
use crate::store::memo::{MemoKey, MemoMap};
use crate::store::{hash_settings, StageKey, StageStatus, StageStore};
use load::load_teacher;
use teacher::{EmbeddingCounts, KnownEmbeddings, PairToScore, ScoringContext};

/// The examples stage's name.
pub const EXAMPLES_STAGE: &str = "examples";

/// Column names of a teacher score stage.
const COL_PAIR: &str = "pair";
const COL_SCORE: &str = "score";

/// What `label` did.
#[derive(Debug, Clone, Serialize)]
pub struct LabelOutcome {
    pub mine: MineOutcome,
    /// True when the examples were complete under their key and nothing was labelled.
    pub reused: bool,
    /// Pairs each teacher needed, and how many of them it had to score now.
    pub pairs: usize,
    pub scored_now: Vec<usize>,
    /// Per teacher: texts it embedded now and texts it took from a retriever's stage.
    pub teacher_embeddings: Vec<EmbeddingCounts>,
    pub stats: TeacherStats,
    pub examples: usize,
    pub train: usize,
    pub dev: usize,
    pub jsonl: Option<PathBuf>,
}

/// The schema of a teacher's score stages: pair key, score.
pub(crate) fn scores_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(COL_PAIR, DataType::Utf8, false),
        Field::new(COL_SCORE, DataType::Float32, false),
    ]))
}

pub(crate) fn scores_batch(pairs: &[String], scores: Vec<f32>) -> Result<RecordBatch, ArrowError> {
    let p: ArrayRef = Arc::new(StringArray::from_iter_values(pairs.iter()));
    let s: ArrayRef = Arc::new(Float32Array::from(scores));
    RecordBatch::try_new(scores_schema(), vec![p, s])
}

/// The cache key of a (query text, passage text) pair: what the teacher sees, nothing
/// else, so a moved or renamed passage keeps its scores.
pub fn pair_key(query: &str, passage: &str) -> String {
    pair_key_of(
        MemoKey::of(query.as_bytes()),
        MemoKey::of(passage.as_bytes()),
    )
    .to_hex()
}

/// [`pair_key`] from the two texts' keys: a text is hashed once for all its pairs (a
/// SciFact passage is in some 280 pairs; hashing it for each was most of a rerun). The
/// cache stores [`MemoKey::to_hex`] of it.
pub(crate) fn pair_key_of(query: MemoKey, passage: MemoKey) -> MemoKey {
    let mut both = [0u8; 32];
    both[..16].copy_from_slice(&query.0.to_be_bytes());
    both[16..].copy_from_slice(&passage.0.to_be_bytes());
    MemoKey::of(&both)
}

/// The input hash of every teacher cache stage: the cache holds the pairs any run asked
/// for. Its version names the pair-key scheme; a cache of another scheme is started
/// again (its keys would never match).
const TEACHER_CACHE_INPUT: &str = "append-only cache; pair keys of text keys";

pub(crate) fn read_scores(
    store: &StageStore,
    stage: &str,
    into: &mut MemoMap<f32>,
) -> Result<(), EngineError> {
    for batch in store.read(stage)? {
        let batch = batch?;
        let bad = || EngineError::Invalid(format!("stage {stage}: not a teacher score table"));
        let p = batch
            .column_by_name(COL_PAIR)
            .and_then(|c| c.as_any().downcast_ref::<StringArray>())
            .ok_or_else(bad)?;
        let s = batch
            .column_by_name(COL_SCORE)
            .and_then(|c| c.as_any().downcast_ref::<Float32Array>())
            .ok_or_else(bad)?;
        for i in 0..batch.num_rows() {
            let key = MemoKey::from_hex(p.value(i)).ok_or_else(bad)?;
            into.insert(key, s.value(i));
        }
    }
    Ok(())
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

/// Teacher scoring and labelling of `mine`'s candidates; inputs not checked here
/// ([`Pipeline::preflight`]).
pub fn run_label_stage(
    pipeline: &Pipeline,
    mine: MineOutcome,
) -> Result<LabelOutcome, EngineError> {
    let store = StageStore::open(&pipeline.run_dir)?;
    // The teachers first: their fingerprints are part of the examples' key.
    let mut teachers = Vec::with_capacity(pipeline.teachers.len());
    for (t, settings) in pipeline.teachers.iter().enumerate() {
        teachers.push(load_teacher(pipeline, t, settings)?);
    }
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
        let (cached, now) = scores_through_cache(
            &store,
            pipeline,
            t,
            teacher.as_ref(),
            &keys,
            &texts_of,
            known.clone(),
        )?;
        scored_now.push(now);
        teacher_embeddings.push(teacher.embedding_counts());
        per_teacher.push(cached);
    }
    drop(teachers);

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
        teacher_embeddings,
        stats,
        examples: examples.len(),
        train: examples.len() - dev,
        dev,
        jsonl,
    })
}

/// Teacher `t`'s scores of the pairs `keys` names (sorted, distinct [`pair_key`]s;
/// `texts(i)` is pair `i`'s query and passage text) through its pair cache: the pairs
/// the cache lacks are scored and appended to it (a part at a time, each atomic), all of
/// them for a teacher that is not cached. Returns every pair's score by key and how many
/// were scored now.
pub(crate) fn scores_through_cache<'t>(
    store: &StageStore,
    pipeline: &Pipeline,
    t: usize,
    teacher: &dyn teacher::PairTeacher,
    keys: &[MemoKey],
    texts: &dyn Fn(usize) -> (&'t str, &'t str),
    known: Vec<KnownEmbeddings<'_>>,
) -> Result<(MemoMap<f32>, usize), EngineError> {
    let settings_hash = teacher.fingerprint().to_string();
    // Stage names come from the hash, never from the user's path.
    let stage_prefix = format!("teacher-{}", &settings_hash[..16]);
    let cache_stage = format!("{stage_prefix}-cache");
    let cache_key = StageKey {
        settings_hash,
        input_hash: TEACHER_CACHE_INPUT.into(),
    };
    let mut cached = MemoMap::default();
    if teacher.cached()
        && matches!(
            store.status(&cache_stage, &cache_key)?,
            StageStatus::Partial { .. }
        )
    {
        read_scores(store, &cache_stage, &mut cached)?;
    }
    let missing: Vec<usize> = (0..keys.len())
        .filter(|&i| !cached.contains_key(&keys[i]))
        .collect();
    if missing.is_empty() {
        return Ok((cached, 0));
    }
    // A pair's key names it in the cache and in the teacher's own stages; a teacher that
    // keeps neither needs none.
    let hexes: Vec<String> = if teacher.cached() {
        missing.iter().map(|&i| keys[i].to_hex()).collect()
    } else {
        vec![String::new(); missing.len()]
    };
    let to_score: Vec<PairToScore<'_>> = missing
        .iter()
        .zip(&hexes)
        .map(|(&i, hex)| {
            let (query, passage) = texts(i);
            PairToScore {
                key: hex,
                query,
                passage,
            }
        })
        .collect();
    let kind = pipeline
        .teachers
        .get(t)
        .map_or("teacher", |s| s.kind.name());
    let ctx = ScoringContext {
        store,
        stage_prefix,
        label: format!("teacher {t} ({kind})"),
        batcher: pipeline.batcher(),
        workers: pipeline.workers,
        threads: pipeline.threads,
        quiet: pipeline.quiet,
        known,
    };
    let scores = teacher.score_pairs(&to_score, &ctx)?;
    if scores.len() != to_score.len() {
        return Err(EngineError::Dataflow(format!(
            "teacher {t} returned {} scores for {} pairs; this is a bug",
            scores.len(),
            to_score.len()
        )));
    }
    if teacher.cached() {
        let mut writer = store.begin(&cache_stage, cache_key, scores_schema())?;
        for (chunk, chunk_scores) in hexes.chunks(CHUNK_ROWS).zip(scores.chunks(CHUNK_ROWS)) {
            writer.write_part(&[scores_batch(chunk, chunk_scores.to_vec())?])?;
        }
    }
    let now = missing.len();
    cached.extend(missing.into_iter().map(|i| keys[i]).zip(scores));
    Ok((cached, now))
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
