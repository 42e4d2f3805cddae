//! The device executor: one thread that owns a model and runs whole batches on its
//! device, fed by a bounded channel.
//!
//! Workers tokenise and batch on their own threads and submit [`Job`]s; the executor runs
//! them in arrival order and sends each [`Done`] back on the job's reply channel, then
//! calls the job's waker so the submitting operator is scheduled again. The job channel
//! holds [`DEVICE_QUEUE_DEPTH`] batches: a submitter that finds it full keeps its batches
//! and stops pulling input — the backpressure — while the device always has the next
//! batch ready when it finishes one.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};
use distillery_operators::cross_encoder::CrossEncoder;
use distillery_operators::{Embedder, OperatorError, TextKind, TokenBatch, TokenizedText};

/// Batches waiting for the device. Two: one being prepared while another waits keeps the
/// device busy; more would only hold memory and delay backpressure.
pub const DEVICE_QUEUE_DEPTH: usize = 2;

/// A model that runs whole token batches and returns one row of floats per text.
pub trait BatchModel: Send + Sync + 'static {
    /// Floats per row of output.
    fn row_width(&self) -> usize;
    /// Runs one batch: `rows x row_width` floats, rows in the batch's order.
    fn run_batch(&self, batch: &TokenBatch) -> Result<Vec<f32>, OperatorError>;
}

impl BatchModel for Embedder {
    fn row_width(&self) -> usize {
        self.dim()
    }

    fn run_batch(&self, batch: &TokenBatch) -> Result<Vec<f32>, OperatorError> {
        self.embed_batch(batch)
    }
}

/// A model the dataflow can feed: it tokenises its items on a worker thread and runs
/// the batches on the device.
pub trait DeviceModel: BatchModel {
    /// What one input is (a text, a query-passage pair), as it travels between workers.
    type Item: timely::ExchangeData + Clone;
    /// Tokenises items, in order (each `index` is set by the caller).
    fn tokenize(&self, items: &[&Self::Item]) -> Result<Vec<TokenizedText>, OperatorError>;
}

/// An embedder bound to one side of retrieval (queries or passages).
pub struct EmbedTexts {
    pub embedder: Arc<Embedder>,
    pub kind: TextKind,
}

impl BatchModel for EmbedTexts {
    fn row_width(&self) -> usize {
        self.embedder.dim()
    }

    fn run_batch(&self, batch: &TokenBatch) -> Result<Vec<f32>, OperatorError> {
        self.embedder.embed_batch(batch)
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
}

/// A cross-encoder teacher scoring (query, passage) pairs: one score per pair.
pub struct ScorePairs {
    pub model: Arc<CrossEncoder>,
}

impl BatchModel for ScorePairs {
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

/// What the executor did, returned when it stops.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExecutorStats {
    pub batches: u64,
    pub rows: u64,
    pub real_tokens: u64,
    pub padded_tokens: u64,
    /// Time spent running batches.
    pub busy: Duration,
    /// Time from start to stop.
    pub wall: Duration,
    /// Jobs waiting in the queue as each batch started, with the seconds since the
    /// executor started: how far ahead of the device its operators kept. At most
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

/// A running executor. Dropping every [`Submitter`] and calling [`DeviceExecutor::join`]
/// stops it.
pub struct DeviceExecutor {
    submitter: Submitter,
    stop: Sender<()>,
    thread: JoinHandle<ExecutorStats>,
}

/// A cloneable handle for submitting jobs.
#[derive(Clone)]
pub struct Submitter {
    jobs: Sender<Job>,
}

impl Submitter {
    /// Offers a job without blocking; a full queue hands it back.
    pub fn try_submit(&self, job: Job) -> Result<(), Job> {
        match self.jobs.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(job)) | Err(TrySendError::Disconnected(job)) => Err(job),
        }
    }

    /// Submits a job, waiting while the queue is full.
    pub fn submit(&self, job: Job) -> Result<(), Job> {
        self.jobs.send(job).map_err(|e| e.0)
    }
}

impl DeviceExecutor {
    /// Starts the executor thread for `model`.
    pub fn spawn<M: BatchModel + ?Sized>(model: Arc<M>) -> std::io::Result<Self> {
        let (jobs, rx) = bounded::<Job>(DEVICE_QUEUE_DEPTH);
        let (stop, stop_rx) = bounded::<()>(1);
        let thread = std::thread::Builder::new()
            .name("distillery-device".into())
            .spawn(move || run(model.as_ref(), rx, stop_rx))?;
        Ok(Self {
            submitter: Submitter { jobs },
            stop,
            thread,
        })
    }

    pub fn submitter(&self) -> Submitter {
        self.submitter.clone()
    }

