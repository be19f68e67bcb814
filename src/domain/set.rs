//! Proxy set names (`<business>.<region>`, `<business>.*` for disaster recovery) and the rule
//! that picks which set serves a placement (ARCHITECTURE §7).

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The region name of a business's disaster-recovery set.
pub const DR_REGION: &str = "*";

#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SetName {
    business: Box<str>,
    region: Box<str>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid set name {0:?}: expected <business>.<region> (lower-case letters, digits and '-'; region '*' for the DR set)"
)]
pub struct SetNameError(pub String);

fn is_name(part: &str) -> bool {
    !part.is_empty()
        && part.len() <= 63
        && part
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !part.starts_with('-')
        && !part.ends_with('-')
}

impl SetName {
    pub fn new(business: &str, region: &str) -> Result<Self, SetNameError> {
        let whole = format!("{business}.{region}");
        if !is_name(business) || !(region == DR_REGION || is_name(region)) {
            return Err(SetNameError(whole));
        }
        Ok(Self {
            business: business.into(),
            region: region.into(),
        })
    }

    pub fn parse(raw: &str) -> Result<Self, SetNameError> {
        let (business, region) = raw
            .split_once('.')
            .ok_or_else(|| SetNameError(raw.to_string()))?;
        Self::new(business, region).map_err(|_| SetNameError(raw.to_string()))
    }

    pub fn business(&self) -> &str {
        &self.business
    }

    pub fn region(&self) -> &str {
        &self.region
    }

    pub fn is_dr(&self) -> bool {
        &*self.region == DR_REGION
    }

    /// The disaster-recovery set of this set's business.
    pub fn dr(&self) -> SetName {
        Self {
            business: self.business.clone(),
            region: DR_REGION.into(),
        }
    }
}

/// Which set serves a placement, given the sets that currently have a healthy node:
/// the home set, else the business's DR set, else none. Never another region or business.
pub fn serving_set<'a>(
    placement: &SetName,
    healthy: impl IntoIterator<Item = &'a SetName> + Clone,
) -> Option<SetName> {
    let has = |want: &SetName| healthy.clone().into_iter().any(|s| s == want);
    if has(placement) {
        return Some(placement.clone());
    }
    let dr = placement.dr();
    has(&dr).then_some(dr)
}

/// Where something placed on `placement` goes from a proxy of set `me`: an HTTP request, a
/// connection on a remote port, or an agent connecting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// This proxy serves it.
    Here,
    /// A node of this other set of the same business serves it: forward it there, once.
    Forward(SetName),
    /// Another business's: never served or forwarded here (421).
    OtherBusiness,
    /// Neither the home set nor the business's DR set has a healthy node (503).
    Unserved,
}

/// The one placement rule for requests, tunnel connections and agents (ARCHITECTURE §7,
/// docs/sets.md). `healthy`: the sets with an active node, this proxy's own counted in (it is
/// answering). `forwarded`: another node of the fleet already decided and sent it here — served
/// here whatever this node's view, so nothing moves twice when two nodes' views of the registry
/// differ for a heartbeat. No placement: served by every proxy.
pub fn decide(
    placement: Option<&SetName>,
    me: &SetName,
    healthy: &[SetName],
    forwarded: bool,
) -> Decision {
    let Some(placement) = placement else {
        return Decision::Here;
    };
    if placement.business() != me.business() {
        return Decision::OtherBusiness;
    }
    if forwarded {
        return Decision::Here;
    }
    match serving_set(placement, healthy.iter().chain(std::iter::once(me))) {
        Some(set) if &set == me => Decision::Here,
        Some(set) => Decision::Forward(set),
        None => Decision::Unserved,
    }
}

impl fmt::Display for SetName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.business, self.region)
    }
}

impl fmt::Debug for SetName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SetName({self})")
    }
}

