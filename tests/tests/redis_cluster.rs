//! The speed layer on a Redis Cluster (`redis.url = redis+cluster://…`, API.md "Cluster
//! mode"): a private three-master cluster. One speed state is one hash slot, so each
//! compare-and-set write stays on one master; the master holding it killed and back (empty)
//! makes the speed layer unavailable, then rewritten from the mirror and exact.

use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::Value;
use tally_e2e::{
    assert_exact, batch_run, ingest_random, make_urls, poll_until, seed, Model, ServerOpts,
    TestRedisCluster, TestServer, DEADLINE,
};

/// The hash tag of a key: what its slot is computed from.
fn tag(key: &str) -> &str {
    let open = key.find('{').expect("a hash tag") + 1;
    let close = open + key[open..].find('}').expect("a closed hash tag");
    &key[open..close]
}

#[test]
fn the_speed_layer_on_a_redis_cluster_is_exact_and_recovers_a_master_killed_and_back() {
    let mut cluster = TestRedisCluster::start();
    let server = TestServer::start(ServerOpts::default().redis_url(cluster.url()));
    let mut rng = StdRng::seed_from_u64(seed());
    let urls = make_urls(25, 3);
    let mut model = Model::default();
    ingest_random(&server, &mut model, &mut rng, &urls, 400);
    server.wait_caught_up();
    assert_exact(&server, &model, &mut rng, &urls);
    batch_run(&server);
    ingest_random(&server, &mut model, &mut rng, &urls, 300);
    server.wait_caught_up();
    assert_exact(&server, &model, &mut rng, &urls);

    // Every key of the speed state carries one hash tag, so it lives on one master.
    let keys = poll_until("speed keys in the cluster", DEADLINE, || {
        let s = server.status();
        let written = s["redis_applied_seq"] == s["acked_seq"];
        let keys = cluster.keys("tally:*");
        (written && !keys.is_empty()).then_some(keys)
    });
    let first = tag(&keys[0]).to_string();
    assert!(keys.iter().all(|k| tag(k) == first), "{keys:?}");
    let owner = cluster.owner_of(&keys[0]);
    assert!(keys.iter().all(|k| cluster.owner_of(k) == owner));

    // That master killed: the speed layer says it is unavailable instead of answering less.
    cluster.kill(owner);
    ingest_random(&server, &mut model, &mut rng, &urls, 100);
    poll_until("redis down in the status", DEADLINE, || {
        (server.status()["redis"] == "down").then_some(())
    });
    // Back, empty: the speed state is rewritten from the mirror, and every answer is exact.
    cluster.restart(owner);
    poll_until(
        "redis up and the speed state written again",
        DEADLINE,
        || {
            let s: Value = server.status();
            (s["redis"] == "up"
                && s["speed_available"] == true
                && s["redis_applied_seq"] == s["acked_seq"])
                .then_some(())
        },
    );
    assert!(!cluster.keys("tally:*").is_empty());
    ingest_random(&server, &mut model, &mut rng, &urls, 200);
    server.wait_caught_up();
    assert_exact(&server, &model, &mut rng, &urls);
    batch_run(&server);
    assert_exact(&server, &model, &mut rng, &urls);
}
