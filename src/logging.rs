//! Structured logs with `tracing`: human-readable text or one JSON object per line.
//!
//! Clients choose much of what gets logged (client ids, usernames, topics, user agents). Two
//! rules keep them from forging or flooding the log: every such string goes through [`clip`]
//! before it reaches a log or the audit log, and the text format escapes control characters in
//! every field and message, so a client id holding `\n… INFO login ok` stays on its own line
//! (the JSON format escapes them itself).

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::format::Writer;

use crate::config::{LogConfig, LogFormat};

/// Targets held below `log.level`: rustls warns on every TLS handshake whose SNI is an IP
/// address, which mosquitto_pub and other clients send for `-h 127.0.0.1`; the name is ignored
/// and the handshake goes on, so a line per connection only buries what matters.
const QUIETED: &str = "rustls::msgs::handshake=error";

/// Longest client-supplied string written whole to a log line or an audit record, in bytes.
pub const CLIP_BYTES: usize = 256;

/// Longest field value the text format writes whole, in bytes: a backstop for values no call
/// site clipped (server-made values such as error chains may legitimately exceed `CLIP_BYTES`).
const TEXT_FIELD_BYTES: usize = 4096;

/// Installs the global subscriber on standard error. `RUST_LOG`, when set, wins over
/// `log.level`. Does nothing if one is installed already (tests start several servers).
pub fn init(config: &LogConfig) {
    let colours = std::io::IsTerminal::is_terminal(&std::io::stderr());
    init_with_writer(config, std::io::stderr, colours);
}

/// As [`init`], writing to `writer` (tests capture the log this way).
pub fn init_with_writer<W>(config: &LogConfig, writer: W, colours: bool)
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{QUIETED},{}", config.level)));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(colours);
    let _ = match config.format {
        LogFormat::Text => builder.fmt_fields(EscapedFields).try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
}

/// A string cut to a byte limit (at a character boundary) when displayed, followed by
/// `…(+N bytes)` naming what was left out.
#[derive(Debug, Clone, Copy)]
pub struct Clipped<'a> {
    text: &'a str,
    limit: usize,
}

/// `text` as it may appear in a log line or an audit record: at most [`CLIP_BYTES`] of it.
pub fn clip(text: &str) -> Clipped<'_> {
    Clipped {
        text,
        limit: CLIP_BYTES,
    }
}

impl fmt::Display for Clipped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.text.len() <= self.limit {
            return f.write_str(self.text);
        }
        let mut end = self.limit;
        while !self.text.is_char_boundary(end) {
            end -= 1;
        }
        write!(f, "{}…(+{} bytes)", &self.text[..end], self.text.len() - end)
    }
}

/// Writes `text` with control characters (and Unicode line and paragraph separators, which
/// some viewers break lines at) escaped, so it can never start a new log line.
fn write_escaped(out: &mut impl fmt::Write, text: &str) -> fmt::Result {
    let mut rest = text;
    while let Some(at) = rest.find(needs_escape) {
        out.write_str(&rest[..at])?;
        let c = rest[at..].chars().next().unwrap_or_default();
        match c {
            '\n' => out.write_str("\\n")?,
            '\r' => out.write_str("\\r")?,
            '\t' => out.write_str("\\t")?,
            other => write!(out, "\\u{{{:x}}}", other as u32)?,
        }
        rest = &rest[at + c.len_utf8()..];
    }
    out.write_str(rest)
}

fn needs_escape(c: char) -> bool {
    c.is_control() || matches!(c, '\u{2028}' | '\u{2029}')
}

/// Lines of one kind logged per interval before the rest are only counted: refusals need no
/// credentials, so an outsider must not be able to grow the log at will.
pub const LINES_PER_INTERVAL: u32 = 20;

/// The interval of [`LINES_PER_INTERVAL`].
pub const LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// Which lines of a kind to write (pure: time passed in). The first [`LINES_PER_INTERVAL`] of
/// an interval are written; the rest are counted and reported by one summary line when the
/// next one of that kind comes in a later interval.
#[derive(Default)]
pub struct LogBudget {
    kinds: std::collections::HashMap<&'static str, (std::time::Instant, u32, u64)>,
}

/// What [`LogBudget::admit`] decided.
#[derive(Debug, PartialEq, Eq)]
pub struct LogAdmission {
    /// Write this line.
    pub log: bool,
    /// Lines of this kind left out in the interval before (write a summary if not zero).
    pub suppressed: u64,
}

impl LogBudget {
    pub fn admit(&mut self, kind: &'static str, now: std::time::Instant) -> LogAdmission {
        let entry = self.kinds.entry(kind).or_insert((now, 0, 0));
        let mut suppressed = 0;
        if now.duration_since(entry.0) >= LOG_INTERVAL {
            suppressed = entry.2;
            *entry = (now, 0, 0);
        }
        if entry.1 < LINES_PER_INTERVAL {
            entry.1 += 1;
            LogAdmission {
                log: true,
                suppressed,
            }
        } else {
            entry.2 += 1;
            LogAdmission {
                log: false,
                suppressed,
            }
        }
    }
}

/// Whether a field value (as `%` or `?` formatted it) must be quoted to stay one value: one
/// holding a space, `=` or a stray quote could otherwise pass for more fields (a client id
/// `x source="10.9.9.9"` read as a second `source`). A value already quoted whole (a `?`-logged
/// string) is left as it is.
fn needs_quotes(text: &str) -> bool {
    if is_quoted(text) {
        return false;
    }
    text.chars().any(|c| c.is_whitespace() || c == '=' || c == '"')
}

