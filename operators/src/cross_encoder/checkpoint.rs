//! A sequence-classification checkpoint's tensors, with the family's encoder prefix
//! (`bert.`, `electra.`, `roberta.`) taken off so that [`Weights`] and the CPU kernel
//! find BERT's names, and put back on in every error so that messages name the tensor as
//! the file spells it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use super::config::Family;
use crate::bert::Weights;
use crate::error::{OperatorError, Result};

/// The tensor every encoder has, used to tell whether the file holds one at all.
const WORD_EMBEDDINGS: &str = "embeddings.word_embeddings.weight";

pub(crate) struct Checkpoint {
    weights: Weights,
    /// The prefix taken off the encoder's names: the family's, or "" when the file stores
    /// the encoder without one.
    prefix: &'static str,
    path: PathBuf,
}

impl Checkpoint {
    /// Loads `path` (safetensors only) onto `device`.
    pub fn load(path: &Path, family: Family, device: &Device) -> Result<Self> {
        let tensors =
            candle_core::safetensors::load(path, device).map_err(|e| OperatorError::BadTensor {
                path: path.to_path_buf(),
                name: "*".into(),
                message: format!("cannot read safetensors file: {e}"),
            })?;
        Self::from_tensors(path, tensors, family, device)
    }

    /// Wraps tensors already in memory; `path` only names them in errors.
    pub fn from_tensors(
        path: &Path,
        tensors: HashMap<String, Tensor>,
        family: Family,
        device: &Device,
    ) -> Result<Self> {
        let wanted = family.prefix();
        let prefix = if tensors.keys().any(|k| k.starts_with(wanted)) {
            wanted
        } else {
            ""
        };
        let mut stripped = HashMap::with_capacity(tensors.len());
        for (name, tensor) in tensors {
            let short = name.strip_prefix(prefix).unwrap_or(&name).to_string();
            if stripped.contains_key(&short) {
                return Err(OperatorError::BadTensor {
                    path: path.to_path_buf(),
                    name: short,
                    message: format!("stored both with and without the prefix `{prefix}`"),
                });
            }
            stripped.insert(short, tensor);
        }
        if !stripped.contains_key(WORD_EMBEDDINGS) {
            return Err(OperatorError::BadTensor {
                path: path.to_path_buf(),
                name: format!("{wanted}{WORD_EMBEDDINGS}"),
                message: format!("missing: is this a {} checkpoint?", family.architecture()),
            });
        }
        Ok(Self {
            weights: Weights::from_tensors(path, stripped, device)?,
            prefix,
            path: path.to_path_buf(),
        })
    }

    /// The encoder's weights under BERT's names, for loaders that take [`Weights`]; pass
    /// what they return through [`Checkpoint::named`].
    pub fn weights(&self) -> &Weights {
        &self.weights
    }

    /// Puts the prefix back on the tensor an error names.
    pub fn named<T>(&self, result: Result<T>) -> Result<T> {
        result.map_err(|e| match e {
            OperatorError::BadTensor {
                path,
                name,
                message,
            } if name != "*" => OperatorError::BadTensor {
                path,
                name: format!("{}{name}", self.prefix),
                message,
            },
            other => other,
        })
    }

    /// A tensor of the encoder (named without prefix), checked to have `shape`, as f32.
    pub fn encoder(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.named(self.weights.get(name, shape))
    }

    /// A tensor outside the encoder (`classifier.*`), checked to have `shape`, as f32.
    pub fn head(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.weights
            .get_unprefixed(name, shape)?
            .ok_or_else(|| OperatorError::BadTensor {
                path: self.path.clone(),
                name: name.into(),
                message: "missing".into(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zeros(shape: &[usize]) -> Tensor {
        Tensor::zeros(shape, candle_core::DType::F32, &Device::Cpu).unwrap()
    }

    fn checkpoint(names: &[(&str, &[usize])]) -> Result<Checkpoint> {
        let tensors = names
            .iter()
            .map(|(n, s)| (n.to_string(), zeros(s)))
            .collect();
        Checkpoint::from_tensors(
            Path::new("m.safetensors"),
            tensors,
            Family::Electra,
            &Device::Cpu,
        )
    }

    #[test]
    fn strips_and_restores_the_prefix() {
        let c = checkpoint(&[
            ("electra.embeddings.word_embeddings.weight", &[5, 2]),
            ("electra.encoder.layer.0.output.dense.bias", &[3]),
            ("classifier.out_proj.bias", &[2]),
        ])
        .unwrap();
        assert_eq!(
            c.encoder("encoder.layer.0.output.dense.bias", &[3])
                .unwrap()
                .dims(),
            &[3]
        );
        let err = c
            .encoder("encoder.layer.0.output.dense.bias", &[4])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`electra.encoder.layer.0.output.dense.bias`: shape [3], expected [4]"),
            "{err}"
        );
        let err = c.head("classifier.dense.weight", &[2, 2]).unwrap_err();
        assert!(
            err.to_string()
                .contains("`classifier.dense.weight`: missing"),
            "{err}"
        );
        assert_eq!(
            c.head("classifier.out_proj.bias", &[2]).unwrap().dims(),
            &[2]
        );
    }

    #[test]
    fn names_the_missing_encoder() {
        let err = checkpoint(&[("classifier.out_proj.bias", &[2])])
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("`electra.embeddings.word_embeddings.weight`: missing"),
            "{err}"
        );
    }

    #[test]
    fn rejects_a_name_stored_twice() {
        let err = checkpoint(&[
            ("electra.embeddings.word_embeddings.weight", &[5, 2]),
            ("embeddings.word_embeddings.weight", &[5, 2]),
        ])
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("both with and without the prefix"), "{err}");
    }
}
