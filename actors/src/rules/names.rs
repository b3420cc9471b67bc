//! What an expression's source names, found by a lexical scan (outside string literals and
//! comments): the identifiers it mentions, the functions it calls, the locals it declares and
//! the metrics of `metrics.<name>`. The sandbox uses it to prepare only what a script reads and
//! to refuse calls that are not available; the API uses it to warn about metrics no device
//! reports. A scan, not a parse: it may see a few names too many, never too few.

use std::collections::BTreeSet;

/// One identifier-like word of the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Word<'a> {
    pub text: &'a str,
    /// Byte offset in the source.
    pub at: usize,
    /// A property or method (`x.name`), not a variable.
    pub after_dot: bool,
    /// Followed by `(`: a function or method call (or a function definition's name).
    pub call: bool,
}

/// The words of `source`, in order.
pub fn words(source: &str) -> Vec<Word<'_>> {
    let mut found = Vec::new();
    let bytes = source.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c == b'"' || c == b'`' || c == b'\'' {
            i += 1;
            while i < bytes.len() && bytes[i] != c {
                if bytes[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
        } else if c == b'/' && bytes.get(i + 1) == Some(&b'/') {
            while i < bytes.len() && bytes[i] != b'\n' {
                i += 1;
            }
        } else if c == b'/' && bytes.get(i + 1) == Some(&b'*') {
            i += 2;
            while i < bytes.len() && !(bytes[i] == b'*' && bytes.get(i + 1) == Some(&b'/')) {
                i += 1;
            }
            i += 2;
        } else if c.is_ascii_digit() {
            // A number (`1e5`, `0x1f`, `1_000`) is not a name.
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == b'_' {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                i += 1;
            }
            let before = source[..start].trim_end();
            let after = source[i..].trim_start();
            found.push(Word {
                text: &source[start..i],
                at: start,
                after_dot: before.ends_with('.') && !before.ends_with(".."),
                call: after.starts_with('('),
            });
        } else {
            i += 1;
        }
    }
    found
}

/// Names that look like identifiers, outside string literals and comments, properties and
/// keywords excluded (a superset of the variables the script reads; functions and locals are
/// harmless extras).
pub fn identifiers(source: &str) -> Vec<String> {
    words(source)
        .into_iter()
        .filter(|w| !w.after_dot && !is_keyword(w.text))
        .map(|w| w.text.to_string())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// The variables the script reads and does not declare itself: not a property, not a call, not
/// a keyword, not a `let`/`const`, a `for` variable or a function parameter.
pub fn free_variables(source: &str) -> Vec<String> {
    let all = words(source);
    let mut declared = BTreeSet::new();
    for (i, w) in all.iter().enumerate() {
        match w.text {
            "let" | "const" => {
                if let Some(next) = all.get(i + 1) {
                    declared.insert(next.text);
                }
            }
            "for" => {
                for next in all[i + 1..].iter().take_while(|n| n.text != "in") {
                    declared.insert(next.text);
                }
            }
            "fn" => {
                // `fn name(a, b)`: the parameters are the words before the closing parenthesis.
                let Some(name) = all.get(i + 1) else { continue };
                let close = source[name.at..].find(')').map_or(source.len(), |c| name.at + c);
                for param in all[i + 2..].iter().take_while(|p| p.at < close) {
                    declared.insert(param.text);
                }
            }
            _ => {}
        }
    }
    all.iter()
        .filter(|w| !w.after_dot && !w.call && !is_keyword(w.text) && !declared.contains(w.text))
        .map(|w| w.text.to_string())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// Names `<name>` of `metrics.<name>` in the source.
pub fn window_metrics(source: &str) -> Vec<String> {
    let mut found = BTreeSet::new();
    for (at, _) in source.match_indices("metrics.") {
        if at > 0 {
            let before = source.as_bytes()[at - 1];
            if before.is_ascii_alphanumeric() || before == b'_' || before == b'.' {
                continue;
            }
        }
        let rest = &source[at + "metrics.".len()..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        if end > 0 {
            found.insert(rest[..end].to_string());
        }
    }
    found.into_iter().collect()
}

/// Line and column (1-based, in characters) of a byte offset.
pub fn line_column(source: &str, at: usize) -> (usize, usize) {
    let before = &source[..at.min(source.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

pub(super) fn is_keyword(word: &str) -> bool {
    matches!(
        word,
        "true"
            | "false"
            | "let"
            | "const"
            | "if"
            | "else"
            | "while"
            | "loop"
            | "for"
            | "in"
            | "do"
            | "until"
            | "break"
            | "continue"
            | "return"
            | "fn"
            | "switch"
            | "throw"
            | "try"
            | "catch"
            | "this"
            | "private"
            | "import"
            | "export"
            | "as"
            | "global"
            | "Fn"
            | "call"
            | "curry"
            | "type_of"
            | "print"
            | "debug"
            | "is_def_var"
            | "is_def_fn"
            | "is_shared"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_skip_strings_properties_and_keywords() {
        assert_eq!(
            identifiers("let x = metadata.site == \"a b\"; x && t > 1 // c"),
            vec!["metadata", "t", "x"]
        );
        assert_eq!(
            window_metrics("metrics.a.avg + metrics.b_2.std + xmetrics.c.avg"),
            vec!["a", "b_2"]
        );
    }

    #[test]
    fn calls_are_told_from_variables_and_properties() {
        let found: Vec<(&str, bool, bool)> = words("sleep (1); t.elapsed(); x.y; 1e5; /* f() */ f")
            .into_iter()
            .map(|w| (w.text, w.after_dot, w.call))
            .collect();
        assert_eq!(
            found,
            vec![
                ("sleep", false, true),
                ("t", false, false),
                ("elapsed", true, true),
                ("x", false, false),
                ("y", true, false),
                ("f", false, false),
            ]
        );
        assert_eq!(
            words("for i in 0..n {}")
                .iter()
                .map(|w| w.after_dot)
                .collect::<Vec<_>>(),
            vec![false, false, false, false],
            "a range is not a property"
        );
    }

    #[test]
    fn free_variables_leave_out_locals_parameters_and_calls() {
        assert_eq!(
            free_variables(
                "const avg = metrics.temperature.avg;\nlet limit = 3;\nfn twice(v, w) { v * w }\n\
                 for (i, x) in [1] { }\nreturn twice(current, limit) > avg + temprature + abs(humidity);"
            ),
            vec!["current", "humidity", "metrics", "temprature"]
        );
    }

    #[test]
    fn positions_are_one_based() {
        assert_eq!(line_column("a\nbc sleep", 5), (2, 4));
        assert_eq!(line_column("sleep", 0), (1, 1));
    }
}
