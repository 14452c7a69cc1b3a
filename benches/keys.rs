//! Key derivation cost per message: every delivery pays `derive` + `store_key` before its
//! claim, so these should stay far below a store round trip.
//!
//! `cargo bench --bench keys`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dedupd::config::KeySpec;
use dedupd::keys::{derive, store_key};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::BasicProperties;

fn properties() -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from("x-dedup-id"),
        AMQPValue::LongString(LongString::from("3f2b8c1e-6d4a-4e7b-9a0c-2f5d8e1b7c4a")),
    );
    headers.insert(
        ShortString::from("x-seq"),
        AMQPValue::LongLongInt(1_234_567),
    );
    headers.insert(
        ShortString::from("x-tenant"),
        AMQPValue::ShortString(ShortString::from("acme")),
    );
    BasicProperties::default()
        .with_message_id(ShortString::from("order-2024-000123"))
        .with_headers(headers)
}

/// A ~1 KiB JSON order, with the id somewhere in the middle.
fn json_document() -> Vec<u8> {
    let lines: Vec<String> = (0..12)
        .map(|i| format!(r#"{{"sku":"SKU-{i:05}","qty":{i},"price":{}.99}}"#, i * 3))
        .collect();
    let doc = format!(
        r#"{{"customer":{{"name":"Ada Lovelace","email":"ada@example.com"}},"order":{{"id":"ord-8f14e45fceea167a","lines":[{}]}},"notes":"leave at the door"}}"#,
        lines.join(",")
    );
    doc.into_bytes()
}

fn bench_derive(c: &mut Criterion) {
    let props = properties();
    let mut group = c.benchmark_group("derive");

    let spec = KeySpec::MessageId;
    group.bench_function("message_id", |b| {
        b.iter(|| derive(black_box(&spec), black_box(&props), black_box(b"")))
    });

    let spec = KeySpec::Header("x-dedup-id".into());
    group.bench_function("header_string", |b| {
        b.iter(|| derive(black_box(&spec), black_box(&props), black_box(b"")))
    });

    let spec = KeySpec::Header("x-seq".into());
    group.bench_function("header_long_long_int", |b| {
        b.iter(|| derive(black_box(&spec), black_box(&props), black_box(b"")))
    });

    let spec = KeySpec::Body;
    for size in [256usize, 64 * 1024] {
        let body = vec![0xa5u8; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(format!("body_hash_{size}B"), |b| {
            b.iter(|| derive(black_box(&spec), black_box(&props), black_box(&body)))
        });
    }

    let doc = json_document();
    let spec = KeySpec::Json("/order/id".into());
    group.throughput(Throughput::Bytes(doc.len() as u64));
    group.bench_function(format!("json_pointer_{}B", doc.len()), |b| {
        b.iter(|| derive(black_box(&spec), black_box(&props), black_box(&doc)))
    });
    group.finish();
}

fn bench_store_key(c: &mut Criterion) {
    let mut group = c.benchmark_group("store_key");
    let short = b"order-2024-000123";
    group.bench_function("short_literal", |b| {
        b.iter(|| store_key(black_box("dedupd"), black_box("orders"), black_box(short)))
    });
    let long = vec![b'x'; 255];
    group.bench_function("long_hashed", |b| {
        b.iter(|| store_key(black_box("dedupd"), black_box("orders"), black_box(&long)))
    });
    group.finish();
}

criterion_group!(benches, bench_derive, bench_store_key);
criterion_main!(benches);
