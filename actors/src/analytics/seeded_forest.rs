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
    };
    for tree in &form.trees {
        let root = u32::try_from(flat.words.len())
            .map_err(|_| AnalyticsError::Model("forest too large to lay out".into()))?;
        flat.roots.push(root);
        flat.push(&tree.root);
    }
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
/// is two words, `0` and its path-length adjustment (the crate's `c_factor(num_samples)`, 0 for
/// one sample); a cut is `1 + 2 * dims` words, the index of its right child (as the bits of the
/// word; never 0, as no right child is a root) and its intercept and normal as `p0, n0, p1, n1,
/// …`, and its left child follows it. A point's walk down a tree reads one short run of words
/// per level, and going left reads on.
pub struct FlatForest {
    dims: usize,
    avg_path_length_c: f64,
    roots: Vec<u32>,
    words: Vec<f64>,
}

impl FlatForest {
    fn push(&mut self, node: &NodeForm) {
        let index = self.words.len();
        match node {
            NodeForm::Ex { num_samples } => {
                self.words.push(f64::from_bits(0));
                self.words.push(leaf_adjustment(*num_samples));
            }
            NodeForm::In { left, right, n, p } => {
                self.words.push(f64::from_bits(0));
                for d in 0..self.dims {
                    self.words.push(p[d]);
                    self.words.push(n[d]);
                }
                self.push(left);
                self.words[index] = f64::from_bits(self.words.len() as u64);
                self.push(right);
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
        let path_length: f64 = self
            .roots
            .iter()
            .map(|root| self.path_length(*root as usize, values))
            .sum();
        let eh = path_length / self.roots.len() as f64;
        2.0_f64.powf(-eh / self.avg_path_length_c)
    }

    fn path_length(&self, mut index: usize, values: &[f64]) -> f64 {
        let width = 2 * self.dims;
        let mut depth = 0u32;
        loop {
            let right = self.words[index].to_bits() as usize;
            if right == 0 {
                // The crate adds one per level on the way back up: 1 + (1 + (… + leaf)).
                let mut length = self.words[index + 1];
                for _ in 0..depth {
                    length += 1.0;
                }
                return length;
            }
            let cut = &self.words[index + 1..index + 1 + width];
            // The crate's `determinate_direction`: Σ (x - p)·n from zero, in coordinate order.
            let side = values
                .iter()
                .zip(cut.chunks_exact(2))
                .fold(0.0, |sum, (x, pn)| sum + (x - pn[0]) * pn[1]);
            index = if side <= 0.0 { index + 1 + width } else { right };
            depth += 1;
        }
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
