//! How the messages of data-parallel training travel: little-endian lengths and values,
//! one tag byte per request or reply. Every process runs the same distillery, so the
//! format has no version; a message that does not read back whole is an error naming
//! its sender.

use std::ops::Range;

use distillery_operators::student::GradientPath;

use super::{FlatGrads, ShareRows};
use crate::collective::{Reader, Writer};
use crate::error::EngineError;

/// What process 0 asks of another process.
#[derive(Debug)]
pub(super) enum Request {
    /// Take these weights, one flat vector per variable of [`Student::vars`].
    Weights(Vec<Vec<f32>>),
    /// Embed this share (and keep it for a [`Request::Backward`]).
    Embed(ShareRows),
    /// Back-propagate the kept share with these embedding gradients (`[rows, d]` flat).
    Backward {
        path: GradientPath,
        dq: Vec<f32>,
        dp: Option<Vec<f32>>,
    },
    /// Training is over.
    Done,
}

/// What another process answers.
#[derive(Debug)]
pub(super) enum Reply {
    /// The share's embeddings, flat.
    Embedded {
        queries: Vec<f32>,
        passages: Option<Vec<f32>>,
    },
    /// The share's tree nodes and their gradients (per variable, flat, or none).
    Gradients(Vec<(Range<usize>, FlatGrads)>),
    /// The request failed there.
    Failed(String),
}

const REQ_WEIGHTS: u8 = 1;
const REQ_EMBED: u8 = 2;
const REQ_BACKWARD: u8 = 3;
const REQ_DONE: u8 = 4;
const REPLY_EMBEDDED: u8 = 11;
const REPLY_GRADIENTS: u8 = 12;
const REPLY_FAILED: u8 = 13;

fn path_tag(path: GradientPath) -> u8 {
    match path {
        GradientPath::Kernel => 0,
        GradientPath::Graph => 1,
    }
}

pub(super) fn encode_requests(requests: &[Request]) -> Vec<u8> {
    let mut w = Writer::default();
    w.u64(requests.len());
    for r in requests {
        encode_request(&mut w, r);
    }
    w.0
}

pub(super) fn encode_request(w: &mut Writer, request: &Request) {
    match request {
        Request::Weights(vars) => {
            w.u8(REQ_WEIGHTS).u64(vars.len());
            for v in vars {
                w.f32s(v);
            }
        }
        Request::Embed(share) => {
            w.u8(REQ_EMBED)
                .u64(share.micro_batches.start)
                .u64(share.micro_batches.end)
                .u64(share.total)
                .u64(share.micro_batch)
                .u64(share.queries.len());
            for q in &share.queries {
                w.u32s(q);
            }
            match &share.passages {
                Some(lists) => {
                    w.u8(1);
                    for list in lists {
                        w.u64(list.len());
                        for p in list {
                            w.u32s(p);
                        }
                    }
                }
                None => {
                    w.u8(0);
                }
            }
        }
        Request::Backward { path, dq, dp } => {
            w.u8(REQ_BACKWARD)
                .u8(path_tag(*path))
                .f32s(dq)
                .opt_f32s(dp.as_deref());
        }
        Request::Done => {
            w.u8(REQ_DONE);
        }
    }
}

pub(super) fn decode_requests(bytes: &[u8], from: usize) -> Result<Vec<Request>, EngineError> {
    let mut r = Reader::new(bytes, from);
    let n = r.u64()?;
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(match r.u8()? {
            REQ_WEIGHTS => {
                let vars = r.u64()?;
                let mut v = Vec::new();
                for _ in 0..vars {
                    v.push(r.f32s()?);
                }
                Request::Weights(v)
            }
            REQ_EMBED => {
                let (start, end, total, micro_batch) = (r.u64()?, r.u64()?, r.u64()?, r.u64()?);
                let count = r.u64()?;
                let mut queries = Vec::new();
                for _ in 0..count {
                    queries.push(r.u32s()?);
                }
                let passages = match r.u8()? {
                    0 => None,
                    1 => {
                        let mut lists = Vec::new();
                        for _ in 0..count {
                            let len = r.u64()?;
                            let mut list = Vec::new();
                            for _ in 0..len {
                                list.push(r.u32s()?);
                            }
                            lists.push(list);
                        }
                        Some(lists)
                    }
                    _ => return Err(r.bad("a passages tag")),
                };
                Request::Embed(ShareRows {
                    micro_batches: start..end,
                    total,
                    micro_batch,
                    queries,
                    passages,
                })
            }
            REQ_BACKWARD => {
                let path = match r.u8()? {
                    0 => GradientPath::Kernel,
                    1 => GradientPath::Graph,
                    _ => return Err(r.bad("a gradient path")),
                };
                Request::Backward {
                    path,
                    dq: r.f32s()?,
                    dp: r.opt_f32s()?,
                }
            }
            REQ_DONE => Request::Done,
            _ => return Err(r.bad("a request kind")),
        });
    }
    if !r.done() {
        return Err(r.bad("trailing bytes"));
    }
    Ok(out)
}

