//! Who a key stands for: its client and its scope.

use std::{fmt, str::FromStr};

use uuid::Uuid;

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Its own orders only.
    Client,
    /// Every order, the `/events` firehose and `/metrics`.
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Client => "client",
            Scope::Admin => "admin",
        }
    }
}

impl FromStr for Scope {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "client" => Ok(Scope::Client),
            "admin" => Ok(Scope::Admin),
            other => Err(format!("unknown scope {other:?}: expected client or admin")),
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who is calling: put in the request's extensions by
/// [`super::authenticate`].
#[derive(Debug, Clone)]
pub struct Caller {
    pub key_id: Uuid,
    pub client: String,
    pub scope: Scope,
}

impl Caller {
    /// The client whose data this caller may see; `None` for an admin, who
    /// sees everyone's.
    pub fn owner(&self) -> Option<&str> {
        (self.scope == Scope::Client).then_some(self.client.as_str())
    }

    pub fn is_admin(&self) -> bool {
        self.scope == Scope::Admin
    }
}
