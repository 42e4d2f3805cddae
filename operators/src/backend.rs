//! Which implementation runs an encoder's forward pass: candle's tensors on any device,
//! or the hand-written CPU kernel. The embedder and the cross-encoders both offer the
//! two; [`Backend::for_device`] picks the faster for a device.

use candle_core::Device;

use crate::cpu_bert::CpuBert;
use crate::cpu_path::CpuPath;
use crate::error::Result;

/// Which implementation of the encoder runs the forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// candle tensors on the model's device (CPU or CUDA); padded batches, masked
    /// attention.
    Candle,
    /// The CPU kernel of [`crate::cpu_bert`]: packed, unpadded rows; CPU only.
    Cpu,
}

impl Backend {
    /// The fastest backend for `device`: the CPU kernel on the CPU, candle elsewhere.
    pub fn for_device(device: &Device) -> Self {
        if device.is_cpu() {
            Self::Cpu
        } else {
            Self::Candle
        }
    }

    /// Whether this backend can run on `device`.
    pub fn runs_on(self, device: &Device) -> bool {
        self == Self::Candle || device.is_cpu()
    }
}

/// A model's encoder on one of the two backends: `C` is the candle form (the embedder's
/// whole `BertModel`, the cross-encoders' layers alone).
// Clippy sizes the generic variant at 0 bytes; one encoder lives per loaded model and is
// never moved on a hot path, so the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Encoder<C> {
    Candle(C),
    Cpu(CpuBert),
}

impl<C> Encoder<C> {
    /// Which backend this encoder runs on.
    pub fn backend(&self) -> Backend {
        match self {
            Self::Candle(_) => Backend::Candle,
            Self::Cpu(_) => Backend::Cpu,
        }
    }

    /// The CPU path the CPU kernel runs on ([`crate::cpu_path`]); `None` for candle, which
    /// does not use the hand-written kernels.
    pub fn cpu_path(&self) -> Option<CpuPath> {
        match self {
            Self::Cpu(kernel) => Some(kernel.cpu_path()),
            Self::Candle(_) => None,
        }
    }

    /// Runs the CPU kernel on `path` from now on; fails, changing nothing, when this CPU
    /// cannot run it. Candle checks the path and otherwise ignores it.
    pub fn set_cpu_path(&mut self, path: CpuPath) -> Result<()> {
        match self {
            Self::Cpu(kernel) => kernel.set_cpu_path(path),
            Self::Candle(_) => {
                path.check()?;
                Ok(())
            }
        }
    }
}
