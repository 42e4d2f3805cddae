//! The device executor: one thread per device that runs whole batches of every model
//! operator of the process, each operator fed through its own bounded queue.
//!
//! A device stage opens a queue on its device's executor ([`DeviceExecutor::shared`],
//! one per device for the whole process) with the model it runs
//! ([`DeviceExecutor::open_queue`]). Workers tokenise and batch on their own threads and
//! submit [`Job`]s to their queue; the executor takes the next batch from whichever queue
//! has one, runs it, sends the [`Done`] back on the job's reply channel and calls the
//! job's waker so the submitting operator is scheduled again. Each queue holds
//! [`DEVICE_QUEUE_DEPTH`] batches: a submitter that finds its queue full keeps its batches
//! and stops pulling input (the backpressure), while the device always has the next
//! batch ready when it finishes one. Because one thread runs every batch of a device,
//! two stages never run models at once on it: on the CPU the model kernels' threads are
//! never oversubscribed, however many stages run.
//!
//! Per queue the executor records what the report draws ([`ExecutorStats`]): batches,
//! tokens, busy time, and the queue's depth as each batch starts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use candle_core::Device;
use crossbeam_channel::{bounded, unbounded, Receiver, Select, Sender, TrySendError};
use distillery_operators::cross_encoder::CrossEncoder;
use distillery_operators::{Embedder, OperatorError, TextKind, TokenBatch, TokenizedText};

/// Batches waiting for the device, per queue. Two: one being prepared while another
/// waits keeps the device busy; more would only hold memory and delay backpressure.
pub const DEVICE_QUEUE_DEPTH: usize = 2;

/// A model that runs whole token batches and returns one row of floats per text.
pub trait BatchModel: Send + Sync + 'static {
    /// The device the model's weights live on: its batches run on that device's executor.
    fn device(&self) -> &Device;
    /// Floats per row of output.
    fn row_width(&self) -> usize;
    /// Runs one batch: `rows x row_width` floats, rows in the batch's order.
    fn run_batch(&self, batch: &TokenBatch) -> Result<Vec<f32>, OperatorError>;
}

/// How to load a device model again from its files, as another process of the cluster
/// does to run its share of a stage (`dataflow::cluster`): the directory and every
/// setting resolved, so the model it loads computes the same bits.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ModelSpec {
    /// An embedder on one side of retrieval.
    Embed {
        dir: std::path::PathBuf,
        max_seq_length: usize,
        query_prefix: String,
        passage_prefix: String,
        query: bool,
    },
    /// A cross-encoder scoring pairs.
    Score {
        dir: std::path::PathBuf,
        max_length: usize,
    },
}

impl ModelSpec {
    /// The model loaded on `device`.
    pub fn load_embed(&self, device: &Device) -> Result<Option<EmbedTexts>, OperatorError> {
        let ModelSpec::Embed {
            dir,
            max_seq_length,
            query_prefix,
            passage_prefix,
            query,
        } = self
        else {
            return Ok(None);
        };
        let options = distillery_operators::EmbedderOptions {
            max_seq_length: Some(*max_seq_length),
            query_prefix: Some(query_prefix.clone()),
            passage_prefix: Some(passage_prefix.clone()),
        };
        Ok(Some(EmbedTexts {
            embedder: Arc::new(Embedder::load(dir, &options, device)?),
            kind: if *query {
                TextKind::Query
            } else {
                TextKind::Passage
            },
        }))
    }

    /// The cross-encoder loaded on `device`.
    pub fn load_score(&self, device: &Device) -> Result<Option<ScorePairs>, OperatorError> {
        let ModelSpec::Score { dir, max_length } = self else {
            return Ok(None);
        };
        let options = distillery_operators::cross_encoder::CrossEncoderOptions {
            max_length: Some(*max_length),
        };
        Ok(Some(ScorePairs {
            model: Arc::new(CrossEncoder::load(dir, &options, device)?),
        }))
    }
}

/// A model the dataflow can feed: it tokenises its items on a worker thread and runs
/// the batches on the device.
pub trait DeviceModel: BatchModel {
    /// What one input is (a text, a query-passage pair), as it travels between workers.
    type Item: timely::ExchangeData + Clone;
    /// Tokenises items, in order (each `index` is set by the caller).
    fn tokenize(&self, items: &[&Self::Item]) -> Result<Vec<TokenizedText>, OperatorError>;
    /// How another process loads this model ([`ModelSpec`]).
    fn spec(&self) -> ModelSpec;
}

