//! Logging set-up: human text by default, JSON lines on request.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Output format of the logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Libraries that print whole requests, headers or websocket frames (credentials among
/// them) at TRACE or DEBUG: never below INFO, whatever the level asked for.
const QUIET: [&str; 6] = [
    "tungstenite",
    "tokio_tungstenite",
    "hyper",
    "hyper_util",
    "reqwest",
    "h2",
];

/// The filter for `level`, with the libraries above kept at INFO.
fn filter(level: &str) -> Result<EnvFilter, String> {
    let mut filter = EnvFilter::try_new(level)
        .map_err(|e| format!("--log-level `{level}` is not a valid filter: {e}"))?;
    for target in QUIET {
        if let Ok(directive) = format!("{target}=info").parse() {
            filter = filter.add_directive(directive);
        }
    }
    Ok(filter)
}

/// Installs the global subscriber; `level` is an `EnvFilter` directive such as `info` or `debug`.
pub fn init(format: LogFormat, level: &str) -> Result<(), String> {
    let filter = filter(level)?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder
            .with_target(false)
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
    result.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libraries_that_print_frames_stay_at_info() {
        let f = filter("trace").unwrap().to_string();
        assert!(
            f.contains("tungstenite=info") && f.contains("hyper=info"),
            "{f}"
        );
        assert!(filter("not a [filter").is_err());
    }
}
