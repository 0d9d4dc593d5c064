//! The route table: which requests corral serves, and how. Deny by default.
//!
//! Paths are matched exactly (case-sensitive, no trailing slash, no normalization). A path with a
//! dot segment, an empty segment, a backslash or a percent-encoded `/`, `.` or `\` is refused
//! with 400; anything that is not an exact route gets 404. Neither is ever forwarded.

use http::Method;

/// Who may call a route (README, "Routes"; `docs/ollama-protocol.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RouteClass {
    /// Anyone, no key.
    Public,
    /// Runs a model: a key whose team allows the requested model.
    Inference,
    /// Reads the catalogue: any valid key; model lists are filtered to the team's models.
    Info,
    /// Changes the model store: keys of admin teams.
    Admin,
}

/// The error and response conventions of the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    /// `/api/*`: `{"error":"message"}`, NDJSON streams.
    Ollama,
    /// `/v1/*`: `{"error":{"message","type","param","code"}}`, SSE streams.
    OpenAi,
    /// `/v1/messages`: `{"type":"error","error":{"type","message"}}`.
    Anthropic,
}

/// How corral handles a route's request body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BodyMode {
    /// No body is expected (GET/HEAD). Any body is refused.
    None,
    /// A JSON body read whole (up to `server.max_body`) and inspected before Ollama sees anything.
    Json,
    /// Raw bytes streamed through (model blobs, which may be gigabytes).
    Stream,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RouteKind {
    Root,
    Version,
    Generate,
    Chat,
    Embed,
    Embeddings,
    ChatCompletions,
    Completions,
    OpenAiEmbeddings,
    Responses,
    Messages,
    Tags,
    Ps,
    Show,
    Models,
    Model,
    Pull,
    Push,
    Create,
    Copy,
    Delete,
    Blobs,
}

use RouteKind::*;

/// Every route: kind, path (a `{}` marks the one variable segment), allowed methods.
const TABLE: &[(RouteKind, &str, &[Method])] = &[
    (Root, "/", &[Method::GET, Method::HEAD]),
    (Version, "/api/version", &[Method::GET, Method::HEAD]),
    (Generate, "/api/generate", &[Method::POST]),
    (Chat, "/api/chat", &[Method::POST]),
    (Embed, "/api/embed", &[Method::POST]),
    (Embeddings, "/api/embeddings", &[Method::POST]),
    (ChatCompletions, "/v1/chat/completions", &[Method::POST]),
    (Completions, "/v1/completions", &[Method::POST]),
    (OpenAiEmbeddings, "/v1/embeddings", &[Method::POST]),
    (Responses, "/v1/responses", &[Method::POST]),
    (Messages, "/v1/messages", &[Method::POST]),
    (Tags, "/api/tags", &[Method::GET, Method::HEAD]),
    (Ps, "/api/ps", &[Method::GET]),
    (Show, "/api/show", &[Method::POST]),
    (Models, "/v1/models", &[Method::GET]),
    (Model, "/v1/models/{}", &[Method::GET]),
    (Pull, "/api/pull", &[Method::POST]),
    (Push, "/api/push", &[Method::POST]),
    (Create, "/api/create", &[Method::POST]),
    (Copy, "/api/copy", &[Method::POST]),
    (Delete, "/api/delete", &[Method::DELETE]),
    (Blobs, "/api/blobs/{}", &[Method::HEAD, Method::POST]),
];

impl RouteKind {
    pub(crate) fn class(self) -> RouteClass {
        match self {
            Root | Version => RouteClass::Public,
            Generate | Chat | Embed | Embeddings | ChatCompletions | Completions
            | OpenAiEmbeddings | Responses | Messages => RouteClass::Inference,
            Tags | Ps | Show | Models | Model => RouteClass::Info,
            Pull | Push | Create | Copy | Delete | Blobs => RouteClass::Admin,
        }
    }

    pub(crate) fn dialect(self) -> Dialect {
        match self {
            Messages => Dialect::Anthropic,
            ChatCompletions | Completions | OpenAiEmbeddings | Responses | Models | Model => {
                Dialect::OpenAi
            }
            _ => Dialect::Ollama,
        }
    }

    pub(crate) fn body(self) -> BodyMode {
        match self {
            Root | Version | Tags | Ps | Models | Model => BodyMode::None,
            Blobs => BodyMode::Stream,
            _ => BodyMode::Json,
        }
    }

