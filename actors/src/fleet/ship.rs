//! Images without a registry: a pool's image copied from one engine to another.
//!
//! [`ensure_image`] compares the image's ID on both engines and, if the target lacks it (or has
//! another image under the same name), streams `GET /images/{name}/get` from the source into
//! `POST /images/load` on the target — what `docker save | docker load` does, without a file
//! in between — and checks that the target now names the source's image ID. A fleet then needs
//! no registry: the image is built (or imported) once, on the local engine.

use std::time::Duration;

use bollard::query_parameters::ImportImageOptions;
use futures::StreamExt;

use crate::engine::{Engine, EngineError};

/// What [`ensure_image`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shipped {
    /// The target already had the image (same ID).
    Present,
    /// The image was copied.
    Copied {
        /// Its ID, the same on both engines.
        id: String,
    },
}

/// The ID of `image` on `engine`, or `None` if it has no such image.
async fn image_id(engine: &Engine, image: &str) -> Result<Option<String>, EngineError> {
    match engine.docker().inspect_image(image).await {
        Ok(inspect) => Ok(inspect.id),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(None),
        Err(e) => Err(engine.api_error(format!("the inspection of image {image}"), e)),
    }
}

/// Makes sure `target` has `image` with the same ID as on `source`, copying it if not; the
/// whole under `limit`.
pub async fn ensure_image(
    source: &Engine,
    target: &Engine,
    image: &str,
    limit: Duration,
) -> Result<Shipped, EngineError> {
    let timeout = || EngineError::Timeout {
        engine: target.name().to_owned(),
        after: limit,
    };
    tokio::time::timeout(limit, copy(source, target, image))
        .await
        .map_err(|_| timeout())?
}

async fn copy(source: &Engine, target: &Engine, image: &str) -> Result<Shipped, EngineError> {
    let Some(id) = image_id(source, image).await? else {
        return Err(EngineError::Api {
            engine: source.name().to_owned(),
            what: format!("image {image}"),
            reason: "no such image on the engine the pool's image is shipped from".into(),
        });
    };
    if image_id(target, image).await?.as_deref() == Some(id.as_str()) {
        return Ok(Shipped::Present);
    }
    let started = std::time::Instant::now();
    let export = source.docker().export_image(image);
    let mut load = target.docker().import_image_stream(
        ImportImageOptions {
            quiet: true,
            ..Default::default()
        },
        export,
        None,
    );
    while let Some(progress) = load.next().await {
        let info =
            progress.map_err(|e| target.api_error(format!("the load of image {image}"), e))?;
        if let Some(error) = info.error_detail.and_then(|d| d.message) {
            return Err(EngineError::Api {
                engine: target.name().to_owned(),
                what: format!("the load of image {image}"),
                reason: error,
            });
        }
    }
    match image_id(target, image).await? {
        Some(got) if got == id => {
            tracing::info!(image, %id, from = %source.name(), to = %target.name(), took = ?started.elapsed(), "image shipped");
            Ok(Shipped::Copied { id })
        }
        got => Err(EngineError::Api {
            engine: target.name().to_owned(),
            what: format!("the load of image {image}"),
            reason: format!("it names {got:?} after the load, not {id}"),
        }),
    }
}
