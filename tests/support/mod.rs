//! Test harness shared by integration tests and benchmarks: real `redis-server` processes on
//! free loopback ports, stopped when dropped (even when a test fails).
#![allow(dead_code)]

pub mod redis_server;

pub use redis_server::RedisServer;
