//! The view lifecycle's owner (`ViewManager`) on a real master dataset and view store.

use std::sync::Arc;
use std::time::Duration;

use tally_batch::{BatchRunner, RunnerConfig, Trigger, ViewStore};
use tally_core::Event;
use tally_master::{Master, MasterConfig};
use tally_serving::ViewManager;
use tally_speed::{SpeedConfig, SpeedLayer};

fn events(n: usize) -> Vec<Event> {
    (0..n)
        .map(|i| Event {
            ts: 1_795_000_000_000 + i as i64,
            url: format!("http://a.test/{}", i % 3),
            visitor: None,
            referrer: None,
            id: None,
            received_at: 1_795_000_000_000,
        })
        .collect()
}

/// Between a run's publish (`CURRENT` names the new version) and its swap, a discard takes the
/// serving version — the one whose answers the operator saw — not the one `CURRENT` names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discard_takes_the_serving_version_not_the_one_current_names() {
    let dir = tempfile::tempdir().unwrap();
    let master = Master::open(MasterConfig {
        data_dir: dir.path().to_path_buf(),
        seal_interval: Duration::from_secs(3600),
        seal_max_events: 1_000_000,
        fsync: false,
        tail_capacity: 1000,
    })
    .unwrap();
    // Redis is unreachable: the speed layer only retries, which this test does not need.
    let speed = SpeedLayer::start(
        SpeedConfig {
            redis_url: format!("unix://{}/no-redis.sock", dir.path().display()),
            key_prefix: "t:".into(),
            gc_grace: Duration::from_secs(60),
            apply_batch_max: 1000,
            sketch_precision: 14,
            applier_nice: 0,
        },
        master.clone(),
    )
    .await;
    let store = ViewStore::open(dir.path().join("views/batch")).unwrap();
    let runner = BatchRunner::new(store.clone(), master.clone(), RunnerConfig::default());
    let views = Arc::new(ViewManager::new(runner.clone(), speed, 1));

    master.append(events(10)).await.unwrap();
    let v1 = runner.run(Trigger::Admin).await.unwrap().version;
    views.refresh().await;
    assert_eq!(views.current().unwrap().version, v1);
    // A second run has published (CURRENT = v2) but the view is not swapped in yet.
    master.append(events(5)).await.unwrap();
    let v2 = runner.run(Trigger::Admin).await.unwrap().version;
    assert_eq!(store.current().unwrap().as_deref(), Some(v2.as_str()));
    assert_eq!(views.current().unwrap().version, v1);

    let d = views.discard(None, "bad numbers seen").await.unwrap();
    assert_eq!(d.version.as_deref(), Some(v1.as_str()));
    assert!(store.is_discarded(&v1));
    assert!(!store.is_discarded(&v2));
    // The view to serve next is the good one CURRENT names.
    assert_eq!(d.serving.as_deref(), Some(v2.as_str()));
    let h = runner.history();
    assert_eq!(h[0].version.as_deref(), Some(v1.as_str()));
    if let Ok(started) = d.rerun {
        started.handle.await.unwrap().unwrap();
    }
}
