//! The corpus change plan: what a changed corpus touches, carried by differential
//! dataflow from the difference between the corpus version the last generation finished
//! and this one.
//!
//! Every generation records its corpus version in the stage store (two stages,
//! [`VERSION_PASSAGES`] and [`VERSION_QUERIES`]): per passage read, its id and digests
//! of its title and whole text; per generated query, its id, its source passage and a
//! digest of its text. The next generation compares its own version with that one:
//!
//! 1. The difference is taken per id (host side, one hash map): passages added, removed
//!    and edited (an edit is a removal and an addition under one id; a title-only edit
//!    is told apart), queries added, retracted and rewritten.
//! 2. The last version enters a differential dataflow at time 0 and the difference at
//!    time 1; the operators below carry it to what depends on it, and their output's
//!    updates at time 1 are what the change touches:
//!    - the held-out set (`reduce` over every id read: the `held_out` smallest seeded id
//!      hashes, as [`crate::mining::held_out_passages`] chooses them): passages moved in or out;
//!    - the queries on each side of it (`semijoin` of the queries, keyed by source, with
//!      the held-out set, and the rest): queries moved between the training set and the
//!      synthetic test set, whether or not their own text changed;
//!    - the distinct title-and-text contents (`distinct`): contents new to the corpus and
//!      gone from it, what a passage embedding could have to compute;
//!    - passages repeating another's title and text (`reduce` by content): duplicates
//!      formed by the change.
//!
//! The plan is what the run reports per stage (retracted, moved, new) beside what each
//! stage found in its memo tables: the stages themselves find their work by key
//! ([`crate::store::memo`], the generator's cache, retrieval repair), which is exact
//! whether or not a plan exists (a first run, a killed generation). The arrangements live
//! only inside this computation: a rerun is a new process, so the version is kept as
//! stages and entered again at time 0 (a sort of the last version's rows).

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::Arc;

use differential_dataflow::input::Input;
use differential_dataflow::VecCollection;
use serde::{Deserialize, Serialize};
use timely::dataflow::ProbeHandle;

use crate::error::EngineError;
use crate::generate::prepare::{digest64, ReadPassage};
use crate::generate::queries_table::GeneratedQuery;
use crate::mining::held_out_rank;
use crate::schema::{
    version_batch, version_digests, version_passages_schema, version_queries_schema,
    version_strings, COL_ID, COL_QUERY_ID, COL_SOURCE_ID, COL_TEXT_DIGEST, COL_TITLE_DIGEST,
};
use crate::store::{ContentHasher, StageKey, StageStore};

/// The stage holding the last finished version's passages.
pub const VERSION_PASSAGES: &str = "corpus-version-passages";
/// The stage holding the last finished version's generated queries.
pub const VERSION_QUERIES: &str = "corpus-version-queries";

/// The settings hash of both version stages (their input hash is the version's content).
const VERSION_SETTINGS: &str = "corpus version v1";

/// Rows per part of a version stage.
const VERSION_PART_ROWS: usize = 65_536;

/// A generated query as a corpus version records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionQuery {
    pub id: String,
    pub source: String,
    pub text: u64,
}

/// One corpus version: every passage read and every query generated from it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CorpusVersion {
    pub passages: Vec<ReadPassage>,
    pub queries: Vec<VersionQuery>,
}

impl CorpusVersion {
    /// The version of a generation: `read` from preparation, `queries` its output.
    pub fn new(read: Vec<ReadPassage>, queries: &[GeneratedQuery]) -> Self {
        let queries = queries
            .iter()
            .map(|q| VersionQuery {
                id: q.query_id.clone(),
                source: q.source_id.clone(),
                text: digest64(&q.query_text),
            })
            .collect();
        Self {
            passages: read,
            queries,
        }
    }

