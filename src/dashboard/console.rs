//! The web console: plain ES modules, styles and vendored libraries from `console/` beside this
//! file, embedded in the binary at build time (release builds; debug builds read the folder, so
//! an edit shows on reload) and served by it: nothing else to run, nothing loaded from another
//! origin.
//!
//! `GET /` is the page; everything it loads lives under `/console/{build}/…`, where `{build}` is
//! a digest of every embedded file. A change to any file changes that prefix, so the files can
//! be cached for a year (`immutable`) while the page itself is revalidated on every load.
//! Modules import each other by relative path, so they need no rewriting to stay inside the
//! prefix. Responses are gzipped when the browser accepts it, and carry a Content-Security-Policy
//! that allows only this origin's scripts and styles: no inline script, no inline style
//! attribute, no `eval`.

use std::sync::OnceLock;

use actix_web::http::header::{self, HeaderValue};
use actix_web::middleware::Compress;
use actix_web::{HttpRequest, HttpResponse, ResponseError, web};
use rust_embed::RustEmbed;
use sha2::{Digest, Sha256};

use crate::http::error::ApiError;

#[derive(RustEmbed)]
#[folder = "src/dashboard/console/"]
struct Assets;

/// Where the page's files are served: `{ASSET_ROOT}/{build}/{file}`.
pub const ASSET_ROOT: &str = "/console";

/// What the page, its modules and styles may do. `connect-src 'self'` covers the `/ws` stream
/// (CSP 3 matches `ws:`/`wss:` of the same host to `'self'`). `img-src blob:` shows images
/// fetched with the bearer token (analytics SVGs) from object URLs: an SVG shown as an image
/// runs no script.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; font-src 'self'; \
     manifest-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The placeholder in `index.html` replaced by `{ASSET_ROOT}/{build}`.
const PREFIX_PLACEHOLDER: &str = "__ASSETS__";

/// A year: fingerprinted files never change under their name.
const IMMUTABLE: &str = "public, max-age=31536000, immutable";

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/")
            .wrap(Compress::default())
            .route(web::get().to(page)),
    )
    .service(
        web::resource(format!("{ASSET_ROOT}/{{build}}/{{file:.*}}"))
            .wrap(Compress::default())
            .route(web::get().to(asset)),
    );
}

/// The digest of every embedded file (names and contents), 16 hex digits. Release builds
/// compute it once; debug builds, which read the files from `src/`, on every request, so an
/// edited file gets a new prefix.
pub fn build_id() -> String {
    static BUILD: OnceLock<String> = OnceLock::new();
    let compute = || {
        fingerprint(Assets::iter().filter_map(|name| {
            let file = Assets::get(&name)?;
            Some((name.into_owned(), file.metadata.sha256_hash()))
        }))
    };
    if cfg!(debug_assertions) {
        compute()
    } else {
        BUILD.get_or_init(compute).clone()
    }
}

/// A digest over `(name, sha256 of content)` pairs, independent of their order.
fn fingerprint(files: impl Iterator<Item = (String, [u8; 32])>) -> String {
    let mut files: Vec<_> = files.collect();
    files.sort();
    let mut hasher = Sha256::new();
    for (name, digest) in &files {
        hasher.update(name.as_bytes());
        hasher.update([0]);
        hasher.update(digest);
    }
    hex::encode(&hasher.finalize()[..8])
}

/// The media type of a file the console serves (licences as text); `None` for anything else in
/// the folder, such as the vendor refresh script.
fn content_type(path: &str) -> Option<&'static str> {
    if path.rsplit('/').next() == Some("LICENSE") {
        return Some("text/plain; charset=utf-8");
    }
    let extension = path.rsplit_once('.')?.1;
    Some(match extension {
        "html" => "text/html; charset=utf-8",
        "js" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "json" => "application/json",
        _ => return None,
    })
}

/// `index.html` with the asset prefix of this build.
fn render_page(template: &str, build: &str) -> String {
    template.replace(PREFIX_PLACEHOLDER, &format!("{ASSET_ROOT}/{build}"))
}

fn with_security_headers(mut response: HttpResponse) -> HttpResponse {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

/// The page: never cached without revalidation, so a new build's prefix is seen at once.
async fn page(req: HttpRequest) -> HttpResponse {
    let build = build_id();
    let etag = format!("\"{build}\"");
    let unchanged = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|tag| tag.trim() == etag));
    let response = if unchanged {
        HttpResponse::NotModified()
            .insert_header((header::ETAG, etag))
            .insert_header((header::CACHE_CONTROL, "no-cache"))
            .finish()
    } else {
        let Some(file) = Assets::get("index.html") else {
            return HttpResponse::NotFound().finish();
        };
        let template = String::from_utf8_lossy(&file.data);
        HttpResponse::Ok()
            .content_type("text/html; charset=utf-8")
            .insert_header((header::ETAG, etag))
            .insert_header((header::CACHE_CONTROL, "no-cache"))
            .body(render_page(&template, &build))
    };
    with_security_headers(response)
}

