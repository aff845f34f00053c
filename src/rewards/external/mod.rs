//! External reward functions, called once per batch: a command (`cmd:COMMAND`, a long-lived
//! child process speaking JSON lines, see [`command`]) or an HTTP endpoint (`http://...` or
//! `https://...`, one POST per batch, see [`http`]). Both take the same request and give the
//! same reply ([`protocol`]; specified in `docs/REWARDS.md`).
//!
//! A call that fails in a way that may pass (a timeout, a crashed child, a refused connection,
//! HTTP 408/429/5xx) is tried again up to `retries` times, after 0.5 s, 1 s, 2 s, ... (at most
//! 8 s); anything else, and the last failure, is an error naming the reward. Replies are never
//! guessed at: a wrong count, a value that is not a number, or a non-finite value is an error.

mod command;
mod http;
mod protocol;

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

pub use protocol::{request, TrainerProgress};

/// Prefix of a command reward in `reward_funcs`.
pub const COMMAND_PREFIX: &str = "cmd:";

/// How external rewards are called.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExternalParams {
    /// Longest wait for one reply.
    pub timeout: Duration,
    /// How many times a failed call that may pass is tried again.
    pub retries: usize,
}

/// Whether `name` in `reward_funcs` names an external reward (rather than a registry one).
pub fn is_external(name: &str) -> bool {
    name.starts_with(COMMAND_PREFIX) || name.starts_with("http://") || name.starts_with("https://")
}

/// Why an external reward name is malformed (an empty command, a URL without a host), if it is.
pub fn check_name(name: &str) -> Result<()> {
    match name.strip_prefix(COMMAND_PREFIX) {
        Some(command) if command.trim().is_empty() => bail!(
            "`{name}` names no command: write the command line after `cmd:`, like \
             `cmd:python3 -m grpo_reward my_rewards:accuracy`"
        ),
        Some(_) => Ok(()),
        None => http::check_url(name).map(drop),
    }
}

/// One external reward function.
pub struct ExternalReward {
    name: String,
    transport: Transport,
    params: ExternalParams,
}

enum Transport {
    Command(command::CommandReward),
    Http(http::HttpReward),
}

/// A failed call, and whether trying it again may succeed.
struct Failure {
    error: anyhow::Error,
    retry: bool,
}

impl Failure {
    fn retry(error: anyhow::Error) -> Self {
        Self { error, retry: true }
    }

    fn fatal(error: anyhow::Error) -> Self {
        Self {
            error,
            retry: false,
        }
    }
}

impl ExternalReward {
    /// The reward `name` (an external name: see [`is_external`]); nothing is started yet.
    pub fn new(name: &str, params: ExternalParams) -> Result<Self> {
        check_name(name).with_context(|| format!("reward_funcs: {name:?}"))?;
        let transport = match name.strip_prefix(COMMAND_PREFIX) {
            Some(command) => Transport::Command(command::CommandReward::new(command.trim())),
            None => Transport::Http(http::HttpReward::new(name, params.timeout)?),
        };
        Ok(Self {
            name: name.to_owned(),
            transport,
            params,
        })
    }

    /// The rewards of the `expected` completions of `request` (NaN: no reward).
    pub fn score(&self, request: &str, expected: usize) -> Result<Vec<f64>> {
        let attempts = self.params.retries + 1;
        let mut attempt = 1;
        let reply = loop {
            let outcome = match &self.transport {
                Transport::Command(command) => command.call(request, self.params.timeout),
                Transport::Http(endpoint) => endpoint.call(request),
            };
            match outcome {
                Ok(reply) => break reply,
                Err(failure) if failure.retry && attempt < attempts => {
                    let pause = Duration::from_millis(500 << (attempt - 1).min(4));
                    tracing::warn!(
                        "reward `{}`: {:#}; trying again in {} s (attempt {} of {attempts})",
                        self.name,
                        failure.error,
                        pause.as_secs_f64(),
                        attempt + 1
                    );
                    std::thread::sleep(pause);
                    attempt += 1;
                }
                Err(failure) => {
                    let tries = match attempt {
                        1 if failure.retry => " (reward_retries = 0: not tried again)".to_owned(),
                        1 => String::new(),
                        _ => format!(" (after {attempt} attempts)"),
                    };
                    return Err(anyhow!(
                        "reward `{}`: {:#}{tries}",
                        self.name,
                        failure.error
                    ));
                }
            }
        };
        protocol::parse_reply(&reply, expected).with_context(|| format!("reward `{}`", self.name))
    }
}