    /// The content hash both version stages are keyed by: every field length-prefixed,
    /// gathered in a buffer so that the hasher sees large updates (a field at a time
    /// costs more than the hashing at a million passages).
    fn content_hash(&self) -> String {
        const FLUSH_BYTES: usize = 1 << 16;
        let mut h = ContentHasher::new();
        let mut buf: Vec<u8> = Vec::with_capacity(2 * FLUSH_BYTES);
        let field = |buf: &mut Vec<u8>, bytes: &[u8]| {
            buf.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
            buf.extend_from_slice(bytes);
        };
        field(&mut buf, &self.passages.len().to_le_bytes());
        for p in &self.passages {
            field(&mut buf, p.id.as_bytes());
            field(&mut buf, &p.title.to_le_bytes());
            field(&mut buf, &p.text.to_le_bytes());
            if buf.len() >= FLUSH_BYTES {
                h.update(&buf);
                buf.clear();
            }
        }
        field(&mut buf, &self.queries.len().to_le_bytes());
        for q in &self.queries {
            field(&mut buf, q.id.as_bytes());
            field(&mut buf, q.source.as_bytes());
            field(&mut buf, &q.text.to_le_bytes());
            if buf.len() >= FLUSH_BYTES {
                h.update(&buf);
                buf.clear();
            }
        }
        h.update(&buf);
        h.finish()
    }
}

/// Passages of this version against the last.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassageChanges {
    /// Passages read now.
    pub read: usize,
    /// Ids with the same title and text as before.
    pub unchanged: usize,
    /// Ids new to this version.
    pub added: usize,
    /// Ids of the last version that are gone.
    pub removed: usize,
    /// Ids whose text changed (their title may have too).
    pub text_edited: usize,
    /// Ids whose title alone changed.
    pub title_edited: usize,
    /// Title-and-text contents new to the corpus: at most this many passage texts can
    /// need an embedding (fewer when a memo table holds them from an earlier version).
    pub contents_new: usize,
    /// Contents no passage has any more.
    pub contents_gone: usize,
    /// Change in the number of passages that repeat another's title and text.
    pub duplicates_formed: isize,
}

/// The held-out set (the synthetic test set's passages) against the last version's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldOutChanges {
    pub moved_in: usize,
    pub moved_out: usize,
}

/// Generated queries of this version against the last.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueryChanges {
    /// Queries now.
    pub queries: usize,
    /// Same id, same text.
    pub unchanged: usize,
    /// Ids new to this version.
    pub added: usize,
    /// Ids of the last version that are gone.
    pub retracted: usize,
    /// Of those, the ones whose source passage was removed or its text edited.
    pub retracted_with_passage: usize,
    /// Same id, another text (a keyword query whose terms' frequencies moved, an edited
    /// passage's query).
    pub rewritten: usize,
    /// Queries of both versions that moved from training to the synthetic test set.
    pub to_test: usize,
    /// Queries of both versions that moved from the synthetic test set to training.
    pub to_train: usize,
}

/// What a corpus change touches, from the last finished generation to this one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangePlan {
    /// A last version was found; without one everything counts as added.
    pub last_version: bool,
    pub passages: PassageChanges,
    pub held_out: HeldOutChanges,
    pub queries: QueryChanges,
}

impl ChangePlan {
    /// Nothing changed.
    pub fn is_empty(&self) -> bool {
        let p = &self.passages;
        let q = &self.queries;
        self.last_version
            && p.added + p.removed + p.text_edited + p.title_edited == 0
            && q.added + q.retracted + q.rewritten + q.to_test + q.to_train == 0
            && self.held_out.moved_in + self.held_out.moved_out == 0
    }

    /// One line for the progress output.
    pub fn line(&self) -> String {
        if !self.last_version {
            return format!(
                "corpus: first version ({} passages, {} queries)",
                self.passages.read, self.queries.queries
            );
        }
        if self.is_empty() {
            return format!(
                "corpus: unchanged since the last generation ({} passages, {} queries)",
                self.passages.read, self.queries.queries
            );
        }
        let p = &self.passages;
        let q = &self.queries;
        format!(
            "corpus change since the last generation: passages +{} -{} edited {} (title only \
             {}), contents new {} gone {}; held out +{} -{}; queries +{} -{} ({} with their \
             passage) rewritten {}, to test {} to train {}",
            p.added,
            p.removed,
            p.text_edited + p.title_edited,
            p.title_edited,
            p.contents_new,
            p.contents_gone,
            self.held_out.moved_in,
            self.held_out.moved_out,
            q.added,
            q.retracted,
            q.retracted_with_passage,
            q.rewritten,
            q.to_test,
            q.to_train
        )
    }
}

