//! Test harness shared by integration tests and benchmarks: real `redis-server` processes on
//! free loopback ports, stopped when dropped (even when a test fails).
#![allow(dead_code, unused_imports)]

pub mod api;
pub mod balancer;
pub mod claimer;
pub mod controlplane;
pub mod echo;
pub mod fake_proxy;
pub mod http;
pub mod pebble;
pub mod process;
pub mod proxy;
pub mod redis_server;
pub mod tunnel;
pub mod tunnel_agent;

pub use controlplane::ControlPlane;
pub use redis_server::{RedisServer, SentinelGroup, SentinelSetup};
