//! Making a plan: resolve the revision in the mirror, read its specs,
//! evaluate and build its systems in the controller's store (one
//! evaluation, one realise), then ask every host, at most `parallel` at
//! once, what it runs and compare closures. With `activation`, the new
//! system is copied to the host and its `switch-to-configuration
//! dry-activate` run, as `nixos-rebuild dry-activate` does: the host's
//! store grows, nothing it runs or boots changes.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use futures::StreamExt;

use crate::driver::Toplevel;
use crate::error::error_chain;
use crate::host::{Backend, Host};
use crate::plan::{parse_dry_activate, HostPlan, Plan};
use crate::reconcile::closure_diff;
use crate::spec::{Action, HostSpec};
use crate::types::StorePath;

/// What to plan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlanRequest {
    /// A commit (or unique prefix), branch or tag; `None`: the branch head
    /// in the mirror.
    pub revision: Option<String>,
    /// Only this host.
    pub host: Option<String>,
    /// Copy the new system and run its `dry-activate`.
    pub activation: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("cannot read the revision to plan")]
    Git(#[from] crate::git::GitError),
    #[error("`{name}` is no revision the mirror holds, and fetching it as a branch of the watched repository failed: {fetch}")]
    NoRevision {
        name: String,
        fetch: String,
        #[source]
        source: crate::git::GitError,
    },
    #[error("the specs of revision {revision} are invalid:\n{errors}")]
    Specs { revision: String, errors: String },
    #[error("no host named {0} in the revision's specs")]
    NoSuchHost(String),
    #[error("evaluating revision {revision} failed")]
    Evaluate {
        revision: String,
        #[source]
        source: crate::driver::BuildError,
    },
    #[error("reading the mirror was interrupted: {0}")]
    Interrupted(String),
}

/// A planner as the API holds it, whatever its backend.
pub type PlanService = Arc<
    dyn Fn(PlanRequest) -> futures::future::BoxFuture<'static, Result<Plan, PlanError>>
        + Send
        + Sync,
>;

/// `planner` as a [`PlanService`].
pub fn service<B: Backend>(planner: Arc<Planner<B>>) -> PlanService {
    Arc::new(move |request| {
        let planner = Arc::clone(&planner);
        Box::pin(async move { planner.plan(&request).await })
    })
}

/// Makes plans for the API, one at a time, remembering host plans by what
/// they compare (a `cim status HOST` asked again costs nothing).
pub struct Planner<B: Backend> {
    backend: Arc<B>,
    mirror: PathBuf,
    branch: String,
    /// Where other branches are fetched from, for plans of them.
    source: Option<PlanSource>,
    parallel: usize,
    /// Builds and closures batched as the controller's are.
    builds: crate::reconcile::Builds,
    turn: tokio::sync::Mutex<()>,
    known: Mutex<HashMap<PlanKey, HostPlan>>,
    /// The last evaluations, by revision and configurations: a revision
    /// is evaluated once however often it is planned.
    evaluated: Mutex<Vec<(String, crate::driver::Evaluation)>>,
}

/// The watched repository, to fetch a branch a plan names that the mirror
/// does not hold (a pull request's, before it is merged).
#[derive(Debug, Clone)]
pub struct PlanSource {
    pub state_dir: PathBuf,
    /// `--repo`.
    pub url: String,
    /// The ssh command line of every other fetch.
    pub ssh: Vec<String>,
    /// `--fetch-timeout`.
    pub timeout: std::time::Duration,
}

/// What a host plan compares: host, desired, current, with activation.
type PlanKey = (String, String, Option<String>, bool);

/// Evaluations remembered at most.
const EVALUATIONS_KEPT: usize = 8;

/// Host plans remembered at most.
const KNOWN_LIMIT: usize = 20_000;

impl<B: Backend> Planner<B> {
    pub fn new(
        backend: Arc<B>,
        mirror: PathBuf,
        branch: String,
        source: Option<PlanSource>,
        parallel: usize,
    ) -> Planner<B> {
        Planner {
            builds: crate::reconcile::Builds::spawn(Arc::clone(&backend)),
            backend,
            mirror,
            branch,
            source,
            parallel: parallel.clamp(1, 64),
            turn: tokio::sync::Mutex::new(()),
            known: Mutex::new(HashMap::new()),
            evaluated: Mutex::new(Vec::new()),
        }
    }