/// A passage or query id as the dataflow keys it: 16 bytes of its blake3 (fixed-size
/// keys sort fast; two ids of one corpus share a key with probability ~2^-128).
type Key = u128;

fn key(id: &str) -> Key {
    let hash = blake3::hash(id.as_bytes());
    let mut first = [0u8; 16];
    first.copy_from_slice(&hash.as_bytes()[..16]);
    u128::from_le_bytes(first)
}

/// A passage's record in the dataflow: its title and text digests.
type Content = (u64, u64);

/// Updates at time 1 of the plan's collections.
#[derive(Default)]
struct Observed {
    held: Vec<(Key, isize)>,
    test: Vec<(Key, isize)>,
    train: Vec<(Key, isize)>,
    contents: Vec<(Content, isize)>,
    duplicates: Vec<(Key, isize)>,
}

/// Updates to feed the plan's inputs at one time: a version at time 0, the difference
/// at time 1.
#[derive(Default)]
struct Updates {
    passages: Vec<((Key, Content), isize)>,
    ranks: Vec<(([u8; 32], Key), isize)>,
    queries: Vec<((Key, Key), isize)>,
}

impl Updates {
    /// `version` as insertions, each id keyed once; its queries only `with_queries`.
    fn of(version: &CorpusVersion, seed: u64, with_queries: bool) -> Self {
        let mut u = Updates::default();
        for r in &version.passages {
            let k = key(&r.id);
            u.passages.push(((k, (r.title, r.text)), 1));
            u.ranks.push(((held_out_rank(&r.id, seed), k), 1));
        }
        if with_queries {
            u.queries = version
                .queries
                .iter()
                .map(|q| ((key(&q.source), key(&q.id)), 1))
                .collect();
        }
        u
    }
}

/// The plan of `now` against `last` (none: a first version), with the held-out set of
/// `held_out` passages chosen by `seed`.
pub fn plan(
    last: Option<&CorpusVersion>,
    now: &CorpusVersion,
    held_out: usize,
    seed: u64,
) -> ChangePlan {
    let empty = CorpusVersion::default();
    let old = last.unwrap_or(&empty);
    let mut plan = ChangePlan {
        last_version: last.is_some(),
        ..ChangePlan::default()
    };
    let diff = difference(old, now, seed, &mut plan);
    if diff.passages.is_empty() && diff.queries.is_empty() && last.is_some() {
        // No input changes at time 1: no operator's output does either.
        return plan;
    }
    // A query of both versions changes sides only with its source, so the queries enter
    // the dataflow only when the held-out set moved (their sides' updates are otherwise
    // the queries' own difference, counted above).
    let diff = Arc::new(diff);
    let mut observed = run_dataflow(
        Arc::new(Updates::of(old, seed, false)),
        diff.clone(),
        held_out,
        false,
    );
    if !observed.held.is_empty() {
        observed = run_dataflow(Arc::new(Updates::of(old, seed, true)), diff, held_out, true);
    }

    let count = |updates: &[(Key, isize)], sign: isize| {
        updates.iter().filter(|(_, r)| r.signum() == sign).count()
    };
    plan.held_out.moved_in = count(&observed.held, 1);
    plan.held_out.moved_out = count(&observed.held, -1);
    // A query on both sides' updates moved; one on one side only came or went.
    let test_in: HashSet<Key> = observed
        .test
        .iter()
        .filter(|u| u.1 > 0)
        .map(|u| u.0)
        .collect();
    let test_out: HashSet<Key> = observed
        .test
        .iter()
        .filter(|u| u.1 < 0)
        .map(|u| u.0)
        .collect();
    plan.queries.to_test = observed
        .train
        .iter()
        .filter(|(q, r)| *r < 0 && test_in.contains(q))
        .count();
    plan.queries.to_train = observed
        .train
        .iter()
        .filter(|(q, r)| *r > 0 && test_out.contains(q))
        .count();
    plan.passages.contents_new = observed.contents.iter().filter(|u| u.1 > 0).count();
    plan.passages.contents_gone = observed.contents.iter().filter(|u| u.1 < 0).count();
    plan.passages.duplicates_formed = observed.duplicates.iter().map(|u| u.1).sum();
    plan
}

