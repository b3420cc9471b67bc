//! A seeded way to grow an `extended-isolation-forest` [`Forest`].
//!
//! The crate (0.2.3) grows its trees from `rand::thread_rng()` and takes no seed, so two
//! trainings on the same data differ and a backtest could not be repeated. This file grows the
//! trees with the crate's own algorithm (`Forest::from_slice` / `make_node`: a sample per tree
//! drawn without replacement, a uniform intercept within the node's bounding box, a Gaussian
//! normal with `N - extension_level - 1` coordinates zeroed, depth limit `ceil(log2(sample))`)
//! from a ChaCha generator seeded by the caller, and hands them to the crate through its serde
//! form (the crate's `serde` feature), so scoring stays the crate's code. Same seed and data,
//! same forest, on every machine.

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
/// (`extension_level = N - 1`), from `seed`.
pub fn grow_seeded<const N: usize>(
    data: &[[f64; N]],
    trees: usize,
    sample_size: usize,
    seed: u64,
) -> Result<Forest<f64, N>, AnalyticsError> {
    if data.len() < sample_size || N == 0 || sample_size < 2 {
        return Err(AnalyticsError::NotEnoughData {
            what: "isolation forest sample",
            needed: sample_size.max(2),
            got: data.len(),
        });
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let max_depth = (sample_size as f64).log2().ceil() as usize;
    let form = ForestForm {
        avg_path_length_c: c_factor(sample_size),
        trees: (0..trees.max(1))
            .map(|_| {
                let sample: Vec<&[f64; N]> = data.choose_multiple(&mut rng, sample_size).collect();
                TreeForm {
                    root: node(&sample, &mut rng, 0, max_depth, N - 1),
                }
            })
            .collect(),
    };
    let value = serde_json::to_value(form).map_err(|e| AnalyticsError::Model(e.to_string()))?;
    Forest::deserialize(value).map_err(|e| AnalyticsError::Model(e.to_string()))
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

    #[test]
    fn too_little_data_is_refused() {
        assert!(grow_seeded(&data()[..10], 10, 64, 1).is_err());
    }
}
