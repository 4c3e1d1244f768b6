//! Request observation for every listener: a tower layer that counts each gRPC call by
//! method and status code and times it to the end of its response stream. The status of a
//! streaming call is only known from its trailers, so the response body is wrapped and the
//! call is recorded when the trailers (or the end) pass through.
//!
//! A call that fails with INTERNAL, DATA_LOSS or UNKNOWN (the server's fault or the disk's,
//! never the client's) is logged here, once, with its method, namespace and message. By
//! default the per-call span, which would give every log line inside a call that context,
//! is off (`telemetry`).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use http_body::{Body, Frame};
use tower::{Layer, Service};

#[derive(Clone, Default)]
pub struct ObserveLayer;

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;
    fn layer(&self, inner: S) -> Observe<S> {
        Observe { inner }
    }
}

#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
}

/// What is recorded when the call ends.
struct Call {
    method: &'static str,
    /// The namespace header as received (a reference-counted slice, not a copy).
    namespace: Option<http::HeaderValue>,
    start: Instant,
    done: bool,
}

impl Call {
    /// Records the call's end from the headers or trailers that carry its status.
    fn finish_with(&mut self, status: &http::HeaderMap) {
        let code = status
            .get("grpc-status")
            .map_or("OK", |v| code_name(v.as_bytes()));
        self.end(code, || {
            tonic::Status::from_header_map(status)
                .map(|s| s.message().to_owned())
                .unwrap_or_default()
        });
    }

    /// Records the call's end, and logs it when it failed by the server's (or the disk's)
    /// fault. `message` is only built then.
    fn end(&mut self, code: &'static str, message: impl FnOnce() -> String) {
        if self.done {
            return;
        }
        if matches!(code, "INTERNAL" | "DATA_LOSS" | "UNKNOWN") {
            let namespace = self.namespace.as_ref().and_then(|v| v.to_str().ok());
            tracing::error!(
                method = self.method,
                namespace = namespace.unwrap_or(""),
                code,
                message = message(),
                "call failed"
            );
        }
        self.finish(code);
    }

    fn finish(&mut self, code: &str) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let m = crate::metrics::get();
        m.rpc_requests.add(&[self.method, code], 1);
        m.rpc_seconds
            .observe(&[self.method], self.start.elapsed().as_secs_f64());
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        // A stream the client abandoned never reaches its trailers.
        self.finish("CANCELLED");
    }
}

fn code_name(v: &[u8]) -> &'static str {
    match std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.parse::<i32>().ok())
    {
        Some(c) => match tonic::Code::from_i32(c) {
            tonic::Code::Ok => "OK",
            tonic::Code::Cancelled => "CANCELLED",
            tonic::Code::Unknown => "UNKNOWN",
            tonic::Code::InvalidArgument => "INVALID_ARGUMENT",
            tonic::Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
            tonic::Code::NotFound => "NOT_FOUND",
            tonic::Code::AlreadyExists => "ALREADY_EXISTS",
            tonic::Code::PermissionDenied => "PERMISSION_DENIED",
            tonic::Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
            tonic::Code::FailedPrecondition => "FAILED_PRECONDITION",
            tonic::Code::Aborted => "ABORTED",
            tonic::Code::OutOfRange => "OUT_OF_RANGE",
            tonic::Code::Unimplemented => "UNIMPLEMENTED",
            tonic::Code::Internal => "INTERNAL",
            tonic::Code::Unavailable => "UNAVAILABLE",
            tonic::Code::DataLoss => "DATA_LOSS",
            tonic::Code::Unauthenticated => "UNAUTHENTICATED",
        },
        None => "UNKNOWN",
    }
}

/// Every `package.Service/Method` a listener serves, from the descriptor sets it serves
/// reflection for.
fn known_methods() -> &'static std::collections::HashSet<String> {
    static KNOWN: std::sync::OnceLock<std::collections::HashSet<String>> =
        std::sync::OnceLock::new();
    KNOWN.get_or_init(|| {
        use prost::Message as _;
        let mut out = std::collections::HashSet::new();
        for set in [
            super::pb::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ] {
            let Ok(fds) = prost_types::FileDescriptorSet::decode(set) else {
                continue;
            };
            for f in fds.file {
                for svc in &f.service {
                    for m in &svc.method {
                        out.insert(format!("{}.{}/{}", f.package(), svc.name(), m.name()));
                    }
                }
            }
        }
        out
    })
}

/// The metrics label of a request path: the method when it is one contentd serves, else
/// "unknown". Paths come from clients; labels must not grow with them.
pub fn method_label(path: &str) -> &'static str {
    known_methods()
        .get(path.trim_start_matches('/'))
        .map_or("unknown", |m| m.as_str())
}

pub struct ObservedBody<B> {
    inner: B,
    call: Option<Call>,
}

impl<B: Body<Error: std::fmt::Display> + Unpin> Body for ObservedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(t) = f.trailers_ref()
                    && let Some(c) = self.call.as_mut()
                {
                    c.finish_with(t);
                }
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(c) = self.call.as_mut() {
                    c.end("INTERNAL", || e.to_string());
                }
            }
            Poll::Ready(None) => {
                if let Some(c) = self.call.as_mut() {
                    c.finish("OK");
                }
            }
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for Observe<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>> + Send,
    S::Future: Send + 'static,
    ResBody: Body<Error: std::fmt::Display> + Unpin,
{
    type Response = http::Response<ObservedBody<ResBody>>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let method = method_label(req.uri().path());
        let namespace = req.headers().get(super::NAMESPACE_HEADER).cloned();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let mut call = Call {
                method,
                namespace,
                start: Instant::now(),
                done: false,
            };
            let resp = fut.await?;
            // A "trailers-only" response (an error before any message) carries the status
            // in its headers.
            if resp.headers().contains_key("grpc-status") {
                call.finish_with(resp.headers());
            }
            Ok(resp.map(|inner| ObservedBody {
                inner,
                call: Some(call),
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::method_label;

    #[test]
    fn only_served_methods_become_labels() {
        assert_eq!(
            method_label("/containerd.services.content.v1.Content/Info"),
            "containerd.services.content.v1.Content/Info"
        );
        assert_eq!(
            method_label("/grpc.health.v1.Health/Check"),
            "grpc.health.v1.Health/Check"
        );
        assert_eq!(method_label("/contentd.v1.GC/Run"), "contentd.v1.GC/Run");
        for hostile in [
            "/x.Y/Z",
            "/containerd.services.content.v1.Content/Nope",
            "",
            "/",
        ] {
            assert_eq!(method_label(hostile), "unknown");
        }
    }
}
