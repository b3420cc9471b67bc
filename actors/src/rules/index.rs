//! An index of a tenant's simple rules, so that one message is judged by many rules at once.
//!
//! A fleet's rules are mostly the same comparison with different thresholds (`m1 > 1000`,
//! `m1 > 1001`, … on every device, or one threshold per device type). Judging each rule on each
//! message costs the number of rules per message, and with a thousand rules that is more than
//! ingestion itself. Here the rules whose expression has a native [`Predicate`] are grouped by
//! [`Predicate::shape`] (and by what else decides their verdict: scope, `metric`, window): a
//! group's members differ only by the constant of their last comparison, which the group keeps
//! sorted. For one message the group reads its operands once, judges the rest of the predicate
//! with that comparison taken as true and as false, and finds with a binary search the members
//! for which the comparison holds: the members whose verdict holds are a range of the sorted
//! thresholds, or all, or none.
//!
//! Only the members whose verdict holds, or that keep state for the device (an active alarm, a
//! duration that started, hits of a repeating condition, a clear condition's timer), are then
//! judged one by one, by the same code as any rule. The others would have come out of that code
//! unchanged (a false verdict on an idle state does nothing), so skipping them changes nothing
//! but the time taken; the group counts their evaluations in one shared counter.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use super::RuleScope;
use super::condition::{CompiledRule, Condition};
use super::native::{Cmp, Predicate};
use crate::ids::DeviceId;

/// A set of rule positions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Bits(Vec<u64>);

impl Bits {
    pub(super) fn new(len: usize) -> Bits {
        Bits(vec![0; len.div_ceil(64)])
    }

    pub(super) fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }

    pub(super) fn contains(&self, i: usize) -> bool {
        self.0[i / 64] & (1 << (i % 64)) != 0
    }

    pub(super) fn unset(&mut self, i: usize) {
        self.0[i / 64] &= !(1 << (i % 64));
    }

    pub(super) fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }

    pub(super) fn union(&mut self, other: &Bits) {
        for (a, b) in self.0.iter_mut().zip(&other.0) {
            *a |= *b;
        }
    }

    /// The positions in the set from `start` on, in order.
    pub(super) fn ones_from(&self, start: usize) -> Vec<usize> {
        let mut out = Vec::new();
        for (w, word) in self.0.iter().enumerate().skip(start / 64) {
            let mut word = *word;
            if w == start / 64 {
                word &= u64::MAX << (start % 64);
            }
            while word != 0 {
                out.push(w * 64 + word.trailing_zeros() as usize);
                word &= word - 1;
            }
        }
        out
    }
}

/// Rules of one shape: the same predicate but for the threshold of its last comparison, the
/// same scope, `metric` and window.
#[derive(Debug)]
pub(super) struct ShapeGroup {
    /// The first member's predicate (the others differ by the threshold only).
    pub(super) predicate: Arc<Predicate>,
    pub(super) window_metrics: Vec<String>,
    /// (threshold, rule position), by threshold; the threshold is 0 for a predicate without one.
    pub(super) members: Vec<(f64, usize)>,
    /// Messages the group judged: each is an evaluation of every member.
    pub(super) evaluations: Arc<AtomicU64>,
}

impl ShapeGroup {
    /// A member's rule position, whose spec stands for the group's scope, metric and window.
    pub(super) fn probe(&self) -> usize {
        self.members[0].1
    }

    pub(super) fn all(&self, out: &mut Bits) {
        for (_, rule) in &self.members {
            out.set(*rule);
        }
    }

    /// Adds to `out` the members whose predicate holds when its operands are `values`.
    pub(super) fn holding(&self, values: &[f64], out: &mut Bits) {
        let Some(threshold) = self.predicate.threshold else {
            if self.predicate.eval(values) {
                self.all(out);
            }
            return;
        };
        let when_holds = self.predicate.eval_with_threshold(values, true);
        let when_not = self.predicate.eval_with_threshold(values, false);
        if when_holds == when_not {
            if when_holds {
                self.all(out);
            }
            return;
        }
        let x = values[threshold.operand];
        let n = self.members.len();
        let below = |f: &dyn Fn(f64) -> bool| self.members.partition_point(|(t, _)| f(*t));
        // The members whose comparison `x op t` holds: a range of the sorted thresholds.
        let (from, to) = if x.is_nan() {
            (0, 0)
        } else {
            match threshold.op {
                Cmp::Gt => (0, below(&|t| t < x)),
                Cmp::Ge => (0, below(&|t| t <= x)),
                Cmp::Lt => (below(&|t| t <= x), n),
                Cmp::Le => (below(&|t| t < x), n),
                Cmp::Eq | Cmp::Ne => unreachable!("a threshold is an ordering"),
            }
        };
        if when_holds {
            for (_, rule) in &self.members[from..to] {
                out.set(*rule);
            }
        } else {
            for (_, rule) in self.members[..from].iter().chain(&self.members[to..]) {
                out.set(*rule);
            }
        }
    }
}

