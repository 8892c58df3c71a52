//! Turns the raw figures `run.sh` collected into `RESULTS.md`: median of the repeats with
//! the spread (min–max), the ratio against nginx, and whether chatgate met issue 6's bar.
//!
//! Input: `raw.tsv` with `target<TAB>metric<TAB>value` per measurement (one line per repeat;
//! a value `NA:<reason>` marks a figure that could not be taken) and `meta.tsv` with
//! `key<TAB>value` lines describing the machine and versions.
//!
//! ```text
//! bench-report --raw raw.tsv --meta meta.tsv > bench/RESULTS.md
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use chatgate_bench::median;
use clap::Parser;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    raw: PathBuf,
    #[arg(long)]
    meta: PathBuf,
}

/// Columns, in order: id used by `run.sh`, heading.
const TARGETS: &[(&str, &str)] = &[
    ("direct", "direct"),
    ("chatgate", "chatgate"),
    ("chatgate-warn", "chatgate `RUST_LOG=warn`"),
    ("chatgate-before", "chatgate before (`BEFORE_BIN`)"),
    ("hyper-floor", "hyper-floor (no product work)"),
    ("nginx", "nginx"),
    ("haproxy", "HAProxy"),
];

struct Metric {
    id: &'static str,
    label: &'static str,
    decimals: usize,
}

const METRICS: &[Metric] = &[
    metric("get2k_rps", "GET 2 KiB, 64 conns: req/s", 0),
    metric("get2k_p50_ms", "GET 2 KiB: p50 latency (ms)", 3),
    metric("get2k_p99_ms", "GET 2 KiB: p99 latency (ms)", 3),
    metric("get2k_cpu_us", "GET 2 KiB: proxy CPU per request (µs)", 2),
    metric("get2k_cpu_pct", "GET 2 KiB: proxy CPU use (% of a core)", 0),
    metric("big_rps", "GET 64 KiB, 16 conns: req/s", 0),
    metric("big_mibs", "GET 64 KiB: body MiB/s", 0),
    metric("big_p99_ms", "GET 64 KiB: p99 latency (ms)", 3),
    metric("big_cpu_us", "GET 64 KiB: proxy CPU per request (µs)", 2),
    metric("ws_mps", "WS echo 128 B, 64 conns: msg/s", 0),
    metric("ws_p50_us", "WS echo: p50 round trip (µs)", 0),
    metric("ws_p99_us", "WS echo: p99 round trip (µs)", 0),
    metric("ws_cpu_us", "WS echo: proxy CPU per message (µs)", 2),
    metric(
        "idle_kib",
        "5,000 idle WS: proxy RSS per connection (KiB)",
        2,
    ),
    metric(
        "noise_pct",
        "Other processes on the proxy CPU during the load tests (%)",
        0,
    ),
    metric("startup_ms", "Start-up to first served request (ms)", 1),
    metric("binary_mib", "Binary size (MiB)", 2),
];

const fn metric(id: &'static str, label: &'static str, decimals: usize) -> Metric {
    Metric {
        id,
        label,
        decimals,
    }
}

