//! The admin API on its own listener: health, plugins, events. Every route but `/healthz`
//! requires `Authorization: Bearer <token>` when the operator sets a token. It only reads
//! from the other modules; nothing reads from it.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode, header};
use serde::Serialize;
use subtle::ConstantTimeEq;

use crate::config::Secret;
use crate::http::{self, Body};
use crate::journal::Journal;
use crate::registry::Registry;

/// The admin API's state.
pub struct Admin {
    journal: Arc<dyn Journal>,
    registry: Arc<Registry>,
    token: Option<Secret>,
}

#[derive(Serialize)]
struct PluginView<'a> {
    name: &'a str,
    component: &'a str,
    version: &'a str,
    subscriptions: &'a [String],
    file: String,
    sha256: &'a str,
}

impl Admin {
    /// An admin API over `journal` and `registry`, guarded by `token` when there is one.
    pub fn new(journal: Arc<dyn Journal>, registry: Arc<Registry>, token: Option<Secret>) -> Self {
        Admin {
            journal,
            registry,
            token,
        }
    }

    /// Answers one HTTP request.
    pub async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Response<Body> {
        let path = request.uri().path().to_owned();
        if path == "/healthz" {
            return http::json(StatusCode::OK, &serde_json::json!({"status": "ok"}));
        }
        if !self.authorized(&request) {
            let mut response =
                http::error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            return response;
        }
        let known = path == "/v1/plugins" || path.starts_with("/v1/events/");
        if !known {
            return http::error(StatusCode::NOT_FOUND, format!("no admin route {path}"));
        }
        if request.method() != Method::GET {
            return http::error(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("method {} not allowed on {path}; use GET", request.method()),
            );
        }
        match path.strip_prefix("/v1/events/") {
            Some(id) => self.event(id).await,
            None => self.plugins(),
        }
    }

    fn authorized(&self, request: &Request<Incoming>) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|value| value.as_bytes().strip_prefix(b"Bearer "))
            .unwrap_or_default();
        bool::from(given.ct_eq(token.expose()))
    }

    fn plugins(&self) -> Response<Body> {
        let plugins = self.registry.list();
        let views: Vec<PluginView<'_>> = plugins
            .iter()
            .map(|plugin| {
                let metadata = plugin.component.metadata();
                PluginView {
                    name: &plugin.name,
                    component: &metadata.name,
                    version: &metadata.version,
                    subscriptions: &plugin.subscriptions,
                    file: plugin.file.display().to_string(),
                    sha256: &plugin.sha256,
                }
            })
            .collect();
        http::json(StatusCode::OK, &serde_json::json!({ "plugins": views }))
    }

    async fn event(&self, id: &str) -> Response<Body> {
        match self.journal.event(id).await {
            Ok(Some(record)) => http::json(StatusCode::OK, &record),
            Ok(None) => http::error(StatusCode::NOT_FOUND, format!("no event with id {id:?}")),
            Err(err) => {
                tracing::error!(error = %err, "cannot read an event from the journal");
                http::error(StatusCode::INTERNAL_SERVER_ERROR, "cannot read the journal")
            }
        }
    }
}
