//! Human-readable output: aligned tables, sizes and durations.

/// Column alignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Align {
    Left,
    Right,
}

/// An aligned table with a header row; columns separated by two spaces, no
/// trailing blanks.
pub(crate) fn table(headers: &[&str], aligns: &[Align], rows: &[Vec<String>]) -> String {
    let cols = headers.len();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate().take(cols) {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header_row: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header_row).chain(rows) {
        let mut line = String::new();
        for (i, width) in widths.iter().enumerate() {
            let cell = row.get(i).map(String::as_str).unwrap_or("");
            let pad = width - cell.chars().count();
            if i > 0 {
                line.push_str("  ");
            }
            match aligns.get(i).copied().unwrap_or(Align::Left) {
                Align::Left => {
                    line.push_str(cell);
                    line.push_str(&" ".repeat(pad));
                }
                Align::Right => {
                    line.push_str(&" ".repeat(pad));
                    line.push_str(cell);
                }
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `key: value` lines with the values aligned.
pub(crate) fn key_values(rows: &[(&str, String)]) -> String {
    let width = rows
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for (k, v) in rows {
        let pad = width - k.chars().count();
        out.push_str(format!("{k}:{}  {v}", " ".repeat(pad)).trim_end());
        out.push('\n');
    }
    out
}

/// Bytes in binary units with one decimal: `512 B`, `1.5 KiB`, `1.2 GiB`.
pub(crate) fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1023.95 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// A duration in seconds as `3d 4h 5m`, `4h 5m`, `5m 6s` or `6s`.
pub(crate) fn human_duration(seconds: f64) -> String {
    let s = seconds.max(0.0) as u64;
    let (d, h, m, s) = (s / 86400, s / 3600 % 24, s / 60 % 60, s % 60);
    if d > 0 {
        format!("{d}d {h}h {m}m")
    } else if h > 0 {
        format!("{h}h {m}m")
    } else if m > 0 {
        format!("{m}m {s}s")
    } else {
        format!("{s}s")
    }
}

/// `used` as a whole percentage of `total` (`-` when total is 0), rounded up
/// like df.
pub(crate) fn percent(used: u64, total: u64) -> String {
    if total == 0 {
        "-".to_owned()
    } else {
        let pct = (u128::from(used) * 100).div_ceil(u128::from(total));
        format!("{pct}%")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_human() {
        let cases = [
            (0, "0 B"),
            (1023, "1023 B"),
            (1024, "1.0 KiB"),
            (1536, "1.5 KiB"),
            (1024 * 1024 - 1, "1.0 MiB"),
            (1_288_490_189, "1.2 GiB"),
            (u64::MAX, "16.0 EiB"),
        ];
        for (bytes, want) in cases {
            assert_eq!(human_size(bytes), want, "{bytes}");
        }
    }

    #[test]
    fn durations_are_human() {
        let cases = [
            (0.4, "0s"),
            (59.0, "59s"),
            (61.0, "1m 1s"),
            (3_700.0, "1h 1m"),
            (90_061.0, "1d 1h 1m"),
        ];
        for (secs, want) in cases {
            assert_eq!(human_duration(secs), want);
        }
    }

    #[test]
    fn percentages_round_up_like_df() {
        assert_eq!(percent(0, 0), "-");
        assert_eq!(percent(1, 3), "34%");
        assert_eq!(percent(5, 5), "100%");
        assert_eq!(percent(u64::MAX, u64::MAX), "100%");
    }

    #[test]
    fn tables_align_columns_without_trailing_blanks() {
        let t = table(
            &["NAME", "SIZE", "NOTE"],
            &[Align::Left, Align::Right, Align::Left],
            &[
                vec!["a".into(), "1.0 KiB".into(), "".into()],
                vec!["longer".into(), "5 B".into(), "é".into()],
            ],
        );
        let want = "NAME       SIZE  NOTE\n\
                    a       1.0 KiB\n\
                    longer      5 B  é\n";
        assert_eq!(t, want);
    }

    #[test]
    fn key_values_align() {
        let t = key_values(&[
            ("Host", "vm1".into()),
            ("Kernel", "6.1".into()),
            ("Empty", "".into()),
        ]);
        assert_eq!(t, "Host:    vm1\nKernel:  6.1\nEmpty:\n");
    }
}
