//! `report.html`: one self-contained page of what a run did, drawn from what it
//! recorded (the run outcome, the trainer's loss log). Inline SVG, no network, no file
//! beside it, so it opens anywhere and can be mailed as it is. One short inline script
//! measures each drawn plot once the page has laid out and records the sizes on the
//! page's root element (`data-plots`), so a headless browser can tell that every plot
//! drew.
//!
//! Sections: base against fine-tuned metrics per query set; the funnel from passages to
//! training examples, with every drop and its reason; wall time per part; the loss and
//! learning-rate curves and the dev loss per epoch. Every plot is an `<svg>` with a
//! `data-plot` attribute naming it, so a test (or a reader) can check that each drew.

use std::fmt::Write;

use crate::config::Pipeline;
use crate::dataflow::{read_device_journal, DeviceStageRecord};
use crate::error::EngineError;
use crate::train::report::{loss_plot_svg, read_log};

use super::RunOutcome;
use crate::dataflow::evaluate::Metrics;

/// Width of the bar charts, in pixels.
const BAR_WIDTH: f64 = 640.0;
/// Height of one bar and the gap after it.
const BAR_HEIGHT: f64 = 18.0;
const BAR_GAP: f64 = 6.0;
/// Room for the bars' labels on their left.
const LABEL_WIDTH: f64 = 260.0;
/// Colours of the base and the fine-tuned model in every chart.
const BASE_COLOUR: &str = "#8c8c8c";
const TUNED_COLOUR: &str = "#1f77b4";

/// Size of the queue-depth plot.
const QUEUE_WIDTH: f64 = 900.0;
const QUEUE_HEIGHT: f64 = 160.0;
const QUEUE_MARGIN: f64 = 30.0;

/// The queue depth of every journal record over one time axis, stage after stage.
fn queue_plot(journal: &[DeviceStageRecord]) -> String {
    let total: f64 = journal.iter().map(|r| r.seconds.max(1e-9)).sum();
    let capacity = journal
        .iter()
        .map(|r| r.queue_capacity)
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let x = |t: f64| QUEUE_MARGIN + t / total * (QUEUE_WIDTH - 2.0 * QUEUE_MARGIN);
    let y =
        |d: f64| QUEUE_HEIGHT - QUEUE_MARGIN - d / capacity * (QUEUE_HEIGHT - 2.0 * QUEUE_MARGIN);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" data-plot=\"queue\" width=\"{QUEUE_WIDTH}\" \
         height=\"{QUEUE_HEIGHT}\" font-family=\"sans-serif\" font-size=\"11\">\
         <rect x=\"{QUEUE_MARGIN}\" y=\"{QUEUE_MARGIN}\" width=\"{}\" height=\"{}\" \
         fill=\"none\" stroke=\"#999\"/>",
        QUEUE_WIDTH - 2.0 * QUEUE_MARGIN,
        QUEUE_HEIGHT - 2.0 * QUEUE_MARGIN
    );
    let mut offset = 0.0;
    for r in journal {
        let points: Vec<String> = r
            .queue_depth
            .iter()
            .map(|&(t, d)| format!("{:.1},{:.1}", x(offset + f64::from(t)), y(f64::from(d))))
            .collect();
        if !points.is_empty() {
            let _ = write!(
                svg,
                "<polyline fill=\"none\" stroke=\"{TUNED_COLOUR}\" stroke-width=\"1.2\" \
                 points=\"{}\"/>",
                points.join(" ")
            );
        }
        offset += r.seconds.max(1e-9);
    }
    let _ = write!(
        svg,
        "<text x=\"{QUEUE_MARGIN}\" y=\"{:.0}\">queue depth 0 .. {capacity} over {total:.1} s \
         of device stages</text></svg>",
        QUEUE_MARGIN - 8.0
    );
    svg
}

/// Records `name:WIDTHxHEIGHT` of every plot's drawn content on the root element.
const DRAWN_CHECK: &str = "<script>addEventListener('load',function(){var d=[];\
document.querySelectorAll('svg[data-plot]').forEach(function(s){var b=s.getBBox();\
d.push(s.dataset.plot+':'+Math.round(b.width)+'x'+Math.round(b.height));});\
document.documentElement.dataset.plots=d.join(',');});</script>";

