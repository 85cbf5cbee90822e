//! Identifiers that are valid once held: agency ids, service names, message
//! ids and SPIFFE-style identities.

use std::fmt;
use std::str::FromStr;

/// Why an identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    /// An agency id must be `[a-z0-9-]+(\.[a-z0-9-]+)*`, at most 63 characters.
    #[error("invalid agency id {0:?}: expected lowercase labels [a-z0-9-] separated by '.', at most 63 characters")]
    Agency(String),
    /// A service name must be `[a-z0-9][a-z0-9._-]*`, at most 128 characters.
    #[error("invalid service name {0:?}: expected [a-z0-9][a-z0-9._-]*, at most 128 characters")]
    Service(String),
    /// A message id must be a hyphenated lowercase UUID.
    #[error("invalid message id {0:?}: expected a UUID such as 0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b")]
    Message(String),
    /// A SPIFFE identity must be `spiffe://<federation>/agency/<agency>[/<role>/<name>]`.
    #[error(
        "invalid identity {0:?}: expected spiffe://<federation>/agency/<agency>[/app|admin|auditor/<name>]"
    )]
    Identity(String),
}

/// An agency id: lowercase DNS-like label path, e.g. `tax` or `health.province-3`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AgencyId(String);

impl AgencyId {
    /// Parses an agency id.
    ///
    /// # Errors
    /// [`IdError::Agency`] when `s` is not `[a-z0-9-]+(\.[a-z0-9-]+)*` of at most 63 characters.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        };
        if s.is_empty() || s.len() > 63 || !s.split('.').all(label_ok) {
            return Err(IdError::Agency(s.to_owned()));
        }
        Ok(Self(s.to_owned()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A service name of the recipient agency, e.g. `birth.lookup`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceName(String);

impl ServiceName {
    /// Parses a service name.
    ///
    /// # Errors
    /// [`IdError::Service`] when `s` is not `[a-z0-9][a-z0-9._-]*` of at most 128 characters.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let mut bytes = s.bytes();
        let first_ok = bytes
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        let rest_ok =
            bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'));
        if !first_ok || !rest_ok || s.len() > 128 {
            return Err(IdError::Service(s.to_owned()));
        }
        Ok(Self(s.to_owned()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A message id: a UUID, version 7 when Antar made it, so ids sort by time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(uuid::Uuid);

impl MessageId {
    /// A new time-ordered (UUIDv7) id.
    pub fn new() -> Self {
        Self(uuid::Uuid::now_v7())
    }

    /// Parses the hyphenated text form.
    ///
    /// # Errors
    /// [`IdError::Message`] when `s` is not a hyphenated UUID.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        if s.len() != 36 {
            return Err(IdError::Message(s.to_owned()));
        }
        uuid::Uuid::try_parse(s)
            .map(Self)
            .map_err(|_| IdError::Message(s.to_owned()))
    }

    /// The 16 bytes, used as a store key: they sort like the ids.
    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }

    /// Rebuilds an id from its 16 bytes.
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(uuid::Uuid::from_bytes(bytes))
    }

    /// When a UUIDv7 id was made, in ms since the Unix epoch, by the clock
    /// of the node that made it; `None` for other versions.
    pub fn minted_ms(&self) -> Option<u64> {
        let b = self.as_bytes();
        (b[6] >> 4 == 7).then(|| b[..6].iter().fold(0, |ms, &byte| ms << 8 | u64::from(byte)))
    }
}

impl Default for MessageId {
    fn default() -> Self {
        Self::new()
    }
}

/// What a certificate may do, read from the role segment of its SPIFFE URI.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Role {
    /// A node: `…/agency/<agency>`.
    Node,
    /// An agency system: `…/agency/<agency>/app/<name>`.
    App(String),
    /// An administrator: `…/agency/<agency>/admin/<name>`.
    Admin(String),
    /// An auditor: `…/agency/<agency>/auditor/<name>`.
    Auditor(String),
}

/// A SPIFFE-style identity carried as a URI SAN in every Antar certificate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    /// The federation (trust domain), e.g. `gov.example`.
    pub federation: String,
    /// The agency the certificate belongs to.
    pub agency: AgencyId,
    /// What the certificate may do.
    pub role: Role,
}

impl Identity {
    /// The identity of the node of `agency`.
    pub fn node(federation: &str, agency: AgencyId) -> Self {
        Self {
            federation: federation.to_owned(),
            agency,
            role: Role::Node,
        }
    }

