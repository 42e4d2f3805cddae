//! The inference operator: items in (texts to embed, query-passage pairs to score), one
//! row of floats per item out, the model run on the device executor rather than inline.
//!
//! On each activation the operator tokenises the items it received (on its worker's
//! thread), packs them into token-budget batches, and offers the batches to the device
//! executor's bounded queue; batches the queue refuses wait in the operator. Results come
//! back on a channel, and the executor wakes the operator through a `SyncActivator`
//! when one is ready. The operator holds a capability for every timestamp with texts
//! still on the device, so downstream frontiers say exactly which chunks are complete.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::{unbounded, Receiver};
use distillery_operators::{TokenBatch, TokenBudgetBatcher};
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;
use timely::dataflow::Stream;

use crate::error::EngineError;
use crate::executor::{DeviceModel, Done, Job, Refused, Submitter, Waker};
use crate::progress::Progress;

/// An item to run: its position in the input, its id and the item.
pub type InputRecord<I> = (u64, String, I);
/// A text to embed.
pub type TextRecord = InputRecord<String>;
/// An item's output: position, id, the model's row of floats.
pub type OutputRecord = (u64, String, Vec<f32>);

/// How long an operator whose batches the shared queue refused waits before offering
/// them again, when none of its own batches is on the device to wake it.
const RETRY_FULL_QUEUE: Duration = Duration::from_millis(2);

/// What the inference operator needs.
pub struct InferConfig<M: DeviceModel> {
    pub model: Arc<M>,
    pub batcher: TokenBudgetBatcher,
    pub submitter: Submitter,
    /// Counts items as the device finishes them.
    pub progress: Arc<Progress>,
}

impl<M: DeviceModel> Clone for InferConfig<M> {
    fn clone(&self) -> Self {
        Self {
            model: self.model.clone(),
            batcher: self.batcher,
            submitter: self.submitter.clone(),
            progress: self.progress.clone(),
        }
    }
}

/// Where a text waits while its batch is on the device.
struct Slot {
    seq: u64,
    id: String,
    time: u64,
}

/// Adds the inference operator to `items`. Items are spread over workers by position.
/// The first error (tokeniser or model) is stored in `error`; the operator then drops
/// everything so the dataflow drains and the driver can report it.
pub fn infer_on_device<'scope, M: DeviceModel>(
    items: Stream<'scope, u64, Vec<InputRecord<M::Item>>>,
    config: InferConfig<M>,
    error: Rc<RefCell<Option<EngineError>>>,
) -> Stream<'scope, u64, Vec<OutputRecord>> {
    let scope = items.scope();
    let worker = scope.worker();
    let by_position = Exchange::new(|r: &InputRecord<M::Item>| r.0);
    items.unary_frontier(by_position, "InferOnDevice", move |_cap, info| {
        let activator = Arc::new(Mutex::new(worker.sync_activator_for(info.address.to_vec())));
        let wake: Waker = Arc::new(move || {
            if let Ok(a) = activator.lock() {
                // The worker has gone only when the dataflow is torn down.
                let _ = a.activate();
            }
        });
        let retry = worker.activator_for(info.address.clone());
        let (reply, results): (_, Receiver<Done>) = unbounded();
        let mut slots: HashMap<usize, Slot> = HashMap::new();
        let mut next_slot: usize = 0;
        let mut pending: VecDeque<TokenBatch> = VecDeque::new();
        let mut in_flight: usize = 0;
        let mut capabilities: BTreeMap<u64, Capability<u64>> = BTreeMap::new();
        let mut open_rows: BTreeMap<u64, usize> = BTreeMap::new();
        let width = config.model.row_width();

        move |(input, frontier), output| {
            // 1. New texts: tokenise, batch, queue.
            let mut arrived = Vec::new();
            input.for_each(|cap, data| {
                let Some(&time) = cap.least() else { return };
                if error.borrow().is_some() {
                    data.clear();
                    return;
                }
                if let Some(c) = cap.retain_least(output.output_index()) {
                    capabilities.entry(time).or_insert(c);
                }
                let items: Vec<&M::Item> = data.iter().map(|r| &r.2).collect();
                match config.model.tokenize(&items) {
                    Ok(tokenized) => {
                        for ((seq, id, _), mut t) in data.drain(..).zip(tokenized) {
                            slots.insert(next_slot, Slot { seq, id, time });
                            t.index = next_slot;
                            arrived.push(t);
                            next_slot += 1;
                            *open_rows.entry(time).or_insert(0) += 1;
                        }
                    }
                    Err(e) => {
                        data.clear();
                        error.borrow_mut().get_or_insert(e.into());
                    }
                }
            });
            if !arrived.is_empty() {
                pending.extend(config.batcher.batches(arrived));
            }

            // 2. Offer queued batches to the device until its queue is full.
            while let Some(batch) = pending.pop_front() {
                let job = Job {
                    batch,
                    reply: reply.clone(),
                    wake: Some(wake.clone()),
                };
                match config.submitter.try_submit(job) {
                    Ok(()) => in_flight += 1,
                    Err(Refused::Full(job)) => {
                        pending.push_front(job.batch);
                        break;
                    }
                    Err(Refused::Stopped(_)) => {
                        error.borrow_mut().get_or_insert(EngineError::Dataflow(
                            "the device executor stopped (a model kernel panicked)".into(),
                        ));
                        break;
                    }
                }
            }

            // 3. Results: emit each row at its chunk's time.
            for done in results.try_iter() {
                in_flight -= 1;
                config.progress.inc(done.batch.rows.len() as u64);
                let vectors = match done.output {
                    Ok(v) => v,
                    Err(e) => {
                        error.borrow_mut().get_or_insert(e.into());
                        Vec::new()
                    }
                };
                for (r, row) in done.batch.rows.iter().enumerate() {
                    let Some(slot) = slots.remove(&row.index) else {
                        continue;
                    };
                    if let Some(n) = open_rows.get_mut(&slot.time) {
                        *n -= 1;
                    }
                    if vectors.len() < (r + 1) * width {
                        continue;
                    }
                    if let Some(cap) = capabilities.get(&slot.time) {
                        let v = vectors[r * width..(r + 1) * width].to_vec();
                        output.session(cap).give((slot.seq, slot.id, v));
                    }
                }
            }
            if error.borrow().is_some() {
                pending.clear();
                slots.clear();
                open_rows.clear();
            }

            // 4. Release times that are complete: no text open, no more input possible.
            capabilities.retain(|time, _| {
                let open = open_rows.get(time).copied().unwrap_or(0);
                open > 0 || frontier.less_equal(time)
            });
            open_rows.retain(|_, n| *n > 0);

            // 5. Batches refused by a queue that other workers filled: try again soon.
            if !pending.is_empty() && in_flight == 0 {
                retry.activate_after(RETRY_FULL_QUEUE);
            }
        }
    })
}
