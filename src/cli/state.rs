//! The CLI's grant files: where a grant lives between the `dlm acquire`
//! process that got it and the `dlm append` / `renew` / `release` processes
//! that use it.
//!
//! One small text file per (client id, lock) in the state directory, readable
//! only by its owner (the token is a credential). This file owns the
//! location, naming and format of those files; it knows nothing about the
//! network. The server stays the truth: a grant file is only a note of a
//! token, and may be stale.

use std::fmt::Write as _;
use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A grant as kept between CLI processes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SavedGrant {
    /// The client id that acquired it.
    pub client_id: i32,
    /// Name of the lock (empty: the default lock).
    pub lock: String,
    /// The token proving the holding.
    pub token: String,
    /// Fencing number of the grant.
    pub fence: u64,
    /// Lease length last granted or renewed.
    pub lease: Duration,
}

/// The state directory: `explicit` if given, else `$XDG_STATE_HOME/dlm`, else
/// `$HOME/.local/state/dlm`.
pub fn state_dir(explicit: Option<&Path>) -> io::Result<PathBuf> {
    if let Some(dir) = explicit {
        return Ok(dir.to_owned());
    }
    let xdg = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute());
    if let Some(base) = xdg {
        return Ok(base.join("dlm"));
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(home) => Ok(PathBuf::from(home).join(".local/state/dlm")),
        None => Err(io::Error::new(
            io::ErrorKind::NotFound,
            "neither XDG_STATE_HOME nor HOME is set; pass --state-dir",
        )),
    }
}

/// Path of the grant file of `lock` for `client_id` in `dir`:
/// `client-<id>.lock-<name>.grant`, the name percent-encoded (and shortened
/// with a checksum when long, since lock names may be longer than file names).
pub fn grant_path(dir: &Path, client_id: i32, lock: &str) -> PathBuf {
    let mut name = String::new();
    for byte in lock.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-' {
            name.push(char::from(byte));
        } else {
            let _ = write!(name, "%{byte:02X}");
        }
    }
    if name.len() > 150 {
        name.truncate(100);
        let _ = write!(name, "~{:08x}", crc32c::crc32c(lock.as_bytes()));
    }
    dir.join(format!("client-{client_id}.lock-{name}.grant"))
}

/// Reads the grant of `lock` for `client_id`; `Ok(None)` if there is none.
pub fn load(dir: &Path, client_id: i32, lock: &str) -> io::Result<Option<SavedGrant>> {
    let path = grant_path(dir, client_id, lock);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let grant = parse(&text).map_err(|reason| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {reason}", path.display()),
        )
    })?;
    // A shortened file name could in theory be shared by two long names.
    if grant.client_id != client_id || grant.lock != lock {
        return Ok(None);
    }
    Ok(Some(grant))
}

/// Holds the state directory's advisory lock (`.lock` in it, made if
/// needed) until dropped: every change of a grant file is made under it, so
/// that a `dlm renew` comparing the file's token and writing it back cannot
/// interleave with a `dlm release` and `dlm acquire` of the same grant in
/// other processes (it wrote an old grant back over the new one).
fn locked(dir: &Path) -> io::Result<fs::File> {
    create_private_dir(dir)?;
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // Not through a link planted at that name.
        options.mode(0o600).custom_flags(libc::O_NOFOLLOW);
    }
    let file = options.open(dir.join(".lock"))?;
    file.lock()?;
    Ok(file)
}

/// Whether grant files can be made in `dir` (made if needed): its lock file
/// is opened for writing and locked, as a save does.
pub fn check_writable(dir: &Path) -> io::Result<()> {
    locked(dir).map(drop)
}

/// Writes `grant` atomically (a temporary file renamed over the old one),
/// creating the directory if needed. Returns the file's path.
pub fn save(dir: &Path, grant: &SavedGrant) -> io::Result<PathBuf> {
    let _locked = locked(dir)?;
    save_locked(dir, grant)
}

/// Replaces the grant of `lock` for `client_id` with `with` (or removes it,
/// for `None`) only if the file still holds `token`; says whether it did.
/// A grant released and acquired again by other processes meanwhile is
/// left as it is.
pub fn replace_if(
    dir: &Path,
    client_id: i32,
    lock: &str,
    token: &str,
    with: Option<&SavedGrant>,
) -> io::Result<bool> {
    if !dir.exists() {
        return Ok(false);
    }
    let _locked = locked(dir)?;
    match load(dir, client_id, lock)? {
        Some(saved) if saved.token == token => {}
        _ => return Ok(false),
    }
    match with {
        Some(grant) => save_locked(dir, grant).map(|_| true),
        None => remove_locked(dir, client_id, lock).map(|()| true),
    }
}

