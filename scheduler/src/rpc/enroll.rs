//! The enrollment service: `Join` trades a one-time token and a CSR for a
//! node certificate (no client certificate yet); `Renew` is called with the
//! node's current certificate.

use clawdeploy_proto::node_enrollment_server::NodeEnrollment;
use clawdeploy_proto::{JoinRequest, NodeCertificate, RenewRequest};
use tonic::{Request, Response, Status};

use super::identity::caller;
use crate::agents::enroll;
use crate::app::AppRef;
use crate::crypto::pki::Identity;

pub struct EnrollmentService {
    pub app: AppRef,
}

#[tonic::async_trait]
impl NodeEnrollment for EnrollmentService {
    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<NodeCertificate>, Status> {
        let req = req.into_inner();
        let cert = enroll::join(&self.app, &req.node_id, &req.token, &req.csr_der).await?;
        Ok(Response::new(cert))
    }

    async fn renew(&self, req: Request<RenewRequest>) -> Result<Response<NodeCertificate>, Status> {
        let Identity::Node(node_id) = caller(&req)? else {
            return Err(Status::permission_denied(
                "only node certificates may be renewed",
            ));
        };
        let cert = enroll::renew(&self.app, &node_id, &req.into_inner().csr_der).await?;
        Ok(Response::new(cert))
    }
}