/// An embedder bound to one side of retrieval (queries or passages).
pub struct EmbedTexts {
    pub embedder: Arc<Embedder>,
    pub kind: TextKind,
}

impl BatchModel for EmbedTexts {
    fn device(&self) -> &Device {
        self.embedder.device()
    }

    fn row_width(&self) -> usize {
        self.embedder.dim()
    }

    fn run_batch(&self, batch: &TokenBatch) -> Result<Vec<f32>, OperatorError> {
        self.embedder.embed_batch_as(batch, self.kind)
    }
}

impl DeviceModel for EmbedTexts {
    type Item = String;

    fn tokenize(&self, items: &[&String]) -> Result<Vec<TokenizedText>, OperatorError> {
        let texts: Vec<&str> = items.iter().map(|s| s.as_str()).collect();
        Ok(self
            .embedder
            .tokenize(&texts, self.kind)?
            .into_iter()
            .map(|ids| TokenizedText::new(0, ids))
            .collect())
    }

    fn spec(&self) -> ModelSpec {
        let e = &self.embedder;
        ModelSpec::Embed {
            dir: e.dir().to_path_buf(),
            max_seq_length: e.max_seq_length(),
            query_prefix: e.prefix(TextKind::Query).to_string(),
            passage_prefix: e.prefix(TextKind::Passage).to_string(),
            query: self.kind == TextKind::Query,
        }
    }
}

/// A cross-encoder teacher scoring (query, passage) pairs: one score per pair.
pub struct ScorePairs {
    pub model: Arc<CrossEncoder>,
}

impl BatchModel for ScorePairs {
    fn device(&self) -> &Device {
        self.model.device()
    }

    fn row_width(&self) -> usize {
        1
    }

    fn run_batch(&self, batch: &TokenBatch) -> Result<Vec<f32>, OperatorError> {
        self.model.score_batch(batch)
    }
}

impl DeviceModel for ScorePairs {
    type Item = (String, String);

    fn tokenize(&self, items: &[&(String, String)]) -> Result<Vec<TokenizedText>, OperatorError> {
        let pairs: Vec<(&str, &str)> = items
            .iter()
            .map(|(q, p)| (q.as_str(), p.as_str()))
            .collect();
        self.model.tokenize_pairs(&pairs)
    }

    fn spec(&self) -> ModelSpec {
        ModelSpec::Score {
            dir: self.model.dir().to_path_buf(),
            max_length: self.model.max_length(),
        }
    }
}

/// Called when a job is done, from the executor thread.
pub type Waker = Arc<dyn Fn() + Send + Sync>;

/// A batch for the device.
pub struct Job {
    pub batch: TokenBatch,
    pub reply: Sender<Done>,
    pub wake: Option<Waker>,
}

/// A batch the device has run.
pub struct Done {
    pub batch: TokenBatch,
    pub output: Result<Vec<f32>, OperatorError>,
}

/// What the executor did for one queue (one stage).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExecutorStats {
    pub batches: u64,
    pub rows: u64,
    pub real_tokens: u64,
    pub padded_tokens: u64,
    /// Time spent running the queue's batches.
    pub busy: Duration,
    /// Time since the queue was opened.
    pub wall: Duration,
    /// Jobs waiting in the queue as each batch started, with the seconds since the
    /// queue was opened: how far ahead of the device its operator kept. At most
    /// [`MAX_QUEUE_SAMPLES`], evenly thinned when a stage runs more batches.
    pub queue_depth: Vec<(f32, u8)>,
}

/// Queue-depth samples an executor keeps: enough for a plot, bounded for a long stage.
pub const MAX_QUEUE_SAMPLES: usize = 512;

impl ExecutorStats {
    /// The share of the wall time the device was running batches (0 when nothing ran).
    pub fn busy_fraction(&self) -> f64 {
        let wall = self.wall.as_secs_f64();
        if wall > 0.0 {
            (self.busy.as_secs_f64() / wall).min(1.0)
        } else {
            0.0
        }
    }

    fn sample_queue(&mut self, at: Duration, depth: usize) {
        if self.queue_depth.len() == MAX_QUEUE_SAMPLES {
            // Keep every other sample: the series stays evenly spread over the stage.
            let mut i = 0;
            self.queue_depth.retain(|_| {
                i += 1;
                i % 2 == 1
            });
        }
        self.queue_depth
            .push((at.as_secs_f32(), depth.min(u8::MAX as usize) as u8));
    }
}

