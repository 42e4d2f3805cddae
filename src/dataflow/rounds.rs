//! Rounds of messages between the processes of a cluster, over one timely computation
//! that lasts as long as the [`Rounds`] value: what data-parallel training
//! ([`crate::train::data_parallel`]) exchanges step by step, without joining a new
//! computation per message.
//!
//! A round is a barrier: every process calls [`Rounds::round`] with what it sends (to
//! any processes, possibly nothing) and gets back everything the others sent it in that
//! round, by sender, once every process has sent its part. The computation runs on a
//! thread of its own (one timely worker per process), fed through channels, so a
//! process computes between rounds while the cluster's connections stay open.
//!
//! Each message travels as chunks of at most [`CHUNK_BYTES`], tagged with the round, its
//! sender and its position, and routed by timely to the destination process, where a
//! sink takes them (moved, not copied); a round is complete when the sink's frontier has
//! passed it. A process that stops (its [`Rounds`]
//! dropped) closes its input: the others' rounds then complete without its messages,
//! which the protocol above reads as its end. A process lost without closing (killed)
//! takes its connections down; timely's threads then fail, and the next round is an
//! error.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use timely::communication::WorkerGuards;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::InputHandleVec;
use timely::worker::Worker;

use crate::collective::Collective;
use crate::config::cluster::Cluster;
use crate::dataflow::cluster;
use crate::error::EngineError;

/// The largest piece a message is cut into: large enough that a 90 MB gradient is under
/// a hundred records, small enough that no single buffer of timely's is huge.
pub const CHUNK_BYTES: usize = 1 << 20;

/// How long the worker parks between checks while a round is open: it wakes at once on
/// a message, and at this pace also notices a lost connection.
const PARK: Duration = Duration::from_millis(50);

/// One chunk of a message: destination process, sender, round, chunk index, bytes.
type Chunk = (u64, u64, u64, u32, Vec<u8>);

/// What one process sends in a round: (destination process, message).
type Outgoing = Vec<(usize, Vec<u8>)>;
/// What one process received in a round: sender -> message.
type Received = BTreeMap<usize, Vec<u8>>;

/// An open exchange of rounds with every process of a cluster.
pub struct Rounds {
    processes: usize,
    process: usize,
    outgoing: Option<Sender<Outgoing>>,
    incoming: Receiver<Result<Received, EngineError>>,
    guards: Option<WorkerGuards<()>>,
}

impl Rounds {
    /// Joins the cluster's processes in a computation of rounds (every process must
    /// open one, in the same order relative to the cluster's other computations).
    pub fn open(cluster: &Cluster) -> Result<Self, EngineError> {
        let (outgoing, requests) = channel::<Outgoing>();
        let (replies, incoming) = channel::<Result<Received, EngineError>>();
        let ends = Arc::new(Mutex::new(Some((requests, replies))));
        let guards = cluster::execute(cluster, 1, move |worker| {
            if let Some((requests, replies)) = ends.lock().ok().and_then(|mut e| e.take()) {
                serve_rounds(worker, requests, replies);
            }
        })?;
        Ok(Self {
            processes: cluster.processes,
            process: cluster.process,
            outgoing: Some(outgoing),
            incoming,
            guards: Some(guards),
        })
    }
}

impl Collective for Rounds {
    fn processes(&self) -> usize {
        self.processes
    }

    fn process(&self) -> usize {
        self.process
    }

    fn round(&mut self, outgoing: Vec<(usize, Vec<u8>)>) -> Result<Received, EngineError> {
        let lost = cluster::lost;
        if let Some(&(to, _)) = outgoing.iter().find(|(to, _)| *to >= self.processes) {
            return Err(EngineError::Dataflow(format!(
                "a message to process {to} of a cluster of {}; this is a bug",
                self.processes
            )));
        }
        self.outgoing
            .as_ref()
            .ok_or_else(lost)?
            .send(outgoing)
            .map_err(|_| lost())?;
        self.incoming.recv().map_err(|_| lost())?
    }
}

impl Drop for Rounds {
    /// Closes this process's input and waits for the others to close theirs.
    fn drop(&mut self) {
        self.outgoing.take();
        if let Some(guards) = self.guards.take() {
            let _ = cluster::join(guards);
        }
    }
}

/// The worker's loop: one round per message from `requests`, its result to `replies`,
/// until `requests` closes.
fn serve_rounds(
    worker: &mut Worker,
    requests: Receiver<Outgoing>,
    replies: Sender<Result<Received, EngineError>>,
) {
    let me = worker.index() as u64;
    let mut input: InputHandleVec<u64, Chunk> = InputHandleVec::new();
    let arrived: Rc<RefCell<Vec<Chunk>>> = Rc::new(RefCell::new(Vec::new()));
    // The round being waited for, and whether the sink's frontier has passed it.
    let waiting = Rc::new(Cell::new(0u64));
    let complete = Rc::new(Cell::new(false));
    let (sink, waiting_in, complete_in) = (arrived.clone(), waiting.clone(), complete.clone());
    worker.dataflow::<u64, _, _>(|scope| {
        input.to_stream(scope).sink(
            Exchange::new(|c: &Chunk| c.0),
            "RoundArrivals",
            move |(chunks, frontier)| {
                chunks.for_each(|_, data| sink.borrow_mut().append(data));
                complete_in.set(!frontier.less_equal(&waiting_in.get()));
            },
        );
    });
    let mut round: u64 = 0;
    while let Ok(outgoing) = requests.recv() {
        for (to, message) in outgoing {
            // An empty message is one empty chunk: the receiver still learns it was sent.
            let mut pieces: Vec<&[u8]> = message.chunks(CHUNK_BYTES).collect();
            if pieces.is_empty() {
                pieces.push(&[]);
            }
            for (i, piece) in pieces.into_iter().enumerate() {
                input.send((to as u64, me, round, i as u32, piece.to_vec()));
            }
        }
        // The frontier cannot pass this round before this process's input does.
        waiting.set(round);
        complete.set(false);
        input.advance_to(round + 1);
        while !complete.get() {
            worker.step_or_park(Some(PARK));
        }
        // Chunks of the next round may have come already (a faster process); they stay.
        let all = std::mem::take(&mut *arrived.borrow_mut());
        let (mut chunks, later): (Vec<Chunk>, Vec<Chunk>) =
            all.into_iter().partition(|c| c.2 == round);
        *arrived.borrow_mut() = later;
        chunks.sort_by_key(|c| (c.1, c.3));
        let mut received = Received::new();
        for (_, from, _, _, bytes) in chunks {
            received
                .entry(from as usize)
                .or_default()
                .extend_from_slice(&bytes);
        }
        if replies.send(Ok(received)).is_err() {
            break;
        }
        round += 1;
    }
    input.close();
    while worker.step_or_park(Some(PARK)) {}
}
