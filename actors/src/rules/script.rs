//! Rule expressions: rhai scripts compiled once into an AST and run in a sandbox.
//!
//! The sandbox bounds what one evaluation may cost (operations, call depth, expression depth,
//! string, array and map sizes), has no module resolver (`import` fails), and drops `print` and
//! `debug`. [`Sandbox::check`] runs a freshly compiled expression once on dummy values, so an
//! unconditional infinite loop or a runaway string build is refused at creation rather than
//! discovered on live telemetry.

use std::collections::BTreeSet;
use std::sync::Arc;

use rhai::{AST, Dynamic, Engine, EvalAltResult, Map, Position, Scope};

use super::Severity;

/// What one evaluation may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScriptLimits {
    pub max_operations: u64,
    pub max_call_levels: usize,
    pub max_expr_depth: usize,
    pub max_string_bytes: usize,
    pub max_array_len: usize,
    pub max_map_len: usize,
    /// Bytes of expression source.
    pub max_source_bytes: usize,
}

impl Default for ScriptLimits {
    fn default() -> Self {
        ScriptLimits {
            max_operations: 50_000,
            max_call_levels: 16,
            max_expr_depth: 64,
            max_string_bytes: 16 * 1024,
            max_array_len: 1024,
            max_map_len: 256,
            max_source_bytes: 8 * 1024,
        }
    }
}

/// Why an expression could not be compiled or evaluated.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScriptError {
    #[error("syntax error at line {line}, column {column}: {message}")]
    Syntax {
        message: String,
        line: usize,
        column: usize,
    },
    /// A sandbox limit was hit (too many operations, data too large, too deep).
    #[error("limit reached at line {line}, column {column}: {message}")]
    Limit {
        message: String,
        line: usize,
        column: usize,
    },
    /// The message lacks a variable or property the expression reads: not an error of the rule.
    #[error("missing value: {0}")]
    Missing(String),
    #[error("runtime error at line {line}, column {column}: {message}")]
    Runtime {
        message: String,
        line: usize,
        column: usize,
    },
    #[error("the expression must return true/false or a severity (critical, major, minor, warning), not {0}")]
    Result(String),
}

impl ScriptError {
    /// Line and column, when the error has a position.
    pub fn position(&self) -> Option<(usize, usize)> {
        match self {
            ScriptError::Syntax { line, column, .. }
            | ScriptError::Limit { line, column, .. }
            | ScriptError::Runtime { line, column, .. } => Some((*line, *column)),
            _ => None,
        }
    }
}

/// What an expression decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    False,
    True,
    /// True, with this severity instead of the rule's.
    Severity(Severity),
}

impl Verdict {
    pub fn holds(self) -> bool {
        !matches!(self, Verdict::False)
    }
}

/// A compiled expression and what it reads, so evaluation prepares only that.
#[derive(Debug, Clone)]
pub struct Expression {
    pub source: Arc<str>,
    ast: Arc<AST>,
    pub reads_metadata: bool,
    pub reads_shadow: bool,
    /// Metrics named as `metrics.<name>`: their window statistics are computed.
    pub window_metrics: Vec<String>,
    identifiers: Vec<String>,
}

/// The engine every rule of the process shares (it is immutable once built).
pub struct Sandbox {
    engine: Engine,
    limits: ScriptLimits,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox").field("limits", &self.limits).finish()
    }
}

impl Default for Sandbox {
    fn default() -> Self {
        Sandbox::new(ScriptLimits::default())
    }
}

fn line_col(pos: Position) -> (usize, usize) {
    (pos.line().unwrap_or(0), pos.position().unwrap_or(0))
}

impl Sandbox {
    pub fn new(limits: ScriptLimits) -> Sandbox {
        let mut engine = Engine::new();
        engine.set_max_operations(limits.max_operations);
        engine.set_max_call_levels(limits.max_call_levels);
        engine.set_max_expr_depths(limits.max_expr_depth, limits.max_expr_depth);
        engine.set_max_string_size(limits.max_string_bytes);
        engine.set_max_array_size(limits.max_array_len);
        engine.set_max_map_size(limits.max_map_len);
        engine.set_max_modules(0);
        engine.set_module_resolver(rhai::module_resolvers::DummyModuleResolver::new());
        engine.on_print(|_| {});
        engine.on_debug(|_, _, _| {});
        engine.disable_symbol("eval");
        Sandbox { engine, limits }
    }

    pub fn limits(&self) -> ScriptLimits {
        self.limits
    }

