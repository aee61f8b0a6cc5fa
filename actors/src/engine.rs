//! Engines: a connection to one Docker engine, the host of container workers.
//!
//! An [`Engine`] is a named bollard client whose API version has been negotiated with the
//! engine (an engine older than bollard's default, such as API 1.41, refuses requests that
//! name a newer version). Cloning an engine is cheap: clones share the connection pool.
//! The container port, the leftover sweep and the image helpers all take an `Engine`.
//!
//! An engine is local (its unix socket) or remote (TCP with mutual TLS, [`Engine::tls`]). Its
//! name is the only identity wharf gives it: the engine ID a daemon reports is not a host's
//! identity (every daemon started from one machine's installation reports the same one). Whether
//! an engine is up is the business of [`crate::fleet`], which pings it and follows its events.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bollard::Docker;
use thiserror::Error;

/// Why an engine could not be reached or used.
#[derive(Debug, Clone, Error)]
#[non_exhaustive]
pub enum EngineError {
    /// No connection could be made (no socket, refused, bad address).
    #[error("cannot connect to the Docker engine {engine}: {reason}")]
    Connect {
        /// The engine's name.
        engine: String,
        /// Why.
        reason: String,
    },
    /// The engine did not answer in time.
    #[error("the Docker engine {engine} did not answer within {after:?}")]
    Timeout {
        /// The engine's name.
        engine: String,
        /// How long we waited.
        after: Duration,
    },
    /// The engine answered a request with an error.
    #[error("the Docker engine {engine} refused {what}: {reason}")]
    Api {
        /// The engine's name.
        engine: String,
        /// What was asked.
        what: String,
        /// The engine's answer.
        reason: String,
    },
}

/// The API version a remote engine is spoken to when it cannot be asked for its own: that of
/// Docker Engine 20.10, the oldest engine wharf is tested against.
pub const API_FLOOR: bollard::ClientVersion = bollard::ClientVersion {
    major_version: 1,
    minor_version: 41,
};

/// The files of a TLS client: the certificate authority, the client's certificate and its key
/// (PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate authority the engine's certificate must chain to.
    pub ca: std::path::PathBuf,
    /// The client's certificate.
    pub cert: std::path::PathBuf,
    /// The client's private key.
    pub key: std::path::PathBuf,
}

/// One Docker engine, reached through bollard.
///
/// A remote engine is made without a word to it ([`Engine::tls`]): it may be down when the
/// pool starts. Until its API version is negotiated ([`Engine::negotiate`], which its health
/// monitor does on the first answered ping) it is spoken to at [`API_FLOOR`].
#[derive(Debug, Clone)]
pub struct Engine {
    name: String,
    /// The client at [`API_FLOOR`], until the version is negotiated.
    docker: Docker,
    /// The same client at bollard's newest API version, to negotiate down from.
    newest: Docker,
    /// The client at the engine's own API version, once negotiated (shared by clones).
    negotiated: Arc<OnceLock<Docker>>,
    /// Taken for lost by its health monitor (shared by clones): a container on it that is
    /// killed is not waited for.
    lost: Arc<AtomicBool>,
}

/// Engines are equal when they have the same name (`local`, or the name given to
/// [`Engine::unix`]): specs that name the same engine describe the same workers.
impl PartialEq for Engine {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl Engine {
    /// The local engine, through its default unix socket (or `DOCKER_HOST`), with the API
    /// version negotiated. Fails if the engine does not answer within `timeout`.
    pub async fn local(timeout: Duration) -> Result<Engine, EngineError> {
        let name = "local".to_owned();
        let docker = Docker::connect_with_local_defaults().map_err(|e| EngineError::Connect {
            engine: name.clone(),
            reason: e.to_string(),
        })?;
        Self::negotiated(name, docker, timeout).await
    }

    /// An engine on the unix socket at `path`, named `name`.
    pub async fn unix(
        name: impl Into<String>,
        path: &str,
        timeout: Duration,
    ) -> Result<Engine, EngineError> {
        let name = name.into();
        let docker =
            Docker::connect_with_unix(path, timeout.as_secs().max(1), bollard::API_DEFAULT_VERSION)
                .map_err(|e| EngineError::Connect {
                    engine: name.clone(),
                    reason: e.to_string(),
                })?;
        Self::negotiated(name, docker, timeout).await
    }

    /// A remote engine at `addr` (`tcp://host:2376`), named `name`, over TCP with mutual TLS:
    /// `tls` names the certificate authority the engine's certificate must chain to and the
    /// client's own certificate and key (PEM files). `timeout` bounds each request's answer (not
    /// a stream's life: an attach stream may stay idle for ever).
    ///
    /// Nothing is sent to the engine: it may be down now, and whether it is up is for its
    /// health monitor to say. Unreadable or invalid certificate files are an error.
    pub fn tls(
        name: impl Into<String>,
        addr: &str,
        tls: &TlsFiles,
        timeout: Duration,
    ) -> Result<Engine, EngineError> {
        let name = name.into();
        let client = |version| {
            Docker::connect_with_ssl(
                addr,
                &tls.key,
                &tls.cert,
                &tls.ca,
                timeout.as_secs().max(1),
                version,
            )
            .map_err(|e| EngineError::Connect {
                engine: name.clone(),
                reason: e.to_string(),
            })
        };
        let (floor, newest) = (client(&API_FLOOR)?, client(bollard::API_DEFAULT_VERSION)?);
        Ok(Engine::unnegotiated(name, floor, newest))
    }