/// The per-id difference of `now` against `old` as updates, counting passages and
/// queries into `plan`.
fn difference(
    old: &CorpusVersion,
    now: &CorpusVersion,
    seed: u64,
    plan: &mut ChangePlan,
) -> Updates {
    let mut out = Updates::default();
    let p = &mut plan.passages;
    p.read = now.passages.len();
    let mut before: HashMap<&str, Content> = old
        .passages
        .iter()
        .map(|r| (r.id.as_str(), (r.title, r.text)))
        .collect();
    let mut gone_text: HashSet<&str> = HashSet::new();
    for r in &now.passages {
        let k = key(&r.id);
        let content = (r.title, r.text);
        match before.remove(r.id.as_str()) {
            Some(was) if was == content => p.unchanged += 1,
            Some(was) => {
                if was.1 == content.1 {
                    p.title_edited += 1;
                } else {
                    p.text_edited += 1;
                    gone_text.insert(&r.id);
                }
                out.passages.push(((k, was), -1));
                out.passages.push(((k, content), 1));
            }
            None => {
                p.added += 1;
                out.passages.push(((k, content), 1));
                out.ranks.push(((held_out_rank(&r.id, seed), k), 1));
            }
        }
    }
    for (id, was) in before {
        p.removed += 1;
        gone_text.insert(id);
        let k = key(id);
        out.passages.push(((k, was), -1));
        out.ranks.push(((held_out_rank(id, seed), k), -1));
    }

    let q = &mut plan.queries;
    q.queries = now.queries.len();
    let mut before: HashMap<&str, &VersionQuery> =
        old.queries.iter().map(|v| (v.id.as_str(), v)).collect();
    for v in &now.queries {
        let entry = (key(&v.source), key(&v.id));
        match before.remove(v.id.as_str()) {
            Some(was) if was.text == v.text && was.source == v.source => q.unchanged += 1,
            Some(was) => {
                q.rewritten += 1;
                if was.source != v.source {
                    out.queries.push(((key(&was.source), entry.1), -1));
                    out.queries.push((entry, 1));
                }
            }
            None => {
                q.added += 1;
                out.queries.push((entry, 1));
            }
        }
    }
    for (_, was) in before {
        q.retracted += 1;
        q.retracted_with_passage += usize::from(gone_text.contains(was.source.as_str()));
        out.queries.push(((key(&was.source), key(&was.id)), -1));
    }
    out
}

/// Records `collection`'s updates at time 1 (consolidated) in the list of `observed`
/// that `pick` names.
fn observe<'s, D>(
    collection: VecCollection<'s, u32, D, isize>,
    probe: &ProbeHandle<u32>,
    observed: &Rc<RefCell<Observed>>,
    pick: fn(&mut Observed) -> &mut Vec<(D, isize)>,
) where
    D: differential_dataflow::ExchangeData + differential_dataflow::Hashable,
{
    let sink = observed.clone();
    collection
        .consolidate()
        .inspect(move |(d, t, r)| {
            if *t == 1 {
                pick(&mut sink.borrow_mut()).push((d.clone(), *r));
            }
        })
        .probe_with(probe);
}

