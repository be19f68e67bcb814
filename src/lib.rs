//! tunnox: Kubernetes-native HTTP domain routing and tunnelling.
// Two FFI calls, `observe::memory::release_freed` and `commit_on_use`, are allowed where they
// are made.
#![deny(unsafe_code)]

pub mod acme;
pub mod agent;
pub mod api;
pub mod cert;
pub mod cli;
pub mod config;
pub mod controller;
pub mod crd;
pub mod domain;
pub mod hop;
pub mod observe;
pub mod proxy;
pub mod store;
pub mod tunnel;