impl std::str::FromStr for SetName {
    type Err = SetNameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Serialize for SetName {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SetName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        super::deserialize_parsed(d, SetName::parse)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(s: &str) -> SetName {
        SetName::parse(s).unwrap()
    }

    #[test]
    fn parses_set_names() {
        assert_eq!(set("novel.sh").business(), "novel");
        assert_eq!(set("novel.sh").region(), "sh");
        assert!(set("novel.*").is_dr());
        assert_eq!(set("novel.sh").dr(), set("novel.*"));
        assert_eq!(set("default.default").to_string(), "default.default");
        for bad in [
            "",
            "novel",
            "novel.",
            ".sh",
            "Novel.sh",
            "novel.sh.x",
            "*.sh",
            "no_vel.sh",
            "-a.sh",
            "a.s h",
        ] {
            assert!(SetName::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn decides_where_a_placement_is_served() {
        use Decision::*;
        let fwd = |s: &str| Forward(set(s));
        // (placement, me, healthy others, forwarded, want)
        type Case<'a> = (Option<&'a str>, &'a str, &'a [&'a str], bool, Decision);
        let cases: &[Case] = &[
            (None, "novel.sh", &[], false, Here),
            (None, "ams.sh", &["novel.sh"], false, Here),
            (Some("novel.sh"), "novel.sh", &[], false, Here),
            (Some("novel.sh"), "novel.sh", &["novel.*"], false, Here),
            // Another region of the business: forwarded home, or to DR when home is down.
            (
                Some("novel.sh"),
                "novel.sz",
                &["novel.sh", "novel.*"],
                false,
                fwd("novel.sh"),
            ),
            (
                Some("novel.sh"),
                "novel.sz",
                &["novel.*"],
                false,
                fwd("novel.*"),
            ),
            (Some("novel.sh"), "novel.sz", &[], false, Unserved),
            // The DR set serves only while home is down, and sends traffic home when it is back.
            (Some("novel.sh"), "novel.*", &[], false, Here),
            (Some("novel.sh"), "novel.*", &["novel.sz"], false, Here),
            (
                Some("novel.sh"),
                "novel.*",
                &["novel.sh"],
                false,
                fwd("novel.sh"),
            ),
            // Never another business, forwarded or not.
            (
                Some("novel.sh"),
                "ams.sh",
                &["novel.sh"],
                false,
                OtherBusiness,
            ),
            (
                Some("novel.sh"),
                "ams.sh",
                &["novel.sh"],
                true,
                OtherBusiness,
            ),
            (Some("novel.*"), "ams.*", &[], false, OtherBusiness),
            // Forwarded once by a node of the business: served, whatever this node sees.
            (Some("novel.sh"), "novel.*", &["novel.sh"], true, Here),
            (Some("novel.sh"), "novel.sz", &["novel.sh"], true, Here),
            // Placed on the DR set itself.
            (Some("novel.*"), "novel.*", &[], false, Here),
            (
                Some("novel.*"),
                "novel.sh",
                &["novel.*"],
                false,
                fwd("novel.*"),
            ),
            (Some("novel.*"), "novel.sh", &[], false, Unserved),
        ];
        for (placement, me, healthy, forwarded, want) in cases {
            let placement = placement.map(set);
            let healthy: Vec<SetName> = healthy.iter().map(|s| set(s)).collect();
            let got = decide(placement.as_ref(), &set(me), &healthy, *forwarded);
            assert_eq!(
                &got, want,
                "placement {placement:?} on {me} with {healthy:?}, forwarded {forwarded}"
            );
        }
    }

    #[test]
    fn serving_set_rule() {
        let cases: &[(&str, &[&str], Option<&str>)] = &[
            ("novel.sh", &["novel.sh", "novel.*"], Some("novel.sh")),
            ("novel.sh", &["novel.*"], Some("novel.*")),
            ("novel.sh", &["novel.sz"], None),
            ("novel.sh", &["game.sh", "game.*"], None),
            ("novel.sh", &[], None),
            ("novel.sh", &["novel.sz", "novel.*"], Some("novel.*")),
        ];
        for (placement, healthy, want) in cases {
            let healthy: Vec<SetName> = healthy.iter().map(|s| set(s)).collect();
            let got = serving_set(&set(placement), healthy.iter());
            assert_eq!(
                got,
                want.map(set),
                "placement {placement} healthy {healthy:?}"
            );
        }
    }
}
