//! Least privilege for the admin RPCs: a tower layer in front of every listener's services
//! that refuses `contentd.v1.GC/Run`, `Scrub/Verify` and `Registry/Pull` with
//! PermissionDenied unless the listener is the admin socket, the request's namespace is one
//! the configuration trusts, or no restriction is configured (see `config::Admin`). One
//! place, by method path, so a new service cannot forget the check.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower::{Layer, Service};

/// Methods that collect, read every blob, or make the daemon fetch from the network.
pub const ADMIN_METHODS: &[&str] = &[
    "/contentd.v1.GC/Run",
    "/contentd.v1.Scrub/Verify",
    "/contentd.v1.Registry/Pull",
];

/// What one listener allows.
#[derive(Debug, Clone, Default)]
pub struct AdminPolicy {
    /// Admin calls are limited (an admin socket or admin namespaces are configured).
    pub restricted: bool,
    /// This listener is the admin socket.
    pub admin_listener: bool,
    /// Namespaces allowed admin calls on any client listener.
    pub namespaces: Arc<Vec<String>>,
}

impl AdminPolicy {
    /// None if `path` may be called with namespace header `ns`; else why not.
    pub fn refusal(&self, path: &str, ns: Option<&str>) -> Option<String> {
        if !ADMIN_METHODS.contains(&path) || !self.restricted || self.admin_listener {
            return None;
        }
        if let Some(ns) = ns
            && self.namespaces.iter().any(|a| a == ns)
        {
            return None;
        }
        Some(format!(
            "{} is an admin call: use the admin socket, or a namespace listed in admin.namespaces",
            path.trim_start_matches('/')
        ))
    }
}

impl<S> Layer<S> for AdminPolicy {
    type Service = AdminGate<S>;
    fn layer(&self, inner: S) -> AdminGate<S> {
        AdminGate {
            inner,
            policy: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AdminGate<S> {
    inner: S,
    policy: AdminPolicy,
}

/// A gRPC "trailers-only" response carrying PermissionDenied.
fn denied<B: Default>(message: &str) -> http::Response<B> {
    let status = tonic::Status::permission_denied(message);
    let mut resp = http::Response::new(B::default());
    let h = resp.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    let _ = status.add_header(h);
    resp
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for AdminGate<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>> + Send,
    S::Future: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let ns = req
            .headers()
            .get(super::NAMESPACE_HEADER)
            .and_then(|v| v.to_str().ok());
        if let Some(why) = self.policy.refusal(req.uri().path(), ns) {
            tracing::warn!(path = %req.uri().path(), namespace = ns.unwrap_or(""), "admin call refused");
            return Box::pin(async move { Ok(denied(&why)) });
        }
        Box::pin(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_calls_follow_the_policy() {
        let open = AdminPolicy::default();
        assert!(open.refusal("/contentd.v1.GC/Run", None).is_none());
        let limited = AdminPolicy {
            restricted: true,
            admin_listener: false,
            namespaces: Arc::new(vec!["ops".into()]),
        };
        for m in ADMIN_METHODS {
            let why = limited.refusal(m, Some("team")).unwrap();
            assert!(why.contains("admin"), "{why}");
            assert!(limited.refusal(m, None).is_some());
            assert!(limited.refusal(m, Some("ops")).is_none());
        }
        // Everything else is untouched: status and explanations stay open.
        assert!(limited.refusal("/contentd.v1.GC/Status", None).is_none());
        assert!(
            limited
                .refusal(
                    "/containerd.services.content.v1.Content/Delete",
                    Some("team")
                )
                .is_none()
        );
        let admin = AdminPolicy {
            admin_listener: true,
            ..limited
        };
        assert!(admin.refusal("/contentd.v1.Registry/Pull", None).is_none());
    }
}