/// What may concern the devices of one scope bucket.
#[derive(Debug, Default)]
pub(super) struct Candidates {
    /// Rules judged one by one on each message (not in a group).
    pub(super) ungrouped: Bits,
    /// Positions in [`RuleIndex::groups`].
    pub(super) groups: Vec<usize>,
}

/// The index of a tenant's rules, rebuilt whenever its rule set changes.
#[derive(Debug, Default)]
pub(super) struct RuleIndex {
    /// Rules and groups for every device (scope `all`), or for members of a device group or
    /// tag (their membership is checked when judged).
    pub(super) everyone: Candidates,
    /// By device type, and by device, for rules scoped to one: a message meets only its own.
    pub(super) by_type: HashMap<String, Candidates>,
    pub(super) by_device: HashMap<DeviceId, Candidates>,
    pub(super) groups: Vec<ShapeGroup>,
    /// Per device, the grouped rules holding state for it (a superset: a rule whose state went
    /// idle leaves the set the next time it is judged).
    pub(super) stateful: HashMap<DeviceId, Bits>,
    len: usize,
}

/// What besides the shape decides a rule's verdict.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct GroupKey {
    shape: String,
    scope: String,
    metric: Option<String>,
    window_ms: i64,
    window_metrics: Vec<String>,
}

fn scope_key(scope: &RuleScope) -> String {
    match scope {
        RuleScope::All => "all".into(),
        RuleScope::DeviceType(t) => format!("type:{t}"),
        // Members are resolved once per rule set: the same set is the same allocation.
        RuleScope::Group { members, .. } | RuleScope::Tag { members, .. } => {
            format!("members:{:p}", Arc::as_ptr(members))
        }
        RuleScope::Device(d) => format!("device:{}", d.as_str()),
    }
}