/// Issue 6's bar for chatgate, each against a reference measured in the same run.
enum Bar {
    /// chatgate ≥ factor × reference.
    Ratio(&'static str, f64),
    /// chatgate ≤ reference.
    NoWorse(&'static str),
    /// chatgate ≤ a fixed value.
    Limit(f64),
}

fn bar_for(metric: &str) -> Option<Bar> {
    Some(match metric {
        "get2k_rps" => Bar::Ratio("nginx", 1.2),
        "get2k_p99_ms" => Bar::NoWorse("nginx"),
        "big_rps" => Bar::Ratio("haproxy", 1.0),
        "ws_mps" => Bar::Ratio("haproxy", 1.0),
        "ws_p99_us" => Bar::NoWorse("nginx"),
        "idle_kib" => Bar::Limit(8.0),
        "get2k_cpu_us" | "big_cpu_us" | "ws_cpu_us" => Bar::NoWorse("nginx"),
        _ => return None,
    })
}

fn describe(bar: &Bar) -> String {
    match bar {
        Bar::Ratio(reference, factor) if *factor == 1.0 => format!("≥ {}", heading(reference)),
        Bar::Ratio(reference, factor) => format!("≥ {factor}× {}", heading(reference)),
        Bar::NoWorse(reference) => format!("≤ {}", heading(reference)),
        Bar::Limit(limit) => format!("≤ {limit}"),
    }
}

fn heading(target: &str) -> &str {
    TARGETS
        .iter()
        .find(|(id, _)| *id == target)
        .map_or(target, |(_, heading)| heading)
}

/// The figures of one target for one metric, across repeats.
#[derive(Default)]
struct Samples {
    values: Vec<f64>,
    missing: Option<String>,
}

impl Samples {
    fn median(&self) -> Option<f64> {
        median(&self.values)
    }
}

type Table = BTreeMap<(String, String), Samples>;

fn main() -> ExitCode {
    let args = Args::parse();
    let raw = match std::fs::read_to_string(&args.raw) {
        Ok(raw) => raw,
        Err(err) => {
            eprintln!("bench-report: {}: {err}", args.raw.display());
            return ExitCode::FAILURE;
        }
    };
    let meta = std::fs::read_to_string(&args.meta).unwrap_or_default();
    print!("{}", render(&parse_raw(&raw), &parse_meta(&meta)));
    ExitCode::SUCCESS
}

fn parse_raw(raw: &str) -> Table {
    let mut table = Table::new();
    for line in raw.lines() {
        let mut fields = line.splitn(3, '\t');
        let (Some(target), Some(metric), Some(value)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let samples = table
            .entry((target.to_owned(), metric.to_owned()))
            .or_default();
        match value.strip_prefix("NA:") {
            Some(reason) => samples.missing = Some(reason.to_owned()),
            None => {
                if let Ok(number) = value.trim().parse::<f64>() {
                    samples.values.push(number);
                }
            }
        }
    }
    table
}

fn parse_meta(meta: &str) -> Vec<(String, String)> {
    meta.lines()
        .filter_map(|line| line.split_once('\t'))
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .collect()
}

fn render(table: &Table, meta: &[(String, String)]) -> String {
    let mut out = String::new();
    let meta_value = |key: &str| {
        meta.iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .unwrap_or("?")
    };
    let _ = writeln!(out, "# chatgate benchmark results\n");
    let _ = writeln!(
        out,
        "Generated by `bench/run.sh` on {}. Each figure: median of {} repeats, spread (min–max) \
         in parentheses; `×` is the ratio to nginx's median in the same run. Regenerate with \
         `bench/run.sh`; see `bench/NOTES.md` for method and profiling notes.\n",
        meta_value("date"),
        meta_value("repeats"),
    );
    for (key, value) in meta {
        if key == "date" || key == "repeats" {
            continue;
        }
        let _ = writeln!(out, "- **{key}**: {value}");
    }
    let _ = writeln!(out);

    let present: Vec<&(&str, &str)> = TARGETS
        .iter()
        .filter(|(id, _)| table.keys().any(|(target, _)| target == id))
        .collect();
    let _ = write!(out, "| metric |");
    for (_, name) in &present {
        let _ = write!(out, " {name} |");
    }
    let _ = writeln!(out, " chatgate target | met? |");
    let _ = write!(out, "|---|");
    for _ in &present {
        let _ = write!(out, "---:|");
    }
    let _ = writeln!(out, "---|---|");

    let mut verdicts = Vec::new();
    for metric in METRICS {
        if !present
            .iter()
            .any(|(id, _)| table.contains_key(&(id.to_string(), metric.id.to_owned())))
        {
            continue;
        }
        // A ratio of machine noise to machine noise says nothing.
        let nginx = lookup(table, "nginx", metric.id)
            .and_then(Samples::median)
            .filter(|_| metric.id != "noise_pct");
        let _ = write!(out, "| {} |", metric.label);
        for (id, _) in &present {
            let _ = write!(
                out,
                " {} |",
                cell(lookup(table, id, metric.id), nginx, metric)
            );
        }
        let (target, met) = match bar_for(metric.id) {
            Some(bar) => {
                let met = verdict(table, &bar, metric, "chatgate");
                let warn = verdict(table, &bar, metric, "chatgate-warn");
                let shown = match (met.as_deref(), warn.as_deref()) {
                    (Some(m), Some(w)) if m != w => format!("{m} (warn: {w})"),
                    (Some(m), _) => m.to_owned(),
                    (None, _) => "n/a".to_owned(),
                };
                verdicts.push((metric.label, shown.clone()));
                (describe(&bar), shown)
            }
            None => (String::new(), String::new()),
        };
        let _ = writeln!(out, " {target} | {met} |");
    }
    let _ = writeln!(out);
    let met = verdicts
        .iter()
        .filter(|(_, v)| v.starts_with("yes"))
        .count();
    let _ = writeln!(
        out,
        "**Targets met by chatgate (default logging): {met} of {}.** Lower is better for \
         latency, CPU, memory, start-up and size; higher for throughput.\n",
        verdicts.len()
    );
    if present
        .iter()
        .any(|(id, _)| table.contains_key(&(id.to_string(), "noise_pct".to_owned())))
    {
        let _ = writeln!(
            out,
            "\"Other processes on the proxy CPU\" is the share of the pinned proxy CPU that \
             processes outside the benchmark used during the measured runs (with no proxy, \
             `direct`, they take whatever is idle). Where it is high, throughput and latency \
             are unreliable; CPU per request or message is much less affected and is the \
             figure to trust on a shared machine.\n"
        );
    }
    out
}

fn lookup<'a>(table: &'a Table, target: &str, metric: &str) -> Option<&'a Samples> {
    table.get(&(target.to_owned(), metric.to_owned()))
}

fn cell(samples: Option<&Samples>, nginx: Option<f64>, metric: &Metric) -> String {
    let Some(samples) = samples else {
        return "–".to_owned();
    };
    let Some(mid) = samples.median() else {
        return match &samples.missing {
            Some(reason) => format!("n/a ({reason})"),
            None => "–".to_owned(),
        };
    };
    let d = metric.decimals;
    let mut text = format_number(mid, d);
    if samples.values.len() > 1 {
        let lo = samples.values.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = samples
            .values
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max);
        let _ = write!(text, " ({}–{})", format_number(lo, d), format_number(hi, d));
    }
    if let Some(reference) = nginx.filter(|r| *r > 0.0) {
        let _ = write!(text, " ×{:.2}", mid / reference);
    }
    text
}

