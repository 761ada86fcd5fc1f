//! The web dashboard (docs/dashboard.md): a static page and its assets, embedded in the binary and
//! served at `/ui`. The page reads the same `/v1` API as any client, with the bearer token the
//! operator types in (kept in the tab's `sessionStorage`); nothing here needs authorization, because
//! nothing here holds data.
//!
//! Every answer carries a strict Content-Security-Policy: scripts and styles only from this server,
//! no inline script, no framing, requests only back to this origin.

use axum::Router;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::api::AppState;

/// The page's policy: nothing inline, nothing from elsewhere.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// One embedded file: its name under `/ui/assets/`, media type and bytes.
struct Asset {
    name: &'static str,
    media_type: &'static str,
    bytes: &'static [u8],
}

const INDEX: &[u8] = include_bytes!("../ui/index.html");

const ASSETS: &[Asset] = &[
    Asset {
        name: "app.js",
        media_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("../ui/app.js"),
    },
    Asset {
        name: "app.css",
        media_type: "text/css; charset=utf-8",
        bytes: include_bytes!("../ui/app.css"),
    },
    Asset {
        name: "favicon.svg",
        media_type: "image/svg+xml",
        bytes: include_bytes!("../ui/favicon.svg"),
    },
    // uPlot (MIT, Leon Sorokin), vendored from npm by scripts/vendor-ui; its licence is served too.
    Asset {
        name: "uPlot.iife.min.js",
        media_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("../ui/vendor/uPlot.iife.min.js"),
    },
    Asset {
        name: "uPlot.min.css",
        media_type: "text/css; charset=utf-8",
        bytes: include_bytes!("../ui/vendor/uPlot.min.css"),
    },
    Asset {
        name: "uPlot.LICENSE.txt",
        media_type: "text/plain; charset=utf-8",
        bytes: include_bytes!("../ui/vendor/uPlot.LICENSE"),
    },
];

/// The dashboard's routes, or none when it is switched off (`--ui off`: `/ui` is then a 404 like
/// any unknown path).
pub fn routes(enabled: bool) -> Router<AppState> {
    if !enabled {
        return Router::new();
    }
    Router::new()
        .route("/", get(|| async { redirect() }))
        .route("/ui", get(|| async { page() }))
        .route("/ui/", get(|| async { page() }))
        .route(
            "/ui/assets/{name}",
            get(|axum::extract::Path(name): axum::extract::Path<String>| async move {
                asset(&name)
            }),
        )
}

fn guarded(mut response: Response, cache: &'static str) -> Response {
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::CACHE_CONTROL, cache),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

fn redirect() -> Response {
    guarded(
        (StatusCode::FOUND, [(header::LOCATION, "/ui/")]).into_response(),
        "no-store",
    )
}

fn page() -> Response {
    guarded(
        ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], INDEX).into_response(),
        "no-cache",
    )
}

fn asset(name: &str) -> Response {
    match ASSETS.iter().find(|a| a.name == name) {
        Some(a) => guarded(
            ([(header::CONTENT_TYPE, a.media_type)], a.bytes).into_response(),
            "no-cache",
        ),
        None => crate::error::ApiError::new(
            StatusCode::NOT_FOUND,
            "no_route",
            format!("no dashboard asset {name:?}"),
        )
        .into_response(),
    }
}
