//! `github-push`: summarises each GitHub push in one log line.
use serde::Deserialize;
use wasmhook_sdk::{Event, HandlerError, Metadata, Plugin, export_plugin, info};

/// The fields of GitHub's push payload this plugin reads; the rest is ignored.
#[derive(Deserialize)]
struct Push {
    #[serde(rename = "ref")]
    git_ref: String,
    repository: Repository,
    pusher: Pusher,
    commits: Vec<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
struct Repository {
    full_name: String,
}

#[derive(Deserialize)]
struct Pusher {
    name: String,
}

struct GithubPush;

impl Plugin for GithubPush {
    fn metadata() -> Metadata {
        Metadata::new("github-push", env!("CARGO_PKG_VERSION"), ["github.push"])
    }

    fn handle(event: Event) -> Result<(), HandlerError> {
        let push: Push = event.json()?;
        info!("{} {}: {} commits by {}", push.repository.full_name, push.git_ref, push.commits.len(), push.pusher.name);
        Ok(())
    }
}

export_plugin!(GithubPush);