/// "yes"/"no" for a target's median against the bar; None when a figure is missing.
fn verdict(table: &Table, bar: &Bar, metric: &Metric, target: &str) -> Option<String> {
    let value = lookup(table, target, metric.id)?.median()?;
    let met = match bar {
        Bar::Ratio(reference, factor) => {
            value >= factor * lookup(table, reference, metric.id)?.median()?
        }
        Bar::NoWorse(reference) => value <= lookup(table, reference, metric.id)?.median()?,
        Bar::Limit(limit) => value <= *limit,
    };
    Some(if met { "yes" } else { "no" }.to_owned())
}

/// Fixed decimals with thousands separators on the integer part.
fn format_number(value: f64, decimals: usize) -> String {
    let text = format!("{:.*}", decimals, value.abs());
    let (int, frac) = text.split_once('.').unwrap_or((&text, ""));
    let mut grouped = String::new();
    for (i, ch) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(ch);
    }
    let sign = if value < 0.0 { "-" } else { "" };
    if frac.is_empty() {
        format!("{sign}{grouped}")
    } else {
        format!("{sign}{grouped}.{frac}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_get_thousands_separators() {
        assert_eq!(format_number(1234567.891, 1), "1,234,567.9");
        assert_eq!(format_number(999.0, 0), "999");
        assert_eq!(format_number(-1000.5, 2), "-1,000.50");
    }

    #[test]
    fn verdict_compares_medians_against_the_reference() {
        let raw = "nginx\tget2k_rps\t100\nnginx\tget2k_rps\t110\nnginx\tget2k_rps\t90\n\
                   chatgate\tget2k_rps\t125\nchatgate\tget2k_rps\t119\nchatgate\tget2k_rps\t130\n\
                   chatgate\tws_mps\tNA:relay not built\n";
        let table = parse_raw(raw);
        let rps = &METRICS[0];
        let bar = bar_for(rps.id).expect("get2k_rps has a bar");
        assert_eq!(
            verdict(&table, &bar, rps, "chatgate").as_deref(),
            Some("yes")
        );
        let ws = METRICS.iter().find(|m| m.id == "ws_mps").expect("ws_mps");
        let ws_bar = bar_for(ws.id).expect("ws_mps has a bar");
        assert_eq!(verdict(&table, &ws_bar, ws, "chatgate"), None);
        assert_eq!(
            cell(lookup(&table, "chatgate", "ws_mps"), None, ws),
            "n/a (relay not built)"
        );
    }
}
