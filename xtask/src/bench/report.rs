//! Figures, the table on stdout, and the JSON under `target/bench/`.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use serde::Serialize;
use serde_json::Value;

/// Which side of a target is good.
#[derive(Clone, Copy, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Bound {
    AtMost,
    AtLeast,
}

/// A target to report against (never asserted).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Target {
    pub bound: Bound,
    pub value: f64,
    /// The target applies to the ratio against the baseline, not to the
    /// median itself.
    pub on_ratio: bool,
}

impl Target {
    pub const fn ratio_at_most(value: f64) -> Self {
        Self { bound: Bound::AtMost, value, on_ratio: true }
    }
    pub const fn ratio_at_least(value: f64) -> Self {
        Self { bound: Bound::AtLeast, value, on_ratio: true }
    }
    pub const fn at_most(value: f64) -> Self {
        Self { bound: Bound::AtMost, value, on_ratio: false }
    }
    pub const fn at_least(value: f64) -> Self {
        Self { bound: Bound::AtLeast, value, on_ratio: false }
    }

    fn met(&self, figure: f64) -> bool {
        match self.bound {
            Bound::AtMost => figure <= self.value,
            Bound::AtLeast => figure >= self.value,
        }
    }

    fn label(&self, unit: &str) -> String {
        let op = match self.bound {
            Bound::AtMost => "≤",
            Bound::AtLeast => "≥",
        };
        if self.on_ratio {
            format!("{op} {}×", num(self.value))
        } else {
            format!("{op} {} {unit}", num(self.value))
        }
    }
}

/// One figure: the samples of its runs, summarised.
#[derive(Debug, Serialize)]
pub struct Row {
    pub case: String,
    pub unit: &'static str,
    /// One value per run.
    pub samples: Vec<f64>,
    pub min: f64,
    pub median: f64,
    pub max: f64,
    /// The baseline the ratio is taken against, measured in the same run.
    pub baseline: Option<String>,
    /// Median of this row over median of the baseline.
    pub ratio: Option<f64>,
    pub target: Option<Target>,
    pub pass: Option<bool>,
    pub note: Option<String>,
    /// Raw details: counters, sizes, per-run extras.
    pub extra: serde_json::Map<String, Value>,
}

impl Row {
    pub fn new(case: impl Into<String>, unit: &'static str, samples: Vec<f64>) -> Self {
        let (min, median, max) = summary(&samples);
        Row {
            case: case.into(),
            unit,
            samples,
            min,
            median,
            max,
            baseline: None,
            ratio: None,
            target: None,
            pass: None,
            note: None,
            extra: serde_json::Map::new(),
        }
    }

    /// Ratio of this row's median to `baseline`'s.
    pub fn vs(mut self, name: &str, baseline_median: f64) -> Self {
        self.baseline = Some(name.to_owned());
        self.ratio = (baseline_median > 0.0).then(|| self.median / baseline_median);
        self.refresh_pass();
        self
    }

    pub fn target(mut self, target: Target) -> Self {
        self.target = Some(target);
        self.refresh_pass();
        self
    }

    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.note = Some(note.into());
        self
    }

    pub fn extra(mut self, key: &str, value: impl Serialize) -> Self {
        self.extra.insert(key.to_owned(), serde_json::to_value(value).unwrap_or(Value::Null));
        self
    }

    fn refresh_pass(&mut self) {
        self.pass = self.target.and_then(|t| {
            let figure = if t.on_ratio { self.ratio? } else { self.median };
            Some(t.met(figure))
        });
    }
}

/// (min, median, max); NaN for no samples.
pub fn summary(samples: &[f64]) -> (f64, f64, f64) {
    if samples.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let median = if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 };
    (s[0], median, s[n - 1])
}

pub fn median(samples: &[f64]) -> f64 {
    summary(samples).1
}

#[derive(Debug, Serialize)]
pub struct Section {
    pub title: String,
    /// How the figures were measured, in a sentence or two.
    pub method: String,
    pub rows: Vec<Row>,
    /// Why the section has no figures, if it could not run.
    pub skipped: Option<String>,
}

impl Section {
    pub fn new(title: &str, method: &str) -> Self {
        Section { title: title.to_owned(), method: method.to_owned(), rows: Vec::new(), skipped: None }
    }

    pub fn push(&mut self, row: Row) {
        self.rows.push(row);
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub tool: &'static str,
    pub version: u32,
    /// Seconds since the epoch, and the same as UTC text.
    pub unix_time: u64,
    pub utc: String,
    pub smoke: bool,
    pub host: Value,
    pub method: &'static str,
    pub sections: Vec<Section>,
    pub seconds: f64,
}

impl Report {
    pub fn new(smoke: bool, method: &'static str) -> Self {
        let unix_time = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        Report {
            tool: "cargo xtask bench",
            version: 1,
            unix_time,
            utc: utc(unix_time),
            smoke,
            host: host(),
            method,
            sections: Vec::new(),
            seconds: 0.0,
        }
    }

