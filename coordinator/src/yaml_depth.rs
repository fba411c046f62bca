//! The nesting depth of a YAML text, estimated by a linear pre-scan before
//! any parser sees it: the YAML parser is quadratic in nesting depth
//! (100,000 levels took it 31 s before failing). Used for every YAML the CLI
//! reads and for YAML bodies of the HTTP API's `POST /v1/jobs`.

/// Deepest YAML nesting accepted in any file the CLI reads (as estimated by
/// [`nesting_depth`]). A pipeline of jobs with batch tiers nests about 7
/// levels; the YAML parser gets slow in the thousands.
pub const MAX_YAML_DEPTH: usize = 64;

/// Refuses `text` when its estimated nesting depth exceeds `max`, before
/// any parser sees it. `source` names the file in the error.
pub fn check_depth(text: &str, max: usize, source: &str) -> Result<(), String> {
    let depth = nesting_depth(text);
    if depth > max {
        return Err(format!(
            "{source}: YAML nested {depth} levels deep; the limit is {max}"
        ));
    }
    Ok(())
}

/// An estimate of the deepest nesting in a YAML text, in one pass over its
/// bytes: block levels from indentation (a stack of indent columns, as
/// Python's tokenizer keeps) and compact `- - -` entries, plus flow levels
/// from `[` and `{`. Brackets inside quoted scalars, plain scalars
/// (`echo a[1]`), comments and block scalars (`|`, `>`) do not count. It may
/// overcount by a level or two (the content of a `- ` entry, a multi-line
/// plain scalar's continuation lines), never misses deep flow or block
/// nesting.
pub fn nesting_depth(text: &str) -> usize {
    let mut scan = Scan::default();
    for line in text.split('\n') {
        scan.line(line.strip_suffix('\r').unwrap_or(line).as_bytes());
    }
    scan.max
}

/// State carried from line to line.
#[derive(Default)]
struct Scan {
    /// Indent columns of the open block levels.
    indents: Vec<usize>,
    /// Open `[` and `{`.
    flow: usize,
    /// A quoted scalar that continues on the next line (its quote byte).
    quote: Option<u8>,
    /// Inside a block scalar: lines more indented than this are its text.
    block_scalar: Option<usize>,
    /// Indentation of the line being scanned (a block scalar's text is
    /// indented past it).
    line_indent: usize,
    /// Deepest level seen.
    max: usize,
}

impl Scan {
    fn line(&mut self, bytes: &[u8]) {
        let mut at = 0;
        // Whether the next token starts a value (a quote there opens a
        // quoted scalar; a bracket opens a flow collection).
        let mut value_start = true;
        if let Some(quote) = self.quote {
            match quote_end(bytes, 0, quote) {
                Some(end) => {
                    self.quote = None;
                    at = end;
                    value_start = false;
                }
                None => return,
            }
        } else if self.flow == 0 {
            let indent = bytes.iter().take_while(|&&b| b == b' ').count();
            let rest = &bytes[indent..];
            self.line_indent = indent;
            let blank = rest.iter().all(|b| b.is_ascii_whitespace());
            if let Some(parent) = self.block_scalar {
                if blank || indent > parent {
                    return;
                }
                self.block_scalar = None;
            }
            if blank || rest.first() == Some(&b'#') {
                return;
            }
            if indent == 0 && (rest.starts_with(b"---") || rest.starts_with(b"...")) {
                self.indents.clear();
                at = 3;
            } else {
                while self.indents.last().is_some_and(|&top| top > indent) {
                    self.indents.pop();
                }
                if self.indents.last() != Some(&indent) {
                    self.indents.push(indent);
                }
                at = indent;
                // `- - x` and `? - x`: each indicator opens a level at the
                // column of what follows it.
                while matches!(bytes.get(at), Some(b'-' | b'?'))
                    && matches!(bytes.get(at + 1), None | Some(b' ' | b'\t'))
                {
                    at += 1;
                    while matches!(bytes.get(at), Some(b' ' | b'\t')) {
                        at += 1;
                    }
                    if at >= bytes.len() {
                        break;
                    }
                    self.indents.push(at);
                }
            }
            self.max = self.max.max(self.indents.len());
        }
        self.rest(bytes, at, value_start);
    }

