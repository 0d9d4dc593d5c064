//! Micro-benchmarks of the per-request hot paths: key verification (cold and cached), request
//! classification (route, body, models), stream usage parsing, and the choice of a node in a pool.
//!
//!   cargo bench --bench hot_paths
// A benchmark that cannot set itself up stops with the reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use corral::access::auth::{key_from_headers, Verifier};
use corral::access::policy::referenced;
use corral::api::routes::{classify, RouteKind};
use corral::ollama::json::JsonObject;
use corral::usage::BodyFormat;
use corral::usage::{Meter, UsageStripper};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use std::collections::{HashMap, HashSet};
use std::hint::black_box;

fn keys(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("corral-bench-keys-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (signing, public) = corral::access::keys::init(&dir, "bench").unwrap();
    let request = corral::access::keys::IssueRequest {
        team: "research".into(),
        ..Default::default()
    };
    let now = corral::clock::unix_now();
    let (token, _) = corral::access::keys::issue(&signing, &request, now).unwrap();
    let key = corral::access::keys::load_verify_key(&public).unwrap();
    let keys: HashMap<String, _> = [("bench".to_string(), key)].into();

    let mut g = c.benchmark_group("key verification");
    g.bench_function("cold (Ed25519 signature check)", |b| {
        b.iter_batched(
            || Verifier::new(keys.clone(), HashSet::new()),
            |v| black_box(v.verify(&token, now).unwrap()),
            BatchSize::SmallInput,
        )
    });
    let warm = Verifier::new(keys.clone(), HashSet::new());
    warm.verify(&token, now).unwrap();
    g.bench_function("cached", |b| {
        b.iter(|| black_box(warm.verify(black_box(&token), now).unwrap()))
    });
    let mut headers = http::HeaderMap::new();
    headers.insert("authorization", format!("Bearer {token}").parse().unwrap());
    g.bench_function("key from headers", |b| {
        b.iter(|| black_box(key_from_headers(black_box(&headers)).unwrap()))
    });
    g.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

fn classification(c: &mut Criterion) {
    let chat = serde_json::json!({
        "model": "llama3.2",
        "stream": true,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant. ".repeat(20)},
            {"role": "user", "content": "Why is the sky blue? ".repeat(40)},
        ],
        "options": {"temperature": 0.2, "num_ctx": 8192},
    })
    .to_string();
    let image = serde_json::json!({
        "model": "llava", "stream": false,
        "messages": [{"role": "user", "content": "what is this?", "images": ["A".repeat(1 << 20)]}],
    })
    .to_string();
    let mut g = c.benchmark_group("request classification");
    g.bench_function("route", |b| {
        b.iter(|| {
            black_box(
                classify(
                    black_box(&http::Method::POST),
                    black_box(b"/v1/chat/completions"),
                )
                .unwrap(),
            )
        })
    });
    g.bench_function("route, refused trick", |b| {
        b.iter(|| {
            black_box(
                classify(black_box(&http::Method::GET), black_box(b"/api/%2e%2e/me")).is_err(),
            )
        })
    });
    for (name, body) in [
        ("chat body, 2 KiB", &chat),
        ("chat body with a 1 MiB image", &image),
    ] {
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_function(name, |b| {
            b.iter(|| {
                let obj = JsonObject::parse(black_box(body.as_bytes())).unwrap();
                let models = referenced(RouteKind::Chat, Some(&obj), None)
                    .unwrap()
                    .models;
                black_box((models, obj.bool("stream").unwrap()))
            })
        });
    }
    g.finish();
}

fn usage(c: &mut Criterion) {
    let mut ndjson = String::new();
    for i in 0..200 {
        ndjson.push_str(&format!(
            "{{\"model\":\"llama3.2\",\"created_at\":\"2025-10-26T17:15:24.{i:06}Z\",\"message\":{{\"role\":\"assistant\",\"content\":\" word{i}\"}},\"done\":false}}\n"
        ));
    }
    ndjson.push_str("{\"model\":\"llama3.2\",\"created_at\":\"2025-10-26T17:15:25Z\",\"message\":{\"role\":\"assistant\",\"content\":\"\"},\"done\":true,\"done_reason\":\"stop\",\"total_duration\":4883583458,\"load_duration\":1334875,\"prompt_eval_count\":26,\"prompt_eval_duration\":342546000,\"eval_count\":200,\"eval_duration\":4535599000}\n");
    let mut sse = String::new();
    for i in 0..200 {
        sse.push_str(&format!(
            "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"llama3.2\",\"system_fingerprint\":\"fp_ollama\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\" word{i}\"}},\"finish_reason\":null}}]}}\n\n"
        ));
    }
    sse.push_str("data: {\"id\":\"chatcmpl-1\",\"choices\":[],\"usage\":{\"prompt_tokens\":26,\"completion_tokens\":200,\"total_tokens\":226}}\n\ndata: [DONE]\n\n");

    let mut g = c.benchmark_group("stream usage parsing");
    for (name, body, format) in [
        ("NDJSON, 200 lines", &ndjson, BodyFormat::Ndjson),
        ("SSE, 200 frames", &sse, BodyFormat::Sse),
    ] {
        // As they arrive: one line or frame per chunk.
        let sep = if format == BodyFormat::Ndjson {
            "\n"
        } else {
            "\n\n"
        };
        let chunks: Vec<&str> = body.split_inclusive(sep).collect();
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut m = Meter::new(format);
                for chunk in &chunks {
                    m.feed(black_box(chunk.as_bytes()));
                }
                black_box(m.finish())
            })
        });
    }
    let chunks: Vec<&str> = sse.split_inclusive("\n\n").collect();
    g.bench_function("SSE, 200 frames, usage stripped", |b| {
        b.iter(|| {
            let mut s = UsageStripper::default();
            let mut n = 0;
            for (i, chunk) in chunks.iter().enumerate() {
                n += s
                    .process(black_box(chunk.as_bytes()), i + 1 == chunks.len())
                    .len();
            }
            black_box(n)
        })
    });
    g.finish();

    // The worst chunking a network (or an attacker upstream) can produce: one byte at a time.
    // The work must stay linear in the bytes: one big event, and many small ones.
    let big_event = format!(
        "data: {{\"choices\":[{{\"delta\":{{\"content\":\"{}\"}}}}]}}\n\n",
        "x".repeat(64 * 1024)
    );
    let mut g = c.benchmark_group("one byte per chunk");
    for (name, body) in [
        ("SSE, one 64 KiB event", &big_event),
        ("SSE, 200 frames", &sse),
    ] {
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_function(format!("{name}, usage stripped"), |b| {
            b.iter(|| {
                let mut s = UsageStripper::default();
                let mut n = 0;
                let bytes = body.as_bytes();
                for (i, byte) in bytes.chunks(1).enumerate() {
                    n += s.process(black_box(byte), i + 1 == bytes.len()).len();
                }
                black_box(n)
            })
        });
        g.bench_function(format!("{name}, metered"), |b| {
            b.iter(|| {
                let mut m = Meter::new(BodyFormat::Sse);
                for byte in body.as_bytes().chunks(1) {
                    m.feed(black_box(byte));
                }
                black_box(m.finish())
            })
        });
    }
    g.finish();
}