pub(super) fn encode_reply(reply: &Reply) -> Vec<u8> {
    let mut w = Writer::default();
    match reply {
        Reply::Embedded { queries, passages } => {
            w.u8(REPLY_EMBEDDED)
                .f32s(queries)
                .opt_f32s(passages.as_deref());
        }
        Reply::Gradients(nodes) => {
            w.u8(REPLY_GRADIENTS).u64(nodes.len());
            for (node, vars) in nodes {
                w.u64(node.start).u64(node.end).u64(vars.len());
                for v in vars {
                    w.opt_f32s(v.as_deref());
                }
            }
        }
        Reply::Failed(message) => {
            w.u8(REPLY_FAILED).str(message);
        }
    }
    w.0
}

pub(super) fn decode_reply(bytes: &[u8], from: usize) -> Result<Reply, EngineError> {
    let mut r = Reader::new(bytes, from);
    let reply = match r.u8()? {
        REPLY_EMBEDDED => Reply::Embedded {
            queries: r.f32s()?,
            passages: r.opt_f32s()?,
        },
        REPLY_GRADIENTS => {
            let n = r.u64()?;
            let mut nodes = Vec::new();
            for _ in 0..n {
                let (start, end, vars) = (r.u64()?, r.u64()?, r.u64()?);
                let mut v = Vec::new();
                for _ in 0..vars {
                    v.push(r.opt_f32s()?);
                }
                nodes.push((start..end, v));
            }
            Reply::Gradients(nodes)
        }
        REPLY_FAILED => Reply::Failed(r.str()?),
        _ => return Err(r.bad("a reply kind")),
    };
    if !r.done() {
        return Err(r.bad("trailing bytes"));
    }
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_read_back_as_written_and_cut_ones_are_errors() {
        let share = ShareRows {
            micro_batches: 1..3,
            total: 4,
            micro_batch: 2,
            queries: vec![vec![101, 7, 102], vec![101, 102]],
            passages: Some(vec![vec![vec![1, 2], vec![3]], vec![vec![]]]),
        };
        let bytes = encode_requests(&[
            Request::Weights(vec![vec![1.5, -0.0], vec![]]),
            Request::Embed(share.clone()),
            Request::Backward {
                path: GradientPath::Graph,
                dq: vec![0.25; 4],
                dp: None,
            },
            Request::Done,
        ]);
        let back = decode_requests(&bytes, 0).unwrap();
        assert_eq!(back.len(), 4);
        assert!(
            matches!(&back[0], Request::Weights(w) if w[0][0] == 1.5 && w[0][1].to_bits() == (-0.0f32).to_bits() && w[1].is_empty())
        );
        assert!(matches!(&back[1], Request::Embed(s) if *s == share));
        assert!(
            matches!(&back[2], Request::Backward { path: GradientPath::Graph, dq, dp: None } if dq == &vec![0.25; 4])
        );
        assert!(matches!(back[3], Request::Done));
        for cut in [1, 9, bytes.len() - 1] {
            let err = decode_requests(&bytes[..cut], 3).unwrap_err().to_string();
            assert!(
                err.contains("process 3") && err.contains("cut short"),
                "{err}"
            );
        }

        let reply = encode_reply(&Reply::Gradients(vec![(
            2..4,
            vec![Some(vec![1.0, 2.0]), None],
        )]));
        match decode_reply(&reply, 1).unwrap() {
            Reply::Gradients(nodes) => {
                assert_eq!(nodes, vec![(2..4, vec![Some(vec![1.0, 2.0]), None])])
            }
            other => panic!("{other:?}"),
        }
        let failed = encode_reply(&Reply::Failed("out of memory".into()));
        assert!(
            matches!(decode_reply(&failed, 1).unwrap(), Reply::Failed(m) if m == "out of memory")
        );
        let mut trailing = failed.clone();
        trailing.push(0);
        assert!(decode_reply(&trailing, 1).is_err());
    }
}
