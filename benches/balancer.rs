//! Micro-benchmarks of the balancer's per-request pure work: header hygiene (the general
//! path's header maps and the fast path's head rewriting) and the pick policies. Run:
//! `cargo bench --bench balancer`.

// criterion's macros generate undocumented items.
#![allow(missing_docs)]

use std::sync::atomic::AtomicUsize;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue, Version};
use strata::balancer::pick;
use strata::proxy::h1::{self, RequestPrep, ResponsePrep};
use strata::proxy::headers::{self, Forwarding};

fn request_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("host", HeaderValue::from_static("shop.example"));
    h.insert("user-agent", HeaderValue::from_static("bench/1.0"));
    h.insert("accept", HeaderValue::from_static("*/*"));
    h
}

fn hygiene(c: &mut Criterion) {
    let fwd = Forwarding::new("10.0.0.7".parse().unwrap(), "http");
    let template = request_headers();
    c.bench_function("to_upstream (3 client headers)", |b| {
        b.iter(|| {
            let mut h = template.clone();
            black_box(headers::to_upstream(&mut h, Version::HTTP_11, None, &fwd));
        })
    });
    let id = HeaderValue::from_static("abc");
    let mut resp = HeaderMap::new();
    resp.insert("content-type", HeaderValue::from_static("text/plain"));
    resp.insert("content-length", HeaderValue::from_static("1024"));
    c.bench_function("to_downstream", |b| {
        b.iter(|| {
            let mut h = resp.clone();
            headers::to_downstream(&mut h, false, &id);
            black_box(h);
        })
    });
}

/// A request as wrk sends it, and nginx's answer to it (compare.sh's proxy backend).
const WRK_REQUEST: &[u8] = b"GET /file1k HTTP/1.1\r\nHost: 127.0.0.1:18783\r\n\r\n";
const NGINX_RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\n\
    Date: Sun, 29 Nov 2026 10:38:14 GMT\r\nContent-Type: application/octet-stream\r\n\
    Content-Length: 1024\r\nLast-Modified: Sun, 29 Nov 2026 10:38:11 GMT\r\n\
    Connection: keep-alive\r\nETag: \"6b0c0093-400\"\r\n\
    Cache-Control: public, max-age=300\r\nAccept-Ranges: bytes\r\n\r\n";

fn fast_path_heads(c: &mut Criterion) {
    let fwd = Forwarding::new("127.0.0.1".parse().unwrap(), "http");
    let mut out = Vec::with_capacity(4096);
    c.bench_function("h1::prepare_request (wrk GET)", |b| {
        b.iter(|| {
            out.clear();
            let prep = h1::prepare_request(black_box(WRK_REQUEST), &fwd, |_| None, &mut out);
            assert!(matches!(prep, RequestPrep::Ready(_)));
        })
    });
    c.bench_function("h1::prepare_response (nginx 200)", |b| {
        b.iter(|| {
            out.clear();
            let prep =
                h1::prepare_response(black_box(NGINX_RESPONSE), false, b"id-1", false, &mut out);
            assert!(matches!(prep, ResponsePrep::Ready(_)));
        })
    });
}

fn policies(c: &mut Criterion) {
    let weights = [1u32, 2, 3, 1, 1, 2, 1, 1];
    let loads = [3u32, 1, 4, 1, 5, 9, 2, 6];
    let cumulative = pick::Weights::new(&weights);
    let schedule = pick::wrr_schedule(&weights);
    let counter = AtomicUsize::new(0);
    let seeds: Vec<u64> = (0..8u8).map(|i| pick::stable_hash(&[i])).collect();
    c.bench_function("p2c over 8", |b| {
        b.iter(|| {
            pick::p2c(
                &cumulative,
                pick::random,
                |i| loads[i],
                |i| weights[i],
                |_| true,
            )
        })
    });
    c.bench_function("round robin over 8", |b| {
        b.iter(|| pick::round_robin(&schedule, &counter, |_| true))
    });
    c.bench_function("least loaded over 8", |b| {
        b.iter(|| pick::least_loaded(8, 3, |i| loads[i], |i| weights[i], |_| true))
    });
    c.bench_function("rendezvous over 8", |b| {
        b.iter(|| {
            let key = pick::stable_hash(black_box(b"user-12345"));
            pick::rendezvous(key, &seeds, |i| weights[i], |_| true)
        })
    });
}

criterion_group!(benches, hygiene, fast_path_heads, policies);
criterion_main!(benches);
