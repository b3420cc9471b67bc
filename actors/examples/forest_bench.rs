//! Scoring cost of an isolation forest: the crate's boxed trees against the flat layout live
//! analytics uses, on the same seeded forest (100 trees of 256 samples, the defaults) at one
//! metric's width and at the padded width of two metrics. Not a test: a measurement.
//!
//! `cargo run --release -p drover-actors --example forest_bench`

use std::hint::black_box;
use std::time::Instant;

use drover_actors::analytics::seeded_forest::{grow_flat, grow_seeded};

fn data<const N: usize>(used: usize, count: usize) -> Vec<[f64; N]> {
    (0..count)
        .map(|i| {
            let mut p = [0.0; N];
            for (d, v) in p.iter_mut().take(used).enumerate() {
                *v = (((i * (7 + 2 * d)) % 101) as f64 - 50.0) / 25.0;
            }
            p
        })
        .collect()
}

fn measure<const N: usize>(used: usize) {
    let training = data::<N>(used, 1000);
    let probes = data::<N>(used, 20_000);
    let boxed = grow_seeded(&training, 100, 256, 7).expect("forest");
    let flat = grow_flat(&training, 100, 256, 7, used).expect("forest");
    let rounds = 5;
    let started = Instant::now();
    let mut sum = 0.0;
    for _ in 0..rounds {
        for p in &probes {
            sum += boxed.score(black_box(p));
        }
    }
    let crate_ns = started.elapsed().as_nanos() as f64 / (rounds * probes.len()) as f64;
    let started = Instant::now();
    let mut flat_sum = 0.0;
    for _ in 0..rounds {
        for p in &probes {
            flat_sum += flat.score(black_box(&p[..used]));
        }
    }
    let flat_ns = started.elapsed().as_nanos() as f64 / (rounds * probes.len()) as f64;
    assert_eq!(
        sum.to_bits(),
        flat_sum.to_bits(),
        "the two layouts scored differently"
    );
    println!(
        "{used} features (forest width {N}): crate {crate_ns:.0} ns/score, flat {flat_ns:.0} ns/score, {:.1}x",
        crate_ns / flat_ns
    );
}

fn main() {
    measure::<3>(3);
    measure::<24>(6);
    measure::<24>(24);
}