/// Why a job was not taken.
pub enum Refused {
    /// The queue is full: offer the job again when one of the queue's jobs is done.
    Full(Job),
    /// The executor has stopped (a model kernel panicked): no job will run again.
    Stopped(Job),
}

/// What a queue carries: a batch for the queue's model, or a lease of the whole device.
enum Request {
    Batch(Job),
    Lease(LeaseRequest),
}

impl Request {
    /// The job of a batch request handed back by a refused send (only batches are
    /// offered with `try_submit` and `submit`).
    fn into_job(self) -> Job {
        match self {
            Request::Batch(job) => job,
            Request::Lease(_) => unreachable!("only batches are handed back"),
        }
    }
}

/// A lease asked for: the executor says `granted`, then waits until `released` says (or
/// its sender is dropped) before it runs anything else.
struct LeaseRequest {
    granted: Sender<()>,
    released: Receiver<()>,
    rows: u64,
}

/// The device, held by one stage's own thread (the LLM's generation, the student's
/// training step): while it lives, the executor runs nothing else on the device. Dropping
/// it gives the device back.
pub struct DeviceLease {
    _release: Sender<()>,
}

/// One stage's queue, as the executor thread holds it.
struct Queue {
    jobs: Receiver<Request>,
    /// The model of the queue's batches; `None` for a queue of leases only.
    model: Option<Arc<dyn BatchModel>>,
    stats: Arc<Mutex<ExecutorStats>>,
    opened: Instant,
}

/// A device's executor thread. Queues are opened on it; it stops when it is dropped and
/// every queue has been closed (every [`Submitter`] of it dropped).
pub struct DeviceExecutor {
    device: String,
    control: Sender<Queue>,
    _thread: JoinHandle<()>,
}

/// A stage's handle on its queue: cloneable, for submitting jobs; also the stage's view
/// of its statistics. The queue closes when every clone is dropped.
#[derive(Clone)]
pub struct Submitter {
    jobs: Sender<Request>,
    stats: Arc<Mutex<ExecutorStats>>,
    opened: Instant,
}

impl std::fmt::Debug for Submitter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Submitter")
            .field("waiting", &self.jobs.len())
            .finish_non_exhaustive()
    }
}

impl Submitter {
    /// Offers a job without blocking.
    pub fn try_submit(&self, job: Job) -> Result<(), Refused> {
        match self.jobs.try_send(Request::Batch(job)) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(r)) => Err(Refused::Full(r.into_job())),
            Err(TrySendError::Disconnected(r)) => Err(Refused::Stopped(r.into_job())),
        }
    }

    /// Submits a job, waiting while the queue is full; a stopped executor hands it back.
    pub fn submit(&self, job: Job) -> Result<(), Job> {
        self.jobs
            .send(Request::Batch(job))
            .map_err(|e| e.0.into_job())
    }

    /// Waits for the device and holds it until the lease is dropped: for a stage that
    /// runs its model on its own thread. The time held counts as the queue's busy time,
    /// and the lease as one batch of `rows` items.
    pub fn lease(&self, rows: u64) -> std::io::Result<DeviceLease> {
        let stopped = || std::io::Error::other("the device executor has stopped");
        let (granted, wait) = bounded(1);
        let (release, released) = bounded(1);
        let request = LeaseRequest {
            granted,
            released,
            rows,
        };
        self.jobs
            .send(Request::Lease(request))
            .map_err(|_| stopped())?;
        wait.recv().map_err(|_| stopped())?;
        Ok(DeviceLease { _release: release })
    }

    /// What the device did for this queue so far. Every job whose reply was received is
    /// counted (the executor counts a job before it replies).
    pub fn stats(&self) -> ExecutorStats {
        let mut stats = self
            .stats
            .lock()
            .map(|s| s.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().clone());
        stats.wall = self.opened.elapsed();
        stats
    }
}

/// The name an executor is filed under: the device's kind and ordinal.
fn device_name(device: &Device) -> String {
    format!("{:?}", device.location())
}

