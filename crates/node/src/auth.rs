//! Who is calling: the identity in the caller's verified TLS certificate.
//!
//! The TLS layer already refused certificates from the wrong root and of
//! the wrong kind; here the role segment of the SPIFFE URI authorises.

use antar_core::{Identity, Role};
use tonic::Request;

use crate::error::NodeError;
use crate::state::Shared;

/// The verified identity of the caller.
pub(crate) fn caller<T>(shared: &Shared, req: &Request<T>) -> Result<Identity, NodeError> {
    let certs = req
        .peer_certs()
        .ok_or_else(|| NodeError::Unauthenticated("no client certificate".into()))?;
    shared
        .identities
        .identity(&certs)
        .ok_or_else(|| NodeError::Unauthenticated("client certificate carries no Antar identity".into()))
}

/// The app name of a caller that must be an app of this node's agency.
pub(crate) fn app<T>(shared: &Shared, req: &Request<T>) -> Result<String, NodeError> {
    let id = caller(shared, req)?;
    check_agency(shared, &id)?;
    match id.role {
        Role::App(name) => Ok(name),
        _ => Err(NodeError::PermissionDenied(format!(
            "{id} is not an app certificate; the Agency API needs .../app/<name>"
        ))),
    }
}

/// Checks that the caller is an admin of this node's agency.
pub(crate) fn admin<T>(shared: &Shared, req: &Request<T>) -> Result<Identity, NodeError> {
    let id = caller(shared, req)?;
    check_agency(shared, &id)?;
    match id.role {
        Role::Admin(_) => Ok(id),
        _ => Err(NodeError::PermissionDenied(format!(
            "{id} is not an admin certificate; the Admin API needs .../admin/<name>"
        ))),
    }
}

/// Checks that the caller is an auditor of this node's agency.
pub(crate) fn auditor<T>(shared: &Shared, req: &Request<T>) -> Result<Identity, NodeError> {
    let id = caller(shared, req)?;
    check_agency(shared, &id)?;
    match id.role {
        Role::Auditor(_) => Ok(id),
        _ => Err(NodeError::PermissionDenied(format!(
            "{id} is not an auditor certificate; the Audit API needs .../auditor/<name>"
        ))),
    }
}

/// The peer agency of a caller on the peer listener; it must be a configured peer.
pub(crate) fn peer<T>(shared: &Shared, req: &Request<T>) -> Result<Identity, NodeError> {
    let id = caller(shared, req)?;
    if id.role != Role::Node || id.federation != shared.config.federation {
        return Err(NodeError::PermissionDenied(format!(
            "{id} is not a node of this federation"
        )));
    }
    if !shared.policy().is_peer(id.agency.as_str()) {
        return Err(NodeError::PermissionDenied(format!(
            "{} is not a configured peer of {}",
            id.agency, shared.agency
        )));
    }
    Ok(id)
}

fn check_agency(shared: &Shared, id: &Identity) -> Result<(), NodeError> {
    if id.agency != shared.agency || id.federation != shared.config.federation {
        return Err(NodeError::PermissionDenied(format!(
            "{id} belongs to another agency than {}",
            shared.agency
        )));
    }
    Ok(())
}
