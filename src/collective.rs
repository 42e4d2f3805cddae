//! Rounds of messages among the processes of a cluster, as the work shared among them
//! sees them ([`Collective`]; `dataflow/rounds.rs` runs them over timely), and the
//! little-endian encoding their messages share ([`Writer`], [`Reader`]): lengths and
//! values, one tag byte per message kind, defined by each user. Every process runs the
//! same distillery, so the format has no version; a message that does not read back
//! whole is an error naming its sender.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Barrier, Mutex};

use crate::error::EngineError;

/// Rounds of messages among the processes of a cluster.
pub trait Collective {
    /// How many processes take part.
    fn processes(&self) -> usize;
    /// This process's index (0 leads).
    fn process(&self) -> usize;
    /// Sends every `(process, message)` of `outgoing` and returns what each process sent
    /// this one in this round, by sender, once every process has sent its part.
    fn round(
        &mut self,
        outgoing: Vec<(usize, Vec<u8>)>,
    ) -> Result<BTreeMap<usize, Vec<u8>>, EngineError>;
}

/// Little-endian encoding of the messages.
#[derive(Default)]
pub struct Writer(pub Vec<u8>);

impl Writer {
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub fn u64(&mut self, v: usize) -> &mut Self {
        self.0.extend_from_slice(&(v as u64).to_le_bytes());
        self
    }
    pub fn u32s(&mut self, v: &[u32]) -> &mut Self {
        self.u64(v.len());
        self.0.reserve(v.len() * 4);
        for x in v {
            self.0.extend_from_slice(&x.to_le_bytes());
        }
        self
    }
    pub fn f32s(&mut self, v: &[f32]) -> &mut Self {
        self.u64(v.len());
        self.0.reserve(v.len() * 4);
        for x in v {
            self.0.extend_from_slice(&x.to_le_bytes());
        }
        self
    }
    pub fn opt_f32s(&mut self, v: Option<&[f32]>) -> &mut Self {
        match v {
            Some(v) => self.u8(1).f32s(v),
            None => self.u8(0),
        }
    }
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.u64(s.len());
        self.0.extend_from_slice(s.as_bytes());
        self
    }
}

pub struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    from: usize,
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8], from: usize) -> Self {
        Self { bytes, at: 0, from }
    }
    pub fn bad(&self, what: &str) -> EngineError {
        EngineError::Dataflow(format!(
            "a message from process {} is malformed ({what} at byte {}): are all \
             processes the same distillery?",
            self.from, self.at
        ))
    }
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], EngineError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| self.bad("cut short"))?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }
    pub fn done(&self) -> bool {
        self.at == self.bytes.len()
    }
    pub fn u8(&mut self) -> Result<u8, EngineError> {
        Ok(self.take(1)?[0])
    }
    pub fn u64(&mut self) -> Result<usize, EngineError> {
        let b = self.take(8)?;
        let v = u64::from_le_bytes(b.try_into().map_err(|_| self.bad("a length"))?);
        usize::try_from(v).map_err(|_| self.bad("a length"))
    }
    pub fn len4(&mut self) -> Result<&'a [u8], EngineError> {
        let n = self.u64()?;
        let bytes = n.checked_mul(4).ok_or_else(|| self.bad("a length"))?;
        self.take(bytes)
    }
    pub fn u32s(&mut self) -> Result<Vec<u32>, EngineError> {
        Ok(self
            .len4()?
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
    pub fn f32s(&mut self) -> Result<Vec<f32>, EngineError> {
        Ok(self
            .len4()?
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
    pub fn opt_f32s(&mut self) -> Result<Option<Vec<f32>>, EngineError> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.f32s()?)),
            _ => Err(self.bad("an option tag")),
        }
    }
    pub fn str(&mut self) -> Result<String, EngineError> {
        let n = self.u64()?;
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }
}

/// Per (round, destination), each sender's message.
type Mailboxes = HashMap<(u64, usize), BTreeMap<usize, Vec<u8>>>;

/// The processes of a cluster as threads of one process: each round's messages left in a
/// shared mailroom, a barrier between rounds. What tests run a protocol over without a
/// network (the cluster's own is `dataflow/rounds.rs`).
pub struct ThreadProcess {
    room: Arc<Mailroom>,
    me: usize,
    round: u64,
}

struct Mailroom {
    processes: usize,
    boxes: Mutex<Mailboxes>,
    barrier: Barrier,
}

impl ThreadProcess {
    /// `processes` processes, to be moved to a thread each (process `i` at index `i`).
    pub fn cluster(processes: usize) -> Vec<ThreadProcess> {
        let room = Arc::new(Mailroom {
            processes,
            boxes: Mutex::new(HashMap::new()),
            barrier: Barrier::new(processes),
        });
        (0..processes)
            .map(|me| ThreadProcess {
                room: room.clone(),
                me,
                round: 0,
            })
            .collect()
    }
}

impl Collective for ThreadProcess {
    fn processes(&self) -> usize {
        self.room.processes
    }

    fn process(&self) -> usize {
        self.me
    }

    fn round(
        &mut self,
        outgoing: Vec<(usize, Vec<u8>)>,
    ) -> Result<BTreeMap<usize, Vec<u8>>, EngineError> {
        let poisoned = || EngineError::Dataflow("a thread of the cluster panicked".into());
        {
            let mut boxes = self.room.boxes.lock().map_err(|_| poisoned())?;
            for (to, message) in outgoing {
                boxes
                    .entry((self.round, to))
                    .or_default()
                    .insert(self.me, message);
            }
        }
        self.room.barrier.wait();
        let got = self
            .room
            .boxes
            .lock()
            .map_err(|_| poisoned())?
            .remove(&(self.round, self.me))
            .unwrap_or_default();
        self.round += 1;
        Ok(got)
    }
}
