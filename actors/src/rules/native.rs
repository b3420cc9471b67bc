//! The simplest rule expressions, judged without the script engine.
//!
//! Most fleet rules compare metrics with constants: `temperature > 80`,
//! `pressure < 2 || valve_closed_pct > 90.5`, `metrics.rpm.count > 2 && metrics.rpm.max > 7000`.
//! Such an expression is parsed here a second time, into a [`Predicate`]: comparisons (`<`, `<=`,
//! `>`, `>=`, `==`, `!=`) between numbers, metrics, `current` and window statistics
//! (`metrics.<name>.<avg|std|min|max|last|sum|count>`), joined by `&&`, `||`, `!` and
//! parentheses. Anything else (arithmetic, strings, functions, maps, comments, severities as
//! results) is left to rhai alone.
//!
//! A predicate only decides when every value it reads is a number; otherwise the caller runs
//! the rhai expression, so a missing metric, a string where a number was expected, or any other
//! case that rhai answers with an error or a non-boolean is answered by rhai, as before. Where
//! every value is a number, rhai's comparisons are those of `f64` (an integer literal or a
//! window's `count` is compared as a float, exactly for the magnitudes accepted here) and its
//! `&&`/`||` short-circuit without side effects: the predicate's answer is rhai's (a
//! differential test checks this against the engine).
//!
//! A predicate whose last comparison sets an operand against a constant with `<`, `<=`, `>` or
//! `>=` also has a [`Predicate::shape`]: the predicate with that constant left out. Rules of one
//! shape differ only by that threshold, which the evaluator's index sorts so that one message is
//! judged by a whole shape with a binary search (see `index`).

use std::fmt::Write as _;

use super::names::is_keyword;
use super::script::CONTEXT_VARIABLES;

/// Integers beyond this are not exact as `f64`: such literals are left to rhai.
const EXACT_INTEGER: f64 = 9_007_199_254_740_992.0;

/// A statistic of a metric's window, as `metrics.<name>.<stat>` reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stat {
    Avg,
    Std,
    Min,
    Max,
    Last,
    Sum,
    Count,
}