fn save_locked(dir: &Path, grant: &SavedGrant) -> io::Result<PathBuf> {
    let path = grant_path(dir, grant.client_id, &grant.lock);
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    // Made new (O_EXCL: never through a link someone left at that name, in
    // a state directory shared with others); a leftover of a crashed
    // process of the same pid is removed first (unlinking follows no link).
    let _ = fs::remove_file(&tmp);
    let written = new_private_file(&tmp).and_then(|mut file| {
        file.write_all(format(grant).as_bytes())?;
        file.sync_all()
    });
    // The token is a credential: no copy is left behind.
    written
        .and_then(|()| fs::rename(&tmp, &path))
        .inspect_err(|_| {
            let _ = fs::remove_file(&tmp);
        })?;
    // The new name durable too (best effort: the file is a note; the
    // server holds the truth).
    if let Ok(dir) = fs::File::open(dir) {
        let _ = dir.sync_all();
    }
    Ok(path)
}

/// Removes the grant file of `lock` for `client_id`, if any (the caller
/// holds the directory's lock).
fn remove_locked(dir: &Path, client_id: i32, lock: &str) -> io::Result<()> {
    match fs::remove_file(grant_path(dir, client_id, lock)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn format(grant: &SavedGrant) -> String {
    format!(
        "# dlm grant, written by `dlm acquire`; used by append, renew and release.\n\
         client_id={}\nlock={}\ntoken={}\nfence={}\nlease_ms={}\n",
        grant.client_id,
        escape(&grant.lock),
        escape(&grant.token),
        grant.fence,
        grant.lease.as_millis(),
    )
}

fn parse(text: &str) -> Result<SavedGrant, String> {
    let (mut client_id, mut lock, mut token, mut fence, mut lease) = (None, None, None, None, None);
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| format!("malformed line {line:?}"))?;
        let bad = |e: &dyn std::fmt::Display| format!("bad {key}: {e}");
        match key {
            "client_id" => client_id = Some(value.parse::<i32>().map_err(|e| bad(&e))?),
            "lock" => lock = Some(unescape(value).map_err(|e| bad(&e))?),
            "token" => token = Some(unescape(value).map_err(|e| bad(&e))?),
            "fence" => fence = Some(value.parse::<u64>().map_err(|e| bad(&e))?),
            "lease_ms" => lease = Some(value.parse::<u64>().map_err(|e| bad(&e))?),
            _ => {} // written by a newer version: ignore
        }
    }
    let missing = |key: &str| format!("missing {key}");
    Ok(SavedGrant {
        client_id: client_id.ok_or_else(|| missing("client_id"))?,
        lock: lock.ok_or_else(|| missing("lock"))?,
        token: token.ok_or_else(|| missing("token"))?,
        fence: fence.ok_or_else(|| missing("fence"))?,
        lease: Duration::from_millis(lease.ok_or_else(|| missing("lease_ms"))?),
    })
}

/// Percent-encodes `%` and control characters so a value stays on one line.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if c == '%' || c.is_control() {
            for byte in c.to_string().bytes() {
                let _ = write!(out, "%{byte:02X}");
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn unescape(value: &str) -> Result<String, String> {
    let mut bytes = Vec::with_capacity(value.len());
    let mut rest = value.as_bytes();
    while let Some((&byte, tail)) = rest.split_first() {
        if byte == b'%' {
            let hex = tail
                .get(..2)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or("bad % escape")?;
            bytes.push(hex);
            rest = &tail[2..];
        } else {
            bytes.push(byte);
            rest = tail;
        }
    }
    String::from_utf8(bytes).map_err(|_| "not UTF-8".to_owned())
}

#[cfg(unix)]
fn create_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[cfg(not(unix))]
fn create_private_dir(dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)
}

