//! The subscription tree of one namespace: topic filters to subscribers, matched per level.
//!
//! Each node holds the subscribers whose filter ends there, those of `<node>/#`, and children
//! for literal levels and `+`. Matching a topic name walks one path per matching branch, so
//! its cost depends on the depth of the topic and on the wildcards in use, not on the number of
//! subscriptions. Shared subscriptions (`$share/<group>/<filter>`) are kept per (group, filter);
//! each message goes to one member, round robin, preferring members that are connected.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicUsize, Ordering};

pub struct SubscriptionTree<K, O> {
    root: Node<K, O>,
    len: usize,
}

struct Node<K, O> {
    literal: HashMap<Box<str>, Node<K, O>>,
    single: Option<Box<Node<K, O>>>,
    /// Subscribers of `<this node>/#`.
    multi: Leaf<K, O>,
    /// Subscribers whose filter ends at this node.
    exact: Leaf<K, O>,
}

struct Leaf<K, O> {
    direct: HashMap<K, O>,
    shared: HashMap<Box<str>, SharedGroup<K, O>>,
}

struct SharedGroup<K, O> {
    members: Vec<(K, O)>,
    next: AtomicUsize,
}

impl<K, O> Default for Node<K, O> {
    fn default() -> Self {
        Node {
            literal: HashMap::new(),
            single: None,
            multi: Leaf::default(),
            exact: Leaf::default(),
        }
    }
}

impl<K, O> Default for Leaf<K, O> {
    fn default() -> Self {
        Leaf {
            direct: HashMap::new(),
            shared: HashMap::new(),
        }
    }
}

impl<K, O> Node<K, O> {
    fn is_empty(&self) -> bool {
        self.literal.is_empty()
            && self.single.is_none()
            && self.multi.direct.is_empty()
            && self.multi.shared.is_empty()
            && self.exact.direct.is_empty()
            && self.exact.shared.is_empty()
    }
}

/// What a topic name matched: direct subscribers, and one chosen member per shared group.
pub struct Matches<'a, K, O> {
    pub direct: Vec<(&'a K, &'a O)>,
    pub shared: Vec<(&'a K, &'a O)>,
}

impl<K: Eq + Hash + Clone, O> Default for SubscriptionTree<K, O> {
    fn default() -> Self {
        SubscriptionTree {
            root: Node::default(),
            len: 0,
        }
    }
}

