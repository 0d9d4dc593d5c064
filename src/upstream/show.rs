//! What Ollama's `/api/show` says about a model, as corral needs it: whether Ollama has it, and
//! how to load it without a prompt (completion models through `/api/generate`, embedding models
//! through `/api/embed`). Shared by the preloader and `corral check`.

use crate::upstream::client::UpstreamClient;
use serde_json::{json, Value};
use std::time::Duration;

/// `/api/show` answers at once.
const SHOW_TIMEOUT: Duration = Duration::from_secs(30);

/// The route that loads a model without running a prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LoadRoute {
    Generate,
    Embed,
}

impl LoadRoute {
    pub(crate) fn path(self) -> &'static str {
        match self {
            LoadRoute::Generate => "/api/generate",
            LoadRoute::Embed => "/api/embed",
        }
    }

    /// By the model's capabilities: anything that completes loads through generate.
    pub(crate) fn for_capabilities(capabilities: &[String]) -> Option<LoadRoute> {
        let has = |c: &str| capabilities.iter().any(|x| x == c);
        if has("completion") {
            Some(LoadRoute::Generate)
        } else if has("embedding") {
            Some(LoadRoute::Embed)
        } else {
            None
        }
    }
}

/// Ollama's verdict on a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Shown {
    Loadable(LoadRoute),
    /// Ollama does not have it (404).
    Missing,
    /// It has it, but it can be neither loaded for generation nor for embeddings.
    NotLoadable(String),
    /// Another answer, with Ollama's message.
    Refused(String),
}

/// Asks `/api/show` about `model`. `Err`: Ollama did not answer.
pub(crate) async fn show(client: &UpstreamClient, model: &str) -> Result<Shown, String> {
    let answer = client
        .request(
            "POST",
            "/api/show",
            Some(&json!({ "model": model })),
            SHOW_TIMEOUT,
        )
        .await?;
    Ok(match answer.status {
        200 => {
            let caps: Vec<String> = answer
                .json()
                .and_then(|v| v["capabilities"].as_array().cloned())
                .unwrap_or_default()
                .iter()
                .filter_map(|c| c.as_str().map(str::to_string))
                .collect();
            match LoadRoute::for_capabilities(&caps) {
                Some(route) => Shown::Loadable(route),
                None => Shown::NotLoadable(format!(
                    "it can neither generate nor embed (capabilities: {})",
                    caps.join(", ")
                )),
            }
        }
        404 => Shown::Missing,
        status => Shown::Refused(format!(
            "/api/show answered {status}: {}",
            answer.error_message()
        )),
    })
}

/// The body that loads `model` with `keep_alive`, and nothing else.
pub(crate) fn load_body(model: &str, keep_alive: &Value) -> Value {
    json!({ "model": model, "keep_alive": keep_alive })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_choose_the_route() {
        let caps = |c: &[&str]| c.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            LoadRoute::for_capabilities(&caps(&["completion", "tools"])),
            Some(LoadRoute::Generate)
        );
        assert_eq!(
            LoadRoute::for_capabilities(&caps(&["embedding"])),
            Some(LoadRoute::Embed)
        );
        assert_eq!(LoadRoute::for_capabilities(&caps(&["vision"])), None);
    }
}
