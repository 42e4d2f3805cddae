//! Timely's cluster: the processes a device stage runs over (`-n/--processes`,
//! `-p/--process`, `--hostfile`, as timely's own examples take them), each with its own
//! worker threads (`-w`) and its own device executor.
//!
//! Every process runs the same command with the same arguments but `-p`. Process 0 leads:
//! it alone reads the input, decides what to compute (the stage store, the memo tables)
//! and writes; its worker 0 feeds the items, which timely exchanges by position to every
//! worker of every process, and every result comes back to it to be written in input
//! order, so the stage's bytes are those of one process. The other processes follow
//! (`dataflow/follower.rs`): they read no input and open no run directory; they wait for the leader's
//! next [`FollowerJob`], announced to them in a small timely computation of its own
//! ([`announce`]), load the model it names (once: loaded models are kept), build the
//! stage's dataflow and run on their device what timely sends them, until the leader
//! announces [`FollowerJob::Done`] at the end of its command. A leader with nothing to
//! compute in a stage still runs the stage's dataflow, empty, so that every stage it
//! announced is run by every process.

use std::cell::RefCell;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use timely::communication::allocator::zero_copy::initialize::initialize_networking_from_sockets;
use timely::communication::allocator::{AllocatorBuilder, ProcessBuilder};
use timely::communication::{Hooks, WorkerGuards};
use timely::dataflow::operators::vec::Broadcast;
use timely::dataflow::operators::{Inspect, Probe};
use timely::dataflow::{InputHandleVec, ProbeHandle};
use timely::worker::Worker;

use crate::config::cluster::Cluster;
use crate::error::EngineError;
use crate::executor::ModelSpec;

/// What the leader tells its followers before each stage, and at its end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FollowerJob {
    /// Run a stage of `model`, batching by `max_tokens` and `max_rows`.
    Stage {
        model: ModelSpec,
        max_tokens: usize,
        max_rows: usize,
        label: String,
    },
    /// Train a student data-parallel (`train::data_parallel`): load the student of
    /// `model` with these settings, open the cluster's rounds and serve the steps.
    Train {
        model: String,
        query_max_length: usize,
        passage_max_length: usize,
        query_prefix: Option<String>,
        passage_prefix: Option<String>,
    },
    /// Score the passage blocks of an exact top-k (`dataflow::shared_top_k`): open the
    /// cluster's rounds and serve it.
    Retrieve,
    /// The leader's command is over.
    Done,
}

/// How long process 0 waits for the other processes to join one of its timely
/// computations once they have joined a first one. From then on they wait in `follower::serve`
/// for each announcement and stage, so they join at once; one that does not within this
/// time is gone (killed, its machine down), and process 0 stops with an error instead of
/// waiting forever. The first computation waits as long as it takes: people start the
/// processes of a cluster by hand, one machine after another.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Every process has joined one of this process's computations.
static JOINED: AtomicBool = AtomicBool::new(false);

/// [`timely::execute()`] over `cluster`: on process 0 of several, after the first join, an
/// error when the others do not all join within [`JOIN_TIMEOUT`] (followers wait as long
/// as process 0 needs).
pub fn execute<T, F>(
    cluster: &Cluster,
    workers: usize,
    func: F,
) -> Result<WorkerGuards<T>, EngineError>
where
    T: Send + 'static,
    F: Fn(&mut Worker) -> T + Send + Sync + 'static,
{
    if cluster.is_distributed() && LOST.load(Ordering::SeqCst) {
        return Err(lost());
    }
    if !(cluster.is_distributed() && cluster.is_leader()) {
        return start(cluster, workers, func);
    }
    if !JOINED.load(Ordering::SeqCst) {
        let guards = start(cluster, workers, func)?;
        JOINED.store(true, Ordering::SeqCst);
        return Ok(guards);
    }
    let (joined, joining) = std::sync::mpsc::sync_channel(1);
    let c = cluster.clone();
    std::thread::spawn(move || {
        let _ = joined.send(start(&c, workers, func));
    });
    match joining.recv_timeout(JOIN_TIMEOUT) {
        Ok(guards) => guards,
        Err(_) => Err(EngineError::Dataflow(format!(
            "the other {} process(es) of the cluster did not join within {} s: did one \
             stop? Stop every process and start them again: process 0 resumes its run",
            cluster.processes - 1,
            JOIN_TIMEOUT.as_secs()
        ))),
    }
}