    /// The table, grouped by section.
    pub fn table(&self) -> String {
        let mut out = String::new();
        for s in &self.sections {
            let _ = writeln!(out, "\n== {}", s.title);
            for line in wrap(&s.method, 100) {
                let _ = writeln!(out, "   {line}");
            }
            if let Some(why) = &s.skipped {
                let _ = writeln!(out, "   SKIPPED: {why}");
            }
            if s.rows.is_empty() {
                continue;
            }
            let cells: Vec<[String; 9]> = s
                .rows
                .iter()
                .map(|r| {
                    let fig = |x: f64| if r.unit == "ratio" { format!("{x:.4}") } else { num(x) };
                    [
                        r.case.clone(),
                        fig(r.min),
                        fig(r.median),
                        fig(r.max),
                        r.unit.to_owned(),
                        r.ratio.map(|x| format!("{}×", num(x))).unwrap_or_default(),
                        r.baseline.clone().unwrap_or_default(),
                        r.target.map(|t| t.label(r.unit)).unwrap_or_default(),
                        match r.pass {
                            Some(true) => "pass".into(),
                            Some(false) => "MISS".into(),
                            None => String::new(),
                        },
                    ]
                })
                .collect();
            let header = ["case", "min", "median", "max", "unit", "ratio", "vs", "target", ""];
            let mut width = header.map(|h| h.chars().count());
            for row in &cells {
                for (w, c) in width.iter_mut().zip(row) {
                    *w = (*w).max(c.chars().count());
                }
            }
            let line = |cols: [&str; 9]| {
                let mut l = String::from("   ");
                for (i, (c, w)) in cols.iter().zip(width).enumerate() {
                    let pad = w.saturating_sub(c.chars().count());
                    // Numbers right-aligned, text left-aligned.
                    if (1..=3).contains(&i) || i == 5 {
                        l.push_str(&" ".repeat(pad));
                        l.push_str(c);
                    } else {
                        l.push_str(c);
                        l.push_str(&" ".repeat(pad));
                    }
                    l.push_str("  ");
                }
                l.trim_end().to_owned()
            };
            let _ = writeln!(out, "{}", line(header));
            for (row, r) in cells.iter().zip(&s.rows) {
                let _ = writeln!(out, "{}", line(row.each_ref().map(String::as_str)));
                if let Some(note) = &r.note {
                    for l in wrap(note, 96) {
                        let _ = writeln!(out, "       {l}");
                    }
                }
            }
        }
        out
    }

    /// Writes `bench-<utc>.json` and `latest.json` under `dir`; returns the first.
    pub fn write_json(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let text = serde_json::to_string_pretty(self)?;
        let stamp: String = self.utc.chars().filter(|c| c.is_ascii_alphanumeric()).collect();
        let path = dir.join(format!("bench-{stamp}.json"));
        std::fs::write(&path, &text).with_context(|| format!("cannot write {}", path.display()))?;
        let latest = dir.join("latest.json");
        std::fs::write(&latest, &text).with_context(|| format!("cannot write {}", latest.display()))?;
        Ok(path)
    }
}

/// A figure with three significant digits or so, no exponent.
pub fn num(x: f64) -> String {
    if !x.is_finite() {
        return "-".into();
    }
    let a = x.abs();
    if a >= 1000.0 || x == x.trunc() && a >= 10.0 {
        format!("{x:.0}")
    } else if a >= 100.0 {
        format!("{x:.1}")
    } else if a >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

/// "2025-01-31T12:34:56Z" for seconds since the epoch.
pub fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

fn host() -> Value {
    let read = |p: &str| std::fs::read_to_string(p).map(|s| s.trim().to_owned()).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned()))
        .unwrap_or_default();
    serde_json::json!({
        "kernel": read("/proc/sys/kernel/osrelease"),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": cpu,
        "possible_cpus": read("/sys/devices/system/cpu/possible"),
        "clocksource": read("/sys/devices/system/clocksource/clocksource0/current_clocksource"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_and_dates() {
        assert_eq!(summary(&[3.0, 1.0, 2.0]), (1.0, 2.0, 3.0));
        assert_eq!(summary(&[4.0, 1.0, 2.0, 3.0]), (1.0, 2.5, 4.0));
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn targets_judge_the_ratio_or_the_median() {
        let r = Row::new("x", "ns", vec![10.0, 20.0, 30.0]).vs("b", 10.0).target(Target::ratio_at_most(2.5));
        assert_eq!((r.ratio, r.pass), (Some(2.0), Some(true)));
        let r = Row::new("x", "ms", vec![3.0; 5]).target(Target::at_most(2.0));
        assert_eq!(r.pass, Some(false));
    }
}
