//! The data API suite against stage 1: one process, embedded storage.

mod common;

use common::Node;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_api_suite_embedded() {
    let node = Node::start_app("max_body = \"64KiB\"");
    common::suite::all(&node.url(), 64 << 10).await;
}