/// `"…"` with every inner quote escaped, as `{:?}` writes a string.
fn is_quoted(text: &str) -> bool {
    let Some(inner) = text.strip_prefix('"').and_then(|rest| rest.strip_suffix('"')) else {
        return false;
    };
    let mut escaped = false;
    for c in inner.chars() {
        match c {
            '\\' => escaped = !escaped,
            '"' if !escaped => return false,
            _ => escaped = false,
        }
    }
    !escaped
}

/// The text format's field formatter: `name=value` pairs like tracing-subscriber's default,
/// with every value (and the message) escaped and clipped.
struct EscapedFields;

impl<'a> MakeVisitor<Writer<'a>> for EscapedFields {
    type Visitor = EscapedVisitor<'a>;

    fn make_visitor(&self, target: Writer<'a>) -> Self::Visitor {
        EscapedVisitor {
            writer: target,
            is_empty: true,
            result: Ok(()),
        }
    }
}

struct EscapedVisitor<'a> {
    writer: Writer<'a>,
    is_empty: bool,
    result: fmt::Result,
}

impl EscapedVisitor<'_> {
    fn write_field(&mut self, name: &str, value: &str) {
        // `log` records bridged into tracing carry their metadata as `log.*` fields, which
        // the event's header already shows (tracing-subscriber's own formatter skips them too).
        if self.result.is_err() || name.starts_with("log.") {
            return;
        }
        let mut escaped = String::with_capacity(value.len().min(TEXT_FIELD_BYTES) + 8);
        // Escaping into a String cannot fail.
        let _ = write_escaped(&mut escaped, value);
        let clipped = Clipped {
            text: &escaped,
            limit: TEXT_FIELD_BYTES,
        };
        let separator = if std::mem::take(&mut self.is_empty) {
            ""
        } else {
            " "
        };
        self.result = if name == "message" {
            write!(self.writer, "{separator}{clipped}")
        } else {
            let name = name.strip_prefix("r#").unwrap_or(name);
            write!(self.writer, "{separator}{name}={clipped}")
        };
    }
}

impl Visit for EscapedVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.write_field(field.name(), value);
        } else {
            self.write_field(field.name(), &format!("{value:?}"));
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        let mut text = value.to_string();
        let mut source = value.source();
        while let Some(cause) = source {
            let _ = write!(text, ": {cause}");
            source = cause.source();
        }
        self.write_field(field.name(), &text);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let text = format!("{value:?}");
        if field.name() != "message" && needs_quotes(&text) {
            self.write_field(field.name(), &format!("{text:?}"));
        } else {
            self.write_field(field.name(), &text);
        }
    }
}

impl VisitOutput<fmt::Result> for EscapedVisitor<'_> {
    fn finish(self) -> fmt::Result {
        self.result
    }
}

impl VisitFmt for EscapedVisitor<'_> {
    fn writer(&mut self) -> &mut dyn fmt::Write {
        &mut self.writer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn escaped(text: &str) -> String {
        let mut out = String::new();
        write_escaped(&mut out, text).unwrap();
        out
    }

    #[test]
    fn control_characters_are_escaped_and_the_rest_kept() {
        assert_eq!(
            escaped("a\nINFO login ok\r\tx\u{1b}[31m\u{7f}\u{2028}é"),
            "a\\nINFO login ok\\r\\tx\\u{1b}[31m\\u{7f}\\u{2028}é"
        );
        assert_eq!(escaped("plain"), "plain");
    }

    #[test]
    fn clip_keeps_short_text_and_names_what_it_cut() {
        assert_eq!(clip("device-1").to_string(), "device-1");
        let long = "x".repeat(CLIP_BYTES + 10);
        assert_eq!(
            clip(&long).to_string(),
            format!("{}…(+10 bytes)", "x".repeat(CLIP_BYTES))
        );
        // Never inside a character: 'é' is two bytes and straddles the limit.
        let text = format!("{}é{}", "a".repeat(CLIP_BYTES - 1), "b".repeat(5));
        assert_eq!(
            clip(&text).to_string(),
            format!("{}…(+7 bytes)", "a".repeat(CLIP_BYTES - 1))
        );
    }

    #[test]
    fn a_forged_line_in_a_field_stays_on_one_line() {
        use std::io::Write;
        use std::sync::{Arc, Mutex};

        #[derive(Clone, Default)]
        struct Buffer(Arc<Mutex<Vec<u8>>>);
        impl Write for Buffer {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let sink = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .with_ansi(false)
            .fmt_fields(EscapedFields)
            .finish();
        let forged = "x\n2026-12-06T00:00:00Z  INFO drover::auth: login ok user=admin";
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(client = %forged, other = ?forged, plain = forged, "refused {forged}");
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.contains(r#"client="x\n2026"#), "{text}");
    }

    #[test]
    fn a_log_budget_writes_the_first_lines_and_counts_the_rest() {
        let now = std::time::Instant::now();
        let mut budget = LogBudget::default();
        for _ in 0..LINES_PER_INTERVAL {
            assert!(budget.admit("a", now).log);
        }
        assert!(!budget.admit("a", now).log);
        assert!(!budget.admit("a", now).log);
        // Another kind has its own budget.
        assert!(budget.admit("b", now).log);
        assert_eq!(
            budget.admit("a", now + LOG_INTERVAL),
            LogAdmission {
                log: true,
                suppressed: 2
            }
        );
    }

    #[test]
    fn a_value_cannot_pass_for_more_fields() {
        assert!(needs_quotes(r#"x source="10.9.9.9" reason="accepted_by_admin""#));
        assert!(needs_quotes(r#""a" source="b""#));
        assert!(needs_quotes("a=b"));
        assert!(!needs_quotes("device-1"));
        assert!(!needs_quotes(r#""a \" b""#));
        assert!(needs_quotes(r#""a\""#));
    }
}
