//! The `http://` / `https://` transport: each batch is one POST of the request JSON to the URL
//! (the remote reward server pattern of OpenRLHF and verl); the response body is the reply.
//! Proxies come from the environment (`HTTP_PROXY`, `NO_PROXY`, ...), except for loopback
//! hosts, which are always reached directly.

use std::time::Duration;

use anyhow::anyhow;
use ureq::http::Uri;
use ureq::Agent;

use super::protocol::excerpt;
use super::Failure;

/// An HTTP reward endpoint.
pub struct HttpReward {
    url: String,
    agent: Agent,
    timeout: Duration,
}

impl HttpReward {
    /// An endpoint at `url` (checked by [`check_url`]) whose calls give up after `timeout`.
    pub(super) fn new(url: &str, timeout: Duration) -> anyhow::Result<Self> {
        let uri = check_url(url)?;
        let config = Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false);
        let config = match uri.host() {
            Some(host) if is_loopback(host) => config.proxy(None),
            _ => config,
        };
        Ok(Self {
            url: url.to_owned(),
            agent: config.build().new_agent(),
            timeout,
        })
    }

    /// POSTs `request`; the body of a 2xx response is the reply. Connection failures,
    /// timeouts, 408, 429 and 5xx may succeed when tried again; other statuses will not.
    pub(super) fn call(&self, request: &str) -> Result<String, Failure> {
        let sent = self
            .agent
            .post(&self.url)
            .header("Content-Type", "application/json")
            .send(request);
        let mut response = match sent {
            Ok(response) => response,
            Err(ureq::Error::Timeout(_)) => return Err(self.timed_out()),
            Err(error) => return Err(Failure::retry(anyhow!("POST {} failed: {error}", self.url))),
        };
        let status = response.status();
        let body = match response.body_mut().read_to_string() {
            Ok(body) => body,
            Err(ureq::Error::Timeout(_)) => return Err(self.timed_out()),
            Err(error) => {
                return Err(Failure::retry(anyhow!(
                    "cannot read the response of {} (HTTP {status}): {error}",
                    self.url
                )))
            }
        };
        if status.is_success() {
            return Ok(body);
        }
        let error = anyhow!(
            "{} answered HTTP {status}: {}",
            self.url,
            excerpt(body.trim())
        );
        let transient = status.is_server_error() || matches!(status.as_u16(), 408 | 429);
        Err(if transient {
            Failure::retry(error)
        } else {
            Failure::fatal(error)
        })
    }

    fn timed_out(&self) -> Failure {
        Failure::retry(anyhow!(
            "no reply from {} within {} s (reward_timeout)",
            self.url,
            self.timeout.as_secs_f64()
        ))
    }
}

/// `url` as a URI with an `http` or `https` scheme and a host.
pub(super) fn check_url(url: &str) -> anyhow::Result<Uri> {
    let uri: Uri = url
        .parse()
        .map_err(|error| anyhow!("`{url}` is not a valid URL: {error}"))?;
    match (uri.scheme_str(), uri.host()) {
        (Some("http" | "https"), Some(host)) if !host.is_empty() => Ok(uri),
        _ => Err(anyhow!(
            "`{url}` is not an http:// or https:// URL with a host, like \
             http://127.0.0.1:8000/reward"
        )),
    }
}

fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}
