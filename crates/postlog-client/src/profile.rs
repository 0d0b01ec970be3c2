//! Login URLs and the on-disk profile.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// `postlog://ACCOUNT@HOST:PORT/?device=ID&secret=HEX64&fp=HEX64`, printed by
/// `postlog account add`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoginUrl {
    pub account: String,
    /// `HOST:PORT` as given (resolved at connect time).
    pub server: String,
    pub device: u64,
    pub secret: [u8; 32],
    pub fingerprint: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error(
        "invalid login URL: {0} (expected postlog://ACCOUNT@HOST:PORT/?device=N&secret=HEX&fp=HEX)"
    )]
    BadUrl(&'static str),
    #[error("no profile in {0}: run `postlog login URL` first")]
    NotLoggedIn(PathBuf),
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {why}")]
    Corrupt { path: PathBuf, why: String },
    #[error(
        "the Maildir {maildir} must be inside the notmuch mail root {root} (notmuch indexes \
         only files below it)"
    )]
    OutsideNotmuch { maildir: PathBuf, root: PathBuf },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ProfileError + '_ {
    move |source| ProfileError::Io {
        path: path.to_owned(),
        source,
    }
}

impl LoginUrl {
    pub fn to_url(&self) -> String {
        format!(
            "postlog://{}@{}/?device={}&secret={}&fp={}",
            self.account,
            self.server,
            self.device,
            hex::encode(self.secret),
            self.fingerprint
        )
    }
}

impl std::fmt::Display for LoginUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_url())
    }
}

impl FromStr for LoginUrl {
    type Err = ProfileError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix("postlog://")
            .ok_or(ProfileError::BadUrl("scheme"))?;
        let (authority, query) = rest.split_once("/?").ok_or(ProfileError::BadUrl("query"))?;
        let (account, server) = authority
            .rsplit_once('@')
            .ok_or(ProfileError::BadUrl("account@host:port"))?;
        if account.is_empty() || !server.contains(':') {
            return Err(ProfileError::BadUrl("account@host:port"));
        }
        let (mut device, mut secret, mut fp) = (None, None, None);
        for pair in query.split('&') {
            match pair.split_once('=') {
                Some(("device", v)) => device = v.parse::<u64>().ok(),
                Some(("secret", v)) => {
                    let mut b = [0u8; 32];
                    secret = hex::decode_to_slice(v, &mut b).ok().map(|_| b);
                }
                Some(("fp", v)) if v.len() == 64 && hex::decode(v).is_ok() => {
                    fp = Some(v.to_ascii_lowercase())
                }
                _ => {}
            }
        }
        Ok(LoginUrl {
            account: account.to_owned(),
            server: server.to_owned(),
            device: device.ok_or(ProfileError::BadUrl("device"))?,
            secret: secret.ok_or(ProfileError::BadUrl("secret"))?,
            fingerprint: fp.ok_or(ProfileError::BadUrl("fp"))?,
        })
    }
}

/// `DIR/profile.toml`: everything but the secret.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct ProfileFile {
    server: String,
    account: String,
    device: u64,
    fingerprint: String,
    maildir: PathBuf,
    /// The notmuch mail root (the directory holding `.notmuch/`), when mail is indexed in
    /// notmuch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    notmuch: Option<PathBuf>,
    /// What happens to a message this replica tags `deleted` (a notmuch tag, or the Maildir
    /// flag T): `"retention"` (the default) leaves it to the server's retention rule, which
    /// deletes it everywhere once it has carried the tag long enough (and it can be
    /// untagged until then); `"now"` deletes it at the next sync, like `postlog delete`.
    #[serde(default, skip_serializing_if = "DeleteTagged::is_default")]
    delete_tagged: DeleteTagged,
}

/// `delete_tagged` in `profile.toml`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeleteTagged {
    /// Left to the server's retention rule.
    #[default]
    Retention,
    /// Deleted at the next sync.
    Now,
}

impl DeleteTagged {
    fn is_default(&self) -> bool {
        *self == DeleteTagged::Retention
    }
}

