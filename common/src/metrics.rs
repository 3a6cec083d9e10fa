//! The Prometheus exporter, with every metric described: each crate keeps
//! a catalog of the metrics it records (name, kind, labels, help), installs
//! the exporter with it, and tests that its code records nothing outside
//! the catalog and that `docs/metrics.md` lists the catalog as it is.

use std::path::Path;
use std::sync::OnceLock;

use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One metric a process records.
#[derive(Clone, Copy, Debug)]
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    pub labels: &'static [&'static str],
    pub help: &'static str,
}

impl Metric {
    pub const fn counter(
        name: &'static str,
        labels: &'static [&'static str],
        help: &'static str,
    ) -> Self {
        Metric {
            name,
            kind: Kind::Counter,
            labels,
            help,
        }
    }

    pub const fn gauge(
        name: &'static str,
        labels: &'static [&'static str],
        help: &'static str,
    ) -> Self {
        Metric {
            name,
            kind: Kind::Gauge,
            labels,
            help,
        }
    }

    pub const fn histogram(
        name: &'static str,
        labels: &'static [&'static str],
        help: &'static str,
    ) -> Self {
        Metric {
            name,
            kind: Kind::Histogram,
            labels,
            help,
        }
    }
}

/// How often queued histogram samples are folded into their buckets.
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Installs the process-wide recorder (once; later calls return the same
/// handle) and describes every metric of `catalog`, so `/metrics` carries
/// `# HELP` and `# TYPE` for each. `buckets` (seconds) serve every
/// histogram whose name ends in `_seconds`.
pub fn install(catalog: &[Metric], buckets: &[f64]) -> Result<PrometheusHandle, BuildError> {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    // Two first callers at once (tests on parallel threads): one installs,
    // the other waits here and then finds its handle.
    static INSTALLING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _installing = INSTALLING.lock().unwrap_or_else(|e| e.into_inner());
    let handle = match HANDLE.get() {
        Some(h) => h.clone(),
        None => {
            let h = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), buckets)?
                .install_recorder()?;
            // Histogram samples queue in the recorder until an upkeep folds
            // them into their buckets; without one they queue until the next
            // scrape, and grow without bound when nothing scrapes (an edge
            // at 20,000 requests a second records as many samples). A thread
            // of its own, so upkeep needs no runtime and no caller.
            let upkeep = h.clone();
            let _ = std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || loop {
                    std::thread::sleep(UPKEEP_EVERY);
                    upkeep.run_upkeep();
                });
            HANDLE.get_or_init(|| h).clone()
        }
    };
    describe(catalog);
    Ok(handle)
}

fn describe(catalog: &[Metric]) {
    for m in catalog {
        match m.kind {
            Kind::Counter => metrics::describe_counter!(m.name, m.help),
            Kind::Gauge => metrics::describe_gauge!(m.name, m.help),
            Kind::Histogram => metrics::describe_histogram!(m.name, m.help),
        }
    }
}

/// The metrics the Rust files under `src` record (`counter!`, `gauge!`,
/// `histogram!` with a literal name) that `catalog` lacks or lists as
/// another kind.
pub fn undescribed(src: &Path, catalog: &[Metric]) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|x| x == "rs") {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                found.extend(recorded(&text));
            }
        }
    }
    found
        .into_iter()
        .filter(|(kind, name)| !catalog.iter().any(|m| m.name == name && m.kind == *kind))
        .map(|(kind, name)| format!("{} {name}", kind.as_str()))
        .collect()
}

/// `(kind, name)` of each metric macro with a literal name in `text`.
fn recorded(text: &str) -> Vec<(Kind, String)> {
    let mut out = Vec::new();
    for (kind, mac) in [
        (Kind::Counter, "counter!("),
        (Kind::Gauge, "gauge!("),
        (Kind::Histogram, "histogram!("),
    ] {
        for (at, _) in text.match_indices(mac) {
            // `describe_counter!(` and the like are not recordings.
            if text[..at].ends_with('_') {
                continue;
            }
            let rest = text[at + mac.len()..].trim_start();
            if let Some(lit) = rest.strip_prefix('"') {
                if let Some(end) = lit.find('"') {
                    out.push((kind, lit[..end].to_owned()));
                }
            }
        }
    }
    out
}

/// The catalog as a Markdown table (what `docs/metrics.md` holds for it).
pub fn markdown(catalog: &[Metric]) -> String {
    let mut out = String::from("| metric | type | labels | meaning |\n|---|---|---|---|\n");
    for m in catalog {
        let labels = m
            .labels
            .iter()
            .map(|l| format!("`{l}`"))
            .collect::<Vec<_>>()
            .join(", ");
        out.push_str(&format!(
            "| `{}` | {} | {} | {} |\n",
            m.name,
            m.kind.as_str(),
            labels,
            m.help
        ));
    }
    out
}

/// Fails (with the table to paste) when `doc` does not hold `catalog`'s
/// table as it is.
pub fn assert_documented(doc: &Path, catalog: &[Metric]) {
    let table = markdown(catalog);
    let text = std::fs::read_to_string(doc).unwrap_or_default();
    assert!(
        text.contains(&table),
        "{} does not list these metrics as they are; the table should read:\n\n{table}",
        doc.display()
    );
}

/// The check each crate's tests run on its catalog: the Rust files under
/// `<crate_dir>/src` record nothing the catalog lacks, and
/// `<crate_dir>/../docs/metrics.md` lists the catalog as it is.
pub fn check_catalog(crate_dir: &Path, catalog: &[Metric]) {
    let missing = undescribed(&crate_dir.join("src"), catalog);
    assert!(missing.is_empty(), "not in the catalog: {missing:?}");
    assert_documented(&crate_dir.join("../docs/metrics.md"), catalog);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recordings_are_found_and_descriptions_skipped() {
        let text = r#"
            metrics::counter!("a_total", "k" => "v").increment(1);
            metrics::gauge!(
                "b"
            ).set(1.0);
            metrics::describe_counter!("c_total", "not a recording");
            histogram!("d_seconds").record(0.1);
        "#;
        assert_eq!(
            recorded(text),
            vec![
                (Kind::Counter, "a_total".to_owned()),
                (Kind::Gauge, "b".to_owned()),
                (Kind::Histogram, "d_seconds".to_owned()),
            ]
        );
    }

    #[test]
    fn markdown_lists_each_metric() {
        let t = markdown(&[Metric::counter("x_total", &["result"], "Things.")]);
        assert!(t.contains("| `x_total` | counter | `result` | Things. |"));
    }
}
