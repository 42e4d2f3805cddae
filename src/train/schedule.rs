//! The learning-rate schedule of the recipe: linear warm-up over half an epoch (at least
//! [`MIN_WARMUP_STEPS`]), then linear decay to a floor of 10% of the peak at the last
//! planned step.

use serde::{Deserialize, Serialize};

/// Warm-up never shorter than this many optimizer steps: with huge accumulated batches
/// an epoch may be a handful of steps, and a one-step warm-up is no warm-up.
pub const MIN_WARMUP_STEPS: u64 = 10;

/// Shape of the schedule; the defaults are the recipe's.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Warm-up length as a fraction of an epoch's steps.
    pub warmup_epochs: f64,
    /// The learning rate never decays below `floor x lr`.
    pub floor: f64,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self {
            warmup_epochs: 0.5,
            floor: 0.1,
        }
    }
}

/// The schedule of one run, fixed once the step counts are known.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinearSchedule {
    pub peak: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub floor: f64,
}

impl LinearSchedule {
    pub fn new(peak: f64, steps_per_epoch: u64, max_epochs: u64, config: &ScheduleConfig) -> Self {
        let warmup =
            ((steps_per_epoch as f64 * config.warmup_epochs).ceil() as u64).max(MIN_WARMUP_STEPS);
        Self {
            peak,
            warmup_steps: warmup,
            total_steps: (steps_per_epoch * max_epochs).max(warmup + 1),
            floor: config.floor,
        }
    }

    /// The learning rate of optimizer step `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.peak * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let decay_steps = (self.total_steps - self.warmup_steps) as f64;
        let done = ((step - self.warmup_steps) as f64 / decay_steps).min(1.0);
        self.peak * (1.0 - (1.0 - self.floor) * done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warms_up_then_decays_to_the_floor() {
        // 40 steps per epoch: warm-up 20 steps; 3 epochs: 120 steps, 100 of decay.
        let s = LinearSchedule::new(1.0, 40, 3, &ScheduleConfig::default());
        assert_eq!(s.warmup_steps, 20);
        assert_eq!(s.total_steps, 120);
        assert!((s.lr(0) - 0.05).abs() < 1e-12);
        assert!((s.lr(19) - 1.0).abs() < 1e-12);
        assert!((s.lr(20) - 1.0).abs() < 1e-12);
        // Half-way through the decay: 1 - 0.9 * 0.5 = 0.55.
        assert!((s.lr(70) - 0.55).abs() < 1e-12);
        assert!((s.lr(120) - 0.1).abs() < 1e-12);
        assert!((s.lr(500) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn short_epochs_still_warm_up_for_ten_steps() {
        let s = LinearSchedule::new(2e-4, 3, 30, &ScheduleConfig::default());
        assert_eq!(s.warmup_steps, 10);
        assert!((s.lr(4) - 1e-4).abs() < 1e-15);
    }
}