    /// Compiles `source` (syntax errors carry their line and column).
    pub fn compile(&self, source: &str) -> Result<Expression, ScriptError> {
        if source.len() > self.limits.max_source_bytes {
            return Err(ScriptError::Limit {
                message: format!("expression longer than {} bytes", self.limits.max_source_bytes),
                line: 1,
                column: 1,
            });
        }
        if source.trim().is_empty() {
            return Err(ScriptError::Syntax {
                message: "empty expression".into(),
                line: 1,
                column: 1,
            });
        }
        let ast = self.engine.compile(source).map_err(|e| {
            let (line, column) = line_col(e.1);
            ScriptError::Syntax {
                message: e.0.to_string(),
                line,
                column,
            }
        })?;
        let identifiers = identifiers(source);
        Ok(Expression {
            source: source.into(),
            ast: Arc::new(ast),
            reads_metadata: identifiers.iter().any(|i| i == "metadata"),
            reads_shadow: identifiers.iter().any(|i| i == "shadow"),
            window_metrics: window_metrics(source),
            identifiers,
        })
    }

    /// Compiles and runs once with every name it reads set to a dummy number: refuses syntax
    /// errors and limit hits (an unconditional loop, a runaway string). Missing values and type
    /// errors are fine here, since dummy values cannot match what real telemetry carries.
    pub fn check(&self, source: &str) -> Result<Expression, ScriptError> {
        let expression = self.compile(source)?;
        let mut scope = Scope::new();
        let stats: Map = ["avg", "std", "min", "max", "count", "last", "sum"]
            .into_iter()
            .map(|k| (k.into(), Dynamic::from_float(1.0)))
            .collect();
        let metrics: Map = expression
            .window_metrics
            .iter()
            .map(|m| (m.as_str().into(), Dynamic::from_map(stats.clone())))
            .collect();
        for name in &expression.identifiers {
            match name.as_str() {
                "metrics" => scope.push("metrics", metrics.clone()),
                "metadata" | "shadow" => scope.push(name.clone(), Map::new()),
                "device" | "deviceType" => scope.push(name.clone(), "dummy".to_string()),
                _ => scope.push(name.clone(), 1.0f64),
            };
        }
        match self.eval(&expression, &mut scope) {
            Err(e @ (ScriptError::Limit { .. } | ScriptError::Syntax { .. })) => Err(e),
            _ => Ok(expression),
        }
    }

    /// Runs an expression against `scope` (which holds the message's variables).
    pub fn eval(&self, expression: &Expression, scope: &mut Scope) -> Result<Verdict, ScriptError> {
        let value = self
            .engine
            .eval_ast_with_scope::<Dynamic>(scope, &expression.ast)
            .map_err(|e| classify(*e))?;
        if value.is_unit() {
            return Ok(Verdict::False);
        }
        if let Ok(b) = value.as_bool() {
            return Ok(if b { Verdict::True } else { Verdict::False });
        }
        if value.is_string() {
            let text = value.into_string().unwrap_or_default();
            return Severity::parse(&text)
                .map(Verdict::Severity)
                .ok_or_else(|| ScriptError::Result(format!("the string {text:?}")));
        }
        Err(ScriptError::Result(format!(
            "a value of type {}",
            value.type_name()
        )))
    }
}

fn classify(error: EvalAltResult) -> ScriptError {
    let (line, column) = line_col(error.position());
    match error {
        EvalAltResult::ErrorTooManyOperations(_)
        | EvalAltResult::ErrorDataTooLarge(..)
        | EvalAltResult::ErrorStackOverflow(_)
        | EvalAltResult::ErrorTooManyModules(_)
        | EvalAltResult::ErrorTooManyVariables(_) => ScriptError::Limit {
            message: error.to_string(),
            line,
            column,
        },
        EvalAltResult::ErrorVariableNotFound(name, _) => ScriptError::Missing(name),
        // A property the map lacks reads as `()`; comparing it is a "function not found".
        EvalAltResult::ErrorFunctionNotFound(ref sig, _) if sig.contains("()") => {
            ScriptError::Missing(error.to_string())
        }
        EvalAltResult::ErrorPropertyNotFound(..) | EvalAltResult::ErrorDotExpr(..) => {
            ScriptError::Missing(error.to_string())
        }
        EvalAltResult::ErrorMismatchDataType(_, ref actual, _) if actual.contains("()") => {
            ScriptError::Missing(error.to_string())
        }
        EvalAltResult::ErrorParsing(ref e, pos) => {
            let (line, column) = line_col(pos);
            ScriptError::Syntax {
                message: e.to_string(),
                line,
                column,
            }
        }
        other => ScriptError::Runtime {
            message: other.to_string(),
            line,
            column,
        },
    }
}

/// Names that look like identifiers, outside string literals and comments (a superset of the
/// variables the script reads; keywords and functions are harmless extras).
fn identifiers(source: &str) -> Vec<String> {
    let mut found = BTreeSet::new();
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
        } else if c.is_ascii_alphabetic() || c == b'_' {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                i += 1;
            }
            // A property (`x.name`) is not a variable.
            let after_dot = start > 0 && bytes[start - 1] == b'.';
            if !after_dot && !is_keyword(&source[start..i]) {
                found.insert(source[start..i].to_string());
            }
        } else {
            i += 1;
        }
    }
    found.into_iter().collect()
}

