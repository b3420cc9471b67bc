//! Rule expressions: rhai scripts compiled once into an AST and run in a sandbox.
//!
//! The sandbox bounds what one evaluation may cost (operations, wall time, call depth,
//! expression depth, string, array and map sizes), has no module resolver (`import` fails), and
//! drops `print` and `debug`. Its engine starts from `Engine::new_raw` with only the packages a
//! condition needs: rhai's core language package (`sleep`, `exit`, `parse_json`, reflection) and
//! its time package (`timestamp`, `elapsed`) are left out, so a script can neither block its
//! thread nor read the clock (time reaches rules only through the server's clock: windows,
//! durations). [`Sandbox::check`] refuses calls to those functions with their position and
//! runs a freshly compiled expression once on dummy values, so an unconditional infinite loop
//! or a runaway string build is refused at creation rather than discovered on live telemetry.

use std::cell::Cell;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rhai::packages::{
    ArithmeticPackage, BasicArrayPackage, BasicFnPackage, BasicIteratorPackage, BasicMapPackage,
    BasicMathPackage, BasicStringPackage, BitFieldPackage, LogicPackage, MoreStringPackage, Package,
};
use rhai::{AST, Dynamic, Engine, EvalAltResult, Map, Position, Scope};

use super::Severity;
use super::names::{self, identifiers, window_metrics};
use super::native::Predicate;

/// Functions of rhai's standard library that rules may not call, and why. They are not in the
/// sandbox's engine at all; naming them here turns a run-time "function not found" into a
/// refusal at creation that says why.
const UNAVAILABLE: &[(&str, &str)] = &[
    ("sleep", "a rule may not block"),
    ("timestamp", "a rule may not read the clock"),
    ("elapsed", "a rule may not read the clock"),
    ("time_diff", "a rule may not read the clock"),
    ("exit", "a rule may not stop evaluation"),
];

/// Variables the evaluator provides besides the message's metrics.
pub const CONTEXT_VARIABLES: &[&str] = &[
    "current",
    "device",
    "deviceType",
    "metadata",
    "shadow",
    "metrics",
    "zscore",
];

/// How often (in operations) an evaluation looks at its deadline: reading the clock on every
/// operation would cost more than most expressions.
const DEADLINE_CHECK_OPERATIONS: u64 = 256;