fn routing(c: &mut Criterion) {
    use corral::upstream::choose::{choose, Has, NodeView};
    // 16 nodes in every state: some down, some without the model, some busy, two warm.
    let nodes: Vec<NodeView> = (0..16u32)
        .map(|i| NodeView {
            up: i % 5 != 4,
            has: match i % 4 {
                0 => Has::No,
                3 => Has::Unknown,
                _ => Has::Yes,
            },
            loaded: i == 6 || i == 9,
            inflight: i % 3,
            parallel: Some(2),
            tried: i == 9,
        })
        .collect();
    let mut g = c.benchmark_group("routing");
    g.bench_function("choose a node of 16", |b| {
        let mut turn = 0usize;
        b.iter(|| {
            turn = turn.wrapping_add(1);
            black_box(choose(black_box(&nodes), turn))
        })
    });
    g.finish();
}

fn slots(c: &mut Criterion) {
    use corral::upstream::queue::FreeSlotPath;
    // What the scheduler adds to a request when a slot is free: nothing waits.
    let mut g = c.benchmark_group("slots");
    let limited = FreeSlotPath::new(Some(4));
    g.bench_function("take and give back a free slot", |b| {
        b.iter(|| assert!(black_box(limited.take_and_give_back())))
    });
    let unlimited = FreeSlotPath::new(None);
    g.bench_function("a node without parallel", |b| {
        b.iter(|| assert!(black_box(unlimited.take_and_give_back())))
    });
    g.finish();
}

criterion_group!(benches, keys, classification, usage, routing, slots);
criterion_main!(benches);