    /// Scans the line from `at`: flow brackets, quotes, comments, block
    /// scalar indicators and `key: value` separators.
    fn rest(&mut self, bytes: &[u8], mut at: usize, mut value_start: bool) {
        while at < bytes.len() {
            let b = bytes[at];
            let after_space = at == 0 || matches!(bytes[at - 1], b' ' | b'\t');
            match b {
                b' ' | b'\t' => {}
                b'#' if after_space => return,
                b'[' | b'{' if value_start || self.flow > 0 => {
                    self.flow += 1;
                    self.max = self.max.max(self.indents.len() + self.flow);
                    value_start = true;
                }
                b']' | b'}' if self.flow > 0 => {
                    self.flow -= 1;
                    value_start = false;
                }
                b',' if self.flow > 0 => value_start = true,
                b'"' | b'\'' if value_start => match quote_end(bytes, at + 1, b) {
                    Some(end) => {
                        at = end;
                        value_start = false;
                        continue;
                    }
                    None => {
                        self.quote = Some(b);
                        return;
                    }
                },
                b'|' | b'>' if value_start && self.flow == 0 => {
                    self.block_scalar = Some(self.line_indent);
                    return;
                }
                b'&' | b'!' if value_start => {
                    // An anchor or a tag comes before the value it names.
                    while at < bytes.len() && !matches!(bytes[at], b' ' | b'\t') {
                        at += 1;
                    }
                    continue;
                }
                b':' if matches!(bytes.get(at + 1), None | Some(b' ' | b'\t'))
                    || (self.flow > 0 && matches!(bytes.get(at + 1), Some(b',' | b']' | b'}'))) =>
                {
                    value_start = true;
                }
                _ => value_start = false,
            }
            at += 1;
        }
    }
}

/// The index just after the quote that closes a scalar opened by `quote`,
/// searching from `from`; `None` when it does not close on this line.
fn quote_end(bytes: &[u8], from: usize, quote: u8) -> Option<usize> {
    let mut at = from;
    while at < bytes.len() {
        match bytes[at] {
            b'\\' if quote == b'"' => at += 2,
            b'\'' if quote == b'\'' && bytes.get(at + 1) == Some(&b'\'') => at += 2,
            b if b == quote => return Some(at + 1),
            _ => at += 1,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_estimates() {
        let deep_flow = format!("{}{}", "[".repeat(1000), "]".repeat(1000));
        let deep_dashes = format!("{}x\n", "- ".repeat(1000));
        let cases: &[(&str, &str, usize)] = &[
            ("empty", "", 0),
            ("scalar", "42\n", 1),
            ("flat mapping", "a: 1\nb: 2\n", 1),
            ("nested mapping", "a:\n  b:\n    c: 1\n", 3),
            ("back out", "a:\n  b: 1\nc: 2\n", 2),
            ("flow value", "command: [a, b]\n", 2),
            ("nested flow", "a: {b: [c, {d: [1]}]}\n", 5),
            ("flow across lines", "a: [\n  [1,\n   [2]],\n]\n", 4),
            ("sequence of mappings", "- a: 1\n  b: 2\n", 2),
            ("sequence under key", "jobs:\n- a\n- b\n", 2),
            ("sequence under key, indented", "jobs:\n  - a\n  - b\n", 3),
            // A `- ` entry counts the column of its content as a level even
            // when that content is a scalar: one level too many, never too few.
            ("one entry", "- x\n", 2),
            ("compact dashes", "- - - x\n", 4),
            ("dash then block", "-\n  - x\n", 3),
            (
                "brackets in a plain scalar",
                "command: echo a[[[[1\nx: 1\n",
                1,
            ),
            ("brackets in quotes", "a: \"[[[[\"\nb: '{{{{'\n", 1),
            ("escaped quotes", "a: \"x\\\"[[[\"\nb: 'it''s [[['\n", 1),
            ("quote across lines", "a: \"[[[\n   [[[ \"\nb: 1\n", 1),
            ("comment", "a: 1 # [[[[[\n# {{{{{\n", 1),
            (
                "block scalar",
                "script: |\n  a\n        b\n            c\n                d\nnext: 1\n",
                1,
            ),
            ("folded in a list", "- >-\n  a\n       b\n- c\n", 2),
            (
                "literal under a key",
                "a:\n  b: |\n    x\n      y\n  c: 1\n",
                2,
            ),
            ("anchor before flow", "a: &x [[1]]\n", 3),
            ("tag before flow", "a: !!seq [1]\n", 2),
            ("documents reset", "a:\n  b: 1\n---\nc: 1\n", 2),
            (
                "design example",
                "name: x\nresources: {gpus: 1}\nbatch:\n  tiers: [{min_free: 32GiB, size: 512}]\n",
                4,
            ),
            ("deep flow", &deep_flow, 1001),
            ("deep dashes", &deep_dashes, 1001),
        ];
        for (name, text, expect) in cases {
            let shown: String = text.chars().take(80).collect();
            assert_eq!(nesting_depth(text), *expect, "{name}: {shown:?}");
        }
    }

    #[test]
    fn depth_limit_names_the_limit() {
        let text = format!("a: {}1{}\n", "[".repeat(100), "]".repeat(100));
        let err = check_depth(&text, 64, "deep.yaml").expect_err("too deep");
        assert_eq!(
            err,
            "deep.yaml: YAML nested 101 levels deep; the limit is 64"
        );
        assert_eq!(check_depth("a: [[1]]\n", 64, "ok.yaml"), Ok(()));
    }
}