impl DeviceExecutor {
    /// The process's executor for `device`, started on first use: every model operator
    /// on a device shares it.
    pub fn shared(device: &Device) -> std::io::Result<Arc<DeviceExecutor>> {
        static EXECUTORS: OnceLock<Mutex<HashMap<String, Arc<DeviceExecutor>>>> = OnceLock::new();
        let name = device_name(device);
        let registry = EXECUTORS.get_or_init(|| Mutex::new(HashMap::new()));
        let mut executors = registry
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(executor) = executors.get(&name) {
            return Ok(executor.clone());
        }
        let executor = Arc::new(DeviceExecutor::spawn(&name)?);
        executors.insert(name, executor.clone());
        Ok(executor)
    }

    /// Starts an executor thread of its own (tests; the engine uses [`Self::shared`]).
    pub fn spawn(device: &str) -> std::io::Result<Self> {
        let (control, requests) = unbounded::<Queue>();
        let thread = std::thread::Builder::new()
            .name(format!("distillery-device-{device}"))
            .spawn(move || run(requests))?;
        Ok(Self {
            device: device.to_string(),
            control,
            _thread: thread,
        })
    }

    /// Opens a queue of [`DEVICE_QUEUE_DEPTH`] batches for `model`'s stage.
    pub fn open_queue(&self, model: Arc<dyn BatchModel>) -> std::io::Result<Submitter> {
        self.open(Some(model))
    }

    /// Opens a queue for a stage that runs its model on its own thread and takes the
    /// device through [`Submitter::lease`].
    pub fn open_lease_queue(&self) -> std::io::Result<Submitter> {
        self.open(None)
    }

    fn open(&self, model: Option<Arc<dyn BatchModel>>) -> std::io::Result<Submitter> {
        let (jobs, rx) = bounded::<Request>(DEVICE_QUEUE_DEPTH);
        let stats = Arc::new(Mutex::new(ExecutorStats::default()));
        let opened = Instant::now();
        let queue = Queue {
            jobs: rx,
            model,
            stats: stats.clone(),
            opened,
        };
        self.control.send(queue).map_err(|_| {
            std::io::Error::other(format!(
                "the {} device executor has stopped (a model kernel panicked)",
                self.device
            ))
        })?;
        Ok(Submitter {
            jobs,
            stats,
            opened,
        })
    }
}

fn run(requests: Receiver<Queue>) {
    let mut queues: Vec<Queue> = Vec::new();
    let mut accepting = true;
    loop {
        if !accepting && queues.is_empty() {
            return;
        }
        let mut select = Select::new();
        let control = accepting.then(|| select.recv(&requests));
        let first_queue = usize::from(accepting);
        for queue in &queues {
            select.recv(&queue.jobs);
        }
        let op = select.select();
        let index = op.index();
        if Some(index) == control {
            match op.recv(&requests) {
                Ok(queue) => queues.push(queue),
                Err(_) => accepting = false,
            }
            continue;
        }
        let q = index - first_queue;
        match op.recv(&queues[q].jobs) {
            Ok(Request::Batch(job)) => run_one(&queues[q], job),
            Ok(Request::Lease(lease)) => hold_lease(&queues[q], lease),
            // Every submitter of the queue is gone: the stage is over.
            Err(_) => {
                queues.swap_remove(q);
            }
        }
    }
}

impl Queue {
    /// Counts one batch (or lease) that started at `started` with `waiting` jobs behind
    /// it, held the device until now, and ran `rows` items of `(real, padded)` tokens.
    fn count(&self, started: Instant, waiting: usize, rows: u64, (real, padded): (usize, usize)) {
        let busy = started.elapsed();
        let mut stats = self
            .stats
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        stats.sample_queue(started.duration_since(self.opened), waiting);
        stats.busy += busy;
        stats.batches += 1;
        stats.rows += rows;
        stats.real_tokens += real as u64;
        stats.padded_tokens += padded as u64;
    }
}

fn hold_lease(queue: &Queue, lease: LeaseRequest) {
    let waiting = queue.jobs.len();
    let started = Instant::now();
    if lease.granted.send(()).is_ok() {
        // Released by a message or by the lease's drop; either ends the wait.
        let _ = lease.released.recv();
    }
    queue.count(started, waiting, lease.rows, (0, 0));
}

