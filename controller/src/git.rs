//! Git, through `gix`: a bare mirror of the watched repository under the
//! state directory, fetched from a local path or a URL (remote URLs go
//! through the system ssh), spec files read from a commit's tree (never from
//! a work tree), and revisions pinned under `refs/cim/<sha>` so that nix can
//! fetch exactly that commit even after a force-push moved the branch away.
//!
//! Every function here blocks; the runtime calls them on a blocking thread.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use gix::ObjectId;

use crate::spec::SpecFile;
use crate::types::Revision;

/// Directory of spec files inside the repository.
pub const SPECS_DIR: &str = "specs";

#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("cannot open or create the mirror at {path}")]
    Mirror {
        path: PathBuf,
        #[source]
        source: gix::Error,
    },
    #[error("fetching branch `{branch}` from {url} failed")]
    Fetch {
        url: String,
        branch: String,
        #[source]
        source: gix::Error,
    },
    #[error("branch `{branch}` does not exist in {url}")]
    NoBranch { url: String, branch: String },
    #[error("cannot read {what} of revision {revision}")]
    Read {
        revision: String,
        what: String,
        #[source]
        source: gix::Error,
    },
    #[error("cannot pin revision {revision} in the mirror")]
    Pin {
        revision: String,
        #[source]
        source: gix::Error,
    },
    #[error("`{0}` is not a full commit id")]
    BadRevision(String),
    #[error("`{0}` is not a branch name cim fetches (letters, digits, `.`, `_`, `-`, `/`)")]
    BadBranch(String),
    #[error("cannot set the mirror's ssh command: {0}")]
    SshCommand(String),
    #[error("`{0}` is not a git repository with a `specs/` directory")]
    NotARepo(PathBuf),
}

/// A bare mirror of the watched repository.
pub struct Mirror {
    repo: gix::Repository,
    path: PathBuf,
    url: String,
    /// `core.sshCommand` for fetches, quoted for the shell gix runs it in.
    ssh_command: Option<String>,
}