fn is_keyword(word: &str) -> bool {
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

/// Names `<name>` of `metrics.<name>` in the source.
fn window_metrics(source: &str) -> Vec<String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn run(source: &str, vars: &[(&str, f64)]) -> Result<Verdict, ScriptError> {
        let sandbox = Sandbox::default();
        let expr = sandbox.compile(source)?;
        let mut scope = Scope::new();
        for (k, v) in vars {
            scope.push(k.to_string(), *v);
        }
        sandbox.eval(&expr, &mut scope)
    }

    #[test]
    fn thresholds_mix_integers_and_floats() {
        assert_eq!(
            run("temperature > 30", &[("temperature", 31.0)]),
            Ok(Verdict::True)
        );
        assert_eq!(
            run("temperature > 30", &[("temperature", 29.5)]),
            Ok(Verdict::False)
        );
        assert_eq!(run("door == 1", &[("door", 1.0)]), Ok(Verdict::True));
        assert_eq!(
            run(
                "if temperature > 50 { \"critical\" } else if temperature > 30 { \"major\" }",
                &[("temperature", 60.0)]
            ),
            Ok(Verdict::Severity(Severity::Critical))
        );
        assert_eq!(
            run("if temperature > 50 { \"critical\" }", &[("temperature", 10.0)]),
            Ok(Verdict::False)
        );
    }

    #[test]
    fn the_multi_line_script_of_the_issue_runs() {
        let sandbox = Sandbox::default();
        let source = "const avg = metrics.temperature.avg;\nconst std = metrics.temperature.std;\nreturn current > (avg + 3 * std);";
        let expr = sandbox.check(source).unwrap();
        assert_eq!(expr.window_metrics, vec!["temperature".to_string()]);
        let mut stats = Map::new();
        stats.insert("avg".into(), Dynamic::from_float(20.0));
        stats.insert("std".into(), Dynamic::from_float(1.0));
        let mut metrics = Map::new();
        metrics.insert("temperature".into(), Dynamic::from_map(stats));
        let mut scope = Scope::new();
        scope.push("metrics", metrics.clone());
        scope.push("current", 24.0f64);
        assert_eq!(sandbox.eval(&expr, &mut scope), Ok(Verdict::True));
        let mut scope = Scope::new();
        scope.push("metrics", metrics);
        scope.push("current", 22.0f64);
        assert_eq!(sandbox.eval(&expr, &mut scope), Ok(Verdict::False));
    }

    #[test]
    fn syntax_errors_have_a_line_and_column() {
        let err = Sandbox::default().check("temperature >\n  > 30").unwrap_err();
        assert!(matches!(err, ScriptError::Syntax { line: 2, .. }), "{err:?}");
        assert!(err.position().unwrap().1 > 0);
    }

    #[test]
    fn infinite_loops_and_huge_strings_hit_limits_at_creation() {
        let sandbox = Sandbox::default();
        let err = sandbox.check("loop { }\ntrue").unwrap_err();
        assert!(matches!(err, ScriptError::Limit { .. }), "{err:?}");
        let err = sandbox
            .check("let s = \"xxxxxxxx\"; while true { s += s; } true")
            .unwrap_err();
        assert!(matches!(err, ScriptError::Limit { .. }), "{err:?}");
        let err = sandbox.check("fn f(x) { f(x + 1) } f(1)").unwrap_err();
        assert!(matches!(err, ScriptError::Limit { .. }), "{err:?}");
        let err = sandbox.check("let a = []; loop { a.push(1); }").unwrap_err();
        assert!(matches!(err, ScriptError::Limit { .. }), "{err:?}");
    }

    #[test]
    fn a_data_dependent_loop_is_stopped_at_run_time() {
        let source = "if temperature > 1000 { loop { } } temperature > 30";
        assert!(Sandbox::default().check(source).is_ok());
        let err = run(source, &[("temperature", 2000.0)]).unwrap_err();
        assert!(matches!(err, ScriptError::Limit { .. }), "{err:?}");
    }

    #[test]
    fn no_modules_no_printing_no_eval() {
        let sandbox = Sandbox::default();
        assert!(
            sandbox.check("import \"os\" as os; true").is_err()
                || run("import \"os\" as os; true", &[]).is_err()
        );
        assert_eq!(run("print(\"hi\"); debug(1); true", &[]), Ok(Verdict::True));
        assert!(sandbox.compile("eval(\"1\")").is_err());
    }

    #[test]
    fn missing_values_are_not_errors_of_the_rule() {
        assert!(matches!(
            run("humidity > 30", &[("temperature", 1.0)]),
            Err(ScriptError::Missing(_))
        ));
        let sandbox = Sandbox::default();
        let expr = sandbox.compile("metrics.humidity.avg > 3").unwrap();
        let mut scope = Scope::new();
        scope.push("metrics", Map::new());
        assert!(matches!(
            sandbox.eval(&expr, &mut scope),
            Err(ScriptError::Missing(_))
        ));
    }

    #[test]
    fn wrong_result_types_are_reported() {
        assert!(matches!(run("42", &[]), Err(ScriptError::Result(_))));
        assert!(matches!(run("\"purple\"", &[]), Err(ScriptError::Result(_))));
    }

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
}