fn run_one(queue: &Queue, job: Job) {
    let waiting = queue.jobs.len();
    let started = Instant::now();
    let output = match &queue.model {
        Some(model) => model.run_batch(&job.batch),
        None => Err(OperatorError::Candle(candle_core::Error::Msg(
            "a batch was sent to a queue of leases (a bug in the stage)".into(),
        ))),
    };
    crate::crash::point("device.batch");
    let tokens = (job.batch.real_tokens(), job.batch.padded_tokens());
    queue.count(started, waiting, job.batch.rows.len() as u64, tokens);
    // A submitter that went away (its run failed) no longer wants the result.
    let _ = job.reply.send(Done {
        batch: job.batch,
        output,
    });
    if let Some(wake) = &job.wake {
        wake();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is its job
mod tests {
    use super::*;
    use distillery_operators::TokenizedText;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Returns each row's length and first id, so results can be checked by hand; counts
    /// how many batches run at once (`running`, its maximum in `most`).
    #[derive(Default)]
    struct LengthModel {
        running: AtomicUsize,
        most: AtomicUsize,
    }
    impl BatchModel for LengthModel {
        fn device(&self) -> &Device {
            &Device::Cpu
        }
        fn row_width(&self) -> usize {
            2
        }
        fn run_batch(&self, batch: &TokenBatch) -> Result<Vec<f32>, OperatorError> {
            let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(1));
            self.running.fetch_sub(1, Ordering::SeqCst);
            Ok(batch
                .rows
                .iter()
                .flat_map(|r| [r.ids.len() as f32, r.ids[0] as f32])
                .collect())
        }
    }

    fn batch(index: usize, len: usize) -> TokenBatch {
        TokenBatch {
            rows: vec![TokenizedText::new(index, vec![index as u32; len])],
        }
    }

    #[test]
    fn queue_samples_stay_bounded_and_evenly_spread() {
        let mut stats = ExecutorStats::default();
        for i in 0..(3 * MAX_QUEUE_SAMPLES) {
            stats.sample_queue(Duration::from_millis(i as u64), i % 3);
        }
        assert!(stats.queue_depth.len() <= MAX_QUEUE_SAMPLES);
        assert!(stats.queue_depth.len() > MAX_QUEUE_SAMPLES / 2);
        // The kept samples still span the whole stage, in order.
        let times: Vec<f32> = stats.queue_depth.iter().map(|s| s.0).collect();
        assert_eq!(times[0], 0.0);
        assert!(*times.last().unwrap() > 1.0, "{:?}", times.last());
        assert!(times.windows(2).all(|w| w[0] < w[1]));
        stats.wall = Duration::from_secs(4);
        stats.busy = Duration::from_secs(3);
        assert_eq!(stats.busy_fraction(), 0.75);
        assert_eq!(ExecutorStats::default().busy_fraction(), 0.0);
    }

    #[test]
    fn runs_a_queue_in_order_and_wakes_its_submitter() {
        let exec = DeviceExecutor::spawn("test").unwrap();
        let sub = exec.open_queue(Arc::new(LengthModel::default())).unwrap();
        let (reply, results) = crossbeam_channel::unbounded();
        let woken = Arc::new(AtomicUsize::new(0));
        let w = woken.clone();
        let wake: Waker = Arc::new(move || {
            w.fetch_add(1, Ordering::SeqCst);
        });
        for i in 1..=5 {
            let job = Job {
                batch: batch(i, i + 1),
                reply: reply.clone(),
                wake: Some(wake.clone()),
            };
            assert!(sub.submit(job).is_ok());
        }
        let got: Vec<Vec<f32>> = (0..5)
            .map(|_| results.recv().unwrap().output.unwrap())
            .collect();
        assert_eq!(got[2], vec![4.0, 3.0]);
        let stats = sub.stats();
        assert_eq!(stats.batches, 5);
        assert_eq!(stats.rows, 5);
        assert_eq!(stats.real_tokens, 2 + 3 + 4 + 5 + 6);
        assert_eq!(stats.queue_depth.len(), 5);
        assert!(stats.busy >= Duration::from_millis(5));
        assert!(stats.wall >= stats.busy);
        // The waker runs after the reply is sent: wait for the last one.
        for _ in 0..1000 {
            if woken.load(Ordering::SeqCst) == 5 {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(woken.load(Ordering::SeqCst), 5);
    }

    #[test]
    fn stages_share_the_device_one_batch_at_a_time_each_with_its_own_figures() {
        let exec = DeviceExecutor::spawn("test").unwrap();
        let model = Arc::new(LengthModel::default());
        let (reply, results) = crossbeam_channel::unbounded();
        let threads: Vec<_> = [3usize, 7, 11]
            .into_iter()
            .map(|jobs| {
                let sub = exec.open_queue(model.clone()).unwrap();
                let reply = reply.clone();
                std::thread::spawn(move || {
                    for i in 0..jobs {
                        let job = Job {
                            batch: batch(i, 1 + i % 4),
                            reply: reply.clone(),
                            wake: None,
                        };
                        assert!(sub.submit(job).is_ok());
                    }
                    sub
                })
            })
            .collect();
        let subs: Vec<Submitter> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        for _ in 0..(3 + 7 + 11) {
            results.recv().unwrap();
        }
        assert_eq!(
            model.most.load(Ordering::SeqCst),
            1,
            "two batches ran at once"
        );
        let batches: Vec<u64> = subs.iter().map(|s| s.stats().batches).collect();
        assert_eq!(batches, [3, 7, 11]);
        // A closed queue leaves the others running.
        drop(subs);
        let sub = exec.open_queue(model).unwrap();
        let job = Job {
            batch: batch(2, 9),
            reply,
            wake: None,
        };
        assert!(sub.submit(job).is_ok());
        assert_eq!(results.recv().unwrap().output.unwrap(), [9.0, 2.0]);
        assert_eq!(sub.stats().batches, 1);
    }

    #[test]
    fn a_lease_holds_the_device_and_counts_as_its_queue_busy_time() {
        let exec = DeviceExecutor::spawn("test").unwrap();
        let model = Arc::new(LengthModel::default());
        let batches = exec.open_queue(model.clone()).unwrap();
        let leases = exec.open_lease_queue().unwrap();
        let lease = leases.lease(12).unwrap();
        // While the lease is held, a batch of another stage waits.
        let (reply, results) = crossbeam_channel::unbounded();
        let job = Job {
            batch: batch(3, 2),
            reply,
            wake: None,
        };
        assert!(batches.submit(job).is_ok());
        std::thread::sleep(Duration::from_millis(30));
        assert!(results.try_recv().is_err(), "a batch ran during a lease");
        drop(lease);
        assert_eq!(results.recv().unwrap().output.unwrap(), [2.0, 3.0]);
        let held = leases.stats();
        assert_eq!((held.batches, held.rows), (1, 12));
        assert!(held.busy >= Duration::from_millis(30), "{:?}", held.busy);
        assert_eq!(batches.stats().batches, 1);
    }

    #[test]
    fn one_executor_per_device() {
        let a = DeviceExecutor::shared(&Device::Cpu).unwrap();
        let b = DeviceExecutor::shared(&Device::Cpu).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
    }

    #[test]
    fn a_full_queue_hands_the_job_back() {
        struct Slow(crossbeam_channel::Receiver<()>);
        impl BatchModel for Slow {
            fn device(&self) -> &Device {
                &Device::Cpu
            }
            fn row_width(&self) -> usize {
                1
            }
            fn run_batch(&self, b: &TokenBatch) -> Result<Vec<f32>, OperatorError> {
                let _ = self.0.recv();
                Ok(vec![0.0; b.rows.len()])
            }
        }
        let (go, gate) = crossbeam_channel::unbounded();
        let exec = DeviceExecutor::spawn("test").unwrap();
        let (reply, results) = crossbeam_channel::unbounded();
        let sub = exec.open_queue(Arc::new(Slow(gate))).unwrap();
        let job = |i| Job {
            batch: batch(i, 1),
            reply: reply.clone(),
            wake: None,
        };
        // One job may be taken by the (blocked) executor, DEVICE_QUEUE_DEPTH wait in the
        // queue; offering more must eventually be refused as full.
        let mut accepted = 0;
        let mut refused = false;
        for i in 0..DEVICE_QUEUE_DEPTH + 3 {
            match sub.try_submit(job(i)) {
                Ok(()) => accepted += 1,
                Err(Refused::Full(_)) => {
                    refused = true;
                    break;
                }
                Err(Refused::Stopped(_)) => panic!("the executor is running"),
            }
        }
        assert!(refused);
        assert!(accepted <= DEVICE_QUEUE_DEPTH + 1, "accepted {accepted}");
        for _ in 0..accepted {
            go.send(()).unwrap();
        }
        for _ in 0..accepted {
            results.recv().unwrap();
        }
        assert_eq!(sub.stats().batches, accepted as u64);
    }
}
