//! Results: a few lines of text, or one flat JSON object (hand-formatted; keys are fixed ASCII).

use std::fmt::Write as _;

use crate::load::Measured;

/// A scenario-specific value, written as a JSON number or string.
pub enum Extra {
    Int(u64),
    Float(f64),
    Text(String),
}

pub struct Report {
    pub scenario: &'static str,
    pub concurrency: usize,
    pub connections: usize,
    pub measured: Measured,
    /// Extra facts, in order (cold-start unwraps, floor sizes, ...).
    pub extras: Vec<(&'static str, Extra)>,
    /// Whether calls per second mean anything (not for startup: its samples run one after
    /// another, each including a process start).
    pub throughput: bool,
}

impl Report {
    pub fn new(scenario: &'static str, concurrency: usize, connections: usize, measured: Measured) -> Self {
        Self {
            scenario,
            concurrency,
            connections,
            measured,
            extras: Vec::new(),
            throughput: true,
        }
    }

    /// A report of samples that are not calls under load: no throughput in text or JSON.
    pub fn without_throughput(mut self) -> Self {
        self.throughput = false;
        self
    }

    pub fn extra(mut self, key: &'static str, value: Extra) -> Self {
        self.extras.push((key, value));
        self
    }

    pub fn ops(&self) -> u64 {
        self.measured.hist.len()
    }

    pub fn errors_total(&self) -> u64 {
        self.measured.errors.values().sum()
    }

    /// Successful calls per second of the measured window.
    pub fn ops_per_sec(&self) -> f64 {
        let secs = self.measured.elapsed.as_secs_f64();
        if secs > 0.0 {
            (self.ops() - self.errors_total()) as f64 / secs
        } else {
            0.0
        }
    }

    fn us(&self, quantile: f64) -> f64 {
        if self.ops() == 0 {
            return 0.0;
        }
        self.measured.hist.value_at_quantile(quantile) as f64 / 1000.0
    }

    fn latencies(&self) -> [(&'static str, f64); 6] {
        let h = &self.measured.hist;
        let (mean, max) = if h.is_empty() {
            (0.0, 0.0)
        } else {
            (h.mean() / 1000.0, h.max() as f64 / 1000.0)
        };
        [
            ("p50", self.us(0.50)),
            ("p90", self.us(0.90)),
            ("p99", self.us(0.99)),
            ("p999", self.us(0.999)),
            ("max", max),
            ("mean", mean),
        ]
    }

    pub fn text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{}: {} workers over {} connection(s), {:.3} s measured",
            self.scenario,
            self.concurrency,
            self.connections,
            self.measured.elapsed.as_secs_f64()
        );
        let _ = write!(s, "  calls {}  errors {}", self.ops(), self.errors_total());
        if self.throughput {
            let _ = write!(s, "  throughput {:.0} ops/s", self.ops_per_sec());
        }
        s.push('\n');
        let lat: Vec<String> = self.latencies().iter().map(|(k, v)| format!("{k} {v:.1}")).collect();
        let _ = writeln!(s, "  latency us: {}", lat.join("  "));
        if !self.measured.errors.is_empty() {
            let errs: Vec<String> = self.measured.errors.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let _ = writeln!(s, "  errors by code: {}", errs.join(" "));
        }
        for (k, v) in &self.extras {
            let _ = writeln!(s, "  {k}: {}", v.text());
        }
        s
    }

    pub fn json(&self) -> String {
        let mut s = String::from("{");
        let _ = write!(
            s,
            "\"scenario\":\"{}\",\"concurrency\":{},\"connections\":{},\"ops\":{},\"errors_total\":{},\"elapsed_s\":{:.6}",
            self.scenario,
            self.concurrency,
            self.connections,
            self.ops(),
            self.errors_total(),
            self.measured.elapsed.as_secs_f64(),
        );
        if self.throughput {
            let _ = write!(s, ",\"ops_per_sec\":{:.1}", self.ops_per_sec());
        }
        for (k, v) in self.latencies() {
            let _ = write!(s, ",\"{k}_us\":{v:.1}");
        }
        s.push_str(",\"errors\":{");
        let errs: Vec<String> = self
            .measured
            .errors
            .iter()
            .map(|(k, v)| format!("{}:{v}", json_string(k)))
            .collect();
        s.push_str(&errs.join(","));
        s.push('}');
        for (k, v) in &self.extras {
            let _ = write!(s, ",\"{k}\":{}", v.json());
        }
        s.push('}');
        s
    }
}

impl Extra {
    fn text(&self) -> String {
        match self {
            Extra::Int(n) => n.to_string(),
            Extra::Float(f) => format!("{f:.3}"),
            Extra::Text(t) => t.clone(),
        }
    }

    fn json(&self) -> String {
        match self {
            Extra::Int(n) => n.to_string(),
            Extra::Float(f) if f.is_finite() => format!("{f:.3}"),
            Extra::Float(_) => "null".into(),
            Extra::Text(t) => json_string(t),
        }
    }
}

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
