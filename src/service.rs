//! The hyper service: `(method, path)` to a handler. [`handle`] is the only place
//! that turns an error into a response, logs it and tags it with the request id;
//! [`handle_inner`] just uses `?`.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::admin;
use crate::body::SluiceBody;
use crate::error::{ProxyError, json_response};
use crate::proxy::headers::{self, REQUEST_ID};
use crate::proxy::{self, RequestContext};
use crate::state::{Live, Shared};

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

/// Answers one request; never fails.
pub async fn handle(shared: &Shared, request: Request<Incoming>) -> Response<SluiceBody> {
    let ctx = RequestContext { request_id: headers::request_id(request.headers()), started: Instant::now() };
    let method = request.method().clone();
    let uri = request.uri().clone();
    let mut response = match handle_inner(shared, request, &ctx).await {
        Ok(response) => response,
        Err(error) => {
            let status = error.status();
            // Only the path: a query may carry `api_key`.
            if status.is_server_error() {
                tracing::warn!(request_id = ?ctx.request_id, %method, path = uri.path(), status = status.as_u16(), kind = error.kind(), %error, "request failed");
            } else {
                tracing::info!(request_id = ?ctx.request_id, %method, path = uri.path(), status = status.as_u16(), kind = error.kind(), %error, "request refused");
            }
            error.into_response()
        }
    };
    response.headers_mut().insert(REQUEST_ID, ctx.request_id);
    response
}

/// Routes by `(method, path)`; errors bubble up to [`handle`].
async fn handle_inner(
    shared: &Shared,
    request: Request<Incoming>,
    ctx: &RequestContext,
) -> Result<Response<SluiceBody>, ProxyError> {
    // One snapshot per request, kept until the request (and its body) is done.
    let live = shared.live.load_full();
    let path = request.uri().path();
    match path {
        "/" | "/health" | "/v1/health" => {
            only(&request, &Method::GET)?;
            authenticate(&live, &request)?;
            Ok(admin::health(shared, &live))
        }
        "/v1/models" => {
            authenticate(&live, &request)?;
            only(&request, &Method::GET)?;
            Ok(json_response(StatusCode::OK, live.routes.models_json.clone()))
        }
        _ if path.starts_with("/admin/") => admin::handle(shared, &live, request.method(), path, request.headers()),
        _ if path.starts_with("/v1/") => {
            authenticate(&live, &request)?;
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

fn authenticate(live: &Live, request: &Request<Incoming>) -> Result<(), ProxyError> {
    live.client_keys.authenticate(request.uri().path(), request.headers(), request.uri().query()).map(|_client| ())
}