impl Mirror {
    /// Opens the mirror under `state_dir`, creating it on first use. A local
    /// `source` path is made absolute so that fetching does not depend on
    /// the working directory.
    ///
    /// `ssh` is the command line ssh remotes are fetched with (`ssh` and
    /// the options every other ssh call of cim uses: the same config file
    /// and strict host-key checking).
    pub fn open(state_dir: &Path, source: &str, ssh: &[String]) -> Result<Mirror, GitError> {
        let path = std::path::absolute(state_dir.join("mirror.git"))
            .unwrap_or_else(|_| state_dir.join("mirror.git"));
        if !path.join("HEAD").exists() {
            gix::init_bare(&path).map_err(|source| GitError::Mirror {
                path: path.clone(),
                source,
            })?;
        }
        let ssh_command = match ssh.is_empty() {
            true => None,
            // gix runs `core.sshCommand` through a shell: each argument is
            // quoted for it.
            false => Some(
                shlex::try_join(ssh.iter().map(String::as_str)).map_err(|e| {
                    GitError::SshCommand(format!("cannot quote the ssh command line: {e}"))
                })?,
            ),
        };
        let repo = open_mirror(&path, ssh_command.as_deref())?;
        let url = if Path::new(source).exists() {
            std::path::absolute(source)
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| source.to_string())
        } else {
            source.to_string()
        };
        Ok(Mirror {
            repo,
            path,
            url,
            ssh_command,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Fetches `branch` (force-updating it: a rewritten history simply
    /// becomes the new desired state) and returns its head commit.
    pub fn fetch(&self, branch: &str, interrupt: &AtomicBool) -> Result<Revision, GitError> {
        self.fetch_into(branch, &format!("refs/heads/{branch}"), interrupt)
    }

    /// Fetches another `branch` of the watched repository for `cim plan`,
    /// into `refs/cim-plan/<branch>`: the watched branch's ref is never
    /// touched. Returns its head.
    pub fn fetch_for_plan(
        &self,
        branch: &str,
        interrupt: &AtomicBool,
    ) -> Result<Revision, GitError> {
        check_branch_name(branch)?;
        self.fetch_into(branch, &format!("refs/cim-plan/{branch}"), interrupt)
    }

    fn fetch_into(
        &self,
        branch: &str,
        dest: &str,
        interrupt: &AtomicBool,
    ) -> Result<Revision, GitError> {
        let fetch_err = |source| GitError::Fetch {
            url: self.url.clone(),
            branch: branch.to_string(),
            source,
        };
        let refspec = format!("+refs/heads/{branch}:{dest}");
        // Opened afresh for each fetch: gix negotiates without looking for
        // packs it has not seen, so a handle older than another's fetch
        // (`cim plan` fetches a branch into this mirror through its own)
        // cannot read the refs that fetch wrote, and every fetch failed.
        let repo = open_mirror(&self.path, self.ssh_command.as_deref())?;
        let remote = repo
            .remote_at(self.url.as_str())
            .map_err(fetch_err)?
            .with_fetch_tags(gix::remote::fetch::Tags::None)
            .with_refspecs([refspec.as_str()], gix::remote::Direction::Fetch)
            .map_err(fetch_err)?;
        remote
            .connect(gix::remote::Direction::Fetch)
            .map_err(fetch_err)?
            .prepare_fetch(gix::progress::Discard, Default::default())
            .map_err(fetch_err)?
            .receive(gix::progress::Discard, interrupt)
            .map_err(fetch_err)?;
        ref_head(&repo, dest)?.ok_or_else(|| GitError::NoBranch {
            url: self.url.clone(),
            branch: branch.to_string(),
        })
    }

    /// The mirror's current head of `branch`, without fetching.
    pub fn head(&self, branch: &str) -> Result<Option<Revision>, GitError> {
        branch_head(&self.repo, branch)
    }

    /// The spec files in the tree of `revision`.
    pub fn read_specs(&self, revision: &Revision) -> Result<Vec<SpecFile>, GitError> {
        read_specs_at(&self.repo, revision)
    }

    /// Keeps `revision` reachable under `refs/cim/<sha>`.
    pub fn pin(&self, revision: &Revision) -> Result<(), GitError> {
        let pin_err = |source| GitError::Pin {
            revision: revision.to_string(),
            source,
        };
        let id = parse_id(revision)?;
        self.repo
            .reference(
                format!("refs/cim/{revision}").as_str(),
                id,
                gix::refs::transaction::PreviousValue::Any,
                "cim: pin revision for nix",
            )
            .map_err(pin_err)?;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The head commit's signature (`None`: unsigned) and the bytes it
    /// signs, for `trust` to judge.
    pub fn signature(&self, revision: &Revision) -> Result<(Option<Vec<u8>>, Vec<u8>), GitError> {
        let read_err = |source| GitError::Read {
            revision: revision.to_string(),
            what: "the commit's signature".to_string(),
            source,
        };
        let commit = self
            .repo
            .find_commit(parse_id(revision)?)
            .map_err(read_err)?;
        Ok(match commit.signature().map_err(read_err)? {
            Some((signature, signed)) => (Some(signature.to_vec()), signed.to_bstring().to_vec()),
            None => (None, Vec::new()),
        })
    }

    /// Whether `new` descends from `old` (the branch moved forward), looking
    /// back at most [`HISTORY_LIMIT`] commits. An `old` the mirror does not
    /// hold cannot be judged and counts as an ancestor.
    pub fn descends_from(&self, new: &Revision, old: &Revision) -> Result<bool, GitError> {
        let old_id = parse_id(old)?;
        if new == old || self.repo.find_commit(old_id).is_err() {
            return Ok(true);
        }
        let walk_err = |source| GitError::Read {
            revision: new.to_string(),
            what: "the history".to_string(),
            source,
        };
        let walk = self
            .repo
            .rev_walk([parse_id(new)?])
            .all()
            .map_err(walk_err)?;
        for info in walk.take(HISTORY_LIMIT) {
            if info.map_err(walk_err)?.id == old_id {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The flake reference nix builds `revision` from.
    pub fn flake_ref(&self, revision: &Revision) -> String {
        flake_ref(&self.path, revision)
    }
}

/// The flake reference of a pinned `revision` in the mirror at `mirror`.
pub fn flake_ref(mirror: &Path, revision: &Revision) -> String {
    format!(
        "git+file://{}?ref=refs/cim/{revision}&rev={revision}",
        mirror.display()
    )
}

/// A watched repository on the local file system. Its branch head is read
/// in-process, so that checking an unchanged branch starts no process.
pub struct LocalSource {
    repo: gix::Repository,
}

impl LocalSource {
    pub fn open(path: &Path) -> Result<LocalSource, GitError> {
        let repo = gix::open(path).map_err(|_| GitError::NotARepo(path.to_path_buf()))?;
        Ok(LocalSource { repo })
    }

    /// The git directory, whose refs are watched.
    pub fn git_dir(&self) -> &Path {
        self.repo.git_dir()
    }

    /// The head of `branch` as it is on disk right now.
    pub fn head(&self, branch: &str) -> Result<Option<Revision>, GitError> {
        branch_head(&self.repo, branch)
    }
}

/// The mirror at `path`, with `ssh_command` as its `core.sshCommand` (in
/// memory only: the mirror's config on disk is left as it is).
fn open_mirror(path: &Path, ssh_command: Option<&str>) -> Result<gix::Repository, GitError> {
    let mut repo = gix::open(path).map_err(|source| GitError::Mirror {
        path: path.to_path_buf(),
        source,
    })?;
    if let Some(command) = ssh_command {
        let mut config = repo.config_snapshot_mut();
        config
            .set_value(&gix::config::tree::Core::SSH_COMMAND, command)
            .map_err(|e| GitError::SshCommand(e.to_string()))?;
        config
            .commit()
            .map_err(|e| GitError::SshCommand(e.to_string()))?;
    }
    Ok(repo)
}

fn branch_head(repo: &gix::Repository, branch: &str) -> Result<Option<Revision>, GitError> {
    ref_head(repo, &format!("refs/heads/{branch}"))
}

/// The commit the reference `name` points at, if it exists.
fn ref_head(repo: &gix::Repository, name: &str) -> Result<Option<Revision>, GitError> {
    let name = name.to_string();
    match repo.try_find_reference(name.as_str()) {
        Ok(Some(mut r)) => {
            let id = r.peel_to_id().map_err(|source| GitError::Read {
                revision: name.clone(),
                what: "the branch".to_string(),
                source,
            })?;
            let id = id.to_string();
            Revision::parse(&id)
                .map(Some)
                .ok_or(GitError::BadRevision(id))
        }
        Ok(None) => Ok(None),
        Err(source) => Err(GitError::Read {
            revision: name,
            what: "the branch".to_string(),
            source,
        }),
    }
}

/// Resolves `spec` (a commit id or a unique prefix of one, a branch, a
/// tag; `None`: `branch`) in the mirror at `mirror`, pins it for nix, and
/// reads its spec files: what `cim plan` looks at, without fetching.
pub fn revision_for_plan(
    mirror: &Path,
    branch: &str,
    spec: Option<&str>,
) -> Result<(Revision, Vec<SpecFile>), GitError> {
    let repo = gix::open(mirror).map_err(|source| GitError::Mirror {
        path: mirror.to_path_buf(),
        source,
    })?;
    let revision = match spec {
        None => branch_head(&repo, branch)?.ok_or_else(|| GitError::NoBranch {
            url: mirror.display().to_string(),
            branch: branch.to_string(),
        })?,
        Some(spec) => {
            let id = repo
                .rev_parse_single(spec)
                .map_err(|source| GitError::Read {
                    revision: spec.to_string(),
                    what: "the revision".to_string(),
                    source,
                })?
                .object()
                .map_err(|source| GitError::Read {
                    revision: spec.to_string(),
                    what: "the revision".to_string(),
                    source,
                })?
                .peel_to_commit()
                .map_err(|source| GitError::Read {
                    revision: spec.to_string(),
                    what: "the commit".to_string(),
                    source,
                })?
                .id
                .to_string();
            Revision::parse(&id).ok_or(GitError::BadRevision(id))?
        }
    };
    repo.reference(
        format!("refs/cim/{revision}").as_str(),
        parse_id(&revision)?,
        gix::refs::transaction::PreviousValue::Any,
        "cim: pin revision for a plan",
    )
    .map_err(|source| GitError::Pin {
        revision: revision.to_string(),
        source,
    })?;
    let specs = read_specs_at(&repo, &revision)?;
    Ok((revision, specs))
}

/// A branch name safe in a refspec: letters, digits, `.`, `_`, `-` and
/// `/` between components, none empty or starting with `.` or `-`.
fn check_branch_name(branch: &str) -> Result<(), GitError> {
    let ok = !branch.is_empty()
        && branch.len() <= 200
        && branch.split('/').all(|c| {
            !c.is_empty()
                && !c.starts_with('.')
                && !c.starts_with('-')
                && !c.ends_with(".lock")
                && c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        })
        && !branch.contains("..");
    if ok {
        Ok(())
    } else {
        Err(GitError::BadBranch(branch.to_string()))
    }
}

/// How far back [`Mirror::descends_from`] looks.
const HISTORY_LIMIT: usize = 100_000;

fn parse_id(revision: &str) -> Result<ObjectId, GitError> {
    ObjectId::from_hex(revision.as_bytes()).map_err(|_| GitError::BadRevision(revision.to_string()))
}

fn read_specs_at(repo: &gix::Repository, revision: &str) -> Result<Vec<SpecFile>, GitError> {
    let read_err = |what: &str| {
        let what = what.to_string();
        move |source| GitError::Read {
            revision: revision.to_string(),
            what,
            source,
        }
    };
    let id = parse_id(revision)?;
    let commit = repo.find_commit(id).map_err(read_err("the commit"))?;
    let tree = commit.tree().map_err(read_err("the tree"))?;
    let Some(entry) = tree
        .lookup_entry_by_path(SPECS_DIR)
        .map_err(read_err("specs/"))?
    else {
        return Ok(Vec::new());
    };
    if !entry.mode().is_tree() {
        return Ok(Vec::new());
    }
    let specs = entry.object().map_err(read_err("specs/"))?.into_tree();
    let mut files = Vec::new();
    for item in specs.iter() {
        let item = item.map_err(read_err("specs/"))?;
        let name = item.filename().to_string();
        if !(name.ends_with(".yaml") || name.ends_with(".yml")) || !item.mode().is_blob() {
            continue;
        }
        let path = format!("{SPECS_DIR}/{name}");
        let blob = item.object().map_err(read_err(&path))?;
        files.push(SpecFile {
            path,
            contents: blob.data.clone(),
        });
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(files)
}

/// Spec files for `cim validate`: from the work tree if `path` has a
/// `specs/` directory, otherwise from the HEAD commit of the repository at
/// `path` (which may be bare).
pub fn specs_for_validation(path: &Path) -> Result<Vec<SpecFile>, GitError> {
    let dir = path.join(SPECS_DIR);
    if dir.is_dir() {
        let mut files = Vec::new();
        let entries =
            std::fs::read_dir(&dir).map_err(|_| GitError::NotARepo(path.to_path_buf()))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !(name.ends_with(".yaml") || name.ends_with(".yml")) || !entry.path().is_file() {
                continue;
            }
            let contents =
                std::fs::read(entry.path()).map_err(|_| GitError::NotARepo(path.to_path_buf()))?;
            files.push(SpecFile {
                path: format!("{SPECS_DIR}/{name}"),
                contents,
            });
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        return Ok(files);
    }
    let repo = gix::open(path).map_err(|_| GitError::NotARepo(path.to_path_buf()))?;
    let head = repo
        .head_id()
        .map_err(|_| GitError::NotARepo(path.to_path_buf()))?
        .to_string();
    read_specs_at(&repo, &head)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn only_plain_branch_names_reach_a_refspec() {
        for ok in ["next", "feature/web-2", "release-1.2", "a_b"] {
            assert!(check_branch_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "a:b",
            "a*",
            "../x",
            "a..b",
            "-x",
            ".x",
            "a//b",
            "x.lock",
            "a b",
            "a\nb",
            "refs/heads/x:refs/heads/main",
            "+x",
        ] {
            assert!(check_branch_name(bad).is_err(), "{bad:?}");
        }
    }

    fn ssh() -> Vec<String> {
        crate::driver::DriverConfig::default().git_ssh_command()
    }

    #[allow(clippy::disallowed_methods)]
    fn git(dir: &Path, args: &[&str]) -> String {
        let out = Command::new("git")
            .args([
                "-c",
                "user.email=t@t",
                "-c",
                "user.name=t",
                "-c",
                "init.defaultBranch=main",
            ])
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// A repository on `main` with one commit of `files` (path, contents).
    fn source(files: &[(&str, &str)]) -> tempfile::TempDir {
        let src = tempfile::tempdir().unwrap();
        git(src.path(), &["init", "-q"]);
        for (path, contents) in files {
            let path = src.path().join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, contents).unwrap();
        }
        git(src.path(), &["add", "."]);
        git(src.path(), &["commit", "-qm", "one"]);
        src
    }

    #[test]
    fn fetches_reads_pins_and_follows_force_pushes() {
        let src = source(&[("specs/a.yaml", "a: 1\n"), ("specs/notes.txt", "ignored")]);
        let state = tempfile::tempdir().unwrap();
        let first = Revision::parse(&git(src.path(), &["rev-parse", "HEAD"])).unwrap();

        let mirror = Mirror::open(state.path(), src.path().to_str().unwrap(), &ssh()).unwrap();
        let no = AtomicBool::new(false);
        assert_eq!(mirror.fetch("main", &no).unwrap(), first);
        let files = mirror.read_specs(&first).unwrap();
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].path, "specs/a.yaml");
        assert_eq!(files[0].contents, b"a: 1\n");
        mirror.pin(&first).unwrap();
        assert!(mirror
            .flake_ref(&first)
            .contains(&format!("ref=refs/cim/{first}&rev={first}")));

        std::fs::write(src.path().join("specs/a.yaml"), "a: 2\n").unwrap();
        git(src.path(), &["commit", "-qam", "rewritten", "--amend"]);
        let rewritten = Revision::parse(&git(src.path(), &["rev-parse", "HEAD"])).unwrap();
        assert_eq!(mirror.fetch("main", &no).unwrap(), rewritten);
        assert_eq!(
            mirror.read_specs(&rewritten).unwrap()[0].contents,
            b"a: 2\n"
        );
        // The pinned revision stays readable after the rewrite.
        assert_eq!(mirror.read_specs(&first).unwrap()[0].contents, b"a: 1\n");

        assert!(matches!(
            mirror.fetch("nope", &no),
            Err(GitError::Fetch { .. } | GitError::NoBranch { .. })
        ));
    }

    #[test]
    fn a_branch_fetched_for_a_plan_does_not_stop_the_watched_one() {
        let src = source(&[("specs/a.yaml", "a: 1\n")]);
        let state = tempfile::tempdir().unwrap();
        let no = AtomicBool::new(false);
        // The watcher's mirror, open for the controller's life.
        let watched = Mirror::open(state.path(), src.path().to_str().unwrap(), &ssh()).unwrap();
        let first = watched.fetch("main", &no).unwrap();
        // A change proposed on a branch, planned through a mirror of its own.
        git(src.path(), &["checkout", "-q", "-b", "proposal"]);
        std::fs::write(src.path().join("specs/a.yaml"), "a: 2\n").unwrap();
        git(src.path(), &["commit", "-qam", "two"]);
        let proposal = Revision::parse(&git(src.path(), &["rev-parse", "HEAD"])).unwrap();
        let planner = Mirror::open(state.path(), src.path().to_str().unwrap(), &ssh()).unwrap();
        assert_eq!(planner.fetch_for_plan("proposal", &no).unwrap(), proposal);
        planner.pin(&proposal).unwrap();
        // Merged: the watcher follows main to it.
        git(src.path(), &["checkout", "-q", "main"]);
        git(src.path(), &["merge", "-q", "--ff-only", "proposal"]);
        assert_eq!(watched.fetch("main", &no).unwrap(), proposal);
        // What the watcher does with a new head, through its own handle.
        assert_eq!(
            watched.read_specs(&proposal).unwrap()[0].contents,
            b"a: 2\n"
        );
        assert!(watched.descends_from(&proposal, &first).unwrap());
        watched.pin(&proposal).unwrap();
    }

    #[test]
    fn validation_reads_work_trees_and_bare_repos() {
        let src = tempfile::tempdir().unwrap();
        git(src.path(), &["init", "-q"]);
        std::fs::create_dir(src.path().join("specs")).unwrap();
        std::fs::write(src.path().join("specs/b.yml"), "b\n").unwrap();
        assert_eq!(specs_for_validation(src.path()).unwrap().len(), 1);
        git(src.path(), &["add", "."]);
        git(src.path(), &["commit", "-qm", "one"]);
        let bare = tempfile::tempdir().unwrap();
        git(
            bare.path(),
            &[
                "clone",
                "-q",
                "--bare",
                src.path().to_str().unwrap(),
                "r.git",
            ],
        );
        let files = specs_for_validation(&bare.path().join("r.git")).unwrap();
        assert_eq!(files[0].path, "specs/b.yml");
    }
}