/// Feeds `at_0` (the last version) at time 0 and `at_1` (the difference) at time 1
/// through the plan's operators (the queries only `with_queries`); returns their
/// outputs' updates at time 1.
fn run_dataflow(
    at_0: Arc<Updates>,
    at_1: Arc<Updates>,
    held_out: usize,
    with_queries: bool,
) -> Observed {
    timely::execute_directly(move |worker| {
        let observed = Rc::new(RefCell::new(Observed::default()));
        let probe = ProbeHandle::new();
        let (mut passages, mut ranks, mut queries) = worker.dataflow::<u32, _, _>(|scope| {
            let (passages_in, passages) = scope.new_collection::<(Key, Content), isize>();
            let (ranks_in, ranks) = scope.new_collection::<([u8; 32], Key), isize>();
            let (queries_in, queries) = scope.new_collection::<(Key, Key), isize>();

            // The held-out set: the `held_out` smallest ranks over every id read, in two
            // levels (the smallest of each bucket of ranks, then the smallest of those),
            // so that a change re-sorts one bucket and the buckets' winners, never every
            // id.
            let held = ranks
                .map(|(rank, id)| (rank[0], (rank, id)))
                .reduce(move |_, input, output| {
                    for (ranked, _) in input.iter().take(held_out) {
                        output.push((**ranked, 1isize));
                    }
                })
                .map(|(_, ranked)| ((), ranked))
                .reduce(move |_, input, output| {
                    for ((_, id), _) in input.iter().take(held_out) {
                        output.push((*id, 1isize));
                    }
                })
                .map(|((), id)| id);
            // The queries on each side of it, keyed by source.
            // (The training side is the rest: one arrangement of the queries, not two.)
            let test = queries.clone().semijoin(held.clone());
            let train = queries.concat(test.clone().negate()).map(|(_, q)| q);
            let test = test.map(|(_, q)| q);
            // Per distinct content: one row for the content itself, one per passage
            // repeating it (every one but the first by key).
            let by_content = passages.map(|(id, c)| (c, id)).reduce(|_, input, output| {
                output.push((None, 1isize));
                for (id, _) in input.iter().skip(1) {
                    output.push((Some(**id), 1isize));
                }
            });
            let contents = by_content
                .clone()
                .filter(|(_, repeat)| repeat.is_none())
                .map(|(c, _)| c);
            let duplicates = by_content.flat_map(|(_, repeat)| repeat);

            observe(held, &probe, &observed, |o| &mut o.held);
            observe(test, &probe, &observed, |o| &mut o.test);
            observe(train, &probe, &observed, |o| &mut o.train);
            observe(contents, &probe, &observed, |o| &mut o.contents);
            observe(duplicates, &probe, &observed, |o| &mut o.duplicates);
            (passages_in, ranks_in, queries_in)
        });
        for (time, updates) in [at_0, at_1].iter().enumerate() {
            for (p, r) in &updates.passages {
                passages.update(*p, *r);
            }
            for (x, r) in &updates.ranks {
                ranks.update(*x, *r);
            }
            if with_queries {
                for (q, r) in &updates.queries {
                    queries.update(*q, *r);
                }
            }
            let next = time as u32 + 1;
            passages.advance_to(next);
            ranks.advance_to(next);
            queries.advance_to(next);
        }
        passages.flush();
        ranks.flush();
        queries.flush();
        while probe.less_than(&2) {
            worker.step();
        }
        observed.take()
    })
}

/// The key of a version: its content, under the held-out settings the plan carries it
/// with (a version recorded under other held-out settings is not compared with: the
/// plan starts a new series, as on a first run).
fn version_key(version: &CorpusVersion, held_out: usize, seed: u64) -> StageKey {
    StageKey {
        settings_hash: format!("{VERSION_SETTINGS}; held out {held_out}; seed {seed}"),
        input_hash: version.content_hash(),
    }
}

/// The plan of `version` against the last version recorded in `store`, then `version`
/// recorded as the last. An unchanged version is known by its key alone: nothing is read
/// and nothing runs.
pub fn plan_and_record(
    store: &StageStore,
    version: &CorpusVersion,
    held_out: usize,
    seed: u64,
) -> Result<ChangePlan, EngineError> {
    let key = version_key(version, held_out, seed);
    if store.completed(VERSION_PASSAGES, &key)?.is_some()
        && store.completed(VERSION_QUERIES, &key)?.is_some()
    {
        let mut plan = ChangePlan {
            last_version: true,
            ..ChangePlan::default()
        };
        plan.passages.read = version.passages.len();
        plan.passages.unchanged = version.passages.len();
        plan.queries.queries = version.queries.len();
        plan.queries.unchanged = version.queries.len();
        return Ok(plan);
    }
    let last = read_last_version(store, &key.settings_hash)?;
    let change = plan(last.as_ref(), version, held_out, seed);
    drop(last);
    write_version(store, version, key)?;
    Ok(change)
}