impl Stat {
    fn parse(name: &str) -> Option<Stat> {
        Some(match name {
            "avg" => Stat::Avg,
            "std" => Stat::Std,
            "min" => Stat::Min,
            "max" => Stat::Max,
            "last" => Stat::Last,
            "sum" => Stat::Sum,
            "count" => Stat::Count,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Stat::Avg => "avg",
            Stat::Std => "std",
            Stat::Min => "min",
            Stat::Max => "max",
            Stat::Last => "last",
            Stat::Sum => "sum",
            Stat::Count => "count",
        }
    }
}

/// A value a predicate reads.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Operand {
    /// A metric of the message, by name.
    Metric(String),
    /// `current`: the rule's metric when the rule names one, otherwise a metric called `current`.
    Current,
    /// `metrics.<name>.<stat>`: a statistic of the metric's window.
    Window(String, Stat),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cmp {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

impl Cmp {
    fn holds(self, a: f64, b: f64) -> bool {
        match self {
            Cmp::Lt => a < b,
            Cmp::Le => a <= b,
            Cmp::Gt => a > b,
            Cmp::Ge => a >= b,
            Cmp::Eq => a == b,
            Cmp::Ne => a != b,
        }
    }

    /// `b op' a` for `a op b`.
    fn flipped(self) -> Cmp {
        match self {
            Cmp::Lt => Cmp::Gt,
            Cmp::Le => Cmp::Ge,
            Cmp::Gt => Cmp::Lt,
            Cmp::Ge => Cmp::Le,
            other => other,
        }
    }

    fn symbol(self) -> &'static str {
        match self {
            Cmp::Lt => "<",
            Cmp::Le => "<=",
            Cmp::Gt => ">",
            Cmp::Ge => ">=",
            Cmp::Eq => "==",
            Cmp::Ne => "!=",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Term {
    /// Index into [`Predicate::operands`].
    Operand(usize),
    Number(f64),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    Bool(bool),
    /// `index`: the comparison's position in the source (the shape leaves out the last one's
    /// constant).
    Compare {
        index: usize,
        left: Term,
        op: Cmp,
        right: Term,
    },
    Not(Box<Node>),
    And(Box<Node>, Box<Node>),
    Or(Box<Node>, Box<Node>),
}

/// The last comparison of a predicate when it sets an operand against a constant with an
/// ordering: `operand op threshold` (written either way round in the source).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Threshold {
    /// The comparison's [`Node::Compare`] index.
    pub index: usize,
    /// Index into [`Predicate::operands`].
    pub operand: usize,
    /// `operand op threshold` (`Lt`, `Le`, `Gt` or `Ge`).
    pub op: Cmp,
    pub threshold: f64,
}

/// A parsed expression that can be judged without rhai.
#[derive(Debug, Clone, PartialEq)]
pub struct Predicate {
    pub root: Node,
    pub operands: Vec<Operand>,
    pub threshold: Option<Threshold>,
}

impl Predicate {
    /// The predicate of `source`, when the whole source is in the subset described above.
    pub fn parse(source: &str) -> Option<Predicate> {
        let tokens = tokenize(source)?;
        let mut parser = Parser {
            tokens,
            at: 0,
            operands: Vec::new(),
            compares: 0,
        };
        let root = parser.or()?;
        if parser.at != parser.tokens.len() {
            return None;
        }
        let threshold = last_compare(&root).and_then(|(index, left, op, right)| {
            let (operand, op, threshold) = match (left, right) {
                (Term::Operand(o), Term::Number(n)) => (o, op, n),
                (Term::Number(n), Term::Operand(o)) => (o, op.flipped(), n),
                _ => return None,
            };
            matches!(op, Cmp::Lt | Cmp::Le | Cmp::Gt | Cmp::Ge).then_some(Threshold {
                index,
                operand,
                op,
                threshold,
            })
        });
        Some(Predicate {
            root,
            operands: parser.operands,
            threshold,
        })
    }

    /// The verdict when operand `i` has the value `values[i]`.
    pub fn eval(&self, values: &[f64]) -> bool {
        eval(&self.root, values, None)
    }

    /// The verdict with the threshold comparison taken as `holds`, whatever its operand.
    pub fn eval_with_threshold(&self, values: &[f64], holds: bool) -> bool {
        eval(&self.root, values, self.threshold.map(|t| (t.index, holds)))
    }

    /// The predicate written out with the threshold's constant left out (written out whole
    /// without a threshold comparison): predicates of one shape differ by that constant only.
    pub fn shape(&self) -> String {
        let mut out = String::new();
        let hole = self.threshold.map_or(usize::MAX, |t| t.index);
        write_node(&mut out, &self.root, &self.operands, hole);
        out
    }
}

fn eval(node: &Node, values: &[f64], hole: Option<(usize, bool)>) -> bool {
    match node {
        Node::Bool(b) => *b,
        Node::Compare {
            index,
            left,
            op,
            right,
        } => match hole {
            Some((at, holds)) if at == *index => holds,
            _ => op.holds(term(*left, values), term(*right, values)),
        },
        Node::Not(inner) => !eval(inner, values, hole),
        Node::And(a, b) => eval(a, values, hole) && eval(b, values, hole),
        Node::Or(a, b) => eval(a, values, hole) || eval(b, values, hole),
    }
}

fn term(t: Term, values: &[f64]) -> f64 {
    match t {
        Term::Operand(i) => values[i],
        Term::Number(n) => n,
    }
}

fn last_compare(node: &Node) -> Option<(usize, Term, Cmp, Term)> {
    match node {
        Node::Bool(_) => None,
        Node::Compare {
            index,
            left,
            op,
            right,
        } => Some((*index, *left, *op, *right)),
        Node::Not(inner) => last_compare(inner),
        Node::And(a, b) | Node::Or(a, b) => last_compare(b).or_else(|| last_compare(a)),
    }
}

fn write_term(out: &mut String, t: Term, operands: &[Operand]) {
    match t {
        Term::Operand(i) => match &operands[i] {
            Operand::Metric(name) => {
                let _ = write!(out, "${name}");
            }
            Operand::Current => out.push_str("@current"),
            Operand::Window(name, stat) => {
                let _ = write!(out, "@metrics.{name}.{}", stat.name());
            }
        },
        // Exact: `{:?}` of an f64 reads back as the same value.
        Term::Number(n) => {
            let _ = write!(out, "{n:?}");
        }
    }
}

fn write_node(out: &mut String, node: &Node, operands: &[Operand], hole: usize) {
    match node {
        Node::Bool(b) => {
            let _ = write!(out, "{b}");
        }
        Node::Compare {
            index,
            left,
            op,
            right,
        } => {
            out.push('(');
            if *index == hole {
                // The threshold comparison, normalised to `operand op ?`.
                let (operand, op) = match (left, right) {
                    (Term::Operand(_), _) => (*left, *op),
                    _ => (*right, op.flipped()),
                };
                write_term(out, operand, operands);
                let _ = write!(out, " {} ?", op.symbol());
            } else {
                write_term(out, *left, operands);
                let _ = write!(out, " {} ", op.symbol());
                write_term(out, *right, operands);
            }
            out.push(')');
        }
        Node::Not(inner) => {
            out.push('!');
            write_node(out, inner, operands, hole);
        }
        Node::And(a, b) | Node::Or(a, b) => {
            out.push('(');
            write_node(out, a, operands, hole);
            out.push_str(if matches!(node, Node::And(..)) {
                " && "
            } else {
                " || "
            });
            write_node(out, b, operands, hole);
            out.push(')');
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    Number(f64),
    Dot,
    Open,
    Close,
    Not,
    Minus,
    And,
    Or,
    Cmp(Cmp),
}

/// Tokens of the subset; `None` at the first character outside it.
fn tokenize(source: &str) -> Option<Vec<Token>> {
    let bytes = source.as_bytes();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        let next = bytes.get(i + 1).copied();
        match c {
            b' ' | b'\t' | b'\n' | b'\r' => i += 1,
            b'(' | b')' | b'.' | b'-' => {
                tokens.push(match c {
                    b'(' => Token::Open,
                    b')' => Token::Close,
                    b'.' => Token::Dot,
                    _ => Token::Minus,
                });
                i += 1;
            }
            b'&' if next == Some(b'&') => {
                tokens.push(Token::And);
                i += 2;
            }
            b'|' if next == Some(b'|') => {
                tokens.push(Token::Or);
                i += 2;
            }
            b'!' if next == Some(b'=') => {
                tokens.push(Token::Cmp(Cmp::Ne));
                i += 2;
            }
            b'!' => {
                tokens.push(Token::Not);
                i += 1;
            }
            b'=' if next == Some(b'=') => {
                tokens.push(Token::Cmp(Cmp::Eq));
                i += 2;
            }
            b'<' | b'>' => {
                let or_equal = next == Some(b'=');
                tokens.push(Token::Cmp(match (c, or_equal) {
                    (b'<', false) => Cmp::Lt,
                    (b'<', true) => Cmp::Le,
                    (_, false) => Cmp::Gt,
                    (_, true) => Cmp::Ge,
                }));
                i += if or_equal { 2 } else { 1 };
            }
            b'0'..=b'9' => {
                let start = i;
                while i < bytes.len() && bytes[i].is_ascii_digit() {
                    i += 1;
                }
                if i < bytes.len() && bytes[i] == b'.' {
                    // `1.5` only: `1.` or `1.e3` are left to rhai.
                    i += 1;
                    let fraction = i;
                    while i < bytes.len() && bytes[i].is_ascii_digit() {
                        i += 1;
                    }
                    if i == fraction {
                        return None;
                    }
                }
                // `1e5`, `0x1f`, `1_000`, `5i`: left to rhai.
                if i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                    return None;
                }
                let text = &source[start..i];
                let value: f64 = text.parse().ok()?;
                // An integer literal must be exact as a float (rhai keeps it an integer).
                if !text.contains('.') && value.abs() > EXACT_INTEGER {
                    return None;
                }
                tokens.push(Token::Number(value));
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                let start = i;
                while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                    i += 1;
                }
                tokens.push(Token::Ident(source[start..i].to_string()));
            }
            _ => return None,
        }
    }
    Some(tokens)
}

struct Parser {
    tokens: Vec<Token>,
    at: usize,
    operands: Vec<Operand>,
    compares: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at)
    }

