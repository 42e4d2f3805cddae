//! Which implementation runs an encoder's forward pass: candle's tensors on any device,
//! or the hand-written CPU kernel. The embedder and the cross-encoders both offer the
//! two; [`Backend::for_device`] picks the faster for a device.

use candle_core::Device;

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
