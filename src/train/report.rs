//! The training report's plot: loss and learning rate per step, drawn from the loss log as
//! a self-contained SVG (no plotting dependency; any browser shows it).

use std::fmt::Write as _;
use std::path::Path;

use crate::error::EngineError;

/// Plot size in SVG user units, and the margin that holds the axis labels.
const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 360.0;
const MARGIN: f64 = 48.0;

/// One row of the loss log.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogRow {
    pub step: f64,
    pub lr: f64,
    pub loss: f64,
}

/// Reads `step,epoch,lr,loss,...` rows (the trainer's `loss-log.csv`); a row that does not
/// parse is an error naming its line.
pub fn read_log(path: &Path) -> Result<Vec<LogRow>, EngineError> {
    let text = std::fs::read_to_string(path).map_err(|source| EngineError::Write {
        path: path.to_path_buf(),
        source,
    })?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        if line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split(',').collect();
        let num = |k: usize| f.get(k).and_then(|v| v.parse::<f64>().ok());
        match (num(0), num(2), num(3)) {
            (Some(step), Some(lr), Some(loss)) => rows.push(LogRow { step, lr, loss }),
            _ => {
                return Err(EngineError::Invalid(format!(
                    "{}:{}: expected step,epoch,lr,loss,..., found `{line}`",
                    path.display(),
                    i + 1
                )))
            }
        }
    }
    Ok(rows)
}

fn polyline(rows: &[LogRow], value: impl Fn(&LogRow) -> f64, colour: &str) -> String {
    let (x0, x1) = (rows[0].step, rows[rows.len() - 1].step);
    let (lo, hi) = rows
        .iter()
        .map(&value)
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    let sx = |x: f64| {
        if x1 > x0 {
            MARGIN + (x - x0) / (x1 - x0) * (WIDTH - 2.0 * MARGIN)
        } else {
            WIDTH / 2.0
        }
    };
    let sy = |y: f64| {
        if hi > lo {
            HEIGHT - MARGIN - (y - lo) / (hi - lo) * (HEIGHT - 2.0 * MARGIN)
        } else {
            HEIGHT / 2.0
        }
    };
    let points: Vec<String> = rows
        .iter()
        .map(|r| format!("{:.1},{:.1}", sx(r.step), sy(value(r))))
        .collect();
    format!(
        "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.5\" points=\"{}\"/>",
        points.join(" ")
    )
}

/// The SVG of `rows`: loss (blue, left scale) and learning rate (orange, right scale),
/// each scaled to its own range, with the ranges written on the axes.
pub fn loss_plot_svg(rows: &[LogRow]) -> String {
    let mut svg = String::new();
    let _ = write!(
        svg,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" \
         font-family=\"sans-serif\" font-size=\"12\">"
    );
    let _ = write!(
        svg,
        "<rect x=\"{MARGIN}\" y=\"{MARGIN}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#999\"/>",
        WIDTH - 2.0 * MARGIN,
        HEIGHT - 2.0 * MARGIN
    );
    if rows.is_empty() {
        let _ = write!(
            svg,
            "<text x=\"{MARGIN}\" y=\"{}\">no steps logged</text></svg>",
            HEIGHT / 2.0
        );
        return svg;
    }
    let range = |f: &dyn Fn(&LogRow) -> f64| {
        rows.iter()
            .map(f)
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
                (a.min(v), b.max(v))
            })
    };
    let (loss_lo, loss_hi) = range(&|r: &LogRow| r.loss);
    let (lr_lo, lr_hi) = range(&|r: &LogRow| r.lr);
    svg.push_str(&polyline(rows, |r| r.loss, "#1f77b4"));
    svg.push_str(&polyline(rows, |r| r.lr, "#ff7f0e"));
    let _ = write!(
        svg,
        "<text x=\"{MARGIN}\" y=\"{}\" fill=\"#1f77b4\">loss {loss_hi:.4} (top) .. {loss_lo:.4} (bottom)</text>",
        MARGIN - 8.0
    );
    let _ = write!(
        svg,
        "<text x=\"{}\" y=\"{}\" fill=\"#ff7f0e\" text-anchor=\"end\">lr {lr_hi:.2e} .. {lr_lo:.2e}</text>",
        WIDTH - MARGIN,
        MARGIN - 8.0
    );
    let _ = write!(
        svg,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">optimizer step {} .. {}</text></svg>",
        WIDTH / 2.0,
        HEIGHT - MARGIN / 3.0,
        rows[0].step,
        rows[rows.len() - 1].step
    );
    svg
}

/// Reads the loss log and writes its plot.
pub fn write_loss_plot(log: &Path, out: &Path) -> Result<(), EngineError> {
    let rows = read_log(log)?;
    crate::store::write_file_atomically(out, loss_plot_svg(&rows).as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plots_each_series_on_its_own_scale() {
        let rows = [
            LogRow {
                step: 0.0,
                lr: 1e-4,
                loss: 2.0,
            },
            LogRow {
                step: 1.0,
                lr: 2e-4,
                loss: 1.0,
            },
            LogRow {
                step: 2.0,
                lr: 2e-4,
                loss: 0.0,
            },
        ];
        let svg = loss_plot_svg(&rows);
        // x spans 48..672; loss 2 -> top (y 48), 0 -> bottom (y 312).
        assert!(
            svg.contains("points=\"48.0,48.0 360.0,180.0 672.0,312.0\""),
            "{svg}"
        );
        // lr 1e-4 is its minimum (bottom), 2e-4 its maximum (top).
        assert!(
            svg.contains("points=\"48.0,312.0 360.0,48.0 672.0,48.0\""),
            "{svg}"
        );
        assert!(svg.contains("loss 2.0000 (top) .. 0.0000 (bottom)"));
    }

    #[test]
    fn reads_the_trainers_log_and_names_a_bad_line() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("loss-log.csv");
        std::fs::write(
            &p,
            "step,epoch,lr,loss,kl,infonce,grad_norm\n0,0,0.00002,1.5,1.2,3.0,0.9\n",
        )
        .unwrap();
        assert_eq!(
            read_log(&p).unwrap(),
            vec![LogRow {
                step: 0.0,
                lr: 2e-5,
                loss: 1.5
            }]
        );
        std::fs::write(&p, "step,epoch,lr,loss\n0,0,x,1\n").unwrap();
        let e = read_log(&p).unwrap_err().to_string();
        assert!(e.contains("loss-log.csv:2"), "{e}");
    }
}