/// A process of the cluster was lost: later computations over the cluster are not
/// tried (each would wait [`JOIN_TIMEOUT`] for it in vain).
static LOST: AtomicBool = AtomicBool::new(false);

/// The error of a lost process, and from now on of every computation over the cluster.
pub fn lost() -> EngineError {
    LOST.store(true, Ordering::SeqCst);
    EngineError::Dataflow(
        "a process of the cluster was lost (its connection closed): stop every process \
         and start them again; process 0 resumes its run"
            .into(),
    )
}

/// Starts timely's workers of this process: on one process as timely's `execute` does;
/// over several, on connections made here ([`connect`]) instead of timely's own, which
/// retry a refused connection and poll for an awaited one once a second: every
/// computation after the first is joined by processes that learn of it at the same
/// moment, so that second would be paid at every join.
fn start<T, F>(cluster: &Cluster, workers: usize, func: F) -> Result<WorkerGuards<T>, EngineError>
where
    T: Send + 'static,
    F: Fn(&mut Worker) -> T + Send + Sync + 'static,
{
    let workers = workers.max(1);
    if !cluster.is_distributed() {
        return timely::execute(cluster.timely_config(workers), func)
            .map_err(EngineError::Dataflow);
    }
    let sockets = connect(cluster)?;
    let hooks = Hooks::default();
    let local =
        ProcessBuilder::new_typed_vector(workers, hooks.refill.clone(), hooks.spill.clone());
    let (builders, comms) =
        initialize_networking_from_sockets(local, sockets, cluster.process, workers, hooks)
            .map_err(|e| EngineError::Dataflow(format!("the cluster's connections: {e}")))?;
    timely::execute::execute_from(
        builders.into_iter().map(AllocatorBuilder::Tcp).collect(),
        Box::new(comms),
        timely::WorkerConfig::default(),
        func,
    )
    .map_err(EngineError::Dataflow)
}

/// How often a process retries connecting to a lower one that is not listening yet.
const CONNECT_RETRY: Duration = Duration::from_millis(5);

/// After this long waiting for another process, say so once.
const WAITING_NOTICE: Duration = Duration::from_secs(2);

/// This process's connection to every other, by process index (`None` at its own): it
/// listens at its address, connects to every lower process (retrying every
/// [`CONNECT_RETRY`] until that one listens) and accepts every higher one (looking as
/// often), each of which first sends its index, as timely's own start does.
fn connect(cluster: &Cluster) -> Result<Vec<Option<TcpStream>>, EngineError> {
    let me = cluster.process;
    let n = cluster.processes;
    let address = |i: usize| cluster.addresses.get(i).cloned().unwrap_or_default();
    let io = |what: String| move |e: std::io::Error| EngineError::Dataflow(format!("{what}: {e}"));
    let listener = TcpListener::bind(address(me))
        .map_err(io(format!("process {me} cannot listen at {}", address(me))))?;
    let mut sockets: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
    for (i, slot) in sockets.iter_mut().enumerate().take(me) {
        let started = std::time::Instant::now();
        let mut told = false;
        let mut stream = loop {
            match TcpStream::connect(address(i)) {
                Ok(stream) => break stream,
                Err(_) => {
                    if !told && started.elapsed() > WAITING_NOTICE {
                        eprintln!("process {me}: waiting for process {i} at {}", address(i));
                        told = true;
                    }
                    std::thread::sleep(CONNECT_RETRY);
                }
            }
        };
        let failed = io(format!(
            "process {me} connecting to process {i} at {}",
            address(i)
        ));
        stream.set_nodelay(true).map_err(&failed)?;
        stream
            .write_all(&(me as u64).to_le_bytes())
            .map_err(&failed)?;
        *slot = Some(stream);
    }
    let failed = io(format!("process {me} accepting at {}", address(me)));
    listener.set_nonblocking(true).map_err(&failed)?;
    let started = std::time::Instant::now();
    let mut told = false;
    for _ in me + 1..n {
        let mut stream = loop {
            match listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if !told && started.elapsed() > WAITING_NOTICE {
                        eprintln!(
                            "process {me}: waiting for processes {} to {} to connect at {}",
                            me + 1,
                            n - 1,
                            address(me)
                        );
                        told = true;
                    }
                    std::thread::sleep(CONNECT_RETRY);
                }
                Err(e) => return Err(failed(e)),
            }
        };
        stream.set_nonblocking(false).map_err(&failed)?;
        stream.set_nodelay(true).map_err(&failed)?;
        let mut index = [0u8; 8];
        stream.read_exact(&mut index).map_err(&failed)?;
        let from = usize::try_from(u64::from_le_bytes(index)).unwrap_or(usize::MAX);
        match sockets.get_mut(from) {
            Some(slot @ None) if from > me => *slot = Some(stream),
            _ => {
                return Err(EngineError::Dataflow(format!(
                    "process {me}: a connection at {} says it is process {from} of {n}, \
                     which this process does not expect: is another cluster using the \
                     same ports?",
                    address(me)
                )))
            }
        }
    }
    Ok(sockets)
}

