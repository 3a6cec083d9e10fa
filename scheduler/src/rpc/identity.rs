//! Who is calling: the identity named by the caller's verified client
//! certificate, and nothing else.

use tonic::{Request, Status};

use crate::crypto::pki::Identity;

/// The identity named by the caller's verified client certificate. The TLS
/// layer lets callers without a certificate through (they may only `Join`),
/// so every other RPC starts here.
pub fn caller<T>(req: &Request<T>) -> Result<Identity, Status> {
    let certs = req
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
    Identity::from_cert_der(leaf)
        .ok_or_else(|| Status::permission_denied("certificate names no clawdeploy identity"))
}