thread_local! {
    /// When the evaluation running on this thread must stop (the engine is shared between
    /// threads, the deadline is per evaluation).
    static DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Sets this thread's evaluation deadline and restores the previous one when dropped.
struct DeadlineGuard(Option<Instant>);

impl DeadlineGuard {
    fn set(deadline: Instant) -> DeadlineGuard {
        DeadlineGuard(DEADLINE.with(|d| d.replace(Some(deadline))))
    }
}

impl Drop for DeadlineGuard {
    fn drop(&mut self) {
        DEADLINE.with(|d| d.set(self.0));
    }
}

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
    /// Wall time of one evaluation (operations that are each expensive, like string searches
    /// over 16 KiB, can take long within the operation limit; a preempted thread too).
    pub max_wall: Duration,
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
            max_wall: Duration::from_millis(50),
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
    /// The evaluation ran past its wall-time limit. Unlike the other limits this one depends on
    /// the machine's load, so one alone does not stop the rule at run time (a run of them does).
    #[error("time limit of {ms} ms reached at line {line}, column {column}")]
    Timeout { ms: u64, line: usize, column: usize },
    /// The expression calls a function the sandbox does not offer.
    #[error("`{name}` is not available in rule expressions ({why}), at line {line}, column {column}")]
    Unavailable {
        name: String,
        why: &'static str,
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
            | ScriptError::Timeout { line, column, .. }
            | ScriptError::Unavailable { line, column, .. }
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
    /// The same expression judged without rhai, when it is simple enough (see `native`).
    pub native: Option<Arc<Predicate>>,
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
        let mut engine = Engine::new_raw();
        for package in [
            LogicPackage::new().as_shared_module(),
            ArithmeticPackage::new().as_shared_module(),
            BasicMathPackage::new().as_shared_module(),
            BitFieldPackage::new().as_shared_module(),
            BasicStringPackage::new().as_shared_module(),
            MoreStringPackage::new().as_shared_module(),
            BasicArrayPackage::new().as_shared_module(),
            BasicMapPackage::new().as_shared_module(),
            BasicIteratorPackage::new().as_shared_module(),
            BasicFnPackage::new().as_shared_module(),
        ] {
            engine.register_global_module(package);
        }
        engine.on_progress(|operations| {
            if operations % DEADLINE_CHECK_OPERATIONS != 0 {
                return None;
            }
            let deadline = DEADLINE.with(Cell::get)?;
            (Instant::now() >= deadline).then_some(Dynamic::UNIT)
        });
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
        if let Some(word) = names::words(source)
            .into_iter()
            .find(|w| w.call && UNAVAILABLE.iter().any(|(name, _)| *name == w.text))
        {
            let (line, column) = names::line_column(source, word.at);
            let why = UNAVAILABLE
                .iter()
                .find(|(name, _)| *name == word.text)
                .map_or("", |(_, why)| why);
            return Err(ScriptError::Unavailable {
                name: word.text.to_string(),
                why,
                line,
                column,
            });
        }
        let identifiers = identifiers(source);
        Ok(Expression {
            source: source.into(),
            ast: Arc::new(ast),
            reads_metadata: identifiers.iter().any(|i| i == "metadata"),
            reads_shadow: identifiers.iter().any(|i| i == "shadow"),
            window_metrics: window_metrics(source),
            identifiers,
            native: Predicate::parse(source).map(Arc::new),
        })
    }

    /// Compiles and runs once with every name it reads set to a dummy number: refuses syntax
    /// errors, limit hits (an unconditional loop, a runaway string) and a call the sandbox does
    /// not offer reached through a function pointer. Missing values and type
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
            Err(
                e @ (ScriptError::Limit { .. }
                | ScriptError::Syntax { .. }
                | ScriptError::Timeout { .. }
                | ScriptError::Unavailable { .. }),
            ) => Err(e),
            _ => Ok(expression),
        }
    }

    /// Runs an expression against `scope` (which holds the message's variables).
    pub fn eval(&self, expression: &Expression, scope: &mut Scope) -> Result<Verdict, ScriptError> {
        let value = {
            let _deadline = DeadlineGuard::set(Instant::now() + self.limits.max_wall);
            self.engine
                .eval_ast_with_scope::<Dynamic>(scope, &expression.ast)
                .map_err(|e| self.classify(*e))?
        };
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

/// The entry of [`UNAVAILABLE`] a rhai call signature (`sleep (i64)`) names.
fn unavailable(signature: &str) -> Option<(&'static str, &'static str)> {
    let name = signature.split([' ', '(']).next()?;
    UNAVAILABLE.iter().find(|(n, _)| *n == name).copied()
}

impl Sandbox {
    fn classify(&self, error: EvalAltResult) -> ScriptError {
        let (line, column) = line_col(error.position());
        match error {
            EvalAltResult::ErrorTerminated(..) => ScriptError::Timeout {
                ms: self.limits.max_wall.as_millis() as u64,
                line,
                column,
            },
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
            // Reached through a function pointer (`Fn("sleep").call(15)`), which the check of
            // the source cannot see: the same refusal as a direct call.
            EvalAltResult::ErrorFunctionNotFound(ref sig, _) if unavailable(sig).is_some() => {
                let (name, why) = unavailable(sig).unwrap_or_default();
                ScriptError::Unavailable {
                    name: name.to_string(),
                    why,
                    line,
                    column,
                }
            }
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

    /// Wherever a native predicate decides, it decides as rhai does: random expressions of the
    /// subset (every comparison, literals integer, fractional and negative, `current`, window
    /// statistics with their integer `count`, `!`, `&&`, `||`, parentheses) on random values,
    /// many of them equal to the literals.
    #[test]
    fn native_predicates_agree_with_rhai() {
        use crate::rules::native::{Operand, Stat};
        let mut next = crate::rules::test_random(0x9e37_79b9_7f4a_7c15u64);
        let literals = ["0", "1", "2", "-1", "2.5", "-0.5", "3"];
        let terms = [
            "a",
            "b",
            "current",
            "metrics.m.count",
            "metrics.m.max",
            "metrics.m.avg",
        ];
        let ops = ["<", "<=", ">", ">=", "==", "!="];
        let sandbox = Sandbox::default();
        let mut checked = 0;
        for _ in 0..3000 {
            let comparison = |next: &mut dyn FnMut(u64) -> u64| {
                let side = |next: &mut dyn FnMut(u64) -> u64| {
                    if next(2) == 0 {
                        literals[next(literals.len() as u64) as usize].to_string()
                    } else {
                        terms[next(terms.len() as u64) as usize].to_string()
                    }
                };
                let left = side(next);
                let op = ops[next(ops.len() as u64) as usize];
                format!("{left} {op} {}", side(next))
            };
            let mut source = comparison(&mut next);
            for _ in 0..next(3) {
                let join = ["&&", "||"][next(2) as usize];
                let other = comparison(&mut next);
                source = match next(4) {
                    0 => format!("!({source}) {join} {other}"),
                    1 => format!("({source}) {join} ({other})"),
                    2 => format!("{other} {join} !({source})"),
                    _ => format!("{source} {join} {other}"),
                };
            }
            let expression = sandbox.compile(&source).expect(&source);
            let predicate = expression.native.clone().expect(&source);
            for _ in 0..8 {
                let mut value = || [0.0, 1.0, 2.0, -1.0, 2.5, -0.5, 3.0, 0.25][next(8) as usize];
                let (a, b, current, max, avg) = (value(), value(), value(), value(), value());
                let count = next(4) as i64;
                let mut scope = Scope::new();
                scope.push("a", a);
                scope.push("b", b);
                scope.push("current", current);
                let mut stats = Map::new();
                stats.insert("count".into(), Dynamic::from_int(count));
                stats.insert("max".into(), Dynamic::from_float(max));
                stats.insert("avg".into(), Dynamic::from_float(avg));
                let mut metrics = Map::new();
                metrics.insert("m".into(), Dynamic::from_map(stats));
                scope.push("metrics", metrics);
                let values: Vec<f64> = predicate
                    .operands
                    .iter()
                    .map(|o| match o {
                        Operand::Metric(n) if n == "a" => a,
                        Operand::Metric(_) => b,
                        Operand::Current => current,
                        Operand::Window(_, Stat::Count) => count as f64,
                        Operand::Window(_, Stat::Max) => max,
                        Operand::Window(..) => avg,
                    })
                    .collect();
                let rhai = sandbox.eval(&expression, &mut scope).expect(&source);
                assert_eq!(
                    rhai.holds(),
                    predicate.eval(&values),
                    "{source} at a={a} b={b} current={current} count={count} max={max} avg={avg}"
                );
                checked += 1;
            }
        }
        assert_eq!(checked, 24_000);
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
        // Without a wall-time limit: these must hit the deterministic limits even on a busy
        // machine.
        let sandbox = Sandbox::new(ScriptLimits {
            max_wall: Duration::from_secs(60),
            ..ScriptLimits::default()
        });
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
    fn blocking_and_clock_functions_are_refused_at_creation_with_their_position() {
        let sandbox = Sandbox::default();
        for (source, name, line, column) in [
            ("sleep(15); false", "sleep", 1, 1),
            ("temperature > 3 &&\n  sleep (0.5) == ()", "sleep", 2, 3),
            ("let t = timestamp(); t.elapsed() > 1.0", "timestamp", 1, 9),
            ("let t = 0; while t.elapsed() < 1.0 { } true", "elapsed", 1, 20),
            ("exit(true)", "exit", 1, 1),
        ] {
            match sandbox.check(source) {
                Err(ScriptError::Unavailable {
                    name: found,
                    line: l,
                    column: c,
                    ..
                }) => assert_eq!((found.as_str(), l, c), (name, line, column), "{source}"),
                other => panic!("{source}: {other:?}"),
            }
        }
        // Through a function pointer the scan cannot see the name: the creation run refuses it.
        for source in [
            "let f = Fn(\"sleep\"); f.call(15); false",
            "call(Fn(\"time\" + \"stamp\")); true",
        ] {
            let err = sandbox.check(source).unwrap_err();
            assert!(
                err.to_string().contains("is not available in rule expressions"),
                "{source}: {err:?}"
            );
        }
        // A metric or a local may be called `timestamp`: only calls are refused.
        assert!(sandbox.check("timestamp > 3").is_ok());
    }

    #[test]
    fn the_engine_has_no_blocking_or_clock_function_at_all() {
        // Reached through a function pointer, the scan cannot see the name: the engine itself
        // must not know the function.
        for source in [
            "call(Fn(\"sl\" + \"eep\"), 5); true",
            "call(Fn(\"timestamp\")); true",
            "call(Fn(\"exit\")); true",
        ] {
            let started = Instant::now();
            let err = run(source, &[]).unwrap_err();
            assert!(
                matches!(err, ScriptError::Unavailable { .. }),
                "{source}: {err:?}"
            );
            assert!(started.elapsed() < Duration::from_secs(1), "{source} blocked");
        }
        // What conditions use is still there.
        assert_eq!(
            run(
                "let x = [3.0, 1.0]; x.sort(); abs(-2) == 2 && x[0] == 1.0 && \"ab\".contains(\"b\") && max(1, 2) == 2 && #{a: 1}.len() == 1",
                &[]
            ),
            Ok(Verdict::True)
        );
    }

    #[test]
    fn an_evaluation_past_its_wall_time_is_stopped() {
        let sandbox = Sandbox::new(ScriptLimits {
            max_wall: Duration::ZERO,
            ..ScriptLimits::default()
        });
        let long = sandbox
            .compile("let i = 0; while i < 1000 { i += 1; } true")
            .unwrap();
        let err = sandbox.eval(&long, &mut Scope::new()).unwrap_err();
        assert!(matches!(err, ScriptError::Timeout { ms: 0, .. }), "{err:?}");
        // The deadline is checked every few hundred operations: a short expression finishes.
        let short = sandbox.compile("1 < 2").unwrap();
        assert_eq!(sandbox.eval(&short, &mut Scope::new()), Ok(Verdict::True));
        // At creation a timeout is a refusal like the other limits.
        assert!(matches!(
            sandbox.check("let i = 0; while i < 1000 { i += 1; } true"),
            Err(ScriptError::Timeout { .. })
        ));
        assert!(
            DEADLINE.with(Cell::get).is_none(),
            "the deadline does not outlive its evaluation"
        );
    }
}