    pub async fn plan(&self, request: &PlanRequest) -> Result<Plan, PlanError> {
        let _turn = self.turn.lock().await;
        let (mirror, branch, spec) = (
            self.mirror.clone(),
            self.branch.clone(),
            request.revision.clone(),
        );
        let resolved = {
            let (mirror, branch, spec) = (mirror.clone(), branch.clone(), spec.clone());
            tokio::task::spawn_blocking(move || {
                crate::git::revision_for_plan(&mirror, &branch, spec.as_deref())
            })
            .await
            .map_err(|e| PlanError::Interrupted(e.to_string()))?
        };
        let (revision, files) = match (resolved, &spec, &self.source) {
            (Ok(found), _, _) => found,
            // Not in the mirror: another branch of the watched repository.
            (Err(e), Some(name), Some(source)) if name.as_str() != branch => {
                let fetched = self.fetch_branch(source, name).await.map_err(|fetch| {
                    PlanError::NoRevision {
                        name: name.clone(),
                        fetch,
                        source: e,
                    }
                })?;
                tokio::task::spawn_blocking(move || {
                    crate::git::revision_for_plan(&mirror, &branch, Some(fetched.as_str()))
                })
                .await
                .map_err(|e| PlanError::Interrupted(e.to_string()))??
            }
            (Err(e), _, _) => return Err(PlanError::Git(e)),
        };
        let fleet = crate::spec::parse_fleet(&files).map_err(|errors| PlanError::Specs {
            revision: revision.to_string(),
            errors: errors.to_string(),
        })?;
        let hosts: Vec<std::sync::Arc<HostSpec>> = match &request.host {
            Some(name) => vec![fleet
                .hosts
                .get(name)
                .cloned()
                .ok_or_else(|| PlanError::NoSuchHost(name.clone()))?],
            None => fleet.hosts.values().cloned().collect(),
        };
        let mut configurations: Vec<String> =
            hosts.iter().map(|h| h.configuration.clone()).collect();
        configurations.sort();
        configurations.dedup();
        let flake = crate::git::flake_ref(&self.mirror, &revision);
        let key = format!("{revision} {}", configurations.join(" "));
        let known = self
            .evaluated
            .lock()
            .ok()
            .and_then(|e| e.iter().find(|(k, _)| *k == key).map(|(_, e)| e.clone()));
        let evaluation = match known {
            Some(evaluation) => evaluation,
            None => {
                let evaluation = self
                    .backend
                    .evaluate(&flake, &configurations)
                    .await
                    .map_err(|source| PlanError::Evaluate {
                        revision: revision.to_string(),
                        source,
                    })?;
                if let Ok(mut evaluated) = self.evaluated.lock() {
                    if evaluated.len() >= EVALUATIONS_KEPT {
                        evaluated.remove(0);
                    }
                    evaluated.push((key, evaluation.clone()));
                }
                evaluation
            }
        };
        let mut systems: HashMap<String, Result<Toplevel, String>> = HashMap::new();
        for configuration in &configurations {
            let system = match evaluation.systems.get(configuration) {
                Some(result) => result.clone(),
                None => Err(format!(
                    "the flake has no nixosConfigurations.{configuration}"
                )),
            };
            systems.insert(configuration.clone(), system);
        }
        self.build(&mut systems).await;
        let plans = futures::stream::iter(hosts)
            .map(|host| {
                let system = systems[&host.configuration].clone();
                async move { self.host_plan(host, system, request.activation).await }
            })
            .buffer_unordered(self.parallel)
            .collect::<Vec<_>>()
            .await;
        let mut plans = plans;
        plans.sort_by(|a, b| a.host.cmp(&b.host));
        Ok(Plan {
            revision: revision.to_string(),
            hosts: plans,
        })
    }

    /// Fetches `name` of the watched repository into the mirror (beside,
    /// never onto, the watched branch), within `--fetch-timeout`.
    async fn fetch_branch(
        &self,
        source: &PlanSource,
        name: &str,
    ) -> Result<crate::types::Revision, String> {
        let interrupt = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop = Arc::clone(&interrupt);
        let (source_, name_) = (source.clone(), name.to_string());
        let fetch = tokio::task::spawn_blocking(move || {
            let mirror = crate::git::Mirror::open(&source_.state_dir, &source_.url, &source_.ssh)
                .map_err(|e| error_chain(&e))?;
            mirror
                .fetch_for_plan(&name_, &stop)
                .map_err(|e| error_chain(&e))
        });
        match tokio::time::timeout(source.timeout, fetch).await {
            Ok(joined) => joined.map_err(|e| e.to_string())?,
            Err(_) => {
                interrupt.store(true, std::sync::atomic::Ordering::Relaxed);
                Err(format!(
                    "fetching `{name}` did not finish within {}s",
                    source.timeout.as_secs()
                ))
            }
        }
    }

