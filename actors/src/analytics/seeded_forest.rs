//! A seeded way to grow an `extended-isolation-forest` [`Forest`], and the flat form live
//! scoring uses.
//!
//! The crate (0.2.3) grows its trees from `rand::thread_rng()` and takes no seed, so two
//! trainings on the same data differ and a backtest could not be repeated. This file grows the
//! trees with the crate's own algorithm (`Forest::from_slice` / `make_node`: a sample per tree
//! drawn without replacement, a uniform intercept within the node's bounding box, a Gaussian
//! normal with `N - extension_level - 1` coordinates zeroed, depth limit `ceil(log2(sample))`)
//! from a ChaCha generator seeded by the caller. Same seed and data, same forest, on every
//! machine.
//!
//! The trees can be handed to the crate through its serde form (the crate's `serde` feature,
//! [`grow_seeded`]) or laid out flat ([`grow_flat`], [`FlatForest`]). Scoring is where live
//! analytics spends its time (every message of every monitored device): the crate keeps each
//! node in its own box with the normal and intercept as `[f64; N]` at the forest's padded width
//! (24 coordinates for more than one metric, most of them padding), and follows a pointer per
//! level. The flat form keeps the whole forest in one array in depth-first order (a node's left
//! child follows it), each cut with its coefficients, and only the coordinates the data uses;
//! it computes the crate's arithmetic in the crate's order, so its score is bit for bit the
//! crate's (the tests check it against the crate on random forests).

use std::hint::select_unpredictable;

use extended_isolation_forest::Forest;
use rand::distributions::Uniform;
use rand::prelude::*;
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use serde::Serialize;
use serde::de::Deserialize;

use super::AnalyticsError;

/// The crate's `Forest` as it serialises.
#[derive(Serialize)]
struct ForestForm {
    avg_path_length_c: f64,
    trees: Vec<TreeForm>,
}

#[derive(Serialize)]
struct TreeForm {
    root: NodeForm,
}

#[derive(Serialize)]
enum NodeForm {
    Ex {
        num_samples: usize,
    },
    In {
        left: Box<NodeForm>,
        right: Box<NodeForm>,
        n: Vec<f64>,
        p: Vec<f64>,
    },
}

/// The crate's `c_factor`: average path length of an unsuccessful search in a BST of `n` points.
fn c_factor(n: usize) -> f64 {
    2.0 * ((n as f64 - 1.0).ln() + 0.5772156649) - (2.0 * (n as f64 - 1.0) / n as f64)
}

/// Grows a forest of `trees` trees over `data`, each from `sample_size` points, fully extended
/// (`extension_level = N - 1`), from `seed`, as the crate's [`Forest`].
pub fn grow_seeded<const N: usize>(
    data: &[[f64; N]],
    trees: usize,
    sample_size: usize,
    seed: u64,
) -> Result<Forest<f64, N>, AnalyticsError> {
    let form = grow_forms(data, trees, sample_size, seed)?;
    let value = serde_json::to_value(form).map_err(|e| AnalyticsError::Model(e.to_string()))?;
    Forest::deserialize(value).map_err(|e| AnalyticsError::Model(e.to_string()))
}

/// The same forest as [`grow_seeded`] with the same arguments, laid out flat over the first
/// `used` coordinates: every point given to it, and every later query, must be zero beyond them
/// (the padding of a narrower vector), which makes those coordinates' terms exact zeros.
pub fn grow_flat<const N: usize>(
    data: &[[f64; N]],
    trees: usize,
    sample_size: usize,
    seed: u64,
    used: usize,
) -> Result<FlatForest, AnalyticsError> {
    let used = used.clamp(1, N);
    if let Some(point) = data.iter().find(|p| p[used..].iter().any(|v| *v != 0.0)) {
        return Err(AnalyticsError::Model(format!(
            "a training point has values beyond its {used} coordinates: {point:?}"
        )));
    }
    let form = grow_forms(data, trees, sample_size, seed)?;
    let mut flat = FlatForest {
        dims: used,
        avg_path_length_c: form.avg_path_length_c,
        roots: Vec::with_capacity(form.trees.len()),
        words: Vec::new(),
        depth: 0,
    };
    for tree in &form.trees {
        let root = u32::try_from(flat.words.len())
            .map_err(|_| AnalyticsError::Model("forest too large to lay out".into()))?;
        flat.roots.push(root);
        flat.push(&tree.root, 0);
    }
    flat.words.resize(flat.words.len() + 2 * used, 0.0);
    flat.words.shrink_to_fit();
    Ok(flat)
}