/// Escapes text for HTML and SVG.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A horizontal bar chart: one bar per `(label, value, colour)`, scaled to the largest.
fn bar_chart(name: &str, bars: &[(String, f64, &str)], format: impl Fn(f64) -> String) -> String {
    let max = bars.iter().map(|b| b.1).fold(0.0f64, f64::max);
    let height = bars.len() as f64 * (BAR_HEIGHT + BAR_GAP) + BAR_GAP;
    let width = LABEL_WIDTH + BAR_WIDTH + 80.0;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" data-plot=\"{}\" width=\"{width}\" \
         height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">",
        escape(name)
    );
    for (i, (label, value, colour)) in bars.iter().enumerate() {
        let y = BAR_GAP + i as f64 * (BAR_HEIGHT + BAR_GAP);
        let w = if max > 0.0 {
            value / max * BAR_WIDTH
        } else {
            0.0
        };
        let _ = write!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\
             <rect x=\"{LABEL_WIDTH}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"{BAR_HEIGHT}\" \
             fill=\"{colour}\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            LABEL_WIDTH - 6.0,
            y + BAR_HEIGHT - 5.0,
            escape(label),
            LABEL_WIDTH + w + 4.0,
            y + BAR_HEIGHT - 5.0,
            escape(&format(*value))
        );
    }
    svg.push_str("</svg>");
    svg
}

fn metric(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".into(), |x| format!("{x:.4}"))
}

fn metrics_rows(which: &str, m: &Metrics) -> String {
    format!(
        "<td>{which}</td><td>{}</td><td>{}</td><td>{}</td>",
        metric(m.ndcg_at_10),
        metric(m.recall_at_100),
        metric(m.mrr_at_10)
    )
}

/// One stage's line of the "reused and recomputed" account of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReuseRow {
    pub stage: String,
    /// Items kept from earlier runs.
    pub kept: usize,
    /// Items computed by this run.
    pub now: usize,
    /// Items of the last version that are gone, where the stage knows them.
    pub retracted: Option<usize>,
    pub unit: &'static str,
}

/// What this invocation took from earlier ones and what it computed, stage by stage
/// (embeddings: the device table's "from memo" column): the report's table and the
/// `run` summary's lines.
pub fn reuse_rows(outcome: &RunOutcome) -> Vec<ReuseRow> {
    let mut rows = Vec::new();
    let mut row = |stage: String, kept: usize, now: usize, retracted: Option<usize>, unit| {
        rows.push(ReuseRow {
            stage,
            kept,
            now,
            retracted,
            unit,
        });
    };
    if let Some(g) = &outcome.generate {
        let c = &g.change;
        if c.last_version {
            let p = &c.passages;
            let edited = p.text_edited + p.title_edited;
            row(
                "corpus (since the last generation)".into(),
                p.unchanged,
                p.added + edited,
                Some(p.removed + edited),
                "passages",
            );
            row(
                "held-out set".into(),
                0,
                c.held_out.moved_in,
                Some(c.held_out.moved_out),
                "passages moved",
            );
        }
        row(
            "generation".into(),
            g.cached,
            g.generated_now,
            c.last_version.then_some(c.queries.retracted),
            "requests (retracted: queries)",
        );
    }
    for r in &outcome.mine.retrievals {
        let kept = if r.reused {
            r.queries
        } else {
            r.lists_repaired
        };
        row(
            r.stage.clone(),
            kept,
            r.lists_retrieved,
            None,
            "query lists",
        );
        // A retrieval over every passage (nothing repaired) scored every passage now.
        let full = !r.reused && r.lists_repaired == 0;
        let new_passages = if full { r.passages } else { r.passages_added };
        row(
            format!("{}: passages", r.stage),
            r.passages - new_passages,
            new_passages,
            Some(r.passages_removed),
            "passages",
        );
    }
    let pairs = outcome.label.pairs;
    for (i, now) in outcome.label.scored_now.iter().enumerate() {
        row(
            format!("teacher {i}"),
            pairs.saturating_sub(*now),
            *now,
            None,
            "pair scores",
        );
    }
    let r = &outcome.train.report;
    let resumed = r.resumed_from.unwrap_or(0) as usize;
    row(
        "training".into(),
        resumed,
        (r.state.global_step as usize).saturating_sub(resumed),
        None,
        "steps",
    );
    rows
}