    /// Builds every evaluated system, together (one realise; one by one
    /// if that fails, so that each failure is its own host's).
    async fn build(&self, systems: &mut HashMap<String, Result<Toplevel, String>>) {
        let wanted: Vec<(String, Toplevel)> = systems
            .iter()
            .filter_map(|(c, s)| s.as_ref().ok().map(|t| (c.clone(), t.clone())))
            .collect();
        let built = futures::future::join_all(
            wanted
                .into_iter()
                .map(|(c, t)| async move { (c, self.builds.build(t).await) }),
        )
        .await;
        for (configuration, result) in built {
            if let Err(e) = result {
                systems.insert(configuration, Err(format!("building it failed: {e}")));
            }
        }
    }

    async fn host_plan(
        &self,
        host: std::sync::Arc<HostSpec>,
        system: Result<Toplevel, String>,
        activation: bool,
    ) -> HostPlan {
        let mut plan = HostPlan {
            host: host.name.to_string(),
            desired: None,
            current: None,
            changes: false,
            diff: None,
            activation: None,
            reboot_for: Vec::new(),
            error: None,
        };
        let toplevel = match system {
            Ok(toplevel) => toplevel,
            Err(message) => {
                plan.error = Some(message);
                return plan;
            }
        };
        plan.desired = Some(toplevel.out.to_string());
        if host.suspend {
            plan.error = Some("suspended in its spec: cim leaves it alone".to_string());
            return plan;
        }
        let session = match crate::reconcile::connect(&*self.backend, &host).await {
            Ok(session) => session,
            Err(e) => {
                plan.error = Some(error_chain(&e));
                return plan;
            }
        };
        let result = self
            .compare(&session, &host, &toplevel.out, activation, &mut plan)
            .await;
        crate::host::close(session).await;
        if let Err(message) = result {
            plan.error = Some(message);
        }
        plan
    }

    async fn compare(
        &self,
        session: &B::Session,
        host: &HostSpec,
        desired: &StorePath,
        activation: bool,
        plan: &mut HostPlan,
    ) -> Result<(), String> {
        let look = session.look().await.map_err(|e| error_chain(&e))?;
        let booted_files = look.booted_files.clone();
        let current = match host.action {
            Action::Boot => look.profile,
            _ => look.current,
        };
        plan.current = current.clone();
        plan.changes = current.as_deref() != Some(desired.as_str());
        let key = (
            plan.host.clone(),
            desired.to_string(),
            current.clone(),
            activation,
        );
        if let Some(known) = self.known.lock().ok().and_then(|k| k.get(&key).cloned()) {
            *plan = known;
            return Ok(());
        }
        if !plan.changes {
            return Ok(());
        }
        let mut roots = vec![desired.clone()];
        roots.extend(current.as_deref().and_then(StorePath::parse));
        let local = self.builds.closures(roots).await?;
        plan.diff = Some(closure_diff(&local, session, current.as_deref(), desired).await?);
        if matches!(host.action, Action::Switch | Action::Test) {
            let new_files = self.backend.boot_files(desired).await;
            plan.reboot_for = crate::plan::reboot_for(&booted_files, &new_files);
        }
        if activation && matches!(host.action, Action::Switch | Action::Test) {
            let substitute = host.substitute_on_destination.unwrap_or(false);
            session
                .copy(desired, substitute)
                .await
                .map_err(|e| error_chain(&e))?;
            let out = session
                .activate(desired, Action::DryActivate)
                .await
                .map_err(|e| error_chain(&e))?;
            plan.activation = Some(parse_dry_activate(&format!(
                "{}\n{}",
                out.stderr, out.stdout
            )));
        }
        if let Ok(mut known) = self.known.lock() {
            if known.len() >= KNOWN_LIMIT {
                known.clear();
            }
            known.insert(key, plan.clone());
        }
        Ok(())
    }
}
