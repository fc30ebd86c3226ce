//! Auto-registration: a background task that keeps one instance
//! registered for as long as its owner runs, the way the seed's
//! `vertice_registry_client.py` did.
//!
//! The task registers (retrying forever while the registry is down: the
//! service keeps running in standalone mode), then heartbeats every half
//! TTL, and registers again when a heartbeat answers `404` (the instance
//! expired or was removed behind its back). It never gives up; it logs a
//! warning when the registry becomes unreachable and once more when it is
//! back, not on every try.

use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{jitter, ClientError, Instance, Registration, RegistryClient};

const DEFAULT_TTL_SECS: u32 = 60;
const MIN_HEARTBEAT: Duration = Duration::from_millis(500);
const RETRY_START: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// Bound on the deregister at shutdown.
const SHUTDOWN_DEREGISTER: Duration = Duration::from_secs(3);

/// The handle of an auto-registered instance. Dropping it stops the
/// background task without deregistering (the instance then expires after
/// its TTL); call [`AutoRegistration::shutdown`] to leave cleanly.
#[derive(Debug)]
pub struct AutoRegistration {
    client: RegistryClient,
    reg: Registration,
    state: watch::Receiver<Option<Instance>>,
    task: JoinHandle<()>,
}

/// Starts keeping `reg` registered through `client`. Returns at once and
/// never fails: see the module documentation.
pub async fn auto_register(client: RegistryClient, reg: Registration) -> AutoRegistration {
    let (tx, rx) = watch::channel(None);
    let task = tokio::spawn(keep_registered(client.clone(), reg.clone(), tx));
    AutoRegistration {
        client,
        reg,
        state: rx,
        task,
    }
}

impl AutoRegistration {
    /// Whether the registry holds this instance, as far as the task knows
    /// (false before the first register, after a `404`, and once heartbeats
    /// have failed for longer than the TTL).
    pub fn is_registered(&self) -> bool {
        self.state.borrow().is_some()
    }

    /// The instance as the server last returned it on register.
    pub fn instance(&self) -> Option<Instance> {
        self.state.borrow().clone()
    }

    /// Waits until the instance is registered; false after `timeout`.
    pub async fn wait_registered(&self, timeout: Duration) -> bool {
        let mut rx = self.state.clone();
        let registered = tokio::time::timeout(timeout, async {
            rx.wait_for(Option::is_some).await.is_ok()
        })
        .await;
        registered.unwrap_or(false)
    }

    /// Stops the task, then deregisters this instance (bounded to a few
    /// seconds; a failure is logged, never returned).
    pub async fn shutdown(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
        let id = self
            .state
            .borrow()
            .as_ref()
            .map(|i| i.instance_id.clone())
            .or_else(|| self.reg.instance_id.clone())
            .or_else(|| {
                self.reg
                    .host
                    .as_ref()
                    .map(|h| format!("{h}:{}", self.reg.port))
            });
        let Some(id) = id else {
            // Never registered and the server would have picked the id.
            return;
        };
        let name = &self.reg.service_name;
        match tokio::time::timeout(SHUTDOWN_DEREGISTER, self.client.deregister(name, Some(&id)))
            .await
        {
            Ok(Ok(_)) | Ok(Err(ClientError::NotFound(_))) => {
                tracing::info!(service = %name, instance = %id, "deregistered")
            }
            Ok(Err(e)) => {
                tracing::warn!(service = %name, instance = %id, error = %e, "deregister failed")
            }
            Err(_) => tracing::warn!(service = %name, instance = %id, "deregister timed out"),
        }
    }
}

impl Drop for AutoRegistration {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The background task: register, heartbeat, register again; forever.
async fn keep_registered(
    client: RegistryClient,
    reg: Registration,
    state: watch::Sender<Option<Instance>>,
) {
    let name = reg.service_name.clone();
    // True while the registry is unreachable and we said so once.
    let mut warned = false;
    loop {
        let instance = register_until_done(&client, &reg, &mut warned).await;
        let ttl = Duration::from_secs(u64::from(if instance.ttl_seconds > 0 {
            instance.ttl_seconds
        } else {
            reg.ttl_seconds.unwrap_or(DEFAULT_TTL_SECS)
        }));
        let every = (ttl / 2).max(MIN_HEARTBEAT);
        let id = instance.instance_id.clone();
        tracing::info!(service = %name, instance = %id, "registered");
        state.send_replace(Some(instance));
        let mut last_ok = Instant::now();
        loop {
            tokio::time::sleep(every).await;
            match client.heartbeat(&name, Some(&id)).await {
                Ok(_) => {
                    last_ok = Instant::now();
                    if warned {
                        tracing::info!(service = %name, "registry reachable again");
                        warned = false;
                    }
                    if state.borrow().is_none() {
                        // Heartbeats failed past the TTL, yet the instance
                        // survived: register again to learn its state.
                        break;
                    }
                }
                Err(ClientError::NotFound(_)) => {
                    tracing::info!(service = %name, instance = %id, "the registry forgot this instance; registering again");
                    state.send_replace(None);
                    break;
                }
                Err(e) => {
                    if !warned {
                        tracing::warn!(service = %name, error = %e, "heartbeat failed; will keep trying");
                        warned = true;
                    }
                    if last_ok.elapsed() > ttl {
                        state.send_replace(None);
                    }
                }
            }
        }
    }
}

async fn register_until_done(
    client: &RegistryClient,
    reg: &Registration,
    warned: &mut bool,
) -> Instance {
    let mut ceiling = RETRY_START;
    loop {
        match client.register(reg).await {
            Ok(i) => {
                if *warned {
                    tracing::info!(service = %reg.service_name, "registry reachable again");
                    *warned = false;
                }
                return i;
            }
            Err(e) => {
                if !*warned {
                    tracing::warn!(
                        service = %reg.service_name,
                        error = %e,
                        "cannot register; running standalone and retrying in the background"
                    );
                    *warned = true;
                } else {
                    tracing::debug!(service = %reg.service_name, error = %e, "register failed again");
                }
                tokio::time::sleep(jitter(ceiling).max(RETRY_START / 2)).await;
                ceiling = (ceiling * 2).min(RETRY_MAX);
            }
        }
    }
}