/// The last finished version in `store` under `settings`, if both of its stages are
/// complete and agree.
fn read_last_version(
    store: &StageStore,
    settings: &str,
) -> Result<Option<CorpusVersion>, EngineError> {
    let (Some(passages), Some(queries)) = (
        store.last_completed(VERSION_PASSAGES)?,
        store.last_completed(VERSION_QUERIES)?,
    ) else {
        return Ok(None);
    };
    if passages.key != queries.key || passages.key.settings_hash != settings {
        // A generation killed between the two writes, or other held-out settings: no
        // version to compare with.
        return Ok(None);
    }
    let mut version = CorpusVersion::default();
    for batch in store.read(VERSION_PASSAGES)? {
        let batch = batch?;
        let ids = version_strings(&batch, COL_ID)?;
        let titles = version_digests(&batch, COL_TITLE_DIGEST)?;
        let texts = version_digests(&batch, COL_TEXT_DIGEST)?;
        version.passages.extend(
            ids.into_iter()
                .zip(titles.into_iter().zip(texts))
                .map(|(id, (title, text))| ReadPassage { id, title, text }),
        );
    }
    for batch in store.read(VERSION_QUERIES)? {
        let batch = batch?;
        let ids = version_strings(&batch, COL_QUERY_ID)?;
        let sources = version_strings(&batch, COL_SOURCE_ID)?;
        let texts = version_digests(&batch, COL_TEXT_DIGEST)?;
        version.queries.extend(
            ids.into_iter()
                .zip(sources.into_iter().zip(texts))
                .map(|(id, (source, text))| VersionQuery { id, source, text }),
        );
    }
    Ok(Some(version))
}

