//! The part writer: a sink that gathers the inference outputs on worker 0 and commits each
//! completed chunk (one timestamp) as one Parquet part of the stage, in input order.
//!
//! A chunk is complete when the input frontier has passed its timestamp; chunks are
//! written in timestamp order, rows within a chunk by input position. Parts therefore
//! have the same boundaries and bytes whatever the number of workers or the order in
//! which the device finished batches, which is what makes resume exact.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;

use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;

use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::Stream;

use crate::dataflow::infer_op::OutputRecord;
use crate::error::EngineError;
use crate::store::StageWriter;

/// The stage writer, shared between the sink and the driver that finishes it; it holds a
/// writer on worker 0 only (every record is routed there).
pub type SharedWriter = Rc<RefCell<Option<StageWriter>>>;

/// Builds a stage's record batch from ids and their rows of floats (row-major).
pub type BatchBuilder =
    Arc<dyn Fn(&[String], Vec<f32>) -> Result<RecordBatch, ArrowError> + Send + Sync>;

/// Adds the sink. Chunks at or after `discard_from` are dropped unwritten (an
/// interrupted input's partial chunk).
pub fn write_parts(
    outputs: Stream<'_, u64, Vec<OutputRecord>>,
    writer: SharedWriter,
    discard_from: Rc<Cell<u64>>,
    width: usize,
    to_batch: BatchBuilder,
    error: Rc<RefCell<Option<EngineError>>>,
) {
    let to_first_worker = Exchange::new(|_r: &OutputRecord| 0);
    let mut chunks: BTreeMap<u64, Vec<OutputRecord>> = BTreeMap::new();
    outputs.sink(to_first_worker, "WriteParts", move |(input, frontier)| {
        input.for_each(|cap, data| {
            if let Some(&time) = cap.least() {
                chunks.entry(time).or_default().append(data);
            }
        });
        let mut writer = writer.borrow_mut();
        let Some(writer) = writer.as_mut() else {
            chunks.clear();
            return;
        };
        while let Some(entry) = chunks.first_entry() {
            if frontier.less_equal(entry.key()) {
                break;
            }
            let time = *entry.key();
            let mut rows = entry.remove();
            if error.borrow().is_some() || time >= discard_from.get() {
                continue;
            }
            rows.sort_by_key(|r| r.0);
            let mut ids = Vec::with_capacity(rows.len());
            let mut matrix = Vec::with_capacity(rows.len() * width);
            for (_, id, v) in rows {
                ids.push(id);
                matrix.extend_from_slice(&v);
            }
            let written = to_batch(&ids, matrix)
                .map_err(EngineError::from)
                .and_then(|batch| writer.write_part(&[batch]).map_err(EngineError::from));
            match written {
                Ok(_) => {}
                Err(e) => {
                    error.borrow_mut().get_or_insert(e);
                }
            }
        }
    });
}
