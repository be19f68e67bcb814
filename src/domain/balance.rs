//! How a load-balancing group spreads connections over its members (seed 002: round robin or
//! least connections). Pure: the order in which one connection tries the members.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Balance {
    /// Each connection to the next member in turn.
    #[default]
    #[serde(alias = "round_robin")]
    RoundRobin,
    /// Each connection to the member with the fewest open connections on this proxy (ties in
    /// turn).
    #[serde(alias = "least_connections")]
    LeastConnections,
}

/// The members to try for one connection, best first: all of them, so a member that is
/// offline or refuses gives way to the next. `turn` is a counter moved once per connection;
/// `open[i]` the connections member `i` carries now.
pub fn order(balance: Balance, turn: usize, open: &[usize]) -> Vec<usize> {
    let n = open.len();
    if n == 0 {
        return Vec::new();
    }
    let start = turn % n;
    let mut out: Vec<usize> = (0..n).map(|k| (start + k) % n).collect();
    if balance == Balance::LeastConnections {
        // Stable: among equals the round-robin order stays.
        out.sort_by_key(|&i| open[i]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_turns_and_least_connections_fills_the_emptiest() {
        let cases: &[(Balance, usize, &[usize], &[usize])] = &[
            (Balance::RoundRobin, 0, &[0, 0], &[0, 1]),
            (Balance::RoundRobin, 1, &[0, 0], &[1, 0]),
            (Balance::RoundRobin, 2, &[9, 0], &[0, 1]),
            (Balance::RoundRobin, 4, &[0, 0, 0], &[1, 2, 0]),
            (Balance::LeastConnections, 0, &[3, 1], &[1, 0]),
            (Balance::LeastConnections, 1, &[1, 3], &[0, 1]),
            // Ties go in turn.
            (Balance::LeastConnections, 0, &[2, 2], &[0, 1]),
            (Balance::LeastConnections, 1, &[2, 2], &[1, 0]),
            (Balance::LeastConnections, 1, &[5, 0, 0], &[1, 2, 0]),
            (Balance::LeastConnections, 2, &[5, 0, 0], &[2, 1, 0]),
            (Balance::RoundRobin, 7, &[], &[]),
        ];
        for (b, turn, open, want) in cases {
            assert_eq!(
                order(*b, *turn, open),
                *want,
                "{b:?} turn {turn} open {open:?}"
            );
        }
        assert_eq!(
            serde_json::from_str::<Balance>("\"least_connections\"").unwrap(),
            Balance::LeastConnections
        );
        assert_eq!(
            serde_json::to_string(&Balance::LeastConnections).unwrap(),
            "\"leastConnections\""
        );
    }
}