    /// Parses `spiffe://<federation>/agency/<agency>[/<role>/<name>]`.
    ///
    /// # Errors
    /// [`IdError::Identity`] for any other shape, a bad agency id or an
    /// unknown role.
    pub fn parse(uri: &str) -> Result<Self, IdError> {
        let bad = || IdError::Identity(uri.to_owned());
        let rest = uri.strip_prefix("spiffe://").ok_or_else(bad)?;
        let mut parts = rest.split('/');
        let federation = parts.next().filter(|f| valid_trust_domain(f)).ok_or_else(bad)?;
        if parts.next() != Some("agency") {
            return Err(bad());
        }
        let agency = AgencyId::parse(parts.next().ok_or_else(bad)?).map_err(|_| bad())?;
        let role = match (parts.next(), parts.next(), parts.next()) {
            (None, _, _) => Role::Node,
            (Some(role), Some(name), None) if valid_name(name) => match role {
                "app" => Role::App(name.to_owned()),
                "admin" => Role::Admin(name.to_owned()),
                "auditor" => Role::Auditor(name.to_owned()),
                _ => return Err(bad()),
            },
            _ => return Err(bad()),
        };
        Ok(Self {
            federation: federation.to_owned(),
            agency,
            role,
        })
    }
}

fn valid_trust_domain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'))
}

/// Whether `s` may name an app, admin or auditor client: 1–63 of
/// `[a-z0-9._-]`.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'))
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}/agency/{}", self.federation, self.agency)?;
        match &self.role {
            Role::Node => Ok(()),
            Role::App(n) => write!(f, "/app/{n}"),
            Role::Admin(n) => write!(f, "/admin/{n}"),
            Role::Auditor(n) => write!(f, "/auditor/{n}"),
        }
    }
}

macro_rules! text_id {
    ($t:ty) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }
        impl FromStr for $t {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }
    };
}
text_id!(AgencyId);
text_id!(ServiceName);
text_id!(MessageId);

impl FromStr for Identity {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v7_ids_tell_when_they_were_minted() {
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let minted = MessageId::new().minted_ms().unwrap();
        assert!(
            minted >= before && minted < before + 60_000,
            "{minted} vs {before}"
        );
        let example = MessageId::parse("0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b").unwrap();
        assert_eq!(example.minted_ms(), Some(0x0190_a1b2_c3d4));
        let v4 = MessageId::parse("0190a1b2-c3d4-4e5f-8a9b-0c1d2e3f4a5b").unwrap();
        assert_eq!(v4.minted_ms(), None);
    }

    #[test]
    fn agency_ids() {
        for ok in ["tax", "civil-registry", "health.province-3", &"a".repeat(63)] {
            assert_eq!(AgencyId::parse(ok).map(|a| a.to_string()).as_deref(), Ok(ok));
        }
        for bad in ["", "Tax", "a..b", ".a", "a.", "a_b", "a/b", &"a".repeat(64)] {
            assert_eq!(AgencyId::parse(bad), Err(IdError::Agency(bad.to_owned())));
        }
    }

    #[test]
    fn service_names() {
        assert!(ServiceName::parse("birth.lookup").is_ok());
        assert!(ServiceName::parse("tax_v2-return").is_ok());
        for bad in ["", ".x", "Birth", "a b", "*"] {
            assert_eq!(ServiceName::parse(bad), Err(IdError::Service(bad.to_owned())));
        }
    }

    #[test]
    fn message_ids_round_trip_and_sort_by_time() {
        let a = MessageId::new();
        let b = MessageId::new();
        assert!(a < b);
        assert_eq!(MessageId::parse(&a.to_string()), Ok(a));
        assert_eq!(MessageId::from_bytes(*a.as_bytes()), a);
        assert!(MessageId::parse("not-a-uuid").is_err());
    }

    #[test]
    fn identities() {
        let node = Identity::parse("spiffe://gov.example/agency/tax").unwrap();
        assert_eq!(node.role, Role::Node);
        assert_eq!(node.agency.as_str(), "tax");
        let app = Identity::parse("spiffe://gov.example/agency/tax/app/portal").unwrap();
        assert_eq!(app.role, Role::App("portal".into()));
        assert_eq!(app.to_string(), "spiffe://gov.example/agency/tax/app/portal");
        for bad in [
            "https://gov.example/agency/tax",
            "spiffe://gov.example/tax",
            "spiffe://gov.example/agency/Tax",
            "spiffe://gov.example/agency/tax/root/x",
            "spiffe://gov.example/agency/tax/app",
            "spiffe://gov.example/agency/tax/app/x/y",
        ] {
            assert!(Identity::parse(bad).is_err(), "{bad}");
        }
    }
}
