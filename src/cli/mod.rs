//! Subcommands that talk to a running tunnox process rather than being one: `tunnox drain`.

pub mod drain;