/// Records `version` under `key` as the last finished one (a stage already complete
/// under it is kept).
fn write_version(
    store: &StageStore,
    version: &CorpusVersion,
    key: StageKey,
) -> Result<(), EngineError> {
    if store.completed(VERSION_PASSAGES, &key)?.is_none() {
        let mut writer = store.begin(VERSION_PASSAGES, key.clone(), version_passages_schema())?;
        let p = &version.passages;
        writer.write_row_ranges(p.len(), VERSION_PART_ROWS, |r| {
            let ids: Vec<String> = p[r.clone()].iter().map(|x| x.id.clone()).collect();
            let titles: Vec<u64> = p[r.clone()].iter().map(|x| x.title).collect();
            let texts: Vec<u64> = p[r].iter().map(|x| x.text).collect();
            Ok::<_, EngineError>(version_batch(
                version_passages_schema(),
                &[&ids],
                &[&titles, &texts],
            )?)
        })?;
        writer.finish()?;
    }
    if store.completed(VERSION_QUERIES, &key)?.is_none() {
        let mut writer = store.begin(VERSION_QUERIES, key, version_queries_schema())?;
        let q = &version.queries;
        writer.write_row_ranges(q.len(), VERSION_PART_ROWS, |r| {
            let ids: Vec<String> = q[r.clone()].iter().map(|x| x.id.clone()).collect();
            let sources: Vec<String> = q[r.clone()].iter().map(|x| x.source.clone()).collect();
            let texts: Vec<u64> = q[r].iter().map(|x| x.text).collect();
            Ok::<_, EngineError>(version_batch(
                version_queries_schema(),
                &[&ids, &sources],
                &[&texts],
            )?)
        })?;
        writer.finish()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mining::held_out_passages;

    fn passage(id: &str, title: &str, text: &str) -> ReadPassage {
        ReadPassage {
            id: id.to_string(),
            title: digest64(title),
            text: digest64(text),
        }
    }

    fn query(source: &str, text: &str) -> VersionQuery {
        VersionQuery {
            id: format!("{source}#claim"),
            source: source.to_string(),
            text: digest64(text),
        }
    }

    /// Ten passages, each with one query.
    fn original() -> CorpusVersion {
        let passages: Vec<_> = (0..10)
            .map(|i| {
                passage(
                    &format!("p{i}"),
                    &format!("title {i}"),
                    &format!("text {i}"),
                )
            })
            .collect();
        let queries = (0..10)
            .map(|i| query(&format!("p{i}"), &format!("query {i}")))
            .collect();
        CorpusVersion { passages, queries }
    }

    fn held(version: &CorpusVersion, count: usize, seed: u64) -> HashSet<String> {
        let ids: Vec<String> = version.passages.iter().map(|p| p.id.clone()).collect();
        held_out_passages(&ids, count, seed)
            .into_iter()
            .map(|i| ids[i as usize].clone())
            .collect()
    }

    #[test]
    fn a_first_version_is_all_new_and_an_unchanged_one_is_empty() {
        let v = original();
        let first = plan(None, &v, 3, 7);
        assert!(!first.last_version && !first.is_empty());
        assert_eq!(first.passages.added, 10);
        assert_eq!(first.passages.contents_new, 10);
        assert_eq!(first.held_out.moved_in, 3);
        assert_eq!(first.queries.added, 10);
        let again = plan(Some(&v), &v, 3, 7);
        assert!(again.is_empty(), "{again:?}");
        assert_eq!(again.passages.unchanged, 10);
        assert_eq!(again.queries.unchanged, 10);
        assert_eq!(
            again.passages.contents_new + again.passages.contents_gone,
            0
        );
    }

    #[test]
    fn every_kind_of_change_is_counted_and_carried_to_the_held_out_set_and_its_queries() {
        let (count, seed) = (3, 11);
        let old = original();
        let old_held = held(&old, count, seed);
        // Remove a held-out passage: the next-ranked id moves in, and its query with it.
        let victim = old
            .passages
            .iter()
            .position(|p| old_held.contains(&p.id))
            .unwrap();
        let victim_id = old.passages[victim].id.clone();
        let mut new = old.clone();
        new.passages.remove(victim);
        new.queries.remove(victim);
        // Edit the text of one passage (its query is rewritten) and the title of another,
        // neither of them the victim; add a copy of a third under a new id.
        let others: Vec<usize> = (0..new.passages.len()).take(3).collect();
        let (edited, retitled, copied) = (others[0], others[1], others[2]);
        let edited_id = new.passages[edited].id.clone();
        new.passages[edited] = passage(&edited_id, &format!("title {edited_id}"), "new text");
        new.queries[edited].text = digest64("a new query");
        new.passages[retitled].title = digest64("another title");
        let mut copy = new.passages[copied].clone();
        copy.id = "copy".into();
        new.passages.push(copy);
        new.queries.push(query("copy", "query of the copy"));

        let got = plan(Some(&old), &new, count, seed);
        let p = &got.passages;
        assert_eq!((p.read, p.unchanged), (10, 7));
        assert_eq!((p.added, p.removed), (1, 1));
        assert_eq!((p.text_edited, p.title_edited), (1, 1));
        // New: the edited and the retitled contents (the copy's content exists);
        // gone: the victim's and the two old contents.
        assert_eq!((p.contents_new, p.contents_gone), (2, 3));
        assert_eq!(p.duplicates_formed, 1);
        let q = &got.queries;
        assert_eq!((q.queries, q.unchanged), (10, 8));
        assert_eq!((q.added, q.retracted, q.retracted_with_passage), (1, 1, 1));
        assert_eq!(q.rewritten, 1);

        // The held-out set and the queries' sides, against the choice made directly.
        let new_held = held(&new, count, seed);
        let moved_in: Vec<_> = new_held.difference(&old_held).collect();
        let moved_out: Vec<_> = old_held.difference(&new_held).collect();
        assert_eq!(moved_out, [&victim_id]);
        assert_eq!(got.held_out.moved_in, moved_in.len());
        assert_eq!(got.held_out.moved_out, 1);
        // Queries of both versions whose source moved in (the copy is new: not moved).
        let to_test = moved_in.iter().filter(|id| id.as_str() != "copy").count();
        assert_eq!(got.queries.to_test, to_test);
        assert_eq!(got.queries.to_train, 0);
        assert_eq!(to_test, 1, "the test must move a surviving query");
    }
}
