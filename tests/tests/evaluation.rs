//! Real `nix` evaluating a revision the way the controller does (a flake in
//! a git repository, one revision after another), cut short and with its
//! git cache broken: faults no sandbox host is needed for.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cim::driver::{evaluate, DriverConfig};
use cim_sandbox::sh;

/// A bare repository, as the controller's mirror is (nix fetches a bare
/// repository through its git cache, a working tree in place), with one
/// commit per `versions` entry under its own ref (version 0: a flake that
/// does not parse); returns the flake reference of each.
fn revisions(dir: &Path, versions: &[u32]) -> Vec<String> {
    let repo = dir.join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let r = repo.to_str().unwrap();
    let git = |args: &[&str]| {
        let mut full = vec![
            "-C",
            r,
            "-c",
            "user.name=cim test",
            "-c",
            "user.email=test@cim.invalid",
        ];
        full.extend_from_slice(args);
        sh("git", &full).unwrap()
    };
    git(&["init", "-q", "-b", "main"]);
    let mirror = dir.join("mirror.git");
    let m = mirror.to_str().unwrap();
    let revs: Vec<String> = versions
        .iter()
        .map(|v| {
            let flake = match v {
                0 => "{ outputs = _: {".to_string(),
                v => format!(
                    r#"{{ outputs = _: {{ nixosConfigurations.a.config.system.build.toplevel = derivation {{ name = "system-{v}"; system = "x86_64-linux"; builder = "/bin/sh"; args = [ "-c" "echo {v} > $out" ]; }}; }}; }}"#
                ),
            };
            std::fs::write(repo.join("flake.nix"), flake).unwrap();
            git(&["add", "flake.nix"]);
            git(&["commit", "-q", "-m", &format!("version {v}")]);
            let rev = git(&["rev-parse", "HEAD"]);
            git(&["update-ref", &format!("refs/cim/{rev}"), &rev]);
            rev
        })
        .collect();
    sh("git", &["clone", "-q", "--mirror", r, m]).unwrap();
    revs.iter()
        .map(|rev| format!("git+file://{m}?ref=refs/cim/{rev}&rev={rev}"))
        .collect()
}

fn config(cache: PathBuf) -> DriverConfig {
    DriverConfig {
        nix_options: vec![("substituters".into(), String::new())],
        nix_cache: Some(cache),
        eval_timeout: Duration::from_secs(60),
        ..DriverConfig::default()
    }
}

/// The repositories of nix's git cache under `cache`.
fn git_cache(cache: &Path) -> Vec<PathBuf> {
    let repos: Vec<PathBuf> = std::fs::read_dir(cache.join("nix/gitv3"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    assert!(!repos.is_empty(), "nix made no git cache");
    repos
}

async fn assert_evaluates(cfg: &DriverConfig, flake: &str) {
    let evaluation = evaluate(cfg, flake, &["a".to_string()])
        .await
        .unwrap_or_else(|e| panic!("{flake} does not evaluate: {}", error_chain(&e)));
    assert!(
        evaluation.systems["a"].is_ok(),
        "{flake}: {:?}",
        evaluation.systems
    );
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

/// Whether a `git init --bare` of nix's is making a repository under
/// `cache` right now.
fn making_git_cache(cache: &Path) -> bool {
    let cache = cache.as_os_str().as_encoded_bytes();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return false;
    };
    procs.flatten().any(|p| {
        std::fs::read(p.path().join("cmdline")).is_ok_and(|c| {
            c.windows(b"init\0--bare\0".len())
                .any(|w| w == b"init\0--bare\0")
                && c.windows(cache.len()).any(|w| w == cache)
        })
    })
}

/// A push soon after another makes the first evaluation moot, and it is
/// killed. Killed while nix's `git` makes nix's git cache, it used to leave
/// a repository no later fetch could use (4 times in 10): the next
/// revision must evaluate all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evaluation_cut_short_never_breaks_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let flakes = revisions(dir.path(), &[1, 2]);
    // Ten evaluations killed while git ran (a busy machine may let one
    // finish before it is seen).
    let mut caught = 0;
    for attempt in 0..40 {
        if caught == 10 {
            break;
        }
        // A new cache each time: the first fetch is the one that makes it.
        let cache = dir.path().join(format!("cache-{attempt}"));
        let cfg = config(cache.clone());
        let moot = {
            let cfg = cfg.clone();
            let flake = flakes[0].clone();
            tokio::spawn(async move { evaluate(&cfg, &flake, &["a".to_string()]).await })
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !making_git_cache(&cache) && !moot.is_finished() {
            assert!(
                std::time::Instant::now() < deadline,
                "nix made no git cache"
            );
            tokio::task::yield_now().await;
        }
        caught += usize::from(!moot.is_finished());
        moot.abort();
        assert_evaluates(&cfg, &flakes[1]).await;
    }
    assert!(caught > 0, "no evaluation was killed while git ran");
}

/// nix's git cache broken as a killed `git init` leaves it (a directory
/// with a `description` and nothing else) is cleared and made again,
/// instead of failing every revision after it.
#[tokio::test]
async fn a_broken_git_cache_is_made_again() {
    let dir = tempfile::tempdir().unwrap();
    let flakes = revisions(dir.path(), &[1, 2]);
    let cache = dir.path().join("cache");
    let cfg = config(cache.clone());
    assert_evaluates(&cfg, &flakes[0]).await;
    for repo in git_cache(&cache) {
        std::fs::remove_dir_all(&repo).unwrap();
        std::fs::create_dir(&repo).unwrap();
        std::fs::write(repo.join("description"), "").unwrap();
    }
    assert_evaluates(&cfg, &flakes[1]).await;
}

/// A revision whose flake does not parse fails with nix's git cache
/// whole: the cache is kept (clearing it would make the next fetch copy
/// the whole history again), and the next revision evaluates.
#[tokio::test]
async fn a_flake_that_does_not_parse_leaves_the_git_cache_alone() {
    let dir = tempfile::tempdir().unwrap();
    let flakes = revisions(dir.path(), &[1, 0, 2]);
    let cache = dir.path().join("cache");
    let cfg = config(cache.clone());
    assert_evaluates(&cfg, &flakes[0]).await;
    let repos = git_cache(&cache);
    for repo in &repos {
        std::fs::write(repo.join("kept"), "").unwrap();
    }
    let broken = evaluate(&cfg, &flakes[1], &["a".to_string()]).await;
    assert!(broken.is_err(), "{broken:?}");
    for repo in &repos {
        assert!(repo.join("kept").exists(), "{} was cleared", repo.display());
    }
    assert_evaluates(&cfg, &flakes[2]).await;
}
