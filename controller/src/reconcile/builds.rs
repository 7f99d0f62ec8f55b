//! Builds that workers ask for, and the closures they compare, batched:
//! every request that arrives within
//! a few milliseconds of the first (workers dispatched together ask
//! together) is realised by one `nix-store --realise`. Each nix process
//! costs tens of milliseconds of CPU before it builds anything, which across
//! a fleet adds up to more than the builds of small closures; one process
//! also lets nix schedule shared dependencies itself. Batches run
//! concurrently: a request never waits for an unrelated batch. If a batch
//! fails, its systems are realised one by one so that an error fails only
//! the hosts it concerns (and a builder killed by a signal gets one more
//! attempt). Closures (`nix path-info --recursive`, for the summary of
//! what a new system changes) are asked for the same way: one process for
//! every root asked for together.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};

use crate::driver::{self, Toplevel};
use crate::host::Backend;
use crate::types::StorePath;

/// How long a batch waits for more requests after its first.
pub(super) const BATCH_WINDOW: Duration = Duration::from_millis(15);
/// Systems realised at once when a failed batch is retried one by one.
const RETRY_PARALLELISM: usize = 4;

struct Request {
    system: Toplevel,
    reply: oneshot::Sender<Result<(), String>>,
}

type Infos = Arc<crate::plan::Closures>;

struct ClosureRequest {
    /// The first root must be valid in the store; the others are read
    /// only if they are.
    roots: Vec<StorePath>,
    reply: oneshot::Sender<Result<Infos, String>>,
}

/// A handle to the batching build task; cheap to clone.
#[derive(Clone)]
pub struct Builds {
    tx: mpsc::Sender<Request>,
    closures: mpsc::Sender<ClosureRequest>,
}

impl Builds {
    /// Starts the build task. It ends when every handle is dropped.
    pub fn spawn<B: Backend>(cfg: Arc<B>) -> Builds {
        let (tx, rx) = mpsc::channel(1024);
        let builder = Arc::clone(&cfg);
        tokio::spawn(batches(rx, move |batch| {
            run_batch(Arc::clone(&builder), batch)
        }));
        let (closures, rx) = mpsc::channel(1024);
        tokio::spawn(batches(rx, move |batch| {
            closures_batch(Arc::clone(&cfg), batch)
        }));
        Builds { tx, closures }
    }

    /// The closures of `roots` in the controller's store, in one list:
    /// the first root's always, the others' if the store holds them.
    pub async fn closures(&self, roots: Vec<StorePath>) -> Result<Infos, String> {
        let (reply, rx) = oneshot::channel();
        self.closures
            .send(ClosureRequest { roots, reply })
            .await
            .map_err(|_| "the build task has stopped".to_string())?;
        rx.await
            .map_err(|_| "the build task has stopped".to_string())?
    }

    /// Builds `system`; the error is nix's message.
    pub async fn build(&self, system: Toplevel) -> Result<(), String> {
        self.start(system).await?.await
    }

    /// Asks for `system`'s build and returns its result to come: the
    /// build is under way (or queued in a batch) once this returns.
    pub async fn start(
        &self,
        system: Toplevel,
    ) -> Result<impl std::future::Future<Output = Result<(), String>>, String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request { system, reply })
            .await
            .map_err(|_| "the build task has stopped".to_string())?;
        Ok(async move {
            rx.await
                .map_err(|_| "the build task has stopped".to_string())?
        })
    }
}

/// Takes requests as they come, in batches of those that arrive within
/// [`BATCH_WINDOW`] of the first, and runs each batch as a task of its
/// own: a request never waits for an unrelated batch.
async fn batches<R, F, Fut>(mut rx: mpsc::Receiver<R>, run: F)
where
    R: Send + 'static,
    F: Fn(Vec<R>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut running = tokio::task::JoinSet::new();
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let until = tokio::time::Instant::now() + BATCH_WINDOW;
        while let Ok(Some(more)) = tokio::time::timeout_at(until, rx.recv()).await {
            batch.push(more);
        }
        running.spawn(run(batch));
        while running.try_join_next().is_some() {}
    }
    while running.join_next().await.is_some() {}
}

async fn closures_batch<B: Backend>(cfg: Arc<B>, batch: Vec<ClosureRequest>) {
    // Only paths the store holds: nix would try to substitute any other
    // (and fail the whole call).
    let mut roots: Vec<StorePath> = batch
        .iter()
        .flat_map(|r| {
            let (first, rest) = r
                .roots
                .split_first()
                .map_or((None, &[][..]), |(f, r)| (Some(f), r));
            first.into_iter().chain(
                rest.iter()
                    .filter(|p| std::path::Path::new(p.as_str()).exists()),
            )
        })
        .cloned()
        .collect();
    roots.sort();
    roots.dedup();
    match cfg.closures(&roots).await {
        Ok(infos) => {
            let infos = Arc::new(crate::plan::Closures::from(infos));
            for r in batch {
                let _ = r.reply.send(Ok(Arc::clone(&infos)));
            }
        }
        // One by one, each with its first root alone.
        Err(_) => {
            for r in batch {
                let result = match r.roots.first() {
                    Some(root) => cfg
                        .closures(std::slice::from_ref(root))
                        .await
                        .map(|infos| Arc::new(infos.into()))
                        .map_err(|e| crate::error::error_chain(&e)),
                    None => Ok(Arc::default()),
                };
                let _ = r.reply.send(result);
            }
        }
    }
}

async fn run_batch<B: Backend>(cfg: Arc<B>, batch: Vec<Request>) {
    let mut systems: BTreeMap<StorePath, Toplevel> = BTreeMap::new();
    for r in &batch {
        systems.insert(r.system.drv.clone(), r.system.clone());
    }
    let systems: Vec<Toplevel> = systems.into_values().collect();
    tracing::debug!(systems = systems.len(), "building a batch");
    let results: BTreeMap<StorePath, Result<(), String>> = match cfg.realise(&systems).await {
        Ok(()) => systems.iter().map(|s| (s.drv.clone(), Ok(()))).collect(),
        Err(e) if systems.len() == 1 && !killed(&e) => {
            BTreeMap::from([(systems[0].drv.clone(), Err(crate::error::error_chain(&e)))])
        }
        Err(_) => one_by_one(&*cfg, systems).await,
    };
    for r in batch {
        let result = results
            .get(&r.system.drv)
            .cloned()
            .unwrap_or_else(|| Err(format!("{} was not built", r.system.drv)));
        // A worker that was cancelled no longer listens.
        let _ = r.reply.send(result);
    }
}

/// A builder killed by a signal failed for a reason outside its
/// derivation (seen rarely with concurrent nix processes on one store);
/// unlike a build error, it is worth one more attempt.
fn killed(e: &driver::BuildError) -> bool {
    e.to_string().contains("failed due to signal")
}

async fn one_by_one<B: Backend>(
    cfg: &B,
    systems: Vec<Toplevel>,
) -> BTreeMap<StorePath, Result<(), String>> {
    futures::stream::iter(systems)
        .map(|s| async move {
            let result = cfg
                .realise(std::slice::from_ref(&s))
                .await
                .map_err(|e| crate::error::error_chain(&e));
            (s.drv, result)
        })
        .buffer_unordered(RETRY_PARALLELISM)
        .collect()
        .await
}