/// A logged-in client installation: `DIR/profile.toml`, `DIR/secret` (mode 0600),
/// `DIR/cursor`, and the Maildir.
#[derive(Clone, Debug)]
pub struct Profile {
    pub dir: PathBuf,
    pub login: LoginUrl,
    pub maildir: PathBuf,
    /// The notmuch mail root the Maildir lies in, when synced mail is indexed in notmuch
    /// (needs the `notmuch` feature to sync).
    pub notmuch: Option<PathBuf>,
    /// What a local `deleted` tag does (`delete_tagged` in `profile.toml`).
    pub delete_tagged: DeleteTagged,
}

/// The Maildir of a notmuch profile when none is given: `ROOT/postlog`.
pub const NOTMUCH_FOLDER: &str = "postlog";

fn absolute(p: PathBuf, dir: &Path) -> Result<PathBuf, ProfileError> {
    Ok(if p.is_absolute() {
        p
    } else {
        std::env::current_dir().map_err(io(dir))?.join(p)
    })
}

impl Profile {
    /// Writes a new profile (replacing an old login in the same directory).
    pub fn create(
        dir: &Path,
        login: LoginUrl,
        maildir: Option<PathBuf>,
    ) -> Result<Profile, ProfileError> {
        Profile::create_with(dir, login, maildir, None)
    }

