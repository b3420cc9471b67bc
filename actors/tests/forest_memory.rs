//! Memory of the analytics' models, measured: a counting global allocator records the heap
//! bytes live before and after a model is built, so the figure is what the model really holds
//! (tree nodes, boxes, standardisation vectors), not an estimate from its layout. README's
//! "Analytics figures" quote this test's output:
//!
//! ```sh
//! cargo test -p drover-actors --test forest_memory -- --nocapture
//! ```
//!
//! One test function measures everything in turn, so no other test thread allocates meanwhile.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use drover_actors::analytics::detector::Method;
use drover_actors::analytics::isolation::{IsolationModel, IsolationOptions};
use drover_actors::analytics::monitor::DeviceMonitor;
use drover_actors::analytics::settings::MonitorSettings;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::SeqCst)
}

/// Feature vectors like the monitor's (value, difference, rolling deviation per metric).
fn features(n: usize, metrics: usize) -> Vec<Vec<f64>> {
    (0..n)
        .map(|i| {
            (0..metrics * 3)
                .map(|d| ((i * 31 + d * 17) as f64 * 0.37).sin() + d as f64)
                .collect()
        })
        .collect()
}

/// Live heap bytes of one model trained on `metrics` metrics: the mean of `models` models
/// kept alive together (the training set is dropped before the count).
fn model_bytes(metrics: usize, trees: usize, sample_size: usize, models: usize) -> f64 {
    let options = IsolationOptions {
        trees,
        sample_size,
        ..IsolationOptions::default()
    };
    let training = features(500, metrics);
    let before = live();
    let kept: Vec<IsolationModel> = (0..models)
        .map(|i| {
            IsolationModel::train(
                &training,
                &IsolationOptions {
                    seed: i as u64,
                    ..options
                },
            )
            .unwrap()
        })
        .collect();
    let after = live();
    assert_eq!(kept.len(), models);
    (after - before) as f64 / models as f64
}

/// A device's whole monitor (detectors, the forest's feature window, and with a forest of its
/// own its training set and model) after 600 messages of `metrics` metrics.
fn monitor_bytes(metrics: usize, own_forest: bool) -> f64 {
    let names: Vec<String> = (0..metrics).map(|m| format!("metric{m}")).collect();
    let before = live();
    let mut monitor = DeviceMonitor::new(MonitorSettings {
        methods: vec![Method::Ensemble, Method::Eif, Method::Drift],
        shared_forest: !own_forest,
        ..MonitorSettings::default()
    });
    for i in 0..600 {
        let values: Vec<(&str, f64)> = names
            .iter()
            .enumerate()
            .map(|(m, n)| (n.as_str(), ((i * 7 + m * 13) as f64 * 0.21).sin()))
            .collect();
        let mut o = monitor.observe(i as i64 * 1000, &values);
        if let Some(job) = o.training.take() {
            let model = job.run().unwrap();
            monitor.install(&job, Some(model));
        }
    }
    assert_eq!(monitor.has_model(), own_forest);
    let bytes = (live() - before) as f64;
    drop(monitor);
    bytes
}

const MB: f64 = 1024.0 * 1024.0;

#[test]
fn memory_of_forests_and_monitors() {
    let one = model_bytes(1, 100, 256, 4);
    let eight = model_bytes(8, 100, 256, 2);
    let small = model_bytes(1, 50, 128, 4);
    let monitor_one = monitor_bytes(1, true);
    let monitor_eight = monitor_bytes(8, true);
    let shared_one = monitor_bytes(1, false);
    let shared_eight = monitor_bytes(8, false);
    println!("forest, 1 metric, 100 trees x 256 samples: {:.2} MiB", one / MB);
    println!(
        "forest, 8 metrics, 100 trees x 256 samples: {:.2} MiB",
        eight / MB
    );
    println!("forest, 1 metric, 50 trees x 128 samples: {:.2} MiB", small / MB);
    println!(
        "device monitor with its forest, 1 metric: {:.2} MiB",
        monitor_one / MB
    );
    println!(
        "device monitor with its forest, 8 metrics: {:.2} MiB",
        monitor_eight / MB
    );
    println!(
        "device monitor sharing its type's forest, 1 metric: {:.1} KiB",
        shared_one / 1024.0
    );
    println!(
        "device monitor sharing its type's forest, 8 metrics: {:.1} KiB",
        shared_eight / 1024.0
    );
    // The forest is most of a monitor; a wider forest holds wider cuts; half the trees of half
    // the samples hold about a quarter.
    assert!(one > 0.5 * MB && monitor_one > one, "{one} {monitor_one}");
    assert!(eight > 2.0 * one, "{eight} vs {one}");
    assert!(small < one / 2.0, "{small} vs {one}");
    // A device sharing its type's forest holds no trees and no training set.
    assert!(
        shared_one < one / 10.0 && shared_eight < eight / 10.0,
        "{shared_one} {shared_eight}"
    );
    // README quotes these figures: a regression past them must update it.
    assert!(one < 2.0 * MB, "1-metric forest {:.2} MiB", one / MB);
    assert!(eight < 10.0 * MB, "8-metric forest {:.2} MiB", eight / MB);
}
