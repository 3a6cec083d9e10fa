//! The OpenAPI document's frame: title, tags and the bearer scheme. The
//! operations come from the router's own registrations (`utoipa-axum`).

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        let components = api.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "ClawDeploy API",
        description = "Accounts, instances and the operator API of the ClawDeploy scheduler. Every error is `{error: {code, message}}`."
    ),
    modifiers(&BearerAuth),
    tags(
        (name = "accounts", description = "Registration, sign-in (with its second step), verification and password reset"),
        (name = "account", description = "The signed-in customer's own account: sessions, security log, two-factor sign-in"),
        (name = "billing", description = "Plans and, later, payment"),
        (name = "instances"),
        (name = "operator", description = "Bearer: the operator token (--admin-token)"),
        (name = "service")
    )
)]
pub struct ApiDoc;