    /// Like [`Profile::create`], optionally with a notmuch mail root: the Maildir then
    /// defaults to `ROOT/postlog` and must lie inside the root.
    pub fn create_with(
        dir: &Path,
        login: LoginUrl,
        maildir: Option<PathBuf>,
        notmuch: Option<PathBuf>,
    ) -> Result<Profile, ProfileError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let notmuch = match notmuch {
            Some(root) => {
                let root = absolute(root, dir)?;
                Some(root.canonicalize().map_err(io(&root))?)
            }
            None => None,
        };
        let maildir = match (maildir, &notmuch) {
            (Some(m), _) => absolute(m, dir)?,
            (None, Some(root)) => root.join(NOTMUCH_FOLDER),
            (None, None) => dir.join("mail"),
        };
        if let Some(root) = &notmuch
            && notmuch_folder(root, &maildir).is_none()
        {
            return Err(ProfileError::OutsideNotmuch {
                maildir,
                root: root.clone(),
            });
        }
        let file = ProfileFile {
            server: login.server.clone(),
            account: login.account.clone(),
            device: login.device,
            fingerprint: login.fingerprint.clone(),
            maildir: maildir.clone(),
            notmuch: notmuch.clone(),
            delete_tagged: DeleteTagged::default(),
        };
        let text = toml::to_string(&file).map_err(|e| ProfileError::Corrupt {
            path: dir.to_owned(),
            why: e.to_string(),
        })?;
        write_atomic(
            &dir.join("secret"),
            hex::encode(login.secret).as_bytes(),
            0o600,
        )?;
        write_atomic(&dir.join("profile.toml"), text.as_bytes(), 0o644)?;
        Ok(Profile {
            dir: dir.to_owned(),
            login,
            maildir,
            notmuch,
            delete_tagged: DeleteTagged::default(),
        })
    }

    pub fn load(dir: &Path) -> Result<Profile, ProfileError> {
        let path = dir.join("profile.toml");
        if !path.exists() {
            return Err(ProfileError::NotLoggedIn(dir.to_owned()));
        }
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        let f: ProfileFile = toml::from_str(&text).map_err(|e| ProfileError::Corrupt {
            path: path.clone(),
            why: e.to_string(),
        })?;
        let spath = dir.join("secret");
        let s = std::fs::read_to_string(&spath).map_err(io(&spath))?;
        let mut secret = [0u8; 32];
        hex::decode_to_slice(s.trim(), &mut secret).map_err(|e| ProfileError::Corrupt {
            path: spath,
            why: e.to_string(),
        })?;
        Ok(Profile {
            dir: dir.to_owned(),
            login: LoginUrl {
                account: f.account,
                server: f.server,
                device: f.device,
                secret,
                fingerprint: f.fingerprint,
            },
            maildir: f.maildir,
            notmuch: f.notmuch,
            delete_tagged: f.delete_tagged,
        })
    }

    /// The next log offset this replica has not applied (0 when never synced).
    pub fn cursor(&self) -> Result<u64, ProfileError> {
        let path = self.dir.join("cursor");
        match std::fs::read_to_string(&path) {
            Ok(s) => s.trim().parse().map_err(|_| ProfileError::Corrupt {
                path,
                why: "not a number".into(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(ProfileError::Io { path, source: e }),
        }
    }

    /// Durably records the cursor (tmp, fsync, rename, fsync dir).
    pub fn set_cursor(&self, cursor: u64) -> Result<(), ProfileError> {
        write_atomic(
            &self.dir.join("cursor"),
            format!("{cursor}\n").as_bytes(),
            0o644,
        )
    }
}

/// The Maildir's path relative to the notmuch mail root (`postlog`, `a/b`), as notmuch's
/// `path:` queries name it; `None` unless the Maildir lies strictly inside the root and
/// both paths are UTF-8 (libnotmuch takes paths as C strings of UTF-8 here). The root is
/// canonical; the Maildir's deepest existing ancestor is canonicalized so that symlinks
/// and `..` cannot fool the check.
pub fn notmuch_folder(root: &Path, maildir: &Path) -> Option<String> {
    let mut existing = maildir.to_path_buf();
    let mut rest = Vec::new();
    while !existing.exists() {
        rest.push(existing.file_name()?.to_owned());
        existing = existing.parent()?.to_path_buf();
    }
    let mut full = existing.canonicalize().ok()?;
    for part in rest.into_iter().rev() {
        full.push(part);
    }
    let rel = full.strip_prefix(root).ok()?;
    if rel.as_os_str().is_empty()
        || rel
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return None;
    }
    root.to_str()?;
    rel.to_str().map(str::to_owned)
}

/// Replaces `path` atomically and durably.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), ProfileError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_url_round_trips_and_rejects() {
        let u = LoginUrl {
            account: "ann".into(),
            server: "127.0.0.1:4433".into(),
            device: 3,
            secret: [9; 32],
            fingerprint: "ab".repeat(32),
        };
        assert_eq!(u.to_url().parse::<LoginUrl>().unwrap(), u);
        for bad in [
            "http://x",
            "postlog://ann@host/?device=1",
            &u.to_url().replace("fp=", "fq="),
            &u.to_url().replace("secret=09", "secret=zz"),
        ] {
            assert!(bad.parse::<LoginUrl>().is_err(), "{bad}");
        }
    }

    #[test]
    fn profile_and_cursor_persist() {
        let dir = tempfile::tempdir().unwrap();
        let u: LoginUrl = format!(
            "postlog://a@h:1/?device=1&secret={}&fp={}",
            "01".repeat(32),
            "cd".repeat(32)
        )
        .parse()
        .unwrap();
        let p = Profile::create(dir.path(), u.clone(), None).unwrap();
        assert_eq!(p.cursor().unwrap(), 0);
        p.set_cursor(42).unwrap();
        let q = Profile::load(dir.path()).unwrap();
        assert_eq!((q.cursor().unwrap(), q.login), (42, u));
        assert!(matches!(
            Profile::load(&dir.path().join("x")),
            Err(ProfileError::NotLoggedIn(_))
        ));
        assert_eq!(q.notmuch, None);
    }

    #[test]
    fn notmuch_profile_keeps_its_maildir_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("mail root");
        std::fs::create_dir_all(&root).unwrap();
        let u: LoginUrl = format!(
            "postlog://a@h:1/?device=1&secret={}&fp={}",
            "01".repeat(32),
            "cd".repeat(32)
        )
        .parse()
        .unwrap();
        let prof = dir.path().join("p");
        let p = Profile::create_with(&prof, u.clone(), None, Some(root.clone())).unwrap();
        let root = root.canonicalize().unwrap();
        assert_eq!(p.maildir, root.join(NOTMUCH_FOLDER));
        let q = Profile::load(&prof).unwrap();
        assert_eq!((q.maildir, q.notmuch), (p.maildir, Some(root.clone())));
        assert_eq!(
            notmuch_folder(&root, &root.join("x/y")).as_deref(),
            Some("x/y")
        );
        assert_eq!(notmuch_folder(&root, &root), None);
        assert_eq!(notmuch_folder(&root, &root.join("../elsewhere")), None);
        assert!(matches!(
            Profile::create_with(
                &prof,
                u,
                Some(dir.path().join("outside")),
                Some(root.clone())
            ),
            Err(ProfileError::OutsideNotmuch { .. })
        ));
    }
}