/// A new file (an existing name, or a link, is an error), readable only by
/// its owner.
fn new_private_file(path: &Path) -> io::Result<fs::File> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(lock: &str) -> SavedGrant {
        SavedGrant {
            client_id: 3,
            lock: lock.to_owned(),
            token: "tok%en=1".to_owned(),
            fence: 42,
            lease: Duration::from_millis(1500),
        }
    }

    /// `replace_if` changes a grant file only while it holds the token
    /// the caller used: a renew or a release that raced a new acquire
    /// leaves the new grant alone.
    #[test]
    fn a_grant_file_is_replaced_or_removed_only_while_it_holds_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let first = grant("jobs");
        save(dir.path(), &first).unwrap();
        let renewed = SavedGrant {
            lease: Duration::from_millis(9000),
            ..first.clone()
        };
        assert!(replace_if(dir.path(), 3, "jobs", &first.token, Some(&renewed)).unwrap());
        assert_eq!(load(dir.path(), 3, "jobs").unwrap(), Some(renewed.clone()));

        // Released and acquired again elsewhere: a new token.
        let second = SavedGrant {
            token: "second".to_owned(),
            fence: 43,
            ..first.clone()
        };
        save(dir.path(), &second).unwrap();
        assert!(!replace_if(dir.path(), 3, "jobs", &first.token, Some(&renewed)).unwrap());
        assert!(!replace_if(dir.path(), 3, "jobs", &first.token, None).unwrap());
        assert_eq!(load(dir.path(), 3, "jobs").unwrap(), Some(second.clone()));
        assert!(replace_if(dir.path(), 3, "jobs", "second", None).unwrap());
        assert_eq!(load(dir.path(), 3, "jobs").unwrap(), None);
        // No file, or no directory: nothing to replace.
        assert!(!replace_if(dir.path(), 3, "jobs", "second", None).unwrap());
        let missing = dir.path().join("missing");
        assert!(!replace_if(&missing, 3, "jobs", "second", None).unwrap());
        assert!(!missing.exists());
    }

    /// A link planted at the temporary file's name (a state directory
    /// others can write) is not written through.
    #[cfg(unix)]
    #[test]
    fn a_save_does_not_write_through_a_link_at_its_temporary_name() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, b"untouched").unwrap();
        let saved = grant("jobs");
        let path = grant_path(dir.path(), 3, "jobs");
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::os::unix::fs::symlink(&target, &tmp).unwrap();
        save(dir.path(), &saved).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"untouched");
        assert_eq!(load(dir.path(), 3, "jobs").unwrap(), Some(saved));
        assert!(!tmp.exists(), "no temporary file left");
    }

    #[test]
    fn a_saved_grant_loads_back_and_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        for lock in ["", "jobs/nightly", "a%b", "ümlaut lock", &"x".repeat(256)] {
            let saved = grant(lock);
            let path = save(dir.path(), &saved).unwrap();
            assert!(path.file_name().unwrap().len() < 200, "{path:?}");
            assert_eq!(load(dir.path(), 3, lock).unwrap(), Some(saved), "{lock:?}");
            assert_eq!(load(dir.path(), 4, lock).unwrap(), None);
            assert!(replace_if(dir.path(), 3, lock, &grant(lock).token, None).unwrap());
            assert_eq!(load(dir.path(), 3, lock).unwrap(), None);
        }
        assert!(!replace_if(dir.path(), 3, "never saved", "t", None).unwrap());
    }

    #[test]
    fn different_locks_and_clients_get_different_files() {
        let dir = Path::new("/s");
        let paths = [
            grant_path(dir, 1, ""),
            grant_path(dir, 2, ""),
            grant_path(dir, 1, "a"),
            grant_path(dir, 1, "%61"),
            grant_path(dir, 1, "a/b"),
            grant_path(dir, 1, "a_b"),
        ];
        for (i, a) in paths.iter().enumerate() {
            for b in &paths[i + 1..] {
                assert_ne!(a, b);
            }
        }
        assert_eq!(paths[0], Path::new("/s/client-1.lock-.grant"));
    }

    #[test]
    fn values_survive_escaping() {
        for value in ["", "plain", "100%", "line\nbreak", "tab\there", "é%0A"] {
            assert_eq!(unescape(&escape(value)).unwrap(), value);
            assert!(!escape(value).contains('\n'));
        }
        assert!(unescape("%4").is_err());
        assert!(unescape("%zz").is_err());
    }

    #[test]
    fn a_damaged_file_is_an_error_not_a_grant() {
        assert!(parse("client_id=1\nlock=\n").is_err());
        assert!(parse("nonsense").is_err());
        assert!(parse("client_id=x\nlock=\ntoken=t\nfence=1\nlease_ms=1\n").is_err());
        let ok = parse("client_id=1\nlock=\ntoken=t\nfence=1\nlease_ms=1\nnew_key=?\n");
        assert!(ok.is_ok());
    }

    #[cfg(unix)]
    #[test]
    fn grant_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = save(&dir.path().join("nested"), &grant("")).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
