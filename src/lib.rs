//! tunnox: Kubernetes-native HTTP domain routing and tunnelling.
#![forbid(unsafe_code)]

pub mod acme;
pub mod agent;
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