    /// An engine named `name` at `host`: `unix:///path/to/docker.sock`, or `tcp://host:port`
    /// with `tls` (required: a plain TCP engine is refused). Like [`Engine::tls`], nothing is
    /// sent to the engine.
    pub fn at(
        name: impl Into<String>,
        host: &str,
        tls: Option<&TlsFiles>,
        timeout: Duration,
    ) -> Result<Engine, EngineError> {
        let name = name.into();
        let refuse = |reason: &str| EngineError::Connect {
            engine: name.clone(),
            reason: format!("{host}: {reason}"),
        };
        if let Some(path) = host.strip_prefix("unix://") {
            if tls.is_some() {
                return Err(refuse("a unix socket takes no TLS files"));
            }
            let client = |version| {
                Docker::connect_with_unix(path, timeout.as_secs().max(1), version)
                    .map_err(|e| refuse(&e.to_string()))
            };
            let (floor, newest) = (client(&API_FLOOR)?, client(bollard::API_DEFAULT_VERSION)?);
            return Ok(Engine::unnegotiated(name, floor, newest));
        }
        if !host.starts_with("tcp://") {
            return Err(refuse("expected unix:///path or tcp://host:port"));
        }
        let Some(tls) = tls else {
            return Err(refuse(
                "a TCP engine needs TLS (its CA, certificate and key): plain TCP exposes the \
                 engine to anyone on the network",
            ));
        };
        Engine::tls(name, host, tls, timeout)
    }

    fn unnegotiated(name: String, docker: Docker, newest: Docker) -> Engine {
        Engine {
            name,
            docker,
            newest,
            negotiated: Arc::new(OnceLock::new()),
            lost: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Negotiates the API version with the engine under `timeout`, once (clones share it).
    pub async fn negotiate(&self, timeout: Duration) -> Result<(), EngineError> {
        if self.negotiated.get().is_some() {
            return Ok(());
        }
        let engine = Self::negotiated(self.name.clone(), self.newest.clone(), timeout).await?;
        let _ = self.negotiated.set(engine.docker);
        Ok(())
    }

    /// Records whether the engine is taken for lost (its health monitor does).
    pub fn set_lost(&self, lost: bool) {
        self.lost.store(lost, Ordering::Release);
    }

    /// Whether the engine is taken for lost: a container on it that is killed is taken for
    /// dead at once, since the engine cannot confirm it.
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }

    /// Whether the API version has been negotiated.
    pub fn is_negotiated(&self) -> bool {
        self.negotiated.get().is_some()
    }

    async fn negotiated(
        name: String,
        docker: Docker,
        timeout: Duration,
    ) -> Result<Engine, EngineError> {
        let docker = match tokio::time::timeout(timeout, docker.negotiate_version()).await {
            Err(_) => {
                return Err(EngineError::Timeout {
                    engine: name,
                    after: timeout,
                })
            }
            Ok(Err(e)) => {
                return Err(EngineError::Connect {
                    engine: name,
                    reason: e.to_string(),
                })
            }
            Ok(Ok(docker)) => docker,
        };
        let engine = Engine::unnegotiated(name, docker.clone(), docker.clone());
        let _ = engine.negotiated.set(docker);
        Ok(engine)
    }

    /// The engine's name (`local` for the default one).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bollard client (at the negotiated API version, once it is).
    pub fn docker(&self) -> &Docker {
        self.negotiated.get().unwrap_or(&self.docker)
    }

    /// Pings the engine (`/_ping`) under `timeout`.
    pub async fn ping(&self, timeout: Duration) -> Result<(), EngineError> {
        match tokio::time::timeout(timeout, self.docker().ping()).await {
            Err(_) => Err(EngineError::Timeout {
                engine: self.name.clone(),
                after: timeout,
            }),
            Ok(Err(e)) => Err(self.api_error("ping", e)),
            Ok(Ok(_)) => Ok(()),
        }
    }

    /// The engine's event stream (`/events`): container, image and daemon events from now on.
    /// It ends (or yields an error) when the connection to the engine is lost — the quickest
    /// sign that a daemon has died.
    pub fn events(
        &self,
    ) -> impl futures::Stream<Item = Result<bollard::models::EventMessage, bollard::errors::Error>>
    {
        self.docker()
            .events(None::<bollard::query_parameters::EventsOptions>)
    }

    /// An [`EngineError::Api`] for a failed request.
    pub fn api_error(&self, what: impl Into<String>, e: bollard::errors::Error) -> EngineError {
        EngineError::Api {
            engine: self.name.clone(),
            what: what.into(),
            reason: e.to_string(),
        }
    }
}
