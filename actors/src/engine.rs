//! Engines: a connection to one Docker engine, the host of container workers.
//!
//! An [`Engine`] is a named bollard client whose API version has been negotiated with the
//! engine (an engine older than bollard's default, such as API 1.41, refuses requests that
//! name a newer version). Cloning an engine is cheap: clones share the connection pool.
//! The container port, the leftover sweep and the image helpers all take an `Engine`.

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

/// One Docker engine, reached through bollard.
#[derive(Debug, Clone)]
pub struct Engine {
    name: String,
    docker: Docker,
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
        Ok(Engine { name, docker })
    }

    /// The engine's name (`local` for the default one).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bollard client.
    pub fn docker(&self) -> &Docker {
        &self.docker
    }

    /// Pings the engine (`/_ping`) under `timeout`.
    pub async fn ping(&self, timeout: Duration) -> Result<(), EngineError> {
        match tokio::time::timeout(timeout, self.docker.ping()).await {
            Err(_) => Err(EngineError::Timeout {
                engine: self.name.clone(),
                after: timeout,
            }),
            Ok(Err(e)) => Err(self.api_error("ping", e)),
            Ok(Ok(_)) => Ok(()),
        }
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
