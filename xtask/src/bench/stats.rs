//! Medians, spreads and the result table.

use serde_json::{json, Value};

/// Median and spread of repeated measurements.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Spread {
    pub(crate) median: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
    pub(crate) p99: f64,
    pub(crate) n: usize,
}

impl Spread {
    /// Spread of `xs` (all zero if empty).
    pub(crate) fn of(xs: &[f64]) -> Spread {
        let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            return Spread::one(0.0);
        }
        let pick = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        Spread {
            median: pick(0.5),
            min: v[0],
            max: v[v.len() - 1],
            p99: pick(0.99),
            n: v.len(),
        }
    }

    /// A single measurement.
    pub(crate) fn one(x: f64) -> Spread {
        Spread {
            median: x,
            min: x,
            max: x,
            p99: x,
            n: 1,
        }
    }

    /// Every value times `k`.
    pub(crate) fn scale(self, k: f64) -> Spread {
        Spread {
            median: self.median * k,
            min: self.min * k,
            max: self.max * k,
            p99: self.p99 * k,
            n: self.n,
        }
    }

    fn show(&self) -> String {
        if self.n <= 1 {
            fmt(self.median)
        } else {
            format!(
                "{} [{}..{}]",
                fmt(self.median),
                fmt(self.min),
                fmt(self.max)
            )
        }
    }

    fn to_json(self) -> Value {
        json!({"median": self.median, "min": self.min, "max": self.max, "p99": self.p99, "n": self.n})
    }
}

fn fmt(x: f64) -> String {
    if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

/// One row of the table.
#[derive(Debug, Clone)]
pub(crate) struct Figure {
    name: String,
    ours: Spread,
    theirs: Option<Spread>,
    target: String,
    met: bool,
    note: Option<String>,
}

impl Figure {
    /// A row; `met` gets the ratio ours/theirs (median), or NaN without theirs.
    pub(crate) fn new(
        name: &str,
        ours: Spread,
        theirs: Option<Spread>,
        target: &str,
        met: impl FnOnce(f64) -> bool,
    ) -> Figure {
        let r = ratio(ours, theirs);
        Figure {
            name: name.to_owned(),
            ours,
            theirs,
            target: target.to_owned(),
            met: met(r),
            note: None,
        }
    }

    /// Adds a note shown after the row.
    pub(crate) fn with_note(mut self, note: String) -> Figure {
        self.note = Some(note);
        self
    }

    pub(crate) fn to_json(&self) -> Value {
        let r = ratio(self.ours, self.theirs);
        json!({
            "figure": self.name,
            "ours": self.ours.to_json(),
            "qemu_ga": self.theirs.map(Spread::to_json),
            "ratio": if r.is_finite() { json!(r) } else { Value::Null },
            "target": self.target,
            "met": self.met,
            "note": self.note,
        })
    }
}

fn ratio(ours: Spread, theirs: Option<Spread>) -> f64 {
    match theirs {
        Some(t) if t.median != 0.0 => ours.median / t.median,
        _ => f64::NAN,
    }
}

/// The table as Markdown (median [min..max]).
pub(crate) fn table(figures: &[Figure]) -> String {
    let mut s = String::from(
        "| figure | ours | qemu-ga | ratio | target | met? |\n|---|---|---|---|---|---|\n",
    );
    for f in figures {
        let r = ratio(f.ours, f.theirs);
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            f.name,
            f.ours.show(),
            f.theirs.map(|t| t.show()).unwrap_or_else(|| "-".into()),
            if r.is_finite() {
                format!("{r:.2}x")
            } else {
                "-".into()
            },
            f.target,
            match (&f.note, f.met) {
                (Some(n), true) => format!("yes ({n})"),
                (Some(n), false) => format!("NO ({n})"),
                (None, true) => "yes".into(),
                (None, false) => "NO".into(),
            }
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_and_ratios() {
        for (xs, median, min, max) in [
            (vec![3.0, 1.0, 2.0], 2.0, 1.0, 3.0),
            (vec![5.0], 5.0, 5.0, 5.0),
            (vec![], 0.0, 0.0, 0.0),
        ] {
            let s = Spread::of(&xs);
            assert_eq!((s.median, s.min, s.max), (median, min, max), "{xs:?}");
        }
        let f = Figure::new(
            "x",
            Spread::one(1.0),
            Some(Spread::one(4.0)),
            "<= 0.5x",
            |r| r <= 0.5,
        );
        assert!(f.met);
        assert!(table(&[f]).contains("0.25x"));
    }
}