/// Joins a computation's workers. A process of the cluster that died takes its
/// connections down, and timely's communication threads panic to stop the computation
/// (on every process); that is reported as an error naming what to do, not a panic.
pub fn join<T: Send + 'static>(
    guards: WorkerGuards<T>,
) -> Result<Vec<Result<T, String>>, EngineError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || guards.join()))
        .map_err(|_| lost())
}

/// Sends `job` from the leader's worker 0 to every worker of every process (the
/// leader passes `Some`, followers `None`); every process returns it.
fn exchange(
    cluster: &Cluster,
    workers: usize,
    job: Option<FollowerJob>,
) -> Result<FollowerJob, EngineError> {
    let bytes = job
        .map(|j| serde_json::to_vec(&j))
        .transpose()
        .map_err(|e| EngineError::Dataflow(format!("a follower job: {e}")))?;
    let bytes = Arc::new(Mutex::new(bytes));
    let guards = execute(cluster, workers, move |worker| {
        let received: Rc<RefCell<Option<Vec<u8>>>> = Rc::new(RefCell::new(None));
        let mut input: InputHandleVec<u64, Vec<u8>> = InputHandleVec::new();
        let probe = ProbeHandle::new();
        let sink = received.clone();
        worker.dataflow::<u64, _, _>(|scope| {
            input
                .to_stream(scope)
                .broadcast()
                .inspect(move |b: &Vec<u8>| *sink.borrow_mut() = Some(b.clone()))
                .probe_with(&probe);
        });
        if worker.index() == 0 {
            if let Some(b) = bytes.lock().ok().and_then(|mut b| b.take()) {
                input.send(b);
            }
        }
        input.close();
        while worker.step_or_park(None) {}
        received.take()
    })?;
    let got = join(guards)?
        .into_iter()
        .find_map(|r| r.ok().flatten())
        .ok_or_else(|| EngineError::Dataflow("no job came from process 0".into()))?;
    serde_json::from_slice(&got)
        .map_err(|e| EngineError::Dataflow(format!("a job from process 0: {e}")))
}

/// A follower's next job from process 0 (it waits as long as process 0 takes).
pub fn next_job(cluster: &Cluster, workers: usize) -> Result<FollowerJob, EngineError> {
    exchange(cluster, workers, None)
}

/// The leader announces `job` to its followers (nothing to do on one process).
pub fn announce(cluster: &Cluster, workers: usize, job: FollowerJob) -> Result<(), EngineError> {
    if cluster.is_distributed() && cluster.is_leader() {
        exchange(cluster, workers, Some(job))?;
    }
    Ok(())
}
