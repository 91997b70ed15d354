//! RBD image names as QEMU spells them (`block/rbd.c`, `qemu_rbd_parse_filename`):
//! `rbd:POOL[/NAMESPACE]/IMAGE[@SNAP][:KEY=VALUE]...`, a backslash escaping the next character.
//! `id` is the client name (without `client.`), `conf` the ceph.conf path; every other key
//! (`keyring`, `mon_host`, `rbd_cache`, ...) is a Ceph option, set with `rados_conf_set`.

use thiserror::Error;

/// Prefix that marks an RBD image name.
pub const PREFIX: &str = "rbd:";

/// Errors parsing an `rbd:` name.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum NameError {
    #[error("not an rbd: image name")]
    NotRbd,
    #[error("a pool name is needed (rbd:POOL/IMAGE)")]
    NoPool,
    #[error("an image name is needed (rbd:POOL/IMAGE)")]
    NoImage,
    #[error("option {0} has no value (KEY=VALUE)")]
    NoValue(String),
    #[error("empty option name")]
    EmptyKey,
    #[error("option {0} is given twice")]
    Duplicate(String),
    #[error("NUL byte in the name")]
    Nul,
}

/// A parsed `rbd:` image name.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RbdName {
    /// Pool.
    pub pool: String,
    /// RADOS namespace inside the pool.
    pub namespace: Option<String>,
    /// Image.
    pub image: String,
    /// Snapshot (opens read-only).
    pub snap: Option<String>,
    /// Client id (`id=admin` means `client.admin`).
    pub user: Option<String>,
    /// ceph.conf to read (`conf=PATH`); librados's default search when absent.
    pub conf: Option<String>,
    /// Other Ceph options, in order (`keyring`, `mon_host`, ...).
    pub options: Vec<(String, String)>,
}

/// Whether `s` names an RBD image.
pub fn is_rbd(s: &str) -> bool {
    s.starts_with(PREFIX)
}

/// Splits at the first unescaped `delim`: (token, rest after delim).
fn next_tok(s: &str, delim: char) -> (&str, Option<&str>) {
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == delim {
            return (&s[..i], Some(&s[i + c.len_utf8()..]));
        }
    }
    (s, None)
}