impl<K: Eq + Hash + Clone, O> SubscriptionTree<K, O> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Subscriptions in the tree.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds or replaces `key`'s subscription to a valid `filter`. Returns true if it replaced one.
    pub fn insert(&mut self, filter: &str, share: Option<&str>, key: K, options: O) -> bool {
        let leaf = Self::leaf_mut(&mut self.root, filter);
        let replaced = match share {
            None => leaf.direct.insert(key, options).is_some(),
            Some(group) => {
                let group = leaf.shared.entry(group.into()).or_insert_with(|| SharedGroup {
                    members: Vec::new(),
                    next: AtomicUsize::new(0),
                });
                match group.members.iter_mut().find(|(k, _)| *k == key) {
                    Some(member) => {
                        member.1 = options;
                        true
                    }
                    None => {
                        group.members.push((key, options));
                        false
                    }
                }
            }
        };
        if !replaced {
            self.len += 1;
        }
        replaced
    }

    fn leaf_mut<'a>(mut node: &'a mut Node<K, O>, filter: &str) -> &'a mut Leaf<K, O> {
        let mut levels = filter.split('/').peekable();
        while let Some(level) = levels.next() {
            if level == "#" {
                return &mut node.multi;
            }
            node = if level == "+" {
                node.single.get_or_insert_with(Default::default)
            } else {
                node.literal.entry(level.into()).or_default()
            };
            if levels.peek().is_none() {
                return &mut node.exact;
            }
        }
        &mut node.exact
    }

    /// Removes `key`'s subscription to `filter`. Returns whether there was one.
    pub fn remove(&mut self, filter: &str, share: Option<&str>, key: &K) -> bool {
        let levels: Vec<&str> = filter.split('/').collect();
        let removed = Self::remove_at(&mut self.root, &levels, share, key);
        if removed {
            self.len -= 1;
        }
        removed
    }

    fn remove_at(node: &mut Node<K, O>, levels: &[&str], share: Option<&str>, key: &K) -> bool {
        let remove_from = |leaf: &mut Leaf<K, O>| match share {
            None => leaf.direct.remove(key).is_some(),
            Some(group) => {
                let Some(members) = leaf.shared.get_mut(group) else {
                    return false;
                };
                let before = members.members.len();
                members.members.retain(|(k, _)| k != key);
                let removed = members.members.len() != before;
                if members.members.is_empty() {
                    leaf.shared.remove(group);
                }
                removed
            }
        };
        match levels {
            [] => remove_from(&mut node.exact),
            ["#"] => remove_from(&mut node.multi),
            [level, rest @ ..] => {
                let (removed, prune) = if *level == "+" {
                    match node.single.as_mut() {
                        Some(child) => {
                            let removed = Self::remove_at(child, rest, share, key);
                            (removed, child.is_empty())
                        }
                        None => (false, false),
                    }
                } else {
                    match node.literal.get_mut(*level) {
                        Some(child) => {
                            let removed = Self::remove_at(child, rest, share, key);
                            (removed, child.is_empty())
                        }
                        None => (false, false),
                    }
                };
                if prune {
                    if *level == "+" {
                        node.single = None;
                    } else {
                        node.literal.remove(*level);
                    }
                }
                removed
            }
        }
    }

    /// Subscribers matching a valid topic `name`. `available` tells which shared-group members
    /// can take a message now (connected); when none can, the round robin picks any.
    pub fn matches<'a>(&'a self, name: &str, available: impl Fn(&K) -> bool) -> Matches<'a, K, O> {
        let mut out = Matches {
            direct: Vec::new(),
            shared: Vec::new(),
        };
        let levels: Vec<&str> = name.split('/').collect();
        // Wildcards at the first level never match `$` topics.
        let dollar = name.starts_with('$');
        Self::collect(&self.root, &levels, dollar, &available, &mut out);
        out
    }

    fn collect<'a>(
        node: &'a Node<K, O>,
        levels: &[&str],
        skip_wildcards: bool,
        available: &impl Fn(&K) -> bool,
        out: &mut Matches<'a, K, O>,
    ) {
        if !skip_wildcards {
            Self::take(&node.multi, available, out);
        }
        match levels {
            [] => Self::take(&node.exact, available, out),
            [level, rest @ ..] => {
                if let Some(child) = node.literal.get(*level) {
                    Self::collect(child, rest, false, available, out);
                }
                if !skip_wildcards && let Some(child) = &node.single {
                    Self::collect(child, rest, false, available, out);
                }
            }
        }
    }

    fn take<'a>(leaf: &'a Leaf<K, O>, available: &impl Fn(&K) -> bool, out: &mut Matches<'a, K, O>) {
        out.direct.extend(leaf.direct.iter());
        for group in leaf.shared.values() {
            let n = group.members.len();
            if n == 0 {
                continue;
            }
            let start = group.next.fetch_add(1, Ordering::Relaxed);
            let chosen = (0..n)
                .map(|i| &group.members[(start + i) % n])
                .find(|(k, _)| available(k))
                .unwrap_or(&group.members[start % n]);
            out.shared.push((&chosen.0, &chosen.1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(tree: &SubscriptionTree<&'static str, u8>, topic: &str) -> Vec<&'static str> {
        let m = tree.matches(topic, |_| true);
        let mut v: Vec<&str> = m.direct.iter().chain(m.shared.iter()).map(|(k, _)| **k).collect();
        v.sort();
        v
    }

    #[test]
    fn literal_and_wildcard_matching() {
        let mut t = SubscriptionTree::new();
        t.insert("a/b/c", None, "exact", 0);
        t.insert("a/+/c", None, "plus", 0);
        t.insert("a/#", None, "hash", 0);
        t.insert("#", None, "all", 0);
        t.insert("+/b/+", None, "plus2", 0);
        assert_eq!(names(&t, "a/b/c"), ["all", "exact", "hash", "plus", "plus2"]);
        assert_eq!(names(&t, "a"), ["all", "hash"]);
        assert_eq!(names(&t, "a/x/c"), ["all", "hash", "plus"]);
        assert_eq!(names(&t, "z/b/q"), ["all", "plus2"]);
        assert_eq!(names(&t, "$SYS/b/c"), Vec::<&str>::new());
        assert_eq!(t.len(), 5);
    }

    #[test]
    fn dollar_topics_match_explicit_filters() {
        let mut t = SubscriptionTree::new();
        t.insert("$SYS/#", None, "sys", 0);
        t.insert("#", None, "all", 0);
        t.insert("+/broker", None, "plus", 0);
        assert_eq!(names(&t, "$SYS/broker"), ["sys"]);
        assert_eq!(names(&t, "x/broker"), ["all", "plus"]);
    }

    #[test]
    fn replace_and_remove_prune_the_tree() {
        let mut t = SubscriptionTree::new();
        assert!(!t.insert("a/+/c", None, "s", 1));
        assert!(t.insert("a/+/c", None, "s", 2));
        assert_eq!(*t.matches("a/b/c", |_| true).direct[0].1, 2);
        assert_eq!(t.len(), 1);
        assert!(!t.remove("a/b/c", None, &"s"));
        assert!(t.remove("a/+/c", None, &"s"));
        assert!(t.is_empty());
        assert!(t.root.is_empty(), "empty branches are pruned");
        t.insert("x/#", None, "s", 0);
        assert!(t.remove("x/#", None, &"s"));
        assert!(t.root.is_empty());
    }

    #[test]
    fn shared_groups_deliver_to_one_member_round_robin() {
        let mut t = SubscriptionTree::new();
        t.insert("jobs/+", Some("workers"), "w1", 0);
        t.insert("jobs/+", Some("workers"), "w2", 0);
        t.insert("jobs/+", Some("workers"), "w3", 0);
        t.insert("jobs/+", None, "watcher", 0);
        let mut counts = HashMap::new();
        for _ in 0..30 {
            let m = t.matches("jobs/1", |_| true);
            assert_eq!(m.direct.len(), 1);
            assert_eq!(m.shared.len(), 1);
            *counts.entry(*m.shared[0].0).or_insert(0) += 1;
        }
        assert_eq!(counts.values().copied().collect::<Vec<_>>(), vec![10, 10, 10]);
        // Disconnected members are skipped while another member is available.
        for _ in 0..5 {
            let m = t.matches("jobs/1", |k| *k == "w2");
            assert_eq!(*m.shared[0].0, "w2");
        }
        // Two groups on the same filter each get the message.
        t.insert("jobs/+", Some("auditors"), "a1", 0);
        assert_eq!(t.matches("jobs/1", |_| true).shared.len(), 2);
        assert!(t.remove("jobs/+", Some("workers"), &"w1"));
        assert!(t.remove("jobs/+", Some("workers"), &"w2"));
        assert!(t.remove("jobs/+", Some("workers"), &"w3"));
        assert_eq!(t.matches("jobs/1", |_| true).shared.len(), 1);
    }
}
