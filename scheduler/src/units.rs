//! Human units for sizes and durations: `12GiB`, `512MiB`, `20GB`, plain bytes;
//! `500ms`, `30s`, `6h`. Shared by the CLI (flags, YAML) and the coordinator.

use thiserror::Error;

/// Why a size or duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum UnitError {
    /// Nothing to parse.
    #[error("empty value")]
    Empty,
    /// A leading minus sign.
    #[error("must not be negative (got {0:?})")]
    Negative(String),
    /// Not a number followed by a known suffix.
    #[error("cannot parse {value:?}: expected {expected}")]
    Malformed {
        /// The offending text.
        value: String,
        /// What a valid value looks like.
        expected: &'static str,
    },
    /// Larger than fits in 64 bits.
    #[error("{0:?} is too large")]
    Overflow(String),
}

const SIZE_EXPECTED: &str = "a byte count or a number with KiB/MiB/GiB/TiB/KB/MB/GB/TB";
const DURATION_EXPECTED: &str = "a number with ms/s/m/h/d, e.g. 500ms, 30s, 6h";

/// Parses a size such as `12GiB`, `1.5GiB`, `512MB` or `1048576` into bytes.
pub fn parse_bytes(text: &str) -> Result<u64, UnitError> {
    let table: &[(&str, f64)] = &[
        ("KiB", 1024.0),
        ("MiB", 1024.0 * 1024.0),
        ("GiB", 1024.0 * 1024.0 * 1024.0),
        ("TiB", 1024.0 * 1024.0 * 1024.0 * 1024.0),
        ("KB", 1e3),
        ("MB", 1e6),
        ("GB", 1e9),
        ("TB", 1e12),
        ("Ki", 1024.0),
        ("Mi", 1024.0 * 1024.0),
        ("Gi", 1024.0 * 1024.0 * 1024.0),
        ("Ti", 1024.0 * 1024.0 * 1024.0 * 1024.0),
        ("B", 1.0),
    ];
    parse_scaled(text, table, SIZE_EXPECTED)
}

/// Parses a duration such as `500ms`, `30s`, `5m`, `6h`, `1d` into milliseconds.
/// A plain number is taken as seconds.
pub fn parse_duration_ms(text: &str) -> Result<u64, UnitError> {
    let table: &[(&str, f64)] = &[
        ("ms", 1.0),
        ("s", 1e3),
        ("m", 60e3),
        ("h", 3600e3),
        ("d", 86400e3),
    ];
    let trimmed = text.trim();
    if !trimmed.is_empty() && trimmed.chars().all(|c| c.is_ascii_digit()) {
        return parse_scaled(&format!("{trimmed}s"), table, DURATION_EXPECTED);
    }
    parse_scaled(text, table, DURATION_EXPECTED)
}

fn parse_scaled(
    text: &str,
    table: &[(&str, f64)],
    expected: &'static str,
) -> Result<u64, UnitError> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(UnitError::Empty);
    }
    if trimmed.starts_with('-') {
        return Err(UnitError::Negative(trimmed.to_string()));
    }
    let malformed = || UnitError::Malformed {
        value: trimmed.to_string(),
        expected,
    };
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, suffix) = trimmed.split_at(split);
    let suffix = suffix.trim();
    if number.is_empty() {
        return Err(malformed());
    }
    let scale = if suffix.is_empty() {
        if table.iter().any(|(s, _)| *s == "B") {
            1.0
        } else {
            return Err(malformed());
        }
    } else {
        table
            .iter()
            .find(|(s, _)| *s == suffix)
            .map(|(_, f)| *f)
            .ok_or_else(malformed)?
    };
    if !number.contains('.') {
        let whole: u64 = number
            .parse()
            .map_err(|_| UnitError::Overflow(trimmed.to_string()))?;
        // Integral scales stay exact in integer arithmetic.
        return whole
            .checked_mul(scale as u64)
            .ok_or_else(|| UnitError::Overflow(trimmed.to_string()));
    }
    let value: f64 = number.parse().map_err(|_| malformed())?;
    let scaled = value * scale;
    if !scaled.is_finite() || scaled >= u64::MAX as f64 {
        return Err(UnitError::Overflow(trimmed.to_string()));
    }
    Ok(scaled as u64)
}

/// Formats bytes for people: `80GiB`, `1.5GiB`, `512MiB`, `100B`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (suffix, scale) in UNITS {
        if bytes >= scale {
            let whole = bytes / scale;
            let tenths = (bytes % scale) * 10 / scale;
            return if tenths == 0 {
                format!("{whole}{suffix}")
            } else {
                format!("{whole}.{tenths}{suffix}")
            };
        }
    }
    format!("{bytes}B")
}

/// Formats milliseconds as the largest exact unit: `30s`, `6h`, `1500ms`.
pub fn format_duration_ms(ms: u64) -> String {
    for (suffix, scale) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
    ] {
        if ms >= scale && ms.is_multiple_of(scale) {
            return format!("{}{suffix}", ms / scale);
        }
    }
    format!("{ms}ms")
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn sizes() {
        let cases: &[(&str, Result<u64, ()>)] = &[
            ("12GiB", Ok(12 * GIB)),
            ("12Gi", Ok(12 * GIB)),
            ("1.5GiB", Ok(GIB + GIB / 2)),
            ("512MiB", Ok(512 << 20)),
            ("20GB", Ok(20_000_000_000)),
            ("1048576", Ok(1_048_576)),
            (" 8 GiB ", Ok(8 * GIB)),
            ("-1", Err(())),
            ("-1GiB", Err(())),
            ("", Err(())),
            ("GiB", Err(())),
            ("12 parsecs", Err(())),
            ("99999999999999999999TiB", Err(())),
            ("20000000TiB", Err(())),
        ];
        for (input, expect) in cases {
            assert_eq!(
                parse_bytes(input).map_err(|_| ()),
                *expect,
                "input {input:?}"
            );
        }
    }

    #[test]
    fn durations() {
        let cases: &[(&str, Result<u64, ()>)] = &[
            ("500ms", Ok(500)),
            ("30s", Ok(30_000)),
            ("30", Ok(30_000)),
            ("5m", Ok(300_000)),
            ("6h", Ok(21_600_000)),
            ("1.5s", Ok(1500)),
            ("-3s", Err(())),
            ("3 fortnights", Err(())),
        ];
        for (input, expect) in cases {
            assert_eq!(
                parse_duration_ms(input).map_err(|_| ()),
                *expect,
                "input {input:?}"
            );
        }
    }

    #[test]
    fn formatting_round_trips() {
        for bytes in [0, 100, 1 << 20, 80 * GIB, GIB + GIB / 2] {
            let text = format_bytes(bytes);
            let back = parse_bytes(&text).expect("formatted sizes parse");
            assert!(
                back <= bytes && bytes - back < bytes / 10 + 1,
                "{bytes} -> {text} -> {back}"
            );
        }
        assert_eq!(format_duration_ms(21_600_000), "6h");
        assert_eq!(format_duration_ms(1500), "1500ms");
    }
}