    /// The route template, used as the `route` log field and metric label.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Model => "/v1/models/{model}",
            Blobs => "/api/blobs/{digest}",
            _ => TABLE
                .iter()
                .find(|(k, _, _)| *k == self)
                .map(|(_, p, _)| *p)
                .unwrap_or("?"),
        }
    }

    /// Whether Ollama streams this route's answer when the request says nothing about `stream`.
    pub(crate) fn streams_by_default(self) -> bool {
        matches!(self, Generate | Chat | Pull | Push | Create)
    }

    /// Routes whose answer is produced by a model run (token usage applies).
    pub(crate) fn runs_model(self) -> bool {
        self.class() == RouteClass::Inference
    }
}

/// A request matched to a route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Matched {
    pub kind: RouteKind,
    /// The path to send upstream: the matched path, without any query string.
    pub path: String,
    /// The variable segment (`{model}` or `{digest}`), if the route has one.
    pub param: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteError {
    /// A path trick (dot segment, `//`, encoded separator, ...): 400.
    BadPath(&'static str),
    /// Not a route corral serves: 404.
    NotFound,
    /// Known path, wrong method: 405 with `Allow`.
    MethodNotAllowed { allow: String, dialect: Dialect },
}

/// Matches a request target (origin-form `path[?query]`) and method against the table.
pub fn classify(method: &Method, target: &[u8]) -> Result<Matched, RouteError> {
    let path = match target.iter().position(|&b| b == b'?') {
        Some(i) => &target[..i],
        None => target,
    };
    check_path(path)?;
    // check_path guarantees visible ASCII.
    let path = std::str::from_utf8(path).map_err(|_| RouteError::BadPath("path is not ASCII"))?;

    for (kind, pattern, methods) in TABLE {
        let param = match pattern.strip_suffix("{}") {
            Some(prefix) => match path.strip_prefix(prefix) {
                Some(rest) if valid_param(*kind, rest) => Some(rest.to_string()),
                _ => continue,
            },
            None if *pattern == path => None,
            None => continue,
        };
        if !methods.contains(method) {
            let allow = methods
                .iter()
                .map(Method::as_str)
                .collect::<Vec<_>>()
                .join(", ");
            return Err(RouteError::MethodNotAllowed {
                allow,
                dialect: kind.dialect(),
            });
        }
        return Ok(Matched {
            kind: *kind,
            path: path.to_string(),
            param,
        });
    }
    Err(RouteError::NotFound)
}

/// Refuses the path tricks that make two parsers disagree about which resource is meant.
fn check_path(path: &[u8]) -> Result<(), RouteError> {
    if path.first() != Some(&b'/') {
        return Err(RouteError::BadPath(
            "the request target must be an absolute path",
        ));
    }
    if !path.iter().all(|b| (0x21..0x7f).contains(b)) {
        return Err(RouteError::BadPath(
            "the path has spaces, control or non-ASCII characters",
        ));
    }
    if path.contains(&b'\\') {
        return Err(RouteError::BadPath("the path contains a backslash"));
    }
    if path.windows(2).any(|w| w == b"//") {
        return Err(RouteError::BadPath(
            "the path contains an empty segment (//)",
        ));
    }
    if path
        .split(|&b| b == b'/')
        .any(|seg| seg == b"." || seg == b"..")
    {
        return Err(RouteError::BadPath(
            "the path contains a dot segment (. or ..)",
        ));
    }
    let lower = path.to_ascii_lowercase();
    for encoded in [&b"%2f"[..], b"%2e", b"%5c", b"%00"] {
        if lower.windows(3).any(|w| w == encoded) {
            return Err(RouteError::BadPath(
                "the path contains a percent-encoded separator or dot",
            ));
        }
    }
    Ok(())
}

fn valid_param(kind: RouteKind, s: &str) -> bool {
    match kind {
        // One segment of a model name: `llama3.2:latest`, `qwen2.5-coder:7b`. Like Ollama's own
        // check it starts with a letter, digit or `_`; `..` anywhere is refused too, so nothing
        // that looks like a parent directory ever reaches Ollama's model store.
        Model => {
            s.len() <= 256
                && s.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
                && !s.contains("..")
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
        }
        // `sha256:<64 hex>` (Ollama also accepts `sha256-`).
        Blobs => {
            let hex = s
                .strip_prefix("sha256:")
                .or_else(|| s.strip_prefix("sha256-"));
            hex.is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        }
        _ => false,
    }
}

/// The dialect of a path that matched no route (so even a 404 speaks the caller's language).
pub(crate) fn dialect_of_path(path: &[u8]) -> Dialect {
    match path {
        p if p.starts_with(b"/v1/messages") => Dialect::Anthropic,
        p if p.starts_with(b"/v1/") => Dialect::OpenAi,
        _ => Dialect::Ollama,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(method: Method, target: &str) -> Result<RouteKind, RouteError> {
        classify(&method, target.as_bytes()).map(|m| m.kind)
    }

    #[test]
    fn every_design_route_is_served_with_its_class() {
        let cases = [
            (Method::GET, "/", RouteClass::Public),
            (Method::HEAD, "/", RouteClass::Public),
            (Method::GET, "/api/version", RouteClass::Public),
            (Method::POST, "/api/generate", RouteClass::Inference),
            (Method::POST, "/api/chat", RouteClass::Inference),
            (Method::POST, "/api/embed", RouteClass::Inference),
            (Method::POST, "/api/embeddings", RouteClass::Inference),
            (Method::POST, "/v1/chat/completions", RouteClass::Inference),
            (Method::POST, "/v1/completions", RouteClass::Inference),
            (Method::POST, "/v1/embeddings", RouteClass::Inference),
            (Method::POST, "/v1/responses", RouteClass::Inference),
            (Method::POST, "/v1/messages", RouteClass::Inference),
            (Method::GET, "/api/tags", RouteClass::Info),
            (Method::GET, "/api/ps", RouteClass::Info),
            (Method::POST, "/api/show", RouteClass::Info),
            (Method::GET, "/v1/models", RouteClass::Info),
            (Method::GET, "/v1/models/llama3.2:latest", RouteClass::Info),
            (Method::POST, "/api/pull", RouteClass::Admin),
            (Method::POST, "/api/push", RouteClass::Admin),
            (Method::POST, "/api/create", RouteClass::Admin),
            (Method::POST, "/api/copy", RouteClass::Admin),
            (Method::DELETE, "/api/delete", RouteClass::Admin),
            (
                Method::HEAD,
                &format!("/api/blobs/sha256:{}", "a".repeat(64)),
                RouteClass::Admin,
            ),
            (
                Method::POST,
                &format!("/api/blobs/sha256-{}", "0".repeat(64)),
                RouteClass::Admin,
            ),
        ];
        for (m, path, class) in cases {
            let got = kind(m.clone(), path).unwrap_or_else(|e| panic!("{m} {path}: {e:?}"));
            assert_eq!(got.class(), class, "{m} {path}");
        }
    }

    #[test]
    fn never_routes_and_unknown_paths_are_404() {
        for (m, path) in [
            (Method::POST, "/api/me"),
            (Method::POST, "/api/signout"),
            (Method::DELETE, "/api/user/keys/abc"),
            (Method::GET, "/api/experimental/model-recommendations"),
            (Method::POST, "/api/experimental/web_search"),
            (Method::POST, "/v1/audio/transcriptions"),
            (Method::GET, "/api/status"),
            (Method::GET, "/metrics"),
            (Method::GET, "/api/tags/"),
            (Method::GET, "/API/TAGS"),
            (Method::GET, "/Api/tags"),
            (Method::POST, "/api/chat/"),
            (Method::GET, "/v1/models/"),
            (Method::GET, "/v1/models/a/b"),
            // Found by the fuzzer: a model name with `..` in it.
            (Method::GET, "/v1/models/llama..?x"),
            (Method::GET, "/v1/models/a..b"),
            (Method::GET, "/v1/models/.hidden"),
            (Method::GET, "/v1/models/-rf"),
            (Method::POST, "/api/blobs/sha256:abc"),
            (Method::GET, "/api/tags%20"),
            (Method::GET, "/api/t%61gs"),
        ] {
            assert_eq!(
                kind(m.clone(), path),
                Err(RouteError::NotFound),
                "{m} {path}"
            );
        }
    }

    #[test]
    fn path_tricks_are_400() {
        for path in [
            "/api/../api/tags",
            "/api/./tags",
            "/api//tags",
            "//api/tags",
            "/api/tags/..",
            "/api%2ftags",
            "/api%2Ftags",
            "/api/%2e%2e/me",
            "/api/%2E/tags",
            "/api\\tags",
            "/api/tags%5c",
            "/api/tags%00",
            "api/tags",
            "http://evil/api/tags",
            "*",
            "/api/ta gs",
            "/api/tägs",
        ] {
            assert!(
                matches!(kind(Method::GET, path), Err(RouteError::BadPath(_))),
                "{path}: {:?}",
                kind(Method::GET, path)
            );
        }
    }

    #[test]
    fn wrong_method_is_405_with_allow() {
        assert_eq!(
            kind(Method::GET, "/api/chat"),
            Err(RouteError::MethodNotAllowed {
                allow: "POST".into(),
                dialect: Dialect::Ollama
            })
        );
        assert_eq!(
            kind(Method::POST, "/api/delete"),
            Err(RouteError::MethodNotAllowed {
                allow: "DELETE".into(),
                dialect: Dialect::Ollama
            })
        );
        assert!(matches!(
            kind(Method::DELETE, "/v1/models/x"),
            Err(RouteError::MethodNotAllowed {
                dialect: Dialect::OpenAi,
                ..
            })
        ));
    }

    #[test]
    fn query_strings_are_dropped_from_the_forwarded_path() {
        let m = classify(&Method::GET, b"/api/tags?verbose=1&x=%2f").unwrap();
        assert_eq!(m.kind, Tags);
        assert_eq!(m.path, "/api/tags");
        let m = classify(&Method::GET, b"/v1/models/qwen2.5-coder:7b?x").unwrap();
        assert_eq!(m.param.as_deref(), Some("qwen2.5-coder:7b"));
        assert_eq!(m.path, "/v1/models/qwen2.5-coder:7b");
    }

    #[test]
    fn each_route_has_its_body_mode_name_and_stream_default() {
        for k in [Root, Version, Tags, Ps, Models, Model] {
            assert_eq!(k.body(), BodyMode::None, "{k:?}");
        }
        assert_eq!(Blobs.body(), BodyMode::Stream);
        for k in [
            Generate,
            Chat,
            ChatCompletions,
            Show,
            Pull,
            Create,
            Copy,
            Delete,
        ] {
            assert_eq!(k.body(), BodyMode::Json, "{k:?}");
        }
        assert_eq!(Blobs.name(), "/api/blobs/{digest}");
        assert_eq!(Tags.name(), "/api/tags");
        for k in [Generate, Chat, Pull, Push, Create] {
            assert!(k.streams_by_default(), "{k:?}");
        }
        for k in [
            Embed,
            ChatCompletions,
            Completions,
            Responses,
            Messages,
            Show,
            Copy,
        ] {
            assert!(!k.streams_by_default(), "{k:?}");
        }
        for k in [
            Generate,
            Chat,
            Embed,
            Embeddings,
            ChatCompletions,
            Completions,
            OpenAiEmbeddings,
            Responses,
            Messages,
        ] {
            assert!(k.runs_model(), "{k:?}");
        }
        for k in [
            Root, Version, Tags, Ps, Show, Models, Model, Pull, Create, Blobs,
        ] {
            assert!(!k.runs_model(), "{k:?}");
        }
    }

    #[test]
    fn dialects_follow_the_path() {
        assert_eq!(Chat.dialect(), Dialect::Ollama);
        assert_eq!(ChatCompletions.dialect(), Dialect::OpenAi);
        assert_eq!(Model.dialect(), Dialect::OpenAi);
        assert_eq!(Messages.dialect(), Dialect::Anthropic);
        assert_eq!(Model.name(), "/v1/models/{model}");
        assert_eq!(Chat.name(), "/api/chat");
    }

    #[test]
    fn an_unknown_path_is_answered_in_the_dialect_of_its_prefix() {
        // A 404 for an SDK's typo must still parse in that SDK.
        assert_eq!(dialect_of_path(b"/v1/messages/batches"), Dialect::Anthropic);
        assert_eq!(dialect_of_path(b"/v1/messages"), Dialect::Anthropic);
        assert_eq!(dialect_of_path(b"/v1/assistants"), Dialect::OpenAi);
        assert_eq!(dialect_of_path(b"/api/nope"), Dialect::Ollama);
        assert_eq!(dialect_of_path(b"/"), Dialect::Ollama);
    }
}
