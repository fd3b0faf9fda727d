//! The hyper service: `(method, path)` to a handler. [`handle`] is the only place
//! that turns an error into a response, logs it and records it; [`handle_inner`]
//! just uses `?`.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body as _;
use hyper::body::Incoming;

use crate::admin;
use crate::body::SluiceBody;
use crate::error::{ProxyError, json_response};
use crate::proxy::headers::REQUEST_ID;
use crate::proxy::{self, RequestContext};
use crate::state::{Live, Shared};
use crate::telemetry::{self, End};

/// The gateway as a hyper service; cheap to clone per connection.
#[derive(Clone)]
pub struct Gateway {
    shared: Arc<Shared>,
}

impl Gateway {
    /// A service over the shared state.
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

impl hyper::service::Service<Request<Incoming>> for Gateway {
    type Response = Response<SluiceBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let shared = Arc::clone(&self.shared);
        Box::pin(async move { Ok(handle(&shared, request).await) })
    }
}

/// Status recorded for a request whose client left before its answer began
/// (nginx's "client closed request"); never sent, since nobody is listening.
pub const CLIENT_CLOSED: u16 = 499;

/// Answers one request; never fails. A proxied answer is recorded when its body
/// ends (by the metered body); everything else is recorded here, including a
/// request whose client left first (hyper then drops this future mid-way).
pub async fn handle(shared: &Shared, request: Request<Incoming>) -> Response<SluiceBody> {
    let mut pending = Unanswered { ctx: RequestContext::new(Arc::clone(&shared.telemetry), &request), armed: true };
    let ctx = &mut pending.ctx;
    let (mut response, error) = match handle_inner(shared, request, ctx).await {
        Ok(response) => (response, None),
        Err(error) => {
            let status = error.status();
            // Only the path: a query may carry `api_key`.
            let (method, path) = (&ctx.method, &*ctx.path);
            if status.is_server_error() {
                tracing::warn!(request_id = ?ctx.request_id, %method, path, status = status.as_u16(), kind = error.kind(), %error, "request failed");
            } else {
                tracing::info!(request_id = ?ctx.request_id, %method, path, status = status.as_u16(), kind = error.kind(), %error, "request refused");
            }
            let kind = error.kind();
            (error.into_response(), Some(kind))
        }
    };
    pending.armed = false;
    let ctx = &pending.ctx;
    response.headers_mut().insert(REQUEST_ID, ctx.request_id.clone());
    if !matches!(response.body(), SluiceBody::Upstream { .. }) {
        let bytes_out = response.body().size_hint().exact().unwrap_or(0);
        shared.telemetry.finish(ctx, End { status: response.status().as_u16(), bytes_out, error, ..End::default() });
    }
    response
}

/// A request on its way through [`handle`]. If hyper drops the handler before
/// it returns (the client closed the connection or reset the stream), the
/// request is still counted and logged, as `499` / `client_cancelled`.
struct Unanswered {
    ctx: RequestContext,
    /// Cleared once the handler returned an answer.
    armed: bool,
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let ctx = &self.ctx;
        tracing::info!(request_id = ?ctx.request_id, method = %ctx.method, path = &*ctx.path, attempts = ctx.attempts, "client left before the answer");
        ctx.telemetry.finish(ctx, End { status: CLIENT_CLOSED, error: Some("client_cancelled"), ..End::default() });
    }
}

/// Routes by `(method, path)`; errors bubble up to [`handle`].
async fn handle_inner(
    shared: &Shared,
    request: Request<Incoming>,
    ctx: &mut RequestContext,
) -> Result<Response<SluiceBody>, ProxyError> {
    // One snapshot per request, kept until the request (and its body) is done.
    let live = shared.live.load_full();
    ctx.overhead_header = live.config.server.overhead_header;
    let path = request.uri().path();
    match path {
        "/" | "/health" | "/v1/health" => {
            only(&request, &Method::GET)?;
            authenticate(&live, &request, ctx)?;
            Ok(admin::health(shared, &live))
        }
        "/metrics" if live.config.metrics_enabled => {
            authenticate(&live, &request, ctx)?;
            only(&request, &Method::GET)?;
            let mut response = Response::new(SluiceBody::full(telemetry::render_metrics(shared, &live)));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
            Ok(response)
        }
        "/stats" => {
            authenticate(&live, &request, ctx)?;
            only(&request, &Method::GET)?;
            Ok(json_response(StatusCode::OK, telemetry::render_stats(shared, &live).to_string().into()))
        }
        "/v1/models" => {
            authenticate(&live, &request, ctx)?;
            only(&request, &Method::GET)?;
            Ok(json_response(StatusCode::OK, live.routes.models_json.clone()))
        }
        _ if path.starts_with("/admin/") => admin::handle(shared, &live, request.method(), path, request.headers()),
        _ if path.starts_with("/v1/models/") && path.ends_with("/test") => {
            admin::test_model(shared, &live, request.method(), path, request.headers()).await
        }
        _ if path.starts_with("/v1/") => {
            authenticate(&live, &request, ctx)?;
            if proxy::is_model_endpoint(path) {
                only(&request, &Method::POST)?;
            }
            proxy::forward(&live, request, ctx).await
        }
        _ => Err(ProxyError::NotFound(path.to_string())),
    }
}

fn only(request: &Request<Incoming>, method: &Method) -> Result<(), ProxyError> {
    let allowed = request.method() == method || (method == Method::GET && request.method() == Method::HEAD);
    if allowed { Ok(()) } else { Err(ProxyError::MethodNotAllowed(request.method().clone())) }
}

fn authenticate(live: &Live, request: &Request<Incoming>, ctx: &mut RequestContext) -> Result<(), ProxyError> {
    let client = live.client_keys.authenticate(request.uri().path(), request.headers(), request.uri().query())?;
    ctx.client = client.map(|c| c.0);
    Ok(())
}