    fn eat(&mut self, token: &Token) -> bool {
        if self.peek() == Some(token) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    fn or(&mut self) -> Option<Node> {
        let mut node = self.and()?;
        while self.eat(&Token::Or) {
            node = Node::Or(Box::new(node), Box::new(self.and()?));
        }
        Some(node)
    }

    fn and(&mut self) -> Option<Node> {
        let mut node = self.unary()?;
        while self.eat(&Token::And) {
            node = Node::And(Box::new(node), Box::new(self.unary()?));
        }
        Some(node)
    }

    fn unary(&mut self) -> Option<Node> {
        if self.eat(&Token::Not) {
            return Some(Node::Not(Box::new(self.unary()?)));
        }
        if self.eat(&Token::Open) {
            let inner = self.or()?;
            return self.eat(&Token::Close).then_some(inner);
        }
        match self.peek() {
            Some(Token::Ident(name)) if name == "true" || name == "false" => {
                let value = name == "true";
                self.at += 1;
                Some(Node::Bool(value))
            }
            _ => self.compare(),
        }
    }

    fn compare(&mut self) -> Option<Node> {
        let left = self.term()?;
        let Some(Token::Cmp(op)) = self.peek().cloned() else {
            return None;
        };
        self.at += 1;
        let right = self.term()?;
        // `a < b < c` compares a boolean with a number in rhai: an error, left to rhai.
        if matches!(self.peek(), Some(Token::Cmp(_))) {
            return None;
        }
        let index = self.compares;
        self.compares += 1;
        Some(Node::Compare {
            index,
            left,
            op,
            right,
        })
    }

    fn operand(&mut self, operand: Operand) -> Term {
        let index = match self.operands.iter().position(|o| *o == operand) {
            Some(i) => i,
            None => {
                self.operands.push(operand);
                self.operands.len() - 1
            }
        };
        Term::Operand(index)
    }

    fn term(&mut self) -> Option<Term> {
        match self.peek().cloned()? {
            Token::Number(n) => {
                self.at += 1;
                Some(Term::Number(n))
            }
            // `-5` (and `- 5`): a negated literal; `-x` is left to rhai.
            Token::Minus => {
                self.at += 1;
                let Some(Token::Number(n)) = self.peek().cloned() else {
                    return None;
                };
                self.at += 1;
                Some(Term::Number(-n))
            }
            Token::Ident(name) if name == "metrics" => {
                self.at += 1;
                if !self.eat(&Token::Dot) {
                    return None;
                }
                let Some(Token::Ident(metric)) = self.peek().cloned() else {
                    return None;
                };
                self.at += 1;
                if !self.eat(&Token::Dot) {
                    return None;
                }
                let Some(Token::Ident(stat)) = self.peek().cloned() else {
                    return None;
                };
                self.at += 1;
                let stat = Stat::parse(&stat)?;
                if matches!(self.peek(), Some(Token::Dot | Token::Open)) {
                    return None;
                }
                Some(self.operand(Operand::Window(metric, stat)))
            }
            Token::Ident(name) => {
                // The evaluator's other variables (strings, maps, or `zscore`, which only
                // statistical conditions set) and rhai's keywords are not metrics.
                if name != "current" && (CONTEXT_VARIABLES.contains(&name.as_str()) || is_keyword(&name)) {
                    return None;
                }
                self.at += 1;
                // A property or a call (`x.y`, `f(x)`) is left to rhai.
                if matches!(self.peek(), Some(Token::Dot | Token::Open)) {
                    return None;
                }
                Some(if name == "current" {
                    self.operand(Operand::Current)
                } else {
                    self.operand(Operand::Metric(name))
                })
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(p: &Predicate, pairs: &[(&str, f64)]) -> Vec<f64> {
        p.operands
            .iter()
            .map(|o| match o {
                Operand::Metric(n) => pairs.iter().find(|(k, _)| k == n).unwrap().1,
                Operand::Current => pairs.iter().find(|(k, _)| *k == "current").unwrap().1,
                Operand::Window(n, s) => {
                    let key = format!("{n}.{}", s.name());
                    pairs.iter().find(|(k, _)| *k == key).unwrap().1
                }
            })
            .collect()
    }

    #[test]
    fn parses_the_subset_and_judges_it() {
        let p = Predicate::parse("seq < 0 || m1 > 1000").unwrap();
        assert_eq!(
            p.operands,
            vec![Operand::Metric("seq".into()), Operand::Metric("m1".into())]
        );
        assert!(!p.eval(&values(&p, &[("seq", 5.0), ("m1", 20.0)])));
        assert!(p.eval(&values(&p, &[("seq", -1.0), ("m1", 20.0)])));
        assert!(p.eval(&values(&p, &[("seq", 5.0), ("m1", 1000.5)])));
        let t = p.threshold.unwrap();
        assert_eq!((t.operand, t.op, t.threshold), (1, Cmp::Gt, 1000.0));

        let w = Predicate::parse("metrics.m1.count > 2 && metrics.m1.max > 1003").unwrap();
        assert_eq!(
            w.operands,
            vec![
                Operand::Window("m1".into(), Stat::Count),
                Operand::Window("m1".into(), Stat::Max)
            ]
        );
        assert!(w.eval(&values(&w, &[("m1.count", 3.0), ("m1.max", 1004.0)])));
        assert!(!w.eval(&values(&w, &[("m1.count", 2.0), ("m1.max", 1004.0)])));

        let flipped = Predicate::parse("30.5 <= current").unwrap();
        let t = flipped.threshold.unwrap();
        assert_eq!((t.op, t.threshold), (Cmp::Ge, 30.5));
        assert!(flipped.eval(&values(&flipped, &[("current", 30.5)])));

        let not = Predicate::parse("!(a == 1) && (b != 2 || false)").unwrap();
        assert!(not.eval(&values(&not, &[("a", 0.0), ("b", 1.0)])));
        assert!(not.threshold.is_none(), "the last comparison is not an ordering");

        let negative = Predicate::parse("temperature < - 10.5").unwrap();
        assert_eq!(negative.threshold.unwrap().threshold, -10.5);
    }

    #[test]
    fn leaves_everything_else_to_rhai() {
        for source in [
            "m1 + 1 > 3",
            "m1 > 1e3",
            "m1 > 0x10",
            "m1 > 1_000",
            "m1 > -x",
            "m1 > --5",
            "m1 - 5 > 3",
            "abs(m1) > 3",
            "m1",
            "m1 > 3 // comment",
            "device == \"d1\"",
            "metadata.site == 1",
            "metrics.m1.p99 > 3",
            "metrics.m1 > 3",
            "a < b < c",
            "m1 > 3;",
            "if m1 > 3 { \"critical\" } else { false }",
            "m1 > 3 & m2 > 4",
            "zscore > 3",
            "m1 > 99999999999999999999",
            "(m1) > 3",
            "m1 > 3 && ",
        ] {
            assert!(Predicate::parse(source).is_none(), "{source}");
        }
    }

    #[test]
    fn a_shape_leaves_out_the_last_threshold_only() {
        let a = Predicate::parse("seq < 0 || m1 > 1000").unwrap();
        let b = Predicate::parse("seq<0||m1>1001.5").unwrap();
        let c = Predicate::parse("seq < 1 || m1 > 1000").unwrap();
        let d = Predicate::parse("seq < 0 || 1000 < m1").unwrap();
        assert_eq!(a.shape(), b.shape());
        assert_ne!(a.shape(), c.shape());
        assert_eq!(
            a.shape(),
            d.shape(),
            "written the other way round, the same comparison"
        );
        assert_eq!(a.shape(), "(($seq < 0.0) || ($m1 > ?))");
        let whole = Predicate::parse("a == 1").unwrap();
        assert_eq!(whole.shape(), "($a == 1.0)");
        // With the threshold comparison taken as given.
        let v = values(&a, &[("seq", 5.0), ("m1", 0.0)]);
        assert!(a.eval_with_threshold(&v, true));
        assert!(!a.eval_with_threshold(&v, false));
    }
}
