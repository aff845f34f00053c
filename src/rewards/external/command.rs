//! The `cmd:` transport: a long-lived child process (`sh -c COMMAND`) that reads one request line
//! on its standard input and writes one reply line on its standard output per batch. Its
//! standard error is the user's. It is started at the first call, runs in its own process group
//! (so Ctrl-C in the terminal reaches only grpo, which then finishes its step), and is stopped
//! after a failure (the next call starts a new one) or when the reward set is dropped: its
//! standard input is closed, and it is killed if it has not exited within [`EXIT_GRACE`].

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};

use super::protocol::excerpt;
use super::Failure;

/// How long a child may take to exit after its standard input is closed before it is killed.
const EXIT_GRACE: Duration = Duration::from_secs(5);

/// A command reward: the command line and its running process, if started.
pub struct CommandReward {
    command: String,
    process: Mutex<Option<Process>>,
}

impl CommandReward {
    pub(super) fn new(command: &str) -> Self {
        Self {
            command: command.to_owned(),
            process: Mutex::new(None),
        }
    }

    /// Sends `request` and waits up to `timeout` for the reply line. Any failure stops the
    /// process; the next call starts a new one.
    pub(super) fn call(&self, request: &str, timeout: Duration) -> Result<String, Failure> {
        let mut slot = self.process.lock().unwrap_or_else(PoisonError::into_inner);
        let process = match slot.take() {
            Some(process) => process,
            None => Process::start(&self.command).map_err(Failure::fatal)?,
        };
        let (process, reply) = process.exchange(request, timeout);
        *slot = process;
        reply
    }
}

/// A running child with the threads that feed its standard input and read its standard output
/// (so that neither a full pipe nor a silent child can block past the timeout).
struct Process {
    child: Child,
    /// Request lines for the writer thread; dropping it closes the child's standard input.
    requests: Option<Sender<String>>,
    /// Reply lines from the reader thread; it ends (disconnects) at end of output.
    replies: Receiver<std::io::Result<String>>,
    /// Whether the child has been waited for (its pid, and group id, may then be reused).
    reaped: bool,
}

impl Process {
    fn start(command: &str) -> anyhow::Result<Self> {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start `sh -c {command:?}`"))?;
        let stdin = child.stdin.take().context("child has no standard input")?;
        let stdout = child
            .stdout
            .take()
            .context("child has no standard output")?;
        let (requests, to_write) = mpsc::channel::<String>();
        let (read, replies) = mpsc::channel();
        std::thread::spawn(move || write_lines(stdin, to_write));
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let failed = line.is_err();
                if read.send(line).is_err() || failed {
                    break;
                }
            }
        });
        Ok(Self {
            child,
            requests: Some(requests),
            replies,
            reaped: false,
        })
    }

    /// One request and its reply; the process is given back unless the exchange failed.
    fn exchange(self, request: &str, timeout: Duration) -> (Option<Self>, Result<String, Failure>) {
        match self.replies.try_recv() {
            Ok(Ok(stray)) => {
                let error = anyhow!(
                    "the command wrote a line that answers no request: {}; standard output is for \
                     reply lines only (print logs to standard error)",
                    excerpt(&stray)
                );
                self.kill();
                return (None, Err(Failure::fatal(error)));
            }
            Ok(Err(_)) | Err(mpsc::TryRecvError::Disconnected) => {
                let error = self.ended();
                return (None, Err(Failure::retry(error)));
            }
            Err(mpsc::TryRecvError::Empty) => {}
        }
        let sent = self
            .requests
            .as_ref()
            .is_some_and(|requests| requests.send(request.to_owned()).is_ok());
        if !sent {
            let error = self.ended();
            return (None, Err(Failure::retry(error)));
        }
        match self.replies.recv_timeout(timeout) {
            Ok(Ok(reply)) => (Some(self), Ok(reply)),
            Ok(Err(error)) => {
                self.kill();
                let error = anyhow!("cannot read the command's reply: {error}");
                (None, Err(Failure::retry(error)))
            }
            Err(RecvTimeoutError::Timeout) => {
                self.kill();
                let error = anyhow!(
                    "no reply within {} s (reward_timeout); the command was stopped",
                    timeout.as_secs_f64()
                );
                (None, Err(Failure::retry(error)))
            }
            Err(RecvTimeoutError::Disconnected) => {
                let error = self.ended();
                (None, Err(Failure::retry(error)))
            }
        }
    }

    /// Why a child whose output ended gave no reply: its exit status (it is killed if it only
    /// closed its output).
    fn ended(mut self) -> anyhow::Error {
        let deadline = Instant::now() + Duration::from_millis(500);
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    self.reaped = true;
                    break Some(status);
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => break None,
            }
        };
        self.kill();
        match status {
            Some(status) => anyhow!(
                "the command ended ({status}) without replying; its error output, if any, is \
                 above"
            ),
            None => anyhow!("the command closed its standard output without replying"),
        }
    }

    /// Kills the child's whole process group at once (the shell and what it started).
    fn kill(mut self) {
        self.kill_group();
    }

    fn kill_group(&mut self) {
        if self.reaped {
            return;
        }
        if let Ok(group) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: killpg only sends a signal, to the child's own group (process_group(0)),
            // which exists while the child is not reaped.
            unsafe {
                libc::killpg(group, libc::SIGKILL);
            }
        }
        let _ = self.child.wait();
        self.reaped = true;
    }
}

impl Drop for Process {
    /// Closes the child's standard input, waits up to [`EXIT_GRACE`] for it to exit, kills its
    /// process group if it has not. The threads end by themselves once the pipes close.
    fn drop(&mut self) {
        self.requests = None;
        let deadline = Instant::now() + EXIT_GRACE;
        while !self.reaped {
            match self.child.try_wait() {
                Ok(Some(_)) => self.reaped = true,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => {
                    tracing::warn!(
                        "an external reward command did not exit within {} s of its input \
                         closing; it was killed",
                        EXIT_GRACE.as_secs()
                    );
                    self.kill_group();
                }
            }
        }
    }
}

/// The writer thread: each request as one line, flushed, until the channel closes or the child
/// stops reading.
fn write_lines(mut stdin: ChildStdin, requests: Receiver<String>) {
    for request in requests {
        let written = stdin
            .write_all(request.as_bytes())
            .and_then(|()| stdin.write_all(b"\n"))
            .and_then(|()| stdin.flush());
        if written.is_err() {
            break;
        }
    }
}