/// The report's table of [`reuse_rows`].
fn reuse_table(outcome: &RunOutcome) -> String {
    let mut html = String::from(
        "<h2>Reused and recomputed</h2><table><tr><th>stage</th><th>kept from earlier \
         runs</th><th>computed now</th><th>retracted</th><th>unit</th></tr>",
    );
    for r in reuse_rows(outcome) {
        let gone = r
            .retracted
            .map_or_else(|| "-".to_string(), |g| g.to_string());
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{gone}</td><td>{}</td></tr>",
            escape(&r.stage),
            r.kept,
            r.now,
            escape(r.unit)
        );
    }
    html.push_str(
        "</table><p class=\"note\">Retrieval keeps the lists of the last version: after a \
         corpus change only the new passages are scored against every query, and only the \
         lists that lost a passage (or whose query is new) are retrieved again. Retracted: \
         passages of the last version that are gone (removed or edited), and queries of \
         the last generation no longer generated. The corpus rows come from the change \
         plan (differential dataflow over the last finished version).</p>",
    );
    html
}

/// The page for `outcome`.
pub fn render(pipeline: &Pipeline, outcome: &RunOutcome) -> Result<String, EngineError> {
    let mut html = String::new();
    let title = format!("distillery run: {}", pipeline.run_dir.display());
    let _ = write!(
        html,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title>\
         <style>body{{font-family:sans-serif;max-width:1040px;margin:2em auto;color:#222}}\
         table{{border-collapse:collapse;margin:0.5em 0}}td,th{{border:1px solid #ccc;\
         padding:3px 8px;text-align:right}}td:first-child,th:first-child{{text-align:left}}\
         h2{{margin-top:1.6em;border-bottom:1px solid #ddd}}.note{{color:#666}}</style>\
         </head><body><h1>{}</h1>",
        escape(&title),
        escape(&title)
    );
    let _ = write!(
        html,
        "<p>Corpus <code>{}</code>; base model <code>{}</code>; fine-tuned model \
         <code>{}</code>; {:.1} s in all.</p>",
        escape(&pipeline.corpus.display().to_string()),
        escape(&outcome.base_model.display().to_string()),
        escape(&outcome.model.display().to_string()),
        outcome.seconds
    );

    // Metrics.
    html.push_str("<h2>Base against fine-tuned</h2>");
    if outcome.evaluations.is_empty() {
        html.push_str(
            "<p class=\"note\">No query set to evaluate on: give [generate] (its held-out \
             passages' queries) or [eval] dataset.</p>",
        );
    }
    let mut bars = Vec::new();
    for e in &outcome.evaluations {
        // The teacher check of the same set, measured before training: the teachers
        // reranking the base model's top 100.
        let teachers = outcome
            .teacher_checks
            .iter()
            .find(|c| c.set == e.set)
            .map_or_else(String::new, |c| {
                format!(
                    "<tr>{}</tr>",
                    metrics_rows("teachers (reranking the base's top 100)", &c.teachers)
                )
            });
        let _ = write!(
            html,
            "<h3>{} ({} queries, {} passages)</h3><table><tr><th>model</th><th>nDCG@10</th>\
             <th>Recall@100</th><th>MRR@10</th></tr><tr>{}</tr><tr>{}</tr>{teachers}</table>",
            escape(&e.set),
            e.queries,
            e.passages,
            metrics_rows("base", &e.base),
            metrics_rows("fine-tuned", &e.fine_tuned)
        );
        for (name, base, tuned) in [
            ("nDCG@10", e.base.ndcg_at_10, e.fine_tuned.ndcg_at_10),
            (
                "Recall@100",
                e.base.recall_at_100,
                e.fine_tuned.recall_at_100,
            ),
            ("MRR@10", e.base.mrr_at_10, e.fine_tuned.mrr_at_10),
        ] {
            let set = &e.label;
            bars.push((
                format!("{set} {name} base"),
                base.unwrap_or(0.0),
                BASE_COLOUR,
            ));
            bars.push((
                format!("{set} {name} fine-tuned"),
                tuned.unwrap_or(0.0),
                TUNED_COLOUR,
            ));
        }
    }
    if !bars.is_empty() {
        html.push_str(&bar_chart("metrics", &bars, |v| format!("{v:.4}")));
    }

    // The funnel.
    html.push_str("<h2>From passages to training examples</h2><table><tr><th>step</th><th>in</th><th>dropped, and why</th><th>kept</th></tr>");
    let mut funnel = Vec::new();
    if let Some(g) = &outcome.generate {
        let p = &g.prepare;
        let _ = write!(
            html,
            "<tr><td>passages prepared for generation</td><td>{}</td><td>{} too short, {} \
             near-duplicates, {} empty after normalising, {} sampled out</td><td>{} ({} held \
             out)</td></tr><tr><td>queries generated ({})</td><td>{}</td><td>{} failed</td>\
             <td>{}</td></tr>",
            p.read,
            p.too_short.len(),
            p.duplicates.len(),
            p.empty_normalised.len(),
            p.sampled_out,
            p.kept,
            p.held_out.len(),
            escape(&g.generator),
            g.requests,
            g.failed,
            g.queries
        );
        funnel.push(("passages read".to_string(), p.read as f64, BASE_COLOUR));
        funnel.push((
            "queries generated".to_string(),
            g.queries as f64,
            TUNED_COLOUR,
        ));
    }
    let c = &outcome.mine.stats;
    let _ = write!(
        html,
        "<tr><td>candidate lists (retrieval, RRF)</td><td>{}</td><td>{} held-out source, {} \
         no retriever had the source, {} source cut, {} too few candidates</td><td>{}</td></tr>",
        c.queries_in,
        c.dropped_held_out_source,
        c.dropped_no_retriever,
        c.dropped_source_cut,
        c.dropped_too_few_candidates,
        c.kept
    );
    let t = &outcome.label.stats;
    let _ = write!(
        html,
        "<tr><td>teacher filter</td><td>{}</td><td>{} no candidates, {} source not first, {} \
         top score low</td><td>{}</td></tr><tr><td>examples</td><td>{}</td><td></td>\
         <td>train {}, dev {}</td></tr></table>",
        t.queries_in,
        t.dropped_no_candidates,
        t.dropped_source_not_first,
        t.dropped_low_top_score,
        t.kept,
        outcome.label.examples,
        outcome.label.train,
        outcome.label.dev
    );
    funnel.push((
        "queries mined".to_string(),
        c.queries_in as f64,
        BASE_COLOUR,
    ));
    funnel.push((
        "candidate lists kept".to_string(),
        c.kept as f64,
        TUNED_COLOUR,
    ));
    funnel.push((
        "examples (teacher filter)".to_string(),
        t.kept as f64,
        TUNED_COLOUR,
    ));
    let _ = write!(
        html,
        "<p>{}.</p>",
        escape(&super::pairs_line(&outcome.label))
    );
    html.push_str(&bar_chart("funnel", &funnel, |v| format!("{v:.0}")));

    // Time.
    html.push_str("<h2>Wall time per part</h2>");
    let times: Vec<(String, f64, &str)> = outcome
        .parts
        .iter()
        .map(|p| (p.part.clone(), p.seconds, TUNED_COLOUR))
        .collect();
    html.push_str(&bar_chart("time", &times, |v| format!("{v:.1} s")));
    html.push_str(
        "<p class=\"note\">A part that found its work in the run directory (a rerun, a \
         resume) takes only the time to check it.</p>",
    );

    // The device stages, as the run's journal recorded them (every invocation's).
    let journal = read_device_journal(&pipeline.run_dir);
    html.push_str("<h2>Device stages</h2>");
    if journal.is_empty() {
        html.push_str("<p class=\"note\">No device stage ran.</p>");
    } else {
        html.push_str(
            "<table><tr><th>stage</th><th>items run</th><th>from memo</th><th>seconds</th>\
             <th>items/s</th><th>device busy</th><th>batches</th><th>padding</th></tr>",
        );
        for r in &journal {
            let padding = if r.padded_tokens > 0 {
                100.0 * (1.0 - r.real_tokens as f64 / r.padded_tokens as f64)
            } else {
                0.0
            };
            let _ = write!(
                html,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:.2}</td><td>{:.1}</td>\
                 <td>{:.0}%</td><td>{}</td><td>{padding:.1}%</td></tr>",
                escape(&r.label),
                r.rows,
                r.memoised,
                r.seconds,
                r.rows_per_second(),
                100.0 * r.busy_fraction(),
                r.batches
            );
        }
        html.push_str("</table>");
        // The plots show the stages that ran on the device (not those served whole from
        // their memo tables).
        let ran: Vec<DeviceStageRecord> =
            journal.iter().filter(|r| r.batches > 0).cloned().collect();
        let busy: Vec<(String, f64, &str)> = ran
            .iter()
            .map(|r| (r.label.clone(), 100.0 * r.busy_fraction(), TUNED_COLOUR))
            .collect();
        html.push_str(&bar_chart("busy", &busy, |v| format!("{v:.0}% busy")));
        html.push_str(&queue_plot(&ran));
        html.push_str(
            "<p class=\"note\">Queue depth: the batches waiting for the device as each one \
             started, stage after stage on one time axis; above zero, the device never \
             waited for its operators.</p>",
        );
    }

    html.push_str(&reuse_table(outcome));

    // Training.
    let r = &outcome.train.report;
    let _ = write!(
        html,
        "<h2>Training</h2><p>{} steps ({} per epoch), {} train queries, {} dev queries{}.</p>",
        r.state.global_step,
        r.steps_per_epoch,
        r.train_queries,
        r.dev_queries,
        r.resumed_from
            .map(|s| format!("; resumed from the checkpoint at step {s}"))
            .unwrap_or_default()
    );
    let log = pipeline.run_dir.join("train").join("loss-log.csv");
    let rows = read_log(&log)?;
    let curve = loss_plot_svg(&rows).replacen("<svg ", "<svg data-plot=\"loss\" ", 1);
    html.push_str(&curve);
    let dev: Vec<(String, f64, &str)> = r
        .dev_losses
        .iter()
        .enumerate()
        .map(|(epoch, loss)| (format!("epoch {epoch} dev loss"), *loss, TUNED_COLOUR))
        .collect();
    if dev.is_empty() {
        html.push_str("<p class=\"note\">No epoch has finished.</p>");
    } else {
        html.push_str(&bar_chart("dev-loss", &dev, |v| format!("{v:.5}")));
    }
    html.push_str(DRAWN_CHECK);
    html.push_str("</body></html>\n");
    Ok(html)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is its job
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped() {
        assert_eq!(
            escape("a<b & \"c\" 'd'>"),
            "a&lt;b &amp; &quot;c&quot; &#39;d&#39;&gt;"
        );
    }

    #[test]
    fn bars_scale_to_the_largest_value() {
        let svg = bar_chart(
            "t",
            &[("a".into(), 2.0, "#000"), ("b<".into(), 1.0, "#000")],
            |v| format!("{v}"),
        );
        assert!(svg.contains(&format!("width=\"{BAR_WIDTH:.1}\"")), "{svg}");
        assert!(
            svg.contains(&format!("width=\"{:.1}\"", BAR_WIDTH / 2.0)),
            "{svg}"
        );
        assert!(svg.contains("b&lt;"), "{svg}");
        assert!(svg.contains("data-plot=\"t\""));
    }
}