/// A file of this build. Another build's prefix is 404: the page that asked for it is stale
/// and a reload fetches the current one.
async fn asset(path: web::Path<(String, String)>) -> HttpResponse {
    let (build, file) = path.into_inner();
    let found = (build == build_id())
        .then(|| content_type(&file).zip(Assets::get(&file)))
        .flatten();
    let response = match found {
        Some((media_type, data)) => HttpResponse::Ok()
            .content_type(media_type)
            .insert_header((header::CACHE_CONTROL, IMMUTABLE))
            .body(data.data.into_owned()),
        // The API's JSON error, as for any other unknown path.
        None => {
            let mut response =
                ApiError::not_found(format!("no file {file} in this build of the console")).error_response();
            response
                .headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            response
        }
    };
    with_security_headers(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_depends_on_names_and_contents_not_order() {
        let a = ("app.js".to_string(), [1u8; 32]);
        let b = ("api.js".to_string(), [2u8; 32]);
        let one = fingerprint([a.clone(), b.clone()].into_iter());
        assert_eq!(one, fingerprint([b.clone(), a.clone()].into_iter()));
        assert_eq!(one.len(), 16);
        let changed = ("app.js".to_string(), [3u8; 32]);
        assert_ne!(one, fingerprint([changed, b.clone()].into_iter()));
        let renamed = ("main.js".to_string(), [1u8; 32]);
        assert_ne!(one, fingerprint([renamed, b].into_iter()));
    }

    #[test]
    fn only_web_files_are_served() {
        assert_eq!(content_type("app.js"), Some("text/javascript; charset=utf-8"));
        assert_eq!(
            content_type("vendor/uplot/uPlot.min.css"),
            Some("text/css; charset=utf-8")
        );
        assert_eq!(
            content_type("vendor/uplot/LICENSE"),
            Some("text/plain; charset=utf-8")
        );
        assert_eq!(content_type("vendor/refresh.sh"), None);
        assert_eq!(content_type("README"), None);
    }

    #[test]
    fn page_points_at_this_build() {
        let page = render_page(
            r#"<script type="module" src="__ASSETS__/app.js"></script>"#,
            "0123456789abcdef",
        );
        assert_eq!(
            page,
            r#"<script type="module" src="/console/0123456789abcdef/app.js"></script>"#
        );
    }

    #[test]
    fn the_page_and_its_modules_are_embedded() {
        let page = Assets::get("index.html").expect("index.html is embedded");
        let page = String::from_utf8_lossy(&page.data);
        assert!(page.contains(PREFIX_PLACEHOLDER));
        // Strict CSP: nothing inline for it to allow.
        assert!(!page.contains(" style="), "no inline style attribute");
        assert!(!page.contains("<style"), "no inline stylesheet");
        for needed in [
            "app.js",
            "console.css",
            "vendor/uplot/uPlot.esm.js",
            "vendor/uplot/LICENSE",
        ] {
            assert!(Assets::get(needed).is_some(), "{needed} is embedded");
        }
        assert_eq!(build_id().len(), 16);
    }

    #[test]
    fn the_page_preloads_every_module() {
        let page = Assets::get("index.html").expect("index.html is embedded");
        let page = String::from_utf8_lossy(&page.data);
        for name in Assets::iter().filter(|n| n.ends_with(".js") && n.as_ref() != "app.js") {
            let link = format!(r#"<link rel="modulepreload" href="__ASSETS__/{name}">"#);
            assert!(page.contains(&link), "index.html lacks {link}");
        }
    }

    /// Every file the page or a module loads resolves to an embedded file the server serves.
    /// Release builds embed the folder at compile time with the same rules debug builds read
    /// it with, so this holds for both (`cargo test --release -p drover --lib console` checks
    /// the compiled-in copy).
    #[test]
    fn everything_the_page_loads_is_embedded_and_served() {
        let text = |name: &str| String::from_utf8(Assets::get(name).unwrap().data.into_owned()).unwrap();
        let mut wanted: Vec<String> = Vec::new();
        let page = text("index.html");
        for part in page.split("__ASSETS__/").skip(1) {
            wanted.push(part.split('"').next().unwrap().to_string());
        }
        for name in Assets::iter().filter(|n| n.ends_with(".js")) {
            let dir = name.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
            for line in text(&name).lines() {
                let Some(spec) = line
                    .trim_start()
                    .strip_prefix("import ")
                    .and_then(|l| l.split(" from '").nth(1))
                    .and_then(|l| l.split('\'').next())
                else {
                    continue;
                };
                let mut parts: Vec<&str> = dir.split('/').filter(|p| !p.is_empty()).collect();
                for step in spec.split('/') {
                    match step {
                        "." => {}
                        ".." => {
                            parts.pop();
                        }
                        other => parts.push(other),
                    }
                }
                wanted.push(parts.join("/"));
            }
        }
        assert!(wanted.len() > 20, "{wanted:?}");
        for name in &wanted {
            assert!(Assets::get(name).is_some(), "{name} is loaded but not embedded");
            assert!(content_type(name).is_some(), "{name} is loaded but not served");
        }
    }
}
