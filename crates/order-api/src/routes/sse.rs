//! Server-Sent Events answers, for every handler that streams: the stream
//! type with its heartbeat, and the state a stream takes.

use std::{convert::Infallible, time::Duration};

use axum::response::sse::{Event, KeepAlive, KeepAliveStream, Sse};
use futures_util::Stream;
use tokio::sync::mpsc;

use crate::live::{Feed, Streams};

/// Comments sent on an idle stream so proxies don't close it.
const HEARTBEAT: Duration = Duration::from_secs(15);

/// What a streaming handler takes: the live events, the cap on open
/// streams, and how long one stays open at most.
#[derive(Clone)]
pub struct Streaming {
    pub feed: Feed,
    pub streams: Streams,
    pub max_lifetime: Duration,
}

type Events = std::pin::Pin<Box<dyn Stream<Item = Result<Event, Infallible>> + Send>>;

/// The answer of a streaming handler.
pub type EventStream = Sse<KeepAliveStream<Events>>;

/// An event stream sending what `events` receives, with a heartbeat.
pub fn sse(events: mpsc::Receiver<Event>) -> EventStream {
    let stream = futures_util::stream::unfold(events, |mut events| async move {
        events.recv().await.map(|event| (Ok(event), events))
    });
    Sse::new(Box::pin(stream) as Events)
        .keep_alive(KeepAlive::new().interval(HEARTBEAT).text("heartbeat"))
}
