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
}

/// A logged-in client installation: `DIR/profile.toml`, `DIR/secret` (mode 0600),
/// `DIR/cursor`, and the Maildir.
#[derive(Clone, Debug)]
pub struct Profile {
    pub dir: PathBuf,
    pub login: LoginUrl,
    pub maildir: PathBuf,
}

impl Profile {
    /// Writes a new profile (replacing an old login in the same directory).
    pub fn create(
        dir: &Path,
        login: LoginUrl,
        maildir: Option<PathBuf>,
    ) -> Result<Profile, ProfileError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let maildir = maildir.unwrap_or_else(|| dir.join("mail"));
        let maildir = if maildir.is_absolute() {
            maildir
        } else {
            std::env::current_dir().map_err(io(dir))?.join(maildir)
        };
        let file = ProfileFile {
            server: login.server.clone(),
            account: login.account.clone(),
            device: login.device,
            fingerprint: login.fingerprint.clone(),
            maildir: maildir.clone(),
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
    }
}