fn grow_forms<const N: usize>(
    data: &[[f64; N]],
    trees: usize,
    sample_size: usize,
    seed: u64,
) -> Result<ForestForm, AnalyticsError> {
    if data.len() < sample_size || N == 0 || sample_size < 2 {
        return Err(AnalyticsError::NotEnoughData {
            what: "isolation forest sample",
            needed: sample_size.max(2),
            got: data.len(),
        });
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let max_depth = (sample_size as f64).log2().ceil() as usize;
    Ok(ForestForm {
        avg_path_length_c: c_factor(sample_size),
        trees: (0..trees.max(1))
            .map(|_| {
                let sample: Vec<&[f64; N]> = data.choose_multiple(&mut rng, sample_size).collect();
                TreeForm {
                    root: node(&sample, &mut rng, 0, max_depth, N - 1),
                }
            })
            .collect(),
    })
}

/// A forest's trees in one array of words, each node where its parent's left child is: a leaf
/// is two words, `0` and its path length (the crate's `c_factor(num_samples)`, 0 for one
/// sample, with one added per level above it the way the crate adds them on its way back up);
/// a cut is `1 + 2 * dims` words, the index of its right child (as the bits of the word; never
/// 0, as no right child is a root) and its intercept and normal as `p0, p1, …, n0, n1, …`, and its
/// left child follows it. The array ends in `2 * dims` zeros, so a cut's run of words can be
/// read at any node, leaves included.
///
/// A point walks [`WALK_LANES`] trees at once, level by level, for the depth of the forest's
/// deepest leaf: at each level every walk computes its cut's side and picks its next node
/// without a branch (a walk that reached its leaf stays there). The walks are independent, so
/// the processor overlaps them, and no walk waits on a mispredicted jump: the crate's
/// arithmetic, in the crate's order, several times faster.
pub struct FlatForest {
    dims: usize,
    avg_path_length_c: f64,
    roots: Vec<u32>,
    words: Vec<f64>,
    /// Cuts on the way to the deepest leaf.
    depth: usize,
}

/// Trees a point walks side by side.
const WALK_LANES: usize = 8;

impl FlatForest {
    fn push(&mut self, node: &NodeForm, depth: usize) {
        let index = self.words.len();
        match node {
            NodeForm::Ex { num_samples } => {
                // The crate returns 1 + (1 + (… + leaf)) from `depth` cuts up.
                let mut length = leaf_adjustment(*num_samples);
                for _ in 0..depth {
                    length += 1.0;
                }
                self.words.push(f64::from_bits(0));
                self.words.push(length);
                self.depth = self.depth.max(depth);
            }
            NodeForm::In { left, right, n, p } => {
                self.words.push(f64::from_bits(0));
                self.words.extend_from_slice(&p[..self.dims]);
                self.words.extend_from_slice(&n[..self.dims]);
                self.push(left, depth + 1);
                self.words[index] = f64::from_bits(self.words.len() as u64);
                self.push(right, depth + 1);
            }
        }
    }

    /// Coordinates the forest reads.
    pub fn dims(&self) -> usize {
        self.dims
    }

    /// The crate's `Forest::score`, `2^(-E[h]/c)`, of a point of [`Self::dims`] coordinates
    /// (those beyond are ignored: they were zero in training and must be zero here).
    pub fn score(&self, values: &[f64]) -> f64 {
        let values = &values[..self.dims.min(values.len())];
        // The crate's sum of the trees' path lengths, in tree order.
        let mut path_length = -0.0;
        // A width of its own for each common one (1 to 8 metrics' features); a shorter point
        // (the caller's mistake) walks as before this layout, its missing terms left out.
        let compiled = if values.len() == self.dims { self.dims } else { 0 };
        for roots in self.roots.chunks(WALK_LANES) {
            let lengths = match compiled {
                3 => self.walk::<3>(roots, values),
                6 => self.walk::<6>(roots, values),
                9 => self.walk::<9>(roots, values),
                12 => self.walk::<12>(roots, values),
                15 => self.walk::<15>(roots, values),
                18 => self.walk::<18>(roots, values),
                21 => self.walk::<21>(roots, values),
                24 => self.walk::<24>(roots, values),
                _ => self.walk::<0>(roots, values),
            };
            for length in &lengths[..roots.len()] {
                path_length += *length;
            }
        }
        let eh = path_length / self.roots.len() as f64;
        2.0_f64.powf(-eh / self.avg_path_length_c)
    }

    /// The path lengths of the trees at `roots` (at most [`WALK_LANES`]) for `values` (at most
    /// [`Self::dims`] of them): the forest's `D` coordinates, or when `D` is 0 its
    /// [`Self::dims`], of which `values` may hold fewer.
    #[inline(always)]
    fn walk<const D: usize>(&self, roots: &[u32], values: &[f64]) -> [f64; WALK_LANES] {
        let dims = if D == 0 { self.dims } else { D };
        // A known length lets the compiler unroll the terms.
        let values = if D == 0 { values } else { &values[..D] };
        let width = 2 * dims;
        let mut at = [0usize; WALK_LANES];
        for (at, root) in at.iter_mut().zip(roots) {
            *at = *root as usize;
        }
        let walks = roots.len();
        for _ in 0..self.depth {
            for at in &mut at[..walks] {
                let node = *at;
                let right = self.words[node].to_bits() as usize;
                let (p, n) = self.words[node + 1..node + 1 + width].split_at(dims);
                // The crate's `determinate_direction`: Σ (x - p)·n from zero, in coordinate
                // order (a leaf reads the words after it, and stays where it is). The terms
                // are independent; only their sum is in order. Starting the sum from the
                // first term instead of 0 + it changes at most the sign of a zero, which
                // `<= 0` does not see.
                let side = if D == 0 {
                    let mut terms = values.iter().zip(p).zip(n).map(|((x, p), n)| (x - p) * n);
                    let first = terms.next().unwrap_or(0.0);
                    terms.fold(first, |sum, t| sum + t)
                } else {
                    let mut terms = [0.0; D];
                    for (((t, x), p), n) in terms.iter_mut().zip(values).zip(p).zip(n) {
                        *t = (x - p) * n;
                    }
                    terms[1..].iter().fold(terms[0], |sum, t| sum + t)
                };
                // Selects the compiler must not turn into jumps: the side is a coin toss.
                let next = select_unpredictable(side <= 0.0, node + 1 + width, right);
                *at = select_unpredictable(right == 0, node, next);
            }
        }
        let mut lengths = [0.0; WALK_LANES];
        for (length, at) in lengths.iter_mut().zip(&at[..walks]) {
            *length = self.words[*at + 1];
        }
        lengths
    }
}

/// The crate's leaf value: `c_factor(n)` with its `log(E)`, or 0 for at most one sample.
fn leaf_adjustment(num_samples: usize) -> f64 {
    if num_samples <= 1 {
        0.0
    } else {
        let n = num_samples as f64;
        2.0 * ((n - 1.0).log(std::f64::consts::E) + 0.5772156649) - (2.0 * (n - 1.0) / n)
    }
}

fn node<const N: usize>(
    samples: &[&[f64; N]],
    rng: &mut ChaCha8Rng,
    depth: usize,
    max_depth: usize,
    extension_level: usize,
) -> NodeForm {
    if depth >= max_depth || samples.len() <= 1 {
        return NodeForm::Ex {
            num_samples: samples.len(),
        };
    }
    let mut mins = *samples[0];
    let mut maxs = *samples[0];
    for s in &samples[1..] {
        for (i, v) in s.iter().enumerate() {
            mins[i] = mins[i].min(*v);
            maxs[i] = maxs[i].max(*v);
        }
    }
    let p: Vec<f64> = mins
        .iter()
        .zip(&maxs)
        .map(|(lo, hi)| {
            if lo == hi {
                *lo
            } else {
                rng.sample(Uniform::new(*lo, *hi))
            }
        })
        .collect();
    let mut n: Vec<f64> = (0..N).map(|_| rng.sample(StandardNormal)).collect();
    for idx in (0..N).choose_multiple(rng, N - extension_level - 1) {
        n[idx] = 0.0;
    }
    let (left, right): (Vec<&[f64; N]>, Vec<&[f64; N]>) = samples.iter().partition(|s| {
        let side: f64 = s
            .iter()
            .zip(&p)
            .map(|(v, p)| v - p)
            .zip(&n)
            .map(|(d, n)| d * n)
            .sum();
        side <= 0.0
    });
    NodeForm::In {
        left: Box::new(node(&left, rng, depth + 1, max_depth, extension_level)),
        right: Box::new(node(&right, rng, depth + 1, max_depth, extension_level)),
        n,
        p,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data() -> Vec<[f64; 2]> {
        (0..300)
            .map(|i| [((i * 7) % 31) as f64 / 10.0, ((i * 13) % 17) as f64 / 5.0])
            .collect()
    }

    #[test]
    fn same_seed_same_forest_other_seed_other_forest() {
        let data = data();
        let a = grow_seeded(&data, 50, 128, 7).unwrap();
        let b = grow_seeded(&data, 50, 128, 7).unwrap();
        let c = grow_seeded(&data, 50, 128, 8).unwrap();
        let probes = [[1.0, 1.0], [3.0, 0.0], [40.0, -9.0]];
        for probe in &probes {
            assert_eq!(a.score(probe), b.score(probe));
        }
        assert!(probes.iter().any(|p| a.score(p) != c.score(p)));
    }

    #[test]
    fn grown_forest_isolates_an_outlier_faster() {
        let forest = grow_seeded(&data(), 100, 256, 1).unwrap();
        assert!(forest.score(&[40.0, -9.0]) > forest.score(&[1.5, 1.6]));
        assert!(forest.score(&[40.0, -9.0]) > 0.6);
    }

    /// Points spread over `used` of `N` coordinates, zero beyond, with a few far outliers.
    fn padded<const N: usize>(used: usize, count: usize, seed: u64) -> Vec<[f64; N]> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..count)
            .map(|i| {
                let mut p = [0.0; N];
                for v in p.iter_mut().take(used) {
                    let spread = if i % 97 == 0 { 40.0 } else { 1.0 };
                    *v = (rng.sample::<f64, _>(StandardNormal) * spread * 1024.0).round() / 1024.0;
                }
                p
            })
            .collect()
    }

    fn assert_flat_scores_as_the_crate<const N: usize>(used: usize) {
        for seed in 0..4 {
            let data = padded::<N>(used, 600, seed);
            let crate_forest = grow_seeded(&data, 60, 256, seed).unwrap();
            let flat = grow_flat(&data, 60, 256, seed, used).unwrap();
            assert_eq!(flat.dims(), used);
            let probes = padded::<N>(used, 300, seed + 100);
            for probe in probes.iter().chain(&data[..100]) {
                let expected = crate_forest.score(probe);
                let got = flat.score(&probe[..used]);
                assert_eq!(
                    got.to_bits(),
                    expected.to_bits(),
                    "{probe:?}: {got} vs {expected}"
                );
            }
        }
    }

    #[test]
    fn flat_forest_scores_bit_for_bit_as_the_crate() {
        // One metric's width, every coordinate used.
        assert_flat_scores_as_the_crate::<3>(3);
        // The wide forest padded from two metrics' six features.
        assert_flat_scores_as_the_crate::<24>(6);
        assert_flat_scores_as_the_crate::<24>(24);
        // Every width the walk is compiled for, and one it reads at run time.
        assert_flat_scores_as_the_crate::<24>(9);
        assert_flat_scores_as_the_crate::<24>(12);
        assert_flat_scores_as_the_crate::<24>(15);
        assert_flat_scores_as_the_crate::<24>(18);
        assert_flat_scores_as_the_crate::<24>(21);
        assert_flat_scores_as_the_crate::<24>(5);
        assert_flat_scores_as_the_crate::<2>(1);
    }

    /// One tree at a time, with a jump per level: the plain walk of the same layout.
    fn walked_one_by_one(forest: &FlatForest, values: &[f64]) -> f64 {
        let dims = forest.dims;
        let mut total = -0.0;
        for root in &forest.roots {
            let mut at = *root as usize;
            loop {
                let right = forest.words[at].to_bits() as usize;
                if right == 0 {
                    total += forest.words[at + 1];
                    break;
                }
                let p = &forest.words[at + 1..at + 1 + dims];
                let n = &forest.words[at + 1 + dims..at + 1 + 2 * dims];
                let side = values
                    .iter()
                    .zip(p)
                    .zip(n)
                    .fold(0.0, |sum, ((x, p), n)| sum + (x - p) * n);
                at = if side <= 0.0 { at + 1 + 2 * dims } else { right };
            }
        }
        2.0_f64.powf(-(total / forest.roots.len() as f64) / forest.avg_path_length_c)
    }

    #[test]
    fn a_short_point_walks_the_forests_layout() {
        // Too few values is the caller's mistake; the walk must still read the forest's own
        // nodes, leaving the missing terms out of every cut.
        let data = padded::<24>(6, 600, 3);
        let flat = grow_flat(&data, 30, 128, 3, 6).unwrap();
        for probe in padded::<24>(6, 50, 9) {
            for len in [2, 5, 6] {
                let values = &probe[..len];
                assert_eq!(
                    flat.score(values).to_bits(),
                    walked_one_by_one(&flat, values).to_bits(),
                    "{values:?}"
                );
            }
        }
    }

    #[test]
    fn flat_forest_refuses_training_data_beyond_its_coordinates() {
        let data = padded::<24>(7, 300, 1);
        assert!(matches!(
            grow_flat(&data, 10, 64, 1, 6),
            Err(AnalyticsError::Model(_))
        ));
    }

    #[test]
    fn too_little_data_is_refused() {
        assert!(grow_seeded(&data()[..10], 10, 64, 1).is_err());
    }
}
