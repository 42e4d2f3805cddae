//! The student's parameters as the kernel reads them (borrowed in place from candle's
//! variables) and the gradients it adds to, both in one fixed order: the embeddings,
//! then layer by layer.

use std::collections::HashMap;

use candle_core::{Storage, Tensor, Var};

use super::{bug, Shape};
use crate::error::Result;

/// Parameter names of one layer, in the order of a layer's slices in [`Params`] and of
/// its gradients.
pub(super) const LAYER_TENSORS: [&str; 16] = [
    "attention.self.query.weight",
    "attention.self.query.bias",
    "attention.self.key.weight",
    "attention.self.key.bias",
    "attention.self.value.weight",
    "attention.self.value.bias",
    "attention.output.dense.weight",
    "attention.output.dense.bias",
    "attention.output.LayerNorm.weight",
    "attention.output.LayerNorm.bias",
    "intermediate.dense.weight",
    "intermediate.dense.bias",
    "output.dense.weight",
    "output.dense.bias",
    "output.LayerNorm.weight",
    "output.LayerNorm.bias",
];

/// Embedding parameter names, in kernel order.
pub(super) const EMBEDDING_TENSORS: [&str; 5] = [
    "embeddings.word_embeddings.weight",
    "embeddings.position_embeddings.weight",
    "embeddings.token_type_embeddings.weight",
    "embeddings.LayerNorm.weight",
    "embeddings.LayerNorm.bias",
];

/// Every parameter name in kernel order: embeddings, then layer by layer.
fn kernel_names(layers: usize) -> Vec<String> {
    let mut out: Vec<String> = EMBEDDING_TENSORS.iter().map(|s| s.to_string()).collect();
    for l in 0..layers {
        out.extend(
            LAYER_TENSORS
                .iter()
                .map(|s| format!("encoder.layer.{l}.{s}")),
        );
    }
    out
}

/// Floats in each tensor of one layer, in [`LAYER_TENSORS`] order.
fn layer_sizes(shape: &Shape) -> [usize; 16] {
    let (h, i) = (shape.hidden, shape.intermediate);
    [
        h * h,
        h,
        h * h,
        h,
        h * h,
        h,
        h * h,
        h,
        h,
        h,
        i * h,
        i,
        h * i,
        h,
        h,
        h,
    ]
}

/// One tensor per parameter in kernel order, as f32 slices.
pub(super) struct Params<'a> {
    pub(super) word: &'a [f32],
    pub(super) position: &'a [f32],
    pub(super) token_type: &'a [f32],
    pub(super) emb_gamma: &'a [f32],
    pub(super) emb_beta: &'a [f32],
    pub(super) layers: Vec<[&'a [f32]; 16]>,
}

/// Indices into [`LAYER_TENSORS`].
pub(super) mod at {
    pub const WQ: usize = 0;
    pub const BQ: usize = 1;
    pub const WK: usize = 2;
    pub const BK: usize = 3;
    pub const WV: usize = 4;
    pub const BV: usize = 5;
    pub const WO: usize = 6;
    pub const BO: usize = 7;
    pub const G1: usize = 8;
    pub const B1: usize = 9;
    pub const WI: usize = 10;
    pub const BI: usize = 11;
    pub const WO2: usize = 12;
    pub const BO2: usize = 13;
    pub const G2: usize = 14;
    pub const B2: usize = 15;
}

/// The student's variables, read in place (each held under candle's read lock for the
/// pass, so nothing copies 90 MB of weights per call).
pub(crate) struct Weights<'v> {
    guards: Vec<(candle_core::StorageRef<'v>, &'v candle_core::Layout)>,
}

impl<'v> Weights<'v> {
    /// Borrows `vars` (by Hugging Face name) in kernel order.
    pub(crate) fn borrow(vars: &'v HashMap<&str, &'v Var>, layers: usize) -> Result<Self> {
        let mut guards = Vec::new();
        for name in kernel_names(layers) {
            let var = vars
                .get(name.as_str())
                .ok_or_else(|| bug(format!("parameter `{name}` is missing")))?;
            guards.push(var.as_tensor().storage_and_layout());
        }
        Ok(Self { guards })
    }

    pub(super) fn params(&self, shape: &Shape) -> Result<Params<'_>> {
        let mut slices = Vec::with_capacity(self.guards.len());
        for (storage, layout) in &self.guards {
            let Storage::Cpu(cpu) = &**storage else {
                return Err(bug("a parameter is not on the CPU".into()));
            };
            let data = cpu.as_slice::<f32>()?;
            let (start, end) = layout
                .contiguous_offsets()
                .ok_or_else(|| bug("a parameter is not contiguous".into()))?;
            slices.push(&data[start..end]);
        }
        let h = shape.hidden;
        let expect = |k: usize, n: usize| -> Result<()> {
            if slices[k].len() == n {
                Ok(())
            } else {
                Err(bug(format!(
                    "parameter {k} has {} floats, not {n}",
                    slices[k].len()
                )))
            }
        };
        expect(0, shape.vocab * h)?;
        expect(1, shape.positions * h)?;
        let mut layers = Vec::with_capacity(shape.layers);
        for l in 0..shape.layers {
            let base = EMBEDDING_TENSORS.len() + l * LAYER_TENSORS.len();
            for (k, n) in layer_sizes(shape).iter().enumerate() {
                expect(base + k, *n)?;
            }
            let mut arr: [&[f32]; 16] = [&[]; 16];
            arr.copy_from_slice(&slices[base..base + 16]);
            layers.push(arr);
        }
        Ok(Params {
            word: slices[0],
            position: slices[1],
            token_type: slices[2],
            emb_gamma: slices[3],
            emb_beta: slices[4],
            layers,
        })
    }
}

/// Gradients of every parameter, in kernel order, added to across calls.
pub struct Gradients {
    names: Vec<String>,
    pub(super) grads: Vec<Vec<f32>>,
}

impl Gradients {
    pub(crate) fn zeros(shape: &Shape, type_vocab: usize) -> Self {
        let h = shape.hidden;
        let mut grads = vec![
            vec![0.0; shape.vocab * h],
            vec![0.0; shape.positions * h],
            vec![0.0; type_vocab * h],
            vec![0.0; h],
            vec![0.0; h],
        ];
        for _ in 0..shape.layers {
            for n in layer_sizes(shape) {
                grads.push(vec![0.0; n]);
            }
        }
        Self {
            names: kernel_names(shape.layers),
            grads,
        }
    }

    /// Each gradient as a tensor shaped like its variable, by parameter name.
    pub(crate) fn into_tensors(
        self,
        shapes: &HashMap<String, Vec<usize>>,
    ) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::with_capacity(self.names.len());
        for (name, g) in self.names.into_iter().zip(self.grads) {
            let dims = shapes
                .get(&name)
                .ok_or_else(|| bug(format!("no shape for `{name}`")))?;
            let t = Tensor::from_vec(g, dims.as_slice(), &candle_core::Device::Cpu)?;
            out.insert(name, t);
        }
        Ok(out)
    }
}
