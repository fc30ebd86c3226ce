//! The change stream of one service, built on blocking queries
//! ([`RegistryClient::wait_service`]) in a loop.
//!
//! It works against a server that blocks (answers when the index moves
//! past the one sent, or after `wait`) and against one that answers at once:
//! then it polls, at most once a second.

use std::time::{Duration, Instant};

use futures::Stream;

use super::{jitter, ClientError, RegistryClient, Service};

/// How long each blocking query may be held by the server.
const WAIT: Duration = Duration::from_secs(30);
/// A loop turn that brought nothing new takes at least this long.
const MIN_TURN: Duration = Duration::from_secs(1);
const ERR_BACKOFF_START: Duration = Duration::from_millis(100);
const ERR_BACKOFF_MAX: Duration = Duration::from_secs(5);

struct State {
    client: RegistryClient,
    name: String,
    index: u64,
    /// The last view yielded; `None` before the first.
    last: Option<Option<Service>>,
    /// Sleep before the next query (set after an error).
    pause: Option<Duration>,
    err_ceiling: Duration,
}

impl RegistryClient {
    /// A stream of changes of one service: yields the current view first
    /// (`None` while the service does not exist), then each time it changes
    /// (answers equal to the previous view are skipped). Errors are yielded
    /// as `Err` items and the stream keeps going after a jittered backoff
    /// (100 ms doubling to 5 s); it never ends by itself.
    pub fn watch_service(
        &self,
        name: &str,
    ) -> impl Stream<Item = Result<Option<Service>, ClientError>> + Send + 'static {
        let state = State {
            client: self.clone(),
            name: name.to_string(),
            index: 0,
            last: None,
            pause: None,
            err_ceiling: ERR_BACKOFF_START,
        };
        futures::stream::unfold(state, |mut st| async move {
            loop {
                if let Some(p) = st.pause.take() {
                    tokio::time::sleep(p).await;
                }
                let started = Instant::now();
                match st.client.wait_service(&st.name, st.index, WAIT).await {
                    Ok((view, index)) => {
                        st.err_ceiling = ERR_BACKOFF_START;
                        // An index that went backwards means another replica
                        // (or a restored one) answered: start over from it.
                        st.index = if index < st.index { 0 } else { index };
                        if st.last.as_ref() != Some(&view) {
                            st.last = Some(view.clone());
                            return Some((Ok(view), st));
                        }
                        // Nothing new: a server that does not block must
                        // not make this a busy loop.
                        let took = started.elapsed();
                        if took < MIN_TURN {
                            st.pause = Some(MIN_TURN - took);
                        }
                    }
                    Err(e) => {
                        st.pause = Some(jitter(st.err_ceiling).max(ERR_BACKOFF_START / 2));
                        st.err_ceiling = (st.err_ceiling * 2).min(ERR_BACKOFF_MAX);
                        return Some((Err(e), st));
                    }
                }
            }
        })
    }
}