    /// Runs the jobs already queued, stops the executor and returns its statistics.
    /// Jobs submitted after this call through surviving submitters are not run.
    pub fn join(self) -> ExecutorStats {
        drop(self.submitter);
        // The executor may already have stopped because every submitter was dropped.
        let _ = self.stop.send(());
        // The thread only panics on a bug in a model kernel; report zeros then.
        self.thread.join().unwrap_or_default()
    }
}

fn run<M: BatchModel + ?Sized>(
    model: &M,
    jobs: Receiver<Job>,
    stop: Receiver<()>,
) -> ExecutorStats {
    let start = Instant::now();
    let mut stats = ExecutorStats::default();
    loop {
        let job = crossbeam_channel::select! {
            recv(jobs) -> job => match job {
                Ok(job) => job,
                Err(_) => break,
            },
            recv(stop) -> _ => {
                for job in jobs.try_iter() {
                    stats.sample_queue(start.elapsed(), jobs.len());
                    run_one(model, job, &mut stats);
                }
                break;
            }
        };
        stats.sample_queue(start.elapsed(), jobs.len());
        run_one(model, job, &mut stats);
    }
    stats.wall = start.elapsed();
    stats
}

fn run_one<M: BatchModel + ?Sized>(model: &M, job: Job, stats: &mut ExecutorStats) {
    {
        let t = Instant::now();
        let output = model.run_batch(&job.batch);
        stats.busy += t.elapsed();
        crate::crash::point("device.batch");
        stats.batches += 1;
        stats.rows += job.batch.rows.len() as u64;
        stats.real_tokens += job.batch.real_tokens() as u64;
        stats.padded_tokens += job.batch.padded_tokens() as u64;
        // A submitter that went away (its run failed) no longer wants the result.
        let _ = job.reply.send(Done {
            batch: job.batch,
            output,
        });
        if let Some(wake) = &job.wake {
            wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use distillery_operators::TokenizedText;

    /// Returns each row's length and first id, so results can be checked by hand.
    struct LengthModel;
    impl BatchModel for LengthModel {
        fn row_width(&self) -> usize {
            2
        }
        fn run_batch(&self, batch: &TokenBatch) -> Result<Vec<f32>, OperatorError> {
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
    fn runs_jobs_in_order_and_applies_backpressure() {
        let exec = DeviceExecutor::spawn(Arc::new(LengthModel)).unwrap();
        let (reply, results) = crossbeam_channel::unbounded();
        let woken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let w = woken.clone();
        let wake: Waker = Arc::new(move || {
            w.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        });
        let sub = exec.submitter();
        for i in 1..=5 {
            let job = Job {
                batch: batch(i, i + 1),
                reply: reply.clone(),
                wake: Some(wake.clone()),
            };
            assert!(sub.submit(job).is_ok());
        }
        drop(sub);
        let stats = exec.join();
        let got: Vec<Vec<f32>> = results.try_iter().map(|d| d.output.unwrap()).collect();
        assert_eq!(got.len(), 5);
        assert_eq!(got[2], vec![4.0, 3.0]);
        assert_eq!(stats.batches, 5);
        assert_eq!(stats.real_tokens, 2 + 3 + 4 + 5 + 6);
        assert_eq!(woken.load(std::sync::atomic::Ordering::SeqCst), 5);
    }

    #[test]
    fn full_queue_hands_the_job_back() {
        struct Slow(crossbeam_channel::Receiver<()>);
        impl BatchModel for Slow {
            fn row_width(&self) -> usize {
                1
            }
            fn run_batch(&self, b: &TokenBatch) -> Result<Vec<f32>, OperatorError> {
                let _ = self.0.recv();
                Ok(vec![0.0; b.rows.len()])
            }
        }
        let (go, gate) = crossbeam_channel::unbounded();
        let exec = DeviceExecutor::spawn(Arc::new(Slow(gate))).unwrap();
        let (reply, _results) = crossbeam_channel::unbounded();
        let sub = exec.submitter();
        let job = |i| Job {
            batch: batch(i, 1),
            reply: reply.clone(),
            wake: None,
        };
        // One job may be taken by the (blocked) executor, DEVICE_QUEUE_DEPTH wait in the
        // channel; offering more must eventually be refused.
        let mut accepted = 0;
        let mut refused = false;
        for i in 0..DEVICE_QUEUE_DEPTH + 3 {
            match sub.try_submit(job(i)) {
                Ok(()) => accepted += 1,
                Err(_) => {
                    refused = true;
                    break;
                }
            }
        }
        assert!(refused);
        assert!(accepted <= DEVICE_QUEUE_DEPTH + 1, "accepted {accepted}");
        for _ in 0..accepted {
            go.send(()).unwrap();
        }
        drop(sub);
        assert_eq!(exec.join().batches, accepted as u64);
    }
}
