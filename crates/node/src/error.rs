//! Every error a node returns to a caller, and its gRPC code: the one table.

use tonic::{Code, Status};

/// What went wrong serving a request.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// A request field is missing or malformed; names the field.
    #[error("{field}: {detail}")]
    Invalid {
        /// The offending field.
        field: &'static str,
        /// What is wrong and what would be right.
        detail: String,
    },
    /// Something named in the request does not exist.
    #[error("{0}")]
    NotFound(String),
    /// No verified client certificate, or one of the wrong kind.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller's certificate is valid but its role or agency may not do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// The store passed its quota; earlier work is intact.
    #[error("store is full: {queued} bytes queued, quota {quota} (limits.max_queued_bytes); retry later")]
    StoreFull {
        /// Bytes queued now.
        queued: u64,
        /// The configured quota.
        quota: u64,
    },
    /// The store passed its ceiling for peers' envelopes (twice the
    /// quota); the peer keeps them and retries.
    #[error(
        "store is full for peers' envelopes: {queued} bytes queued besides those for the sending peer, ceiling {ceiling} (twice limits.max_queued_bytes); keep them queued and retry later"
    )]
    PeersFull {
        /// Bytes queued now, but those for the sending peer.
        queued: u64,
        /// Twice the configured quota.
        ceiling: u64,
    },
    /// A caller is over its rate limit; others are served.
    #[error("{0}")]
    RateLimited(String),
    /// The node is draining for maintenance and accepts no new sends.
    #[error("node is draining for maintenance; send again once it is resumed")]
    Draining,
    /// The caller's deadline passed first.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The store failed; the node stops (fail-stop).
    #[error("store failure: {0}")]
    Store(#[from] antar_store::StoreError),
    /// A precondition on the message's state does not hold.
    #[error("{0}")]
    FailedPrecondition(String),
}

impl NodeError {
    pub(crate) fn invalid(field: &'static str, detail: impl ToString) -> Self {
        Self::Invalid {
            field,
            detail: detail.to_string(),
        }
    }

    /// The gRPC code for this error: the single mapping of the node.
    pub fn code(&self) -> Code {
        match self {
            Self::Invalid { .. } => Code::InvalidArgument,
            Self::NotFound(_) => Code::NotFound,
            Self::Unauthenticated(_) => Code::Unauthenticated,
            Self::PermissionDenied(_) => Code::PermissionDenied,
            Self::StoreFull { .. } | Self::PeersFull { .. } | Self::RateLimited(_) => Code::ResourceExhausted,
            Self::Draining => Code::Unavailable,
            Self::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Self::Store(_) => Code::Internal,
            Self::FailedPrecondition(_) => Code::FailedPrecondition,
        }
    }
}

impl From<NodeError> for Status {
    fn from(e: NodeError) -> Self {
        if let NodeError::Store(inner) = &e {
            tracing::error!(error = %inner, "store failure");
        }
        Status::new(e.code(), e.to_string())
    }
}

/// The store failure of a transaction whose closure refuses nothing (it
/// only marks or notes): what else it could return says what went wrong.
pub(crate) fn store_failure(
    e: Result<antar_store::Abort, antar_store::StoreError>,
) -> antar_store::StoreError {
    match e {
        Err(e) | Ok(antar_store::Abort::Corrupt(e)) => e,
        Ok(other) => antar_store::StoreError::Poisoned(format!("{other:?}")),
    }
}

impl From<Result<antar_store::Abort, antar_store::StoreError>> for NodeError {
    fn from(e: Result<antar_store::Abort, antar_store::StoreError>) -> Self {
        match e {
            Ok(antar_store::Abort::Corrupt(e)) | Err(e) => Self::Store(e),
            Ok(antar_store::Abort::Refused(reason)) => Self::FailedPrecondition(reason),
            Ok(other) => Self::FailedPrecondition(format!("{other:?}")),
        }
    }
}