fn contains_unescaped(s: &str, delim: char) -> bool {
    next_tok(s, delim).1.is_some()
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl RbdName {
    /// Parses `rbd:POOL[/NS]/IMAGE[@SNAP][:KEY=VALUE]...`.
    pub fn parse(s: &str) -> Result<Self, NameError> {
        let p = s.strip_prefix(PREFIX).ok_or(NameError::NotRbd)?;
        if p.contains('\0') {
            return Err(NameError::Nul);
        }
        let (pool, rest) = next_tok(p, '/');
        let rest = rest.ok_or(NameError::NoPool)?;
        if pool.is_empty() {
            return Err(NameError::NoPool);
        }
        // The image part ends at the first unescaped ':' (options follow).
        let (image_part, mut opts) = next_tok(rest, ':');
        let (image_ns, snap) = if contains_unescaped(image_part, '@') {
            let (i, s) = next_tok(image_part, '@');
            (i, s.map(unescape))
        } else {
            (image_part, None)
        };
        let (namespace, image) = match next_tok(image_ns, '/') {
            (ns, Some(img)) => (Some(unescape(ns)), unescape(img)),
            (img, None) => (None, unescape(img)),
        };
        if image.is_empty() {
            return Err(NameError::NoImage);
        }
        let mut name = RbdName {
            pool: unescape(pool),
            namespace,
            image,
            snap,
            ..Default::default()
        };
        while let Some(o) = opts {
            let (key, rest) = next_tok(o, '=');
            let key = unescape(key);
            if key.is_empty() {
                return Err(NameError::EmptyKey);
            }
            let rest = rest.ok_or_else(|| NameError::NoValue(key.clone()))?;
            let (value, more) = next_tok(rest, ':');
            let value = unescape(value);
            opts = more;
            let slot = match key.as_str() {
                "id" => &mut name.user,
                "conf" => &mut name.conf,
                _ => {
                    if name.options.iter().any(|(k, _)| *k == key) {
                        return Err(NameError::Duplicate(key));
                    }
                    name.options.push((key, value));
                    continue;
                }
            };
            if slot.is_some() {
                return Err(NameError::Duplicate(key));
            }
            *slot = Some(value);
        }
        Ok(name)
    }

    /// `POOL[/NS]/IMAGE[@SNAP]`, for messages.
    pub fn spec(&self) -> String {
        let mut s = self.pool.clone();
        if let Some(ns) = &self.namespace {
            s.push('/');
            s.push_str(ns);
        }
        s.push('/');
        s.push_str(&self.image);
        if let Some(snap) = &self.snap {
            s.push('@');
            s.push_str(snap);
        }
        s
    }

    /// The client name librados wants (`client.ID`; `client.admin` by default).
    pub fn client_name(&self) -> String {
        format!("client.{}", self.user.as_deref().unwrap_or("admin"))
    }

    /// Whether an option (other than id/conf) was given.
    pub fn has_option(&self, key: &str) -> bool {
        self.options.iter().any(|(k, _)| k == key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pool_image_and_options_as_qemu() {
        let n = RbdName::parse("rbd:rbd/disk1:conf=/tmp/c/ceph.conf:id=vm:keyring=/k")
            .expect("valid name");
        assert_eq!(n.pool, "rbd");
        assert_eq!(n.image, "disk1");
        assert_eq!(n.namespace, None);
        assert_eq!(n.snap, None);
        assert_eq!(n.conf.as_deref(), Some("/tmp/c/ceph.conf"));
        assert_eq!(n.user.as_deref(), Some("vm"));
        assert_eq!(n.client_name(), "client.vm");
        assert_eq!(n.options, vec![("keyring".to_owned(), "/k".to_owned())]);
        assert_eq!(n.spec(), "rbd/disk1");
    }

    #[test]
    fn parses_namespace_snapshot_and_escapes() {
        let n = RbdName::parse(r"rbd:p/ns/im\:g@snap1:mon_host=1.2.3.4\:3300").expect("valid name");
        assert_eq!(n.pool, "p");
        assert_eq!(n.namespace.as_deref(), Some("ns"));
        assert_eq!(n.image, "im:g");
        assert_eq!(n.snap.as_deref(), Some("snap1"));
        assert_eq!(
            n.options,
            vec![("mon_host".to_owned(), "1.2.3.4:3300".to_owned())]
        );
        assert_eq!(n.spec(), "p/ns/im:g@snap1");
        assert_eq!(n.client_name(), "client.admin");
    }

    #[test]
    fn malformed_names_are_refused() {
        assert_eq!(RbdName::parse("disk.img"), Err(NameError::NotRbd));
        assert_eq!(RbdName::parse("rbd:pool"), Err(NameError::NoPool));
        assert_eq!(RbdName::parse("rbd:/img"), Err(NameError::NoPool));
        assert_eq!(RbdName::parse("rbd:pool/"), Err(NameError::NoImage));
        assert_eq!(RbdName::parse("rbd:pool/:conf=x"), Err(NameError::NoImage));
        assert_eq!(
            RbdName::parse("rbd:pool/img:conf"),
            Err(NameError::NoValue("conf".to_owned()))
        );
        assert_eq!(
            RbdName::parse("rbd:pool/img:conf=a:conf=b"),
            Err(NameError::Duplicate("conf".to_owned()))
        );
        assert_eq!(RbdName::parse("rbd:pool/img:=x"), Err(NameError::EmptyKey));
        assert_eq!(RbdName::parse("rbd:pool/im\0g"), Err(NameError::Nul));
    }
}