impl RuleIndex {
    /// Groups `rules`, and shares each group's evaluation counter with its members' stats.
    pub(super) fn build(rules: &mut [CompiledRule]) -> RuleIndex {
        let len = rules.len();
        let mut index = RuleIndex {
            everyone: Candidates {
                ungrouped: Bits::new(len),
                groups: Vec::new(),
            },
            len,
            ..RuleIndex::default()
        };
        let mut by_key: HashMap<GroupKey, usize> = HashMap::new();
        let mut groups: Vec<ShapeGroup> = Vec::new();
        for (position, rule) in rules.iter_mut().enumerate() {
            let expr = match &rule.condition {
                Condition::Expression(expr)
                | Condition::Duration { expr, .. }
                | Condition::Repeating { expr, .. } => Some(expr),
                _ => None,
            };
            let native = expr.and_then(|e| e.native.clone().map(|p| (e, p)));
            let (Some((expr, predicate)), true) = (native, rule.spec.enabled) else {
                rule.grouped = false;
                rule.stats.share(None);
                index.bucket(&rule.spec.scope).ungrouped.set(position);
                continue;
            };
            let key = GroupKey {
                shape: predicate.shape(),
                scope: scope_key(&rule.spec.scope),
                metric: rule.spec.metric.clone(),
                window_ms: if expr.window_metrics.is_empty() {
                    0
                } else {
                    rule.spec.window_ms
                },
                window_metrics: expr.window_metrics.clone(),
            };
            let threshold = predicate.threshold.map_or(0.0, |t| t.threshold);
            let group = match by_key.get(&key) {
                Some(group) => *group,
                None => {
                    groups.push(ShapeGroup {
                        predicate: predicate.clone(),
                        window_metrics: expr.window_metrics.clone(),
                        members: Vec::new(),
                        evaluations: Arc::new(AtomicU64::new(0)),
                    });
                    index.bucket(&rule.spec.scope).groups.push(groups.len() - 1);
                    by_key.insert(key, groups.len() - 1);
                    groups.len() - 1
                }
            };
            groups[group].members.push((threshold, position));
            rule.grouped = true;
            rule.stats.share(Some(&groups[group].evaluations));
        }
        for group in &mut groups {
            group.members.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
        let mut stateful: HashMap<DeviceId, Bits> = HashMap::new();
        for (position, rule) in rules.iter().enumerate().filter(|(_, r)| r.grouped) {
            for device in rule.devices.keys() {
                stateful
                    .entry(device.clone())
                    .or_insert_with(|| Bits::new(rules.len()))
                    .set(position);
            }
        }
        index.groups = groups;
        index.stateful = stateful;
        index
    }

    fn bucket(&mut self, scope: &RuleScope) -> &mut Candidates {
        let len = self.len;
        let fresh = || Candidates {
            ungrouped: Bits::new(len),
            groups: Vec::new(),
        };
        match scope {
            RuleScope::DeviceType(t) => self.by_type.entry(t.clone()).or_insert_with(fresh),
            RuleScope::Device(d) => self.by_device.entry(d.clone()).or_insert_with(fresh),
            RuleScope::All | RuleScope::Group { .. } | RuleScope::Tag { .. } => &mut self.everyone,
        }
    }

    /// The candidates for a device of `device_type`: scope `all`, group and tag rules, and
    /// those scoped to its type or to itself.
    pub(super) fn candidates<'a>(
        &'a self,
        device: &DeviceId,
        device_type: &str,
    ) -> impl Iterator<Item = &'a Candidates> {
        [
            Some(&self.everyone),
            self.by_type.get(device_type),
            self.by_device.get(device),
        ]
        .into_iter()
        .flatten()
    }

    /// Rules the index was built for.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Records whether grouped rule `position` keeps state for `device` after it was judged.
    pub(super) fn set_stateful(&mut self, device: &DeviceId, position: usize, stateful: bool) {
        if stateful {
            let len = self.len;
            self.stateful
                .entry(device.clone())
                .or_insert_with(|| Bits::new(len))
                .set(position);
        } else if let Some(bits) = self.stateful.get_mut(device) {
            bits.unset(position);
            if bits.is_empty() {
                self.stateful.remove(device);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(sources: &[&str]) -> ShapeGroup {
        let predicates: Vec<Predicate> = sources.iter().map(|s| Predicate::parse(s).unwrap()).collect();
        let mut members: Vec<(f64, usize)> = predicates
            .iter()
            .enumerate()
            .map(|(i, p)| (p.threshold.map_or(0.0, |t| t.threshold), i))
            .collect();
        members.sort_by(|a, b| a.0.total_cmp(&b.0));
        ShapeGroup {
            predicate: Arc::new(predicates[0].clone()),
            window_metrics: Vec::new(),
            members,
            evaluations: Arc::default(),
        }
    }

    /// Each member's verdict from the group equals its own predicate's, for every operator,
    /// values on, between and beyond the thresholds, and both sides of the rest of the
    /// predicate.
    #[test]
    fn a_group_judges_as_its_members_would() {
        for op in ["<", "<=", ">", ">=", "== 1 || m1 >", "!= 1 && m1 <"] {
            for gate in ["seq < 0 || ", "seq >= 0 && ", "!(seq < 0) && ", ""] {
                let thresholds = [5.0, -2.5, 5.0, 10.0, 0.0, 7.25];
                let sources: Vec<String> = thresholds
                    .iter()
                    .map(|t| {
                        let t = if *t < 0.0 {
                            format!("-{}", -t)
                        } else {
                            format!("{t}")
                        };
                        format!("{gate}m1 {op} {t}")
                    })
                    .collect();
                let refs: Vec<&str> = sources.iter().map(String::as_str).collect();
                let g = group(&refs);
                let predicates: Vec<Predicate> = refs.iter().map(|s| Predicate::parse(s).unwrap()).collect();
                for seq in [-1.0, 1.0] {
                    for m1 in [-3.0, -2.5, 0.0, 1.0, 5.0, 6.0, 7.25, 10.0, 11.0] {
                        let mut out = Bits::new(refs.len());
                        let values: Vec<f64> = g
                            .predicate
                            .operands
                            .iter()
                            .map(|o| match o {
                                super::super::native::Operand::Metric(n) if n == "seq" => seq,
                                _ => m1,
                            })
                            .collect();
                        g.holding(&values, &mut out);
                        for (i, p) in predicates.iter().enumerate() {
                            assert_eq!(
                                out.ones_from(0).contains(&i),
                                p.eval(&values),
                                "{} at seq={seq} m1={m1}",
                                refs[i]
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn bits_list_their_members_in_order() {
        let mut b = Bits::new(200);
        for i in [0, 3, 63, 64, 130, 199] {
            b.set(i);
        }
        assert_eq!(b.ones_from(0), vec![0, 3, 63, 64, 130, 199]);
        assert_eq!(b.ones_from(4), vec![63, 64, 130, 199]);
        assert_eq!(b.ones_from(64), vec![64, 130, 199]);
        assert_eq!(b.ones_from(131), vec![199]);
        b.unset(199);
        assert_eq!(b.ones_from(131), Vec::<usize>::new());
        assert!(!b.is_empty());
        assert!(Bits::new(10).is_empty());
    }
}
