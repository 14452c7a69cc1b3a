//! dedupd: a deduplicating proxy for RabbitMQ.
//!
//! `run` wires the pieces together: the store (`store`), one forwarding pipeline per route
//! (`pipeline`, which is where a message is claimed, published, committed and acked), the
//! broker connections (`amqp`), and the metrics and health endpoint (`metrics`).

pub mod config;
pub mod keys;
pub mod store;
